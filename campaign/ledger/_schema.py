"""The ledger's file: created private (0600), opened in WAL mode, migrated, and locked for one writer.

Knows the SQL schema and the file, nothing of states or transitions (that is
`ledger.py`). Each numbered migration is applied once, in order, in one
transaction, and recorded in `schema_migrations`; a file written by a newer
version is refused. The lock is an advisory `flock` on a file beside the ledger,
so two commands can never send from the same ledger at once; the operating
system drops it when the process dies, even by kill -9.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from pathlib import Path

from campaign.errors import LedgerError
from campaign.ledger._read import PLAN_STAMP, RULES_STAMP

__all__ = [
    "MIGRATIONS",
    "check_ledger_free",
    "check_ledger_version",
    "connect_ledger",
    "create_ledger_file",
    "lock_ledger",
    "migrate_ledger",
    "try_flock",
    "unlock_ledger",
]

# (name, script). Never edit a released migration: add a new one.
MIGRATIONS: tuple[tuple[str, str], ...] = (
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
    (
        "key issue time, first claim, subject, list membership, notes, journal",
        """
        ALTER TABLE recipients ADD COLUMN key_issued_at TEXT;
        ALTER TABLE recipients ADD COLUMN key_uses INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE recipients ADD COLUMN first_claimed_at TEXT;
        ALTER TABLE recipients ADD COLUMN subject TEXT;
        ALTER TABLE recipients ADD COLUMN listed INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE recipients ADD COLUMN note TEXT;
        UPDATE recipients SET key_issued_at = claimed_at, first_claimed_at = claimed_at
            WHERE claimed_at IS NOT NULL;
        UPDATE recipients SET key_uses = 1 WHERE state = 'inflight';
        CREATE TABLE journal (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL
        );
        """,
    ),
    (
        "index rows by list membership and state",
        # Counts of listed rows per state (every run, status) read this index, not a million table rows.
        "CREATE INDEX recipients_listed ON recipients (listed, state, sender)",
    ),
    (
        "index the send log with its recipient counts",
        # The rolling-24 h sums (status, budgets) read this index alone, not a table row per send;
        # it starts with the columns of the index it replaces, which serves nothing else.
        """
        CREATE INDEX send_log_recipients ON send_log (sender, sent_at, recipients);
        DROP INDEX send_log_sender;
        """,
    ),
    (
        "the mailbox (grant or domain) each row was claimed through",
        # Nylas scopes idempotency keys per grant: a key that may have been used is only ever
        # re-sent through the mailbox it was claimed through, whatever the manifest now says.
        "ALTER TABLE recipients ADD COLUMN claimed_via TEXT",
    ),
    (
        "the thread each sent message started",
        # From the send answer: follow-ups reply in it, and reconcile can look a message up by it.
        "ALTER TABLE recipients ADD COLUMN thread_id TEXT",
    ),
    (
        "follow-up steps: one row per (recipient, step), due times, auto-replies seen; cells checked",
        # Step 1 rows keep their key (the recipient's); a follow-up's row names its recipient and the
        # row of the step it answers. `due_at` (ISO UTC, NULL: at once) is when it may be claimed.
        # `cells` is a digest of the list row as it was checked: an unchanged row need not be again.
        # The index holds only rows with a due time: a row sent at once costs no index upkeep on each
        # change of state (the send path's ledger writes are its bottleneck).
        """
        ALTER TABLE recipients ADD COLUMN step TEXT NOT NULL DEFAULT 'message';
        ALTER TABLE recipients ADD COLUMN recipient TEXT;
        ALTER TABLE recipients ADD COLUMN previous TEXT;
        ALTER TABLE recipients ADD COLUMN due_at TEXT;
        ALTER TABLE recipients ADD COLUMN auto_reply TEXT;
        ALTER TABLE recipients ADD COLUMN cells TEXT;
        CREATE INDEX recipients_due ON recipients (due_at) WHERE due_at IS NOT NULL
        """,
    ),
    (
        "the cells of each planned row, to send from",
        # `cells` now holds the list row's cells as text (`recipients.encode_cells`), not a digest: runs
        # send from the ledger, not from the list held in memory. The digests go, and with them the plan
        # and rules stamps, so that the next run checks the whole list once and records every row's cells.
        f"""
        UPDATE recipients SET cells = NULL WHERE cells IS NOT NULL;
        DELETE FROM meta WHERE key IN ('{PLAN_STAMP}', '{RULES_STAMP}')
        """,
    ),
    (
        "count the open rows from an index",
        # Every run starts by counting each sender's open rows of step 1 (`open_counts`): with the step
        # and due time in the index, that reads the index, not every open row of the table (1.4 s for a
        # million). A claim or outcome changes `state`, which rewrites its entry here anyway: the two
        # columns add no write.
        """
        DROP INDEX recipients_listed;
        CREATE INDEX recipients_listed ON recipients (listed, state, sender, step, due_at)
        """,
    ),
    (
        "find the open rows whose last try failed",
        # `status` says why rows wait (`error_groups(waiting=True)`). Only rows with an error are in the
        # index: a row planned or sent costs no upkeep here, and a fresh million-row campaign has none.
        """
        CREATE INDEX recipients_erred ON recipients (state) WHERE error_type IS NOT NULL
        """,
    ),
    (
        "the mailbox each send went through, in the send log",
        # A mailbox's daily limit is the mailbox's, whatever the manifest calls its sender: a sender
        # renamed (or another sender naming the same grant) keeps counting the same day. Older sends
        # have none, and count by their sender's name. Each kind is read from an index of its own alone.
        """
        ALTER TABLE send_log ADD COLUMN via TEXT;
        CREATE INDEX IF NOT EXISTS send_log_via ON send_log (via, sent_at, recipients) WHERE via IS NOT NULL;
        CREATE INDEX IF NOT EXISTS send_log_unrouted ON send_log (sender, sent_at, recipients, via)
            WHERE via IS NULL
        """,
    ),
    (
        "find step 1's rows by address where the key is not the address",
        # With recipients.key_column, two keys may name one address, which is still mailed once: the check
        # looks each batch's addresses up here (`listed_addresses`, `mailed_keys`). Only rows whose key is
        # not their address are in it: an address-keyed campaign's rows are found by their key, and cost
        # nothing here; follow-ups are not looked up. Neither column changes with a row's state: no upkeep
        # on the send path. IF NOT EXISTS: a migration applied again (its record lost) goes through.
        """
        CREATE INDEX IF NOT EXISTS recipients_address ON recipients (lower(email))
            WHERE step = 'message' AND key != lower(email)
        """,
    ),
    (
        "the message a follow-up answers when it is no longer under the previous step's id",
        # A Microsoft mailbox gives a message a new id when its owner files it: the follow-up's send was
        # answered 404, the lookup found the message under its new id, and the row's next send (a resume
        # after a crash included, which must send the same bytes) answers that id. NULL: the previous
        # step's own message id. Only sends read it, and they migrate first.
        "ALTER TABLE recipients ADD COLUMN reply_to TEXT",
    ),
    (
        "the Message-ID header of each sent message",
        # From the send's answer (fields=include_basic_headers): an IMAP grant's follow-up names the
        # message it answers by this header, not by Nylas's id (nylas-api.md §1.2). NULL: not given
        # (a domain send, a row sent before this). Only sends read it, and they migrate first.
        "ALTER TABLE recipients ADD COLUMN internet_message_id TEXT",
    ),
    (
        "the address each grant sends as",
        # The same mailbox reconnected through Nylas gets a new grant id: its daily budget is the
        # address's, so the budgets count the sends of every grant recorded with the sender's address
        # (each through `send_log_via`). A run records its grant senders' (`record_mailbox_addresses`);
        # a ledger without the table counts by grant alone. Keyed by address first: that is the lookup.
        """
        CREATE TABLE IF NOT EXISTS mailboxes (
            address TEXT NOT NULL,
            via TEXT NOT NULL,
            PRIMARY KEY (address, via)
        ) WITHOUT ROWID
        """,
    ),
)

# A read-only open (status, report, preview) needs the migrations up to this one; the later ones add
# indexes only, which its queries do without (a little slower) until a sending command migrates: an
# upgrade of campaign does not make `status` refuse a ledger until a run. A migration that a read needs
# (a table, a column, changed data) raises it to its own number.
READABLE_FROM = 9

_LEDGER_TABLES = frozenset({"schema_migrations", "meta", "recipients"})


def create_ledger_file(path: Path, *, stamp: str) -> None:
    """Create a new, fully migrated ledger at `path` (0600), or nothing: built aside, then renamed in.

    A crash while creating leaves no half-made ledger where one is expected, so an empty or
    schemaless file at `path` is always someone else's mistake, never a new campaign.
    """
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        db = sqlite3.connect(staging, isolation_level=None)
        try:
            migrate_ledger(db, path=path, stamp=stamp)
        finally:
            db.close()
        os.link(staging, path)  # fails if a ledger appeared meanwhile: never replace one
    except FileExistsError:
        pass  # another command created it first: open that one
    except (OSError, sqlite3.Error) as exc:
        message = f"{path}: cannot create the ledger ({exc}); check the folder is writable and has space"
        raise LedgerError(message) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staging)


def connect_ledger(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """Open the existing ledger at `path` in WAL mode, in autocommit; LedgerError if it is not one.

    `read_only` opens it without the right to write (status, report): such a command never creates,
    migrates or changes a ledger, and works on a file in a read-only folder.
    """
    try:
        if read_only:
            connection = _connect_read_only(path)
        else:
            connection = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=rw", uri=True, check_same_thread=False, isolation_level=None
            )
        connection.execute("PRAGMA busy_timeout=5000")
        # Looked at before anything is set: WAL mode would be written into an empty or foreign file.
        tables = {
            name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not read_only and tables >= _LEDGER_TABLES:
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a claim is on the disk before its request leaves, even across a power cut. NORMAL syncs
            # the WAL at checkpoints only: a cut could take back the last claims and sends, and a resume
            # more than an hour later (past Nylas's key replay) would mail those recipients again. The
            # fsync is the writer thread's, once per group commit, never the event loop's.
            connection.execute("PRAGMA synchronous=FULL")
    except (OSError, sqlite3.Error) as exc:
        if not read_only and not _writable(path):
            message = (
                f"{path}: cannot open the ledger to write ({exc}): it or its folder is read-only; make "
                "them writable (`campaign status` and `report` can read it as it is)"
            )
        else:
            message = f"{path}: cannot open the ledger ({exc}); if it is not a campaign ledger, move it away"
        raise LedgerError(message) from exc
    if not tables >= _LEDGER_TABLES:
        connection.close()
        message = (
            f"{path}: is not a campaign ledger (empty, or another file); nothing was sent: "
            "move it away (or restore the ledger from a backup) and run again"
        )
        raise LedgerError(message)
    return connection


def _connect_read_only(path: Path) -> sqlite3.Connection:
    uri = path.resolve().as_uri()
    connection = None
    try:
        connection = sqlite3.connect(
            f"{uri}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
        connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # SQLite opens the file lazily
        return connection
    except sqlite3.OperationalError:
        if connection is not None:
            connection.close()
        if _writable(path):
            raise
    # A read-only folder: SQLite cannot make the WAL index beside the file, so read it as it stands.
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False, isolation_level=None)


def _writable(path: Path) -> bool:
    """Whether the ledger and its folder can be written (SQLite writes its WAL files beside it)."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def check_ledger_version(db: sqlite3.Connection, *, path: Path) -> None:
    """LedgerError unless the ledger has the migrations a read needs (`READABLE_FROM`; a read-only open
    cannot migrate), and none of a newer version."""
    try:
        (version,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot read the ledger ({exc})") from exc
    if version > len(MIGRATIONS):
        raise LedgerError(f"{path}: the ledger was written by a newer version of campaign; upgrade campaign")
    if version < READABLE_FROM:
        message = f"{path}: the ledger was written by an older campaign; `campaign resume` upgrades it"
        raise LedgerError(message)


def migrate_ledger(db: sqlite3.Connection, *, path: Path, stamp: str) -> int:
    """Apply the migrations this file lacks, each in its own transaction; return the schema version."""
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        done = {version for (version,) in db.execute("SELECT version FROM schema_migrations")}
    except sqlite3.Error as exc:
        message = f"{path}: cannot read the ledger ({exc})"
        raise LedgerError(message) from exc
    if max(done, default=0) > len(MIGRATIONS):
        message = f"{path}: the ledger was written by a newer version of campaign; upgrade campaign"
        raise LedgerError(message)
    for version, (name, script) in enumerate(MIGRATIONS, start=1):
        if version in done:
            continue
        try:
            db.execute("BEGIN IMMEDIATE")
            for statement in script.split(";"):
                if statement.strip() and not _adds_a_column_it_has(db, statement):
                    db.execute(statement)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, stamp))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            message = f"{path}: cannot migrate the ledger to version {version} ({exc})"
            raise LedgerError(message) from exc
    return len(MIGRATIONS)


