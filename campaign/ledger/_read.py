"""The ledger's read side: one recipient's record as a value, and the queries status and reports need.

Read-only: nothing here changes the file (every write is in `ledger.py`, which
builds on `LedgerReader`). A `sqlite3.Error` becomes a `LedgerError` naming the file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from campaign.errors import LedgerError
from campaign.ledger._leases import WorkerView
from campaign.ledger._values import DueStep, SentMessage, SentStep, StepCounts
from campaign.models import FIRST_STEP, RowState, SkipReason

__all__ = ["ErrorGroup", "JournalEntry", "LedgerReader", "LedgerRow", "PlannedRow"]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One recipient's record (times are ISO 8601 UTC strings, None until they happen)."""

    key: str
    row: int
    email: str
    sender: str | None
    state: RowState
    reason: str | None  # why a row is skipped, e.g. "suppressed: in unsubscribed.txt"
    attempts: int  # send requests whose answer (or failure) was recorded
    attempt_no: int  # part of the idempotency key; grows after each definite "not sent"
    idempotency_key: str | None
    key_issued_at: str | None  # when the current key was first claimed (Nylas replays it for 1 h)
    key_uses: int  # earlier requests that may have used the current key (0: it is unused)
    claimed_via: str | None  # the mailbox (grant, or `domain:…`) the key was issued for; None before v5
    first_claimed_at: str | None
    claimed_at: str | None  # the latest claim
    subject: str | None  # the subject as last sent (reconcile matches it in the Sent folder)
    message_id: str | None
    thread_id: str | None  # the thread the sent message is in (from the send answer)
    request_id: str | None
    replayed: bool  # the last answer came from Nylas's idempotency cache
    error_type: str | None
    error_status: int | None
    error_message: str | None
    note: str | None  # why reconcile or retry last moved the row
    listed: bool  # still in the recipient list (rows removed from it are left alone)
    created_at: str
    updated_at: str
    sent_at: str | None
    step: str = "message"  # "message" (step 1) or a follow-up's name
    recipient: str | None = None  # a follow-up's recipient key (step 1: `key` is it)
    previous: str | None = None  # a follow-up's: the ledger key of the step it answers
    due_at: str | None = None  # not to be claimed before (None: at once)
    auto_reply: str | None = None  # an auto-reply seen before this step, which did not stop it

    @property
    def recipient_key(self) -> str:
        """The recipient's key (for step 1, the row's own key)."""
        return self.recipient if self.recipient is not None else self.key


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A notable change to the campaign as a whole (content changed, retry, reconcile)."""

    at: str
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class ErrorGroup:
    """Failed or unknown rows that share an HTTP status, an error type and a state."""

    status: int | None
    error_type: str | None
    state: RowState
    count: int
    first: tuple[int, str]  # (row, key) of its first row in list order
    latest: tuple[str, int, str, str] | None  # (updated_at, row, key, message or note) of its latest row


ROW_COLUMNS: tuple[str, ...] = tuple(LedgerRow.__dataclass_fields__)

# The rows `error_groups` groups: those not sent (failed, unknown), or with `waiting` the open rows whose
# last try failed (an outcome that is not "sent" always leaves an error type: the partial index
# `recipients_erred` holds them).
FAILED_ROWS = "state IN ('failed', 'unknown')"
WAITING_ROWS = "state IN ('pending', 'inflight') AND error_type IS NOT NULL AND listed"  # removed: left alone
# Each group's size and first row in list order (ties in `status`'s ranking of causes keep that order).
_ERROR_GROUPS = """
    SELECT error_status, error_type, state, total, row, key FROM (
        SELECT error_status, error_type, state, row, key, COUNT(*) OVER cause AS total,
            ROW_NUMBER() OVER (cause ORDER BY row, key) AS place
        FROM recipients WHERE {rows}
        WINDOW cause AS (PARTITION BY error_status, error_type, state)
    ) WHERE place = 1
"""
# Each group's latest row that says something: the last updated, the last in list order among equals.
_LATEST_ERRORS = """
    SELECT error_status, error_type, state, updated_at, row, key, said FROM (
        SELECT error_status, error_type, state, updated_at, row, key, said, ROW_NUMBER() OVER (
            PARTITION BY error_status, error_type, state ORDER BY updated_at DESC, row DESC, key DESC
        ) AS place
        FROM (
            SELECT *, COALESCE(NULLIF(error_message, ''), NULLIF(note, '')) AS said FROM recipients
            WHERE {rows}
        ) WHERE said IS NOT NULL
    ) WHERE place = 1
