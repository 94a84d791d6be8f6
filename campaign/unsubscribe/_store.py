"""The unsubscribe store: one SQLite file of who asked not to be mailed, shared by the endpoint and campaigns.

The one-click endpoint and `campaign suppress` write it; preflight and a running
campaign read it (WAL, so a campaign reads while the endpoint writes, across
processes). A row records the campaign the link came from, the recipient key (and
the address when the key is one), when, and how (one-click, the confirmation page,
by hand, an import, a bounce). Every campaign that names the store skips everyone in it: the
store is the list. It also keeps the Nylas notifications `campaign serve` receives (once per
envelope id) and the bounces they report: a hard bounce suppresses its address at once, soft
bounces once `BounceRules` say so. It never holds a secret, never sends and never renders.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from campaign.clock import Clock, SystemClock
from campaign.errors import InputFileError, LedgerError
from campaign.manifest import STORE_SUFFIXES, Manifest
from campaign.models import Recipient, SkipReason

__all__ = [
    "BOUNCE_SOURCE",
    "BounceRecord",
    "BounceRules",
    "Engagement",
    "StoreEntry",
    "StoreError",
    "StoreFollower",
    "SuppressionStore",
    "ThreadReply",
    "UnsubscribeWatch",
    "Unsubscribed",
    "describe_entry",
    "is_store_path",
    "list_store_paths",
    "load_unsubscribed",
    "lookup_unsubscribed",
    "open_store",
]

# Marks the file as ours (PRAGMA application_id), so a ledger or another database is never taken for a store.
_APPLICATION_ID = 0x43554E53  # "CUNS"
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
BOUNCE_SOURCE = "bounce"  # the source of a suppression a bounce made (skip reason `bounced`)
# Soft bounces (4xx) suppress an address once this many arrive within this many days (listmonk's
# and Mautic's rule of thumb); a hard bounce (5xx) suppresses at once.
DEFAULT_SOFT_BOUNCE_LIMIT = 3
DEFAULT_SOFT_BOUNCE_DAYS = 30


@dataclass(frozen=True, slots=True)
class BounceRecord:
    """One bounced address of a notification, classified (`hard`: permanent)."""

    email: str
    hard: bool
    bounced_at: str  # ISO UTC
    code: str | None = None
    kind: str | None = None  # the provider's type, e.g. mailbox_unavailable
    reason: str | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class ThreadReply:
    """A `thread.replied` notification kept in a store: someone other than the sender answered."""

    label: str  # the tracked message's `tracking_options.label` (campaign:recipient key:step)
    root_message_id: str  # the tracked message
    message_id: str  # the reply
    at: str  # when it was received (ISO)


@dataclass(frozen=True, slots=True)
class Engagement:
    """What the tracking notifications say of one sent message: opens, clicks, replies (ISO UTC times)."""

    opens: int = 0
    first_open: str | None = None
    last_open: str | None = None
    clicks: int = 0
    urls: tuple[str, ...] = ()
    replies: int = 0
    first_reply: str | None = None


@dataclass(frozen=True, slots=True)
class BounceRules:
    """When soft bounces suppress an address: `limit` of them within `days`."""

    limit: int = DEFAULT_SOFT_BOUNCE_LIMIT
    days: int = DEFAULT_SOFT_BOUNCE_DAYS


class StoreError(LedgerError):
    """The unsubscribe store cannot be opened, read or written (exit 74, like the ledger)."""


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """One unsubscribe: from which campaign, who (key and address), when (ISO UTC) and how."""

    campaign: str
    recipient_key: str
    email: str | None
    recorded_at: str
    source: str


def is_store_path(path: Path) -> bool:
    """Whether a suppression source names an unsubscribe store (by its suffix) rather than a list file."""
    return path.suffix.lower() in STORE_SUFFIXES


def list_store_paths(manifest: Manifest) -> tuple[Path, ...]:
    """The unsubscribe stores a manifest names: stores in `recipients.suppress`, then `unsubscribe.store`."""
    found = [path for path in manifest.recipients.suppress if is_store_path(path)]
    store = None if manifest.unsubscribe is None else manifest.unsubscribe.store
    if store is not None and store not in found:
        found.append(store)
    return tuple(found)


def open_store(path: Path, *, clock: Clock, create: bool = True) -> SuppressionStore:
    """Open the store at `path` (creating it, mode 0600, when `create`); InputFileError if it is not one."""
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
    store = SuppressionStore(connection, path=path, clock=clock)
    try:
        store._set_up()
    except BaseException:
        connection.close()
        raise
    return store


class SuppressionStore:
    """Reads and writes one unsubscribe store; safe to share between threads (one lock per store)."""

    def __init__(self, connection: sqlite3.Connection, *, path: Path, clock: Clock) -> None:
        self._db = connection
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """Where the store file is."""
        return self._path

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def record(self, campaign: str, recipient_key: str, *, email: str | None = None, source: str) -> bool:
        """Record that `recipient_key` unsubscribed from `campaign`; False if it already had (harmless)."""
        entry = self._entry(campaign, recipient_key, email, source)
        return self.record_many([entry]) == 1

    def record_many(self, entries: Iterable[StoreEntry]) -> int:
        """Record several entries in one transaction; returns how many were new."""
        rows = [(e.campaign, e.recipient_key, e.email, e.recorded_at, e.source) for e in entries]
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO unsubscribes (campaign, recipient_key, email, recorded_at, source) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            return db.total_changes - before

    def build_entry(self, campaign: str, recipient_key: str, *, email: str | None, source: str) -> StoreEntry:
        """An entry stamped with the store's clock (for `record_many`)."""
        return self._entry(campaign, recipient_key, email, source)

    def find(self, campaign: str, recipient_key: str) -> StoreEntry | None:
        """The entry for `recipient_key` from `campaign`, if it is recorded."""
        found = self._query(
            "SELECT campaign, recipient_key, email, recorded_at, source FROM unsubscribes "
            "WHERE campaign = ? AND recipient_key = ?",
            (campaign, recipient_key),
        )
        return StoreEntry(*found[0]) if found else None

    def entries(self) -> list[StoreEntry]:
        """Every entry, oldest first."""
        rows = self._query(
            "SELECT campaign, recipient_key, email, recorded_at, source FROM unsubscribes ORDER BY id"
        )
        return [StoreEntry(*row) for row in rows]

    def entries_for(self, keys: Iterable[str], emails: Iterable[str]) -> list[StoreEntry]:
        """The entries for any of `keys` or (lower-cased) `emails`, oldest first: a batch's lookup."""
        rows = self._query(
            "SELECT id, campaign, recipient_key, email, recorded_at, source FROM unsubscribes"
            " WHERE id IN (SELECT u.id FROM json_each(?) AS j CROSS JOIN unsubscribes AS u"
            " ON u.recipient_key = j.value UNION SELECT u.id FROM json_each(?) AS j"
            " CROSS JOIN unsubscribes AS u ON u.email = j.value) ORDER BY id",
            (json.dumps(list(keys)), json.dumps([email.lower() for email in emails])),
        )
        return [StoreEntry(*row[1:]) for row in rows]

    def newest_id(self) -> int:
        """The row id of the newest entry (0: none); `read_since` it to read only what comes after."""
        rows = self._query("SELECT COALESCE(MAX(id), 0) FROM unsubscribes")
        return int(rows[0][0])

    def read_since(self, last_id: int) -> tuple[int, list[StoreEntry]]:
        """Entries recorded after row id `last_id`, and the newest id seen (for cheap re-reads)."""
        rows = self._query(
            "SELECT id, campaign, recipient_key, email, recorded_at, source FROM unsubscribes "
            "WHERE id > ? ORDER BY id",
            (last_id,),
        )
        newest = rows[-1][0] if rows else last_id
        return int(newest), [StoreEntry(*row[1:]) for row in rows]

    def replies_since(self, last_rowid: int) -> tuple[int, list[ThreadReply]]:
        """`thread.replied` notifications kept after `last_rowid` (replies the sender wrote left out),
        and the newest rowid seen, for cheap re-reads."""
        rows = self._query(
            "SELECT rowid, body, received_at FROM events WHERE type = 'thread.replied' AND rowid > ? "
            "ORDER BY rowid",
            (last_rowid,),
        )
        found = []
        for _, body, received_at in rows:
            try:
                obj = json.loads(body)["data"]["object"]
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(obj, dict) or obj.get("from_self") is True:
                continue
            found.append(
                ThreadReply(
                    label=str(obj.get("label") or ""),
                    root_message_id=str(obj.get("root_message_id") or ""),
                    message_id=str(obj.get("message_id") or ""),
                    at=str(received_at),
                )
            )
        return (int(rows[-1][0]) if rows else last_rowid), found

    def count(self) -> int:
        """How many entries the store holds."""
        return int(self._query("SELECT COUNT(*) FROM unsubscribes")[0][0])

    def record_event(
        self,
        event_id: str,
        kind: str,
        *,
        grant_id: str | None,
        body: str,
        bounces: Sequence[BounceRecord] = (),
    ) -> bool:
        """Keep a notification (raw) and its bounces, suppressing what they call for, in one transaction.

        False, and nothing written, when the notification was recorded before (a redelivery).
        """
        rules = self.bounce_rules()
        with self._transaction() as db:
            before = db.total_changes
            db.execute(
                "INSERT OR IGNORE INTO events (id, type, grant_id, received_at, body) VALUES (?, ?, ?, ?, ?)",
                (event_id, kind, grant_id, self._stamp(), body),
            )
            if db.total_changes == before:
                return False
            for bounce in bounces:
                self._record_bounce(db, bounce, event_id, rules)
            return True

    def bounces(self, email: str) -> list[BounceRecord]:
        """The bounces recorded for `email`, oldest first."""
        rows = self._query(
            "SELECT email, hard, bounced_at, code, kind, reason, message_id FROM bounces "
            "WHERE email = ? ORDER BY bounced_at, id",
            (email.lower(),),
        )
        return [BounceRecord(str(e), bool(h), str(at), c, k, r, m) for e, h, at, c, k, r, m in rows]

    def engagement(self) -> dict[str, Engagement]:
        """Opens, clicks and replies per sent message id, from the tracking notifications kept.

        A reply (`thread.replied`) counts for its `root_message_id`, the tracked message, unless the
        sender wrote it (`from_self`).
        """
        rows = self._query(
            "SELECT type, body, received_at FROM events"
            " WHERE type IN ('message.opened', 'message.link_clicked', 'thread.replied')"
            " ORDER BY received_at, rowid"
        )
        found: dict[str, Engagement] = {}
        for kind, body, stored_at in rows:
            try:
                document = json.loads(body)
                obj = document["data"]["object"]
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(obj, dict) or (kind == "thread.replied" and obj.get("from_self") is True):
                continue
            message_id = obj.get("root_message_id" if kind == "thread.replied" else "message_id")
            if not isinstance(message_id, str) or not message_id:
                continue
            time = document.get("time")
            # When it happened (the envelope's Unix time), else when the notification arrived.
            at = (
                datetime.fromtimestamp(time, UTC).isoformat(timespec="seconds")
                if isinstance(time, int)
                else stored_at
            )
            found[message_id] = _engaged(found.get(message_id) or Engagement(), kind, str(at), obj)
        return found

    def event_count(self) -> int:
        """How many notifications the store holds."""
        return int(self._query("SELECT COUNT(*) FROM events")[0][0])

    def bounce_rules(self) -> BounceRules:
        """The soft-bounce rule this store applies (defaults unless `set_bounce_rules` changed them)."""
        found = dict(self._query("SELECT name, value FROM settings WHERE name LIKE 'soft_bounce_%'"))
        return BounceRules(
            limit=int(found.get("soft_bounce_limit", DEFAULT_SOFT_BOUNCE_LIMIT)),
            days=int(found.get("soft_bounce_days", DEFAULT_SOFT_BOUNCE_DAYS)),
        )

    def set_bounce_rules(self, rules: BounceRules) -> None:
        """Keep a soft-bounce rule with the store, for every process that records bounces in it."""
        with self._transaction() as db:
            for name, value in (("soft_bounce_limit", rules.limit), ("soft_bounce_days", rules.days)):
                db.execute(
                    "INSERT INTO settings VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    (name, str(value)),
                )

    def _record_bounce(
        self, db: sqlite3.Connection, bounce: BounceRecord, event_id: str, rules: BounceRules
    ) -> None:
        email = bounce.email.lower()
        db.execute(
            "INSERT OR IGNORE INTO bounces"
            " (email, hard, code, kind, reason, bounced_at, message_id, event_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                email,
                int(bounce.hard),
                bounce.code,
                bounce.kind,
                bounce.reason,
                bounce.bounced_at,
                bounce.message_id,
                event_id,
            ),
        )
        suppress = bounce.hard
        if not suppress:
            since = (datetime.fromisoformat(bounce.bounced_at) - timedelta(days=rules.days)).isoformat()
            (soft,) = db.execute(
                "SELECT COUNT(*) FROM bounces WHERE email = ? AND hard = 0 AND bounced_at > ?", (email, since)
            ).fetchone()
            suppress = soft >= rules.limit
        if suppress:
            db.execute(
                "INSERT OR IGNORE INTO unsubscribes (campaign, recipient_key, email, recorded_at, source) "
                "VALUES ('', ?, ?, ?, ?)",
                (email, email, self._stamp(), BOUNCE_SOURCE),
            )

    def _stamp(self) -> str:
        return self._clock.now().isoformat(timespec="seconds")

    # --- internals ----------------------------------------------------------

    def _entry(self, campaign: str, recipient_key: str, email: str | None, source: str) -> StoreEntry:
        if email is None and "@" in recipient_key:
            email = recipient_key
        return StoreEntry(
            campaign, recipient_key, None if email is None else email.lower(), self._stamp(), source
        )

    def _set_up(self) -> None:
        try:
            with self._lock:
                self._db.execute("PRAGMA busy_timeout=5000")
                (app_id,) = self._db.execute("PRAGMA application_id").fetchone()
                (version,) = self._db.execute("PRAGMA user_version").fetchone()
                rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        except sqlite3.DatabaseError as exc:
            message = f"{self._path}: not an unsubscribe store ({exc}); check the path"
            raise InputFileError(message) from exc
        # Checked before anything is written, so another database is never changed.
        if app_id != _APPLICATION_ID and (app_id != 0 or {name for (name,) in rows} - {"unsubscribes"}):
            message = (
                f"{self._path}: this SQLite file is not an unsubscribe store (a ledger?); "
                "name a store such as unsubscribes.sqlite"
            )
            raise InputFileError(message)
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            message = f"{self._path}: cannot open the unsubscribe store ({exc})"
            raise StoreError(message) from exc
        if version > _SCHEMA_VERSION:
            message = f"{self._path}: written by a newer version of campaign; upgrade campaign"
            raise StoreError(message)
        if version == _SCHEMA_VERSION:
            return  # a reader (a running campaign) takes no write lock just to open the store
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version < _SCHEMA_VERSION:  # still: another process may have set it up meanwhile
                for statements in _MIGRATIONS[version:]:
                    for statement in statements:
                        db.execute(statement)
                db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _query(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(query, params).fetchall()
        except sqlite3.Error as exc:
            message = f"{self._path}: cannot read the unsubscribe store ({exc})"
            raise StoreError(message) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the store's lock; sqlite errors become StoreError."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                message = f"{self._path}: cannot write the unsubscribe store ({exc})"
                raise StoreError(message) from exc
            try:
                yield self._db
            except BaseException as error:
                self._db.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    message = f"{self._path}: cannot write the unsubscribe store ({error})"
                    raise StoreError(message) from error
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                message = f"{self._path}: cannot write the unsubscribe store ({exc})"
                raise StoreError(message) from exc


class Unsubscribed:
    """Who is in a set of stores, by recipient key and by address: `match` says whether a recipient is."""

    def __init__(self) -> None:
        self._by_key: dict[str, StoreEntry] = {}
        self._by_email: dict[str, StoreEntry] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, entries: Iterable[StoreEntry]) -> None:
        """Take in entries (the first entry for a key or address is kept)."""
        for entry in entries:
            self._by_key.setdefault(entry.recipient_key, entry)
            if entry.email:
                self._by_email.setdefault(entry.email, entry)

    def match(self, recipient: Recipient) -> StoreEntry | None:
        """The entry that unsubscribes `recipient` (same key, or same address), or None."""
        found = self._by_key.get(recipient.key)
        return found if found is not None else self._by_email.get(recipient.address.email.lower())


