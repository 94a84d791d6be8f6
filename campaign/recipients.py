"""The audience: the recipient list read with polars, validated, de-duplicated and suppressed.

`load_audience` turns a CSV or Parquet file into recipients to mail, rows deliberately
skipped (duplicates, suppressed) and row-level problems (bad address, unknown sender),
each with its row number. Whole-file faults (missing file, bad quoting, a wrong
delimiter, a header with stray spaces) raise at once. This module never renders,
never sends and never writes the ledger.
"""

from __future__ import annotations

import difflib
import io
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from email_validator import EmailNotValidError, validate_email

from campaign.errors import InputFileError, RecipientDataError
from campaign.manifest import RecipientsSettings
from campaign.models import Address, Problem, Recipient, Skip, SkipReason

__all__ = ["Audience", "build_invalid_skips", "load_audience", "load_suppression"]

_SKIP_HINT = "fix or remove the row, or run with --skip-invalid"
_OTHER_DELIMITERS = (",", ";", "\t", "|")
_SEVERAL = re.compile(r"[,;\s]+")


@dataclass(frozen=True, slots=True)
class Audience:
    """The recipient list after validation: who gets mail, who is skipped and why, what is wrong."""

    source: Path
    columns: tuple[str, ...]
    recipients: tuple[Recipient, ...]
    skipped: tuple[Skip, ...]
    problems: tuple[Problem, ...]


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
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipientDataError(
            f"{name}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
            'save the file as "CSV UTF-8" (Excel: Save As > CSV UTF-8)'
        ) from exc


def _find_csv_fault(text: str, sep: str) -> tuple[int, str] | None:
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
    if not text.strip():
        raise RecipientDataError(f"{name}: is empty; its first line must name the columns (e.g. email,name)")
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
        fault = _find_csv_fault(text, separator)
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
    return list(frame.columns), frame


