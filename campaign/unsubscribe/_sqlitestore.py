"""The unsubscribe store in one SQLite file: its schema, its migrations and its SQL (`StoreSql`).

WAL, so a campaign reads while the endpoint writes, across processes; a write is one IMMEDIATE
transaction, so writers go one at a time and row ids become visible in the order they are given.
The file is created 0600 and marked as ours (PRAGMA application_id), so a ledger or another
database is never taken for a store, and never changed. One connection, one lock: safe to share
between threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from campaign.errors import InputFileError
from campaign.unsubscribe._sql import BounceRow, EntryRow, EventRow, NumberedEntryRow
from campaign.unsubscribe._values import BLOCK_KIND, BounceRecord, StoreError

__all__ = ["SqliteStoreSql", "open_sqlite_store"]

# Marks the file as ours (PRAGMA application_id), so a ledger or another database is never taken for a store.
_APPLICATION_ID = 0x43554E53  # "CUNS"
# How long a write waits for another process's (a campaign's import, `events pull`) before it fails with
# StoreError: `campaign serve` then answers 503 and Nylas retries, within its 10 s.
_BUSY_TIMEOUT_S = 5.0
# Each version's statements, applied in order to a store older than it (PRAGMA user_version).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE IF NOT EXISTS unsubscribes ("
        " id INTEGER PRIMARY KEY,"
        " campaign TEXT NOT NULL,"  # '' for entries added by hand, imported, or from a bounce
        " recipient_key TEXT NOT NULL,"
        " email TEXT,"  # the lower-cased address, when the key is one (or it was given)
        " recorded_at TEXT NOT NULL,"
        " source TEXT NOT NULL,"
        " UNIQUE (campaign, recipient_key))",
        "CREATE INDEX IF NOT EXISTS unsubscribes_email ON unsubscribes (email)",
    ),
    (
        # Notifications as received (Nylas delivers at least once: one row per envelope id).
        "CREATE TABLE events ("
        " id TEXT PRIMARY KEY,"
        " type TEXT NOT NULL,"
        " grant_id TEXT,"
        " received_at TEXT NOT NULL,"
        " body TEXT NOT NULL)",
        "CREATE TABLE bounces ("
        " id INTEGER PRIMARY KEY,"
        " email TEXT NOT NULL,"
        " hard INTEGER NOT NULL,"
        " code TEXT,"
        " kind TEXT,"
        " reason TEXT,"
        " bounced_at TEXT NOT NULL,"
        " message_id TEXT,"
        " event_id TEXT NOT NULL,"
        " UNIQUE (event_id, email))",
        "CREATE INDEX bounces_email ON bounces (email, bounced_at)",
        # Campaigns look a batch of recipient keys up at a time (the UNIQUE index starts with campaign).
        "CREATE INDEX unsubscribes_key ON unsubscribes (recipient_key)",
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
)
_SCHEMA_VERSION = len(_MIGRATIONS)
_ENTRY = "campaign, recipient_key, email, recorded_at, source"


def open_sqlite_store(path: Path, *, create: bool) -> SqliteStoreSql:
    """The store file at `path` (created, mode 0600, when `create`), set up or migrated;
    InputFileError if it is missing (and not to be created) or not a store."""
    if not path.exists():
        if not create:
            message = (
                f"{path}: no unsubscribe store here; check the path (it is created by the first unsubscribe)"
            )
            raise InputFileError(message)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            message = f"{path}: cannot create the unsubscribe store ({exc.strerror or exc})"
            raise StoreError(message) from exc
    if path.is_dir():
        message = f"{path}: is a folder; give the unsubscribe store's file (e.g. unsubscribes.sqlite)"
        raise InputFileError(message)
    try:
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        message = f"{path}: cannot open the unsubscribe store ({exc})"
        raise StoreError(message) from exc
    sql = SqliteStoreSql(connection, path)
    try:
        sql.set_up()
    except BaseException:
        connection.close()
        raise
    return sql


class _Writes:
    """The writes of one SQLite transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def add_entries(self, rows: Sequence[EntryRow]) -> int:
        before = self._db.total_changes
        self._db.executemany(
            f"INSERT OR IGNORE INTO unsubscribes ({_ENTRY}) VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        return self._db.total_changes - before

    def add_event(self, event_id: str, kind: str, grant_id: str | None, received_at: str, body: str) -> bool:
        before = self._db.total_changes
        self._db.execute(
            "INSERT OR IGNORE INTO events (id, type, grant_id, received_at, body) VALUES (?, ?, ?, ?, ?)",
            (event_id, kind, grant_id, received_at, body),
        )
        return self._db.total_changes != before

    def add_bounce(self, bounce: BounceRecord, event_id: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO bounces"
            " (email, hard, code, kind, reason, bounced_at, message_id, event_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                bounce.email,
                int(bounce.hard),
                bounce.code,
                bounce.kind,
                bounce.reason,
                bounce.bounced_at,
                bounce.message_id,
                event_id,
            ),
        )

    def soft_bounces_between(self, email: str, start: str, end: str) -> list[tuple[str, str]]:
        rows = self._db.execute(
            "SELECT bounced_at, event_id FROM bounces WHERE email = ? AND hard = 0 AND kind IS NOT ?"
            " AND bounced_at BETWEEN ? AND ?",
            (email, BLOCK_KIND, start, end),
        ).fetchall()
        return [(str(at), str(event_id)) for at, event_id in rows]

    def set_setting(self, name: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO settings VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )


