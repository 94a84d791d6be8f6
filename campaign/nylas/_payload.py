"""The body of a Nylas send (reference/nylas-api.md §1.2 and §2), built from a rendered `Message`. Pure.

`build_send_payload` gives the JSON object; `build_send_request` encodes a whole request
and picks its form by its encoded size: JSON with base64 attachments while the request
stays within 3 MB, else multipart/form-data (a `message` part holding the JSON without
attachments, then one raw file part per attachment) up to 25 MB. A request's body is a
sequence of chunks that share the attachments' bytes, so a big shared file is never
copied per message. Equal messages give byte-equal bodies, which matters: a resumed run
must resend the same bytes under the same Idempotency-Key.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from campaign.errors import UnsendableError
from campaign.models import Address, Attachment, Message

__all__ = [
    "HEADER_ALLOWANCE_BYTES",
    "JSON_LIMIT_BYTES",
    "MULTIPART_LIMIT_BYTES",
    "RequestSize",
    "SendRequest",
    "build_send_payload",
    "build_send_request",
    "encode_send_body",
    "encode_send_request",
    "measure_send_request",
]

JSON_LIMIT_BYTES = 3_000_000  # §2: a JSON send, the whole request, base64 included
MULTIPART_LIMIT_BYTES = 25_000_000  # §2: a multipart send, body included
# The limits count the whole HTTP request; the request line and headers (key, Idempotency-Key,
# boundary, ...) stay well under this, so a body within limit - allowance always fits.
HEADER_ALLOWANCE_BYTES = 2_048
JSON_CONTENT_TYPE = "application/json"
_BOUNDARY_PREFIX = "campaign-"
_BOUNDARY_LENGTH = len(_BOUNDARY_PREFIX) + 32
_CONTENT_KEY = b'"content":"'
_FORM_ESCAPES = {'"': "%22", "\r": "%0D", "\n": "%0A"}  # the HTML form encoding of names (WHATWG)
_FORM_SPECIAL = re.compile(r'["\r\n]')


@dataclass(frozen=True, slots=True)
class RequestSize:
    """The encoded size of a send in both forms, and which form (if any) it goes in."""

    json_bytes: int
    multipart_bytes: int

    @property
    def multipart(self) -> bool:
        """True when the JSON form would exceed Nylas's 3 MB limit for JSON sends."""
        return self.json_bytes + HEADER_ALLOWANCE_BYTES > JSON_LIMIT_BYTES

    @property
    def size(self) -> int:
        """Bytes of the body in the chosen form."""
        return self.multipart_bytes if self.multipart else self.json_bytes

    @property
    def fits(self) -> bool:
        """False when even the multipart form exceeds Nylas's 25 MB limit."""
        return not self.multipart or self.multipart_bytes + HEADER_ALLOWANCE_BYTES <= MULTIPART_LIMIT_BYTES


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One encoded send: its Content-Type and its body as chunks (attachment bytes shared, not copied).

    `payload` is the JSON object without attachments and `attachments` the files, kept so
    that a caller can re-encode a changed payload (`encode_send_request`).
    """

    content_type: str
    chunks: tuple[bytes, ...] = field(repr=False)
    size: int
    payload: Mapping[str, Any] = field(repr=False)
    attachments: tuple[Attachment, ...] = field(default=(), repr=False)

    @property
    def multipart(self) -> bool:
        """True for a multipart/form-data send (Nylas allows only 10 of those per grant per second)."""
        return self.content_type.startswith("multipart/")

    def build_body(self) -> bytes:
        """The whole body as one bytes object (a copy: for tests and small requests)."""
        return b"".join(self.chunks)


@dataclass(frozen=True, slots=True)
class _FileInfo:
    """What the encoding needs to know of an attachment before (or without) its bytes."""

    filename: str
    content_type: str
    content_id: str | None
    size: int


def build_send_payload(message: Message) -> dict[str, Any]:
    """The JSON object of §1.2 for `message`; equal messages give equal dicts with equal key order."""
    _require_loaded(message)
    payload = _payload_without_attachments(message)
    if message.attachments:
        payload["attachments"] = [
            _attachment_json(item, _base64(item).decode("ascii")) for item in message.attachments
        ]
    return payload


def build_send_request(message: Message) -> SendRequest:
    """Encode `message` as JSON or, when that would pass 3 MB, as multipart; DataError past 25 MB."""
    _require_loaded(message)
    return encode_send_request(_payload_without_attachments(message), message.attachments, row=message.row)


def encode_send_request(
    payload: Mapping[str, Any], attachments: Sequence[Attachment] = (), *, row: int | None = None
) -> SendRequest:
    """Encode a JSON object and files as one send, JSON or multipart by size.

    A `payload` that carries its own base64 `attachments` is sent as it is while it fits a
    JSON send, else its files are taken out and sent as multipart parts. DataError (naming
    `row`) when even multipart would pass Nylas's 25 MB limit.
    """
    head = encode_send_body(payload)
    files = tuple(attachments)
    if not files and len(head) + HEADER_ALLOWANCE_BYTES > JSON_LIMIT_BYTES and "attachments" in payload:
        payload, files = _split_attachments(payload)
        head = encode_send_body(payload)
    size = _measure(head, [_part_of(item) for item in files])
    if not size.fits:
        raise UnsendableError(_too_big(row, size))
    if not size.multipart:
        chunks = _json_chunks(head, files) if files else [head]
        return SendRequest(JSON_CONTENT_TYPE, tuple(chunks), size.json_bytes, payload, files)
    boundary = _choose_boundary(head, files)
    heads = _multipart_heads(boundary, head, [_part_of(item) for item in files])
    chunks = [heads[0]]
    for part_head, item in zip(heads[1:-1], files, strict=True):
        chunks.extend((part_head, item.content, b"\r\n"))
    chunks.append(heads[-1])
    content_type = f"multipart/form-data; boundary={boundary}"
    return SendRequest(content_type, tuple(chunks), size.multipart_bytes, payload, files)


def measure_send_request(message: Message, *, file_sizes: Sequence[int] = ()) -> RequestSize:
    """The encoded size of `message` in both forms, without reading a file.

    `file_sizes` gives the sizes of `message.attachment_files` (not yet read), in order;
    read attachments count with their own size.
    """
    if len(file_sizes) != len(message.attachment_files):
        raise ValueError("give one size per attachment file")
    parts = [_part_of(item) for item in message.attachments]
    parts += [
        _FileInfo(item.filename, item.content_type, item.content_id, size)
        for item, size in zip(message.attachment_files, file_sizes, strict=True)
    ]
    return _measure(encode_send_body(_payload_without_attachments(message)), parts)


def _payload_without_attachments(message: Message) -> dict[str, Any]:
    payload: dict[str, Any] = {"to": _participants(message.to)}
    if message.reply_to:
        payload["reply_to"] = _participants(message.reply_to)
    if message.from_ is not None:
        payload["from"] = _participants((message.from_,))
    payload["subject"] = message.subject
    # A send has one body: the HTML when there is one (Nylas derives the text part), else the text.
    payload["body"] = message.html if message.html is not None else (message.text or "")
    payload["is_plaintext"] = message.html is None
    if message.reply_to_message_id is not None:
        payload["reply_to_message_id"] = message.reply_to_message_id
    if (tracking := message.tracking) is not None:
        options: dict[str, Any] = {"opens": tracking.opens, "links": tracking.links}
        options["thread_replies"] = tracking.thread_replies
        if tracking.label is not None:
            options["label"] = tracking.label
        payload["tracking_options"] = options
    if message.headers:
        payload["custom_headers"] = [{"name": name, "value": value} for name, value in message.headers]
    if message.metadata:
        payload["metadata"] = dict(message.metadata)
    return payload


def _participants(addresses: Sequence[Address]) -> list[dict[str, str]]:
    return [{"email": a.email, "name": a.name} if a.name else {"email": a.email} for a in addresses]


def _attachment_json(attachment: Attachment | _FileInfo, content: str) -> dict[str, Any]:
    item: dict[str, Any] = {"filename": attachment.filename, "content_type": attachment.content_type}
    item["content"] = content
    if attachment.content_id is not None:  # a content id makes Nylas place it inline (§2)
        item["content_id"] = attachment.content_id
        item["is_inline"] = True
    return item


def _split_attachments(payload: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[Attachment, ...]]:
    """A JSON object's base64 `attachments` as Attachments, and the object without them."""
    rest = dict(payload)
    items = rest.pop("attachments")
    try:
        files = tuple(
            Attachment(
                item["filename"],
                item["content_type"],
                base64.b64decode(item["content"], validate=True),
                item.get("content_id"),
            )
            for item in items
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            "payload attachments must each have filename, content_type and base64 content"
        ) from exc
    return rest, files


