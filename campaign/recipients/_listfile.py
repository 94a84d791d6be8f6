"""A list file read with polars: a CSV or Parquet table as its header names and columns.

CSV is read with every column as text (zip codes keep their zeros), UTF-8 with or without
a BOM, with any one-character delimiter (or the first of `DELIMITERS` its first line holds).
Parquet keeps its numbers and booleans (templates can compare them); other types become text
deliberately: binary as UTF-8, dates and times as ISO 8601, categories as their labels; nested
(struct, list) and other columns that have no one text form are refused. Whole-file faults
raise once, as `InputFileError` (missing, unreadable) or `RecipientDataError` naming the file
and, for bad CSV quoting, the line. It knows nothing of addresses or recipients;
`campaign.recipients._audience` checks the rows.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from campaign.errors import InputFileError, RecipientDataError

__all__ = ["DELIMITERS", "column_values", "read_table", "read_text"]

DELIMITERS = (",", ";", "\t", "|")


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InputFileError(f"{path}: {what} not found; check the path in the manifest") from exc
    except IsADirectoryError as exc:
        raise InputFileError(f"{path}: {what} is a folder, not a file") from exc
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc


def _decode(raw: bytes, name: str) -> str:
    """UTF-8 text of a list file, without a BOM; a clear error for UTF-16 or legacy encodings."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipientDataError(f'{name}: is UTF-16 text; save it as "CSV UTF-8" (comma delimited)')
    if b"\x00" in raw[:4096]:  # valid UTF-8, but text never holds NUL: UTF-16 without its byte order mark
        raise RecipientDataError(
            f"{name}: holds NUL bytes, so it is UTF-16 text without a byte order mark (or not text); "
            'save it as "CSV UTF-8" (comma delimited)'
        )
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipientDataError(
            f"{name}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
            'save the file as "CSV UTF-8" (Excel: Save As > CSV UTF-8)'
        ) from exc


def _find_csv_fault(text: str, sep: str) -> tuple[int, str] | None:  # noqa: C901 - a CSV quoting state machine (stdlib csv cannot point at these faults)
    """The first line that breaks CSV quoting or has too many fields; only run after polars failed."""
    line = record_line = opened = fields = 1
    width: int | None = None
    state = "start"  # start | plain | quoted | closed (a quote just ended a quoted field, or is doubled)
    for char in text + "\n":
        if state == "quoted":
            if char == '"':
                state = "closed"
            elif char == "\n":
                line += 1
        elif char == '"':
            if state == "plain":
                return (
                    line,
                    'a quote inside an unquoted field; quote the whole field and double the quote ("")',
                )
            opened = line if state == "start" else opened
            state = "quoted"
        elif char == sep:
            fields, state = fields + 1, "start"
        elif char == "\n":
            if width is not None and fields > width:
                return (
                    record_line,
                    f"{fields} fields, but the header has {width}; quote fields that hold {sep!r}",
                )
            width = fields if width is None else width
            line, record_line, fields, state = line + 1, line + 1, 1, "start"
        elif state == "closed" and char != "\r":
            return line, 'text after a closing quote; quote the whole field and double any quote inside ("")'
        elif state == "start" and char != "\r":
            state = "plain"
    if state == "quoted":
        return opened, "a quote opened on this line is never closed"
    return None


def _read_csv(raw: bytes, name: str, separator: str) -> tuple[list[str], pl.DataFrame]:
    text = _decode(raw, name)
    # isspace() stops at the first printable character; strip() would copy a long list's whole text.
    if not text or text.isspace():
        raise RecipientDataError(f"{name}: is empty; its first line must name the columns (e.g. email,name)")
    del text
    # The decoded text is dropped here: polars reads the bytes, and a long list must not be held as
    # bytes, text and frame at once. It is decoded again only to explain a failure.
    try:
        # No header inference: polars would rename duplicate names, and we want to report them.
        frame = pl.read_csv(
            io.BytesIO(raw.removeprefix(b"\xef\xbb\xbf")),
            has_header=False,
            infer_schema=False,
            separator=separator,
            empty_string_is_null=False,
        )
    except (pl.exceptions.PolarsError, ValueError) as exc:
        fault = _find_csv_fault(_decode(raw, name), separator)
        if fault is not None:
            raise RecipientDataError(f"{name}: line {fault[0]}: malformed CSV: {fault[1]}") from exc
        first = str(exc).strip().splitlines()[0]
        raise RecipientDataError(f"{name}: cannot be read as CSV ({first}); check the quoting") from exc
    header = ["" if value is None else str(value) for value in frame.row(0)]
    return header, frame.slice(1)


