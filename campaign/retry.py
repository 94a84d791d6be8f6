"""Retrying rows: failed (after their cause was fixed) or unknown rows back to pending, each with a new
idempotency key, for `resume` to send. The use case `campaign retry` calls; it sends nothing.

Unknown rows moved this way are not checked first (`campaign reconcile` checks them): one may
have gone out already, and would then be mailed twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from campaign.clock import Clock
from campaign.ledger import LedgerSite
from campaign.manifest import Manifest
from campaign.models import RowState

__all__ = ["retry_rows"]


def retry_rows(manifest: Manifest, site: LedgerSite, *, states: Sequence[RowState], clock: Clock) -> int:
    """Move every row in `states` (failed and/or unknown) back to pending with a new key, in one
    transaction, holding the ledger alone; returns how many moved.

    Each row's note names the command (`campaign retry --failed`), so the report says why it went back.
    """
    ledger = site.open(clock=clock, campaign=manifest.campaign.name, exclusive=True)
    try:
        flags = " ".join(f"--{state.value}" for state in states)
        return ledger.record_retry_all(states, note=f"campaign retry {flags}")
    finally:
        ledger.close()
