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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from campaign.clock import Clock
from campaign.errors import LedgerError
from campaign.ledger._read import LIST_EXTENT, PLAN_STAMP, RULES_STAMP, LedgerReader
from campaign.ledger._schema import unlock_ledger
from campaign.ledger._values import Claim
from campaign.models import RowState

__all__ = [
    "IDEMPOTENCY_WINDOW_S",
    "KEY_REUSE_S",
    "TRANSITIONS",
    "ClaimChange",
    "LedgerWriter",
    "decide_claim",
    "idempotency_key",
    "idempotency_key_stem",
    "only",
    "or_error",
    "record_plan_stamps",
    "set_meta",
]

_FETCHED = ("state", "attempt_no", "idempotency_key", "key_issued_at", "claimed_at", "key_uses", "sender")

_T = TypeVar("_T")

PENDING, INFLIGHT, SENT = RowState.PENDING, RowState.INFLIGHT, RowState.SENT
FAILED, UNKNOWN, SKIPPED = RowState.FAILED, RowState.UNKNOWN, RowState.SKIPPED
# Every legal change of state (ARCHITECTURE.md, "Bird's-eye view"); `sent` is final.
TRANSITIONS: Mapping[RowState, frozenset[RowState]] = {
    PENDING: frozenset({INFLIGHT, SKIPPED}),  # claim; the list now skips it
    INFLIGHT: frozenset({INFLIGHT, SENT, FAILED, PENDING, UNKNOWN}),  # re-claim; 2xx; 4xx; not sent; gave up
    UNKNOWN: frozenset({SENT, PENDING}),  # reconcile found it; not found / retry --unknown
    FAILED: frozenset({PENDING}),  # retry --failed
    SKIPPED: frozenset({PENDING}),  # a row skipped as invalid that now validates, or as a duplicate no longer
    SENT: frozenset(),
}
# A claim finds nothing to send in these (`decide_claim`).
SETTLED = frozenset({SENT, FAILED, UNKNOWN, SKIPPED})


def set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    """Set the ledger's meta `key` to `value`, in the caller's transaction."""
    db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?", (key, value, value))


def record_plan_stamps(
    db: sqlite3.Connection, *, stamp: str | None, rules: str | None, extent: str | None
) -> None:
    """Record a plan's stamps (`SqliteLedger.record_plan` says what each is; None: left as it is), in the
    caller's transaction: the one that records the plan."""
    for key, value in ((PLAN_STAMP, stamp), (RULES_STAMP, rules), (LIST_EXTENT, extent)):
        if value is not None:
            set_meta(db, key, value)


def or_error(call: Callable[[], _T]) -> _T | LedgerError:
    """The call's result, or its LedgerError (a write that undid itself) for the caller to hand on:
    one write of `claim_many`, `record_outcomes`."""
    try:
        return call()
    except LedgerError as exc:
        return exc


def only(results: Sequence[_T | LedgerError]) -> _T:
    """The one result of a one-item `claim_many` or `record_outcomes`; its LedgerError raised."""
    (result,) = results
    if isinstance(result, LedgerError):
        raise result
    return result


def idempotency_key(campaign: str, key: str, attempt_no: int) -> str:
    """The Idempotency-Key of a row's attempt (every backend's: a resumed send must reuse it)."""
    return f"{idempotency_key_stem(campaign, key)}{attempt_no}"


def idempotency_key_stem(campaign: str, key: str) -> str:
    """A row's Idempotency-Key but its attempt number, which follows it."""
    # The address stays out of the header; the attempt number makes a new key
    # after a definite "not sent" (Nylas replays a key's first answer for an hour).
    digest = hashlib.sha256(f"{campaign}\0{key}".encode()).hexdigest()[:32]
    return f"{campaign}-{digest}-"


# Nylas replays a key's first answer for one hour (nylas-api.md §4). A key is reused only
# while it is younger than that, less a margin for the request itself and clock skew.
IDEMPOTENCY_WINDOW_S = 3600.0
KEY_REUSE_S = IDEMPOTENCY_WINDOW_S - 300.0


@dataclass(frozen=True, slots=True)
class ClaimChange:
    """What a claim writes into its row (every backend's: `decide_claim`)."""

    idempotency_key: str
    issued: str  # when the key was first claimed (ISO 8601): its replay window runs from then
    uses: int  # earlier requests that may have used the key
    owner: str | None  # the sender the row is now claimed for
    via: str | None  # the mailbox a new key is issued for (None: the row keeps its own)
    fresh: bool
    attempt_no: int

    def as_claim(self) -> Claim:
        usable_until = datetime.fromisoformat(self.issued) + timedelta(seconds=KEY_REUSE_S)
        return Claim(self.idempotency_key, self.attempt_no, usable_until, self.fresh, self.owner)


def decide_claim(
    current: Mapping[str, Any],
    *,
    campaign: str,
    key: str,
    sender: str | None,
    via: str | None,
    now: str,
    where: str,
) -> ClaimChange | None:
    """How a claim changes a row whose `_FETCHED` columns are `current`.

    A pending row gets a key (new after each definite "not sent") and, if given, the sender that now
    sends it; an in-flight row left by a crash keeps its key and its sender, so Nylas (which scopes
    keys per grant) replays instead of sending twice. None for a row already settled (sent, failed,
    unknown or skipped since the sender's jobs were read: by another worker, or a command beside the
    run): there is nothing to send. LedgerError for a row in flight without a key (never written so)."""
    state = RowState(current["state"])
    if state in SETTLED:
        return None
    attempt_no = int(current["attempt_no"])
    if state == PENDING:
        issued = idempotency_key(campaign, key, attempt_no)
        return ClaimChange(issued, now, 0, sender or current["sender"], via, True, attempt_no)
    if state == INFLIGHT and current["idempotency_key"]:
        # An earlier process may have sent it: the same key, issued when it was first claimed.
        first = str(current["key_issued_at"] or current["claimed_at"] or now)
        uses = int(current["key_uses"]) + 1
        return ClaimChange(
            str(current["idempotency_key"]), first, uses, current["sender"], None, False, attempt_no
        )
    raise LedgerError(f"{where}: cannot send to {key!r}: it is in flight without an idempotency key")


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
        self.notes: tuple[str, ...] = ()  # what the open found to tell (`open_ledger`: no WAL)

    def close(self) -> None:
        """Close the connection and drop the writer lock."""
        self._db.close()
        if self._lock_fd is not None:
            unlock_ledger(self._lock_fd)
            self._lock_fd = None

    def bind_worker(self, worker: str | None) -> None:
        """Nothing to bind: one command at a time sends from a ledger file (its writer lock)."""

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside into one transaction; a failed write undoes only itself."""
        with self._write():
            yield

    def _set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            set_meta(db, key, value)

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

    def _log_send(self, db: sqlite3.Connection, key: str, sender: str, at: float, recipients: int) -> None:
        # With the mailbox the row was claimed through: the daily budgets count by mailbox.
        db.execute(
            "INSERT INTO send_log (sender, via, sent_at, recipients) "
            "SELECT ?, claimed_via, ?, ? FROM recipients WHERE key = ?",
            (sender, at, recipients, key),
        )

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
