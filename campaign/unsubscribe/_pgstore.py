"""The unsubscribe store in PostgreSQL: its schema, its migrations and its SQL (`StoreSql`).

For opt-outs shared by several machines (`campaign serve` on some, campaigns on others). The
store's tables are in the schema `campaign_store`, so one database may hold it beside other
things (campaign ledgers keep to `campaign_ledger`); every name here is written with its schema,
and the connection's search_path is never relied on. The schema's version is the highest row of
`campaign_store.schema_migrations`: an older store is migrated on open (one process at a time, under
an advisory lock), a newer one refused.

Times are kept as the ISO text the store was given, compared and sorted byte by byte (COLLATE "C"),
as the SQLite store keeps them, so both answer alike. PostgreSQL text cannot hold NUL: a NUL in a
value is kept as U+FFFD (in lookups too, so they still match).

Every write transaction first takes the store's advisory lock, so writers go one at a time, as they
do in SQLite: ids (entries, events) become visible in the order they were given, and a reader paging
by id never steps past a row that commits later. A write waits for the lock a few seconds at most (as
SQLite waits for a busy file), then fails with StoreError: a writer stalled with the lock held (its
machine gone, its network cut) must not hold every other one, and the endpoint's threads, for good.
Connections send TCP keepalives, so a server that vanished is noticed in about a minute.

psycopg 3, synchronous, over a small `psycopg_pool.ConnectionPool` (the endpoint writes from several
threads). The URL holds no password (the manifest and the CLI refuse one): libpq reads PGPASSWORD
or ~/.pgpass itself. psycopg's errors become `StoreError` naming the store by its URL, in one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from campaign.errors import InputFileError
from campaign.manifest import postgres_keepalives
from campaign.unsubscribe._sql import BounceRow, EntryRow, EventRow, NumberedEntryRow
from campaign.unsubscribe._values import BLOCK_KIND, BounceRecord, StoreError

__all__ = ["SCHEMA", "PostgresStoreSql", "open_postgres_store", "postgres_store_exists"]

SCHEMA = "campaign_store"
# Advisory locks of the store (pg_advisory_xact_lock's two-key form: its own key space).
_LOCK_CLASS = 0x43554E53  # "CUNS", as the SQLite store's application_id
_MIGRATING = 0
_WRITING = 1
# Each version: its name, and its statements, applied in order to a store older than it.
_MIGRATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entries, events, bounces, settings",
        (
            """
            CREATE TABLE campaign_store.unsubscribes (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                campaign text NOT NULL,          -- '' for entries added by hand, imported, or from a bounce
                recipient_key text NOT NULL,
                email text,                      -- the lower-cased address, when the key is one (or given)
                recorded_at text COLLATE "C" NOT NULL,
                source text NOT NULL,
                UNIQUE (campaign, recipient_key)
            )
            """,
            "CREATE INDEX unsubscribes_email ON campaign_store.unsubscribes (email)",
            # Campaigns look a batch of recipient keys up at a time (the UNIQUE index starts with campaign).
            "CREATE INDEX unsubscribes_key ON campaign_store.unsubscribes (recipient_key)",
            # Notifications as received (Nylas delivers at least once: one row per envelope id).
            """
            CREATE TABLE campaign_store.events (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                id text NOT NULL UNIQUE,
                type text NOT NULL,
                grant_id text,
                received_at text COLLATE "C" NOT NULL,
                body text NOT NULL
            )
            """,
            "CREATE INDEX events_type ON campaign_store.events (type, seq)",
            """
            CREATE TABLE campaign_store.bounces (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                email text NOT NULL,
                hard boolean NOT NULL,
                code text,
                kind text,
                reason text,
                bounced_at text COLLATE "C" NOT NULL,
                message_id text,
                event_id text NOT NULL,
                UNIQUE (event_id, email)
            )
            """,
            "CREATE INDEX bounces_email ON campaign_store.bounces (email, bounced_at)",
            "CREATE TABLE campaign_store.settings (name text PRIMARY KEY, value text NOT NULL)",
        ),
    ),
)
_SCHEMA_VERSION = len(_MIGRATIONS)

# Whether the schema is there, whether it has its versions, how many tables it holds: in one statement,
# so that all three are of one moment (another process may be creating the store meanwhile).
_STATE = """
    SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'campaign_store'),
           EXISTS (SELECT FROM pg_catalog.pg_tables
                    WHERE schemaname = 'campaign_store' AND tablename = 'schema_migrations'),
           (SELECT COUNT(*) FROM pg_catalog.pg_tables WHERE schemaname = 'campaign_store')