_ADD_COLUMN = re.compile(r"\s*ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


def _adds_a_column_it_has(db: sqlite3.Connection, statement: str) -> bool:
    """Whether `statement` adds a column the table has already: a migration applied again (its record
    lost) then goes through, as SQLite has no ADD COLUMN IF NOT EXISTS."""
    found = _ADD_COLUMN.match(statement)
    if found is None:
        return False
    table, column = found.groups()
    return any(row[1] == column for row in db.execute(f"PRAGMA table_info({table})"))


def try_flock(fd: int, *, shared: bool = False) -> bool:
    """Take a flock on `fd`'s file (exclusive, or `shared`) unless another open file holds one that
    conflicts: False then (its holder is alive: a flock dies with the process)."""
    import fcntl  # POSIX only; imported here so that reading a ledger works everywhere

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def lock_ledger(path: Path) -> int:
    """Take the ledger's writer lock (a file beside it); return its descriptor. LedgerError if taken."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        message = f"{lock_path}: cannot create the ledger's lock file ({exc})"
        raise LedgerError(message) from exc
    if not try_flock(fd):
        error = _in_use(path, fd)
        os.close(fd)
        raise error
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as exc:  # e.g. a full disk
        os.close(fd)
        message = f"{lock_path}: cannot write the ledger's lock file ({exc.strerror or exc}); free some space"
        raise LedgerError(message) from exc
    return fd


def check_ledger_free(path: Path) -> None:
    """LedgerError if another command holds the ledger's writer lock; creates and changes nothing.

    A run asks this first, so that a refused run prints no plan and writes nothing; it takes the
    lock itself (`lock_ledger`) only once the checks have passed.
    """
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR)
    except OSError:
        return  # no lock file: nobody has ever held it, or it cannot be opened (lock_ledger says why)
    try:
        if not try_flock(fd, shared=True):
            raise _in_use(path, fd)
    finally:
        os.close(fd)  # closing drops the shared lock taken to test


def _in_use(path: Path, fd: int) -> LedgerError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return LedgerError(
        f"{path}: another campaign command (pid {holder}) is using this ledger; "
        "wait for it to finish or stop it, then try again"
    )


def unlock_ledger(fd: int) -> None:
    """Release the writer lock taken by `lock_ledger`."""
    os.close(fd)  # closing the descriptor drops the flock
