"""A list file read with polars, a slice at a time: a CSV or Parquet table as its header names and rows.

CSV is read with every column as text (zip codes keep their zeros), UTF-8 with or without
a BOM, with any one-character delimiter (or the first of `DELIMITERS` its first line holds).
Parquet keeps its numbers and booleans (templates can compare them); other types become text
deliberately: binary as UTF-8, dates and times as ISO 8601, categories as their labels; nested
(struct, list) and other columns that have no one text form are refused. Whole-file faults
raise as `InputFileError` (missing, unreadable) or `RecipientDataError` naming the file and,
for bad CSV quoting or bytes that are not UTF-8, the line (for a stray NUL byte, its row and
column too: text never holds one; a start full of them is UTF-16), and a header that cannot be
the columns' names (a blank first line, CR-only line ends, no name, a control character in a name).
`ListFile` never holds more than a block of the file, whatever its size (and one record, which may
not run past `_MAX_RECORD_BYTES`). It knows nothing of addresses or recipients;
`campaign.recipients._audience` checks the rows.
"""

from __future__ import annotations

import functools
import io
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import polars as pl

from campaign.errors import InputFileError, MissingFileError, RecipientDataError
from campaign.redaction import quote_value, secret_values

__all__ = [
    "DELIMITERS",
    "ListFile",
    "ListStart",
    "column_values",
    "read_table",
    "read_text",
    "shown_name",
    "shown_path",
]

DELIMITERS = (",", ";", "\t", "|")
_BOM = b"\xef\xbb\xbf"
_T = TypeVar("_T")
_BLOCK_BYTES = 4 << 20  # a CSV is parsed this much at a time (about 45,000 newsletter rows)
# One record may run this long (a quoted cell with a whole document in it); past it the record is taken
# for a quote never closed, which would otherwise hold the rest of the file in memory as one record.
_MAX_RECORD_BYTES = 32 << 20
# A CR followed by anything but LF: one that ends the bytes read so far may be half of a CRLF.
_LONE_CR = re.compile(rb"\r(?=[^\n])")
_NEVER_CLOSED = "a quote opened on this line is never closed"
_MIXED_LINE_ENDS = (
    'lines here end with CR only, others with LF (mixed line endings); save the file as "CSV UTF-8" '
    "(Excel: Save As > CSV UTF-8)"
)


def _open(path: Path, what: str) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError as exc:
        raise MissingFileError(shown_path(path), what) from exc
    except IsADirectoryError as exc:
        raise InputFileError(f"{shown_path(path)}: {what} is a folder, not a file") from exc
    except OSError as exc:
        raise InputFileError(f"{shown_path(path)}: cannot read the {what} ({exc.strerror or exc})") from exc


def _read(file: BinaryIO, size: int, path: Path, what: str) -> bytes:
    try:
        return file.read(size)
    except OSError as exc:
        raise InputFileError(f"{shown_path(path)}: cannot read the {what} ({exc.strerror or exc})") from exc


def shown_path(path: Path | str) -> str:
    """A list file's path or name as an error names it; not shown if it looks like a secret (one pasted
    into recipients.source or suppress names no file), or holds the value of a secret variable."""
    return quote_value(path, secret_values(), bare=True)


def _check_text_start(start: bytes, name: str) -> None:
    """A clear error for a file that starts as UTF-16 (or is not text at all).

    A stray NUL is not UTF-16: the rows' reading names its row and column (`ListFile._nul_cell`).
    """
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipientDataError(f'{name}: is UTF-16 text; save it as "CSV UTF-8" (comma delimited)')
    if _looks_utf16(start[:4096]):  # valid UTF-8, but full of NULs: UTF-16 without its byte order mark
        raise RecipientDataError(
            f"{name}: holds NUL bytes, so it is UTF-16 text without a byte order mark (or not text); "
            'save it as "CSV UTF-8" (comma delimited)'
        )