"""
_VERSION = "SELECT COALESCE(MAX(version), 0) FROM campaign_store.schema_migrations"
_CREATE_SCHEMA = "CREATE SCHEMA campaign_store"
_CREATE_MIGRATIONS = """
    CREATE TABLE IF NOT EXISTS campaign_store.schema_migrations (
        version integer PRIMARY KEY,
        name text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""
_RECORD_MIGRATION = "INSERT INTO campaign_store.schema_migrations (version, name) VALUES (%s, %s)"

# Entries in the order given (their ids too); one already there for (campaign, recipient_key) is left.
_INSERT_ENTRIES = """
    INSERT INTO campaign_store.unsubscribes (campaign, recipient_key, email, recorded_at, source)
    SELECT campaign, recipient_key, email, recorded_at, source
      FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
           WITH ORDINALITY AS given (campaign, recipient_key, email, recorded_at, source, position)
     ORDER BY position
        ON CONFLICT (campaign, recipient_key) DO NOTHING
"""
_INSERT_EVENT = """
    INSERT INTO campaign_store.events (id, type, grant_id, received_at, body)
    VALUES (%s, %s, %s, %s, %s)
        ON CONFLICT (id) DO NOTHING
"""
_INSERT_BOUNCE = """
    INSERT INTO campaign_store.bounces (email, hard, code, kind, reason, bounced_at, message_id, event_id)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (event_id, email) DO NOTHING
"""
_SOFT_BOUNCES = """
    SELECT bounced_at, event_id FROM campaign_store.bounces
    WHERE email = %s AND NOT hard AND kind IS DISTINCT FROM %s AND bounced_at BETWEEN %s AND %s
"""
_SET_SETTING = """
    INSERT INTO campaign_store.settings (name, value) VALUES (%s, %s)
        ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
_FIND = """
    SELECT campaign, recipient_key, email, recorded_at, source FROM campaign_store.unsubscribes
     WHERE campaign = %s AND recipient_key = %s
"""
_ENTRIES = """
    SELECT campaign, recipient_key, email, recorded_at, source FROM campaign_store.unsubscribes
     ORDER BY id
"""
_ENTRIES_FOR = """
    SELECT campaign, recipient_key, email, recorded_at, source FROM campaign_store.unsubscribes
     WHERE recipient_key = ANY(%s::text[]) OR email = ANY(%s::text[])
     ORDER BY id
"""
_ENTRIES_SINCE = """
    SELECT id, campaign, recipient_key, email, recorded_at, source FROM campaign_store.unsubscribes
     WHERE id > %s
     ORDER BY id
"""
_NEWEST_ID = "SELECT COALESCE(MAX(id), 0) FROM campaign_store.unsubscribes"
_COUNT = "SELECT COUNT(*) FROM campaign_store.unsubscribes"
_EVENTS_SINCE = """
    SELECT seq, body, received_at FROM campaign_store.events
     WHERE type = %s AND seq > %s
     ORDER BY seq
"""
_EVENTS_OF = """
    SELECT type, body, received_at FROM campaign_store.events
     WHERE type = ANY(%s::text[])
     ORDER BY received_at, seq
"""
_EVENT_COUNT = "SELECT COUNT(*) FROM campaign_store.events"
_SELECT_BOUNCES = "SELECT email, hard, bounced_at, code, kind, reason, message_id FROM campaign_store.bounces"
_BOUNCES = f"{_SELECT_BOUNCES} WHERE email = %s ORDER BY bounced_at, id"
_BOUNCES_SINCE = f"{_SELECT_BOUNCES} WHERE bounced_at >= %s ORDER BY bounced_at, id"
_SETTINGS = "SELECT name, value FROM campaign_store.settings"
_LOCK = "SELECT pg_advisory_xact_lock(%s, %s)"
# For the rest of the write's transaction only (SET LOCAL): a lock not had within it fails the write.
_LOCK_WAIT = "SELECT set_config('lock_timeout', %s, true)"

# Connections a store holds at most (the endpoint's threads share them), and how long a caller waits
# for one (as long as SQLite waits for a busy file) or for the server to answer a connection.
_POOL_SIZE = 4
_WAIT_S = 5.0
_LOCK_TIMEOUT_S = 5.0  # how long a write waits for the store's lock (or a row another write holds)
_CONNECT_TIMEOUT_S = 10
# The pool reports what it does in the background (a connection it dropped or could not make) as log
# warnings; with no logging set up Python would print them to the terminal, several lines in the
# middle of a command's output. What matters reaches the caller as a StoreError; a program that
# configures logging still gets them.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())


def open_postgres_store(url: str, *, create: bool) -> PostgresStoreSql:
    """The store in the database at `url`, its schema created (when `create`) or migrated; StoreError
    when the server cannot be reached or refuses us, InputFileError when there is no store (and none is
    to be created) or the schema holds something else."""
    options = _connection_options(url)
    try:
        with psycopg.connect(url, **options) as connection:
            _set_up(connection, url, create=create)
    except psycopg.Error as exc:
        raise StoreError(f"{url}: cannot open the unsubscribe store ({_reason(exc)})") from exc
    pool = ConnectionPool(
        url,
        kwargs=options,
        min_size=1,
        max_size=_POOL_SIZE,
        open=False,
        timeout=_WAIT_S,
        check=ConnectionPool.check_connection,  # a connection the server dropped is replaced, not used
        name=SCHEMA,
    )
    pool.open()
    return PostgresStoreSql(pool, url)


def postgres_store_exists(url: str) -> bool:
    """Whether the database at `url` holds a store (set up by a first open); StoreError when it cannot
    be asked (an opt-out that cannot be read is never taken as none)."""
    options = _connection_options(url)
    try:
        with psycopg.connect(url, **options) as connection:
            row = connection.execute(_STATE).fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"{url}: cannot open the unsubscribe store ({_reason(exc)})") from exc
    return row is not None and bool(row[1])


class _Writes:
    """The writes of one PostgreSQL transaction."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._db = connection

    def add_entries(self, rows: Sequence[EntryRow]) -> int:
        if not rows:
            return 0
        columns = [[_text(value) for value in column] for column in zip(*rows, strict=True)]
        return self._db.execute(_INSERT_ENTRIES, columns).rowcount

    def add_event(self, event_id: str, kind: str, grant_id: str | None, received_at: str, body: str) -> bool:
        values = [_text(value) for value in (event_id, kind, grant_id, received_at, body)]
        return self._db.execute(_INSERT_EVENT, values).rowcount == 1

    def add_bounce(self, bounce: BounceRecord, event_id: str) -> None:
        b = bounce
        texts = [_text(value) for value in (b.code, b.kind, b.reason, b.bounced_at, b.message_id, event_id)]
        self._db.execute(_INSERT_BOUNCE, (_text(b.email), b.hard, *texts))

    def soft_bounces_between(self, email: str, start: str, end: str) -> list[tuple[str, str]]:
        rows = self._db.execute(_SOFT_BOUNCES, (_text(email), BLOCK_KIND, start, end)).fetchall()
        return [(str(at), str(event_id)) for at, event_id in rows]

    def set_setting(self, name: str, value: str) -> None:
        self._db.execute(_SET_SETTING, (name, value))


class PostgresStoreSql:
    """The SQL of a store in PostgreSQL, over a small pool of connections shared by threads."""

    def __init__(self, pool: ConnectionPool, url: str) -> None:
        self._pool = pool
        self._url = url

    def __repr__(self) -> str:
        return f"PostgresStoreSql({self._url!r})"

    @property
    def where(self) -> str:
        return self._url

    @property
    def notes(self) -> tuple[str, ...]:
        return ()

    def close(self) -> None:
        self._pool.close()

    def find(self, campaign: str, recipient_key: str) -> EntryRow | None:
        rows = self._query(_FIND, (_text(campaign), _text(recipient_key)))
        return rows[0] if rows else None

    def entries(self) -> list[EntryRow]:
        return self._query(_ENTRIES)

    def entries_for(self, keys: Sequence[str], emails: Sequence[str]) -> list[EntryRow]:
        return self._query(_ENTRIES_FOR, ([_text(key) for key in keys], [_text(email) for email in emails]))

    def entries_since(self, last_id: int) -> list[NumberedEntryRow]:
        return self._query(_ENTRIES_SINCE, (last_id,))

    def newest_id(self) -> int:
        return int(self._query(_NEWEST_ID)[0][0])

    def count(self) -> int:
        return int(self._query(_COUNT)[0][0])

    def events_since(self, kind: str, last_seq: int) -> list[EventRow]:
        return self._query(_EVENTS_SINCE, (kind, last_seq))

    def events_of(self, kinds: Sequence[str]) -> list[tuple[str, str, str]]:
        return self._query(_EVENTS_OF, (list(kinds),))

    def event_count(self) -> int:
        return int(self._query(_EVENT_COUNT)[0][0])

    def bounces(self, email: str) -> list[BounceRow]:
        return self._query(_BOUNCES, (_text(email),))

    def bounces_since(self, since: str) -> list[BounceRow]:
        return self._query(_BOUNCES_SINCE, (since,))

    def settings(self) -> dict[str, str]:
        return dict(self._query(_SETTINGS))

    @contextmanager
    def write(self) -> Iterator[_Writes]:
        """One transaction, holding the store's write lock until it commits; StoreError when the lock
        is not had within `_LOCK_TIMEOUT_S` (another writer holds it)."""
        try:
            with self._pool.connection() as connection, connection.transaction():
                connection.execute(_LOCK_WAIT, (f"{round(_LOCK_TIMEOUT_S * 1000)}ms",))
                connection.execute(_LOCK, (_LOCK_CLASS, _WRITING))
                yield _Writes(connection)
        except psycopg.errors.LockNotAvailable as exc:
            message = (
                f"{self._url}: cannot write the unsubscribe store (another writer has held it for "
                f"{_LOCK_TIMEOUT_S:g} s; try again)"
            )
            raise StoreError(message) from exc
        except psycopg.Error as exc:
            raise StoreError(f"{self._url}: cannot write the unsubscribe store ({_reason(exc)})") from exc

    def _query(self, query: str, params: Sequence[object] = ()) -> list[Any]:
        try:
            with self._pool.connection() as connection:
                return connection.execute(query, params).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"{self._url}: cannot read the unsubscribe store ({_reason(exc)})") from exc


