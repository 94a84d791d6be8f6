"""Moving unsubscribe-store entries in and out of files: CSV, Parquet, plain text, or another store.

Reading reuses the suppression-list rules of `recipients` (a column named `email`, else
the first; text files one address a line, `#` comments), so any list `recipients.suppress`
accepts can be imported. This module reads and writes files only; the store records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from campaign.clock import Clock
from campaign.errors import InputFileError, UsageError
from campaign.outputfiles import (
    SymlinkRefusedError,
    write_private_csv,
    write_private_parquet,
    write_private_text,
)
from campaign.recipients._audience import comparable_address, load_suppression
from campaign.unsubscribe import StoreEntry, is_store_path, open_store

__all__ = [
    "EXPORT_COLUMNS",
    "ImportedAddresses",
    "load_import_addresses",
    "write_entries",
]

EXPORT_COLUMNS = ("email", "recipient_key", "campaign", "recorded_at", "source")
# The first 16 bytes of every SQLite database file (an unsubscribe store, a ledger).
SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True, slots=True)
class ImportedAddresses:
    """Addresses read for import (normalised, lower-cased, sorted), and the values of a store that were not
    addresses (recipient keys). A list file's entries are all addresses, or `load_suppression` refused it."""

    addresses: tuple[str, ...]
    invalid: tuple[str, ...]


def load_import_addresses(path: Path | str, *, clock: Clock) -> ImportedAddresses:
    """Read the addresses of a suppression list (.csv/.parquet/text) or of another unsubscribe store
    (a file, or a `postgresql://` URL)."""
    if is_store_path(path):
        store = open_store(path, clock=clock, create=False)
        try:
            values = {entry.email or entry.recipient_key for entry in store.entries()}
        finally:
            store.close()
    else:
        values = set(load_suppression([path]))
    addresses = {value: comparable_address(value) for value in values}
    return ImportedAddresses(
        addresses=tuple(sorted({found for found in addresses.values() if found is not None})),
        invalid=tuple(sorted(value for value, found in addresses.items() if found is None)),
    )


def write_entries(entries: Sequence[StoreEntry], path: Path, *, store: Path | str | None = None) -> None:
    """Write entries to `path`: .csv/.parquet with EXPORT_COLUMNS, else one address (or key) a line.

    UsageError, and nothing written, if `path` is the store they come from (`store`, however it is
    spelled or linked to) or any other SQLite database: an export would destroy it.
    """
    if isinstance(store, Path) and _same_file(path, store):
        raise UsageError(
            f"{path}: that is the unsubscribe store itself (--store {store}), which the export would "
            "destroy; export to another file, e.g. unsubscribes.csv"
        )
    if _is_sqlite_file(path):
        raise UsageError(
            f"{path}: that is an SQLite database (an unsubscribe store or a ledger), which the export "
            "would destroy; export to another file, e.g. unsubscribes.csv"
        )
    suffix = path.suffix.lower()
    try:
        if suffix in {".csv", ".parquet"}:
            frame = pl.DataFrame(
                {
                    "email": [entry.email for entry in entries],
                    "recipient_key": [entry.recipient_key for entry in entries],
                    "campaign": [entry.campaign for entry in entries],
                    "recorded_at": [entry.recorded_at for entry in entries],
                    "source": [entry.source for entry in entries],
                },
                schema=dict.fromkeys(EXPORT_COLUMNS, pl.String),
            )
            if suffix == ".parquet":
                write_private_parquet(frame, path)
            else:
                write_private_csv(frame, path)
        else:
            lines = sorted({entry.email or entry.recipient_key for entry in entries})
            write_private_text(path, "".join(f"{line}\n" for line in lines))
    except SymlinkRefusedError as exc:
        raise InputFileError(str(exc)) from exc
    except OSError as exc:
        message = f"{path}: cannot write the export ({exc.strerror or exc}); check the folder exists"
        raise InputFileError(message) from exc


def _same_file(path: Path, other: Path) -> bool:
    """Whether `path` names the file `other` names, through a different spelling, a link or a hard link."""
    if path.resolve() == other.resolve():
        return True
    try:
        return os.path.samefile(path, other)
    except OSError:  # one of them does not exist
        return False


def _is_sqlite_file(path: Path) -> bool:
    """Whether `path` is an existing file that starts as every SQLite database does."""
    try:
        if not path.is_file():
            return False
        with path.open("rb") as file:
            return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:  # unreadable: the write will say what is wrong
        return False
