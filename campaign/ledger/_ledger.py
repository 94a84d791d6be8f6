"""The progress ledger: one SQLite file that says, for every recipient, what happened.

It is the source of truth for "sent exactly once" (ARCHITECTURE.md, "Bird's-eye view"), and the only
code that changes a row's state: every change is checked against `TRANSITIONS`
and anything else raises `LedgerError`. A row is committed as `inflight`, with
its idempotency key, before its request leaves; the outcome is committed after.
Plain synchronous sqlite3: the engine calls it from a worker thread so the event
loop never waits on disk, and may group several writes into one transaction
(`batch`). It never stores the API key. Reading is in `ledger_read.py`, the file
and its migrations in `ledger_schema.py`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from campaign.clock import Clock
from campaign.errors import LedgerError
from campaign.ledger._facts import KeptFacts
from campaign.ledger._read import (
    _MAILED,
    DUPLICATE_REASON,
    INVALID_REASON,
    MAILED_DUPLICATE_REASON,
    JournalEntry,
    LedgerRow,
    PlannedRow,
)
from campaign.ledger._schema import (
    check_ledger_version,
    connect_ledger,
    create_ledger_file,
    lock_ledger,
    migrate_ledger,
    unlock_ledger,
)
from campaign.ledger._values import Claim, ClaimRequest, OutcomeReport, ScheduledStep, SyncReport
from campaign.ledger._write import (
    FAILED,
    IDEMPOTENCY_WINDOW_S,
    INFLIGHT,
    KEY_REUSE_S,
    PENDING,
    SENT,
    SKIPPED,
    TRANSITIONS,
    UNKNOWN,
    LedgerWriter,
    decide_claim,
    or_error,
    record_plan_stamps,
)
from campaign.models import FIRST_STEP, OutcomeKind, RowState, SendOutcome, Skip, SkipReason, step_key

__all__ = [
    "IDEMPOTENCY_WINDOW_S",
    "KEY_REUSE_S",
    "TRANSITIONS",
    "Claim",
    "JournalEntry",
    "LedgerRow",
    "PlannedRow",
    "SqliteLedger",
    "SyncReport",
    "open_ledger",
    "read_ledger_campaign",
]


def open_ledger(
    path: Path,
    *,
    clock: Clock,
    campaign: str,
    exclusive: bool = False,
    create: bool = True,
    read_only: bool = False,
) -> SqliteLedger:
    """Open the ledger at `path` for `campaign`: migrated, or (`read_only`) as it is, never changed.

    `create` makes it when there is none (the CLI: only a run); a missing file otherwise, and an
    empty or schemaless one always, is a LedgerError: never taken for a new campaign.
    `exclusive` takes the writer lock: a second sending command on the same ledger is refused.
    """
    lock = lock_ledger(path) if exclusive else None
    try:
        if create and not path.exists():
            create_ledger_file(path, stamp=clock.now().isoformat())
        connection = connect_ledger(path, read_only=read_only)
        ledger = SqliteLedger(connection, path=path, clock=clock, lock_fd=lock)
        if read_only:
            check_ledger_version(connection, path=path)
        else:
            migrate_ledger(connection, path=path, stamp=ledger._stamp())
            ledger.notes = _journal_notes(connection, path)
        ledger._check_campaign(campaign, record=not read_only)
    except BaseException:
        if lock is not None:
            unlock_ledger(lock)
        raise
    return ledger


def _journal_notes(connection: sqlite3.Connection, path: Path) -> tuple[str, ...]:
    """A note when SQLite could not put the ledger in WAL mode (`connect_ledger` asks for it; a file
    system without the shared memory or locks WAL needs keeps the rollback journal): a reader such as
    `campaign status` then holds the run's commits back, and one held past the busy timeout fails."""
    (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() == "wal":
        return ()
    note = (
        f"ledger {path}: SQLite could not use WAL on this file system (journal mode {str(mode).lower()!r}), "
        "so `campaign status` or `report` run meanwhile holds this run's writes back; keep the ledger on a "
        "local disk"
    )
    return (note,)


def read_ledger_campaign(path: Path) -> str | None:
    """The campaign the ledger at `path` belongs to; None when it is not a readable ledger."""
    try:
        connection = connect_ledger(path, read_only=True)
    except LedgerError:
        return None
    try:
        found = connection.execute("SELECT value FROM meta WHERE key = 'campaign'").fetchone()
    except sqlite3.Error:
        return None
    finally:
        connection.close()
    return None if found is None else str(found[0])


class SqliteLedger(LedgerWriter, KeptFacts):
    """Reads and writes one campaign's ledger; every write is one transaction (or part of a batch)."""

    # --- campaign-wide ------------------------------------------------------

    def _check_campaign(self, campaign: str, *, record: bool = True) -> None:
        stored = self._meta("campaign")
        if stored is None and record:
            self._set_meta("campaign", campaign)
            self._set_meta("created_at", self._stamp())
        elif stored != campaign:
            message = (
                f"{self._path}: this ledger belongs to campaign {stored!r}, not {campaign!r}; "
                "use another manifest file name or restore campaign.name"
            )
            raise LedgerError(message)
        self._campaign = campaign

    # --- the list -----------------------------------------------------------

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
        """Bring the ledger in line with the list: new rows pending, new skips skipped, the rest kept.

        A pending row that the list now skips becomes skipped; a row skipped as
        invalid that now validates, or as a duplicate that the plan now mails (its address fixed, the
        row it repeated gone: the check found no row listing its address, and none mailed to it under
        another key), becomes pending; one that stays skipped as either gives the list's reason of now
        (the row it repeated may have moved or gone). Rows no longer in the list
        are left as they are and marked as not listed, but for a row mailed (sent, in flight or unknown)
        at the address of a listed row skipped as already mailed under its key: the list gave its person a
        new key, so it stays listed, at that row's number (its follow-ups go on; its send in flight is
        resumed, its unknown one is still to reconcile). `stamp`, the plan's stamp, `rules`, the
        stamp of all but the list's rows, and `extent`, the list file's own record, are recorded in
        the same transaction: a stamp never describes rows recorded for another list. With
        `appended`, the plan holds only rows appended to the list the ledger's plan was of: the rows
        already recorded stay listed.

        Both are consumed a batch at a time into temporary tables and compared with the ledger in
        SQL: a plan of a million rows is never held in memory, and rows already so are not written
        again (a million unchanged rows cost reads, not updates). A ledger without rows has nothing
        to compare with: its first plan goes straight into its table (`_record_first_plan`).
        """
        now = self._stamp()
        with self._write() as db, _larger_cache(db):
            if not appended and db.execute("SELECT 1 FROM recipients LIMIT 1").fetchone() is None:
                report = _record_first_plan(db, planned, skips, now)
            else:
                try:
                    report = self._sync_plan(db, planned, skips, now, appended=appended)
                finally:
                    db.execute("DROP TABLE IF EXISTS temp.plan_rows")
                    db.execute("DROP TABLE IF EXISTS temp.plan_skips")
            record_plan_stamps(db, stamp=stamp, rules=rules, extent=extent)
        return report

    def _sync_plan(
        self,
        db: sqlite3.Connection,
        planned: Iterable[PlannedRow],
        skips: Iterable[Skip],
        now: str,
        *,
        appended: bool,
    ) -> SyncReport:
        db.execute(
            "CREATE TEMP TABLE plan_rows (key TEXT NOT NULL UNIQUE, row INTEGER NOT NULL, "
            "email TEXT NOT NULL, sender TEXT NOT NULL, due_at TEXT, cells TEXT)"
        )
        # A duplicate's skip shares its original's key: it concerns the planned row, not a row of its own;
        # of skips sharing a key, the first row's (the original's: say, unsubscribed) is the key's.
        db.execute(
            "CREATE TEMP TABLE plan_skips (key TEXT PRIMARY KEY, row INTEGER NOT NULL, email TEXT NOT NULL, "
            "reason TEXT NOT NULL, cells TEXT)"
        )
        db.executemany(
            "INSERT INTO temp.plan_rows VALUES (?, ?, ?, ?, ?, ?)",
            map(planned_values, planned),
        )
        db.executemany(
            "INSERT OR IGNORE INTO temp.plan_skips VALUES (?, ?, ?, ?, ?)",
            ((s.key, s.row, s.email, _skip_reason(s), s.cells) for s in skips),
        )
        db.execute("DELETE FROM temp.plan_skips WHERE key IN (SELECT key FROM temp.plan_rows)")
        if appended:  # an appended row with the key of a row listed before is that row's duplicate
            db.execute(
                "DELETE FROM temp.plan_skips WHERE EXISTS (SELECT 1 FROM recipients AS r "
                "WHERE r.key = plan_skips.key AND r.listed = 1 AND r.step = ?)",
                (FIRST_STEP,),
            )
        wanted = sum(
            db.execute(
                "SELECT (SELECT count(*) FROM temp.plan_rows) + (SELECT count(*) FROM temp.plan_skips)"
            ).fetchone()
        )
        listed = "(key IN (SELECT key FROM temp.plan_rows) OR key IN (SELECT key FROM temp.plan_skips))"
        if not appended:  # before the new rows go in: only the rows recorded before are looked at
            db.execute(
                f"UPDATE recipients SET listed = 0 WHERE step = ? AND listed = 1 AND NOT {listed}",
                (FIRST_STEP,),
            )
        newly_skipped = self._skip_now_skipped(db)
        restored = db.execute(
            "SELECT p.key, p.sender, p.email, p.due_at, r.reason FROM temp.plan_rows AS p "
            "JOIN recipients AS r ON r.key = p.key WHERE r.state = 'skipped' "
            "AND (substr(r.reason, 1, ?) = ? OR substr(r.reason, 1, ?) = ?)",
            (len(INVALID_REASON), INVALID_REASON, len(DUPLICATE_REASON), DUPLICATE_REASON),
        ).fetchall()
        for key, sender, email, due_at, _reason in restored:
            self._set_state(db, key, SKIPPED, PENDING)
            # As a new row: from the plan's sender, to its address, at its time (step 1's deliver_at).
            db.execute(
                "UPDATE recipients SET reason = NULL, sender = ?, email = ?, due_at = ? WHERE key = ?",
                (sender, email, due_at, key),
            )
        # A pending row goes out from the sender the plan gives it (a sender renamed or removed since, a
        # pinned one changed), to the address the list gives it (corrected since: with key_column the key
        # is the person, and the old address would get the new one's message); a row in flight keeps its
        # own: its key may have been used on that grant, for that address.
        db.execute(
            "UPDATE recipients SET sender = p.sender, email = p.email FROM temp.plan_rows AS p "
            "WHERE recipients.key = p.key AND recipients.state = 'pending' "
            "AND (recipients.sender IS NOT p.sender OR recipients.email != p.email)"
        )
        # A row planned without cells (sent already: they no longer matter) keeps the ones it has.
        db.execute(
            "UPDATE recipients SET row = p.row, cells = COALESCE(p.cells, recipients.cells) "
            "FROM temp.plan_rows AS p WHERE recipients.key = p.key "
            "AND (recipients.row != p.row OR (p.cells IS NOT NULL AND recipients.cells IS NOT p.cells))"
        )
        added = db.execute(
            "INSERT INTO recipients (key, row, email, sender, state, due_at, cells, created_at, updated_at) "
            "SELECT key, row, email, sender, 'pending', due_at, cells, ?, ? FROM temp.plan_rows AS p "
            "WHERE NOT EXISTS (SELECT 1 FROM recipients AS r WHERE r.key = p.key) ORDER BY p.rowid",
            (now, now),
        ).rowcount
        # A row skipped as invalid keeps the cells it was skipped with: met again unchanged, it stays skipped.
        # A skipped row is where the list has it now (a row above it removed moves it up), as a planned one.
        db.execute(
            "UPDATE recipients SET cells = COALESCE(s.cells, recipients.cells), row = s.row "
            "FROM temp.plan_skips AS s WHERE recipients.key = s.key AND recipients.state = 'skipped' "
            "AND ((s.cells IS NOT NULL AND recipients.cells IS NOT s.cells) OR recipients.row != s.row)"
        )
        # A skip the list decides (invalid, a duplicate) gives the list's reason of now: "duplicate of row 1"
        # after that row moved or went would name someone else. The person's own (an opt-out) stands.
        db.execute(
            "UPDATE recipients SET reason = s.reason, updated_at = ? FROM temp.plan_skips AS s "
            "WHERE recipients.key = s.key AND recipients.state = 'skipped' AND recipients.reason != s.reason "
            "AND (substr(recipients.reason, 1, ?) = ? OR substr(recipients.reason, 1, ?) = ?)",
            (now, len(INVALID_REASON), INVALID_REASON, len(DUPLICATE_REASON), DUPLICATE_REASON),
        )
        # A row sent before the ledger kept cells (migration 8 cleared them) and skipped now (say,
        # unsubscribed since) takes the skip's: its follow-ups are rebuilt from them, if only to be skipped.
        db.execute(
            "UPDATE recipients SET cells = s.cells FROM temp.plan_skips AS s WHERE recipients.key = s.key "
            "AND recipients.cells IS NULL AND s.cells IS NOT NULL"
        )
        skipped_added = db.execute(
            "INSERT INTO recipients (key, row, email, state, reason, cells, created_at, updated_at) "
            "SELECT key, row, email, 'skipped', reason, cells, ?, ? FROM temp.plan_skips AS s "
            "WHERE NOT EXISTS (SELECT 1 FROM recipients AS r WHERE r.key = s.key) ORDER BY s.row",
            (now, now),
        ).rowcount
        db.execute(
            f"UPDATE recipients SET listed = 1 WHERE step = ? AND listed = 0 AND {listed}", (FIRST_STEP,)
        )
        _list_mailed_under_old_keys(db)
        missing = {
            RowState(state): int(count)
            for state, count in db.execute(
                "SELECT state, count(*) FROM recipients WHERE step = ? AND listed = 0 GROUP BY state",
                (FIRST_STEP,),
            )
        }
        return SyncReport(
            added=added,
            skipped_added=skipped_added,
            existing=wanted - added - skipped_added,
            missing=sum(missing.values()),
            newly_skipped=newly_skipped,
            restored=sum(1 for *_, reason in restored if reason.startswith(INVALID_REASON)),
            undoubled=sum(1 for *_, reason in restored if reason.startswith(DUPLICATE_REASON)),
            missing_states=missing,
        )

    def _skip_now_skipped(self, db: sqlite3.Connection) -> int:
        """Open rows the list now skips: a pending one is skipped; one in flight becomes unknown (its
        request may have left: only reconcile can say), never sent again."""
        found = db.execute(
            "SELECT s.key, s.reason, r.state FROM temp.plan_skips AS s JOIN recipients AS r ON r.key = s.key "
            "WHERE r.state IN ('pending', 'inflight')"
        ).fetchall()
        for key, reason, state in found:
            if state == PENDING.value:
                self._set_state(db, key, PENDING, SKIPPED)
                db.execute("UPDATE recipients SET reason = ? WHERE key = ?", (reason, key))
            else:
                note = f"now skipped ({reason}); `campaign reconcile` settles its earlier send"
                self._set_state(db, key, INFLIGHT, UNKNOWN, note=note)
        return len(found)

    # --- sending ------------------------------------------------------------

    def claim(
        self, key: str, *, subject: str | None = None, sender: str | None = None, via: str | None = None
    ) -> Claim | None:
        """Mark a row in flight with its idempotency key, before its request leaves.

        A pending row gets a key (new after each definite "not sent") and, if given, the
        sender that now sends it; an in-flight row left by a crash keeps its key and its
        sender, so Nylas (which scopes keys per grant) replays instead of sending twice.
        `via` is the mailbox (grant, or domain) a new key is issued for: see `record_moved_mailboxes`.
        None, and no change, for a row settled meanwhile (`decide_claim`): nothing to send.
        """
        now = self._stamp()
        with self._write() as db:
            change = decide_claim(
                self._fetch(db, key),
                campaign=self._campaign,
                key=key,
                sender=sender,
                via=via,
                now=now,
                where=str(self._path),
            )
            if change is None:
                return None
            db.execute(
                "UPDATE recipients SET state = 'inflight', idempotency_key = ?, key_issued_at = ?, "
                "key_uses = ?, claimed_at = ?, first_claimed_at = COALESCE(first_claimed_at, ?), "
                "subject = COALESCE(?, subject), sender = ?, claimed_via = COALESCE(?, claimed_via), "
                "updated_at = ? WHERE key = ?",
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
                    key,
                ),
            )
        return change.as_claim()

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Claim | LedgerError | None]:
        """`claim` of each, in one transaction; a LedgerError in the list is that claim's alone."""
        with self.batch():
            return [
                or_error(
                    partial(self.claim, asked.key, subject=asked.subject, sender=asked.sender, via=asked.via)
                )
                for asked in requests
            ]

    def record_outcomes(self, reports: Sequence[OutcomeReport]) -> list[RowState | LedgerError]:
        """`record_outcome` of each, in one transaction; a LedgerError in the list is that one's alone."""
        with self.batch():
            return [
                or_error(
                    partial(
                        self.record_outcome,
                        report.key,
                        report.outcome,
                        sender=report.sender,
                        recipients=report.recipients,
                    )
                )
                for report in reports
            ]

    def record_outcome(self, key: str, outcome: SendOutcome, *, sender: str, recipients: int = 1) -> RowState:
        """Record what a send of an in-flight row came to; returns the row's new state.

        Sent and rejected rows are final. A definite "not sent" (throttled, refused
        credentials, no connection to the API) puts the row back to pending with a new
        key for next time, but only if no earlier request can have used the key (or the
        refusal is a replay, i.e. the key's first answer): else the row stays in flight
        with its key. An ambiguous outcome keeps the row in flight with the same key,
        unless it was itself a replay: then retrying teaches nothing new and the row is
        unknown.
        """
        now = self._stamp()
        with self._write() as db:
            current = self._fetch(db, key)
            new_state = _state_after(outcome, key_used=int(current["key_uses"]) > 0)
            if RowState(current["state"]) != INFLIGHT:
                state = current["state"]
                message = (
                    f"{self._path}: cannot record a send outcome for {key!r}: it is {state}, not inflight"
                )
                raise LedgerError(message)
            error = (None, None, None) if new_state == SENT else _error_columns(outcome)
            pending = new_state == PENDING
            db.execute(
                "UPDATE recipients SET state = ?, message_id = COALESCE(?, message_id), "
                "thread_id = COALESCE(?, thread_id), internet_message_id = COALESCE(?, internet_message_id), "
                "request_id = COALESCE(?, request_id), replayed = ?, error_type = ?, error_status = ?, "
                "error_message = ?, attempts = attempts + 1, updated_at = ?, "
                "sent_at = CASE WHEN ? THEN ? ELSE sent_at END, attempt_no = attempt_no + ?, "
                "idempotency_key = CASE WHEN ? THEN NULL ELSE idempotency_key END, "
                "key_issued_at = CASE WHEN ? THEN NULL ELSE key_issued_at END, "
                "key_uses = key_uses + ? WHERE key = ?",
                (
                    new_state.value,
                    outcome.message_id,
                    outcome.thread_id,
                    outcome.internet_message_id,
                    outcome.request_id,
                    int(outcome.replayed),
                    *error,
                    now,
                    new_state == SENT,
                    now,
                    int(pending),
                    pending,
                    pending,
                    int(outcome.kind in (OutcomeKind.AMBIGUOUS, OutcomeKind.IN_PROGRESS)),
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

    def record_moved_mailboxes(self, senders: Mapping[str, str]) -> list[str]:
        """Keep each in-flight row with the mailbox its key was issued for; return the rows given up.

        `senders` maps each mailbox of the manifest (grant, or `domain:…`) to its sender. A row
        whose mailbox now has another sender name follows it; a row whose mailbox no sender has
        any more (its grant_id was changed) becomes unknown: its key means nothing elsewhere, and
        re-sending it through another grant could mail the recipient twice.
        """
        rows = self._read("SELECT key, sender, claimed_via FROM recipients WHERE state = 'inflight'")
        gone: list[str] = []
        with self._write() as db:
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
                    gone.append(str(key))
                elif owner != sender:
                    db.execute("UPDATE recipients SET sender = ? WHERE key = ?", (owner, key))
        return gone

    def record_mailbox_addresses(self, addresses: Iterable[tuple[str, str]]) -> None:
        """Keep that each grant sends as its address ((grant, comparable address) pairs; kept once, never
        removed): a mailbox reconnected under a new grant id keeps the day its old grant's sends began."""
        pairs = sorted(set(addresses))
        if not pairs:
            return
        with self._write() as db:
            db.executemany("INSERT INTO mailboxes (via, address) VALUES (?, ?) ON CONFLICT DO NOTHING", pairs)

    def record_senders(self, senders: Mapping[str, str]) -> int:
        """Give each key's row of step 1 its new sender, if it is still pending; returns how many moved.
        A pending row's next key is a new one (its attempt number): any grant may send it."""
        now = self._stamp()
        with self._write() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE recipients SET sender = ?, updated_at = ? WHERE key = ? AND state = 'pending' "
                "AND step = ?",
                [(sender, now, key, FIRST_STEP) for key, sender in senders.items()],
            )
            return db.total_changes - before

    def record_expired_claims(self, *, older_than_s: float = KEY_REUSE_S) -> int:
        """Turn in-flight rows whose key is older than `older_than_s` into unknown; returns how many."""
        cutoff = self._clock.now().timestamp() - older_than_s
        stale = [
            row.key
            for row in self.rows(states=(INFLIGHT,))
            if row.key_issued_at is None or datetime.fromisoformat(row.key_issued_at).timestamp() < cutoff
        ]
        note = "its idempotency key is older than Nylas's 1 h replay window; `campaign reconcile` settles it"
        with self._write():
            for key in stale:
                self.record_unknown(key, note=note)
        return len(stale)

    # --- follow-up steps ----------------------------------------------------

    def unschedule_steps(self, step: str) -> int:
        """Remove follow-up `step`'s rows that are pending and were never claimed; how many."""
        with self._write() as db:
            return db.execute(
                "DELETE FROM recipients WHERE step = ? AND step != ? AND state = 'pending' "
                "AND key_issued_at IS NULL AND first_claimed_at IS NULL",
                (step, FIRST_STEP),
            ).rowcount

    def unschedule_skipping(self, step: str, *, answering: str, skipped: str) -> int:
        """Remove follow-up `step`'s rows never claimed that answer step `answering`, of recipients whose
        step `skipped` neither failed nor was skipped (`Ledger.unschedule_skipping`); how many."""
        # Through the due index: it holds the follow-up rows alone (and step 1's with a deliver_at).
        with self._write() as db:
            return db.execute(
                """
                DELETE FROM recipients WHERE key IN (
                    SELECT f.key FROM recipients AS f INDEXED BY recipients_due
                        JOIN recipients AS p ON p.key = f.previous
                    WHERE f.due_at IS NOT NULL AND f.step = ? AND f.step != ? AND f.state = 'pending'
                        AND f.key_issued_at IS NULL AND f.first_claimed_at IS NULL AND p.step = ?
                        AND NOT EXISTS (
                            SELECT 1 FROM recipients AS k
                            WHERE k.key = f.recipient || char(31) || ? AND k.state IN ('failed', 'skipped')
                        )
                )
                """,
                (step, FIRST_STEP, answering, skipped),
            ).rowcount

    def record_followups(self, scheduled: Sequence[ScheduledStep]) -> int:
        """Add a pending row for each follow-up scheduled, due at its time; returns how many were new
        (a (recipient, step) that has its row already keeps it)."""
        now = self._stamp()
        with self._write() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO recipients (key, row, email, sender, state, step, recipient, "
                "previous, due_at, created_at, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                [
                    (
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
            return db.total_changes - before

    def record_reply_refused(self, key: str, outcome: SendOutcome, *, reply_to: str | None) -> None:
        """A follow-up's send answered 404: back to pending with a new key next time, answering `reply_to`
        if given (`Ledger.record_reply_refused`)."""
        type_, status, message = _error_columns(outcome)
        with self._write() as db:
            self._set_state(db, key, INFLIGHT, PENDING)
            db.execute(
                "UPDATE recipients SET reply_to = COALESCE(?, reply_to), "
                "request_id = COALESCE(?, request_id), replayed = ?, error_type = ?, error_status = ?, "
                "error_message = ?, attempts = attempts + 1, attempt_no = attempt_no + 1, "
                "idempotency_key = NULL, key_issued_at = NULL WHERE key = ?",
                (reply_to, outcome.request_id, int(outcome.replayed), type_, status, message, key),
            )

    def record_auto_reply(self, key: str, detail: str) -> None:
        """Note an auto-reply seen before a follow-up that goes on regardless (`auto_replies = "ignore"`)."""
        with self._write() as db:
            db.execute("UPDATE recipients SET auto_reply = ? WHERE key = ?", (detail, key))

    # --- settling after the fact -------------------------------------------

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
                "UPDATE recipients SET message_id = ?, sent_at = ?, error_type = NULL, error_status = NULL, "
                "error_message = NULL WHERE key = ?",
                (message_id, when.isoformat(timespec="milliseconds"), key),
            )
            self._log_send(db, key, sender, when.timestamp(), recipients)

    def record_retry(self, key: str, *, note: str) -> None:
        """Send a failed or unknown row again: back to pending, with a new idempotency key next time."""
        with self._write() as db:
            current = self._fetch(db, key)
            state = RowState(current["state"])
            if state not in (FAILED, UNKNOWN):
                message = f"{self._path}: cannot retry {key!r}: it is {state}, not failed or unknown"
                raise LedgerError(message)
            self._set_state(db, key, state, PENDING, note=note)
            db.execute(
                "UPDATE recipients SET attempt_no = attempt_no + 1, idempotency_key = NULL, "
                "key_issued_at = NULL WHERE key = ?",
                (key,),
            )

    def record_retry_all(self, states: Sequence[RowState], *, note: str) -> int:
        """Retry every row in `states` (failed and/or unknown) in one transaction; returns how many."""
        with self._write():
            keys = [row.key for row in self.rows(states=states)]
            for key in keys:
                self.record_retry(key, note=note)
            if keys:
                self.record_event("retry", f"{len(keys)} rows back to pending ({note})")
        return len(keys)

    # --- skipping a pending row (issue 5: an unsubscribe that arrives while the campaign runs) ---

    def record_skipped(self, key: str, reason: SkipReason, detail: str) -> bool:
        """Mark a pending row skipped with `reason`; False (and no change) if the row is not pending."""
        with self._write() as db:
            if RowState(self._fetch(db, key)["state"]) != PENDING:
                return False
            self._set_state(db, key, PENDING, SKIPPED)
            db.execute("UPDATE recipients SET reason = ? WHERE key = ?", (f"{reason.value}: {detail}", key))
        return True


def _state_after(outcome: SendOutcome, *, key_used: bool) -> RowState:
    kind = outcome.kind
    if kind == OutcomeKind.AMBIGUOUS and outcome.replayed:
        return UNKNOWN  # Nylas cached this ambiguous answer: the same key will only replay it
    if outcome.status == 409 and (outcome.error_type or "").endswith("invalid_idempotent_request"):
        return UNKNOWN  # the key was used before with another payload: that one may have gone out
    if key_used and kind in _NOT_SENT_NOW and not outcome.replayed:
        # Refused before Nylas looked the key up (e.g. its own rate limit), or never connected? Then an
        # earlier request with the key may have gone out: keep it; the next answer is a replay either
        # way. A *replayed* refusal is the key's first answer: nothing ever went out with it.
        return INFLIGHT
    return _STATE_AFTER[kind]


# Definitely not sent by this request; the key is still unused unless an earlier request used it.
_NOT_SENT_NOW = (OutcomeKind.THROTTLED, OutcomeKind.AUTH_REFUSED, OutcomeKind.UNREACHABLE)

_STATE_AFTER: dict[OutcomeKind, RowState] = {
    OutcomeKind.SENT: SENT,
    OutcomeKind.REJECTED: FAILED,
    OutcomeKind.THROTTLED: PENDING,
    OutcomeKind.AUTH_REFUSED: PENDING,
    OutcomeKind.UNREACHABLE: PENDING,
    OutcomeKind.IN_PROGRESS: INFLIGHT,
    OutcomeKind.AMBIGUOUS: INFLIGHT,
}


# Pages of the ledger kept in memory while a plan is recorded (KiB). A plan's rows go into the keys'
# index in the list's order, not the keys' own: with SQLite's default 2 MB, much of a million-row
# index is read back and written out again (a first plan of 1M rows took a fifth longer).
_PLAN_CACHE_KIB = 64 * 1024

# A planned row as the table takes it (`planned_values`): key, row, email, sender, due time, cells.
PlannedValues = tuple[str, int, str, str, str | None, str | None]


@contextmanager
def _larger_cache(db: sqlite3.Connection) -> Iterator[None]:
    """The ledger's page cache at `_PLAN_CACHE_KIB` for the block, then as it was."""
    before = db.execute("PRAGMA main.cache_size").fetchone()[0]
    db.execute(f"PRAGMA main.cache_size = -{_PLAN_CACHE_KIB}")
    try:
        yield
    finally:
        db.execute(f"PRAGMA main.cache_size = {int(before)}")


def _record_first_plan(
    db: sqlite3.Connection, planned: Iterable[PlannedRow], skips: Iterable[Skip], now: str
) -> SyncReport:
    """`record_plan` into a ledger with no rows yet: every row is new, so the rows go straight into the
    table, with nothing to compare them with."""
    added = insert_planned(db, map(planned_values, planned), now)
    return SyncReport(added=added, skipped_added=insert_first_skips(db, skips, now), existing=0, missing=0)


def insert_planned(db: sqlite3.Connection, rows: Iterable[PlannedValues], now: str) -> int:
    """A first plan's rows to mail into the table, pending (`now`: when they were recorded); how many."""
    return int(
        db.executemany(
            "INSERT INTO recipients (key, row, email, sender, state, due_at, cells, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
            ((*row, now, now) for row in rows),
        ).rowcount
    )


def insert_first_skips(db: sqlite3.Connection, skips: Iterable[Skip], now: str) -> int:
    """A first plan's skips into the table, after its rows to mail; how many went in. The first skip of
    a key is the key's: a later one, or one sharing a planned row's key (a duplicate's), is ignored, as
    `_sync_plan` ignores it."""
    return int(
        db.executemany(
            "INSERT OR IGNORE INTO recipients (key, row, email, state, reason, cells, created_at, "
            "updated_at) VALUES (?, ?, ?, 'skipped', ?, ?, ?, ?)",
            ((s.key, s.row, s.email, _skip_reason(s), s.cells, now, now) for s in skips),
        ).rowcount
    )


def planned_values(planned: PlannedRow) -> PlannedValues:
    """`planned`'s columns, as the ledger's table takes them."""
    return (planned.key, planned.row, planned.email, planned.sender, due_text(planned.due_at), planned.cells)


def due_text(moment: datetime | None) -> str | None:
    """A due time as the ledger holds it: ISO in UTC, to the millisecond (None: at once)."""
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _list_mailed_under_old_keys(db: sqlite3.Connection) -> None:
    """Mark listed, at the list's row, each row of step 1 the plan left out whose message may have reached
    the address of a listed row skipped as already mailed under another key (`record_plan`), in the
    caller's transaction. Few such rows, if any: the skipped ones are read through the state index, and
    the table once only when some are found."""
    db.execute("CREATE TEMP TABLE mailed_for (email TEXT PRIMARY KEY, row INTEGER NOT NULL)")
    try:
        found = db.execute(
            "INSERT INTO temp.mailed_for SELECT lower(email), min(row) FROM recipients "
            "WHERE state = 'skipped' AND step = ? AND listed = 1 AND substr(reason, 1, ?) = ? "
            "GROUP BY lower(email)",
            (FIRST_STEP, len(MAILED_DUPLICATE_REASON), MAILED_DUPLICATE_REASON),
        ).rowcount
        if found:
            db.execute(
                "UPDATE recipients SET listed = 1, row = m.row FROM temp.mailed_for AS m "
                f"WHERE recipients.step = ? AND recipients.listed = 0 AND recipients.state IN {_MAILED} "
                "AND lower(recipients.email) = m.email",
                (FIRST_STEP,),
            )
    finally:
        db.execute("DROP TABLE temp.mailed_for")


def _skip_reason(skip: Skip) -> str:
    return f"{skip.reason.value}: {skip.detail}"


def _error_columns(outcome: SendOutcome) -> tuple[str | None, int | None, str | None]:
    return outcome.error_type or outcome.kind.value, outcome.status, outcome.error_message