def _read_table(path: Path, separator: str | None, what: str) -> tuple[list[str], list[list[object]]]:
    """Header names and column values of a .csv/.parquet file; nulls become ""; unnamed columns dropped.

    `separator` None guesses it from the first line (for suppression lists exported by other tools).
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
            separator = next((d for d in _OTHER_DELIMITERS if d in first_line), ",")
        header, frame = _read_csv(raw, path.name, separator)
    names: list[str] = []
    columns: list[list[object]] = []
    for index, name in enumerate(header):
        if not name.strip():  # e.g. trailing separators from a spreadsheet: nothing can refer to them
            continue
        series = frame.to_series(index)
        if series.dtype == pl.String:
            series = series.fill_null("")
        values = series.to_list()
        if series.null_count():
            values = ["" if v is None else v for v in values]
        names.append(name)
        columns.append(values)
    return names, columns


def _check_header(name: str, header: list[str], settings: RecipientsSettings) -> None:
    for column in header:
        if column != column.strip():
            raise RecipientDataError(
                f'{name}: column "{column}" has spaces around its name in the header; remove them '
                "(templates and the manifest use the exact name)"
            )
    for index, column in enumerate(header):
        if column in header[:index]:
            raise RecipientDataError(f'{name}: column "{column}" appears twice in the header; rename one')
    wanted: dict[str, str | None] = {
        "email_column": settings.email_column,
        "name_column": settings.name_column,
        "sender_column": settings.sender_column,
        "key_column": settings.key_column,
    }
    for key, wanted_column in wanted.items():
        if wanted_column is None or wanted_column in header:
            continue
        column = wanted_column
        shown = ", ".join(f'"{c}"' for c in header[:12]) + (", …" if len(header) > 12 else "")
        hint = ""
        same = [c for c in header if c.lower() == column.lower()]
        delimiters = [d for d in _OTHER_DELIMITERS if d != settings.delimiter and any(d in c for c in header)]
        if same:
            hint = f'; did you mean "{same[0]}"? (names are case-sensitive)'
        elif delimiters:
            toml = json.dumps(delimiters[0])  # TOML basic string: "\t" is a tab there, '\t' is not
            hint = f"; the header contains {toml}: set recipients.delimiter = {toml} in the manifest"
        raise RecipientDataError(
            f'{name}: no column "{column}" (recipients.{key}); the header has: {shown}{hint}'
        )


def _address_problem(value: str, exc: EmailNotValidError) -> str:
    """Why `value` is not one valid address, and what to do."""
    if not value:
        return f"the address is empty; {_SKIP_HINT}"
    shown = repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    parts = [p for p in _SEVERAL.split(value) if "@" in p]
    if len(parts) > 1:
        return f"{shown} holds {len(parts)} addresses; put one address per row, or run with --skip-invalid"
    return f"{shown} is not a valid address ({str(exc).rstrip('.')}); {_SKIP_HINT}"


def load_audience(settings: RecipientsSettings, *, sender_names: Collection[str]) -> Audience:
    """Read, validate, de-duplicate and suppress the recipient list named by `settings`."""
    source = settings.source
    header, columns = _read_table(source, settings.delimiter, "recipient list")
    _check_header(source.name, header, settings)
    suppressed = load_suppression(settings.suppress)
    senders = frozenset(sender_names)
    email_at = header.index(settings.email_column)
    name_at = None if settings.name_column is None else header.index(settings.name_column)
    sender_at = None if settings.sender_column is None else header.index(settings.sender_column)
    key_at = None if settings.key_column is None else header.index(settings.key_column)
    recipients: list[Recipient] = []
    skipped: list[Skip] = []
    problems: list[Problem] = []
    first_row: dict[str, int] = {}
    for row, values in enumerate(zip(*columns, strict=True), start=1):
        cell = values[email_at]
        # Surrounding whitespace (spreadsheet residue, NBSP included) is harmless; inner whitespace is not.
        email = cell.strip() if isinstance(cell, str) else str(cell)
        if not email and all(v == "" for v in values):
            continue  # a blank line: counted as a row, but not a recipient
        found: list[Problem] = []
        try:
            normalized = validate_email(email, check_deliverability=False).normalized
        except EmailNotValidError as exc:
            normalized = ""
            found.append(Problem(row, f'column "{settings.email_column}"', _address_problem(email, exc)))
        sender = None if sender_at is None else str(values[sender_at]).strip() or None
        if sender is not None and sender not in senders:
            close = difflib.get_close_matches(sender, sorted(senders), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = (
                f"names sender {sender!r}, which the manifest does not define "
                f"(senders: {', '.join(sorted(senders)) or 'none'}); {hint}{_SKIP_HINT}"
            )
            found.append(Problem(row, f'column "{settings.sender_column}"', message))
        key = normalized.lower()
        if key_at is not None:
            key = str(values[key_at]).strip()
            if not key:
                message = f"the key is empty; every row needs its own key in this column; {_SKIP_HINT}"
                found.append(Problem(row, f'column "{settings.key_column}"', message))
        if found:
            problems.extend(found)
            continue
        if normalized.lower() in suppressed:
            skipped.append(Skip(row, key, normalized, SkipReason.SUPPRESSED, "on a suppression list"))
            continue
        first = first_row.setdefault(key, row)
        if first != row:
            skipped.append(Skip(row, key, normalized, SkipReason.DUPLICATE, f"duplicate of row {first}"))
            continue
        name = None if name_at is None else str(values[name_at]).strip() or None
        fields = dict(zip(header, values, strict=True))
        recipients.append(Recipient(key, row, Address(normalized, name), fields, sender))
    return Audience(source, tuple(header), tuple(recipients), tuple(skipped), tuple(problems))


def _suppression_values(path: Path) -> list[str]:
    """Raw entries of one suppression file: a column of a .csv/.parquet, or the lines of a text file."""
    if path.suffix.lower() not in {".csv", ".parquet"}:
        lines = _decode(_read_bytes(path, "suppression list"), path.name).splitlines()
        return [line for line in lines if not line.lstrip().startswith("#")]
    header, columns = _read_table(path, None, "suppression list")
    if not header:
        return []
    lowered = [h.strip().lower() for h in header]
    index = lowered.index("email") if "email" in lowered else 0
    # A headerless one-column file: its first line is an address, not a column name.
    first = [header[index]] if "@" in header[index] else []
    return first + [str(value) for value in columns[index]]


def load_suppression(paths: Sequence[Path]) -> frozenset[str]:
    """The lower-cased normalised addresses listed in the suppression files."""
    found: set[str] = set()
    for path in paths:
        for value in _suppression_values(path):
            value = value.strip().removeprefix("mailto:")
            if not value:
                continue
            try:
                found.add(validate_email(value, check_deliverability=False).normalized.lower())
            except EmailNotValidError:
                found.add(value.lower())  # cannot match a valid recipient, but keeps the list honest
    return frozenset(found)


def build_invalid_skips(audience: Audience) -> tuple[Skip, ...]:
    """The audience's problem rows as INVALID skips (for --skip-invalid), one per row, in row order."""
    details: dict[int, list[str]] = {}
    for problem in audience.problems:
        if problem.row is not None:
            details.setdefault(problem.row, []).append(f"{problem.where}: {problem.message}")
    return tuple(
        Skip(row, f"row:{row}", "", SkipReason.INVALID, "; ".join(messages))
        for row, messages in sorted(details.items())
    )