def _read_parquet(raw: bytes, name: str) -> tuple[list[str], pl.DataFrame]:
    try:
        frame = pl.read_parquet(io.BytesIO(raw))
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RecipientDataError(f"{name}: not a readable Parquet file ({first}); export it again") from exc
    return list(frame.columns), _convert_parquet_types(frame, name)


def _convert_parquet_types(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    """`frame` with every column whose values are not plain text, numbers or booleans made text, or
    RecipientDataError naming the column (a value must never reach a message as a Python repr)."""
    converted: list[pl.Expr] = []
    for column, dtype in frame.schema.items():
        if dtype.is_numeric() or dtype in (pl.String, pl.Boolean, pl.Null):
            continue
        where = f'{name}: column "{column}"'
        if dtype == pl.Binary:
            _check_utf8(frame.get_column(column), where)
            converted.append(pl.col(column).cast(pl.String))
        elif dtype == pl.Date:
            converted.append(pl.col(column).dt.strftime("%Y-%m-%d"))
        elif isinstance(dtype, pl.Datetime):
            zone = "%:z" if dtype.time_zone else ""
            converted.append(pl.col(column).dt.strftime(f"%Y-%m-%dT%H:%M:%S%.f{zone}"))
        elif dtype == pl.Time:
            converted.append(pl.col(column).dt.strftime("%H:%M:%S%.f"))
        elif isinstance(dtype, (pl.Categorical, pl.Enum)):
            converted.append(pl.col(column).cast(pl.String))
        elif dtype.is_nested():
            raise RecipientDataError(
                f"{where} holds nested values ({dtype}), not text; flatten it into text columns "
                "(e.g. first_name, last_name) and export the list again"
            )
        else:
            raise RecipientDataError(
                f"{where} holds {dtype} values, which have no one text form; "
                "convert the column to text and export the list again"
            )
    return frame.with_columns(converted) if converted else frame


def _check_utf8(series: pl.Series, where: str) -> None:
    for row, value in enumerate(series.to_list(), start=1):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecipientDataError(
                    f"{where}: row {row} holds binary data that is not UTF-8 text; store the column as "
                    "UTF-8 text and export the list again"
                ) from exc


def read_table(path: Path, separator: str | None, what: str) -> tuple[list[str], pl.DataFrame]:
    """Header names and a frame of the named columns (same order) of a .csv/.parquet file.

    Unnamed columns are dropped and string nulls become ""; `column_values` turns a slice into
    Python values. `separator` None guesses it from the first line (for suppression lists
    exported by other tools).
    """
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".parquet"}:
        raise RecipientDataError(
            f"{path.name}: unknown file type {suffix or '(none)'!r}; use a .csv or .parquet file"
        )
    raw = _read_bytes(path, what)
    if suffix == ".parquet":
        header, frame = _read_parquet(raw, path.name)
    else:
        if separator is None:
            first_line = raw.partition(b"\n")[0].decode("utf-8", "replace")
            separator = next((d for d in DELIMITERS if d in first_line), ",")
        header, frame = _read_csv(raw, path.name, separator)
    del raw  # the frame holds the data now; a large list must not be kept twice
    # Unnamed columns (e.g. trailing separators from a spreadsheet): nothing can refer to them.
    keep = [index for index, name in enumerate(header) if name.strip()]
    frame = frame.select([frame.columns[index] for index in keep])
    frame = frame.with_columns(pl.col(pl.String).fill_null(""))
    return [header[index] for index in keep], frame


def column_values(frame: pl.DataFrame) -> list[list[object]]:
    """Each column of `frame` as a list of Python values, nulls as "" (call it on a slice: it copies)."""
    columns: list[list[object]] = []
    for series in frame.iter_columns():
        values = series.to_list()
        if series.null_count():
            values = ["" if v is None else v for v in values]
        columns.append(values)
    return columns


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a plain list file (BOM dropped); `what` names the file in errors."""
    return _decode(_read_bytes(path, what), path.name)
