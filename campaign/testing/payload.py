"""Reading and checking a send request body, and building the message object the API returns.

Pure functions over parsed JSON (`nylas-api.md` §1.2, §1.3, §11.2): parse the body,
validate it (raising `ApiProblem` with the status the API would answer), decode
attachments, fingerprint the payload for idempotency, and build the §1.3 message
object. Nothing here keeps state, reads the clock or knows about HTTP.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import html
import json
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson

from campaign.testing.envelopes import ApiProblem
from campaign.testing.records import DeliveredAttachment

__all__ = [
    "BASIC_HEADER_NAMES",
    "REJECTED_MESSAGE",
    "build_message",
    "build_message_headers",
    "build_reply_headers",
    "build_snippet",
    "count_recipients",
    "decode_json_attachments",
    "fingerprint_payload",
    "new_opaque_id",
    "parse_json_object",
    "validate_send_payload",
]

REJECTED_MESSAGE = "Sending to at least one recipient failed."
BASIC_HEADER_NAMES = frozenset({"message-id", "in-reply-to", "references"})
PARTICIPANT_FIELDS = ("from", "to", "cc", "bcc", "reply_to")
METADATA_MAX_KEYS = 50
METADATA_MAX_KEY_LEN = 40
METADATA_MAX_VALUE_LEN = 500
SEND_AT_MIN = timedelta(seconds=60)
SEND_AT_MAX = timedelta(days=30)
_TAG = re.compile(r"<[^>]*>")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# One random byte gives one character: the 252 byte values below 7 * 36 map evenly onto the
# alphabet, and the 4 above are dropped (not folded in), so every character stays equally likely.
_ID_BYTE_LIMIT = 256 // len(_ID_ALPHABET) * len(_ID_ALPHABET)
_ID_TABLE = bytes(ord(_ID_ALPHABET[byte % len(_ID_ALPHABET)]) for byte in range(_ID_BYTE_LIMIT)).ljust(256)
_ID_DROPPED = bytes(range(_ID_BYTE_LIMIT, 256))


def new_opaque_id(length: int = 25) -> str:
    """A random lower-case id like the API's message ids (`5d3qmne77v32r8l4phyuksl2x`)."""
    found = b""
    while len(found) < length:
        found += secrets.token_bytes(length).translate(_ID_TABLE, _ID_DROPPED)
    return found[:length].decode("ascii")


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """The body as a JSON object, else 400 invalid_request_error "error parsing request body"."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid("error parsing request body") from exc
    if not isinstance(value, dict):
        raise _invalid("error parsing request body")
    return value


def _invalid(message: str) -> ApiProblem:
    return ApiProblem(400, "invalid_request_error", message)


def validate_send_payload(payload: dict[str, Any], *, now: datetime) -> None:
    """Check a send body as §11.2 item 3 says; 400 for a malformed field, 402 for a non-ASCII address."""
    _check_participants(payload, "to", required=True)
    for field in ("cc", "bcc", "reply_to"):
        _check_participants(payload, field, required=False)
    _check_participants(payload, "from", required=False, max_items=1)
    for field in ("subject", "body", "reply_to_message_id"):
        if field in payload and not isinstance(payload[field], str):
            raise _invalid(f"{field} must be a string")
    for field in ("is_plaintext", "use_draft", "starred"):
        if field in payload and not isinstance(payload[field], bool):
            raise _invalid(f"{field} must be a boolean")
    _check_custom_headers(payload.get("custom_headers"))
    _check_metadata(payload.get("metadata"))
    _check_tracking(payload.get("tracking_options"))
    _check_attachments(payload.get("attachments"))
    _check_schedule(payload, now=now)
    for field in PARTICIPANT_FIELDS:
        for participant in payload.get(field) or ():
            if not participant["email"].isascii():
                raise ApiProblem(402, "message_rejected", REJECTED_MESSAGE)


def _check_participants(payload: dict[str, Any], field: str, *, required: bool, max_items: int = 0) -> None:
    value = payload.get(field)
    if value is None:
        if required:
            raise _invalid(f"{field} is required")
        return
    if not isinstance(value, list) or (required and not value):
        raise _invalid(f"{field} must be a non-empty array of participants")
    if max_items and len(value) > max_items:
        raise _invalid(f"{field} accepts at most {max_items} participant")
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object with an email")
        address = item.get("email")
        if not isinstance(address, str) or "@" not in address:
            raise _invalid(f"{where}.email must be an email address")
        if "name" in item and not isinstance(item["name"], str):
            raise _invalid(f"{where}.name must be a string")


def _check_custom_headers(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise _invalid("custom_headers must be an array of {name, value} objects")
    for index, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or set(item) != {"name", "value"}
            or not isinstance(item["name"], str)
            or not isinstance(item["value"], str)
            or not item["name"]
        ):
            raise _invalid(f"custom_headers[{index}] must be an object with string name and value")


def _check_metadata(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _invalid("metadata must be an object of string values")
    if len(value) > METADATA_MAX_KEYS:
        raise _invalid(f"metadata accepts at most {METADATA_MAX_KEYS} keys")
    for key, item in value.items():
        if len(key) > METADATA_MAX_KEY_LEN:
            raise _invalid(f"metadata key {key[:20]!r}… is longer than {METADATA_MAX_KEY_LEN} characters")
        if not isinstance(item, str):
            raise _invalid(f"metadata.{key} must be a string")
        if len(item) > METADATA_MAX_VALUE_LEN:
            raise _invalid(f"metadata.{key} is longer than {METADATA_MAX_VALUE_LEN} characters")


def _check_tracking(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _invalid("tracking_options must be an object")
    for flag in ("opens", "links", "thread_replies"):
        if flag in value and not isinstance(value[flag], bool):
            raise _invalid(f"tracking_options.{flag} must be a boolean")
    label = value.get("label")
    if label is not None and (not isinstance(label, str) or len(label) > 2048):
        raise _invalid("tracking_options.label must be a string of at most 2048 characters")


def _check_attachments(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise _invalid("attachments must be an array")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _invalid(f"attachments[{index}] must be an object")
        for field in ("filename", "content_type", "content"):
            if not isinstance(item.get(field), str):
                raise _invalid(f"attachments[{index}].{field} must be a string")
        if item.get("content_id") is not None and not isinstance(item["content_id"], str):
            raise _invalid(f"attachments[{index}].content_id must be a string")


def _check_schedule(payload: dict[str, Any], *, now: datetime) -> None:
    send_at = payload.get("send_at")
    if send_at is None:
        if payload.get("use_draft") is True:
            raise _invalid("use_draft is only valid together with send_at")
        return
    if not isinstance(send_at, int) or isinstance(send_at, bool):
        raise _invalid("send_at must be a Unix timestamp in seconds")
    earliest = int((now + SEND_AT_MIN).timestamp())
    latest = int((now + SEND_AT_MAX).timestamp())
    if not earliest <= send_at <= latest:
        raise _invalid("send_at must be between 1 minute and 30 days from now")


def decode_json_attachments(payload: dict[str, Any]) -> tuple[DeliveredAttachment, ...]:
    """The base64 attachments of a (validated) JSON body; 400 if any content is not base64."""
    found: list[DeliveredAttachment] = []
    for index, item in enumerate(payload.get("attachments") or ()):
        try:
            content = base64.b64decode(item["content"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _invalid(f"attachments[{index}].content is not valid base64") from exc
        found.append(
            DeliveredAttachment(item["filename"], item["content_type"], content, item.get("content_id"))
        )
    return tuple(found)


def fingerprint_payload(
    payload: dict[str, Any], parts: Sequence[tuple[str, DeliveredAttachment]] = ()
) -> str:
    """Canonical JSON of the parsed body, plus each multipart file part's name, type and SHA-256."""
    files = [
        [name, part.filename, part.content_type, hashlib.sha256(part.content).hexdigest()]
        for name, part in parts
    ]
    document: Any = payload if not files else {"message": payload, "files": files}
    canonical: bytes | None
    try:
        canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # an int beyond 64 bits, a lone surrogate, nesting over 255 deep
        canonical = None
    # orjson writes NaN and Infinity as null, like None, where json.dumps tells them apart: a text
    # with "null" anywhere is left to json.dumps. Any other orjson text reads back to the very
    # values (floats exactly, each with its point or exponent), so two payloads get equal
    # fingerprints exactly when json.dumps alone would give them equal ones.
    if canonical is not None and b"null" not in canonical:
        return canonical.decode()
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def count_recipients(payload: dict[str, Any]) -> int:
    """Recipients a provider counts against its quota: to + cc + bcc."""
    return sum(len(payload.get(field) or ()) for field in ("to", "cc", "bcc"))


