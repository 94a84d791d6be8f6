"""The progress ledger: one SQLite file that says, for every recipient, what happened.

It is the source of truth for "sent exactly once" (DESIGN.md §5). A row is
committed as `inflight`, with its idempotency key, before its request leaves;
the outcome is committed after. Plain synchronous sqlite3: the engine calls it
from a worker thread so the event loop never waits on disk. It never stores
the API key.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from campaign.clock import Clock
from campaign.errors import LedgerError
from campaign.models import OutcomeKind, RowState, SendOutcome, Skip

__all__ = [
    "Claim",
    "Ledger",
    "LedgerRow",
    "PlannedRow",
    "SyncReport",
    "open_ledger",
]

# Each migration is applied once, in order, and recorded in `schema_migrations`.
_MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "create recipients, send log and meta",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE recipients (
            key TEXT PRIMARY KEY,
            row INTEGER NOT NULL,
            email TEXT NOT NULL,
            sender TEXT,
            state TEXT NOT NULL,
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            attempt_no INTEGER NOT NULL DEFAULT 0,
            idempotency_key TEXT,
            claimed_at TEXT,
            message_id TEXT,
            request_id TEXT,
            replayed INTEGER NOT NULL DEFAULT 0,
            error_type TEXT,
            error_status INTEGER,
            error_message TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            sent_at TEXT
        );
        CREATE INDEX recipients_state ON recipients (state, sender);
        CREATE TABLE send_log (
            id INTEGER PRIMARY KEY,
            sender TEXT NOT NULL,
            sent_at REAL NOT NULL,
            recipients INTEGER NOT NULL
        );
        CREATE INDEX send_log_sender ON send_log (sender, sent_at);
        """,
    ),
)


@dataclass(frozen=True, slots=True)
class PlannedRow:
    """A recipient the plan wants mailed, as the ledger stores it."""

    key: str
    row: int
    email: str
    sender: str


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What reconciling the recipient list with the ledger changed."""

    added: int
    skipped_added: int
    existing: int
    missing: int  # keys in the ledger that are no longer in the list (left alone)


@dataclass(frozen=True, slots=True)
class Claim:
    """The idempotency key a claimed row must be sent with."""

    idempotency_key: str
    attempt_no: int


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One recipient's record."""

    key: str
    row: int
    email: str
    sender: str | None
    state: RowState
    reason: str | None
    attempts: int
    idempotency_key: str | None
    claimed_at: str | None
    message_id: str | None
    error_type: str | None
    error_status: int | None
    error_message: str | None
    updated_at: str


def open_ledger(path: Path, *, clock: Clock, campaign: str) -> Ledger:
    """Open (creating and migrating if needed) the ledger at `path` for `campaign`."""
    is_new = not path.exists()
    try:
        if is_new:
            # Create the file 0600 before SQLite writes anything into it.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=5000")
    except (OSError, sqlite3.Error) as exc:
        message = f"{path}: cannot open the ledger ({exc})"
        raise LedgerError(message) from exc
    ledger = Ledger(connection, path=path, clock=clock)
    ledger._migrate()
    ledger._check_campaign(campaign)
    return ledger


