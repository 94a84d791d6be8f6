"""The audience: the recipient list validated, de-duplicated and suppressed, row by row.

`load_audience` turns a CSV or Parquet file (read by `campaign.recipients._listfile`) into recipients
to mail, rows deliberately skipped (duplicates, suppressed) and row-level problems (bad
address, unknown sender), each with its row number. A duplicate repeats an earlier row's key, or,
with a key column, its address under another key: an address is mailed once, whatever its keys.
`scan_audience` runs the same checks
a batch at a time, for callers that must not hold every row (a preview of a million rows).
Whole-file faults (missing file, bad quoting, a wrong delimiter, a header with stray
spaces) raise at once.
This module never renders, never sends and never writes the ledger.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import unicodedata
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote

import polars as pl
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, DOT_ATOM_TEXT, EMAIL_MAX_LENGTH

from campaign.errors import RecipientDataError
from campaign.manifest import STORE_SUFFIXES, RecipientsSettings
from campaign.models import Address, Problem, Recipient, Skip, SkipReason
from campaign.outputfiles import restore_formula
from campaign.recipients._cells import cell_text
from campaign.recipients._firstrows import FirstRows
from campaign.recipients._listfile import (
    DELIMITERS,
    ListFile,
    ListStart,
    column_values,
    read_table,
    read_text,
    shown_name,
    shown_path,
)
from campaign.redaction import HIDDEN, SECRET_ANYWHERE, holds_secret
from campaign.sendtime import load_zone

__all__ = [
    "BATCH_ROWS",
    "EXPORT_KEY_COLUMN",
    "Audience",
    "AudienceScan",
    "CheckedRow",
    "SuppressionList",
    "comparable_address",
    "describe_key_only_entries",
    "describe_skipped_row",
    "load_audience",
    "load_suppression",
    "load_suppression_list",
    "locate_suppression_entry",
    "matching_form",
    "normalize_address",
    "parse_suppression_entry",
    "same_address_detail",
    "scan_audience",
]

# What a bad row's problem tells the user to do. The reason a row skipped as invalid is recorded with
# has `_SKIPPED_HINT` in its place (`describe_skipped_row`): the flag was given then, or an earlier run's
# skip of the row stands, and advice to pass it again would be wrong.
_OR_SKIP = ", or run with --skip-invalid"
_SKIP_HINT = f"fix or remove the row{_OR_SKIP}"
_SKIPPED_HINT = "fix the row to have it mailed (the next run checks it again)"
_SEVERAL = re.compile(r"[,;\s]+")
# A comment after an entry: '#' after whitespace (a '#' inside an address, a#b@example.com, is kept).
_SUPPRESSION_COMMENT = re.compile(r"\s#.*$", re.S)
_SUPPRESSION_TRIM = ";, \t"  # separators left at the end (or start) of an entry pasted from a list
# A mailto: URL: its address(es) and the ?query to drop (RFC 6068: a '?' in an address is written %3F).
# The address part is percent-encoded (`ann%2Bnews@…`, `bob%40example.com`): decoded before it is read.
_MAILTO = re.compile(r"mailto:([^?\s<>]*)(?:\?[^\s<>]*)?", re.IGNORECASE)
_LOWERED_MAILBOXES = frozenset(name.lower() for name in CASE_INSENSITIVE_MAILBOX_NAMES)


def normalize_address(email: str) -> str:
    """The address as campaign keys, compares and sends it: email_validator's normalised local part, '@',
    and the ASCII (IDNA) form of the domain, each distinct domain checked once.

    The domain is ASCII because the Nylas API refuses any participant address holding a non-ASCII
    character (402), and because one form for both spellings of a domain (`bücher.example`,
    `xn--bcher-kva.example`) makes them one person to duplicates and suppression. For a domain whose
    ASCII form has no `xn--` label (every plain ASCII address) this is exactly
    `validate_email(email, check_deliverability=False).normalized`, so such keys never change. A
    non-ASCII local part is kept as email_validator normalises it: comparable, but not sendable (the
    list's check refuses it).

    Raises the same EmailNotValidError as email_validator. The shortcut covers the common
    address (a plain ASCII dot-atom local part, which email_validator keeps as is, and a
    domain that validates); anything else, and every error, comes from validate_email itself.
    It assumes email_validator's module-wide defaults (STRICT and the rest) as shipped: campaign
    never changes them.
    """
    local, at, domain = email.rpartition("@")
    # DOT_ATOM_TEXT is email_validator's own test for a local part it returns unchanged; it
    # excludes '@', quotes and '<', so the address splits at this '@' for it too.
    if at and DOT_ATOM_TEXT.match(local) and local.lower() not in _LOWERED_MAILBOXES:
        checked = _check_domain(domain)
        # The three lengths email_validator checks (as given, normalised, IDNA ASCII); the local part is ASCII
        if checked is not None and len(local) + 1 + checked[1] <= EMAIL_MAX_LENGTH:
            return f"{local}@{checked[0]}"
    found = validate_email(email, check_deliverability=False)
    return f"{found.local_part}@{found.ascii_domain}"


def comparable_address(value: str) -> str | None:
    """`value` as suppression lists and stores compare addresses (normalised, lower-cased); None: not one."""
    try:
        return normalize_address(value.strip()).lower()
    except EmailNotValidError:
        return None


def matching_form(value: str) -> str:
    """An address read from the API, a report or a webhook as it is matched with the ledger's: its
    `comparable_address` (a provider may write an internationalised domain in Unicode where campaign
    sent ASCII), or, when it does not validate, its text stripped and lower-cased."""
    return comparable_address(value) or value.strip().lower()


@functools.lru_cache(maxsize=4096)
def _check_domain(domain: str) -> tuple[str, int] | None:
    """The domain's ASCII (IDNA) form and the longest of its three forms in UTF-8 bytes, or None if it is
    invalid.

    Validated as the domain of a one-letter address: email_validator checks a domain without
    regard to the local part, apart from the length of the whole address.
    """
    try:
        probe = validate_email(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    forms = (domain, probe.domain, probe.ascii_domain)
    return probe.ascii_domain, max(len(form.encode("utf-8")) for form in forms)


@dataclass(frozen=True, slots=True)
class Audience:
    """The recipient list after validation: who gets mail, who is skipped and why, what is wrong."""

    source: Path
    columns: tuple[str, ...]
    recipients: tuple[Recipient, ...]
    skipped: tuple[Skip, ...]
    problems: tuple[Problem, ...]


def _check_header(name: str, header: list[str], settings: RecipientsSettings) -> None:
    """RecipientDataError for a header templates and the manifest cannot use; names are shown with what
    does not show as itself escaped (`shown_name`: a zero-width space as \\u200b)."""
    for column in header:
        if column != column.strip():
            raise RecipientDataError(
                f"{name}: column {shown_name(column)} has spaces around its name in the header; remove them "
                "(templates and the manifest use the exact name)"
            )
    for index, column in enumerate(header):
        if column in header[:index]:
            raise RecipientDataError(
                f"{name}: column {shown_name(column)} appears twice in the header; rename one"
            )
    wanted: dict[str, str | None] = {
        "email_column": settings.email_column,
        "name_column": settings.name_column,
        "sender_column": settings.sender_column,
        "key_column": settings.key_column,
        "timezone_column": settings.timezone_column,
    }
    for key, wanted_column in wanted.items():
        if wanted_column is None or wanted_column in header:
            continue
        column = wanted_column
        shown = ", ".join(shown_name(c) for c in header[:12]) + (", …" if len(header) > 12 else "")
        hint = ""
        same = [c for c in header if c.lower() == column.lower()]
        # A name that reads as the one wanted but holds an invisible character (a zero-width space).
        hidden = [c for c in header if "".join(char for char in c if char.isprintable()) == column]
        delimiters = [d for d in DELIMITERS if d != settings.delimiter and any(d in c for c in header)]
        if same:
            hint = f"; did you mean {shown_name(same[0])}? (names are case-sensitive)"
        elif hidden:
            hint = f"; {shown_name(hidden[0])} holds characters that do not show (escaped here): remove them"
        elif delimiters:
            toml = json.dumps(delimiters[0])  # TOML basic string: "\t" is a tab there, '\t' is not
            hint = f"; the header contains {toml}: set recipients.delimiter = {toml} in the manifest"
        raise RecipientDataError(
            f"{name}: no column {shown_name(column)} (recipients.{key}); the header has: {shown}{hint}"
        )


def _shown(value: str) -> str:
    """`value` quoted for a message, cut to 80 characters."""
    return repr(value) if len(value) <= 80 else repr(value[:77] + "...")


def _address_problem(value: str, exc: EmailNotValidError) -> str:
    """Why `value` is not one valid address, and what to do."""
    if not value:
        return f"the address is empty; {_SKIP_HINT}"
    shown = _shown(value)
    parts = [p for p in _SEVERAL.split(value) if "@" in p]
    if len(parts) > 1:
        return f"{shown} holds {len(parts)} addresses; put one address per row{_OR_SKIP}"
    return f"{shown} is not a valid address ({str(exc).rstrip('.')}); {_SKIP_HINT}"


def describe_skipped_row(problem: str) -> str:
    """A bad row's `problem` as the reason its row is recorded skipped (as invalid) with: without the
    advice to run with --skip-invalid, which was given, or which the row no longer needs."""
    return problem.replace(_SKIP_HINT, _SKIPPED_HINT).replace(_OR_SKIP, "")


def same_address_detail(first: int) -> str:
    """Why a row is skipped whose address row `first` has under another key (a key column's list)."""
    return f"duplicate of row {first} (same address, other key)"


BATCH_ROWS = 5_000
MAX_NAME_LENGTH = 256  # a display name longer than this is data in the wrong column, not a name


class CheckedRow(NamedTuple):
    """One data row after the per-row checks: a recipient to mail, a deliberate skip, or its problems.

    `fields` holds the row's cells by column name (what a problem page shows). A named tuple, not a
    frozen dataclass: one is made for every row of the list, and a frozen dataclass's `__init__` sets
    each field through `object.__setattr__` (three times the cost).
    """

    row: int
    fields: Mapping[str, object]
    recipient: Recipient | None = None
    skip: Skip | None = None
    problems: tuple[Problem, ...] = ()


class _Candidate(NamedTuple):
    """A row that passed the per-row checks; whether it is a duplicate depends on the rows before it."""

    key: str
    address: Address
    sender: str | None


# What the scan settles for one row: the recipient to mail, a deliberate skip, or the row's problems.
_Outcome = Recipient | Skip | tuple[Problem, ...]


class AudienceScan:
    """A recipient list whose file and header are checked; `batches` runs the per-row checks lazily.

    The file is read a slice at a time and Python objects exist for one batch at a time, so a
    caller that keeps only what it needs (as `campaign run` and `campaign preview` do) runs in
    bounded memory.
    """

    def __init__(
        self,
        settings: RecipientsSettings,
        *,
        sender_names: Collection[str],
        suppressed: SuppressionList,
        start: ListStart | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.source = settings.source
        self._secrets = tuple(secrets)
        self._file = ListFile(self.source, settings.delimiter, "recipient list", start)
        self.last_row = self._file.start.rows  # the number of the last row read so far (blank lines counted)
        header = self._file.header
        _check_header(self.source.name, header, settings)
        self.columns = tuple(header)
        self._settings = settings
        self.suppression = suppressed
        self._suppressed = suppressed.addresses
        self._suppressed_keys = suppressed.keys
        self._senders = frozenset(sender_names)
        self._email_at = header.index(settings.email_column)
        self._name_at = None if settings.name_column is None else header.index(settings.name_column)
        self._sender_at = None if settings.sender_column is None else header.index(settings.sender_column)
        self._key_at = None if settings.key_column is None else header.index(settings.key_column)
        zone_column = settings.timezone_column
        self._zone_at = None if zone_column is None else header.index(zone_column)

    @property
    def row_count(self) -> int:
        """Data rows in the file (blank lines included), after `start` if the scan has one."""
        return self._file.row_count

    @property
    def start(self) -> ListStart:
        """Where the scan starts (`ListStart(0, 0)`: at the first row)."""
        return self._file.start

    @property
    def end(self) -> int:
        """A CSV's byte offset just after the last row the scan read (0 for Parquet, or before reading)."""
        return self._file.end

    def batches(self, size: int = BATCH_ROWS) -> Iterator[list[CheckedRow]]:
        """The checked rows in file order, `size` rows of the file at a time (blank lines left out)."""
        for settled in self._settle(size):
            batch: list[CheckedRow] = []
            for row, fields, outcome in settled:
                if isinstance(outcome, Recipient):
                    batch.append(CheckedRow(row, fields, recipient=outcome))
                elif isinstance(outcome, Skip):
                    batch.append(CheckedRow(row, fields, skip=outcome))
                else:
                    batch.append(CheckedRow(row, fields, problems=outcome))
            yield batch

    def _settle(self, size: int) -> Iterator[list[tuple[int, dict[str, object], _Outcome]]]:
        """`batches` without a CheckedRow per row (what `load_audience` reads): (row, fields, outcome)."""
        first_rows = FirstRows()
        # With a key column, two keys may name one address: it is still mailed once (the first row's).
        # Without one, the key is the address, and the keys' table says it all.
        first_addresses = None if self._key_at is None else FirstRows()
        try:
            yield from self._settle_with(size, first_rows, first_addresses)
        finally:
            first_rows.close()
            if first_addresses is not None:
                first_addresses.close()

    def _settle_with(
        self, size: int, first_rows: FirstRows, first_addresses: FirstRows | None
    ) -> Iterator[list[tuple[int, dict[str, object], _Outcome]]]:
        columns = self.columns
        check_row = self._check_row
        offset = self._file.start.rows
        for part in self._file.frames(size):
            checked: list[tuple[int, tuple[object, ...], _Candidate | Skip | tuple[Problem, ...]]] = []
            keys: list[str] = []
            rows: list[int] = []
            pasted = self._find_secrets(part)
            for row, values in enumerate(zip(*column_values(part), strict=True), start=offset + 1):
                outcome: _Candidate | Skip | tuple[Problem, ...] | None
                if row - offset - 1 in pasted:
                    values, outcome = self._hide_secrets(row, values, pasted[row - offset - 1])
                else:
                    outcome = check_row(row, values)
                if outcome is None:
                    continue
                checked.append((row, values, outcome))
                if isinstance(outcome, _Candidate):
                    keys.append(outcome.key)
                    rows.append(row)
            duplicates = iter(_duplicates(first_rows, first_addresses, checked, keys, rows))
            settled: list[tuple[int, dict[str, object], _Outcome]] = []
            for row, values, found in checked:
                fields = dict(zip(columns, values, strict=True))
                if not isinstance(found, _Candidate):
                    settled.append((row, fields, found))
                    continue
                key, address, sender = found
                detail = next(duplicates)
                if detail is not None:
                    skip = Skip(row, key, address.email, SkipReason.DUPLICATE, detail)
                    settled.append((row, fields, skip))
                else:
                    settled.append((row, fields, Recipient(key, row, address, fields, sender)))
            offset += part.height
            self.last_row = offset
            yield settled

    def _find_secrets(self, part: pl.DataFrame) -> dict[int, list[int]]:
        """The cells of `part` that hold a secret (`holds_secret`: a known secret's value, or a Nylas API
        key), by row index in `part`: the column indexes. polars narrows the search to the rows that may
        hold one (one pass over the batch; it rarely finds any), and `holds_secret` judges their cells."""
        columns = [at for at, dtype in enumerate(part.dtypes) if dtype == pl.String]
        if not columns:
            return {}
        anywhere = ["nyk_", *(secret for secret in self._secrets if len(secret) >= SECRET_ANYWHERE)]
        whole = [secret for secret in self._secrets if len(secret) < SECRET_ANYWHERE]
        maybe = [pl.nth(at).str.contains_any(anywhere) for at in columns]
        if whole:
            maybe += [pl.nth(at).str.strip_chars().is_in(whole) for at in columns]
        found: dict[int, list[int]] = {}
        for index in part.select(pl.any_horizontal(maybe).arg_true()).to_series().to_list():
            row = part.row(index)
            hits = [at for at in columns if row[at] is not None and holds_secret(row[at], self._secrets)]
            if hits:
                found[index] = hits
        return found

    def _hide_secrets(
        self, row: int, values: tuple[object, ...], columns: list[int]
    ) -> tuple[tuple[object, ...], tuple[Problem, ...]]:
        """A row with a secret pasted into it: its cells with each such cell hidden (so no preview, report
        or ledger holds it), and a problem naming each such column. Its other checks wait for the fix."""
        hidden = tuple(HIDDEN if at in columns else value for at, value in enumerate(values))
        message = (
            "holds a secret (an API key, or the value of a secret variable such as NYLAS_API_KEY), "
            f"which would be shown and sent; remove it from the list; {_SKIP_HINT}"
        )
        return hidden, tuple(Problem(row, f'column "{self.columns[at]}"', message) for at in columns)

    def _check_zone(self, row: int, values: tuple[object, ...]) -> tuple[Problem, ...]:
        """A time zone cell is an IANA name, or empty (the sender's zone)."""
        if self._zone_at is None or not (zone := str(values[self._zone_at]).strip()):
            return ()
        try:
            load_zone(zone)
        except ValueError as exc:
            message = f"{exc}, or leave it empty for the sender's zone; {_SKIP_HINT}"
            return (Problem(row, f'column "{self._settings.timezone_column}"', message),)
        return ()

    def _check_row(  # noqa: C901 - one check of the row's cells after another, inline: it runs for every row of a list of millions, and each helper would cost a call a row
        self, row: int, values: tuple[object, ...]
    ) -> _Candidate | Skip | tuple[Problem, ...] | None:
        """The checks that need only this row: None for a blank line, a skip or problems when settled here."""
        settings = self._settings
        cell = values[self._email_at]
        # Surrounding whitespace (spreadsheet residue, NBSP included) is harmless; inner whitespace is not.
        email = cell.strip() if isinstance(cell, str) else str(cell)
        if not email and all(v == "" for v in values):
            return None  # a blank line: counted as a row, but not a recipient
        found: list[Problem] = []
        try:
            normalized = normalize_address(email)
        except EmailNotValidError as exc:
            normalized = ""
            found.append(Problem(row, f'column "{settings.email_column}"', _address_problem(email, exc)))
        else:
            # The domain is ASCII by now; a local part that is not can never be sent (Nylas answers 402),
            # so it is refused here rather than failing at send time. (isascii is O(1) on a str.)
            if not normalized.isascii():
                message = (
                    f"{_shown(email)} has non-ASCII characters before the @, and the Nylas API cannot "
                    f"send to such an address; {_SKIP_HINT}"
                )
                found.append(Problem(row, f'column "{settings.email_column}"', message))
        sender = None if self._sender_at is None else cell_text(values[self._sender_at])
        if sender is not None and sender not in self._senders:
            senders = self._senders
            close = difflib.get_close_matches(sender, sorted(senders), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = (
                f"names sender {sender!r}, which the manifest does not define "
                f"(senders: {', '.join(sorted(senders)) or 'none'}); {hint}{_SKIP_HINT}"
            )
            found.append(Problem(row, f'column "{settings.sender_column}"', message))
        lowered = key = normalized.lower()
        if self._key_at is not None:
            key = str(values[self._key_at]).strip()
            if not key:
                message = f"the key is empty; every row needs its own key in this column; {_SKIP_HINT}"
                found.append(Problem(row, f'column "{settings.key_column}"', message))
        name = None if self._name_at is None else cell_text(values[self._name_at])
        if name is not None and len(name) > MAX_NAME_LENGTH:
            message = (
                f"the display name is {len(name):,} characters, more than {MAX_NAME_LENGTH}; "
                f"check that the column holds names; {_SKIP_HINT}"
            )
            found.append(Problem(row, f'column "{settings.name_column}"', message))
        found.extend(self._check_zone(row, values))
        if found:
            return tuple(found)
        if lowered in self._suppressed or key in self._suppressed_keys:
            return Skip(row, key, normalized, SkipReason.SUPPRESSED, "on a suppression list")
        return _Candidate(key, Address(normalized, name), sender)


def _duplicates(
    first_rows: FirstRows,
    first_addresses: FirstRows | None,
    checked: Sequence[tuple[int, tuple[object, ...], object]],
    keys: Sequence[str],
    rows: Sequence[int],
) -> list[str | None]:
    """For each candidate of a batch (`keys`, `rows`: theirs, in order): why it duplicates an earlier row,
    or None. A key seen before is a duplicate; so, with `first_addresses` (a key column's list), is an
    address seen before among the rows first with their key (a row skipped for its key is not mailed,
    so it claims no address)."""
    found: list[str | None] = [
        None if first == row else f"duplicate of row {first}"
        for row, first in zip(rows, first_rows.resolve(keys, rows), strict=True)
    ]
    if first_addresses is None:
        return found
    candidates = [outcome for _, _, outcome in checked if isinstance(outcome, _Candidate)]
    kept = [at for at, detail in enumerate(found) if detail is None]
    addresses = [candidates[at].address.email.lower() for at in kept]
    for at, first in zip(kept, first_addresses.resolve(addresses, [rows[at] for at in kept]), strict=True):
        if first != rows[at]:
            found[at] = same_address_detail(first)
    return found


def scan_audience(
    settings: RecipientsSettings,
    *,
    sender_names: Collection[str],
    start: ListStart | None = None,
    secrets: Sequence[str] = (),
) -> AudienceScan:
    """Open the recipient list and check its header and suppression files; rows are checked by `batches`
    (from `start`, for a list that only grew since its earlier rows were checked). A row with a cell
    holding one of the `secrets` (their values) or a Nylas API key is a problem, and that cell hidden."""
    suppressed = load_suppression_list(settings.suppress)
    return AudienceScan(
        settings, sender_names=sender_names, suppressed=suppressed, start=start, secrets=secrets
    )


def load_audience(
    settings: RecipientsSettings, *, sender_names: Collection[str], secrets: Sequence[str] = ()
) -> Audience:
    """Read, validate, de-duplicate and suppress the recipient list named by `settings`."""
    scan = scan_audience(settings, sender_names=sender_names, secrets=secrets)
    recipients: list[Recipient] = []
    skipped: list[Skip] = []
    problems: list[Problem] = []
    for settled in scan._settle(BATCH_ROWS):
        for _, _, outcome in settled:
            if isinstance(outcome, Recipient):
                recipients.append(outcome)
            elif isinstance(outcome, Skip):
                skipped.append(outcome)
            else:
                problems.extend(outcome)
    return Audience(scan.source, scan.columns, tuple(recipients), tuple(skipped), tuple(problems))


# The column of an export (`campaign suppress export`) that holds an entry's recipient key.
EXPORT_KEY_COLUMN = "recipient_key"


def _suppression_values(path: Path) -> list[tuple[str, str, str]]:
    """(where, raw entry, recipient key) of one suppression file: a column of a .csv/.parquet, or a text
    file's lines. The key is "" but in a .csv/.parquet with both an `email` and a `recipient_key` column
    (an export: a row with an empty `email` is an entry that holds a key and no address)."""
    if path.suffix.lower() not in {".csv", ".parquet"}:
        lines = read_text(path, "suppression list").splitlines()
        return [
            (f"line {number}", line, "")
            for number, line in enumerate(lines, start=1)
            if not line.lstrip().startswith("#")
        ]
    header, frame = read_table(path, None, "suppression list")  # a header naming no column is refused
    if not frame.height and path.suffix.lower() == ".csv":
        _check_nothing_unread(path)
    lowered = [h.strip().lower() for h in header]
    index = lowered.index("email") if "email" in lowered else 0
    column = [str(value) for value in column_values(frame.select(frame.columns[index]))[0]]
    keys = [""] * len(column)
    if "email" in lowered and EXPORT_KEY_COLUMN in lowered:
        found = column_values(frame.select(frame.columns[lowered.index(EXPORT_KEY_COLUMN)]))[0]
        # The export neutralised a key that starts like a formula ('+4915…): the store holds it bare.
        keys = [str(key) if path.suffix.lower() == ".parquet" else restore_formula(str(key)) for key in found]
    entries = list(zip(column, keys, strict=True))
    if path.suffix.lower() == ".parquet":
        return [(f"row {number}", value, key) for number, (value, key) in enumerate(entries, start=1)]
    # A headerless one-column file: its first line is an address, not a column name.
    if "@" in header[index]:
        entries.insert(0, (header[index], ""))
        start = 1
    else:
        start = 2
    # CSV line numbers, counting the header line (a file's first line when it is an entry).
    return [(f"line {number}", value, key) for number, (value, key) in enumerate(entries, start=start)]


def _check_nothing_unread(path: Path) -> None:
    """RecipientDataError if a CSV suppression list from which no row was read holds lines after its
    header: an opt-out file misread as empty would mail everyone in it (CR-only line ends, a blank
    first line and a header naming no column are refused where the file is read; this is the net)."""
    lines = [line for line in read_text(path, "suppression list").splitlines() if line.strip()]
    if len(lines) > 1:
        raise RecipientDataError(
            f"{shown_path(path.name)}: holds {len(lines)} lines, but no entry could be read after its "
            "header; save it as CSV UTF-8 with the header on line 1 (e.g. email) and one entry a line"
        )


_FIX_ENTRY = (
    "correct it (e.g. ann@example.com or Ann <ann@example.com>), or start the line with # to keep it as "
    "a comment"
)


@dataclass(frozen=True, slots=True)
class SuppressionList:
    """Who suppression files list: lower-cased normalised `addresses`, and the recipient `keys` of the
    entries that hold a key and no address (an export's rows with an empty `email`: opt-outs of a
    key column's campaign), with `key_only`, how many such rows each file holding some has (its name)."""

    addresses: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()
    key_only: tuple[tuple[str, int], ...] = ()

    def lists(self, recipient: Recipient) -> bool:
        """Whether `recipient` is listed: by its address, or by its key."""
        # A recipient's address is normalised already: compared lower-cased, as the plan compares it.
        return recipient.address.email.lower() in self.addresses or recipient.key in self.keys


def describe_key_only_entries(settings: RecipientsSettings, suppression: SuppressionList) -> tuple[str, ...]:
    """What a preview and a run say of the entries that hold only a recipient key, in a campaign without
    a key column: one note per file holding some. Such a campaign knows its recipients by address (each
    one's key is its address), so they match no one; with a key column, nothing to say."""
    if settings.key_column is not None:
        return ()
    return tuple(
        f"{shown_path(name)}: {'1 row' if count == 1 else f'{count:,} rows'} with a recipient_key and no "
        f"email {'matches' if count == 1 else 'match'} no one: without recipients.key_column this campaign "
        "knows its recipients by address; set key_column to the column those keys come from, or give "
        f"{'that row its address' if count == 1 else 'those rows their addresses'}"
        for name, count in suppression.key_only
    )


def load_suppression(paths: Sequence[Path | str]) -> frozenset[str]:
    """The lower-cased normalised addresses listed in the suppression files (`load_suppression_list`)."""
    return load_suppression_list(paths).addresses


def load_suppression_list(paths: Sequence[Path | str]) -> SuppressionList:
    """The addresses, and the keys of the entries without one, listed in the suppression files.

    RecipientDataError (naming the file and line) for an entry that holds no address, or one that
    does not validate: an opt-out that cannot be read is never dropped silently, and one kept as
    written could never match a recipient. A row whose `email` is empty is an entry only when an
    export's `recipient_key` column gives it a key; else it is blank, as a blank line is.
    """
    found: set[str] = set()
    keys: set[str] = set()
    key_only: list[tuple[str, int]] = []
    for path in paths:
        if isinstance(path, str) or path.suffix.lower() in STORE_SUFFIXES:
            continue  # an unsubscribe store (a file, or a database's URL): preflight reads it
        in_file = 0
        for where, value, key in _suppression_values(path):
            try:
                addresses = parse_suppression_entry(value)
            except RecipientDataError as exc:
                raise RecipientDataError(f"{shown_path(path.name)}: {where}: {exc}; {_FIX_ENTRY}") from exc
            if addresses is None:
                message = f"{shown_path(path.name)}: {where} holds no email address; {_FIX_ENTRY}"
                raise RecipientDataError(message)
            found.update(addresses)
            # Compared as the list's keys are: stripped (`suppress add --key` strips them too).
            if not addresses and (key := key.strip()):
                keys.add(key)
                in_file += 1
        if in_file:
            key_only.append((path.name, in_file))
    return SuppressionList(frozenset(found), frozenset(keys), tuple(key_only))


def locate_suppression_entry(path: Path, holds: Callable[[str], bool]) -> str | None:
    """Where in the suppression file `path` the first entry stands of which `holds` is true for what it
    gives: its addresses (lower-cased, and in the form they are compared in), or, for an entry without
    one, its recipient key. "line 3" (a text or CSV file's line, as its errors name them), "row 2" (a
    Parquet file's); None if no entry gives such a value."""
    for where, value, key in _suppression_values(path):
        try:
            addresses = parse_suppression_entry(value) or ()
        except RecipientDataError:
            continue  # `load_suppression_list` refuses the file for it: it gives nothing
        given = [form for address in addresses for form in (address, comparable_address(address)) if form]
        if any(map(holds, given)) or (not addresses and key.strip() and holds(key.strip())):
            return where
    return None


def parse_suppression_entry(value: str) -> tuple[str, ...] | None:
    """The lower-cased normalised addresses in one suppression entry; () for a blank one, None if it holds
    none, RecipientDataError ("'…' is not a valid address: why") if one does not validate.

    Understands `ann@example.com`, `Ann <ann@example.com>`, `"ann@example.com"`, `mailto:` (its
    `?query` dropped, its address percent-decoded as RFC 6068 writes it: `mailto:ann%2Bnews@…`),
    trailing `;`/`,`, a trailing `# comment`, several addresses separated by commas, a domain's final
    dot (`eve@example.org.`), and invisible format characters pasted along (a zero-width space, a
    BOM, direction marks), which are removed.
    """
    # Only a mailto: address is percent-decoded: in a plain address '%' is a legal local-part character.
    # A decoded one may hold a format character too (%E2%80%8B): removed as from the rest.
    text = _MAILTO.sub(lambda found: unquote(found.group(1)), _without_format_characters(value))
    text = _without_format_characters(text)
    text = _SUPPRESSION_COMMENT.sub("", text).strip().strip(_SUPPRESSION_TRIM)
    if not text:
        return ()
    found: list[str] = []
    for _, address in getaddresses([text]):
        address = address.strip().strip("'")
        if not address:
            continue
        # getaddresses glues words together ("ann@example.com left" -> "ann@example.comleft"):
        # an address that is not in the entry as written is a misreading, not an address.
        if "@" not in address or address.lower() not in text.lower():
            return None
        # The root's final dot names the same domain, but email_validator refuses it.
        address = address.removesuffix(".")
        try:
            found.append(normalize_address(address).lower())
        except EmailNotValidError as exc:
            # Kept as written, it could never match a recipient (they are validated): the opt-out would
            # be lost without a word.
            reason = str(exc).rstrip(".")
            raise RecipientDataError(f"{_shown(address)} is not a valid address: {reason}") from exc
    return tuple(found) or None


def _without_format_characters(text: str) -> str:
    """`text` without invisible format characters (Unicode category Cf: U+200B, U+FEFF, U+200E, …)."""
    if text.isascii():  # most entries: nothing to look at
        return text
    return "".join(char for char in text if unicodedata.category(char) != "Cf")