def lookup_unsubscribed(paths: Sequence[Path], recipients: Sequence[Recipient]) -> Unsubscribed:
    """Who of `recipients` is in the stores at `paths` (by key or address), looked up for this batch
    only: a store may hold millions, and a campaign never holds more of it than one batch needs."""
    found = Unsubscribed()
    stores = StoreFollower(paths, clock=SystemClock())  # reading stamps nothing
    try:
        found.add(stores.look_up(recipients))
    finally:
        stores.close()
    return found


def load_unsubscribed(paths: Sequence[Path]) -> Unsubscribed:
    """Everyone in the stores at `paths`; a store that does not exist yet holds no one (none is created)."""
    found = Unsubscribed()
    for path in paths:
        if not path.exists():
            continue
        store = open_store(path, clock=SystemClock(), create=False)  # reading stamps nothing
        try:
            found.add(store.entries())
        finally:
            store.close()
    return found


def describe_entry(entry: StoreEntry) -> str:
    """A skip detail for the user, e.g. `unsubscribed 2026-01-05 (one-click, campaign spring)`, or
    `bounced 2026-01-06` for an address a bounce suppressed."""
    if entry.source == BOUNCE_SOURCE:
        return f"bounced {entry.recorded_at[:10]}"
    origin = f", campaign {entry.campaign}" if entry.campaign else ""
    return f"unsubscribed {entry.recorded_at[:10]} ({entry.source}{origin})"