def build_snippet(body: str, *, plaintext: bool) -> str:
    """The first 100 characters of the body, HTML tags stripped and whitespace collapsed."""
    if plaintext:
        return _collapse_space(body)[:100]
    # Only the body's start is needed. Cut just after a tag (a tag found from any point is also
    # one of the tags found from the start): the part before then turns into text ending in the
    # tag's space, which no entity or whitespace run crosses, so its text begins the whole body's.
    cut = 1024
    while cut < len(body) and (tag := _TAG.search(body, cut)) is not None:
        text = _collapse_space(html.unescape(_TAG.sub(" ", body[: tag.end()])))
        if len(text) >= 100:
            return text[:100]
        cut = 4 * tag.end()
    return _collapse_space(html.unescape(_TAG.sub(" ", body)))[:100]


def _collapse_space(text: str) -> str:
    # re.sub(r"\s+", " ", text).strip() in a fraction of the time: str.split() and re's \s take the
    # same characters for whitespace (str.isspace).
    return " ".join(text.split())


def build_message(
    payload: dict[str, Any],
    *,
    message_id: str,
    grant_id: str,
    grant_email: str,
    folder_id: str,
    date: datetime,
    attachments: Sequence[DeliveredAttachment],
) -> dict[str, Any]:
    """The §1.3 message object for an accepted send (no `headers`; see `build_message_headers`)."""
    body = payload.get("body", "")
    tracking = {"opens": False, "links": False, "thread_replies": False, "label": ""}
    tracking.update(payload.get("tracking_options") or {})
    return {
        "id": message_id,
        "grant_id": grant_id,
        "object": "message",
        "thread_id": new_opaque_id(),
        "subject": payload.get("subject", ""),
        "body": body,
        "snippet": build_snippet(body, plaintext=payload.get("is_plaintext") is True),
        "from": payload.get("from") or [{"email": grant_email}],
        "to": payload["to"],
        "cc": payload.get("cc") or [],
        "bcc": payload.get("bcc") or [],
        "reply_to": payload.get("reply_to") or [],
        "date": int(date.timestamp()),
        "folders": [folder_id],
        "attachments": [_describe_attachment(item, grant_id) for item in attachments],
        "starred": payload.get("starred") is True,
        "unread": False,
        "reply_to_message_id": payload.get("reply_to_message_id", ""),
        "use_draft": payload.get("use_draft") is True,
        "metadata": payload.get("metadata") or {},
        "tracking_options": tracking,
        "schedule_id": "",
    }


