"""Duplicate detection for long lists: the row on which each key first appeared.

Exact (it compares whole keys, never hashes) and compact: the keys seen so far live in
a polars frame rather than a dict of Python strings, so a million-row list costs tens of
megabytes, not hundreds. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

__all__ = ["FirstRows"]

_RECHUNK_AFTER = 64


class FirstRows:
    """The row on which each key first appeared: exact, and kept in a polars frame, not Python objects."""

    def __init__(self) -> None:
        self._seen = pl.DataFrame(schema={"key": pl.String, "row": pl.Int64})

    def resolve(self, keys: Sequence[str], rows: Sequence[int]) -> list[int]:
        """For each (key, row), in order: the first row that had the key (the row itself when new)."""
        first: dict[str, int] = {}
        if keys and self._seen.height:
            earlier = self._seen.filter(pl.col("key").is_in(pl.Series(keys, dtype=pl.String)))
            first = dict(zip(earlier["key"].to_list(), earlier["row"].to_list(), strict=True))
        found: list[int] = []
        new_keys: list[str] = []
        new_rows: list[int] = []
        for key, row in zip(keys, rows, strict=True):
            if key not in first:
                first[key] = row
                new_keys.append(key)
                new_rows.append(row)
            found.append(first[key])
        if new_keys:
            fresh = pl.DataFrame({"key": new_keys, "row": new_rows}, schema=self._seen.schema)
            self._seen = pl.concat([self._seen, fresh], rechunk=self._seen.n_chunks() >= _RECHUNK_AFTER)
        return found
