"""The ledger's write primitives: transactions, batches, the checked change of a row's state, keys.

Every write is one IMMEDIATE transaction under the ledger's lock; writes made
inside `batch()` share one transaction, each in its own savepoint, so a write
that fails undoes only itself. `TRANSITIONS` lists every legal change of state
(ARCHITECTURE.md, "Bird's-eye view") and `_set_state` refuses any other with a `LedgerError`. The
recipient-level operations built on these are in `ledger.py`.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from campaign.clock import Clock
from campaign.errors import LedgerError
from campaign.ledger._read import LedgerReader
from campaign.ledger._schema import unlock_ledger
from campaign.models import RowState

__all__ = ["TRANSITIONS", "LedgerWriter"]

_FETCHED = ("state", "attempt_no", "idempotency_key", "key_issued_at", "claimed_at", "key_uses", "sender")

PENDING, INFLIGHT, SENT = RowState.PENDING, RowState.INFLIGHT, RowState.SENT
FAILED, UNKNOWN, SKIPPED = RowState.FAILED, RowState.UNKNOWN, RowState.SKIPPED
# Every legal change of state (ARCHITECTURE.md, "Bird's-eye view"); `sent` is final.
TRANSITIONS: Mapping[RowState, frozenset[RowState]] = {
    PENDING: frozenset({INFLIGHT, SKIPPED}),  # claim; the list now skips it
    INFLIGHT: frozenset({INFLIGHT, SENT, FAILED, PENDING, UNKNOWN}),  # re-claim; 2xx; 4xx; not sent; gave up
    UNKNOWN: frozenset({SENT, PENDING}),  # reconcile found it; not found / retry --unknown
    FAILED: frozenset({PENDING}),  # retry --failed
    SKIPPED: frozenset({PENDING}),  # a row skipped as invalid that now validates
    SENT: frozenset(),
}


class LedgerWriter(LedgerReader):
    """An open ledger that can be written: transactions and checked state changes."""

    def __init__(
        self, connection: sqlite3.Connection, *, path: Path, clock: Clock, lock_fd: int | None = None
    ) -> None:
        super().__init__(connection, path=path)
        self._clock = clock
        self._campaign = ""
        self._lock_fd = lock_fd
        self._depth = 0
        self._undone_by: BaseException | None = None  # the error SQLite rolled the whole transaction back on
        self.commits = 0  # transactions committed (a batch is one)

    def close(self) -> None:
        """Close the connection and drop the writer lock."""
        self._db.close()
        if self._lock_fd is not None:
            unlock_ledger(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside into one transaction; a failed write undoes only itself."""
        with self._write():
            yield

    def _set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?", (key, value, value)
            )

    def record_event(self, kind: str, detail: str) -> None:
        """Add an entry to the campaign's journal."""
        with self._write() as db:
            db.execute(
                "INSERT INTO journal (at, kind, detail) VALUES (?, ?, ?)", (self._stamp(), kind, detail)
            )

    def _set_state(
        self,
        db: sqlite3.Connection,
        key: str,
        frm: RowState,
        to: RowState,
        *,
        note: str | None = None,
    ) -> None:
        current = RowState(self._fetch(db, key)["state"])
        if current != frm or to not in TRANSITIONS[frm]:
            message = f"{self._path}: cannot move {key!r} from {current} to {to}"
            raise LedgerError(message)
        db.execute(
            "UPDATE recipients SET state = ?, note = COALESCE(?, note), updated_at = ? WHERE key = ?",
            (to.value, note, self._stamp(), key),
        )

    def _fetch(self, db: sqlite3.Connection, key: str) -> dict[str, Any]:
        cursor = db.execute(f"SELECT {', '.join(_FETCHED)} FROM recipients WHERE key = ?", (key,))
        found = cursor.fetchone()
        if found is None:
            message = f"{self._path}: no recipient {key!r} in the ledger"
            raise LedgerError(message)
        return dict(zip(_FETCHED, found, strict=True))

    def _log_send(self, db: sqlite3.Connection, sender: str, at: float, recipients: int) -> None:
        db.execute(
            "INSERT INTO send_log (sender, sent_at, recipients) VALUES (?, ?, ?)", (sender, at, recipients)
        )

    def _idempotency_key(self, key: str, attempt_no: int) -> str:
        # The address stays out of the header; the attempt number makes a new key
        # after a definite "not sent" (Nylas replays a key's first answer for an hour).
        digest = hashlib.sha256(f"{self._campaign}\0{key}".encode()).hexdigest()[:32]
        return f"{self._campaign}-{digest}-{attempt_no}"

    def _write_error(self, exc: sqlite3.Error) -> LedgerError:
        if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
            message = (
                f"{self._path}: cannot write the ledger ({exc}); free some space, then `campaign resume` "
                "(sends in flight keep their idempotency key, so nobody is mailed twice)"
            )
        else:
            message = f"{self._path}: cannot write the ledger ({exc})"
        return LedgerError(message)

    def _stamp(self) -> str:
        return self._clock.now().isoformat(timespec="milliseconds")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:  # noqa: C901 - transaction, savepoint and SQLite's own rollback on a full disk are one protocol
        """One IMMEDIATE transaction under the lock; nested, a savepoint inside the outer one."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._undone_by = None
            try:
                self._db.execute("BEGIN IMMEDIATE" if outer else "SAVEPOINT write")
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._depth += 1
            try:
                yield self._db
            except BaseException as error:
                self._depth -= 1
                if not outer and not self._db.in_transaction and self._undone_by is None:
                    # Some errors (a full disk: SQLITE_FULL) make SQLite roll back the whole
                    # transaction, not just this write: the outer commit must fail with this cause.
                    self._undone_by = error
                try:
                    self._db.execute("ROLLBACK" if outer else "ROLLBACK TO write")
                    if not outer:
                        self._db.execute("RELEASE write")
                except sqlite3.Error:
                    pass  # the original error says more
                if isinstance(error, sqlite3.Error):
                    raise self._write_error(error) from error
                raise
            self._depth -= 1
            if outer and not self._db.in_transaction:
                cause, self._undone_by = self._undone_by, None
                if isinstance(cause, sqlite3.Error):
                    raise self._write_error(cause) from cause
                message = (
                    str(cause) if isinstance(cause, LedgerError) else f"{self._path}: cannot write the ledger"
                )
                raise LedgerError(message) from cause
            try:
                self._db.execute("COMMIT" if outer else "RELEASE write")
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            if outer:
                self.commits += 1
