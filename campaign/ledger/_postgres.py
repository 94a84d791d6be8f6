"""The progress ledger in PostgreSQL: one campaign's rows in a database that many campaigns share.

The same ledger as `SqliteLedger` (ARCHITECTURE.md, "ledger/"), kept where several machines can
reach it. Every method gives what SQLite's gives: the same values, times as the same ISO 8601 text,
the same `LedgerError` for a change of state `TRANSITIONS` does not allow (every change is checked
against it, a row at a time or, for a plan's set of rows, the move once). Every query names the
ledger's campaign (`campaign_id`): another campaign's rows are never seen.

A write is one transaction on one pooled connection, and a row is locked (`FOR UPDATE`) before it is
decided on, so that another process cannot change it in between; writes made inside `batch()` share
one transaction, each in its own savepoint, so that a write that fails undoes only itself. Plain
synchronous psycopg: the engine calls it from a worker thread, so the event loop never waits on the
network. What is not SQL (the transitions, what an outcome leads to, the idempotency key, the meta
keys) is SQLite's, imported; the schema, connecting and the writer lock are in `_pg_schema.py`.
`PostgresSite` is the database as the use cases see it (a `LedgerSite`). It never stores the API key,
and the connection string (which may hold the password) is never shown.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from campaign.clock import Clock
from campaign.errors import LedgerError
from campaign.ledger._facts import KeptFacts
from campaign.ledger._identity import write_ledger_marker
from campaign.ledger._leases import LEASE_EXPIRY_S, GrantLeases, WorkerView, read_workers
from campaign.ledger._ledger import _error_columns, _skip_reason, _state_after, due_text, planned_values
from campaign.ledger._pg_schema import (
    NAMED_BY_OPTION,
    NAMED_IN_MANIFEST,
    check_campaign_free,
    connect,
    find_campaign,
    ledger_error,
    lock_campaign,
    open_campaign,
    open_pool,
    unlock_campaign,
)
from campaign.ledger._read import (
    _SAMPLED_FROM,
    DUPLICATE_REASON,
    FAILED_ROWS,
    INVALID_REASON,
    LIST_EXTENT,
    MAILED_DUPLICATE_REASON,
    MAILED_STATES,
    PLAN_STAMP,
    ROW_COLUMNS,
    RULES_STAMP,
    WAITING_ROWS,
    ErrorGroup,
    JournalEntry,
    LedgerRow,
    PlannedRow,
    _iso,
    _moment,
    _to_row,
    first_of,
    step_counts_of,
)
from campaign.ledger._values import (
    Claim,
    ClaimRequest,
    DueStep,
    OutcomeReport,
    ScheduledStep,
    SentMessage,
    SentStep,
    StepCounts,
    SyncReport,
)
from campaign.ledger._write import (
    _FETCHED,
    FAILED,
    INFLIGHT,
    KEY_REUSE_S,
    PENDING,
    SENT,
    SKIPPED,
    TRANSITIONS,
    UNKNOWN,
    ClaimChange,
    decide_claim,
    idempotency_key_stem,
    only,
    or_error,
)
from campaign.models import FIRST_STEP, OutcomeKind, RowState, SendOutcome, Skip, SkipReason, step_key

__all__ = ["PostgresLedger", "PostgresSite"]

_Connection = psycopg.Connection[Any]


class PostgresSite:
    """Where campaigns' ledgers live in one PostgreSQL database, shared by the workers that run them."""

    def __init__(
        self,
        conninfo: str,
        *,
        where: str,
        lease_s: float = LEASE_EXPIRY_S,
        marker: Path | None = None,
        named_by_option: bool = False,
    ) -> None:
        self._conninfo = conninfo  # may hold the password: never shown
        self._where = where
        # What a failure to connect says to fix: the command's --ledger, or the manifest's [ledger] url.
        self._named_by = NAMED_BY_OPTION if named_by_option else NAMED_IN_MANIFEST
        self._lease_s = lease_s
        # Where a command that writes a campaign's ledger here leaves its ledger marker (`--ledger` alone
        # named this database): before a first plan creates the ledger, so the marker is never later.
        self._marker = marker

    def __repr__(self) -> str:
        return f"PostgresSite({self._where!r})"

    @property
    def where(self) -> str:
        """The database's URL without its password, for messages."""
        return self._where

    def exists(self, campaign: str) -> bool:
        """Whether `campaign` has a ledger (its row) in this database."""
        with connect(self._conninfo, where=self._where, named_by=self._named_by) as connection:
            return find_campaign(connection, campaign, where=self._where) is not None

    def check_free(self, campaign: str) -> None:
        """LedgerError if another command holds `campaign`'s writer lock; creates and changes nothing."""
        check_campaign_free(self._conninfo, campaign, where=self._where, named_by=self._named_by)

    @contextmanager
    def hold(self, campaign: str, *, wait: bool = False) -> Iterator[None]:
        """Hold `campaign`'s writer lock until the block ends: LedgerError if another command has it, or
        with `wait`, once it gave it back."""
        lock = lock_campaign(self._conninfo, campaign, where=self._where, wait=wait, named_by=self._named_by)
        try:
            yield
        finally:
            unlock_campaign(lock)

    def open(
        self,
        *,
        clock: Clock,
        campaign: str,
        exclusive: bool = False,
        create: bool = True,
        read_only: bool = False,
    ) -> PostgresLedger:
        """Open `campaign`'s ledger, as `open_ledger` opens a file: `create` makes the schema (migrated)
        and the campaign's row when missing, else a campaign without one is a LedgerError; `read_only`
        never creates, migrates or writes; `exclusive` holds the writer lock until `close()`. Opened to
        write, it leaves the campaign's ledger marker first, if this site has one to leave."""
        if self._marker is not None and not read_only:
            write_ledger_marker(self._marker, campaign=campaign, url=self._where)
        named_by = self._named_by
        lock = (
            lock_campaign(self._conninfo, campaign, where=self._where, named_by=named_by)
            if exclusive
            else None
        )
        try:
            with connect(self._conninfo, where=self._where, named_by=named_by) as connection:
                campaign_id = open_campaign(
                    connection,
                    campaign,
                    where=self._where,
                    stamp=clock.now().isoformat(timespec="milliseconds"),
                    create=create,
                    read_only=read_only,
                )
            pool = open_pool(self._conninfo, read_only=read_only)
        except BaseException:
            if lock is not None:
                unlock_campaign(lock)
            raise
        return PostgresLedger(
            pool,
            where=self._where,
            named_by=named_by,
            clock=clock,
            campaign=campaign,
            campaign_id=campaign_id,
            lock=lock,
            lease_s=self._lease_s,
        )

    def first_plan(self, campaign: str, clock: Clock) -> None:
        """None: a database's first plan is recorded after the check, like any other (in one transaction,
        by COPY), where every worker sharing the campaign finds it."""

    def leases(self, campaign: str, clock: Clock) -> GrantLeases:
        """A new worker's leases on `campaign`'s grants (workers sharing the campaign each send from the
        grants they lease)."""
        return GrantLeases(
            self._conninfo, where=self._where, campaign=campaign, clock=clock, expiry_s=self._lease_s
        )


