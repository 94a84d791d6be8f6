"""The ledger's PostgreSQL database: connecting, the schema and its migrations, and the writer lock.

Knows the SQL schema and the server, nothing of states or transitions (that is `_postgres.py`). One
database holds many campaigns, each in its own rows; every object lives in the schema
`campaign_ledger`, so that the database can hold other things. Each numbered migration (PostgreSQL's
own, from version 1) is applied once, in order, in one transaction, under a lock that keeps two
commands from migrating at once, and recorded in `schema_migrations`; a database written by a newer
version is refused. The writer lock is a session-level advisory lock per campaign, held on a
connection of its own: the server drops it when that session ends, even when the process holding it
is killed (kill -9).

The connection string may hold a password: it never reaches a message, a log or an exception (every
message names the database by `where`, its URL without the password), and a connection failure is
told in our own words (at most the server's reason, any password in it masked), never in libpq's,
which may quote the string it could not parse.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from campaign.errors import LedgerError
from campaign.manifest import postgres_keepalives

__all__ = [
    "MIGRATIONS",
    "NAMED_BY_OPTION",
    "NAMED_IN_MANIFEST",
    "check_campaign_free",
    "check_schema_version",
    "connect",
    "find_campaign",
    "ledger_error",
    "lock_campaign",
    "migrate_schema",
    "open_campaign",
    "open_pool",
    "unlock_campaign",
]

SCHEMA = "campaign_ledger"

# (name, script). Never edit a released migration: add a new one. Text compares byte by byte
# (COLLATE "C") where it is sorted or compared by order, as in SQLite, whatever the database's
# locale: keys and senders are listed in that order, ISO times sort as text.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "campaigns, with their recipients, send log, meta and journal",
        """
        CREATE TABLE campaigns (
            id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text COLLATE "C" NOT NULL UNIQUE,
            created_at text NOT NULL
        );
        CREATE TABLE meta (
            campaign_id integer NOT NULL REFERENCES campaigns,
            key text COLLATE "C" NOT NULL,
            value text NOT NULL,
            PRIMARY KEY (campaign_id, key)
        );
        CREATE TABLE recipients (
            campaign_id integer NOT NULL REFERENCES campaigns,
            -- SQLite's rowid: the order rows were recorded in (a plan's is list order), the pages' cursor
            id bigint GENERATED ALWAYS AS IDENTITY,
            key text COLLATE "C" NOT NULL,
            row bigint NOT NULL,
            email text COLLATE "C" NOT NULL,
            sender text COLLATE "C",
            state text COLLATE "C" NOT NULL,
            reason text,
            attempts integer NOT NULL DEFAULT 0,
            attempt_no integer NOT NULL DEFAULT 0,
            idempotency_key text,
            key_issued_at text COLLATE "C",
            key_uses integer NOT NULL DEFAULT 0,
            claimed_via text,
            first_claimed_at text COLLATE "C",
            claimed_at text COLLATE "C",
            subject text,
            message_id text,
            thread_id text,
            request_id text,
            replayed boolean NOT NULL DEFAULT false,
            error_type text COLLATE "C",
            error_status integer,
            error_message text,
            note text,
            listed boolean NOT NULL DEFAULT true,
            created_at text COLLATE "C" NOT NULL,
            updated_at text COLLATE "C" NOT NULL,
            sent_at text COLLATE "C",
            step text COLLATE "C" NOT NULL DEFAULT 'message',
            recipient text COLLATE "C",
            previous text COLLATE "C",
            due_at text COLLATE "C",
            auto_reply text,
            cells text,
            PRIMARY KEY (campaign_id, key)
        );
        -- A sender's open rows in the order recorded: a page of a lane's work is a range read.
        CREATE INDEX recipients_state ON recipients (campaign_id, state, sender, id);
        -- Counts of listed rows per state (every run, status) read this index, not the table.
        CREATE INDEX recipients_listed ON recipients (campaign_id, listed, state, sender);
        -- Only rows with a due time: a row sent at once costs no upkeep here on each change of state.
        CREATE INDEX recipients_due ON recipients (campaign_id, due_at) WHERE due_at IS NOT NULL;
        -- The walk over a campaign's rows in the order recorded (`unscheduled_steps`, samples).
        CREATE UNIQUE INDEX recipients_order ON recipients (campaign_id, id);
        CREATE TABLE send_log (
            campaign_id integer NOT NULL REFERENCES campaigns,
            id bigint GENERATED ALWAYS AS IDENTITY,
            sender text COLLATE "C" NOT NULL,
            sent_at double precision NOT NULL,
            recipients integer NOT NULL,
            PRIMARY KEY (campaign_id, id)
        );
        -- The rolling-24 h sums (status, budgets) read this index alone.
        CREATE INDEX send_log_recipients ON send_log (campaign_id, sender, sent_at, recipients);
        CREATE TABLE journal (
            campaign_id integer NOT NULL REFERENCES campaigns,
            id bigint GENERATED ALWAYS AS IDENTITY,
            at text NOT NULL,
            kind text NOT NULL,
            detail text NOT NULL,
            PRIMARY KEY (campaign_id, id)
        )
        """,
    ),
    (
        "workers sharing a campaign, and their leases on its grants",
        # Times are the workers' clocks in Unix seconds (`_leases.py`). A lease row stays when its
        # owner dies; it is free once `expires_at` has passed, and the next owner overwrites it.
        """
        CREATE TABLE workers (
            campaign_id integer NOT NULL REFERENCES campaigns,
            id text COLLATE "C" NOT NULL,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at double precision NOT NULL,
            heartbeat_at double precision NOT NULL,
            PRIMARY KEY (campaign_id, id)
        );
        CREATE TABLE leases (
            campaign_id integer NOT NULL REFERENCES campaigns,
            sender text COLLATE "C" NOT NULL,
            owner text COLLATE "C" NOT NULL,
            expires_at double precision NOT NULL,
            acquired_at double precision NOT NULL,
            PRIMARY KEY (campaign_id, sender)
        )
        """,
    ),
    (
        "find the open rows whose last try failed",
        # `status` says why rows wait (`error_groups(waiting=True)`). Only rows with an error are in the
        # index: a row planned or sent costs no upkeep here, and a fresh million-row campaign has none.
        """
        CREATE INDEX recipients_erred ON recipients (campaign_id, state) WHERE error_type IS NOT NULL
        """,
    ),
    (
        "the mailbox each send went through, in the send log",
        # A mailbox's daily limit is the mailbox's, whatever campaign sends through it or whatever the
        # manifest calls its sender: the budgets count a grant's sends across the database's campaigns.
        # Older sends have none, and count by their campaign and sender's name.
        """
        ALTER TABLE send_log ADD COLUMN IF NOT EXISTS via text COLLATE "C";
        CREATE INDEX IF NOT EXISTS send_log_via ON send_log (via, sent_at, recipients) WHERE via IS NOT NULL;
        CREATE INDEX IF NOT EXISTS send_log_unrouted ON send_log (campaign_id, sender, sent_at, recipients)
            WHERE via IS NULL
        """,
    ),
    (
        "find step 1's rows by address where the key is not the address",
        # As SQLite's: with recipients.key_column, two keys may name one address, which is still mailed
        # once (`listed_addresses`, `mailed_keys`). Only rows whose key is not their address are in it (an
        # address-keyed campaign's are found by key); neither column changes with a row's state.
        """
        CREATE INDEX IF NOT EXISTS recipients_address ON recipients (campaign_id, lower(email))
            WHERE step = 'message' AND key <> lower(email)
        """,
    ),
    (
        "the message a follow-up answers when it is no longer under the previous step's id",
        # As SQLite's: the id the lookup after a 404 found the previous step's message under (a filed
        # Microsoft message), for the row's next send and a resume's. NULL: the previous step's own id.
        "ALTER TABLE recipients ADD COLUMN IF NOT EXISTS reply_to text",
    ),
    (
        "the Message-ID header of each sent message",
        # As SQLite's: what an IMAP grant's follow-up names the message it answers by.
        "ALTER TABLE recipients ADD COLUMN IF NOT EXISTS internet_message_id text",
    ),
    (
        "the address each grant sends as",
        # As SQLite's: a mailbox reconnected under a new grant id keeps its day. Like the send log's
        # `via`, across the database's campaigns: a grant sends as its address whichever campaign names it.
        """
        CREATE TABLE IF NOT EXISTS mailboxes (
            address text COLLATE "C" NOT NULL,
            via text COLLATE "C" NOT NULL,
            PRIMARY KEY (address, via)
        )
        """,
    ),
)
# A read-only open (status, report, preview) needs the migrations up to this one; the later ones add
# indexes only, which its queries do without (a little slower) until a sending command migrates: an
# upgrade of campaign does not make `status` refuse a ledger until a run. A migration that a read needs
# (a table, a column, changed data) raises it to its own number.
READABLE_FROM = 2

_MIGRATIONS_TABLE = f"""
    CREATE TABLE {SCHEMA}.schema_migrations (
        version integer PRIMARY KEY, name text NOT NULL, applied_at text NOT NULL
    )
