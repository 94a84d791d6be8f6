"""The JSON body of a Nylas send (reference/nylas-api.md §1.2), built from a rendered `Message`. Pure.

Equal messages give byte-equal bodies, which matters: a resumed run must resend
the same bytes under the same Idempotency-Key.
"""

from __future__ import annotations

import base64
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from campaign.models import Address, Attachment, Message

__all__ = ["build_send_payload", "encode_send_body"]


def build_send_payload(message: Message) -> dict[str, Any]:
    """The JSON object of §1.2 for `message`; equal messages give equal dicts with equal key order."""
    payload: dict[str, Any] = {"to": _participants(message.to)}
    if message.reply_to:
        payload["reply_to"] = _participants(message.reply_to)
    if message.from_ is not None:
        payload["from"] = _participants((message.from_,))
    payload["subject"] = message.subject
    # A JSON send has one body: the HTML when there is one (Nylas derives the text part), else the text.
    payload["body"] = message.html if message.html is not None else (message.text or "")
    payload["is_plaintext"] = message.html is None
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
    if message.attachments:
        payload["attachments"] = [_attachment_json(item) for item in message.attachments]
    return payload


def _participants(addresses: Sequence[Address]) -> list[dict[str, str]]:
    return [{"email": a.email, "name": a.name} if a.name else {"email": a.email} for a in addresses]


def _attachment_json(attachment: Attachment) -> dict[str, Any]:
    content = base64.b64encode(attachment.content).decode("ascii")
    item: dict[str, Any] = {"filename": attachment.filename, "content_type": attachment.content_type}
    item["content"] = content
    if attachment.content_id is not None:  # a content id makes Nylas place it inline (§2)
        item["content_id"] = attachment.content_id
        item["is_inline"] = True
    return item


def _dumps_stdlib(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _select_dumps() -> Callable[[Any], bytes]:
    # orjson is optional. Both give the same bytes for our payloads (compact, raw UTF-8), which matters:
    # a resumed run must resend the same bytes under the same Idempotency-Key.
    try:
        orjson = importlib.import_module("orjson")
    except ImportError:
        return _dumps_stdlib
    dumps: Callable[[Any], bytes] = orjson.dumps
    return dumps


_dumps = _select_dumps()


def encode_send_body(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of `payload` (orjson when installed, else json), keys in the payload's order."""
    return _dumps(payload if isinstance(payload, dict) else dict(payload))
