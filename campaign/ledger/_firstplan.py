"""A new ledger's first plan, written while the list is still being checked.

A first run makes no ledger until the whole list is checked and the run confirmed: a bad row or a
"no" leaves nothing behind. Recording a million planned rows after the check took a quarter of the
time to the first send, on one core while the other waited. So `FirstPlan` takes the plan a batch
at a time as the check hands it over, and a thread of its own writes each batch into a new ledger
built aside: a hidden file beside where the ledger goes (`.NAME.PID.plan`), in one transaction.
`record` adds the skips and the stamps, commits, and links the file into place, as
`create_ledger_file` links in an empty ledger: the ledger appears whole or not at all. A bad row, a
refusal, Ctrl-C or an error removes the file; after kill -9 the next command to write beside it does
(`remove_abandoned_plans`), as its owner's lock on it died with the owner. That includes a kill
between the link and the removal of the hidden name, which leaves that name a second link to the
ledger: a ledger deleted to start over must not live on under it.

Each batch goes to SQLite as one statement, its rows as one JSON array (`json_each`), so the thread
takes the GIL once a batch: row by row (`executemany` takes it back after each row), a thread
inserting beside the busy check managed a few thousand rows a second.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import queue
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import orjson

from campaign.clock import Clock
from campaign.errors import LedgerError
from campaign.ledger._ledger import (
    PlannedValues,
    insert_first_skips,
    insert_planned,
    planned_values,
)
from campaign.ledger._read import PlannedRow
from campaign.ledger._schema import migrate_ledger, try_flock
from campaign.ledger._spool import PlanSpool
from campaign.ledger._values import SyncReport
from campaign.ledger._write import record_plan_stamps
from campaign.models import Skip

__all__ = ["FirstPlan"]

_AHEAD = 4  # batches waiting for the writer thread: the check waits for it only if it falls behind
# The file's page cache (KiB). It is filled while the check's own memory is in use: 64 MB, as
# `record_plan` takes after the check, put the run's peak at 300 MB; with 16, a million rows in random
# key order took a tenth longer (12.3 s against 11.1 s alone), hidden behind the check anyway.
_CACHE_KIB = 16 * 1024

# The planned rows of one batch (`PlannedValues` as a JSON array of arrays) into the table, pending.
_INSERT_JSON = (
    "INSERT INTO recipients (key, row, email, sender, state, due_at, cells, created_at, updated_at) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]'), 'pending', json_extract(value, '$[4]'), json_extract(value, '$[5]'), "
    "?2, ?2 FROM json_each(?1)"
)


class FirstPlan:
    """The first plan of the ledger at `path` (which does not exist yet), written aside as it is checked."""

    def __init__(self, path: Path, *, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._staging = path.with_name(f".{path.name}.{os.getpid()}.plan")
        self._skips = PlanSpool()  # they go in after every planned row: a planned key wins over a skip
        self._batches: queue.Queue[list[PlannedValues] | None] = queue.Queue(_AHEAD)
        self._writer: threading.Thread | None = None  # started with the first batch
        self._db: sqlite3.Connection | None = None
        self._lock: int | None = None  # our flock on the staging file: held, it is not abandoned
        self._made_folder = False
        self._now = ""
        self._added = 0
        self._failure: sqlite3.Error | None = None

    def __enter__(self) -> FirstPlan:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def add(self, planned: Sequence[PlannedRow], skips: Sequence[Skip]) -> None:
        """Take a batch of the check's rows: those to mail (written aside at once), and those skipped."""
        self._skips.add((), skips)
        if not planned:
            return
        if self._writer is None:
            self._start()
        self._raise_for_failure()
        self._batches.put(list(map(planned_values, planned)))

    def record(self, *, stamp: str, rules: str, extent: str | None) -> SyncReport:
        """Put the plan in place as the campaign's ledger, with its stamps (`SqliteLedger.record_plan`
        says what each is); LedgerError if it cannot, or if another command made the ledger meanwhile."""
        if self._writer is None:  # nothing to mail: skips only, or an empty list
            self._start()
        self._stop_writer()
        self._raise_for_failure()
        assert self._db is not None
        assert self._lock is not None
        try:
            skipped = insert_first_skips(self._db, self._skips.skips(), self._now)
            record_plan_stamps(self._db, stamp=stamp, rules=rules, extent=extent)
            self._db.execute("COMMIT")
            self._db.close()
            self._db = None
            os.fsync(self._lock)  # written with SQLite's syncs off: on disk before it is the ledger
            os.link(self._staging, self._path)  # fails if a ledger appeared meanwhile: never replace one
        except FileExistsError:
            message = (
                f"{self._path}: another command made this ledger while the list was checked; "
                "nothing was recorded or sent: run again to check the list against it"
            )
            raise LedgerError(message) from None
        except (OSError, sqlite3.Error) as exc:
            raise self._cannot(exc) from exc
        self._made_folder = False  # it holds the ledger now
        self.close()  # the ledger keeps the file; the hidden name goes
        return SyncReport(added=self._added, skipped_added=skipped, existing=0, missing=0)

    def close(self) -> None:
        """Drop what is not recorded: the file aside, and the folder if it was made for it."""
        self._stop_writer()
        if self._db is not None:
            self._db.close()
            self._db = None
        self._skips.close()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._staging)
            os.close(self._lock)  # closing drops the flock
            self._lock = None
            if self._made_folder:
                with contextlib.suppress(OSError):  # not empty: something else is in it now
                    self._path.parent.rmdir()

    def _start(self) -> None:
        """Make the file aside (migrated, 0600, locked) and start its writer thread."""
        self._now = self._clock.now().isoformat(timespec="milliseconds")
        try:
            remove_abandoned_plans(self._path)
            self._made_folder = not self._path.parent.exists()
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self._staging, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            if not try_flock(self._lock):  # another run took it for abandoned in the instant before
                raise OSError(errno.EAGAIN, "taken by another run")
            self._db = sqlite3.connect(self._staging, isolation_level=None, check_same_thread=False)
            migrate_ledger(self._db, path=self._path, stamp=self._now)
            # Nobody reads the file before `record` syncs it, and a crash discards it: no journal.
            self._db.execute("PRAGMA journal_mode = OFF")
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            self._db.execute("BEGIN")
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise self._cannot(exc, doing="create") from exc
        self._writer = threading.Thread(target=self._write, name="campaign-first-plan", daemon=True)
        self._writer.start()

    def _write(self) -> None:
        """The writer thread: each batch into the file aside, until told to stop (None)."""
        assert self._db is not None
        by_json = _json_works(self._db)
        while (batch := self._batches.get()) is not None:
            if self._failure is not None:
                continue  # drained, not written: `add` or `record` raises it
            try:
                self._added += _insert_batch(self._db, batch, self._now, by_json=by_json)
            except sqlite3.Error as exc:
                self._failure = exc

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._batches.put(None)
            self._writer.join()
            self._writer = None

    def _raise_for_failure(self) -> None:
        if self._failure is not None:
            raise self._cannot(self._failure)

    def _cannot(self, exc: BaseException, *, doing: str = "write") -> LedgerError:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return LedgerError(
            f"{self._path}: cannot {doing} the ledger ({detail}); check the folder is writable and has space"
        )