"""

# The advisory locks' first key: what they are for; the second names the campaign (or 0).
_WRITER_LOCK = 0x43414D50  # "CAMP": one sending command per campaign
_SCHEMA_LOCK = 0x43414D51  # one command migrating at a time

CONNECT_TIMEOUT_S = 5
# Where a database's URL was given, for a message that cannot connect to say what to fix: the
# manifest's key, unless a command's `--ledger` option gave it (`PostgresSite(named_by_option=True)`).
NAMED_IN_MANIFEST = "[ledger] url"
NAMED_BY_OPTION = "--ledger"
_POOL_TIMEOUT_S = 15.0  # a pooled connection is (re)made within this, or the ledger call fails
_HOLDER_PREFIX = "campaign: "  # the writer lock's connection names its holder in application_name


def connect(
    conninfo: str,
    *,
    where: str,
    read_only: bool = False,
    application_name: str | None = None,
    named_by: str = NAMED_IN_MANIFEST,
) -> psycopg.Connection[Any]:
    """A new connection in autocommit, its search path on the ledger's schema; LedgerError in one
    line of our own if it cannot be made (the server unreachable, the credentials refused, …), which
    says to fix the URL where `named_by` gave it."""
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.Error:
        raise LedgerError(f"{where}: is not a valid PostgreSQL URL; fix {named_by}") from None
    options = _options(given)
    if application_name is not None:
        options["application_name"] = application_name
    try:
        connection = psycopg.connect(conninfo, **options)
    except psycopg.Error as exc:
        # From None: libpq's words may quote what it could not parse, the password too.
        raise _connect_error(str(exc), given, where=where, named_by=named_by) from None
    try:
        _configure(connection, read_only=read_only)
    except psycopg.Error as exc:
        connection.close()
        raise ledger_error(exc, where=where, doing="open the ledger") from exc
    return connection


def open_pool(conninfo: str, *, read_only: bool) -> ConnectionPool[psycopg.Connection[Any]]:
    """The small pool a ledger reads and writes through (`connect` made a connection just before: the
    server and the credentials are known to work)."""

    def configure(connection: psycopg.Connection[Any]) -> None:
        _configure(connection, read_only=read_only)

    return ConnectionPool(
        conninfo,
        min_size=1,
        max_size=4,
        open=True,
        kwargs=_options(conninfo_to_dict(conninfo)),
        configure=configure,
        # A connection the server dropped while idle is replaced, not handed to a claim.
        check=ConnectionPool.check_connection,
        timeout=_POOL_TIMEOUT_S,
        name="campaign-ledger",
    )


def _options(given: dict[str, Any]) -> dict[str, Any]:
    # A short connect timeout (unless the URL sets one): an unreachable host fails within seconds. TCP
    # keepalives (unless the URL sets them): a server that vanished mid-call, or under the writer lock's
    # idle connection, is noticed in about a minute, not the kernel's two hours.
    options: dict[str, Any] = {"autocommit": True, **postgres_keepalives(given)}
    if "connect_timeout" not in given:
        options["connect_timeout"] = CONNECT_TIMEOUT_S
    return options


def _configure(connection: psycopg.Connection[Any], *, read_only: bool) -> None:
    # Only the ledger's schema is searched: another application's `recipients` is never ours.
    connection.execute(f"SET search_path TO {SCHEMA}")
    if read_only:  # status and report: the server itself refuses any write
        connection.execute("SET default_transaction_read_only = on")


def migrate_schema(connection: psycopg.Connection[Any], *, where: str, stamp: str) -> int:
    """Create the schema if missing and apply the migrations it lacks, each in its own transaction;
    return the schema version. LedgerError if a newer version of campaign wrote it."""
    version = 0
    try:
        # A session lock, taken before any of the transactions begins: one that began before another
        # command's migration was committed would not see the tables it made, and make them again.
        connection.execute("SELECT pg_advisory_lock(%s, 0)", (_SCHEMA_LOCK,))
        try:
            for version, (name, script) in enumerate(MIGRATIONS, start=1):
                with connection.transaction():
                    if not _has_schema(connection):
                        _create_schema(connection)
                    if _version(connection) >= version:
                        continue
                    connection.execute(script)
                    connection.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                        (version, name, stamp),
                    )
        finally:
            with contextlib.suppress(psycopg.Error):  # a broken connection's session holds nothing
                connection.execute("SELECT pg_advisory_unlock(%s, 0)", (_SCHEMA_LOCK,))
    except psycopg.Error as exc:
        raise ledger_error(exc, where=where, doing=f"migrate the ledger to version {version}") from exc
    return check_schema_version(connection, where=where)


def check_schema_version(connection: psycopg.Connection[Any], *, where: str) -> int:
    """The schema version; LedgerError unless it has the migrations a read needs (`READABLE_FROM`; a
    read-only open cannot migrate), and none of a newer version."""
    try:
        version = _version(connection)
    except psycopg.Error as exc:
        raise ledger_error(exc, where=where, doing="read the ledger") from exc
    if version > len(MIGRATIONS):
        raise LedgerError(f"{where}: the ledger was written by a newer version of campaign; upgrade campaign")
    if version < READABLE_FROM:
        message = f"{where}: the ledger was written by an older campaign; `campaign resume` upgrades it"
        raise LedgerError(message)
    return version


def _create_schema(connection: psycopg.Connection[Any]) -> None:
    # A schema made beforehand (by whoever may create in the database) is used as it is: creating it
    # takes a right on the database that the ledger's user need not have.
    missing = connection.execute("SELECT to_regnamespace(%s) IS NULL", (SCHEMA,)).fetchone()
    if missing and missing[0]:
        connection.execute(f"CREATE SCHEMA {SCHEMA}")
    connection.execute(_MIGRATIONS_TABLE)


def _has_schema(connection: psycopg.Connection[Any]) -> bool:
    # Looked up, not created: a user without the right to create in the database may use one made for it.
    found = connection.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.schema_migrations",)
    ).fetchone()
    return bool(found and found[0])


def _version(connection: psycopg.Connection[Any]) -> int:
    found = connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(found[0]) if found else 0


def find_campaign(connection: psycopg.Connection[Any], campaign: str, *, where: str) -> int | None:
    """The id of `campaign`'s row, or None when it has none (or the database holds no ledgers)."""
    try:
        if not _has_schema(connection):
            return None
        found = connection.execute("SELECT id FROM campaigns WHERE name = %s", (campaign,)).fetchone()
    except psycopg.Error as exc:
        raise ledger_error(exc, where=where, doing="read the ledger") from exc
    return None if found is None else int(found[0])