class Ledger:
    """Reads and writes one campaign's ledger; every write is one transaction."""

    def __init__(self, connection: sqlite3.Connection, *, path: Path, clock: Clock) -> None:
        self._db = connection
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._campaign = ""

    @property
    def path(self) -> Path:
        """Where the ledger file is."""
        return self._path

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    # --- set-up -------------------------------------------------------------

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            done = {version for (version,) in db.execute("SELECT version FROM schema_migrations")}
            for version, (name, script) in enumerate(_MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, self._stamp()))
        if max(done, default=0) > len(_MIGRATIONS):
            message = f"{self._path}: the ledger was written by a newer version of campaign; upgrade campaign"
            raise LedgerError(message)

    def _check_campaign(self, campaign: str) -> None:
        stored = self.get_meta("campaign")
        if stored is None:
            self.set_meta("campaign", campaign)
            self.set_meta("created_at", self._stamp())
        elif stored != campaign:
            message = (
                f"{self._path}: this ledger belongs to campaign {stored!r}, not {campaign!r}; "
                "use another manifest file name or restore campaign.name"
            )
            raise LedgerError(message)
        self._campaign = campaign

    def get_meta(self, key: str) -> str | None:
        """A value stored with the ledger, or None."""
        found = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(found[0][0]) if found else None

    def set_meta(self, key: str, value: str) -> None:
        """Store a value with the ledger."""
        with self._write() as db:
            db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?", (key, value, value)
            )

    # --- the list -----------------------------------------------------------

    def record_plan(self, planned: Sequence[PlannedRow], skips: Sequence[Skip]) -> SyncReport:
        """Add new recipients as pending and new skips as skipped; existing rows are left alone."""
        now = self._stamp()
        with self._write() as db:
            before = db.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]
            db.executemany(
                "INSERT OR IGNORE INTO recipients (key, row, email, sender, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                [(p.key, p.row, p.email, p.sender, now, now) for p in planned],
            )
            middle = db.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]
            db.executemany(
                "INSERT OR IGNORE INTO recipients (key, row, email, state, reason, created_at, updated_at) "
                "VALUES (?, ?, ?, 'skipped', ?, ?, ?)",
                [(s.key, s.row, s.email, f"{s.reason.value}: {s.detail}", now, now) for s in skips],
            )
            after = db.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]
            wanted = {p.key for p in planned} | {s.key for s in skips}
            missing = sum(1 for (key,) in db.execute("SELECT key FROM recipients") if key not in wanted)
        return SyncReport(
            added=middle - before,
            skipped_added=after - middle,
            existing=len(planned) + len(skips) - (after - before),
            missing=missing,
        )

    def assigned_senders(self) -> dict[str, str]:
        """The sender each recipient already in the ledger is assigned to."""
        rows = self._read("SELECT key, sender FROM recipients WHERE sender IS NOT NULL")
        return {str(key): str(sender) for key, sender in rows}

    def rows(self, *, states: Iterable[RowState] | None = None) -> Iterator[LedgerRow]:
        """Every row (or those in `states`), in list order."""
        query = "SELECT " + ", ".join(_ROW_COLUMNS) + " FROM recipients"
        params: tuple[str, ...] = ()
        if states is not None:
            params = tuple(state.value for state in states)
            query += f" WHERE state IN ({', '.join('?' for _ in params)})"
        for values in self._read(query + " ORDER BY row, key", params):
            yield _to_row(values)

    def counts(self) -> dict[RowState, int]:
        """How many rows are in each state (every state present, zeros included)."""
        found = {
            str(state): count
            for state, count in self._read("SELECT state, COUNT(*) FROM recipients GROUP BY state")
        }
        return {state: int(str(found.get(state.value, 0))) for state in RowState}

    def counts_by_sender(self) -> dict[str, dict[RowState, int]]:
        """Per sender, how many rows are in each state."""
        result: dict[str, dict[RowState, int]] = {}
        query = (
            "SELECT sender, state, COUNT(*) FROM recipients WHERE sender IS NOT NULL GROUP BY sender, state"
        )
        for sender, state, count in self._read(query):
            result.setdefault(sender, dict.fromkeys(RowState, 0))[RowState(state)] = int(count)
        return result

    # --- sending ------------------------------------------------------------

    def claim(self, key: str) -> Claim:
        """Mark a pending row in flight with its idempotency key (an in-flight row keeps its key)."""
        now = self._stamp()
        with self._write() as db:
            found = db.execute(
                "SELECT state, attempt_no, idempotency_key FROM recipients WHERE key = ?", (key,)
            )
            state, attempt_no, idempotency_key = self._expect(found.fetchone(), key)
            if state == RowState.PENDING:
                idempotency_key = self._idempotency_key(key, attempt_no)
            elif state != RowState.INFLIGHT:
                message = f"{self._path}: cannot send to {key!r}: it is {state}"
                raise LedgerError(message)
            db.execute(
                "UPDATE recipients SET state = 'inflight', idempotency_key = ?, claimed_at = ?, "
                "attempts = attempts + 1, updated_at = ? WHERE key = ?",
                (idempotency_key, now, now, key),
            )
        return Claim(idempotency_key=str(idempotency_key), attempt_no=int(attempt_no))

    def record_outcome(self, key: str, outcome: SendOutcome, *, sender: str, recipients: int = 1) -> RowState:
        """Record what a send of an in-flight row came to; returns the row's new state.

        Sent and rejected rows are final. A definite "not sent" (throttled, refused
        credentials) puts the row back to pending with a new key for next time.
        An ambiguous outcome keeps the row in flight with the same key.
        """
        now = self._stamp()
        new_state = _STATE_AFTER[outcome.kind]
        with self._write() as db:
            found = db.execute(
                "SELECT state, attempt_no, idempotency_key FROM recipients WHERE key = ?", (key,)
            )
            state, _, _ = self._expect(found.fetchone(), key)
            if state != RowState.INFLIGHT:
                message = (
                    f"{self._path}: cannot record a send outcome for {key!r}: it is {state}, not inflight"
                )
                raise LedgerError(message)
            error = (None, None, None) if outcome.kind == OutcomeKind.SENT else _error_columns(outcome)
            db.execute(
                "UPDATE recipients SET state = ?, message_id = COALESCE(?, message_id), "
                "request_id = COALESCE(?, request_id), replayed = ?, error_type = ?, error_status = ?, "
                "error_message = ?, updated_at = ?, sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END, "
                "attempt_no = attempt_no + ?, "
                "idempotency_key = CASE WHEN ? THEN NULL ELSE idempotency_key END "
                "WHERE key = ?",
                (
                    new_state.value,
                    outcome.message_id,
                    outcome.request_id,
                    int(outcome.replayed),
                    *error,
                    now,
                    new_state.value,
                    now,
                    int(new_state == RowState.PENDING),
                    new_state == RowState.PENDING,
                    key,
                ),
            )
            if new_state == RowState.SENT:
                db.execute(
                    "INSERT INTO send_log (sender, sent_at, recipients) VALUES (?, ?, ?)",
                    (sender, self._clock.now().timestamp(), recipients),
                )
        return new_state

    def release(self, key: str) -> None:
        """Return a claimed row whose request never left to pending; its key is still unused."""
        self._move(key, frm=(RowState.INFLIGHT,), to=RowState.PENDING)

    def record_unknown(self, key: str) -> None:
        """Give up on an in-flight row whose fate cannot be known now (reconcile settles it)."""
        self._move(key, frm=(RowState.INFLIGHT,), to=RowState.UNKNOWN)

    def record_expired_claims(self, *, older_than_s: float) -> int:
        """Turn in-flight rows claimed longer ago than `older_than_s` into unknown; returns how many."""
        cutoff = self._clock.now().timestamp() - older_than_s
        stale = [
            row.key
            for row in self.rows(states=(RowState.INFLIGHT,))
            if row.claimed_at is None or datetime.fromisoformat(row.claimed_at).timestamp() < cutoff
        ]
        for key in stale:
            self.record_unknown(key)
        return len(stale)

    def sent_recipients_since(self, sender: str, since: float) -> list[tuple[float, int]]:
        """(Unix time, recipients) of each send by `sender` since `since`, oldest first."""
        query = "SELECT sent_at, recipients FROM send_log WHERE sender = ? AND sent_at > ? ORDER BY sent_at"
        return [(float(at), int(n)) for at, n in self._read(query, (sender, since))]

    # --- internals ----------------------------------------------------------

    def _move(self, key: str, *, frm: tuple[RowState, ...], to: RowState) -> None:
        with self._write() as db:
            found = db.execute(
                "SELECT state, attempt_no, idempotency_key FROM recipients WHERE key = ?", (key,)
            )
            state, _, _ = self._expect(found.fetchone(), key)
            if state not in frm:
                message = f"{self._path}: cannot move {key!r} from {state} to {to}"
                raise LedgerError(message)
            db.execute(
                "UPDATE recipients SET state = ?, updated_at = ? WHERE key = ?",
                (to.value, self._stamp(), key),
            )

    def _expect(
        self, found: tuple[str, int, str | None] | None, key: str
    ) -> tuple[RowState, int, str | None]:
        if found is None:
            message = f"{self._path}: no recipient {key!r} in the ledger"
            raise LedgerError(message)
        return RowState(found[0]), found[1], found[2]

    def _idempotency_key(self, key: str, attempt_no: int) -> str:
        # The address stays out of the header; the attempt number makes a new key
        # after a definite "not sent" (Nylas replays a key's first answer for an hour).
        digest = hashlib.sha256(f"{self._campaign}\0{key}".encode()).hexdigest()[:32]
        return f"{self._campaign}-{digest}-{attempt_no}"

    def _stamp(self) -> str:
        return self._clock.now().isoformat(timespec="milliseconds")

    def _read(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(query, params).fetchall()
        except sqlite3.Error as exc:
            message = f"{self._path}: cannot read the ledger ({exc})"
            raise LedgerError(message) from exc

    def _write(self) -> _Transaction:
        return _Transaction(self)


class _Transaction:
    """`with ledger._write() as db:` — one IMMEDIATE transaction under the ledger's lock."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __enter__(self) -> sqlite3.Connection:
        self._ledger._lock.acquire()
        try:
            self._ledger._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._ledger._lock.release()
            message = f"{self._ledger.path}: cannot write the ledger ({exc})"
            raise LedgerError(message) from exc
        return self._ledger._db

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        try:
            if kind is None:
                self._ledger._db.execute("COMMIT")
            else:
                self._ledger._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            message = f"{self._ledger.path}: cannot write the ledger ({exc})"
            raise LedgerError(message) from exc
        finally:
            self._ledger._lock.release()
        if isinstance(error, sqlite3.Error):
            message = f"{self._ledger.path}: cannot write the ledger ({error})"
            raise LedgerError(message) from error


_STATE_AFTER: dict[OutcomeKind, RowState] = {
    OutcomeKind.SENT: RowState.SENT,
    OutcomeKind.REJECTED: RowState.FAILED,
    OutcomeKind.THROTTLED: RowState.PENDING,
    OutcomeKind.AUTH_REFUSED: RowState.PENDING,
    OutcomeKind.IN_PROGRESS: RowState.INFLIGHT,
    OutcomeKind.AMBIGUOUS: RowState.INFLIGHT,
}

_ROW_COLUMNS = (
    "key",
    "row",
    "email",
    "sender",
    "state",
    "reason",
    "attempts",
    "idempotency_key",
    "claimed_at",
    "message_id",
    "error_type",
    "error_status",
    "error_message",
    "updated_at",
)


def _to_row(values: tuple[object, ...]) -> LedgerRow:
    named = dict(zip(_ROW_COLUMNS, values, strict=True))
    named["state"] = RowState(str(named["state"]))
    return LedgerRow(**named)  # type: ignore[arg-type]


def _error_columns(outcome: SendOutcome) -> tuple[str | None, int | None, str | None]:
    return outcome.error_type or outcome.kind.value, outcome.status, outcome.error_message
