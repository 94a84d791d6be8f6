"""Files we write that hold personal data or working unsubscribe links: private, and safe in a spreadsheet.

The preview site, the report, the suppression export and the sandbox outbox hold addresses,
names and signed unsubscribe tokens: they are written owner-only (files 0600, folders 0700),
as the ledger is. A CSV cell that starts like a formula is neutralised (OWASP's rule) so that
opening the file in a spreadsheet never runs a value from the list; Parquet keeps raw values.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the sandbox's outbox writes no frame: it need not load polars
    import polars as pl

__all__ = [
    "make_private_dir",
    "neutralise_formulas",
    "write_private_bytes",
    "write_private_csv",
    "write_private_parquet",
    "write_private_text",
]

# OWASP CSV injection: a cell starting with one of these is read as a formula by spreadsheets.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def make_private_dir(path: Path) -> None:
    """Create the folder `path` (and its parents) if missing, the folder itself owner-only (0700).

    A folder that exists keeps its mode: it may be one the user chose (`--out .`) and shares.
    """
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)


def write_private_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path`, owner read/write only (also when the file existed with wider rights)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
    finally:
        os.close(fd)


def write_private_text(path: Path, text: str) -> None:
    """`write_private_bytes` of `text` as UTF-8."""
    write_private_bytes(path, text.encode("utf-8"))


def neutralise_formulas(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with every text cell that a spreadsheet would run as a formula prefixed with `'`."""
    import polars as pl

    starts = "^[" + "".join(_FORMULA_STARTS).replace("-", r"\-") + "]"
    return frame.with_columns(
        pl.when(pl.col(name).str.contains(starts))
        .then(pl.lit("'") + pl.col(name))
        .otherwise(pl.col(name))
        .alias(name)
        for name, dtype in frame.schema.items()
        if dtype == pl.String
    )


def write_private_csv(frame: pl.DataFrame, path: Path, *, datetime_format: str | None = None) -> None:
    """`frame` as UTF-8 CSV with a header, formulas neutralised, written owner-only."""
    buffer = io.BytesIO()
    neutralise_formulas(frame).write_csv(buffer, datetime_format=datetime_format)
    write_private_bytes(path, buffer.getvalue())


def write_private_parquet(frame: pl.DataFrame, path: Path) -> None:
    """`frame` as Parquet, values as they are, written owner-only."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    write_private_bytes(path, buffer.getvalue())