def open_campaign(
    connection: psycopg.Connection[Any],
    campaign: str,
    *,
    where: str,
    stamp: str,
    create: bool,
    read_only: bool,
) -> int:
    """The id of `campaign`'s row, the schema migrated first (`read_only`: checked, never changed).

    `create` makes the schema and the campaign's row when missing; otherwise (and always when
    `read_only`) a campaign without a row is a LedgerError, and nothing is created."""
    found = find_campaign(connection, campaign, where=where)
    if found is None and (read_only or not create):
        raise LedgerError(f"{where}: no ledger for campaign {campaign!r}")
    if read_only:
        check_schema_version(connection, where=where)
    else:
        migrate_schema(connection, where=where, stamp=stamp)
    return found if found is not None else _create_campaign(connection, campaign, where=where, stamp=stamp)


def _create_campaign(connection: psycopg.Connection[Any], campaign: str, *, where: str, stamp: str) -> int:
    try:
        # Two commands may create it at once: the no-op update gives both the one row's id.
        made = connection.execute(
            "INSERT INTO campaigns (name, created_at) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            (campaign, stamp),
        ).fetchone()
    except psycopg.Error as exc:
        raise ledger_error(exc, where=where, doing="write the ledger") from exc
    if made is None:  # RETURNING gives the row, inserted or not
        raise LedgerError(f"{where}: cannot record campaign {campaign!r}")
    return int(made[0])