def _insert_batch(db: sqlite3.Connection, batch: list[PlannedValues], now: str, *, by_json: bool) -> int:
    """`insert_planned` of one batch, in one statement where SQLite's JSON functions carry every value
    exactly: they cut a text at a NUL, so a batch with one goes row by row."""
    if by_json:
        text = orjson.dumps(batch)
        if b"\\u0000" not in text or not any("\x00" in value for row in batch for value in _texts(row)):
            return int(db.execute(_INSERT_JSON, (text.decode(), now)).rowcount)
    return insert_planned(db, batch, now)


def _texts(row: PlannedValues) -> list[str]:
    return [value for value in row if isinstance(value, str)]


def _json_works(db: sqlite3.Connection) -> bool:
    """Whether this SQLite has its JSON functions (built in since 3.38, an option before)."""
    try:
        db.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[1]]')").fetchall()
    except sqlite3.OperationalError:
        return False
    return True


def remove_abandoned_plans(path: Path) -> None:
    """Remove the files aside that a first run of `path` left when it was killed (no lock held on them):
    half a plan, or after the plan was linked into place, a second name of the ledger."""
    ledger = _identity(path)
    for found in path.parent.glob(f".{glob.escape(path.name)}.*.plan"):
        if ledger is not None and _identity(found) == ledger:
            # The ledger's second name, never needed (its run, if alive, only has it left to remove).
            # Not opened: closing a descriptor of the ledger drops every SQLite lock this process holds on it.
            with contextlib.suppress(OSError):
                os.unlink(found)
            continue
        try:
            fd = os.open(found, os.O_RDWR)
        except OSError:
            continue
        try:
            if try_flock(fd):
                for leftover in (found, found.with_name(found.name + "-journal")):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
        finally:
            os.close(fd)


def _identity(path: Path) -> tuple[int, int] | None:
    """The file `path` names (device, inode), or None if there is none."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino
