"""Nylas notifications read defensively: the envelope, and what a bounce report says.

The envelope is CloudEvents-style JSON: `id` (dedupe on it), `type`, `time`, and `data` holding
`grant_id` and `object` (reference/next-capabilities.md §2.1–2.2). A bounce's object names its
addresses in `bounced_addresses` (a string, or a list in some examples), a `code` string such as
"550" or "5.1.1", a `type` such as `mailbox_unavailable`, a `bounce_date` (RFC 2822) and its origin
message. Unknown fields are ignored and nulls tolerated. A bounced "address" that does not validate as
one is left out: a bounce is written by any remote server, and it could match no recipient. Pure:
reads bytes, returns values.

A body is UTF-8 JSON (RFC 8259 §8.1), a leading byte order mark dropped: it is decoded once, and that
text is what is parsed and what the store keeps, so that every reader of the store parses the same
text. A value that cannot be kept as given is never an error (a notification lost): a date no
datetime holds is unknown, a time in milliseconds is read as such, and text holding a lone surrogate
(a `\\ud83d` escape cut from its pair) is kept with U+FFFD in its place.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from campaign.errors import DataError
from campaign.recipients import comparable_address
from campaign.unsubscribe import BLOCK_KIND, BounceRecord, notification_time, storable_text

__all__ = ["BOUNCE", "Notification", "decode_notification", "parse_bounces", "parse_notification"]

BOUNCE = "message.bounce_detected"
_FIELD_CHARS = 500  # of a bounce's code, kind or reason, as kept
# Permanent failures by the provider's kind, whatever the code says (a missing or odd code).
_HARD_KINDS = frozenset(
    {"mailbox_unavailable", "mailbox_not_found", "user_unknown", "no_such_user", "invalid"}
)
_SOFT_KINDS = frozenset({"mailbox_full", "quota_exceeded", "temporary", "transient", "greylisted"})
_CODE = re.compile(r"\b([245])(?:\.\d{1,3}\.\d{1,3}|\d\d)\b")
# A reason with no code that still says the address is gone (listmonk's words, next-capabilities.md §3.1);
# any other bounce without a code or a type is soft: "delayed", "mailbox full", "will be retried".
_BARE_SEPARATORS = re.compile(r"[\s,;]+")
_GONE = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient)|mailbox (?:not found|unavailable)|"
    r"does not exist|doesn't exist|recipient (?:not found|rejected)|invalid (?:recipient|address|mailbox)|"
    r"address rejected|permanent(?:ly)?\W+(?:\w+\W+)?fail",
    re.IGNORECASE,
)
# The receiving server refused the sender, not the address: a policy status (x.7.x: spam, reputation,
# authentication) or words that say so (next-capabilities.md §3.5: listmonk's and Postal's false
# positives suppressed whole lists after a reputation block).
_BLOCKED = re.compile(
    r"\b[45]\.7\.\d{1,3}\b|\bblock(?:ed|list(?:ed)?)\b|\bblacklist|\bspam|\breputation|\bunsolicited",
    re.IGNORECASE,
)
# How deep a notification may nest. Nylas's are a handful of levels; the store's readers parse what is
# kept again, deeper in their own stack, and must not meet a RecursionError there.
_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Notification:
    """One delivered notification: its envelope id and type, the grant, and the object it is about."""

    id: str
    type: str
    grant_id: str | None
    object: Mapping[str, Any]
    time: int | None = None


def decode_notification(body: bytes) -> str:
    """A webhook body's text: UTF-8, a leading byte order mark dropped; DataError for any other bytes
    (UTF-16, Latin-1), which json.loads would guess at but the store's readers, parsing the kept text,
    could not."""
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"the notification is not UTF-8 text (byte {exc.start})") from None


def parse_notification(body: bytes | str) -> Notification:
    """The notification in a webhook body (bytes: `decode_notification` first); DataError when it is not
    UTF-8 JSON, nests deeper than any notification, or has no `id` and `type`."""
    text = decode_notification(body) if isinstance(body, bytes) else body
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise DataError(f"the notification is not JSON ({exc})") from exc
    except RecursionError:  # nested past the interpreter's stack: no notification is
        raise DataError("the notification nests too deeply to be one") from None
    if not isinstance(document, dict):
        raise DataError("the notification is not a JSON object")
    if not _nests_within(document, _MAX_DEPTH):
        raise DataError("the notification nests too deeply to be one")
    event_id, kind = document.get("id"), document.get("type")
    if not isinstance(event_id, str) or not event_id or not isinstance(kind, str) or not kind:
        raise DataError("the notification has no `id` or `type`")
    data = _object(document.get("data"))
    grant = data.get("grant_id")
    happened = notification_time(document.get("time"))
    return Notification(
        id=storable_text(event_id),
        type=storable_text(kind),
        grant_id=storable_text(grant) if isinstance(grant, str) else None,
        object=_object(data.get("object")),
        time=None if happened is None else int(happened.timestamp()),
    )


def parse_bounces(notification: Notification, *, received_at: datetime) -> tuple[BounceRecord, ...]:
    """The addresses a `message.bounce_detected` reports, each classified hard (permanent) or soft."""
    if notification.type != BOUNCE:
        return ()
    found = notification.object
    code = _text(found.get("code"))
    reason = _text(found.get("bounce_reason"))
    hard, kind = _classify(code, _text(found.get("type")), reason)
    # Kept as a report's column and shown by status: the remote server's text, bounded as an inbox
    # report's is (classified whole, before the cut).
    code, kind, reason = field_text(code), field_text(kind), field_text(reason)
    when = _bounce_date(found.get("bounce_date"), notification.time) or received_at.astimezone(UTC)
    origin = _object(found.get("origin"))
    message_id = _text(found.get("message_id")) or _text(origin.get("id"))
    return tuple(
        BounceRecord(email, hard, when.isoformat(timespec="seconds"), code, kind, reason, message_id)
        for email in _addresses(found.get("bounced_addresses"))
    )


def _classify(code: str | None, kind: str | None, reason: str | None) -> tuple[bool, str | None]:
    """Whether a bounce is hard, and its kind as the store keeps it. 5xx / 5.x.x, or a kind that is
    permanent, is hard; 4xx / 4.x.x, or a temporary kind, is soft; with neither, hard only if the reason
    says the address does not exist. A block (the server refused the
    sender: `is_blocked`) is neither: soft, of kind `BLOCK_KIND`, which never suppresses the address."""
    if kind is not None and kind.lower() in _HARD_KINDS:
        return True, kind
    if kind is not None and kind.lower() in _SOFT_KINDS:
        return False, kind
    if is_blocked(code, reason):
        return False, BLOCK_KIND
    for text in (code, reason):
        if text and (match := _CODE.search(text)) is not None:
            return match.group(1) == "5", kind
    # No code: hard only when the words say the address is gone (a delay or a full mailbox passes).
    return bool(reason and _GONE.search(reason)), kind


def is_blocked(code: str | None, reason: str | None) -> bool:
    """Whether a bounce says the receiving server refused the sender (its reputation, its content, its
    authentication) rather than the address: such a bounce must not suppress the address for good."""
    return any(text and _BLOCKED.search(text) for text in (code, reason))


def _addresses(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    # Bare addresses may come separated by spaces, which getaddresses reads as one broken address.
    texts = [
        text
        for item in items
        if isinstance(item, str)
        for text in ([item] if "<" in item else _BARE_SEPARATORS.split(item))
    ]
    # Only what validates as an address: anything else could never be a recipient's (they are validated),
    # and kept as a suppression entry it is a value no list holds (a control character, a quote), which
    # `suppress export` writes and `suppress import` of that export then refuses. The remote server
    # that wrote the bounce is anyone.
    # Each text on its own: in one call an unclosed quote in one swallows the addresses after it.
    found = (
        comparable_address(address) for text in texts for _, address in getaddresses([storable_text(text)])
    )
    return list(dict.fromkeys(address for address in found if address is not None))


def _bounce_date(value: object, time: int | None) -> datetime | None:
    """When the bounce happened, in UTC: its `bounce_date`, else the notification's own time (seconds),
    else None. A date that does not convert (unreadable, or past the calendar's end once in UTC:
    "31 Dec 9999 23:59:59 -1200") is unknown, like a missing one."""
    if isinstance(value, str) and value.strip():
        try:
            parsed = parsedate_to_datetime(value)
            return (parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        except (TypeError, ValueError, OverflowError):
            pass
    return None if time is None else datetime.fromtimestamp(time, tz=UTC)


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def field_text(value: object) -> str | None:
    """A bounce's field (its code, kind, reason: a remote server's text) on one line, without control or
    format characters, at most `_FIELD_CHARS` long; None when empty."""
    text = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in str(value or ""))
    return " ".join(text.split())[:_FIELD_CHARS] or None


def _text(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    text = storable_text(str(value)).strip()
    return text or None


def _nests_within(document: object, limit: int) -> bool:
    """Whether `document`'s lists and objects nest at most `limit` deep (walked without recursion)."""
    level: list[object] = [document]
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
            if isinstance(child, dict | list)
        ]
        if not level:
            return True
    return False
