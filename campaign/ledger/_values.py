"""Values the ledger gives back: what a plan changed, and a row's claim."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from campaign.models import RowState, SendOutcome

__all__ = [
    "Claim",
    "ClaimRequest",
    "DueStep",
    "OutcomeReport",
    "ScheduledStep",
    "SentStep",
    "StepCounts",
    "SyncReport",
]


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What reconciling the recipient list with the ledger changed."""

    added: int
    skipped_added: int
    existing: int
    missing: int  # keys in the ledger that are no longer in the list (left alone)
    newly_skipped: int = 0  # pending rows now suppressed or invalid
    restored: int = 0  # rows skipped as invalid that now validate
    undoubled: int = 0  # rows skipped as a duplicate that the list now mails: no longer one
    missing_states: Mapping[RowState, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Claim:
    """The idempotency key a claimed row must be sent with, and until when it may be (re)used."""

    idempotency_key: str
    attempt_no: int
    usable_until: datetime  # past this, a same-key retry could send twice: give up (unknown)
    fresh: bool = True  # the key was issued by this claim (so no request has used it yet)
    sender: str | None = None  # the sender the row belongs to; a used key is only valid on its grant


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One claim of `Ledger.claim_many` (the arguments of `Ledger.claim`)."""

    key: str
    subject: str | None = None
    sender: str | None = None
    via: str | None = None


@dataclass(frozen=True, slots=True)
class OutcomeReport:
    """One outcome of `Ledger.record_outcomes` (the arguments of `Ledger.record_outcome`)."""

    key: str
    outcome: SendOutcome
    sender: str
    recipients: int = 1


@dataclass(frozen=True, slots=True)
class SentStep:
    """A step sent to a recipient whose next step is not scheduled yet."""

    key: str  # the ledger key of the sent row
    recipient: str  # the recipient's key
    row: int
    email: str
    sender: str
    sent_at: datetime
    cursor: int = 0  # where the next batch of `Ledger.unscheduled_steps` starts


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A row sent to `email`: when, and the message id the API gave it."""

    key: str
    email: str
    sent_at: datetime
    message_id: str | None


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    """A follow-up to record: for `recipient`, step `step`, answering the row `previous`, due at `due_at`."""

    recipient: str
    step: str
    row: int
    email: str
    sender: str
    previous: str
    due_at: datetime


@dataclass(frozen=True, slots=True)
class DueStep:
    """A follow-up row that may be sent now, with what it answers: the previous step as sent."""

    key: str
    recipient: str
    step: str
    row: int
    email: str
    sender: str
    inflight: bool
    listed: bool  # the recipient is still in the list (else the step is not sent)
    previous_step: str
    previous_subject: str
    # The message it answers: the step before's, or the id that message was found under after a 404
    # (`Ledger.record_reply_refused`). None: the step before was settled without one (nothing to answer).
    previous_message_id: str | None
    previous_thread_id: str | None
    previous_sent_at: datetime
    first_sent_at: datetime  # when step 1 went out: a reply from the recipient after it stops them
    cursor: int = 0  # its place in the ledger (`Ledger.due_steps_of`'s `after` for the next page)
    previous_internet_message_id: str | None = None  # the previous message's Message-ID header, if known


@dataclass(frozen=True, slots=True)
class StepCounts:
    """Where one step stands: rows per state, how many are due now or later, and the next due time."""

    step: str
    states: Mapping[RowState, int]
    due_now: int
    scheduled: int
    next_due: datetime | None
    stopped: Mapping[str, int]  # skip cause -> rows (replied, unsubscribed, bounced, …)
    auto_replied: int  # auto-replies seen before this step, which did not stop it
