"""Moving unsubscribe-store entries in and out of files: CSV, Parquet, plain text, or another store.

Reading reuses the suppression-list rules of `recipients` (a column named `email`, else
the first; text files one address a line, `#` comments), so any list `recipients.suppress`
accepts can be imported. An entry that holds a recipient key and no address goes out in a .csv or
.parquet export as a row with an empty `email`, and comes back from its `recipient_key`: a text
list holds addresses only, so a text export leaves such entries out and says how many. This module
reads and writes files only; the store records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from campaign.clock import Clock
from campaign.errors import InputFileError, MissingFileError, UsageError
from campaign.outputfiles import (
    SymlinkRefusedError,
    write_private_csv,
    write_private_parquet,
    write_private_text,
)
from campaign.recipients._audience import EXPORT_KEY_COLUMN, comparable_address, load_suppression_list
from campaign.unsubscribe import StoreEntry, is_store_path, open_store

__all__ = [
    "EXPORT_COLUMNS",
    "ImportedAddresses",
    "load_import_addresses",
    "write_entries",
]

EXPORT_COLUMNS = ("email", EXPORT_KEY_COLUMN, "campaign", "recorded_at", "source")
# The first 16 bytes of every SQLite database file (an unsubscribe store, a ledger).
SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True, slots=True)
class ImportedAddresses:
    """Addresses read for import (normalised, lower-cased, sorted), the addresses of a store that do not
    validate, and the recipient keys (sorted) of the entries that hold a key and no address (a store's,
    or an export's rows with an empty `email`). A list file's entries are all addresses or such keys,
    or `load_suppression_list` refused it."""

    addresses: tuple[str, ...]
    invalid: tuple[str, ...]
    keys: tuple[str, ...]

    @property
    def entries(self) -> tuple[str, ...]:
        """Every value an import would add: the addresses, then the keys."""
        return self.addresses + self.keys


def load_import_addresses(path: Path | str, *, clock: Clock) -> ImportedAddresses:
    """Read the addresses and key-only entries of a suppression list (.csv/.parquet/text) or of another
    unsubscribe store (a file, or a `postgresql://` URL). The path was given on the command line: a
    file that does not exist is a MissingFileError saying so."""
    if is_store_path(path):
        store = open_store(path, clock=clock, create=False)
        try:
            entries = store.entries()
        finally:
            store.close()
        values = {entry.email for entry in entries if entry.email}
        keys = {entry.recipient_key for entry in entries if not entry.email}
    else:
        try:
            listed = load_suppression_list([Path(path)])
        except MissingFileError as exc:
            raise MissingFileError(exc.path, exc.what, given="given") from exc
        values, keys = set(listed.addresses), set(listed.keys)
    addresses = {value: comparable_address(value) for value in values}
    return ImportedAddresses(
        addresses=tuple(sorted({found for found in addresses.values() if found is not None})),
        invalid=tuple(sorted(value for value, found in addresses.items() if found is None)),
        keys=tuple(sorted(keys)),
    )


def write_entries(entries: Sequence[StoreEntry], path: Path, *, store: Path | str | None = None) -> int:
    """Write entries to `path`: .csv/.parquet with EXPORT_COLUMNS, else one address a line. Returns how
    many entries were left out: those that hold a key and no address, in a text export.

    UsageError, and nothing written, if `path` is the store they come from (`store`, however it is
    spelled or linked to) or any other SQLite database (an export would destroy it), or is named as an
    SQLite database is (a list under that name would be taken for a store, and read as none).
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
    if is_store_path(path):
        raise UsageError(
            f"{path}: a name ending in {path.suffix} is taken for an SQLite store, but the export writes "
            "CSV or text; name a .csv or .txt file, e.g. unsubscribes.csv (to fill another store, use "
            "suppress import)"
        )
    suffix = path.suffix.lower()
    left_out = 0
    try:
        if suffix in {".csv", ".parquet"}:
            frame = pl.DataFrame(
                {
                    "email": [entry.email for entry in entries],
                    EXPORT_KEY_COLUMN: [entry.recipient_key for entry in entries],
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
            # A key is no address: as a line it would stop every import and run that reads the list.
            lines = sorted({entry.email for entry in entries if entry.email})
            left_out = sum(1 for entry in entries if not entry.email)
            write_private_text(path, "".join(f"{line}\n" for line in lines))
    except SymlinkRefusedError as exc:
        raise InputFileError(str(exc)) from exc
    except OSError as exc:
        message = f"{path}: cannot write the export ({exc.strerror or exc}); check the folder exists"
        raise InputFileError(message) from exc
    return left_out


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