def _set_up(connection: psycopg.Connection[Any], url: str, *, create: bool) -> None:
    """Check the schema is a store's (or missing, or empty), then bring it to this version."""
    version = _version(connection, url, create=create)
    if version == _SCHEMA_VERSION:
        return  # a reader (a running campaign) takes no lock just to open the store
    with connection.transaction():
        connection.execute(_LOCK, (_LOCK_CLASS, _MIGRATING))
        # Again, under the lock: another process may have set it up meanwhile.
        version = _version(connection, url, create=True)
        if version == _SCHEMA_VERSION:
            return
        (there, _, _), *_ = connection.execute(_STATE).fetchall()
        if not there:  # not when it exists: CREATE SCHEMA IF NOT EXISTS needs the right to create one
            connection.execute(_CREATE_SCHEMA)
        connection.execute(_CREATE_MIGRATIONS)
        for number, (name, statements) in enumerate(_MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                connection.execute(statement)
            connection.execute(_RECORD_MIGRATION, (number, name))


def _version(connection: psycopg.Connection[Any], url: str, *, create: bool) -> int:
    """The store's schema version (0: none yet); InputFileError when there is none and none is to be
    created, or the schema holds tables of something else; StoreError when it is newer than ours."""
    (schema_there, versions_there, tables), *_ = connection.execute(_STATE).fetchall()
    if not schema_there and not create:
        message = (
            f"{url}: no unsubscribe store in this database yet (schema {SCHEMA}); check the URL (it is "
            "created by the first unsubscribe, `campaign serve` or `campaign suppress add`)"
        )
        raise InputFileError(message)
    if not versions_there:
        if tables:  # checked before anything is written, so another program's tables are never changed
            message = (
                f"{url}: the schema {SCHEMA} in this database holds tables that are not an unsubscribe "
                "store's; name another database"
            )
            raise InputFileError(message)
        return 0
    (version,), *_ = connection.execute(_VERSION).fetchall()
    if version > _SCHEMA_VERSION:
        raise StoreError(f"{url}: written by a newer version of campaign; upgrade campaign")
    return int(version)


def _connection_options(url: str) -> dict[str, Any]:
    """Autocommit (a write is an explicit transaction), and TCP keepalives, a connect timeout and a
    name for the server's views unless the URL sets its own."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StoreError(f"{url}: cannot open the unsubscribe store ({_reason(exc)})") from exc
    options: dict[str, Any] = {"autocommit": True, **postgres_keepalives(given)}
    if "connect_timeout" not in given:
        options["connect_timeout"] = _CONNECT_TIMEOUT_S
    if "application_name" not in given:
        options["application_name"] = "campaign unsubscribe store"
    return options


def _text(value: str | None) -> str | None:
    """`value` as PostgreSQL text can hold it: a NUL becomes U+FFFD."""
    return None if value is None else value.replace("\x00", "\ufffd")


def _reason(exc: psycopg.Error) -> str:
    """What went wrong, in one line (the server's first line, or libpq's), never holding the password."""
    text = " ".join((exc.diag.message_primary or str(exc)).split()) or type(exc).__name__
    password = os.environ.get("PGPASSWORD")
    return text.replace(password, "***") if password else text
