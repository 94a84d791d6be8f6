"""Values the ledger gives back: what a plan changed, and a row's claim."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from campaign.models import RowState

__all__ = ["Claim", "SyncReport"]


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What reconciling the recipient list with the ledger changed."""

    added: int
    skipped_added: int
    existing: int
    missing: int  # keys in the ledger that are no longer in the list (left alone)
    newly_skipped: int = 0  # pending rows now suppressed or invalid
    restored: int = 0  # rows skipped as invalid that now validate
    missing_states: Mapping[RowState, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Claim:
    """The idempotency key a claimed row must be sent with, and until when it may be (re)used."""

    idempotency_key: str
    attempt_no: int
    usable_until: datetime  # past this, a same-key retry could send twice: give up (unknown)
    fresh: bool = True  # the key was issued by this claim (so no request has used it yet)
    sender: str | None = None  # the sender the row belongs to; a used key is only valid on its grant
