"""Files we write that hold personal data or working unsubscribe links: private, and safe in a spreadsheet.

The preview site, the report, the suppression export and the sandbox outbox hold addresses,
names and signed unsubscribe tokens: they are written owner-only (files 0600, folders 0700),
as the ledger is. They are never written through a symbolic link: a link where one is to be
written is refused (`SymlinkRefusedError`), also when swapped in at the last moment (O_NOFOLLOW),
so that a link planted in an output folder cannot aim a write at another file. A CSV cell that
starts like a formula is neutralised (OWASP's rule) so that opening the file in a spreadsheet
never runs a value from the list; Parquet keeps raw values.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the sandbox's outbox writes no frame: it need not load polars
    import polars as pl

__all__ = [
    "SymlinkRefusedError",
    "make_private_dir",
    "neutralise_formulas",
    "open_private_folder",
    "restore_formula",
    "write_private_bytes",
    "write_private_csv",
    "write_private_parquet",
    "write_private_text",
]

# OWASP CSV injection: a cell starting with one of these is read as a formula by spreadsheets.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Not on every platform; where it is missing, the check before opening is all there is.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class SymlinkRefusedError(OSError):
    """A file or folder to be written is a symbolic link: campaign writes through none. The message is
    one line for the user, naming the path."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ELOOP, "a symbolic link, which campaign does not write through", str(path))
        self.path = path

    def __str__(self) -> str:
        return (
            f"{self.path} is a symbolic link, and campaign does not write through one; "
            "remove the link, or write somewhere else"
        )


def make_private_dir(path: Path) -> None:
    """Create the folder `path` (and its parents) if missing, the folder itself owner-only (0700).

    A folder that exists keeps its mode: it may be one the user chose (`--out .`) and shares.
    """
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)


def open_private_folder(path: Path) -> int:
    """Open the folder `path`, created owner-only (0700) if missing (its parent must exist), and return
    its descriptor (the caller closes it). SymlinkRefusedError if `path` is a symbolic link: what is
    written or removed through the descriptor stays in this folder, even if a link replaces it later."""
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise SymlinkRefusedError(path) from exc
        raise
    if not _NOFOLLOW and path.is_symlink():  # a platform without O_NOFOLLOW opened it through the link
        os.close(fd)
        raise SymlinkRefusedError(path)
    if created:  # a folder that existed keeps its mode, as in make_private_dir
        os.fchmod(fd, 0o700)
    return fd


def write_private_bytes(path: Path, data: bytes, *, folder: int | None = None) -> None:
    """Write `data` to `path`, owner read/write only (also when the file existed with wider rights).

    SymlinkRefusedError if `path` is a symbolic link: the file is never opened through one. With
    `folder` (a descriptor from `open_private_folder` of the folder `path` is in), the file is opened
    in that folder, by its name.
    """
    if path.is_symlink():
        raise SymlinkRefusedError(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW
    try:
        fd = os.open(path if folder is None else path.name, flags, 0o600, dir_fd=folder)
    except OSError as exc:  # ELOOP: a link swapped in since the check
        if path.is_symlink():
            raise SymlinkRefusedError(path) from exc
        raise
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
    finally:
        os.close(fd)


def write_private_text(path: Path, text: str, *, folder: int | None = None) -> None:
    """`write_private_bytes` of `text` as UTF-8."""
    write_private_bytes(path, text.encode("utf-8"), folder=folder)


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


def restore_formula(value: str) -> str:
    """A cell `neutralise_formulas` wrote, as it was before (for a CSV of ours read back)."""
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA_STARTS) else value


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
