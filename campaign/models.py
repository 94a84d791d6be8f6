"""Frozen values passed between the layers: addresses, recipients, messages, outcomes.

No behaviour beyond small derived properties; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

__all__ = [
    "FIRST_STEP",
    "Address",
    "Attachment",
    "AttachmentFile",
    "Message",
    "OutcomeKind",
    "PreviousStep",
    "Problem",
    "Recipient",
    "Relink",
    "RowState",
    "Screening",
    "SendOutcome",
    "Skip",
    "SkipReason",
    "ThrottleKind",
    "Tracking",
    "step_key",
]

# Step 1 ([message]) as the ledger, status and reports name it; follow-ups go by their own names.
FIRST_STEP = "message"


def step_key(recipient_key: str, step: str) -> str:
    """The ledger's key of one (recipient, step): the recipient's key for step 1, so that a campaign
    without follow-ups keeps the keys it always had; the key and the step's name after it otherwise."""
    return recipient_key if step == FIRST_STEP else f"{recipient_key}\x1f{step}"


class Address(NamedTuple):
    """An email address with an optional display name.

    A named tuple, as `Recipient` and `plan.Job` are: the check makes one of each for every row of the
    list, in the main process and again in its workers, and a frozen dataclass costs several times as
    much to make (ARCHITECTURE.md, "Values").
    """

    email: str
    name: str | None = None


class Recipient(NamedTuple):
    """One row of the recipient list that is to be mailed (a named tuple: see `Address`).

    `key` is the identity used by the ledger (the normalised, lower-cased address
    unless the manifest names a key column); `row` counts data rows from 1.
    `fields` holds every column of the row, keyed by column name.
    """

    key: str
    row: int
    address: Address
    fields: Mapping[str, object]
    sender: str | None = None


@dataclass(frozen=True, slots=True)
class PreviousStep:
    """The step before a follow-up, as it was sent to one recipient: the follow-up answers it."""

    step: str
    subject: str
    message_id: str
    thread_id: str | None
    sent_at: datetime
    internet_message_id: str | None = None  # its Message-ID header, when the send's answer gave it


@dataclass(frozen=True, slots=True)
class Screening:
    """What the check right before a follow-up's claim found (the reply lookups)."""

    stop: SkipReason | None = None  # the sequence stops here for this recipient
    detail: str = ""  # for the ledger: which message, when
    hold: bool = False  # the check could not be made: not sent now, due again later
    auto_reply: str | None = None  # an auto-reply seen, which does not stop the sequence


@dataclass(frozen=True, slots=True)
class Relink:
    """What the lookup made after a follow-up's send was answered 404 found of the message it answers.

    A Microsoft mailbox gives a message a new id when its owner files it, and the id the follow-up named
    stops resolving. None of the three set: the lookup was answered 404 as well (the grant itself is
    gone), and the send's 404 stands."""

    message_id: str | None = None  # the message under its id now: the follow-up answers that, once
    lost: str | None = None  # the lookup worked but the message is not there: the sequence stops (why)
    hold: bool = False  # the lookup failed: not sent now, looked up again later


class SkipReason(StrEnum):
    """Why a row of the list is deliberately not mailed."""

    INVALID = "invalid"
    DUPLICATE = "duplicate"
    SUPPRESSED = "suppressed"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"  # a hard bounce (or repeated soft ones) recorded in an unsubscribe store
    REPLIED = "replied"  # a follow-up not sent: the recipient answered an earlier step
    AUTO_REPLIED = "auto-replied"  # a follow-up not sent: an auto-reply, with `auto_replies = "stop"`
    NOT_LISTED = "not listed"  # a follow-up not sent: the recipient left the list
    # A follow-up not sent: the message it answers is gone from its thread (deleted; a send is never
    # made unthreaded), found by the lookup after the send naming it was answered 404.
    THREAD_LOST = "thread_lost"