def _check_line_ends(start: bytes, name: str) -> None:
    """A clear error for CR-only line ends (classic Mac; Excel for Mac's "CSV (Macintosh)"): records are
    cut at LF only, so such a file would be one header line and no rows, and a list of no one.

    Only the header line is looked at: a CR outside quotes there ends no record. (A CR inside a quoted
    name is a control character in the name, refused as such.)
    """
    newline = start.find(b"\n")
    head = start if newline < 0 else start[: newline + 1]
    found = _LONE_CR.search(head)
    if found is not None and head.count(b'"', 0, found.start()) % 2 == 0:
        raise RecipientDataError(
            f'{name}: uses CR-only line endings (classic Mac); save it as "CSV UTF-8" (Excel: Save As > '
            "CSV UTF-8)"
        )


def shown_name(name: str) -> str:
    """A column's name as an error shows it: in double quotes, with each character that does not show as
    itself (a control, a zero-width space, a no-break space) written as its escape (`\\u200b`), so the
    user sees how it differs from the name they typed."""
    if name.isprintable():
        return f'"{name}"'
    return '"' + "".join(char if char.isprintable() else repr(char)[1:-1] for char in name) + '"'


def _check_names(names: list[str], where: str) -> None:
    """RecipientDataError for a column name holding a control character (a tab is a separator's
    business: the header's checks say so): no template or manifest can name it as it is."""
    for name in names:
        control = next((c for c in name if c != "\t" and unicodedata.category(c) == "Cc"), None)
        if control is not None:
            raise RecipientDataError(
                f"{where}: column {shown_name(name)} holds a control character ({repr(control)[1:-1]}); "
                "remove it and save the file again"
            )


def _looks_utf16(start: bytes) -> bool:
    """Whether NULs fill every other byte of `start`, as UTF-16 text does wherever it holds ASCII (the
    header line, the addresses); one NUL in a cell is not that."""
    if b"\x00" not in start:
        return False
    even, odd = start[0::2], start[1::2]
    return max(even.count(0) * 2 > len(even), odd.count(0) * 2 > len(odd))


def _nul_line(data: bytes, lines_before: int) -> int | None:
    """The file's line of the first NUL byte in `data` (which starts after `lines_before` lines), or None."""
    at = data.find(b"\x00")  # memchr: a block without NUL, nearly every one, costs no more than this
    return None if at < 0 else lines_before + data.count(b"\n", 0, at) + 1


def _nul_error(name: str, where: str) -> RecipientDataError:
    """Text never holds NUL: a stray one is a control character pasted or exported by mistake."""
    return RecipientDataError(
        f"{name}: {where}: holds a NUL byte (U+0000), a control character; remove it and save the file again"
    )


def _check_utf8_text(data: bytes, name: str, lines_before: int) -> None:
    """RecipientDataError naming the line of the first byte of `data` that is not UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lines_before + data[: exc.start].count(b"\n") + 1
        raise RecipientDataError(
            f"{name}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            'save the file as "CSV UTF-8" (Excel: Save As > CSV UTF-8)'
        ) from exc


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a plain list file (BOM dropped); `what` names the file in errors."""
    with _open(path, what) as file:
        raw = _read(file, -1, path, what)
    _check_text_start(raw, path.name)
    _check_utf8_text(raw, path.name, 0)
    if (line := _nul_line(raw, 0)) is not None:
        raise _nul_error(path.name, f"line {line}")
    return raw.decode("utf-8").removeprefix("\ufeff")


def _record_end(data: bytes, start: int = 0, quotes: int = 0) -> int:
    """The end of the last CSV record in `data` (just after a newline outside quotes), or 0 if none ends.

    `data` starts where a record starts. A newline is outside quotes when an even number of quote
    characters comes before it (a doubled quote inside a quoted field counts twice); a stray quote
    in an unquoted field breaks the count, but polars refuses such a file anyway. Only newlines from
    `start` on are looked at: `data[:start]` was searched already (it ends no record) and holds
    `quotes` quote characters. Each byte is counted once, so the search is linear even when a quote
    stays open over a hundred thousand lines (counting from the start at every newline was quadratic).
    """
    at = len(data)
    before = quotes + data.count(b'"', start)  # the quotes before `at`
    while (newline := data.rfind(b"\n", start, at)) >= 0:
        before -= data.count(b'"', newline, at)
        if before % 2 == 0:
            return newline + 1
        at = newline
    return 0