# --- the writer lock ------------------------------------------------------------------------------


def lock_campaign(
    conninfo: str, campaign: str, *, where: str, wait: bool = False, named_by: str = NAMED_IN_MANIFEST
) -> psycopg.Connection[Any]:
    """Take `campaign`'s writer lock on a connection of its own, returned (`unlock_campaign` releases
    it). LedgerError (naming the holder) if another session holds it; with `wait`, wait for it instead
    (a worker joining a shared campaign waits for the one planning it).

    The lock is keyed by the campaign's name, not its row: a first run holds it before the campaign
    has a row (which is only made once the plan is confirmed)."""
    holder = f"{_HOLDER_PREFIX}pid {os.getpid()} on host {socket.gethostname()}"
    connection = connect(conninfo, where=where, application_name=holder[:63], named_by=named_by)
    try:
        if wait:
            connection.execute("SELECT pg_advisory_lock(%s, %s)", (_WRITER_LOCK, _lock_key(campaign)))
        elif not _try_lock(connection, campaign, where=where):
            raise _in_use(connection, campaign, where=where)
    except psycopg.Error as exc:
        connection.close()
        raise ledger_error(exc, where=where, doing="lock the ledger") from exc
    except BaseException:
        connection.close()
        raise
    return connection


def check_campaign_free(
    conninfo: str, campaign: str, *, where: str, named_by: str = NAMED_IN_MANIFEST
) -> None:
    """LedgerError if another command holds `campaign`'s writer lock; creates and changes nothing.

    A run asks this first, so that a refused run prints no plan; it takes the lock itself
    (`lock_campaign`) only once the checks have passed."""
    connection = connect(conninfo, where=where, named_by=named_by)
    try:
        if not _try_lock(connection, campaign, where=where):
            raise _in_use(connection, campaign, where=where)
    finally:
        unlock_campaign(connection)  # the lock taken to test, if it was