@dataclass(frozen=True, slots=True)
class Skip:
    """A row that will not be mailed, and why (`detail` is for the user, e.g. "duplicate of row 3").

    `cells` (`recipients.encode_cells`) for a row skipped as invalid: the ledger keeps them, so a
    later run knows the row it skipped when it meets it again unchanged (`pipeline.find_skipped_invalid`);
    and, in a campaign with follow-ups, for an opt-out, so that a row mailed before keeps cells to
    rebuild its recipient from (a ledger from before cells were kept has none).
    """

    row: int
    key: str
    email: str
    reason: SkipReason
    detail: str
    cells: str | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """A row-level failure found in preflight: where it is and what to do.

    `row` is None for problems that concern the whole list (a header, a column);
    `where` names the column, template variable or header.
    """

    row: int | None
    where: str
    message: str

    def describe(self, source: str) -> str:
        """One line for the user, e.g. `recipients.csv row 4, column "email": ...`."""
        place = source if self.row is None else f"{source} row {self.row}"
        return f"{place}, {self.where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Tracking:
    """Nylas `tracking_options`."""

    opens: bool = False
    links: bool = False
    thread_replies: bool = False
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file sent with a message; `content` is the raw bytes.

    `encoded` is the base64 of `content` when it was computed once for many messages
    (a shared file); a content id makes the attachment inline.
    """

    filename: str
    content_type: str
    content: bytes = field(repr=False)
    content_id: str | None = None
    encoded: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Size of the raw content in bytes."""
        return len(self.content)


@dataclass(frozen=True, slots=True)
class AttachmentFile:
    """An attachment as rendered for one message, before its file is read (campaign.render._attachments).

    `path` is relative to the campaign's attachments folder, '/'-separated; `key` names the
    manifest entry (e.g. "message.attachments[2]"); `shared` is true when every message
    gets the same file (its path is no template), so it is read once per run.
    """

    path: str
    filename: str
    content_type: str
    content_id: str | None = None
    key: str = "message.attachments"
    shared: bool = False


class Message(NamedTuple):
    """A fully rendered message for one recipient, ready for the wire (changed with `_replace`).

    `headers` are the custom headers in order (List-Unsubscribe among them);
    `metadata` are Nylas metadata pairs identifying campaign and recipient. A named tuple, as `Address`
    is: the check renders one for every row (a frozen dataclass of these sixteen fields costs 2.3 µs
    to make, a named tuple 0.7 µs).
    """

    recipient_key: str
    row: int
    sender: str
    to: tuple[Address, ...]
    subject: str
    html: str | None = None
    text: str | None = None
    from_: Address | None = None
    reply_to: tuple[Address, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    tracking: Tracking | None = None
    attachments: tuple[Attachment, ...] = ()
    # Rendered but not yet read; campaign.render.load_message_attachments turns them into `attachments`.
    attachment_files: tuple[AttachmentFile, ...] = ()
    # This recipient's one-click link (also in List-Unsubscribe, unless the sender's provider drops it).
    unsubscribe_url: str | None = None
    # A follow-up answers the previous step's message (Nylas sets In-Reply-To and References from it).
    reply_to_message_id: str | None = None

    @property
    def recipient_count(self) -> int:
        """Recipients this message counts against a mailbox's daily budget."""
        return len(self.to)


class RowState(StrEnum):
    """States of a recipient in the ledger (ARCHITECTURE.md, "Bird's-eye view")."""

    PENDING = "pending"
    INFLIGHT = "inflight"
    SENT = "sent"
    FAILED = "failed"
    UNKNOWN = "unknown"
    SKIPPED = "skipped"


class OutcomeKind(StrEnum):
    """What one send attempt came to, as far as we can know."""

    SENT = "sent"  # 2xx: the provider accepted it
    REJECTED = "rejected"  # a permanent 4xx: sending again will not help
    THROTTLED = "throttled"  # 429: definitely not sent; try later with a new key
    AUTH_REFUSED = "auth_refused"  # 401/403/404: the credentials refused, or no such grant
    IN_PROGRESS = "in_progress"  # 409 concurrent: the same key is still being processed
    AMBIGUOUS = "ambiguous"  # timeout, reset, 5xx: it may or may not have been sent
    UNREACHABLE = "unreachable"  # no connection to the API (refused, timed out, no name): it never left


class ThrottleKind(StrEnum):
    """Which limit a 429 came from."""

    NYLAS = "nylas"  # Nylas's own per-grant request rate
    PROVIDER = "provider"  # the mailbox provider's short-term throttle
    QUOTA = "quota"  # the mailbox's daily sending quota


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """The translated result of one send request.

    `retry_at` is when a throttled send may be tried again, if the API said so.
    `replayed` is true when Nylas answered from its idempotency cache.
    Error text never contains the API key.
    """

    kind: OutcomeKind
    status: int | None = None
    message_id: str | None = None
    thread_id: str | None = None  # the thread the sent message is in (Nylas's data.thread_id)
    # Its RFC 5322 Message-ID header (data.headers, asked for with fields=include_basic_headers): what an
    # IMAP grant's follow-up names in reply_to_message_id (nylas-api.md §1.2).
    internet_message_id: str | None = None
    request_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    retry_at: datetime | None = None
    throttle: ThrottleKind | None = None
    replayed: bool = False