_Found = TypeVar("_Found")


class StoreFollower:
    """Stores followed while a run goes on: each opened (for reading) once it exists, and each read
    from where the last read of it stopped, so that a re-read costs only what was added."""

    def __init__(self, paths: Sequence[Path], *, clock: Clock, from_now: bool = False) -> None:
        """With `from_now`, the first `read_new` of a store that exists already reads only what is
        added after this (what is there now is looked up as needed: `look_up`)."""
        self._paths = tuple(paths)
        self._clock = clock
        self._stores: dict[Path, SuppressionStore] = {}
        self._opening = threading.Lock()
        self._last: dict[Path, int] = dict.fromkeys(self._paths, 0)
        if from_now:
            for path in self._paths:
                store = self._store(path)
                if store is not None:
                    self._last[path] = store.newest_id()

    def read_new(self, read: Callable[[SuppressionStore, int], tuple[int, list[_Found]]]) -> list[_Found]:
        """What `read(store, last_id)` finds in each store since the last call; a busy store is read
        next time (what is known still holds)."""
        found: list[_Found] = []
        for path in self._paths:
            store = self._store(path)
            if store is None:
                continue
            try:
                self._last[path], items = read(store, self._last[path])
            except StoreError:
                continue
            found.extend(items)
        return found

    def look_up(self, recipients: Sequence[Recipient]) -> list[StoreEntry]:
        """The entries of every store for any of `recipients` (by key or address), whenever recorded
        (StoreError if a store cannot be read: an opt-out that cannot be read is never taken as none)."""
        if not recipients:
            return []
        keys = [recipient.key for recipient in recipients]
        emails = [recipient.address.email for recipient in recipients]
        found: list[StoreEntry] = []
        for path in self._paths:
            store = self._store(path)
            if store is not None:
                found.extend(store.entries_for(keys, emails))
        return found

    def _store(self, path: Path) -> SuppressionStore | None:
        """The store at `path`, opened for reading once it exists (once: a run looks pages up from the
        ledger's thread while the loop re-reads)."""
        with self._opening:
            store = self._stores.get(path)
            if store is None and path.exists():
                store = self._stores[path] = open_store(path, clock=self._clock, create=False)
            return store

    def close(self) -> None:
        """Close the stores opened for reading."""
        for store in self._stores.values():
            store.close()
        self._stores.clear()


