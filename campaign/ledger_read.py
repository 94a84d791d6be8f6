"""The ledger's read side: one recipient's record as a value, and the queries status and reports need.

Read-only: nothing here changes the file (every write is in `ledger.py`, which
builds on `LedgerReader`). A `sqlite3.Error` becomes a `LedgerError` naming the file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign.errors import LedgerError
from campaign.models import RowState

__all__ = ["JournalEntry", "LedgerReader", "LedgerRow"]


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
    first_claimed_at: str | None
    claimed_at: str | None  # the latest claim
    subject: str | None  # the subject as last sent (reconcile matches it in the Sent folder)
    message_id: str | None
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


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A notable change to the campaign as a whole (content changed, retry, reconcile)."""

    at: str
    kind: str
    detail: str


ROW_COLUMNS: tuple[str, ...] = tuple(LedgerRow.__dataclass_fields__)


class LedgerReader:
    """Queries over one open ledger connection; the lock serialises them with the writer's transactions."""

    def __init__(self, connection: sqlite3.Connection, *, path: Path) -> None:
        self._db = connection
        self._path = path
        # Re-entrant: a batch of writes holds it while each write takes it again.
        self._lock = threading.RLock()

    @property
    def path(self) -> Path:
        """Where the ledger file is."""
        return self._path

    def get_meta(self, key: str) -> str | None:
        """A value stored with the ledger, or None."""
        found = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(found[0][0]) if found else None

    def assigned_senders(self) -> dict[str, str]:
        """The sender each recipient already in the ledger is assigned to."""
        rows = self._read("SELECT key, sender FROM recipients WHERE sender IS NOT NULL")
        return {str(key): str(sender) for key, sender in rows}

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

    def counts(self, *, listed: bool | None = None) -> dict[RowState, int]:
        """How many rows are in each state (every state present, zeros included)."""
        where, params = ("", ()) if listed is None else (" WHERE listed = ?", (int(listed),))
        found = {
            str(state): int(count)
            for state, count in self._read(
                f"SELECT state, COUNT(*) FROM recipients{where} GROUP BY state", params
            )
        }
        return {state: found.get(state.value, 0) for state in RowState}

    def sample_emails(
        self, states: Iterable[RowState], *, listed: bool | None = None, limit: int = 3
    ) -> dict[RowState, list[str]]:
        """Up to `limit` addresses per state, in list order (for messages that name a few)."""
        where = "" if listed is None else f" AND listed = {int(listed)}"
        query = f"SELECT email FROM recipients WHERE state = ?{where} ORDER BY row, key LIMIT ?"
        return {
            state: [str(email) for (email,) in self._read(query, (state.value, limit))] for state in states
        }

    def counts_by_sender(self) -> dict[str, dict[RowState, int]]:
        """Per sender, how many rows are in each state."""
        result: dict[str, dict[RowState, int]] = {}
        query = (
            "SELECT sender, state, COUNT(*) FROM recipients WHERE sender IS NOT NULL GROUP BY sender, state"
        )
        for sender, state, count in self._read(query):
            result.setdefault(sender, dict.fromkeys(RowState, 0))[RowState(state)] = int(count)
        return result

    def sent_recipients_since(self, sender: str, since: float) -> list[tuple[float, int]]:
        """(Unix time, recipients) of each send by `sender` since `since`, oldest first."""
        query = "SELECT sent_at, recipients FROM send_log WHERE sender = ? AND sent_at > ? ORDER BY sent_at"
        return [(float(at), int(n)) for at, n in self._read(query, (sender, since))]

    def journal(self) -> list[JournalEntry]:
        """The campaign's journal, oldest first."""
        return [
            JournalEntry(str(at), str(kind), str(detail))
            for at, kind, detail in self._read("SELECT at, kind, detail FROM journal ORDER BY id")
        ]

    def _read(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(query, params).fetchall()
        except sqlite3.Error as exc:
            message = f"{self._path}: cannot read the ledger ({exc})"
            raise LedgerError(message) from exc


def _to_row(values: tuple[object, ...]) -> LedgerRow:
    named: dict[str, Any] = dict(zip(ROW_COLUMNS, values, strict=True))
    named["state"] = RowState(str(named["state"]))
    named["replayed"] = bool(named["replayed"])
    named["listed"] = bool(named["listed"])
    return LedgerRow(**named)