"""


# `sample_emails` picks its addresses from this many rows of a state, looking for them first among
# this many of the table's first rows.
_SAMPLED_FROM = 1000
_SCANNED_FIRST = 20_000
# Per sender, the listed rows of a step that are pending or in flight (and due at a time, if given).
# Answered from the recipients_listed index alone (a test checks the query plan).
OPEN_COUNTS = (
    "SELECT sender, COUNT(*) FROM recipients WHERE state IN ('pending', 'inflight') AND listed = 1 "
    "AND step = ? AND (? IS NULL OR state = 'inflight' OR due_at IS NULL OR due_at <= ?) "
    "GROUP BY sender"
)

# The ledger's meta keys; only this package names them.
PLAN_STAMP = "plan_stamp"
RULES_STAMP = "rules_stamp"
LIST_EXTENT = "list_extent"
CONTENT_FINGERPRINT = "content_fingerprint"
KEY_SCHEME = "key_scheme"
READ_STORES = "read_stores"
PARKED_PREFIX = "parked_until:"
TIMING_PREFIX = "timing:"
STEP_ORDER = "step_order"


def content_key(step: str) -> str:
    """The meta key of a step's content fingerprint (step 1's is the one campaigns always had)."""
    return CONTENT_FINGERPRINT if step == FIRST_STEP else f"{CONTENT_FINGERPRINT}:{step}"


class PlannedRow(NamedTuple):
    """A recipient the plan wants mailed, as the ledger stores it; `inflight` when read back in flight.

    A named tuple, not a frozen dataclass (three times the cost to make): a plan makes two for every
    row of the list (checked, then read back from the spool), and a send reads one for every message.
    """

    key: str
    row: int
    email: str
    sender: str
    inflight: bool = False
    due_at: datetime | None = None  # not to be sent before (step 1's `deliver_at`); None: at once
    cells: str | None = None  # the list row's cells as it was checked (`recipients.encode_cells`)
    cursor: int = 0  # read back: its place in the ledger (`open_rows_of`'s `after` for the next page)


class LedgerReader:
    """Queries over one open ledger connection; the lock serialises them with the writer's transactions."""

    def __init__(self, connection: sqlite3.Connection, *, path: Path) -> None:
        self._db = connection
        self._path = path
        self._logs_mailboxes: bool | None = (
            None  # whether send_log has `via` (a read-only open may predate it)
        )
        # Whether `recipients_address` exists (a read-only open may predate it).
        self._indexes_addresses: bool | None = None
        # Whether the `mailboxes` table exists (a read-only open may predate it).
        self._knows_addresses: bool | None = None
        # Re-entrant: a batch of writes holds it while each write takes it again.
        self._lock = threading.RLock()

    @property
    def path(self) -> Path:
        """Where the ledger file is."""
        return self._path

    @property
    def where(self) -> str:
        """Where the ledger file is, for messages."""
        return str(self._path)

    def listed_rows(self, keys: Iterable[str]) -> dict[str, int]:
        """Key -> its row in the list, for the rows of step 1 of `keys` that the last plan listed."""
        rows = self._read(
            f"SELECT r.key, r.row FROM {_BY_KEYS} WHERE r.listed = 1 AND r.step = ?",
            (_keys(keys), FIRST_STEP),
        )
        return {str(key): int(row) for key, row in rows}

    def listed_addresses(self, emails: Iterable[str]) -> dict[str, int]:
        """Lower-cased address -> the first row of step 1 that the last plan listed with it (compared
        without case), for `emails` (lower-cased): a batch's lookups, never a pass over the ledger."""
        query = self._by_address().format(asked=_ASKED_ADDRESSES, column="row", where="r.listed = 1")
        return first_of(self._read(query, (_keys(emails),)))

    def mailed_keys(self, asked: Iterable[tuple[str, str]]) -> dict[str, str]:
        """For each (key, lower-cased address) asked: another key of step 1 whose row was mailed to that
        address (sent, in flight or unknown), compared without case; key -> that key (the least, if
        several), for the keys that have one."""
        where = f"r.key != a.key AND r.state IN {_MAILED}"
        query = self._by_address().format(asked=_ASKED_PAIRS, column="key", where=where)
        return first_of(self._read(query, (json.dumps(list(asked)),)))

    def mailed_addresses(self, keys: Iterable[str]) -> dict[str, str]:
        """Key -> the address its row of step 1 was mailed at (sent, or unknown), for the rows of `keys`
        that were: by key, a batch at a time."""
        rows = self._read(
            f"SELECT r.key, r.email FROM {_BY_KEYS} WHERE r.step = ? AND r.state IN ('sent', 'unknown')",
            (_keys(keys), FIRST_STEP),
        )
        return {str(key): str(email) for key, email in rows}

    def _by_address(self) -> str:
        """The query of step 1's rows at a batch of addresses: through `recipients_address`, or, in a
        ledger read before a run added it, one pass over the table a batch (never one an address)."""
        if self._indexes_addresses is None:
            found = self._read(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'recipients_address'"
            )
            self._indexes_addresses = bool(found)
        return _BY_ADDRESS if self._indexes_addresses else _BY_ADDRESS_SCANNED

    def key_cells(self, keys: Iterable[str]) -> dict[str, str]:
        """Key -> its list row's cells as last checked (`recipients.encode_cells`), for the rows of `keys`
        that have them."""
        rows = self._read(f"SELECT r.key, r.cells FROM {_BY_KEYS} WHERE r.cells IS NOT NULL", (_keys(keys),))
        return {str(key): str(cells) for key, cells in rows}

    def invalid_cells(self, keys: Iterable[str]) -> dict[str, str]:
        """Key -> the cells a row of `keys` skipped as invalid was skipped with (`Skip.cells`)."""
        rows = self._read(
            f"SELECT r.key, r.cells FROM {_BY_KEYS} WHERE r.state = 'skipped' AND r.cells IS NOT NULL "
            "AND substr(r.reason, 1, ?) = ?",
            (_keys(keys), len(INVALID_REASON), INVALID_REASON),
        )
        return {str(key): str(cells) for key, cells in rows}

    def duplicate_skips(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` are of rows skipped as a duplicate: a check decides them again (`record_plan`)."""
        rows = self._read(
            f"SELECT r.key FROM {_BY_KEYS} WHERE r.state = 'skipped' AND substr(r.reason, 1, ?) = ?",
            (_keys(keys), len(DUPLICATE_REASON), DUPLICATE_REASON),
        )
        return {str(key) for (key,) in rows}

    def _meta(self, key: str) -> str | None:
        found = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(found[0][0]) if found else None

    def _metas_under(self, prefix: str) -> dict[str, str]:
        rows = self._read("SELECT key, value FROM meta WHERE key LIKE ? AND value != ''", (f"{prefix}%",))
        return {str(key).removeprefix(prefix): str(value) for key, value in rows}

    def sent_message_ids(self, message_ids: Iterable[str]) -> set[str]:
        """Which of `message_ids` are messages this ledger recorded as sent (one pass over the ledger)."""
        wanted = json.dumps(list(message_ids))
        query = "SELECT message_id FROM recipients WHERE message_id IN (SELECT value FROM json_each(?))"
        return {str(message_id) for (message_id,) in self._read(query, (wanted,))}

    def sent_messages_to(self, emails: Iterable[str]) -> list[SentMessage]:
        """The rows sent to any of `emails` (compared without case; one pass over the ledger)."""
        wanted = json.dumps([email.lower() for email in emails])
        query = (
            "SELECT key, email, sent_at, message_id FROM recipients WHERE state = 'sent' "
            "AND lower(email) IN (SELECT value FROM json_each(?))"
        )
        return [
            SentMessage(str(key), str(email), _moment(sent_at), message_id)
            for key, email, sent_at, message_id in self._read(query, (wanted,))
        ]

    def first_claim(self) -> datetime | None:
        """When the campaign's first send was claimed (None: nothing was ever sent)."""
        found = self._read("SELECT MIN(first_claimed_at) FROM recipients")
        return datetime.fromisoformat(found[0][0]) if found and found[0][0] else None

    def latest_claim(self, state: RowState) -> datetime | None:
        """When the most recently claimed row in `state` was last claimed (None: no such row)."""
        found = self._read("SELECT MAX(claimed_at) FROM recipients WHERE state = ?", (state.value,))
        return datetime.fromisoformat(found[0][0]) if found and found[0][0] else None

    def started_row(self) -> tuple[str, str] | None:
        """(key, address) of one row a send was ever started for, or None.

        Claimed once is enough: a row `retry --unknown` put back to pending may have been mailed.
        """
        found = self._read(
            "SELECT key, email FROM recipients WHERE state IN ('inflight', 'sent', 'failed', 'unknown')"
            " OR first_claimed_at IS NOT NULL LIMIT 1"
        )
        return (str(found[0][0]), str(found[0][1])) if found else None

    def assigned_senders(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """The sender each recipient already in the ledger is assigned to (of `keys`, if given: a batch
        of a streamed list looks up its own rows, so no structure grows with the ledger)."""
        if keys is None:
            rows = self._read(
                "SELECT key, sender FROM recipients WHERE sender IS NOT NULL AND step = ?", (FIRST_STEP,)
            )
        else:
            rows = self._read(
                f"SELECT r.key, r.sender FROM {_BY_KEYS} WHERE r.sender IS NOT NULL", (_keys(keys),)
            )
        return {str(key): str(sender) for key, sender in rows}

    def assigned_counts(self) -> dict[str, int]:
        """How many recipients the ledger assigns to each sender."""
        rows = self._read(
            "SELECT sender, COUNT(*) FROM recipients WHERE sender IS NOT NULL AND step = ? GROUP BY sender",
            (FIRST_STEP,),
        )
        return {str(sender): int(count) for sender, count in rows}

    def rows(
        self, *, states: Iterable[RowState] | None = None, listed: bool | None = None
    ) -> Iterator[LedgerRow]:
        """Every row (or those in `states`; or only those still / no longer in the list), in list order."""
        query = "SELECT " + ", ".join(ROW_COLUMNS) + " FROM recipients WHERE 1 = 1"
        params: tuple[object, ...] = ()
        if states is not None:
            names = tuple(state.value for state in states)
            query += f" AND state IN ({', '.join('?' for _ in names)})"
            params += names
        if listed is not None:
            query += " AND listed = ?"
            params += (int(listed),)
        for values in self._read(query + " ORDER BY row, key", params):
            yield _to_row(values)

    def row(self, key: str) -> LedgerRow:
        """The row of `key` (LedgerError if there is none)."""
        found = self._read("SELECT " + ", ".join(ROW_COLUMNS) + " FROM recipients WHERE key = ?", (key,))
        if not found:
            message = f"{self._path}: no recipient {key!r} in the ledger"
            raise LedgerError(message)
        return _to_row(found[0])

    def counts(self, *, listed: bool | None = None, step: str | None = None) -> dict[RowState, int]:
        """How many rows are in each state (every state present, zeros included); of one step if given."""
        params: tuple[object, ...]
        where, params = " WHERE 1 = 1", ()
        if listed is not None:
            where, params = where + " AND listed = ?", (int(listed),)
        if step is not None:
            where, params = where + " AND step = ?", (*params, step)
        found = {
            str(state): int(count)
            for state, count in self._read(
                f"SELECT state, COUNT(*) FROM recipients{where} GROUP BY state", params
            )
        }
        return {state: found.get(state.value, 0) for state in RowState}

    def counts_per_sender(self) -> dict[str | None, dict[RowState, int]]:
        """Per sender (None: rows no sender was assigned), how many rows are in each state; one index scan."""
        result: dict[str | None, dict[RowState, int]] = {}
        query = "SELECT state, sender, COUNT(*) FROM recipients GROUP BY state, sender"
        for state, sender, count in self._read(query):
            name = None if sender is None else str(sender)
            result.setdefault(name, dict.fromkeys(RowState, 0))[RowState(state)] = int(count)
        return result

    def sample_emails(
        self, states: Iterable[RowState], *, listed: bool | None = None, limit: int = 3
    ) -> dict[RowState, list[str]]:
        """Up to `limit` addresses per state, in list order (for messages that name a few): the first in
        list order of the state's first `_SAMPLED_FROM` rows recorded (of all of them, when rows were
        recorded in list order, as a run records them)."""
        in_state = "state = ?" + ("" if listed is None else f" AND listed = {int(listed)}")
        pick = "ORDER BY row, key LIMIT ?"
        ((start,),) = self._read("SELECT MIN(rowid) FROM recipients")
        samples = {}
        for state in states:
            last = None if start is None else self._sampled_early(in_state, state, start)
            if last is not None:  # they are the state's rows up to `last`
                query = f"SELECT email FROM recipients NOT INDEXED WHERE rowid <= ? AND {in_state} {pick}"
                params: tuple[object, ...] = (last, state.value, limit)
            else:
                # From the state index alone (rowids): an index that kept rows in list order would cost
                # every claim and outcome its upkeep (the send path: 15 %).
                query = (
                    "SELECT email FROM recipients WHERE rowid IN ("
                    f"SELECT rowid FROM recipients WHERE {in_state} ORDER BY rowid LIMIT {_SAMPLED_FROM}"
                    f") {pick}"
                )
                params = (state.value, limit)
            samples[state] = [str(email) for (email,) in self._read(query, params)]
        return samples

    def _sampled_early(self, in_state: str, state: RowState, start: int) -> int | None:
        """The rowid of the state's `_SAMPLED_FROM`-th row when it is among the table's first
        `_SCANNED_FIRST` rows (from rowid `start`), else None. Most samples are of a state most rows
        are in (a fresh campaign's pending ones): read in rowid order they are found at once, where the
        state index would sort them all (a million, most of `campaign status`'s second)."""
        query = (
            "SELECT COUNT(*), MAX(rowid) FROM ("
            f"SELECT rowid FROM recipients NOT INDEXED WHERE rowid <= ? AND {in_state} "
            f"ORDER BY rowid LIMIT {_SAMPLED_FROM})"
        )
        ((found, last),) = self._read(query, (start + _SCANNED_FIRST - 1, state.value))
        return int(last) if found == _SAMPLED_FROM else None

    def counts_by_sender(self) -> dict[str, dict[RowState, int]]:
        """Per sender, how many rows are in each state."""
        return {name: counts for name, counts in self.counts_per_sender().items() if name is not None}

    def sent_recipients_since(
        self, sender: str, since: float, *, via: str | None = None, address: str | None = None
    ) -> list[tuple[float, int]]:
        """(Unix time, recipients) of each send by `sender` since `since`, oldest first; with `via` (its
        mailbox), each send through that mailbox instead, whichever sender it was logged under (and
        those logged before the log kept mailboxes, by `sender`); with `address` too (the address `via`
        sends as), each send through any grant recorded as sending as it (`record_mailbox_addresses`)."""
        if via is None:
            query = (
                "SELECT sent_at, recipients FROM send_log WHERE sender = ? AND sent_at > ? ORDER BY sent_at"
            )
            return [(float(at), int(n)) for at, n in self._read(query, (sender, since))]
        vias, asked = self._vias_of(via, address)
        query = (
            f"SELECT sent_at, recipients FROM send_log WHERE via IN {vias} AND via IS NOT NULL "
            "AND sent_at > ? UNION ALL "
            "SELECT sent_at, recipients FROM send_log WHERE via IS NULL AND sender = ? AND sent_at > ? "
            "ORDER BY sent_at"
        )
        return [(float(at), int(n)) for at, n in self._read(query, (*asked, since, sender, since))]

    def sent_recipients_total(
        self, sender: str, since: float, *, via: str | None = None, address: str | None = None
    ) -> int:
        """How many recipients `sender` (with `via`, its mailbox, and `address`, every grant sending as
        it) sent to since `since`: the sum of `sent_recipients_since`. A ledger from before the log kept
        mailboxes counts by `sender`."""
        if via is None or not self._keeps_mailboxes():
            query = "SELECT COALESCE(SUM(recipients), 0) FROM send_log WHERE sender = ? AND sent_at > ?"
            return int(self._read(query, (sender, since))[0][0])
        vias, asked = self._vias_of(via, address)
        query = (
            "SELECT COALESCE(SUM(recipients), 0) FROM ("
            f"SELECT recipients FROM send_log WHERE via IN {vias} AND via IS NOT NULL AND sent_at > ? "
            "UNION ALL "
            "SELECT recipients FROM send_log WHERE via IS NULL AND sender = ? AND sent_at > ?)"
        )
        return int(self._read(query, (*asked, since, sender, since))[0][0])

    def _vias_of(self, via: str, address: str | None) -> tuple[str, tuple[str, ...]]:
        """The mailboxes a budget counts, as SQL to follow IN, and its parameters: `via`, and with
        `address` every grant recorded as sending as it (a ledger from before that table: `via` alone).
        `via IS NOT NULL` beside the IN lets the partial index `send_log_via` serve each of them."""
        if address is None or not self._links_mailboxes():
            return "(?)", (via,)
        return "(SELECT ? UNION SELECT via FROM mailboxes WHERE address = ?)", (via, address)

    def _keeps_mailboxes(self) -> bool:
        if self._logs_mailboxes is None:
            columns = self._read("SELECT name FROM pragma_table_info('send_log')")
            self._logs_mailboxes = ("via",) in {tuple(column) for column in columns}
        return self._logs_mailboxes

    def _links_mailboxes(self) -> bool:
        if self._knows_addresses is None:
            found = self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mailboxes'")
            self._knows_addresses = bool(found)
        return self._knows_addresses

    def skip_causes(self) -> dict[str, int]:
        """How many rows are skipped per cause: the reason up to its first colon ("unknown" if none)."""
        query = (
            "SELECT CASE WHEN instr(reason, ':') > 0 THEN substr(reason, 1, instr(reason, ':') - 1) "
            "ELSE reason END AS cause, COUNT(*) "
            "FROM (SELECT COALESCE(NULLIF(reason, ''), 'unknown') AS reason FROM recipients "
            "WHERE state = 'skipped') GROUP BY cause"
        )
        return {str(cause): int(count) for cause, count in self._read(query)}

    def error_groups(self, *, waiting: bool = False) -> list[ErrorGroup]:
        """Failed and unknown rows grouped by HTTP status, error type and state, with their first and
        latest rows (the latest among those with an error message or a note). With `waiting`, the open
        rows (pending, in flight) whose last try failed instead: why they are still to send."""
        rows = WAITING_ROWS if waiting else FAILED_ROWS
        latest: dict[tuple[object, ...], tuple[str, int, str, str]] = {
            (status, error_type, state): (str(at), int(row), str(key), str(said))
            for status, error_type, state, at, row, key, said in self._read(_LATEST_ERRORS.format(rows=rows))
        }
        return [
            ErrorGroup(
                status=None if status is None else int(status),
                error_type=None if error_type is None else str(error_type),
                state=RowState(state),
                count=int(count),
                first=(int(row), str(key)),
                latest=latest.get((status, error_type, state)),
            )
            for status, error_type, state, count, row, key in self._read(_ERROR_GROUPS.format(rows=rows))
        ]

    def journal(self) -> list[JournalEntry]:
        """The campaign's journal, oldest first."""
        return [
            JournalEntry(str(at), str(kind), str(detail))
            for at, kind, detail in self._read("SELECT at, kind, detail FROM journal ORDER BY id")
        ]

    def key_states(self, states: Iterable[RowState], keys: Iterable[str] | None = None) -> dict[str, str]:
        """Key -> state name of the rows in `states` (of `keys`, if given); no row objects, so cheap."""
        names = tuple(state.value for state in states)
        wanted = f"state IN ({', '.join('?' for _ in names)})"
        if keys is None:
            found = self._read(f"SELECT key, state FROM recipients WHERE {wanted}", names)
        else:
            found = self._read(
                f"SELECT r.key, r.state FROM {_BY_KEYS} WHERE r.{wanted}", (_keys(keys), *names)
            )
        return {str(key): str(state) for key, state in found}

    def workers(self) -> list[WorkerView] | None:
        """None: one command at a time sends from a ledger file (its writer lock), no worker shares it."""
        return None

    def open_rows_of(
        self, sender: str, state: RowState, now: datetime | None = None, *, after: int = 0, limit: int = 1000
    ) -> list[PlannedRow]:
        """Up to `limit` listed rows of step 1 in `state` (pending or in flight) that `sender` sends, due at
        `now` if given, in ledger order after `after` (the last one's `cursor`): a page of a lane's work.
        The state index holds each (state, sender)'s rows in rowid order, so a page is a range read."""
        query = (
            "SELECT rowid, key, row, email, sender, cells FROM recipients INDEXED BY recipients_state "
            "WHERE state = ? AND sender = ? AND rowid > ? AND listed = 1 AND step = ? "
            "AND (? IS NULL OR state = 'inflight' OR due_at IS NULL OR due_at <= ?) ORDER BY rowid LIMIT ?"
        )
        stamp = None if now is None else _iso(now)
        inflight = state == RowState.INFLIGHT
        return [
            PlannedRow(str(key), int(row), str(email), str(name), inflight, cells=cells, cursor=int(rowid))
            for rowid, key, row, email, name, cells in self._read(
                query, (state.value, sender, after, FIRST_STEP, stamp, stamp, limit)
            )
        ]

    def open_counts(self, now: datetime | None = None) -> dict[str, int]:
        """Per sender, the listed pending and in-flight rows of step 1 (due at `now`, if given)."""
        stamp = None if now is None else _iso(now)
        found = self._read(OPEN_COUNTS, (FIRST_STEP, stamp, stamp))
        return {str(sender): int(count) for sender, count in found}

    # --- follow-up steps ---------------------------------------------------------------------------

    def unscheduled_steps(
        self, previous: str, step: str, *, later: Sequence[str] = (), after: int = 0, limit: int = 1000
    ) -> list[SentStep]:
        """Up to `limit` rows of step `previous` that were sent to a recipient still in the list and
        have no row of `step` yet, nor of any step in `later`: the recipients `step` is to be scheduled
        for. Pass the last one's `cursor` as `after` for the next batch (each row is looked at once,
        however many batches: the table is walked in rowid order, not through the state index, which
        would sort every batch)."""
        query = """
            SELECT p.rowid, p.key, COALESCE(p.recipient, p.key), p.row, p.email, p.sender, p.sent_at
            FROM recipients AS p NOT INDEXED JOIN recipients AS s ON s.key = COALESCE(p.recipient, p.key)
            WHERE p.rowid > ? AND p.step = ? AND p.state = 'sent' AND s.listed = 1 AND NOT EXISTS (
                SELECT 1 FROM recipients AS f WHERE f.key = COALESCE(p.recipient, p.key) || char(31) || ?
            ) AND NOT EXISTS (
                SELECT 1 FROM json_each(?) AS later
                    JOIN recipients AS l ON l.key = COALESCE(p.recipient, p.key) || char(31) || later.value
            )
            ORDER BY p.rowid LIMIT ?
        """
        return [
            SentStep(
                str(key), str(recipient), int(row), str(email), str(sender), _moment(sent_at), int(rowid)
            )
            for rowid, key, recipient, row, email, sender, sent_at in self._read(
                query, (after, previous, step, json.dumps(list(later)), limit)
            )
        ]

    def due_senders(self, now: datetime) -> list[str]:
        """The senders of follow-up rows that may be claimed at `now` (in the manifest or no longer)."""
        query = (
            "SELECT DISTINCT sender FROM recipients INDEXED BY recipients_due "
            "WHERE due_at <= ? AND step != ? AND state IN ('pending', 'inflight') ORDER BY sender"
        )
        return [str(sender) for (sender,) in self._read(query, (_iso(now), FIRST_STEP))]

    def due_steps_of(
        self, sender: str, state: RowState, now: datetime, *, after: int = 0, limit: int = 1000
    ) -> list[DueStep]:
        """Up to `limit` follow-up rows of `sender` in `state` (pending or in flight) that may be claimed at
        `now`, with the steps they answer, in ledger order after `after` (the last one's `cursor`)."""
        query = """
            SELECT f.rowid, f.key, f.recipient, f.step, s.row, s.email, f.sender, s.listed,
                p.step, COALESCE(p.subject, ''), COALESCE(f.reply_to, p.message_id), p.thread_id, p.sent_at,
                s.sent_at, p.internet_message_id
            FROM recipients AS f INDEXED BY recipients_state
                JOIN recipients AS p ON p.key = f.previous
                JOIN recipients AS s ON s.key = f.recipient
            WHERE f.state = ? AND f.sender = ? AND f.rowid > ? AND f.step != ? AND f.due_at <= ?
            ORDER BY f.rowid LIMIT ?
        """
        inflight = state == RowState.INFLIGHT
        return [
            DueStep(
                key=str(key),
                recipient=str(recipient),
                step=str(step),
                row=int(row),
                email=str(email),
                sender=str(name),
                inflight=inflight,
                listed=bool(listed),
                previous_step=str(previous_step),
                previous_subject=str(subject),
                previous_message_id=None if message_id is None else str(message_id),
                previous_thread_id=None if thread_id is None else str(thread_id),
                previous_sent_at=_moment(previous_sent),
                first_sent_at=_moment(first_sent),
                cursor=int(rowid),
                previous_internet_message_id=None if header is None else str(header),
            )
            for (
                rowid, key, recipient, step, row, email, name, listed,
                previous_step, subject, message_id, thread_id, previous_sent, first_sent, header,
            ) in self._read(query, (state.value, sender, after, FIRST_STEP, _iso(now), limit))
        ]  # fmt: skip

    def next_due(self, now: datetime) -> datetime | None:
        """When the next follow-up scheduled after `now` is due (None: none is), of a recipient still in
        the list (a removed one gets no further step: nothing to wait for)."""
        # INDEXED BY: without statistics the planner takes the state index and reads every pending row.
        # In due order, the first whose recipient (step 1's row) is still listed: no MIN over them all.
        query = (
            "SELECT f.due_at FROM recipients AS f INDEXED BY recipients_due "
            "JOIN recipients AS s ON s.key = COALESCE(f.recipient, f.key) "
            "WHERE f.due_at > ? AND f.state = 'pending' AND s.listed = 1 ORDER BY f.due_at LIMIT 1"
        )
        found = self._read(query, (_iso(now),))
        return _moment(found[0][0]) if found and found[0][0] else None

    def step_counts(self, steps: Iterable[str], now: datetime) -> list[StepCounts]:
        """Where each of `steps` stands at `now` (rows per state, due, scheduled, stopped), in that order."""
        states: dict[str, dict[RowState, int]] = {}
        for step, state, count in self._read(
            "SELECT step, state, COUNT(*) FROM recipients GROUP BY step, state"
        ):
            states.setdefault(str(step), dict.fromkeys(RowState, 0))[RowState(state)] = int(count)
        stamp = _iso(now)
        timing = {
            str(step): (int(due or 0), int(later or 0), first)
            for step, due, later, first in self._read(
                "SELECT step, SUM(due_at IS NULL OR due_at <= ?), SUM(due_at > ?), "
                "MIN(CASE WHEN due_at > ? THEN due_at END) FROM recipients WHERE state = 'pending' "
                "GROUP BY step",
                (stamp, stamp, stamp),
            )
        }
        stopped: dict[str, dict[str, int]] = {}
        for step, cause, count in self._read(
            "SELECT step, CASE WHEN instr(reason, ':') > 0 THEN substr(reason, 1, instr(reason, ':') - 1) "
            "ELSE COALESCE(NULLIF(reason, ''), 'unknown') END, COUNT(*) FROM recipients "
            "WHERE state = 'skipped' GROUP BY 1, 2"
        ):
            stopped.setdefault(str(step), {})[str(cause)] = int(count)
        auto = {
            str(step): int(count)
            for step, count in self._read(
                "SELECT step, COUNT(*) FROM recipients WHERE auto_reply IS NOT NULL GROUP BY step"
            )
        }
        return step_counts_of(steps, states, timing, stopped, auto)

    def _read(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(query, params).fetchall()
        except sqlite3.Error as exc:
            message = f"{self._path}: cannot read the ledger ({exc})"
            raise LedgerError(message) from exc


# The rows of a batch of keys, given as one JSON array (no limit on the number of SQL parameters).
# CROSS JOIN keeps the keys as the outer loop, so each is one primary-key lookup; left to itself, the
# planner may prefer the state index and scan every sent row of a large ledger for each batch.
_BY_KEYS = "json_each(?) AS j CROSS JOIN recipients AS r ON r.key = j.value"
INVALID_REASON = f"{SkipReason.INVALID.value}:"  # how the reason of a row skipped as invalid begins
# And of a row skipped as a duplicate. These two skips are the list's to decide, and a check decides them
# again: such a row the plan now mails is pending again (`record_plan`). An opt-out is the person's.
DUPLICATE_REASON = f"{SkipReason.DUPLICATE.value}:"
# The detail of a duplicate's skip whose address went out under another key (that key follows, quoted), and
# how its reason begins: a row skipped so is that person's row in the list (`record_plan`).
ALREADY_MAILED = "already mailed as key "
MAILED_DUPLICATE_REASON = f"{DUPLICATE_REASON} {ALREADY_MAILED}"

# The states of a row whose message may have reached its address: sent, or maybe (in flight, unknown).
MAILED_STATES = (RowState.SENT, RowState.INFLIGHT, RowState.UNKNOWN)
_MAILED = "(" + ", ".join(f"'{state.value}'" for state in MAILED_STATES) + ")"
# Step 1's rows at a batch of lower-cased addresses (`a`: the key asked for, the address): through the
# index `recipients_address` where the key is not the address, by the key where it is (the index leaves
# those rows out). The terms of the index's WHERE are spelled as it spells them, or SQLite will not use
# it; CROSS JOIN keeps the batch as the outer loop, as `_BY_KEYS` does.
_BY_ADDRESS = (
    "WITH a(key, email) AS ({asked}) "
    "SELECT a.key, r.{column} FROM a CROSS JOIN recipients AS r ON lower(r.email) = a.email "
    "AND r.step = 'message' AND r.key != lower(r.email) WHERE {where} "
    "UNION ALL SELECT a.key, r.{column} FROM a CROSS JOIN recipients AS r ON r.key = a.email "
    "WHERE lower(r.email) = a.email AND r.step = 'message' AND {where}"
)
# Without the index: the table is the outer loop, each row probing the batch (SQLite indexes it).
_BY_ADDRESS_SCANNED = (
    "WITH a(key, email) AS MATERIALIZED ({asked}) SELECT a.key, r.{column} FROM recipients AS r CROSS JOIN a "
    "ON a.email = lower(r.email) WHERE r.step = 'message' AND {where}"
)
_ASKED_ADDRESSES = "SELECT value, value FROM json_each(?1)"  # the address is what is asked for
_ASKED_PAIRS = "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?1)"


_Found = TypeVar("_Found", int, str)


def first_of(found: Iterable[tuple[Any, _Found]]) -> dict[str, _Found]:
    """(what was asked, what was found) as a dict of the least found for each (a row; a key)."""
    least: dict[str, _Found] = {}
    for asked, value in found:
        if asked not in least or value < least[asked]:
            least[str(asked)] = value
    return least


def _keys(keys: Iterable[str]) -> str:
    return json.dumps(list(keys))


def _iso(moment: datetime) -> str:
    """A moment as the ledger stores due times: ISO 8601 in UTC, to the millisecond (so it sorts)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def step_counts_of(
    steps: Iterable[str],
    states: Mapping[str, dict[RowState, int]],
    timing: Mapping[str, tuple[int, int, str | None]],
    stopped: Mapping[str, dict[str, int]],
    auto: Mapping[str, int],
) -> list[StepCounts]:
    """Each of `steps`, in that order, from its rows per state, its pending rows (due now, later, the
    first due time), its skips by cause and its auto-replies (every backend's `step_counts`)."""
    result = []
    for step in steps:
        due, later, first = timing.get(step, (0, 0, None))
        result.append(
            StepCounts(
                step=step,
                states=states.get(step, dict.fromkeys(RowState, 0)),
                due_now=due,
                scheduled=later,
                next_due=_moment(first) if first else None,
                stopped=stopped.get(step, {}),
                auto_replied=auto.get(step, 0),
            )
        )
    return result


def _moment(text: object) -> datetime:
    return datetime.fromisoformat(str(text))


def _to_row(values: tuple[object, ...]) -> LedgerRow:
    named: dict[str, Any] = dict(zip(ROW_COLUMNS, values, strict=True))
    named["state"] = RowState(str(named["state"]))
    named["replayed"] = bool(named["replayed"])
    named["listed"] = bool(named["listed"])
    return LedgerRow(**named)
