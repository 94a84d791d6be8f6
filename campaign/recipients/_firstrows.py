"""Duplicate detection for long lists: the row on which each key first appeared.

Exact (it compares whole keys, never hashes) and flat in memory: the keys seen so far live in
SQLite's private temporary database (an empty file name), which keeps a few megabytes of pages in
memory and spills the rest to a file it has already unlinked. So a list of ten million rows costs
no more memory than one of ten thousand, and nothing is left behind, even after kill -9.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

__all__ = ["FirstRows"]

_CACHE_KIB = 8 * 1024


class FirstRows:
    """The row on which each key first appeared: exact, and kept on disk, not in Python objects."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")
        self._db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, row INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("CREATE TABLE batch (key TEXT NOT NULL, row INTEGER NOT NULL)")

    def resolve(self, keys: Sequence[str], rows: Sequence[int]) -> list[int]:
        """For each (key, row), in order: the first row that had the key (the row itself when new)."""
        if not keys:
            return []
        with self._db:
            before = self._db.total_changes
            # In order, so that of two rows of this batch with one key, the first is kept.
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", zip(keys, rows, strict=True))
            if self._db.total_changes - before == len(keys):
                return list(rows)  # every key new (most batches): each row is its own first
            self._db.execute("DELETE FROM batch")
            self._db.executemany("INSERT INTO batch VALUES (?, ?)", zip(keys, rows, strict=True))
            found = self._db.execute(
                "SELECT seen.row FROM batch CROSS JOIN seen ON seen.key = batch.key ORDER BY batch.rowid"
            ).fetchall()
        return [row for (row,) in found]

    def close(self) -> None:
        """Forget the keys (the temporary file goes with the connection)."""
        self._db.close()
