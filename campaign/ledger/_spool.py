"""A checked plan on its way to the ledger, held on disk instead of in memory.

The check writes the plan here a batch at a time (`PlanSpool.add`); once the run is confirmed,
`Ledger.record_plan(spool.planned(), spool.skips())` reads it back a batch at a time, in one
ledger transaction. So a million-row plan is never a million Python objects, and nothing of it
reaches the ledger before the whole list is checked and the user said yes: a bad row, a refusal or
a crash during the check leaves the ledger as it was.

Each batch is one pickle in an anonymous temporary file (`tempfile.TemporaryFile`: unlinked as it is
made, so it is gone when the spool closes or the process dies, even by kill -9). The spool only
appends and then reads in order, so a file is all it needs; SQLite tables here cost four times as
much CPU to fill and twice as much to read back, in the check's busiest process. Only this process
ever writes or reads these files.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import IO, Any, Protocol

from campaign.ledger._read import PlannedRow
from campaign.models import Skip, SkipReason

__all__ = ["PlanSink", "PlanSpool"]


class PlanSink(Protocol):
    """Where a check writes its plan, a batch at a time: a `PlanSpool`, or a new ledger's `FirstPlan`."""

    def add(self, planned: Sequence[PlannedRow], skips: Sequence[Skip]) -> None:
        """Take a batch of the check's rows: those to mail, and those skipped."""
        ...


class PlanSpool:
    """The plan of one check: the rows to mail and the rows skipped, in list order."""

    def __init__(self) -> None:
        self._planned = _anonymous_file()
        self._skips = _anonymous_file()

    def __enter__(self) -> PlanSpool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop the plan (the files were never named: closing them frees their space)."""
        self._planned.close()
        self._skips.close()

    def add(self, planned: Sequence[PlannedRow], skips: Sequence[Skip]) -> None:
        """Append a batch of the check's rows: those to mail, and those skipped."""
        if planned:
            rows = [(p.key, p.row, p.email, p.sender, _moment(p.due_at), p.cells) for p in planned]
            pickle.dump(rows, self._planned, protocol=pickle.HIGHEST_PROTOCOL)
        if skips:
            skipped = [(s.key, s.row, s.email, s.reason.value, s.detail, s.cells) for s in skips]
            pickle.dump(skipped, self._skips, protocol=pickle.HIGHEST_PROTOCOL)

    def planned(self) -> Iterator[PlannedRow]:
        """The rows to mail, in the order added."""
        for batch in _batches(self._planned):
            for key, row, email, sender, due_at, cells in batch:
                due = None if due_at is None else datetime.fromisoformat(due_at)
                yield PlannedRow(key, row, email, sender, due_at=due, cells=cells)

    def skips(self) -> Iterator[Skip]:
        """The rows skipped, in the order added."""
        for batch in _batches(self._skips):
            for key, row, email, reason, detail, cells in batch:
                yield Skip(row, key, email, SkipReason(reason), detail, cells)


def _anonymous_file() -> IO[bytes]:
    # Open for the spool's life, not a block's: `close` closes it.
    return tempfile.TemporaryFile(prefix="campaign-plan-")


def _batches(file: IO[bytes]) -> Iterator[list[Any]]:
    """The batches written to `file`, from its start, one at a time."""
    file.flush()
    file.seek(0)
    while True:
        try:
            batch: list[Any] = pickle.load(file)
        except EOFError:
            return
        yield batch


def _moment(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