class SqliteStoreSql:
    """The SQL of a store file, over one connection shared by threads (one lock)."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        self._lock = threading.Lock()
        self._journal_mode = "wal"

    def __repr__(self) -> str:
        return f"SqliteStoreSql({str(self.path)!r})"

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def notes(self) -> tuple[str, ...]:
        if self._journal_mode == "wal":
            return ()
        note = (
            f"unsubscribe store {self.path}: SQLite could not use WAL on this file system (journal mode "
            f"{self._journal_mode!r}), so while a command reads the store its writes wait, and `campaign "
            "serve` answers 503 when they wait too long; keep the store on a local disk, or use a "
            "PostgreSQL store"
        )
        return (note,)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def find(self, campaign: str, recipient_key: str) -> EntryRow | None:
        rows = self._query(
            f"SELECT {_ENTRY} FROM unsubscribes WHERE campaign = ? AND recipient_key = ?",
            (campaign, recipient_key),
        )
        return rows[0] if rows else None

    def entries(self) -> list[EntryRow]:
        return self._query(f"SELECT {_ENTRY} FROM unsubscribes ORDER BY id")

    def entries_for(self, keys: Sequence[str], emails: Sequence[str]) -> list[EntryRow]:
        return self._query(
            f"SELECT {_ENTRY} FROM unsubscribes"
            " WHERE id IN (SELECT u.id FROM json_each(?) AS j CROSS JOIN unsubscribes AS u"
            " ON u.recipient_key = j.value UNION SELECT u.id FROM json_each(?) AS j"
            " CROSS JOIN unsubscribes AS u ON u.email = j.value) ORDER BY id",
            (json.dumps(list(keys)), json.dumps(list(emails))),
        )

    def entries_since(self, last_id: int) -> list[NumberedEntryRow]:
        return self._query(f"SELECT id, {_ENTRY} FROM unsubscribes WHERE id > ? ORDER BY id", (last_id,))

    def newest_id(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(id), 0) FROM unsubscribes")[0][0])

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM unsubscribes")[0][0])

    def events_since(self, kind: str, last_seq: int) -> list[EventRow]:
        return self._query(
            "SELECT rowid, body, received_at FROM events WHERE type = ? AND rowid > ? ORDER BY rowid",
            (kind, last_seq),
        )

    def events_of(self, kinds: Sequence[str]) -> list[tuple[str, str, str]]:
        return self._query(
            "SELECT type, body, received_at FROM events WHERE type IN (SELECT value FROM json_each(?))"
            " ORDER BY received_at, rowid",
            (json.dumps(list(kinds)),),
        )

    def event_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM events")[0][0])

    def bounces(self, email: str) -> list[BounceRow]:
        return self._bounces("email = ?", email)

    def bounces_since(self, since: str) -> list[BounceRow]:
        return self._bounces("bounced_at >= ?", since)

    def _bounces(self, where: str, value: str) -> list[BounceRow]:
        rows = self._query(
            "SELECT email, hard, bounced_at, code, kind, reason, message_id FROM bounces "
            f"WHERE {where} ORDER BY bounced_at, id",
            (value,),
        )
        return [(e, bool(hard), *rest) for e, hard, *rest in rows]

    def settings(self) -> dict[str, str]:
        return dict(self._query("SELECT name, value FROM settings"))

    @contextmanager
    def write(self) -> Iterator[_Writes]:
        """One IMMEDIATE transaction under the store's lock; sqlite errors become StoreError."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                message = f"{self.path}: cannot write the unsubscribe store ({exc})"
                raise StoreError(message) from exc
            try:
                yield _Writes(self._db)
            except BaseException as error:
                self._roll_back()
                if isinstance(error, sqlite3.Error):
                    message = f"{self.path}: cannot write the unsubscribe store ({error})"
                    raise StoreError(message) from error
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                # A failed COMMIT (busy, disk full, I/O) may leave the transaction open: kept, it would hold
                # the file's lock, show this connection's reads what was never committed, and fail every
                # later write ("within a transaction"), so a retried notification could never be kept.
                self._roll_back()
                message = f"{self.path}: cannot write the unsubscribe store ({exc})"
                raise StoreError(message) from exc

    def _roll_back(self) -> None:
        """End the failed write's transaction, if SQLite has not already: on some errors (a full disk)
        it rolls back itself, and a ROLLBACK then fails, in place of the error that says what happened."""
        if not self._db.in_transaction:
            return
        # The error being raised says what went wrong; a ROLLBACK that fails too adds nothing to it.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def set_up(self) -> None:
        """Check the file is a store (or empty), then bring its schema to this version."""
        try:
            with self._lock:
                self._db.execute(f"PRAGMA busy_timeout={round(_BUSY_TIMEOUT_S * 1000)}")
                (app_id,) = self._db.execute("PRAGMA application_id").fetchone()
                (version,) = self._db.execute("PRAGMA user_version").fetchone()
                rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        except sqlite3.DatabaseError as exc:
            message = f"{self.path}: not an unsubscribe store ({exc}); check the path"
            raise InputFileError(message) from exc
        # Checked before anything is written, so another database is never changed.
        if app_id != _APPLICATION_ID and (app_id != 0 or {name for (name,) in rows} - {"unsubscribes"}):
            message = (
                f"{self.path}: this SQLite file is not an unsubscribe store (a ledger?); "
                "name a store such as unsubscribes.sqlite"
            )
            raise InputFileError(message)
        try:
            with self._lock:
                # SQLite answers the mode it set: a file system without shared memory or locks that WAL
                # needs (some network ones) keeps the rollback journal, where a reader blocks a commit.
                (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
                self._journal_mode = str(mode).lower()
                # FULL: each commit is on the disk before the endpoint answers 200 (NORMAL syncs the WAL at
                # checkpoints only, so a power cut could lose opt-outs a mail provider saw accepted, and
                # never sends again). A click or a notification is worth its fsync.
                self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            message = f"{self.path}: cannot open the unsubscribe store ({exc})"
            raise StoreError(message) from exc
        if version > _SCHEMA_VERSION:
            message = f"{self.path}: written by a newer version of campaign; upgrade campaign"
            raise StoreError(message)
        if version == _SCHEMA_VERSION:
            return  # a reader (a running campaign) takes no write lock just to open the store
        with self.write():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version < _SCHEMA_VERSION:  # still: another process may have set it up meanwhile
                for statements in _MIGRATIONS[version:]:
                    for statement in statements:
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _query(self, query: str, params: tuple[object, ...] = ()) -> list[Any]:
        try:
            with self._lock:
                return self._db.execute(query, params).fetchall()
        except sqlite3.Error as exc:
            message = f"{self.path}: cannot read the unsubscribe store ({exc})"
            raise StoreError(message) from exc