class PostgresLedger(KeptFacts):
    """Reads and writes one campaign's ledger; every write is one transaction (or part of a batch)."""

    def __init__(
        self,
        pool: ConnectionPool[_Connection],
        *,
        where: str,
        named_by: str = NAMED_IN_MANIFEST,
        clock: Clock,
        campaign: str,
        campaign_id: int,
        lock: _Connection | None = None,
        lease_s: float = LEASE_EXPIRY_S,
    ) -> None:
        self._pool = pool
        self._lease_s = lease_s
        self._worker: str | None = None  # claims are made under this worker's leases (`bind_worker`)
        self._where = where
        self._named_by = named_by  # what a lost connection says to fix
        self._clock = clock
        self._campaign = campaign
        self._id = campaign_id
        self._writer_lock = lock
        # Re-entrant: a batch holds it while each of its writes takes it again. Reads from other
        # threads wait for the batch, as they do on SQLite's one connection.
        self._lock = threading.RLock()
        self._connection: _Connection | None = None  # the connection of the write under way
        self.commits = 0  # transactions committed (a batch is one)
        self._logs_mailboxes: bool | None = (
            None  # whether send_log has `via` (a read-only open may predate it)
        )
        self._knows_addresses: bool | None = None  # whether `mailboxes` exists (likewise)

    def __repr__(self) -> str:
        return f"PostgresLedger({self._where!r}, campaign={self._campaign!r})"

    @property
    def where(self) -> str:
        """The database's URL without its password, for messages."""
        return self._where

    @property
    def notes(self) -> tuple[str, ...]:
        """Nothing: a database has no journal mode to miss."""
        return ()

    def close(self) -> None:
        """Close the connections and drop the writer lock, if held."""
        self._pool.close()
        if self._writer_lock is not None:
            unlock_campaign(self._writer_lock)
            self._writer_lock = None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside into one transaction; a failed write undoes only itself."""
        with self._write():
            yield

    # --- what the campaign is: kept facts ---------------------------------------------------------

    def record_event(self, kind: str, detail: str) -> None:
        """Add an entry to the campaign's journal."""
        with self._write() as db:
            db.execute(
                "INSERT INTO journal (campaign_id, at, kind, detail) VALUES (%s, %s, %s, %s)",
                (self._id, self._stamp(), kind, detail),
            )

    def _meta(self, key: str) -> str | None:
        found = self._read("SELECT value FROM meta WHERE campaign_id = %s AND key = %s", (self._id, key))
        return str(found[0][0]) if found else None

    def _metas_under(self, prefix: str) -> dict[str, str]:
        rows = self._read(
            "SELECT key, value FROM meta WHERE campaign_id = %s AND key LIKE %s AND value != ''",
            (self._id, f"{prefix}%"),
        )
        return {str(key).removeprefix(prefix): str(value) for key, value in rows}

    def _set_meta(self, key: str, value: str) -> None:
        # The same value again changes nothing (no new row version).
        with self._write() as db:
            db.execute(
                "INSERT INTO meta (campaign_id, key, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (campaign_id, key) DO UPDATE SET value = EXCLUDED.value "
                "WHERE meta.value != EXCLUDED.value",
                (self._id, key, value),
            )

    # --- the plan ---------------------------------------------------------------------------------

    def record_plan(
        self,
        planned: Iterable[PlannedRow],
        skips: Iterable[Skip],
        *,
        stamp: str | None = None,
        rules: str | None = None,
        extent: str | None = None,
        appended: bool = False,
    ) -> SyncReport:
        """Bring the ledger in line with the list, as `SqliteLedger.record_plan` does, in one transaction.

        Both are copied into temporary tables as they are read (COPY: a plan of a million rows is
        never held in memory), and compared with the ledger in SQL, a set of rows at a time.
        """
        now = self._stamp()
        with self._write() as db:
            self._load_plan(db, planned, skips)
            report = self._sync_plan(db, now, appended=appended)
            # Dropped now, not at commit: a batch may record another plan before it commits. (A write
            # that fails is rolled back, and the tables with it.)
            db.execute("DROP TABLE plan_rows, plan_skips")
            if stamp is not None:
                self._set_meta(PLAN_STAMP, stamp)
            if rules is not None:
                self._set_meta(RULES_STAMP, rules)
            if extent is not None:
                self._set_meta(LIST_EXTENT, extent)
            # Statistics of the rows just recorded: without them, the planner may read a claim's row
            # through the state index (every pending row) instead of its key, and the send loop slows
            # down with the size of the list (20,000 rows: claims a third as fast).
            db.execute("ANALYZE recipients")
        return report

    def _load_plan(self, db: _Connection, planned: Iterable[PlannedRow], skips: Iterable[Skip]) -> None:
        # Keys, addresses and senders compare as the ledger's do (byte by byte) when joined with it.
        db.execute(
            "CREATE TEMP TABLE plan_rows (place bigint GENERATED ALWAYS AS IDENTITY, "
            'key text COLLATE "C" NOT NULL UNIQUE, row bigint NOT NULL, email text COLLATE "C" NOT NULL, '
            'sender text COLLATE "C" NOT NULL, due_at text COLLATE "C", cells text)'
        )
        db.execute(
            "CREATE TEMP TABLE plan_skips_listed (place bigint GENERATED ALWAYS AS IDENTITY, "
            'key text COLLATE "C" NOT NULL, row bigint NOT NULL, email text COLLATE "C" NOT NULL, '
            "reason text NOT NULL, cells text)"
        )
        with db.cursor() as cursor:
            with cursor.copy("COPY plan_rows (key, row, email, sender, due_at, cells) FROM STDIN") as copy:
                for p in planned:
                    copy.write_row(planned_values(p))
            with cursor.copy("COPY plan_skips_listed (key, row, email, reason, cells) FROM STDIN") as copy:
                for s in skips:
                    copy.write_row((s.key, s.row, s.email, _skip_reason(s), s.cells))
        # A duplicate's skip shares its original's key: it concerns the planned row, not a row of its own;
        # of skips sharing a key, the first row's (the original's: say, unsubscribed) is the key's.
        db.execute(
            "CREATE TEMP TABLE plan_skips AS SELECT DISTINCT ON (key) key, row, email, reason, cells, place "
            "FROM plan_skips_listed ORDER BY key, place"
        )
        db.execute("ALTER TABLE plan_skips ADD PRIMARY KEY (key)")
        db.execute("DROP TABLE plan_skips_listed")
        db.execute("DELETE FROM plan_skips AS s USING plan_rows AS p WHERE s.key = p.key")
        # Temporary tables get no statistics of their own: the joins below are planned on these.
        db.execute("ANALYZE plan_rows, plan_skips")

    def _sync_plan(self, db: _Connection, now: str, *, appended: bool) -> SyncReport:
        campaign = self._id
        if appended:  # an appended row with the key of a row listed before is that row's duplicate
            db.execute(
                "DELETE FROM plan_skips AS s USING recipients AS r "
                "WHERE r.campaign_id = %s AND r.key = s.key AND r.listed AND r.step = %s",
                (campaign, FIRST_STEP),
            )
        counted = db.execute("SELECT (SELECT count(*) FROM plan_rows) + (SELECT count(*) FROM plan_skips)")
        wanted = int(counted.fetchall()[0][0])
        if not appended:  # before the new rows go in: only the rows recorded before are looked at
            db.execute(
                "UPDATE recipients AS r SET listed = false WHERE campaign_id = %s AND step = %s AND listed "
                "AND NOT EXISTS (SELECT 1 FROM plan_rows AS p WHERE p.key = r.key) "
                "AND NOT EXISTS (SELECT 1 FROM plan_skips AS s WHERE s.key = r.key)",
                (campaign, FIRST_STEP),
            )
        newly_skipped = self._skip_now_skipped(db, now)
        restored, undoubled = self._restore_now_valid(db, now)
        # A pending row goes out from the sender the plan gives it (a sender renamed or removed since, a
        # pinned one changed), to the address the list gives it (corrected since: with key_column the key
        # is the person, and the old address would get the new one's message); a row in flight keeps its
        # own: its key may have been used on that grant, for that address.
        db.execute(
            "UPDATE recipients AS r SET sender = p.sender, email = p.email FROM plan_rows AS p "
            "WHERE r.campaign_id = %s AND r.key = p.key AND r.state = 'pending' "
            "AND (r.sender IS DISTINCT FROM p.sender OR r.email != p.email)",
            (campaign,),
        )
        # A row planned without cells (sent already: they no longer matter) keeps the ones it has.
        db.execute(
            "UPDATE recipients AS r SET row = p.row, cells = COALESCE(p.cells, r.cells) FROM plan_rows AS p "
            "WHERE r.campaign_id = %s AND r.key = p.key "
            "AND (r.row != p.row OR (p.cells IS NOT NULL AND r.cells IS DISTINCT FROM p.cells))",
            (campaign,),
        )
        added = db.execute(
            "INSERT INTO recipients (campaign_id, key, row, email, sender, state, due_at, cells, created_at, "
            "updated_at) SELECT %s, key, row, email, sender, 'pending', due_at, cells, %s, %s "
            "FROM plan_rows AS p WHERE NOT EXISTS "
            "(SELECT 1 FROM recipients AS r WHERE r.campaign_id = %s AND r.key = p.key) ORDER BY p.place",
            (campaign, now, now, campaign),
        ).rowcount
        # A row skipped as invalid keeps the cells it was skipped with: met again unchanged, it stays skipped.
        # A skipped row is where the list has it now (a row above it removed moves it up), as a planned one.
        db.execute(
            "UPDATE recipients AS r SET cells = COALESCE(s.cells, r.cells), row = s.row FROM plan_skips AS s "
            "WHERE r.campaign_id = %s AND r.key = s.key AND r.state = 'skipped' "
            "AND ((s.cells IS NOT NULL AND r.cells IS DISTINCT FROM s.cells) OR r.row != s.row)",
            (campaign,),
        )
        # A skip the list decides gives the list's reason of now, as SQLite's (the person's own stands).
        db.execute(
            "UPDATE recipients AS r SET reason = s.reason, updated_at = %s FROM plan_skips AS s "
            "WHERE r.campaign_id = %s AND r.key = s.key AND r.state = 'skipped' AND r.reason != s.reason "
            "AND (starts_with(r.reason, %s) OR starts_with(r.reason, %s))",
            (now, campaign, INVALID_REASON, DUPLICATE_REASON),
        )
        # A row without cells skipped now takes the skip's, as in SQLite (whose ledgers from before cells
        # were kept have such rows): its follow-ups are rebuilt from them, if only to be skipped.
        db.execute(
            "UPDATE recipients AS r SET cells = s.cells FROM plan_skips AS s WHERE r.campaign_id = %s "
            "AND r.key = s.key AND r.cells IS NULL AND s.cells IS NOT NULL",
            (campaign,),
        )
        skipped_added = db.execute(
            "INSERT INTO recipients (campaign_id, key, row, email, state, reason, cells, created_at, "
            "updated_at) SELECT %s, key, row, email, 'skipped', reason, cells, %s, %s FROM plan_skips AS s "
            "WHERE NOT EXISTS "
            "(SELECT 1 FROM recipients AS r WHERE r.campaign_id = %s AND r.key = s.key) "
            "ORDER BY s.row, s.place",
            (campaign, now, now, campaign),
        ).rowcount
        for table in ("plan_rows", "plan_skips"):
            db.execute(
                f"UPDATE recipients AS r SET listed = true FROM {table} AS t "
                "WHERE r.campaign_id = %s AND r.key = t.key AND r.step = %s AND NOT r.listed",
                (campaign, FIRST_STEP),
            )
        # A row mailed under a key the list no longer has, at the address of a listed row skipped as already
        # mailed under its key: the list gave its person a new key (SQLite's `record_plan` says more).
        db.execute(
            "UPDATE recipients AS r SET listed = true, row = m.row FROM (SELECT lower(email) AS email, "
            "min(row) AS row FROM recipients WHERE campaign_id = %s AND step = %s AND listed "
            "AND state = 'skipped' AND starts_with(reason, %s) GROUP BY lower(email)) AS m "
            "WHERE r.campaign_id = %s AND r.step = %s AND NOT r.listed AND r.state = ANY(%s) "
            "AND lower(r.email) = m.email",
            (
                campaign,
                FIRST_STEP,
                MAILED_DUPLICATE_REASON,
                campaign,
                FIRST_STEP,
                [state.value for state in MAILED_STATES],
            ),
        )
        missing = {
            RowState(state): int(count)
            for state, count in db.execute(
                "SELECT state, count(*) FROM recipients WHERE campaign_id = %s AND step = %s AND NOT listed "
                "GROUP BY state",
                (campaign, FIRST_STEP),
            )
        }
        return SyncReport(
            added=added,
            skipped_added=skipped_added,
            existing=wanted - added - skipped_added,
            missing=sum(missing.values()),
            newly_skipped=newly_skipped,
            restored=restored,
            undoubled=undoubled,
            missing_states=missing,
        )

    def _skip_now_skipped(self, db: _Connection, now: str) -> int:
        """Open rows the list now skips: a pending one is skipped; one in flight becomes unknown (its
        request may have left: only reconcile can say), never sent again."""
        self._check_move(PENDING, SKIPPED)
        skipped = db.execute(
            "UPDATE recipients AS r SET state = 'skipped', reason = s.reason, updated_at = %s "
            "FROM plan_skips AS s WHERE r.campaign_id = %s AND r.key = s.key AND r.state = 'pending'",
            (now, self._id),
        ).rowcount
        self._check_move(INFLIGHT, UNKNOWN)
        unknown = db.execute(
            "UPDATE recipients AS r SET state = 'unknown', updated_at = %s, "
            "note = 'now skipped (' || s.reason || '); `campaign reconcile` settles its earlier send' "
            "FROM plan_skips AS s WHERE r.campaign_id = %s AND r.key = s.key AND r.state = 'inflight'",
            (now, self._id),
        ).rowcount
        return skipped + unknown

    def _restore_now_valid(self, db: _Connection, now: str) -> tuple[int, int]:
        """Rows skipped as invalid, and as a duplicate, that the plan now mails: pending again, from the
        plan's sender, to the plan's address, at the plan's time (step 1's deliver_at), as a new row; how
        many of each."""
        self._check_move(SKIPPED, PENDING)
        invalid, duplicate = (
            db.execute(
                "UPDATE recipients AS r SET state = 'pending', reason = NULL, sender = p.sender, "
                "email = p.email, due_at = p.due_at, updated_at = %s FROM plan_rows AS p "
                "WHERE r.campaign_id = %s AND r.key = p.key AND r.state = 'skipped' "
                "AND starts_with(r.reason, %s)",
                (now, self._id, reason),
            ).rowcount
            for reason in (INVALID_REASON, DUPLICATE_REASON)
        )
        return invalid, duplicate

    def record_moved_mailboxes(self, senders: Mapping[str, str]) -> list[str]:
        """Keep each in-flight row with the mailbox its key was issued for; return the rows given up
        (`SqliteLedger.record_moved_mailboxes` says why)."""
        gone: list[str] = []
        with self._write() as db:
            rows = db.execute(
                "SELECT key, sender, claimed_via FROM recipients "
                "WHERE campaign_id = %s AND state = 'inflight' ORDER BY id FOR UPDATE",
                (self._id,),
            ).fetchall()
            for key, sender, via in rows:
                if via is None:
                    continue  # claimed by a version that did not record it
                owner = senders.get(via)
                if owner is None:
                    note = (
                        f"claimed through {via}, which no sender of the manifest has any more; its "
                        "idempotency key means nothing elsewhere: restore that grant_id and resume, or "
                        "`campaign reconcile`"
                    )
                    self._set_state(db, key, INFLIGHT, UNKNOWN, note=note)
                    gone.append(key)
                elif owner != sender:
                    db.execute(
                        "UPDATE recipients SET sender = %s WHERE campaign_id = %s AND key = %s",
                        (owner, self._id, key),
                    )
        return gone

    def record_mailbox_addresses(self, addresses: Iterable[tuple[str, str]]) -> None:
        """Keep that each grant sends as its address (as SQLite's), for every campaign in the database."""
        pairs = sorted(set(addresses))
        if not pairs:
            return
        with self._write() as db:
            db.execute(
                "INSERT INTO mailboxes (via, address) SELECT * FROM unnest(%s::text[], %s::text[]) "
                "ON CONFLICT DO NOTHING",
                ([via for via, _ in pairs], [address for _, address in pairs]),
            )

    def record_senders(self, senders: Mapping[str, str]) -> int:
        """Give each key's row of step 1 its new sender, if it is still pending (as SQLite's)."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE recipients AS r SET sender = m.sender, updated_at = %s "
                "FROM unnest(%s::text[], %s::text[]) AS m(key, sender) WHERE r.campaign_id = %s "
                "AND r.key = m.key AND r.state = 'pending' AND r.step = %s",
                (self._stamp(), list(senders), list(senders.values()), self._id, FIRST_STEP),
            )
            return cursor.rowcount

    def record_expired_claims(self, *, older_than_s: float = KEY_REUSE_S) -> int:
        """Turn in-flight rows whose key is older than `older_than_s` into unknown; returns how many.

        A row whose sender another live worker leases is its: that worker may be sending it right now,
        and its send loop gives up on a key too old by itself."""
        now = self._clock.now().timestamp()
        cutoff = now - older_than_s
        note = "its idempotency key is older than Nylas's 1 h replay window; `campaign reconcile` settles it"
        with self._write() as db:
            found = db.execute(
                "SELECT key, key_issued_at FROM recipients AS r "
                "WHERE campaign_id = %s AND state = 'inflight' AND NOT EXISTS (SELECT 1 FROM leases AS l "
                "WHERE l.campaign_id = r.campaign_id AND l.sender = r.sender AND l.expires_at > %s "
                "AND l.owner IS DISTINCT FROM %s) FOR UPDATE OF r",
                (self._id, now, self._worker),
            ).fetchall()
            stale = [
                key
                for key, issued in found
                if issued is None or datetime.fromisoformat(issued).timestamp() < cutoff
            ]
            self._check_move(INFLIGHT, UNKNOWN)
            db.execute(
                "UPDATE recipients SET state = 'unknown', note = %s, updated_at = %s "
                "WHERE campaign_id = %s AND key = ANY(%s::text[])",
                (note, self._stamp(), self._id, stale),
            )
        return len(stale)

    def open_rows_of(
        self, sender: str, state: RowState, now: datetime | None = None, *, after: int = 0, limit: int = 1000
    ) -> list[PlannedRow]:
        """Up to `limit` listed rows of step 1 in `state` (pending or in flight) that `sender` sends, due at
        `now` if given, in ledger order after `after` (the last one's `cursor`): a page of a lane's work,
        a range of the state index."""
        stamp = None if now is None else _iso(now)
        rows = self._read(
            "SELECT key, row, email, sender, cells, id FROM recipients "
            "WHERE campaign_id = %s AND state = %s AND sender = %s AND id > %s AND listed AND step = %s "
            "AND (%s::text IS NULL OR state = 'inflight' OR due_at IS NULL OR due_at <= %s) "
            "ORDER BY id LIMIT %s",
            (self._id, state.value, sender, after, FIRST_STEP, stamp, stamp, limit),
        )
        inflight = state == INFLIGHT
        return [
            PlannedRow(key, row, email, name, inflight, cells=cells, cursor=place)
            for key, row, email, name, cells, place in rows
        ]

    def open_counts(self, now: datetime | None = None) -> dict[str, int]:
        """Per sender, the listed pending and in-flight rows of step 1 (due at `now`, if given)."""
        stamp = None if now is None else _iso(now)
        rows = self._read(
            "SELECT sender, COUNT(*) FROM recipients WHERE campaign_id = %s "
            "AND state IN ('pending', 'inflight') AND listed AND step = %s "
            "AND (%s::text IS NULL OR state = 'inflight' OR due_at IS NULL OR due_at <= %s) GROUP BY sender",
            (self._id, FIRST_STEP, stamp, stamp),
        )
        return {str(sender): int(count) for sender, count in rows}

    def listed_rows(self, keys: Iterable[str]) -> dict[str, int]:
        """Key -> its row in the list, for the rows of step 1 of `keys` that the last plan listed."""
        rows = self._read(
            "SELECT key, row FROM recipients WHERE campaign_id = %s AND key = ANY(%s::text[]) "
            "AND listed AND step = %s",
            (self._id, list(keys), FIRST_STEP),
        )
        return dict(rows)

    def listed_addresses(self, emails: Iterable[str]) -> dict[str, int]:
        """Lower-cased address -> the first row of step 1 that the last plan listed with it (compared
        without case), for `emails` (lower-cased): a batch's lookups, through `recipients_address`."""
        wanted = list(emails)
        query = _BY_ADDRESS.format(column="row", where="r.listed")
        return first_of(self._read(query, {"campaign": self._id, "keys": wanted, "emails": wanted}))

    def mailed_keys(self, asked: Iterable[tuple[str, str]]) -> dict[str, str]:
        """For each (key, lower-cased address) asked: another key of step 1 whose row was mailed to that
        address (sent, in flight or unknown), compared without case; key -> that key (the least, if
        several), for the keys that have one."""
        pairs = list(asked)
        query = _BY_ADDRESS.format(column="key", where="r.key <> a.key AND r.state = ANY(%(mailed)s::text[])")
        params = {
            "campaign": self._id,
            "keys": [key for key, _ in pairs],
            "emails": [email for _, email in pairs],
            "mailed": [state.value for state in MAILED_STATES],
        }
        return first_of(self._read(query, params))

    def mailed_addresses(self, keys: Iterable[str]) -> dict[str, str]:
        """Key -> the address its row of step 1 was mailed at (sent, or unknown), for the rows of `keys`
        that were."""
        rows = self._read(
            "SELECT key, email FROM recipients WHERE campaign_id = %s AND key = ANY(%s::text[]) "
            "AND step = %s AND state IN ('sent', 'unknown')",
            (self._id, list(keys), FIRST_STEP),
        )
        return dict(rows)

    def assigned_senders(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """The sender each recipient already in the ledger is assigned to (of `keys`, if given)."""
        if keys is None:
            rows = self._read(
                "SELECT key, sender FROM recipients WHERE campaign_id = %s AND sender IS NOT NULL "
                "AND step = %s",
                (self._id, FIRST_STEP),
            )
        else:
            rows = self._read(
                "SELECT key, sender FROM recipients WHERE campaign_id = %s AND key = ANY(%s::text[]) "
                "AND sender IS NOT NULL",
                (self._id, list(keys)),
            )
        return dict(rows)

    def assigned_counts(self) -> dict[str, int]:
        """How many recipients the ledger assigns to each sender."""
        rows = self._read(
            "SELECT sender, COUNT(*) FROM recipients WHERE campaign_id = %s AND sender IS NOT NULL "
            "AND step = %s GROUP BY sender",
            (self._id, FIRST_STEP),
        )
        return dict(rows)

    def key_cells(self, keys: Iterable[str]) -> dict[str, str]:
        """Key -> its list row's cells as last checked, for the rows of `keys` that have them."""
        rows = self._read(
            "SELECT key, cells FROM recipients WHERE campaign_id = %s AND key = ANY(%s::text[]) "
            "AND cells IS NOT NULL",
            (self._id, list(keys)),
        )
        return dict(rows)

    def invalid_cells(self, keys: Iterable[str]) -> dict[str, str]:
        """Key -> the cells a row of `keys` skipped as invalid was skipped with (`Skip.cells`)."""
        rows = self._read(
            "SELECT key, cells FROM recipients WHERE campaign_id = %s AND key = ANY(%s::text[]) "
            "AND state = 'skipped' AND cells IS NOT NULL AND starts_with(reason, %s)",
            (self._id, list(keys), INVALID_REASON),
        )
        return dict(rows)

    def duplicate_skips(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` are of rows skipped as a duplicate: a check decides them again (`record_plan`)."""
        rows = self._read(
            "SELECT key FROM recipients WHERE campaign_id = %s AND key = ANY(%s::text[]) "
            "AND state = 'skipped' AND starts_with(reason, %s)",
            (self._id, list(keys), DUPLICATE_REASON),
        )
        return {str(key) for (key,) in rows}

    def key_states(self, states: Iterable[RowState], keys: Iterable[str] | None = None) -> dict[str, str]:
        """Key -> state name of the rows in `states` (of `keys`, if given); no row objects, so cheap."""
        query = "SELECT key, state FROM recipients WHERE campaign_id = %s AND state = ANY(%s::text[])"
        params: list[object] = [self._id, [state.value for state in states]]
        if keys is not None:
            query += " AND key = ANY(%s::text[])"
            params.append(list(keys))
        return dict(self._read(query, params))

    # --- sending ----------------------------------------------------------------------------------

    def claim(
        self, key: str, *, subject: str | None = None, sender: str | None = None, via: str | None = None
    ) -> Claim | None:
        """Mark a row in flight with its idempotency key, before its request leaves (as
        `SqliteLedger.claim`: a pending row gets a key, a row left in flight keeps its own).

        A row another transaction holds is skipped, not waited for (`FOR UPDATE SKIP LOCKED`): another
        worker is deciding on it (giving it to another grant, settling it), so it is not this claim's;
        None, as for a row settled meanwhile. A worker's later round reads it again if it is still
        pending."""
        return only(self.claim_many([ClaimRequest(key, subject, sender, via)]))

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Claim | LedgerError | None]:
        """`claim` of each: the pending ones in one statement, the rest (rows left in flight, settled
        or missing) one by one, each its own LedgerError if it fails."""
        now = self._stamp()
        with self._in_one_transaction():
            claimed = self._claim_pending(requests, now=now)
            return [
                claimed.pop(asked.key)
                if asked.key in claimed
                else or_error(partial(self._claim_checked, asked, now))
                for asked in requests
            ]

    def _claim_checked(self, asked: ClaimRequest, now: str) -> Claim | None:
        """`decide_claim` on the row as it is: a row in flight keeps its key; None if settled or held."""
        key, subject, sender, via = asked.key, asked.subject, asked.sender, asked.via
        with self._write() as db:
            current = self._fetch_free(db, key)
            if current is None:
                return None
            if self._worker is not None:
                self._check_lease(db, sender or current["sender"])
            change = decide_claim(
                current, campaign=self._campaign, key=key, sender=sender, via=via, now=now, where=self._where
            )
            if change is None:
                return None
            db.execute(
                "UPDATE recipients SET state = 'inflight', idempotency_key = %s, key_issued_at = %s, "
                "key_uses = %s, claimed_at = %s, first_claimed_at = COALESCE(first_claimed_at, %s), "
                "subject = COALESCE(%s, subject), sender = %s, claimed_via = COALESCE(%s, claimed_via), "
                "updated_at = %s WHERE campaign_id = %s AND key = %s",
                (
                    change.idempotency_key,
                    change.issued,
                    change.uses,
                    now,
                    now,
                    subject,
                    change.owner,
                    change.via,
                    now,
                    self._id,
                    key,
                ),
            )
        return change.as_claim()

    def record_outcome(self, key: str, outcome: SendOutcome, *, sender: str, recipients: int = 1) -> RowState:
        """Record what a send of an in-flight row came to; returns the row's new state (as
        `SqliteLedger.record_outcome`)."""
        return only(self.record_outcomes([OutcomeReport(key, outcome, sender, recipients)]))

    def record_outcomes(self, reports: Sequence[OutcomeReport]) -> list[RowState | LedgerError]:
        """`record_outcome` of each: the sent ones in one statement (with their send log entries), the
        rest one by one, each its own LedgerError if it fails."""
        now = self._stamp()
        results: list[RowState | LedgerError] = []
        with self._in_one_transaction():
            sent = [report for report in reports if report.outcome.kind == OutcomeKind.SENT]
            recorded = self._record_sent(sent, now)
            for report in reports:
                if report.key in recorded:
                    recorded.remove(report.key)
                    results.append(SENT)
                else:
                    results.append(or_error(partial(self._record_checked, report, now)))
        return results

    def _record_checked(self, report: OutcomeReport, now: str) -> RowState:
        key, outcome, sender, recipients = report.key, report.outcome, report.sender, report.recipients
        with self._write() as db:
            current = self._fetch(db, key)
            if current["state"] != INFLIGHT.value:
                message = (
                    f"{self._where}: cannot record a send outcome for {key!r}: it is {current['state']}, "
                    "not inflight"
                )
                if self._worker is not None:
                    # The one way a leased worker's claimed row leaves its hands: the worker was paused or
                    # cut off past its lease, and the grant's next owner settled the row with its key.
                    message += (
                        f"; this worker lost its lease on {sender!r} (stopped or cut off longer than the "
                        "lease) and another worker settled the row with the same idempotency key, so "
                        "nothing was sent twice; start the worker again to go on"
                    )
                raise LedgerError(message)
            new_state = _state_after(outcome, key_used=current["key_uses"] > 0)
            error = (None, None, None) if new_state == SENT else _error_columns(outcome)
            pending = new_state == PENDING
            db.execute(
                "UPDATE recipients SET state = %s, message_id = COALESCE(%s, message_id), "
                "thread_id = COALESCE(%s, thread_id), "
                "internet_message_id = COALESCE(%s, internet_message_id), "
                "request_id = COALESCE(%s, request_id), replayed = %s, "
                "error_type = %s, error_status = %s, error_message = %s, attempts = attempts + 1, "
                "updated_at = %s, sent_at = CASE WHEN %s THEN %s ELSE sent_at END, "
                "attempt_no = attempt_no + %s, "
                "idempotency_key = CASE WHEN %s THEN NULL ELSE idempotency_key END, "
                "key_issued_at = CASE WHEN %s THEN NULL ELSE key_issued_at END, "
                "key_uses = key_uses + %s WHERE campaign_id = %s AND key = %s",
                (
                    new_state.value,
                    outcome.message_id,
                    outcome.thread_id,
                    outcome.internet_message_id,
                    outcome.request_id,
                    outcome.replayed,
                    *error,
                    now,
                    new_state == SENT,
                    now,
                    int(pending),
                    pending,
                    pending,
                    int(outcome.kind in (OutcomeKind.AMBIGUOUS, OutcomeKind.IN_PROGRESS)),
                    self._id,
                    key,
                ),
            )
            if new_state == SENT:
                self._log_send(db, key, sender, self._clock.now().timestamp(), recipients)
        return new_state

    def release(self, key: str) -> None:
        """Return a freshly claimed row whose request never left to pending; its key is still unused."""
        with self._write() as db:
            self._set_state(db, key, INFLIGHT, PENDING)

    def record_unknown(self, key: str, *, note: str | None = None) -> None:
        """Give up on an in-flight row whose fate cannot be known now (reconcile settles it)."""
        with self._write() as db:
            self._set_state(db, key, INFLIGHT, UNKNOWN, note=note)

    def record_skipped(self, key: str, reason: SkipReason, detail: str) -> bool:
        """Mark a pending row skipped with `reason`; False (and no change) if the row is not pending."""
        with self._write() as db:
            if self._fetch(db, key)["state"] != PENDING.value:
                return False
            self._set_state(db, key, PENDING, SKIPPED)
            db.execute(
                "UPDATE recipients SET reason = %s WHERE campaign_id = %s AND key = %s",
                (f"{reason.value}: {detail}", self._id, key),
            )
        return True

    def sent_recipients_since(
        self, sender: str, since: float, *, via: str | None = None, address: str | None = None
    ) -> list[tuple[float, int]]:
        """(Unix time, recipients) of each send by `sender` since `since`, oldest first; with `via` (its
        mailbox), each send through that mailbox instead, by any campaign in the database under any
        sender's name (and those logged before the log kept mailboxes, by this campaign and `sender`);
        with `address` too, through any grant recorded as sending as it (as SQLite's)."""
        if via is None:
            query = (
                "SELECT sent_at, recipients FROM send_log WHERE campaign_id = %s AND sender = %s "
                "AND sent_at > %s ORDER BY sent_at"
            )
            return [(float(at), int(n)) for at, n in self._read(query, (self._id, sender, since))]
        vias, asked = self._vias_of(via, address)
        query = (
            f"SELECT sent_at, recipients FROM send_log WHERE via IN {vias} AND via IS NOT NULL "
            "AND sent_at > %s UNION ALL "
            "SELECT sent_at, recipients FROM send_log WHERE campaign_id = %s AND via IS NULL AND sender = %s "
            "AND sent_at > %s ORDER BY sent_at"
        )
        found = self._read(query, (*asked, since, self._id, sender, since))
        return [(float(at), int(n)) for at, n in found]

    def sent_recipients_total(
        self, sender: str, since: float, *, via: str | None = None, address: str | None = None
    ) -> int:
        """How many recipients `sender` (with `via`, its mailbox, by any campaign in the database, and
        `address`, every grant sending as it) sent to since `since`: the sum of `sent_recipients_since`.
        A schema from before the log kept mailboxes counts by `sender`."""
        if via is None or not self._keeps_mailboxes():
            query = (
                "SELECT COALESCE(SUM(recipients), 0) FROM send_log WHERE campaign_id = %s AND sender = %s "
                "AND sent_at > %s"
            )
            return int(self._read(query, (self._id, sender, since))[0][0])
        vias, asked = self._vias_of(via, address)
        query = (
            "SELECT COALESCE(SUM(recipients), 0) FROM ("
            f"SELECT recipients FROM send_log WHERE via IN {vias} AND via IS NOT NULL AND sent_at > %s "
            "UNION ALL "
            "SELECT recipients FROM send_log WHERE campaign_id = %s AND via IS NULL AND sender = %s "
            "AND sent_at > %s) AS sends"
        )
        return int(self._read(query, (*asked, since, self._id, sender, since))[0][0])

    def _vias_of(self, via: str, address: str | None) -> tuple[str, tuple[str, ...]]:
        """The mailboxes a budget counts, as SQL to follow IN, and its parameters (as SQLite's)."""
        if address is None or not self._links_mailboxes():
            return "(%s)", (via,)
        return "(SELECT %s UNION SELECT via FROM mailboxes WHERE address = %s)", (via, address)

    def _links_mailboxes(self) -> bool:
        if self._knows_addresses is None:
            found = self._read("SELECT to_regclass('mailboxes') IS NOT NULL", ())
            self._knows_addresses = bool(found[0][0])
        return self._knows_addresses

    def _keeps_mailboxes(self) -> bool:
        if self._logs_mailboxes is None:
            found = self._read(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = 'send_log' AND column_name = 'via'",
                (),
            )
            self._logs_mailboxes = bool(found)
        return self._logs_mailboxes

    # --- follow-up steps --------------------------------------------------------------------------

    def unschedule_steps(self, step: str) -> int:
        """Remove follow-up `step`'s rows that are pending and were never claimed; how many."""
        with self._write() as db:
            return max(
                db.execute(
                    "DELETE FROM recipients WHERE campaign_id = %s AND step = %s AND step != %s "
                    "AND state = 'pending' AND key_issued_at IS NULL AND first_claimed_at IS NULL",
                    (self._id, step, FIRST_STEP),
                ).rowcount,
                0,
            )

    def unschedule_skipping(self, step: str, *, answering: str, skipped: str) -> int:
        """Remove follow-up `step`'s rows never claimed that answer step `answering`, of recipients whose
        step `skipped` neither failed nor was skipped (`Ledger.unschedule_skipping`); how many."""
        with self._write() as db:
            return max(
                db.execute(
                    """
                    DELETE FROM recipients AS f USING recipients AS p
                    WHERE f.campaign_id = %s AND f.step = %s AND f.step != %s AND f.state = 'pending'
                        AND f.key_issued_at IS NULL AND f.first_claimed_at IS NULL
                        AND p.campaign_id = f.campaign_id AND p.key = f.previous AND p.step = %s
                        AND NOT EXISTS (
                            SELECT 1 FROM recipients AS k
                            WHERE k.campaign_id = f.campaign_id AND k.key = f.recipient || chr(31) || %s
                                AND k.state IN ('failed', 'skipped')
                        )
                    """,
                    (self._id, step, FIRST_STEP, answering, skipped),
                ).rowcount,
                0,
            )

    def record_followups(self, scheduled: Sequence[ScheduledStep]) -> int:
        """Add a pending row for each follow-up scheduled, due at its time; returns how many were new
        (a (recipient, step) that has its row already keeps it)."""
        now = self._stamp()
        with self._write() as db, db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO recipients (campaign_id, key, row, email, sender, state, step, recipient, "
                "previous, due_at, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (campaign_id, key) DO NOTHING",
                [
                    (
                        self._id,
                        step_key(item.recipient, item.step),
                        item.row,
                        item.email,
                        item.sender,
                        item.step,
                        item.recipient,
                        item.previous,
                        due_text(item.due_at),
                        now,
                        now,
                    )
                    for item in scheduled
                ],
            )
            return max(cursor.rowcount, 0)  # the rows inserted, summed over the batch

    def record_reply_refused(self, key: str, outcome: SendOutcome, *, reply_to: str | None) -> None:
        """A follow-up's send answered 404: back to pending with a new key next time, answering `reply_to`
        if given (as `SqliteLedger.record_reply_refused`)."""
        type_, status, message = _error_columns(outcome)
        with self._write() as db:
            self._set_state(db, key, INFLIGHT, PENDING)
            db.execute(
                "UPDATE recipients SET reply_to = COALESCE(%s, reply_to), "
                "request_id = COALESCE(%s, request_id), replayed = %s, error_type = %s, error_status = %s, "
                "error_message = %s, attempts = attempts + 1, attempt_no = attempt_no + 1, "
                "idempotency_key = NULL, key_issued_at = NULL WHERE campaign_id = %s AND key = %s",
                (reply_to, outcome.request_id, outcome.replayed, type_, status, message, self._id, key),
            )

    def record_auto_reply(self, key: str, detail: str) -> None:
        """Note an auto-reply seen before a follow-up that goes on regardless (`auto_replies = "ignore"`)."""
        with self._write() as db:
            db.execute(
                "UPDATE recipients SET auto_reply = %s WHERE campaign_id = %s AND key = %s",
                (detail, self._id, key),
            )

    def unscheduled_steps(
        self, previous: str, step: str, *, later: Sequence[str] = (), after: int = 0, limit: int = 1000
    ) -> list[SentStep]:
        """Up to `limit` rows of step `previous` that were sent to a recipient still in the list and
        have no row of `step` yet, nor of any step in `later`, in ledger order after `after` (the last
        one's `cursor`)."""
        rows = self._read(
            """
            SELECT p.key, COALESCE(p.recipient, p.key), p.row, p.email, p.sender, p.sent_at, p.id
            FROM recipients AS p
                JOIN recipients AS s ON s.campaign_id = p.campaign_id AND s.key = COALESCE(p.recipient, p.key)
            WHERE p.campaign_id = %s AND p.id > %s AND p.step = %s AND p.state = 'sent' AND s.listed
                AND NOT EXISTS (
                    SELECT 1 FROM recipients AS f WHERE f.campaign_id = p.campaign_id
                        AND f.key = COALESCE(p.recipient, p.key) || chr(31) || %s
                )
                -- Each later step's key looked up in the primary key: `l.key = ANY (SELECT …)` was
                -- planned as a scan of the whole table for every row of `previous` (quadratic).
                AND NOT EXISTS (
                    SELECT 1 FROM unnest(%s::text[]) AS later
                        JOIN recipients AS l ON l.campaign_id = p.campaign_id
                            AND l.key = COALESCE(p.recipient, p.key) || chr(31) || later
                )
            ORDER BY p.id LIMIT %s
            """,
            (self._id, after, previous, step, list(later), limit),
        )
        return [
            SentStep(key, recipient, row, email, sender, _moment(sent_at), place)
            for key, recipient, row, email, sender, sent_at, place in rows
        ]

    def due_senders(self, now: datetime) -> list[str]:
        """The senders of follow-up rows that may be claimed at `now` (in the manifest or no longer)."""
        rows = self._read(
            "SELECT DISTINCT sender FROM recipients WHERE campaign_id = %s AND due_at <= %s AND step != %s "
            "AND state IN ('pending', 'inflight') ORDER BY sender",
            (self._id, _iso(now), FIRST_STEP),
        )
        return [sender for (sender,) in rows]

    def due_steps_of(
        self, sender: str, state: RowState, now: datetime, *, after: int = 0, limit: int = 1000
    ) -> list[DueStep]:
        """Up to `limit` follow-up rows of `sender` in `state` (pending or in flight) that may be claimed at
        `now`, with the steps they answer, in ledger order after `after` (the last one's `cursor`)."""
        rows = self._read(
            """
            SELECT f.key, f.recipient, f.step, s.row, s.email, f.sender, s.listed, p.step,
                COALESCE(p.subject, ''), COALESCE(f.reply_to, p.message_id), p.thread_id, p.sent_at,
                s.sent_at, f.id, p.internet_message_id
            FROM recipients AS f
                JOIN recipients AS p ON p.campaign_id = f.campaign_id AND p.key = f.previous
                JOIN recipients AS s ON s.campaign_id = f.campaign_id AND s.key = f.recipient
            WHERE f.campaign_id = %s AND f.state = %s AND f.sender = %s AND f.id > %s AND f.step != %s
                AND f.due_at <= %s
            ORDER BY f.id LIMIT %s
            """,
            (self._id, state.value, sender, after, FIRST_STEP, _iso(now), limit),
        )
        inflight = state == INFLIGHT
        return [
            DueStep(
                key, recipient, step, row, email, name, inflight, listed, previous_step, subject,
                message_id, thread_id, _moment(previous_sent), _moment(first_sent), place, header,
            )
            for (
                key, recipient, step, row, email, name, listed, previous_step, subject,
                message_id, thread_id, previous_sent, first_sent, place, header,
            ) in rows
        ]  # fmt: skip

    def next_due(self, now: datetime) -> datetime | None:
        """When the next follow-up scheduled after `now` is due (None: none is), of a recipient still in
        the list (a removed one gets no further step: nothing to wait for)."""
        found = self._read(
            "SELECT f.due_at FROM recipients AS f JOIN recipients AS s ON s.campaign_id = f.campaign_id "
            "AND s.key = COALESCE(f.recipient, f.key) WHERE f.campaign_id = %s AND f.due_at > %s "
            "AND f.state = 'pending' AND s.listed ORDER BY f.due_at LIMIT 1",
            (self._id, _iso(now)),
        )
        return _moment(found[0][0]) if found and found[0][0] else None

    def step_counts(self, steps: Iterable[str], now: datetime) -> list[StepCounts]:
        """Where each of `steps` stands at `now` (rows per state, due, scheduled, stopped), in that order."""
        stamp = _iso(now)
        states: dict[str, dict[RowState, int]] = {}
        timing: dict[str, tuple[int, int, str | None]] = {}
        auto: dict[str, int] = {}
        for step, state, count, due, later, first, replied in self._read(
            "SELECT step, state, COUNT(*), COUNT(*) FILTER (WHERE due_at IS NULL OR due_at <= %s), "
            "COUNT(*) FILTER (WHERE due_at > %s), MIN(due_at) FILTER (WHERE due_at > %s), "
            "COUNT(*) FILTER (WHERE auto_reply IS NOT NULL) "
            "FROM recipients WHERE campaign_id = %s GROUP BY step, state",
            (stamp, stamp, stamp, self._id),
        ):
            states.setdefault(step, dict.fromkeys(RowState, 0))[RowState(state)] = count
            auto[step] = auto.get(step, 0) + replied
            if state == PENDING.value:
                timing[step] = (due, later, first)
        stopped: dict[str, dict[str, int]] = {}
        for step, cause, count in self._read(
            "SELECT step, CASE WHEN strpos(reason, ':') > 0 THEN substr(reason, 1, strpos(reason, ':') - 1) "
            "ELSE COALESCE(NULLIF(reason, ''), 'unknown') END, COUNT(*) FROM recipients "
            "WHERE campaign_id = %s AND state = 'skipped' GROUP BY 1, 2",
            (self._id,),
        ):
            stopped.setdefault(step, {})[cause] = count
        return step_counts_of(steps, states, timing, stopped, auto)

    # --- settling: reconcile and retry ------------------------------------------------------------

    def record_found_sent(
        self,
        key: str,
        *,
        message_id: str,
        sender: str,
        sent_at: datetime | None,
        note: str,
        recipients: int = 1,
    ) -> None:
        """An unknown row whose message the API shows was sent: it becomes sent with that message id."""
        with self._write() as db:
            self._set_state(db, key, UNKNOWN, SENT, note=note)
            when = sent_at or self._clock.now()
            db.execute(
                "UPDATE recipients SET message_id = %s, sent_at = %s, error_type = NULL, "
                "error_status = NULL, error_message = NULL WHERE campaign_id = %s AND key = %s",
                (message_id, when.isoformat(timespec="milliseconds"), self._id, key),
            )
            self._log_send(db, key, sender, when.timestamp(), recipients)

    def record_retry(self, key: str, *, note: str) -> None:
        """Send a failed or unknown row again: back to pending, with a new idempotency key next time."""
        with self._write() as db:
            self._retry(db, [(key, self._fetch(db, key)["state"])], note=note)

    def record_retry_all(self, states: Sequence[RowState], *, note: str) -> int:
        """Retry every row in `states` (failed and/or unknown) in one transaction; returns how many."""
        with self._write() as db:
            found = db.execute(
                "SELECT key, state FROM recipients WHERE campaign_id = %s AND state = ANY(%s::text[]) "
                "ORDER BY row, key FOR UPDATE",
                (self._id, [state.value for state in states]),
            ).fetchall()
            self._retry(db, found, note=note)
            if found:
                self.record_event("retry", f"{len(found)} rows back to pending ({note})")
        return len(found)

    def _retry(self, db: _Connection, rows: Sequence[tuple[str, str]], *, note: str) -> None:
        """(key, state) rows back to pending, each with a new key next time; failed and unknown ones only."""
        for key, state in rows:
            if state not in (FAILED.value, UNKNOWN.value):
                raise LedgerError(
                    f"{self._where}: cannot retry {key!r}: it is {state}, not failed or unknown"
                )
        self._check_move(FAILED, PENDING)
        self._check_move(UNKNOWN, PENDING)
        db.execute(
            "UPDATE recipients SET state = 'pending', note = %s, updated_at = %s, "
            "attempt_no = attempt_no + 1, idempotency_key = NULL, key_issued_at = NULL "
            "WHERE campaign_id = %s AND key = ANY(%s::text[])",
            (note, self._stamp(), self._id, [key for key, _ in rows]),
        )

    # --- reading: status, report, preview ---------------------------------------------------------

    def row(self, key: str) -> LedgerRow:
        """The row of `key` (LedgerError if there is none)."""
        found = self._read(
            f"SELECT {', '.join(ROW_COLUMNS)} FROM recipients WHERE campaign_id = %s AND key = %s",
            (self._id, key),
        )
        if not found:
            raise LedgerError(f"{self._where}: no recipient {key!r} in the ledger")
        return _to_row(found[0])

    def rows(
        self, *, states: Iterable[RowState] | None = None, listed: bool | None = None
    ) -> Iterator[LedgerRow]:
        """Every row (or those in `states`; or only those still / no longer in the list), in list order."""
        query = f"SELECT {', '.join(ROW_COLUMNS)} FROM recipients WHERE campaign_id = %s"
        params: list[object] = [self._id]
        if states is not None:
            query += " AND state = ANY(%s::text[])"
            params.append([state.value for state in states])
        if listed is not None:
            query += " AND listed = %s"
            params.append(listed)
        for values in self._read(query + " ORDER BY row, key", params):
            yield _to_row(values)

    def counts(self, *, listed: bool | None = None, step: str | None = None) -> dict[RowState, int]:
        """How many rows are in each state (every state present, zeros included); of one step if given."""
        query = "SELECT state, COUNT(*) FROM recipients WHERE campaign_id = %s"
        params: list[object] = [self._id]
        if listed is not None:
            query += " AND listed = %s"
            params.append(listed)
        if step is not None:
            query += " AND step = %s"
            params.append(step)
        found = dict(self._read(query + " GROUP BY state", params))
        return {state: found.get(state.value, 0) for state in RowState}

    def counts_per_sender(self) -> dict[str | None, dict[RowState, int]]:
        """Per sender (None: rows no sender was assigned), how many rows are in each state; one index scan."""
        result: dict[str | None, dict[RowState, int]] = {}
        for state, sender, count in self._read(
            "SELECT state, sender, COUNT(*) FROM recipients WHERE campaign_id = %s GROUP BY state, sender",
            (self._id,),
        ):
            result.setdefault(sender, dict.fromkeys(RowState, 0))[RowState(state)] = count
        return result

    def sample_emails(
        self, states: Iterable[RowState], *, listed: bool | None = None, limit: int = 3
    ) -> dict[RowState, list[str]]:
        """Up to `limit` addresses per state, in list order: the first in list order of the state's first
        `_SAMPLED_FROM` rows recorded (as `SqliteLedger.sample_emails`)."""
        which = "" if listed is None else " AND listed = %(listed)s"
        query = (
            "SELECT email FROM recipients WHERE campaign_id = %(campaign)s AND id IN ("
            f"SELECT id FROM recipients WHERE campaign_id = %(campaign)s AND state = %(state)s{which} "
            f"ORDER BY id LIMIT {_SAMPLED_FROM}) ORDER BY row, key LIMIT %(limit)s"
        )
        return {
            state: [
                email
                for (email,) in self._read(
                    query, {"campaign": self._id, "state": state.value, "listed": listed, "limit": limit}
                )
            ]
            for state in states
        }

    def skip_causes(self) -> dict[str, int]:
        """How many rows are skipped per cause: the reason up to its first colon ("unknown" if none)."""
        return dict(
            self._read(
                "SELECT CASE WHEN strpos(reason, ':') > 0 THEN substr(reason, 1, strpos(reason, ':') - 1) "
                "ELSE reason END AS cause, COUNT(*) "
                "FROM (SELECT COALESCE(NULLIF(reason, ''), 'unknown') AS reason FROM recipients "
                "WHERE campaign_id = %s AND state = 'skipped') AS skipped GROUP BY cause",
                (self._id,),
            )
        )

    def error_groups(self, *, waiting: bool = False) -> list[ErrorGroup]:
        """Failed and unknown rows grouped by HTTP status, error type and state, with their first and
        latest rows (the latest among those with an error message or a note). With `waiting`, the open
        rows (pending, in flight) whose last try failed instead: why they are still to send."""
        rows = WAITING_ROWS if waiting else FAILED_ROWS
        groups = self._read(_ERROR_GROUPS.format(rows=rows), (self._id,))
        said = self._read(_LATEST_ERRORS.format(rows=rows), (self._id,))
        latest: dict[tuple[object, ...], tuple[str, int, str, str]] = {
            (status, error_type, state): (at, row, key, text)
            for status, error_type, state, at, row, key, text in said
        }
        return [
            ErrorGroup(
                status=status,
                error_type=error_type,
                state=RowState(state),
                count=count,
                first=(row, key),
                latest=latest.get((status, error_type, state)),
            )
            for status, error_type, state, count, row, key in groups
        ]

    def journal(self) -> list[JournalEntry]:
        """The campaign's journal, oldest first."""
        return [
            JournalEntry(*entry)
            for entry in self._read(
                "SELECT at, kind, detail FROM journal WHERE campaign_id = %s ORDER BY id", (self._id,)
            )
        ]

    def sent_messages_to(self, emails: Iterable[str]) -> list[SentMessage]:
        """The rows sent to any of `emails` (compared without case; one pass over the ledger)."""
        rows = self._read(
            "SELECT key, email, sent_at, message_id FROM recipients WHERE campaign_id = %s "
            "AND state = 'sent' AND lower(email) = ANY(%s::text[])",
            (self._id, [email.lower() for email in emails]),
        )
        return [
            SentMessage(key, email, _moment(sent_at), message_id) for key, email, sent_at, message_id in rows
        ]

    def sent_message_ids(self, message_ids: Iterable[str]) -> set[str]:
        """Which of `message_ids` are messages this ledger recorded as sent (one pass over the ledger)."""
        rows = self._read(
            "SELECT message_id FROM recipients WHERE campaign_id = %s AND message_id = ANY(%s::text[])",
            (self._id, list(message_ids)),
        )
        return {message_id for (message_id,) in rows}

    def first_claim(self) -> datetime | None:
        """When the campaign's first send was claimed (None: nothing was ever sent)."""
        found = self._read("SELECT MIN(first_claimed_at) FROM recipients WHERE campaign_id = %s", (self._id,))
        return _moment(found[0][0]) if found and found[0][0] else None

    def latest_claim(self, state: RowState) -> datetime | None:
        """When the most recently claimed row in `state` was last claimed (None: no such row)."""
        found = self._read(
            "SELECT MAX(claimed_at) FROM recipients WHERE campaign_id = %s AND state = %s",
            (self._id, state.value),
        )
        return _moment(found[0][0]) if found and found[0][0] else None

    def started_row(self) -> tuple[str, str] | None:
        """(key, address) of one row a send was ever started for, or None (claimed once is enough: a row
        `retry --unknown` put back to pending may have been mailed)."""
        found = self._read(
            "SELECT key, email FROM recipients WHERE campaign_id = %s AND "
            "(state IN ('inflight', 'sent', 'failed', 'unknown') OR first_claimed_at IS NOT NULL) LIMIT 1",
            (self._id,),
        )
        return (found[0][0], found[0][1]) if found else None

    def workers(self) -> list[WorkerView]:
        """The workers sharing the campaign, with the grants each holds a live lease on, live ones first."""
        now = self._clock.now().timestamp()
        return read_workers(self._read, self._campaign, now, self._lease_s)

    def bind_worker(self, worker: str | None) -> None:
        """Make every claim from now on check, in its own transaction, that `worker` holds a live lease
        on the claiming sender: a worker that lost a grant cannot claim one more of its rows."""
        self._worker = worker

    # --- the machinery: rows, transactions, errors ------------------------------------------------

    def _check_lease(self, db: _Connection, sender: str | None) -> None:
        # Read, not locked: a share lock here and a heartbeat renewing every lease in one statement
        # deadlock. Should the lease change owner meanwhile, the next owner's claim of this row waits
        # for this one (its row lock), finds it in flight and re-sends it with the same key.
        held = db.execute(
            "SELECT 1 FROM leases WHERE campaign_id = %s AND sender = %s AND owner = %s AND expires_at > %s",
            (self._id, sender, self._worker, self._clock.now().timestamp()),
        ).fetchone()
        if held is None:
            message = (
                f"{self._where}: this worker no longer holds the lease on sender {sender!r} (another worker "
                "sends from it now); nothing was claimed"
            )
            raise LedgerError(message)

    def _fetch(self, db: _Connection, key: str) -> dict[str, Any]:
        """The row's columns a change of state is decided on, the row locked until the write ends."""
        found = self._locked(db, key, "FOR UPDATE")
        if found is None:
            raise LedgerError(f"{self._where}: no recipient {key!r} in the ledger")
        return found

    def _fetch_free(self, db: _Connection, key: str) -> dict[str, Any] | None:
        """As `_fetch`, but None if another transaction holds the row, instead of waiting for it."""
        found = self._locked(db, key, "FOR UPDATE SKIP LOCKED")
        if (
            found is None
            and not db.execute(
                "SELECT 1 FROM recipients WHERE campaign_id = %s AND key = %s", (self._id, key)
            ).fetchone()
        ):
            raise LedgerError(f"{self._where}: no recipient {key!r} in the ledger")
        return found

    def _locked(self, db: _Connection, key: str, lock: str) -> dict[str, Any] | None:
        found = db.execute(
            f"SELECT {', '.join(_FETCHED)} FROM recipients WHERE campaign_id = %s AND key = %s {lock}",
            (self._id, key),
        ).fetchone()
        return None if found is None else dict(zip(_FETCHED, found, strict=True))

    def _set_state(
        self, db: _Connection, key: str, frm: RowState, to: RowState, *, note: str | None = None
    ) -> None:
        current = RowState(self._fetch(db, key)["state"])
        if current != frm or to not in TRANSITIONS[frm]:
            raise LedgerError(f"{self._where}: cannot move {key!r} from {current} to {to}")
        db.execute(
            "UPDATE recipients SET state = %s, note = COALESCE(%s, note), updated_at = %s "
            "WHERE campaign_id = %s AND key = %s",
            (to.value, note, self._stamp(), self._id, key),
        )

    def _check_move(self, frm: RowState, to: RowState) -> None:
        """The check `_set_state` makes, for a statement that moves a set of rows from `frm` to `to`."""
        if to not in TRANSITIONS[frm]:
            raise LedgerError(f"{self._where}: cannot move rows from {frm} to {to}")

    # The send loop's two writes a message (claim, sent), each one statement for all the rows of a
    # batch when it is the usual case: a round trip costs more than the statement, a savepoint two
    # more, and a database on another machine is a network round trip away. Each cannot fail but with
    # the connection (an UPDATE that finds no row is no error), so it needs no savepoint of its own in
    # a batch; a row it does not find (in flight from before, a lease lost, in another state) goes by
    # the checked path, which decides and says why.

    def _claim_pending(self, requests: Sequence[ClaimRequest], *, now: str) -> dict[str, Claim]:
        """`decide_claim`'s PENDING case for every pending row of `requests` in one statement: key ->
        its claim. Rows another transaction holds are skipped (`claim`); bound to a worker, so are rows
        whose sender's lease is not this worker's."""
        if not requests:
            return {}
        lease = (
            "AND EXISTS (SELECT 1 FROM leases AS l WHERE l.campaign_id = r.campaign_id "
            "AND l.sender = COALESCE(w.sender, r.sender) AND l.owner = %(worker)s "
            "AND l.expires_at > %(at)s)"
            if self._worker is not None
            else ""
        )
        keys = [asked.key for asked in requests]
        found = self._write_rows(
            "UPDATE recipients AS r SET state = 'inflight', idempotency_key = w.stem || r.attempt_no, "
            "key_issued_at = %(now)s, key_uses = 0, claimed_at = %(now)s, "
            "first_claimed_at = COALESCE(r.first_claimed_at, %(now)s), "
            "subject = COALESCE(w.subject, r.subject), sender = COALESCE(w.sender, r.sender), "
            "claimed_via = COALESCE(w.via, r.claimed_via), "
            "updated_at = %(now)s "
            "FROM unnest(%(keys)s::text[], %(stems)s::text[], %(subjects)s::text[], %(senders)s::text[], "
            "%(vias)s::text[]) AS w(key, stem, subject, sender, via) "
            "WHERE r.campaign_id = %(id)s AND r.key = w.key AND r.state = 'pending' "
            f"{lease} AND r.key IN (SELECT key FROM recipients WHERE campaign_id = %(id)s "
            "AND key = ANY(%(keys)s::text[]) FOR UPDATE SKIP LOCKED) "
            "RETURNING r.key, r.idempotency_key, r.attempt_no, r.sender, w.via",
            {
                "keys": keys,
                "stems": [idempotency_key_stem(self._campaign, key) for key in keys],
                "subjects": [asked.subject for asked in requests],
                "senders": [asked.sender for asked in requests],
                "vias": [asked.via for asked in requests],
                "now": now,
                "id": self._id,
                "worker": self._worker,
                "at": self._clock.now().timestamp(),
            },
        )
        return {
            key: ClaimChange(issued, now, 0, owner, via, True, attempt_no).as_claim()
            for key, issued, attempt_no, owner, via in found
        }

    def _record_sent(self, reports: Sequence[OutcomeReport], now: str) -> set[str]:
        """The sent outcomes of the rows of `reports` in flight in one statement (with their send log
        entries): the keys recorded."""
        if not reports:
            return set()
        found = self._write_rows(
            "WITH w AS (SELECT * FROM unnest(%(keys)s::text[], %(messages)s::text[], %(threads)s::text[], "
            "%(headers)s::text[], %(requests)s::text[], %(replayed)s::boolean[], %(senders)s::text[], "
            "%(recipients)s::integer[]) "
            "AS w(key, message, thread, header, request, replayed, sender, recipients)), "
            "sent AS (UPDATE recipients AS r SET state = 'sent', "
            "message_id = COALESCE(w.message, r.message_id), thread_id = COALESCE(w.thread, r.thread_id), "
            "internet_message_id = COALESCE(w.header, r.internet_message_id), "
            "request_id = COALESCE(w.request, r.request_id), "
            "replayed = w.replayed, error_type = NULL, error_status = NULL, error_message = NULL, "
            "attempts = r.attempts + 1, updated_at = %(now)s, sent_at = %(now)s FROM w "
            "WHERE r.campaign_id = %(id)s AND r.key = w.key AND r.state = 'inflight' "
            "RETURNING r.key, w.sender, r.claimed_via, w.recipients), "
            "logged AS (INSERT INTO send_log (campaign_id, sender, via, sent_at, recipients) "
            "SELECT %(id)s, sender, claimed_via, %(at)s, recipients FROM sent) "
            "SELECT key FROM sent",
            {
                "keys": [report.key for report in reports],
                "messages": [report.outcome.message_id for report in reports],
                "threads": [report.outcome.thread_id for report in reports],
                "headers": [report.outcome.internet_message_id for report in reports],
                "requests": [report.outcome.request_id for report in reports],
                "replayed": [report.outcome.replayed for report in reports],
                "senders": [report.sender for report in reports],
                "recipients": [report.recipients for report in reports],
                "now": now,
                "id": self._id,
                "at": self._clock.now().timestamp(),
            },
        )
        return {key for (key,) in found}

    @contextmanager
    def _in_one_transaction(self) -> Iterator[None]:
        """The batch under way, as it is (its parts that may fail take their own savepoints: the send
        loop's batches pay no round trips for one more), else a transaction of its own."""
        with self._lock:
            if self._connection is not None:
                yield
                return
            with self._write():
                yield

    def _write_rows(self, statement: str, params: Mapping[str, object]) -> list[tuple[Any, ...]]:
        """One statement that cannot fail but with the connection, in the transaction under way (no
        savepoint of its own): its rows."""
        with self._lock:
            assert self._connection is not None, "inside _in_one_transaction"
            try:
                return self._connection.execute(statement, params).fetchall()
            except psycopg.Error as exc:
                raise ledger_error(
                    exc, where=self._where, named_by=self._named_by, doing="write the ledger"
                ) from exc

    def _log_send(self, db: _Connection, key: str, sender: str, at: float, recipients: int) -> None:
        # With the mailbox the row was claimed through: the daily budgets count by mailbox.
        db.execute(
            "INSERT INTO send_log (campaign_id, sender, via, sent_at, recipients) "
            "SELECT %s, %s, claimed_via, %s, %s FROM recipients WHERE campaign_id = %s AND key = %s",
            (self._id, sender, at, recipients, self._id, key),
        )

    def _stamp(self) -> str:
        return self._clock.now().isoformat(timespec="milliseconds")

    def _read(self, query: str, params: Sequence[object] | Mapping[str, object]) -> list[tuple[Any, ...]]:
        """A query's rows: on the connection of the write under way (which sees its own changes), else
        on a pooled one."""
        with self._lock:
            try:
                if self._connection is not None:
                    return self._connection.execute(query, params).fetchall()
                with self._pool.connection() as connection:
                    return connection.execute(query, params).fetchall()
            except psycopg.Error as exc:
                raise ledger_error(
                    exc, where=self._where, named_by=self._named_by, doing="read the ledger"
                ) from exc

    @contextmanager
    def _write(self) -> Iterator[_Connection]:
        """One transaction on a pooled connection, held until it ends, under the lock; nested, a
        savepoint inside the outer one (psycopg's nested `transaction()`)."""
        with self._lock:
            if self._connection is not None:
                try:
                    with self._connection.transaction():
                        yield self._connection
                except psycopg.Error as exc:
                    raise ledger_error(
                        exc, where=self._where, named_by=self._named_by, doing="write the ledger"
                    ) from exc
                return
            try:
                with self._pool.connection() as connection:
                    self._connection = connection
                    try:
                        with connection.transaction():
                            yield connection
                    finally:
                        self._connection = None
            except psycopg.Error as exc:
                raise ledger_error(
                    exc, where=self._where, named_by=self._named_by, doing="write the ledger"
                ) from exc
            self.commits += 1


# Each group's size and first row in list order (ties in `status`'s ranking of causes keep that order).
_ERROR_GROUPS = """
    SELECT error_status, error_type, state, total, row, key FROM (
        SELECT error_status, error_type, state, row, key, COUNT(*) OVER cause AS total,
            ROW_NUMBER() OVER (cause ORDER BY row, key) AS place
        FROM recipients WHERE campaign_id = %s AND {rows}
        WINDOW cause AS (PARTITION BY error_status, error_type, state)
    ) AS grouped WHERE place = 1
    ORDER BY error_status NULLS FIRST, error_type NULLS FIRST, state
"""
# Each group's latest row that says something: the last updated, the last in list order among equals.
_LATEST_ERRORS = """
    SELECT error_status, error_type, state, updated_at, row, key, said FROM (
        SELECT error_status, error_type, state, updated_at, row, key, said, ROW_NUMBER() OVER (
            PARTITION BY error_status, error_type, state ORDER BY updated_at DESC, row DESC, key DESC
        ) AS place
        FROM (
            SELECT error_status, error_type, state, updated_at, row, key,
                COALESCE(NULLIF(error_message, ''), NULLIF(note, '')) AS said
            FROM recipients WHERE campaign_id = %s AND {rows}
        ) AS saying WHERE said IS NOT NULL
    ) AS ranked WHERE place = 1
"""
# Step 1's rows at a batch of lower-cased addresses (`a`: the key asked for, the address), as SQLite's
# `_BY_ADDRESS`: through `recipients_address` where the key is not the address (the terms of its WHERE
# spelled as it spells them, so that the planner proves it applies), by the key where it is.
_BY_ADDRESS = """
    WITH a (key, email) AS (SELECT * FROM unnest(%(keys)s::text[], %(emails)s::text[]))
    SELECT a.key, r.{column} FROM a JOIN recipients AS r ON r.campaign_id = %(campaign)s
        AND lower(r.email) = a.email AND r.step = 'message' AND r.key <> lower(r.email)
    WHERE {where}
    UNION ALL
    SELECT a.key, r.{column} FROM a JOIN recipients AS r ON r.campaign_id = %(campaign)s AND r.key = a.email
    WHERE lower(r.email) = a.email AND r.step = 'message' AND {where}
"""