class UnsubscribeWatch:
    """Answers "has this recipient unsubscribed?" during a run, re-reading the stores every `refresh_s`.

    It holds what was added to the stores since it began (each re-read fetches only rows added since
    the last one, so checking before every send stays cheap; a store that appears while the campaign
    runs is picked up), and what `look_up` found for the recipients about to be sent: a store may hold
    millions, and a run never holds more of it than its pages of work need.
    """

    def __init__(self, paths: Sequence[Path], *, clock: Clock, refresh_s: float = 1.0) -> None:
        self._clock = clock
        self._refresh_s = refresh_s
        self._stores = StoreFollower(paths, clock=clock, from_now=True)
        self._known = Unsubscribed()
        self._read_at: float | None = None

    def look_up(self, recipients: Sequence[Recipient]) -> None:
        """Take in what the stores hold for `recipients` (a page of a lane's work, before any is sent)."""
        self._known.add(self._stores.look_up(recipients))

    def is_unsubscribed(self, recipient: Recipient) -> bool:
        """Whether `recipient` is in a store now (as of the last re-read, at most `refresh_s` ago)."""
        return self.opt_out(recipient) is not None

    def opt_out(self, recipient: Recipient) -> SkipReason | None:
        """Why `recipient` must not be mailed now (`unsubscribed`, or `bounced`), or None."""
        now = self._clock.monotonic()
        if self._read_at is None or now - self._read_at >= self._refresh_s:
            self._read_at = now
            self._known.add(self._stores.read_new(SuppressionStore.read_since))
        entry = self._known.match(recipient)
        if entry is None:
            return None
        return SkipReason.BOUNCED if entry.source == BOUNCE_SOURCE else SkipReason.UNSUBSCRIBED

    def reread_next(self) -> None:
        """Re-read the stores at the next check, however recent the last re-read (something was added)."""
        self._read_at = None

    def close(self) -> None:
        """Close the stores opened for reading."""
        self._stores.close()


def _engaged(seen: Engagement, kind: str, at: str, obj: dict[str, Any]) -> Engagement:
    """`seen` with one more open, click (and its URLs) or reply."""
    if kind == "message.opened":
        return replace(seen, opens=seen.opens + 1, first_open=seen.first_open or at, last_open=at)
    if kind == "thread.replied":
        return replace(seen, replies=seen.replies + 1, first_reply=seen.first_reply or at)
    links = obj.get("link_data")
    urls = (
        [str(link["url"]) for link in links if isinstance(link, dict) and link.get("url")]
        if isinstance(links, list)
        else []
    )
    return replace(seen, clicks=seen.clicks + 1, urls=tuple(dict.fromkeys((*seen.urls, *urls))))
