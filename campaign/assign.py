"""Sender assignment one recipient at a time, for passes that stream the list instead of holding it.

`SenderAssigner.assign` gives, row by row, the sender `plan.assign_senders` gives for the
same rows in the same order (pinned rows to their sender, rows the ledger assigned to
that sender, others to the sender that would finish soonest), without a list of every
job. tests/test_assign.py holds the two to the same answers; if `assign_senders` changes,
this must change with it (or `assign_senders` can become a loop over this). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from campaign.manifest import SenderSettings
from campaign.models import Recipient
from campaign.plan import estimate_duration_s

__all__ = ["SenderAssigner"]


class SenderAssigner:
    """Assign senders to recipients in list order, keeping only a message count per sender."""

    def __init__(
        self, senders: Sequence[SenderSettings], *, assigned: Mapping[str, str] | None = None
    ) -> None:
        known = {sender.name for sender in senders}
        self._previous = {key: name for key, name in (assigned or {}).items() if name in known}
        self._load = dict.fromkeys(known, 0)
        for name in self._previous.values():
            self._load[name] += 1
        self._senders = {sender.name: sender for sender in senders}
        self._order = [sender.name for sender in senders]

    def assign(self, recipient: Recipient) -> str:
        """The sender for `recipient`, the next row of the list."""
        pinned = recipient.sender or self._previous.get(recipient.key)
        # Ties go to the first listed sender, so the assignment is deterministic.
        name = pinned if pinned is not None else min(self._order, key=self._finish_with_one_more)
        if recipient.key not in self._previous:
            self._load[name] += 1
        return name

    def _finish_with_one_more(self, name: str) -> float:
        sender = self._senders[name]
        return estimate_duration_s(self._load[name] + 1, rate_per_s=sender.rate_per_s, per_day=sender.per_day)