def unlock_campaign(connection: psycopg.Connection[Any]) -> None:
    """Release the writer lock held on `connection`, and close it.

    Released first, and only then closed: the server ends a closed session a moment later, and a
    command that takes the lock right after this one (a run after its `check_free`) must find it free.
    """
    with contextlib.suppress(psycopg.Error):  # a broken connection's session holds nothing any more
        connection.execute("SELECT pg_advisory_unlock_all()")
    connection.close()


def _try_lock(connection: psycopg.Connection[Any], campaign: str, *, where: str) -> bool:
    try:
        found = connection.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (_WRITER_LOCK, _lock_key(campaign))
        ).fetchone()
    except psycopg.Error as exc:
        raise ledger_error(exc, where=where, doing="lock the ledger") from exc
    return bool(found and found[0])


def _lock_key(campaign: str) -> int:
    """The campaign's name as the lock's second key (an int4: 31 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(campaign.encode()).digest()[:4], "big") >> 1


def _in_use(connection: psycopg.Connection[Any], campaign: str, *, where: str) -> LedgerError:
    try:
        found = connection.execute(
            "SELECT a.application_name FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid",
            (_WRITER_LOCK, _lock_key(campaign)),
        ).fetchone()
    except psycopg.Error:
        found = None  # who holds it is a courtesy: the refusal stands without it
    name = str(found[0]) if found and found[0] else ""
    holder = name.removeprefix(_HOLDER_PREFIX) if name.startswith(_HOLDER_PREFIX) else "pid unknown"
    return LedgerError(
        f"{where}: another campaign command ({holder}) is using this campaign's ledger; "
        "wait for it to finish or stop it, then try again"
    )


# --- errors ---------------------------------------------------------------------------------------


def ledger_error(
    exc: psycopg.Error, *, where: str, doing: str, named_by: str = NAMED_IN_MANIFEST
) -> LedgerError:
    """A psycopg error (not a failed connect: `connect` says those) as one line naming the ledger and
    what could not be done ("write the ledger")."""
    if isinstance(exc, PoolTimeout):  # the pool could not (re)connect: the server went away
        return _unreachable(where, f"no connection within {_POOL_TIMEOUT_S:.0f} s", named_by=named_by)
    said = _first_line(exc.diag.message_primary or str(exc)) or type(exc).__name__
    if exc.sqlstate == "53100":  # disk_full
        return LedgerError(
            f"{where}: cannot {doing} ({said}); free some space on the database server, then "
            "`campaign resume` (sends in flight keep their idempotency key, so nobody is mailed twice)"
        )
    return LedgerError(f"{where}: cannot {doing} ({said})")


def _connect_error(text: str, given: dict[str, Any], *, where: str, named_by: str) -> LedgerError:
    if "connection option" in text:
        return LedgerError(f"{where}: is not a valid PostgreSQL URL; fix {named_by}")
    if "Connection refused" in text:
        return _unreachable(where, "connection refused", named_by=named_by)
    if "timeout expired" in text:
        waited = given.get("connect_timeout") or CONNECT_TIMEOUT_S
        return _unreachable(where, f"no answer within {waited} s", named_by=named_by)
    if "resolve host" in text or "translate host name" in text:
        return _unreachable(where, "unknown host", named_by=named_by)
    refused = ("password authentication failed", "no password supplied", "no pg_hba.conf entry")
    if any(words in text for words in refused) or re.search(r'role "[^"]*" does not exist', text):
        user = _quoted(text, "user") or given.get("user") or os.environ.get("PGUSER") or "(the default)"
        return LedgerError(
            f"{where}: PostgreSQL refused the credentials for user {user}; set PGPASSWORD or the "
            "manifest's [ledger] password_env"
        )
    database = _quoted(text, "database")
    if database is not None and f'database "{database}" does not exist' in text:
        return LedgerError(
            f"{where}: PostgreSQL has no database {database}; create it (createdb {database}) or fix "
            f"{named_by}"
        )
    # Anything else: the server's reason only, never the string we connected with.
    reason = _first_line(text.rpartition("failed: ")[2]).removeprefix("FATAL:").strip()
    password = given.get("password")
    if password:
        reason = reason.replace(str(password), "***")
    return LedgerError(f"{where}: cannot connect to PostgreSQL ({reason})")


def _unreachable(where: str, why: str, *, named_by: str) -> LedgerError:
    return LedgerError(f"{where}: cannot reach PostgreSQL ({why}); start it or fix {named_by}")


def _quoted(text: str, word: str) -> str | None:
    found = re.search(rf'{word} "([^"]*)"', text)
    return None if found is None else found.group(1)


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()