def _require_loaded(message: Message) -> None:
    if message.attachment_files:
        raise ValueError(
            f"row {message.row}: read the attachment files first (campaign.render.load_message_attachments)"
        )


def _base64(attachment: Attachment) -> bytes:
    return attachment.encoded if attachment.encoded is not None else base64.b64encode(attachment.content)


def _part_of(attachment: Attachment) -> _FileInfo:
    return _FileInfo(attachment.filename, attachment.content_type, attachment.content_id, attachment.size)


def _measure(head: bytes, parts: Sequence[_FileInfo]) -> RequestSize:
    """Exact sizes of the JSON and the multipart encodings, from the head and the parts' sizes."""
    heads = _multipart_heads("x" * _BOUNDARY_LENGTH, head, parts)
    multipart_bytes = sum(map(len, heads)) + sum(part.size + 2 for part in parts)  # + CRLF after each file
    if not parts:
        return RequestSize(len(head), multipart_bytes)
    items = [_dumps(_attachment_json(part, "")) for part in parts]
    base64_bytes = sum(4 * ((part.size + 2) // 3) for part in parts)
    # head without its closing brace + ,"attachments":[ + items and commas + ]}
    json_bytes = len(head) - 1 + len(b',"attachments":[') + sum(map(len, items)) + len(items) - 1 + 2
    return RequestSize(json_bytes + base64_bytes, multipart_bytes)


def _json_chunks(head: bytes, attachments: Sequence[Attachment]) -> list[bytes]:
    """`encode_send_body(build_send_payload(message))`, in pieces that share the base64 of each file."""
    chunks = [head[:-1] + b',"attachments":[']
    for index, item in enumerate(attachments):
        encoded = _dumps(_attachment_json(item, ""))
        cut = encoded.index(_CONTENT_KEY) + len(_CONTENT_KEY)  # keys are escaped, so the first is the key
        chunks.extend(((b"," if index else b"") + encoded[:cut], _base64(item), encoded[cut:]))
    chunks.append(b"]}")
    return chunks


def _multipart_heads(boundary: str, head: bytes, parts: Sequence[_FileInfo]) -> list[bytes]:
    """The bytes around the files: the `message` part, each file part's headers, and the closing line."""
    dash = f"--{boundary}\r\n".encode("ascii")
    heads = [
        dash
        + b'Content-Disposition: form-data; name="message"\r\nContent-Type: application/json\r\n\r\n'
        + head
        + b"\r\n"
    ]
    for index, part in enumerate(parts):
        name = part.content_id if part.content_id is not None else f"file{index}"
        disposition = f'form-data; name="{_form_quote(name)}"; filename="{_form_quote(part.filename)}"'
        heads.append(
            dash + f"Content-Disposition: {disposition}\r\nContent-Type: {part.content_type}\r\n\r\n".encode()
        )
    heads.append(f"--{boundary}--\r\n".encode("ascii"))
    return heads


def _form_quote(value: str) -> str:
    return _FORM_SPECIAL.sub(lambda match: _FORM_ESCAPES[match.group(0)], value)


def _choose_boundary(head: bytes, attachments: Sequence[Attachment]) -> str:
    """A boundary derived from the message (so a resend is byte-identical) that no part contains."""
    seed = hashlib.sha256(head)
    for attempt in range(100):
        seed.update(str(attempt).encode())
        boundary = _BOUNDARY_PREFIX + seed.hexdigest()[:32]
        marker = boundary.encode("ascii")
        if marker not in head and not any(marker in item.content for item in attachments):
            return boundary
    raise ValueError("no multipart boundary fits these attachments")  # 100 SHA-256 collisions: impossible


def _too_big(row: int | None, size: RequestSize) -> str:
    megabytes = size.multipart_bytes / 1_000_000
    where = "" if row is None else f"row {row}: "
    return (
        f"{where}the message and its attachments come to {megabytes:.1f} MB; Nylas sends at most "
        f"{MULTIPART_LIMIT_BYTES // 1_000_000} MB per message: send smaller or fewer files (or a link)"
    )


# orjson: compact, raw UTF-8, keys in insertion order; the same bytes as the stdlib's
# json.dumps(separators=(",", ":"), ensure_ascii=False) for our payloads, several times faster.
_dumps: Callable[[Any], bytes] = orjson.dumps


def encode_send_body(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of `payload` (orjson), keys in the payload's order."""
    return _dumps(payload if isinstance(payload, dict) else dict(payload))
