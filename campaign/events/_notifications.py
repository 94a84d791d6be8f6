"""Nylas notifications read defensively: the envelope, and what a bounce report says.

The envelope is CloudEvents-style JSON: `id` (dedupe on it), `type`, `time`, and `data` holding
`grant_id` and `object` (reference/next-capabilities.md §2.1–2.2). A bounce's object names its
addresses in `bounced_addresses` (a string, or a list in some examples), a `code` string such as
"550" or "5.1.1", a `type` such as `mailbox_unavailable`, a `bounce_date` (RFC 2822) and its origin
message. Unknown fields are ignored and nulls tolerated. Pure: reads bytes, returns values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from campaign.errors import DataError
from campaign.recipients import matching_form
from campaign.unsubscribe import BLOCK_KIND, BounceRecord

__all__ = ["BOUNCE", "Notification", "parse_bounces", "parse_notification"]

BOUNCE = "message.bounce_detected"
# Permanent failures by the provider's kind, whatever the code says (a missing or odd code).
_HARD_KINDS = frozenset(
    {"mailbox_unavailable", "mailbox_not_found", "user_unknown", "no_such_user", "invalid"}
)
_SOFT_KINDS = frozenset({"mailbox_full", "quota_exceeded", "temporary", "transient", "greylisted"})
_CODE = re.compile(r"\b([245])(?:\.\d{1,3}\.\d{1,3}|\d\d)\b")
# A reason with no code that still says the address is gone (listmonk's words, next-capabilities.md §3.1);
# any other bounce without a code or a type is soft: "delayed", "mailbox full", "will be retried".
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


@dataclass(frozen=True, slots=True)
class Notification:
    """One delivered notification: its envelope id and type, the grant, and the object it is about."""

    id: str
    type: str
    grant_id: str | None
    object: Mapping[str, Any]
    time: int | None = None


def parse_notification(body: bytes) -> Notification:
    """The notification in a webhook body; DataError when it is not JSON or has no `id` and `type`."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"the notification is not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise DataError("the notification is not a JSON object")
    event_id, kind = document.get("id"), document.get("type")
    if not isinstance(event_id, str) or not event_id or not isinstance(kind, str) or not kind:
        raise DataError("the notification has no `id` or `type`")
    data = _object(document.get("data"))
    grant = data.get("grant_id")
    time = document.get("time")
    return Notification(
        id=event_id,
        type=kind,
        grant_id=grant if isinstance(grant, str) else None,
        object=_object(data.get("object")),
        time=time if isinstance(time, int) and not isinstance(time, bool) else None,
    )


def parse_bounces(notification: Notification, *, received_at: datetime) -> tuple[BounceRecord, ...]:
    """The addresses a `message.bounce_detected` reports, each classified hard (permanent) or soft."""
    if notification.type != BOUNCE:
        return ()
    found = notification.object
    code = _text(found.get("code"))
    reason = _text(found.get("bounce_reason"))
    hard, kind = _classify(code, _text(found.get("type")), reason)
    when = _bounce_date(found.get("bounce_date"), notification.time) or received_at
    origin = _object(found.get("origin"))
    message_id = _text(found.get("message_id")) or _text(origin.get("id"))
    return tuple(
        BounceRecord(
            email, hard, when.astimezone(UTC).isoformat(timespec="seconds"), code, kind, reason, message_id
        )
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
    texts = [item for item in items if isinstance(item, str)]
    found = [matching_form(address) for _, address in getaddresses(texts) if "@" in address]
    return list(dict.fromkeys(found))


def _bounce_date(value: object, time: int | None) -> datetime | None:
    if isinstance(value, str) and value.strip():
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    if time is not None:
        return datetime.fromtimestamp(time, tz=UTC)
    return None


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip()
    return text or None