def _first_record_end(data: bytes) -> int:
    """The end of the first CSV record in `data` (after its newline), or len(data) if it has none."""
    at = quotes = 0
    while (newline := data.find(b"\n", at)) >= 0:
        quotes += data.count(b'"', at, newline)  # kept as it goes: linear however many lines it spans
        if quotes % 2 == 0:
            return newline + 1
        at = newline + 1
    return len(data)


def _find_csv_fault(text: str, sep: str) -> tuple[int, str] | None:  # noqa: C901 - a CSV quoting state machine (stdlib csv cannot point at these faults)
    """The first line that breaks CSV quoting or has too many fields; only run after polars failed.

    Too many fields in a record that a CR outside quotes cuts (a CR-only line end after an LF one, as
    when rows were pasted in from a classic Mac file) is said as mixed line endings: that is the fault
    to fix, not the quoting.
    """
    line = record_line = opened = fields = 1
    width: int | None = None
    state = "start"  # start | plain | quoted | closed (a quote just ended a quoted field, or is doubled)
    after_cr = lone_cr = False  # the last character was a CR outside quotes; the record holds a lone one
    for char in text + "\n":
        lone_cr, after_cr = lone_cr or (after_cr and char != "\n"), char == "\r" and state != "quoted"
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
                if lone_cr:
                    return record_line, _MIXED_LINE_ENDS
                return (
                    record_line,
                    f"{fields} fields, but the header has {width}; quote fields that hold {sep!r}",
                )
            width = fields if width is None else width
            line, record_line, fields, state, lone_cr = line + 1, line + 1, 1, "start", False
        elif state == "closed" and char != "\r":
            return line, 'text after a closing quote; quote the whole field and double any quote inside ("")'
        elif state == "start" and char != "\r":
            state = "plain"
    if state == "quoted":
        return opened, _NEVER_CLOSED
    return None


class _LongRecord(Exception):
    """A record (from the start of `head`) runs past `_MAX_RECORD_BYTES`: `ListFile` says where."""

    def __init__(self, head: bytes) -> None:
        super().__init__("a CSV record longer than the limit")
        self.head = head


