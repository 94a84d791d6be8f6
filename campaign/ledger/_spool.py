"""A checked plan on its way to the ledger, held on disk instead of in memory.

The check writes the plan here a batch at a time (`PlanSpool.add`); once the run is confirmed,
`Ledger.record_plan(spool.planned(), spool.skips())` reads it back a batch at a time, in one
ledger transaction. So a million-row plan is never a million Python objects, and nothing of it
reaches the ledger before the whole list is checked and the user said yes: a bad row, a refusal or
a crash during the check leaves the ledger as it was.

It is SQLite's private temporary database (an empty file name): it lives in memory up to its
cache and spills to a file SQLite has already unlinked, so it is gone when the connection closes
or the process dies, even by kill -9.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from campaign.ledger._read import PlannedRow
from campaign.models import Skip, SkipReason

__all__ = ["PlanSpool"]

_CACHE_KIB = 8 * 1024  # the pages kept in memory; the rest spill to the unlinked file
_READ_ROWS = 5_000


class PlanSpool:
    """The plan of one check: the rows to mail and the rows skipped, in list order."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")
        self._db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute(
            "CREATE TABLE planned (key TEXT NOT NULL, row INTEGER NOT NULL, email TEXT NOT NULL, "
            "sender TEXT NOT NULL, due_at TEXT, cells TEXT)"
        )
        self._db.execute(
            "CREATE TABLE skips (key TEXT NOT NULL, row INTEGER NOT NULL, email TEXT NOT NULL, "
            "reason TEXT NOT NULL, detail TEXT NOT NULL)"
        )

    def __enter__(self) -> PlanSpool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop the plan (the temporary file goes with the connection)."""
        self._db.close()

    def add(self, planned: Sequence[PlannedRow], skips: Sequence[Skip]) -> None:
        """Append a batch of the check's rows: those to mail, and those skipped."""
        with self._db:  # one transaction a batch
            self._db.executemany(
                "INSERT INTO planned VALUES (?, ?, ?, ?, ?, ?)",
                [(p.key, p.row, p.email, p.sender, _moment(p.due_at), p.cells) for p in planned],
            )
            self._db.executemany(
                "INSERT INTO skips VALUES (?, ?, ?, ?, ?)",
                [(s.key, s.row, s.email, s.reason.value, s.detail) for s in skips],
            )

    def planned(self) -> Iterator[PlannedRow]:
        """The rows to mail, in the order added."""
        for key, row, email, sender, due_at, cells in self._read(
            "planned", "key, row, email, sender, due_at, cells"
        ):
            due = None if due_at is None else datetime.fromisoformat(due_at)
            yield PlannedRow(key, row, email, sender, due_at=due, cells=cells)

    def skips(self) -> Iterator[Skip]:
        """The rows skipped, in the order added."""
        for key, row, email, reason, detail in self._read("skips", "key, row, email, reason, detail"):
            yield Skip(row, key, email, SkipReason(reason), detail)

    def _read(self, table: str, columns: str) -> Iterator[Any]:
        """A table's rows in rowid order, a page at a time (no cursor is held open between pages)."""
        query = f"SELECT rowid, {columns} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"
        after = 0
        while page := self._db.execute(query, (after, _READ_ROWS)).fetchall():
            after = page[-1][0]
            for found in page:
                yield found[1:]


def _moment(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