def _describe_attachment(item: DeliveredAttachment, grant_id: str) -> dict[str, Any]:
    return {
        "id": new_opaque_id(20),
        "grant_id": grant_id,
        "filename": item.filename,
        "content_type": item.content_type,
        "size": len(item.content),
        "content_id": item.content_id or "",
        "content_disposition": "inline" if item.content_id else "attachment",
        "is_inline": item.content_id is not None,
    }


def build_reply_headers(parent: Sequence[dict[str, str]]) -> tuple[str, str] | None:
    """(In-Reply-To, References) of a reply to the message whose headers are `parent`, as RFC 5322
    §3.6.4 builds them (next-capabilities.md §1.2): In-Reply-To is the parent's Message-ID; References
    is the parent's References (else its In-Reply-To) followed by that Message-ID. None when the
    parent has no Message-ID: the reply then names nothing."""
    found = {h["name"].lower(): h["value"].strip() for h in parent}
    message_id = found.get("message-id", "")
    if not message_id:
        return None
    earlier = found.get("references") or found.get("in-reply-to") or ""
    return message_id, f"{earlier} {message_id}" if earlier else message_id


def build_message_headers(
    message: dict[str, Any], payload: dict[str, Any], *, replying: tuple[str, str] | None = None
) -> list[dict[str, str]]:
    """The MIME headers of a sent message as `fields=include_headers` returns them (custom ones echoed).

    `replying`: (In-Reply-To, References) of a reply, which the provider sets from the message that
    `reply_to_message_id` names (nylas-api.md §1.2; next-capabilities.md §1.3), never the id itself.
    """
    headers = [
        {"name": "Message-ID", "value": f"<{message['id']}@mailer.nylas.com>"},
        {"name": "Date", "value": email.utils.formatdate(message["date"], usegmt=True)},
        {"name": "From", "value": _format_participants(message["from"])},
        {"name": "To", "value": _format_participants(message["to"])},
    ]
    if message["cc"]:
        headers.append({"name": "Cc", "value": _format_participants(message["cc"])})
    if message["reply_to"]:
        headers.append({"name": "Reply-To", "value": _format_participants(message["reply_to"])})
    if replying is not None:
        in_reply_to, references = replying
        headers.append({"name": "In-Reply-To", "value": in_reply_to})
        headers.append({"name": "References", "value": references})
    headers.append({"name": "Subject", "value": message["subject"]})
    headers.append({"name": "MIME-Version", "value": "1.0"})
    headers.extend(
        {"name": item["name"], "value": item["value"]} for item in payload.get("custom_headers") or ()
    )
    return headers


def _format_participants(participants: Sequence[dict[str, str]]) -> str:
    return ", ".join(email.utils.formataddr((item.get("name", ""), item["email"])) for item in participants)
