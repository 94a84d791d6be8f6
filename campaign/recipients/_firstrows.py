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
_LOOKUP_KEYS = 500  # keys looked up in one statement (well under SQLite's limit of bound values)


class FirstRows:
    """The row on which each key first appeared: exact, and kept on disk, not in Python objects."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")
        self._db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, row INTEGER NOT NULL) WITHOUT ROWID")

    def resolve(self, keys: Sequence[str], rows: Sequence[int]) -> list[int]:
        """For each (key, row), in order: the first row that had the key (the row itself when new)."""
        firsts: dict[str, int] = {}
        for key, row in zip(keys, rows, strict=True):
            firsts.setdefault(key, row)  # of two rows of this batch with one key, the first is kept
        with self._db:
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", firsts.items())
            if self._db.total_changes - before < len(firsts):  # some keys came in an earlier batch
                wanted = list(firsts)
                for start in range(0, len(wanted), _LOOKUP_KEYS):
                    part = wanted[start : start + _LOOKUP_KEYS]
                    query = f"SELECT key, row FROM seen WHERE key IN ({', '.join('?' * len(part))})"
                    firsts.update(self._db.execute(query, part))
        return [firsts[key] for key in keys]

    def close(self) -> None:
        """Forget the keys (the temporary file goes with the connection)."""
        self._db.close()
