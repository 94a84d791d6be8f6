"""What an unsubscribe store holds and says, whichever database keeps it: entries, bounces, replies,
engagement, the soft-bounce rule, and its error. Plain values; no SQL here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from campaign.errors import LedgerError

__all__ = [
    "BLOCK_KIND",
    "BOUNCE_SOURCE",
    "DEFAULT_SOFT_BOUNCE_DAYS",
    "DEFAULT_SOFT_BOUNCE_LIMIT",
    "INBOX_EVENT_PREFIX",
    "BounceRecord",
    "BounceRules",
    "Engagement",
    "InboxCursor",
    "StoreEntry",
    "StoreError",
    "ThreadReply",
    "notification_time",
]

BOUNCE_SOURCE = "bounce"  # the source of a suppression a bounce made (skip reason `bounced`)
# The kind of a bounce where the receiving server refused the sender (its reputation, content or
# authentication), not the address: kept, but it never suppresses the address, at once or by the count.
BLOCK_KIND = "block"
# Soft bounces (4xx) suppress an address once this many arrive within this many days (listmonk's
# and Mautic's rule of thumb); a hard bounce (5xx) suppresses at once.
# The id of an event `campaign events pull` kept starts with this (`inbox:<grant>:<message>`); a webhook's
# is Nylas's envelope id.
INBOX_EVENT_PREFIX = "inbox:"
DEFAULT_SOFT_BOUNCE_LIMIT = 3
DEFAULT_SOFT_BOUNCE_DAYS = 30
# A notification's `time` is Unix seconds; one written in milliseconds (JavaScript's Date.now) is a
# thousand times larger. Seconds reach this only in the year 5138, milliseconds pass it in 1973: a
# value this large is milliseconds.
_MILLISECONDS_FROM = 10**11


@dataclass(frozen=True, slots=True)
class BounceRecord:
    """One bounced address of a notification, classified (`hard`: permanent)."""

    email: str
    hard: bool
    bounced_at: str  # ISO UTC
    code: str | None = None
    kind: str | None = None  # the provider's type, e.g. mailbox_unavailable
    reason: str | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class InboxCursor:
    """How far `campaign events pull` has read one grant's inbox into this store: every message received
    from `start` to `through`; and, when a pull stopped at its page limit, from `gap_before` to
    `gap_through` as well, the part before `gap_before` still to read. Aware datetimes."""

    start: datetime
    through: datetime
    gap_before: datetime | None = None
    gap_through: datetime | None = None


@dataclass(frozen=True, slots=True)
class ThreadReply:
    """A `thread.replied` notification kept in a store: someone other than the sender answered."""

    label: str  # the tracked message's `tracking_options.label` (campaign:recipient key:step)
    root_message_id: str  # the tracked message
    message_id: str  # the reply
    at: str  # when it was received (ISO)


@dataclass(frozen=True, slots=True)
class Engagement:
    """What the tracking notifications say of one sent message: opens, clicks, replies (ISO UTC times)."""

    opens: int = 0
    first_open: str | None = None
    last_open: str | None = None
    clicks: int = 0
    urls: tuple[str, ...] = ()
    replies: int = 0
    first_reply: str | None = None


@dataclass(frozen=True, slots=True)
class BounceRules:
    """When soft bounces suppress an address: `limit` of them within `days`."""

    limit: int = DEFAULT_SOFT_BOUNCE_LIMIT
    days: int = DEFAULT_SOFT_BOUNCE_DAYS


class StoreError(LedgerError):
    """The unsubscribe store cannot be opened, read or written (exit 74, like the ledger)."""


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """One unsubscribe: from which campaign, who (key and address), when (ISO UTC) and how."""

    campaign: str
    recipient_key: str
    email: str | None
    recorded_at: str
    source: str


def notification_time(value: object) -> datetime | None:
    """When a notification's envelope says it happened (its `time`: Unix seconds, or milliseconds when
    that large), in UTC; None when it is not a whole number or names no time a datetime can hold (it
    is unknown then, never an error: the notification is still worth keeping)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(value / 1000 if abs(value) >= _MILLISECONDS_FROM else value, UTC)
    except (OverflowError, OSError, ValueError):
        return None