def _csv_blocks(path: Path, what: str, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """The file's bytes (BOM dropped) from `offset` (where a record starts), in blocks of about
    `_BLOCK_BYTES`, each ending where a record ends, with the file offset where each block ends.

    _LongRecord if no record ends within `_MAX_RECORD_BYTES` (a quote never closed): the bytes held
    stay bounded whatever the file's size.
    """
    with _open(path, what) as file:
        if offset:
            file.seek(offset)
            data = _read(file, _BLOCK_BYTES, path, what)
        else:
            data = _read(file, _BLOCK_BYTES, path, what)
            _check_text_start(data, path.name)
            offset = len(_BOM) if data.startswith(_BOM) else 0
            data = data.removeprefix(_BOM)
            _check_line_ends(data, path.name)
        searched = quotes = 0  # data[:searched] ends no record and holds `quotes` quotes
        while more := _read(file, _BLOCK_BYTES, path, what):
            data += more
            if end := _record_end(data, searched, quotes):
                offset += end
                yield offset, data[:end]
                data = data[end:]
                # The rest ends no record either (`end` was the last), and an even number of quotes
                # came before it: it is searched already, as the start of the next record.
                searched, quotes = len(data), data.count(b'"')
            else:
                searched, quotes = len(data), quotes + data.count(b'"', searched)
                if len(data) > _MAX_RECORD_BYTES:
                    raise _LongRecord(data)
        if data:
            yield offset + len(data), data


def _sniff(block: bytes) -> str:
    """The separator of a list whose manifest names none: the first of `DELIMITERS` its first line holds."""
    first_line = block.partition(b"\n")[0].decode("utf-8", "replace")
    return next((d for d in DELIMITERS if d in first_line), ",")


@dataclass(frozen=True, slots=True)
class ListStart:
    """Where to start reading a CSV list that only grew since it was read: after its first `rows` data
    rows, which end at byte `offset` (just after a newline)."""

    offset: int
    rows: int


class ListFile:
    """A list file opened for reading a slice at a time: its header, its row count, its rows.

    A CSV is read in blocks that end where a record ends, each parsed by polars behind the file's
    own header line, so that every block is read as the whole file would be (its width set by the
    header). A Parquet file is read a slice at a time. Nothing holds more than a block. With `start`
    (a CSV only), the rows before it are not read at all.
    """

    def __init__(self, path: Path, separator: str | None, what: str, start: ListStart | None = None) -> None:
        suffix = path.suffix.lower()
        if suffix not in {".csv", ".parquet"}:
            kind = quote_value(suffix) if suffix else "'(none)'"
            raise RecipientDataError(
                f"{shown_path(path.name)}: unknown file type {kind}; use a .csv or .parquet file"
            )
        self.path = path
        self._what = what
        self._parquet = suffix == ".parquet"
        self.start = start or ListStart(0, 0)
        self.end = 0  # a CSV's offset just after the last row read (the file may grow meanwhile)
        if self._parquet and start is not None:
            raise ValueError("a Parquet list is read whole")
        self._header_line = b""
        self._names: list[str] = []  # a CSV's column names, unnamed ones too (as "")
        self._separator = separator or ","
        self._sniffs = separator is None  # the separator is the first line's (`_sniff`)
        self._conversions: list[pl.Expr] = []
        names = self._open_parquet() if self._parquet else self._open_csv()
        where = shown_path(path.name) if self._parquet else f"{shown_path(path.name)}: line 1 (the header)"
        _check_names(names, where)
        # Unnamed columns (e.g. trailing separators from a spreadsheet): nothing can refer to them.
        self._keep = [index for index, name in enumerate(names) if name.strip()]
        self.header = [names[index] for index in self._keep]
        if not self.header:  # read as no column at all, a suppression list would suppress no one
            fix = "export it again with named columns" if self._parquet else "the first line must name them"
            raise RecipientDataError(f"{where} names no column; {fix} (e.g. email,name)")

    @functools.cached_property
    def row_count(self) -> int:
        """Data rows in the file (blank lines included) after `start`; a CSV is read through once to
        count them."""
        if self._parquet:
            return int(self._parquet_call(lambda: self._scan.select(pl.len()).collect().item()))
        return sum(frame.height for frame in self._csv_frames())

    def frames(self, size: int) -> Iterator[pl.DataFrame]:
        """The data rows in file order, `size` at a time (the last slice may be shorter), as frames of the
        named columns with string nulls as "" (`column_values` turns one into Python values)."""
        if self._parquet:
            for offset in range(0, self.row_count, size):
                yield self._named(self._parquet_slice(offset, size))
            return
        left: pl.DataFrame | None = None
        for frame in self._csv_frames():
            left = frame if left is None else pl.concat([left, frame])
            while left.height >= size:
                yield self._named(left.slice(0, size))
                left = left.slice(size)
        if left is not None and left.height:
            yield self._named(left)

    def _named(self, frame: pl.DataFrame) -> pl.DataFrame:
        frame = frame.select([frame.columns[index] for index in self._keep])
        return frame.with_columns(pl.col(pl.String).fill_null(""))

    def _open_csv(self) -> list[str]:
        for _, block, _ in self._blocks(0, 0):
            if self._sniffs:
                self._separator = _sniff(block)
            if block.isspace():
                break
            self._header_line = block[: _first_record_end(block)]
            if self._header_line.isspace():  # read on, a suppression list would be read as no one
                raise RecipientDataError(
                    f"{self.path.name}: line 1 is blank, but it must name the columns (e.g. email,name); "
                    "remove the blank lines above the header"
                )
            if not self._header_line.endswith(b"\n"):
                self._header_line += b"\n"
            _check_utf8_text(self._header_line, self.path.name, 0)
            if _nul_line(self._header_line, 0) is not None:
                raise _nul_error(self.path.name, "line 1 (the header)")
            self._names = [
                "" if value is None else str(value) for value in self._parse(self._header_line).row(0)
            ]
            return self._names
        raise RecipientDataError(
            f"{self.path.name}: is empty; its first line must name the columns (e.g. email,name)"
        )

    def _blocks(self, offset: int, lines: int) -> Iterator[tuple[int, bytes, int]]:
        """`_csv_blocks` from `offset`, after `lines` lines, each block with the lines before it; a
        record that runs too long is an error naming its line (its fault, when one comes first)."""
        blocks = _csv_blocks(self.path, self._what, offset)
        while True:
            try:
                found = next(blocks, None)
            except _LongRecord as exc:
                raise self._long_record(exc.head, lines) from None
            if found is None:
                return
            yield found[0], found[1], lines
            lines += found[1].count(b"\n")

    def _long_record(self, head: bytes, lines: int) -> RecipientDataError:
        """The error for a record that starts at `head`, after `lines` lines, and runs past the limit."""
        separator = _sniff(head) if self._sniffs and not self._header_line else self._separator
        line, why = _find_csv_fault(head.decode("utf-8", "replace"), separator) or (1, _NEVER_CLOSED)
        if why != _NEVER_CLOSED:  # a fault inside the record, before the limit: the one to fix
            return RecipientDataError(f"{self.path.name}: line {lines + line}: malformed CSV: {why}")
        return RecipientDataError(
            f"{self.path.name}: line {lines + line}: malformed CSV: a quote opened on this line is not "
            f"closed within {_MAX_RECORD_BYTES >> 20} MB; close it, or quote the whole field and double "
            'any quote inside ("")'
        )

    def _csv_frames(self) -> Iterator[pl.DataFrame]:
        """Each block of data rows parsed, in file order."""
        lines = self._lines_before()
        rows = self.start.rows
        header_lines = self._header_line.count(b"\n")
        for number, (end, block, before) in enumerate(self._blocks(self.start.offset, lines)):
            _check_utf8_text(block, self.path.name, before)
            nul_line = _nul_line(block, before)
            self.end = end
            with_header = number == 0 and not self.start.offset
            if with_header:
                block = block[len(self._header_line) :]
            if block:
                # The parsed text's line L is the file's line L + shift (the header line stands in front).
                shift = 0 if with_header else before - header_lines
                frame = self._parse(self._header_line + block, shift).slice(1)
                if nul_line is not None:
                    raise _nul_error(self.path.name, self._nul_cell(frame, rows, nul_line))
                rows += frame.height
                yield frame

    def _nul_cell(self, frame: pl.DataFrame, rows_before: int, line: int) -> str:
        """Where the first NUL of a block parsed into `frame` is: its row and column, and its line."""
        found: list[tuple[int, str]] = []
        for index, series in enumerate(frame.iter_columns()):
            if series.dtype == pl.String and (hits := series.str.contains("\x00", literal=True)).any():
                name = self._names[index] if index < len(self._names) else ""
                found.append(
                    (int(hits.arg_true()[0]), f'column "{name}"' if name else f"unnamed column {index + 1}")
                )
        if not found:  # not in a cell polars kept: the line alone
            return f"line {line}"
        at, column = min(found, key=lambda hit: hit[0])  # the first row; in it, the leftmost column
        return f"row {rows_before + at + 1}, {column} (line {line})"

    def _lines_before(self) -> int:
        """The file's lines before `start` (a fault after it is named by its line in the whole file)."""
        lines = 0
        with _open(self.path, self._what) as file:
            left = self.start.offset
            while left > 0 and (chunk := _read(file, min(left, _BLOCK_BYTES), self.path, self._what)):
                lines += chunk.count(b"\n")
                left -= len(chunk)
        return lines

    def _parse(self, data: bytes, shift: int = 0) -> pl.DataFrame:
        """`data` (the header line, then a block of records; UTF-8 checked) parsed; its line L is the
        file's line L + `shift` (a line of the header is its own)."""
        try:
            # No header inference: polars would rename duplicate names, and we want to report them.
            return pl.read_csv(
                io.BytesIO(data),
                has_header=False,
                infer_schema=False,
                separator=self._separator,
                empty_string_is_null=False,
            )
        except (pl.exceptions.PolarsError, ValueError) as exc:
            # The fault's line is found in the text that failed (a block, not the whole file: memory
            # stays flat): only a read that failed pays for it.
            name = self.path.name
            fault = _find_csv_fault(data.decode("utf-8"), self._separator)
            if fault is not None:
                line = fault[0] if fault[0] <= self._header_line.count(b"\n") else fault[0] + shift
                raise RecipientDataError(f"{name}: line {line}: malformed CSV: {fault[1]}") from exc
            first = str(exc).strip().splitlines()[0]
            raise RecipientDataError(f"{name}: cannot be read as CSV ({first}); check the quoting") from exc

    def _open_parquet(self) -> list[str]:
        _open(self.path, self._what).close()  # missing, a folder, unreadable: said as for a CSV
        self._scan = pl.scan_parquet(self.path)
        schema = self._parquet_call(self._scan.collect_schema)
        self._conversions = _parquet_conversions(schema, self.path.name)
        self._binary = [column for column, dtype in schema.items() if dtype == pl.Binary]
        return list(schema.names())

    def _parquet_slice(self, offset: int, size: int) -> pl.DataFrame:
        frame = self._parquet_call(lambda: self._scan.slice(offset, size).collect())
        for column in self._binary:
            _check_utf8(frame.get_column(column), f'{self.path.name}: column "{column}"', offset)
        return frame.with_columns(self._conversions) if self._conversions else frame

    def _parquet_call(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RecipientDataError(
                f"{self.path.name}: not a readable Parquet file ({first}); export it again"
            ) from exc


def _parquet_conversions(schema: pl.Schema, name: str) -> list[pl.Expr]:
    """What makes text of every column whose values are not plain text, numbers or booleans, or
    RecipientDataError naming the column (a value must never reach a message as a Python repr)."""
    converted: list[pl.Expr] = []
    for column, dtype in schema.items():
        if dtype.is_numeric() or dtype in (pl.String, pl.Boolean, pl.Null):
            continue
        where = f'{name}: column "{column}"'
        if dtype == pl.Binary:
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
    return converted


def _check_utf8(series: pl.Series, where: str, offset: int) -> None:
    for row, value in enumerate(series.to_list(), start=offset + 1):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecipientDataError(
                    f"{where}: row {row} holds binary data that is not UTF-8 text; store the column as "
                    "UTF-8 text and export the list again"
                ) from exc


def read_table(path: Path, separator: str | None, what: str) -> tuple[list[str], pl.DataFrame]:
    """Header names and a frame of the named columns (same order) of a small .csv/.parquet file, whole
    (a suppression list). Unnamed columns are dropped and string nulls become "". `separator` None
    guesses it from the first line (for suppression lists exported by other tools)."""
    table = ListFile(path, separator, what)
    frames = list(table.frames(1 << 30))
    empty = pl.DataFrame(schema=[(f"column_{index}", pl.String) for index in range(len(table.header))])
    return table.header, pl.concat(frames) if frames else empty


def column_values(frame: pl.DataFrame) -> list[list[object]]:
    """Each column of `frame` as a list of Python values, nulls as "" (call it on a slice: it copies)."""
    columns: list[list[object]] = []
    for series in frame.iter_columns():
        values = series.to_list()
        if series.null_count():
            values = ["" if v is None else v for v in values]
        columns.append(values)
    return columns
