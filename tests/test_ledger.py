"""The SQLite ledger: every state transition (legal and illegal), keys, columns, migrations, batches, lock."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import UTC, datetime, timedelta

import pytest

from campaign.errors import LedgerError
from campaign.ledger import Ledger, PlannedRow, open_ledger
from campaign.ledger._ledger import KEY_REUSE_S, TRANSITIONS
from campaign.ledger._schema import MIGRATIONS
from campaign.models import OutcomeKind, RowState, SendOutcome, Skip, SkipReason, ThrottleKind
from campaign.testing.clock import FakeClock

SENT = SendOutcome(OutcomeKind.SENT, status=200, message_id="m-1", request_id="r-1")
AMBIGUOUS = SendOutcome(OutcomeKind.AMBIGUOUS, status=503, error_type="api.internal_error", error_message="x")
REJECTED = SendOutcome(OutcomeKind.REJECTED, status=402, error_type="message_rejected", error_message="no")
THROTTLED = SendOutcome(OutcomeKind.THROTTLED, status=429, throttle=ThrottleKind.NYLAS)
P, IN, S, F, U, K = (
    RowState.PENDING,
    RowState.INFLIGHT,
    RowState.SENT,
    RowState.FAILED,
    RowState.UNKNOWN,
    RowState.SKIPPED,
)


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="ledger")
def _ledger(tmp_path, clock) -> Ledger:
    ledger = open_ledger(tmp_path / "c.ledger.sqlite", clock=clock, campaign="spring")
    ledger.record_plan(
        [PlannedRow("ann@x.com", 1, "ann@x.com", "alice"), PlannedRow("bob@x.com", 2, "bob@x.com", "bob")],
        [Skip(3, "eve@x.com", "eve@x.com", SkipReason.SUPPRESSED, "in unsubscribed.txt")],
    )
    return ledger


def _row(ledger: Ledger, key: str = "ann@x.com"):
    return ledger.row(key)


def _put(ledger: Ledger, state: RowState, key: str = "ann@x.com") -> None:
    """Bring a pending row to `state` through legal transitions only."""
    if state == P:
        return
    if state == K:
        ledger.record_skipped(key, SkipReason.UNSUBSCRIBED, "test")
        return
    ledger.claim(key, subject="Hello")
    if state == S:
        ledger.record_outcome(key, SENT, sender="alice")
    elif state == F:
        ledger.record_outcome(key, REJECTED, sender="alice")
    elif state == U:
        ledger.record_unknown(key)


# --- file, schema, campaign -----------------------------------------------------


def test_new_ledger_is_private_and_in_wal_mode(ledger):
    """The file is created 0600 and uses WAL."""
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    with sqlite3.connect(ledger.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrations_are_numbered_and_recorded_once(tmp_path, clock):
    """Opening a ledger twice applies each numbered migration once and records it with its name."""
    path = tmp_path / "l.sqlite"
    open_ledger(path, clock=clock, campaign="c").close()
    open_ledger(path, clock=clock, campaign="c").close()
    with sqlite3.connect(path) as db:
        recorded = db.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert recorded == [(n, name) for n, (name, _) in enumerate(MIGRATIONS, start=1)]


def test_a_version_1_ledger_is_migrated_and_keeps_its_rows(tmp_path, clock):
    """A ledger written before migration 2 gains the new columns; its in-flight row keeps its key's age."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
        db.executescript(MIGRATIONS[0][1])
        db.execute("INSERT INTO schema_migrations VALUES (1, 'v1', 'then')")
        db.execute("INSERT INTO meta VALUES ('campaign', 'c')")
        db.execute(
            "INSERT INTO recipients (key, row, email, sender, state, idempotency_key, claimed_at, "
            "created_at, updated_at) VALUES ('a@x', 1, 'a@x', 's', 'inflight', 'c-k-0', "
            "'2026-01-05T08:30:00.000+00:00', 't', 't')"
        )
    ledger = open_ledger(path, clock=clock, campaign="c")
    row = ledger.row("a@x")
    assert (row.state, row.idempotency_key, row.listed) == (IN, "c-k-0", True)
    assert row.key_issued_at == "2026-01-05T08:30:00.000+00:00"
    assert ledger.claim("a@x").idempotency_key == "c-k-0"


def test_a_ledger_from_a_newer_version_is_refused(tmp_path, clock):
    """A schema version this code does not know is an error naming the file, not a silent downgrade."""
    path = tmp_path / "new.sqlite"
    open_ledger(path, clock=clock, campaign="c").close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (99, 'future', 'later')")
    with pytest.raises(LedgerError, match=r"new\.sqlite.*newer version"):
        open_ledger(path, clock=clock, campaign="c")


def test_ledger_of_another_campaign_is_refused(tmp_path, clock):
    """A ledger written for one campaign name cannot be used by another."""
    path = tmp_path / "l.sqlite"
    open_ledger(path, clock=clock, campaign="one").close()
    with pytest.raises(LedgerError, match="belongs to campaign 'one'"):
        open_ledger(path, clock=clock, campaign="two")


def test_unreadable_ledger_is_a_ledger_error(tmp_path, clock):
    """A file that is not SQLite gives a LedgerError naming it."""
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match=r"bad\.sqlite"):
        open_ledger(path, clock=clock, campaign="c")


def test_the_writer_lock_refuses_a_second_sender_and_is_freed_on_close(tmp_path, clock):
    """Two exclusive opens of one ledger: the second is refused naming the holder; after close it works."""
    path = tmp_path / "l.sqlite"
    first = open_ledger(path, clock=clock, campaign="c", exclusive=True)
    with pytest.raises(LedgerError, match=rf"another campaign command \(pid {os.getpid()}\)"):
        open_ledger(path, clock=clock, campaign="c", exclusive=True)
    reader = open_ledger(path, clock=clock, campaign="c")  # readers (status, report) need no lock
    reader.close()
    first.close()
    open_ledger(path, clock=clock, campaign="c", exclusive=True).close()
    lock = path.with_name(path.name + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


# --- the transition table, method by method ---------------------------------------


def test_the_transition_table_matches_design():
    """The legal transitions are exactly those of ARCHITECTURE.md, "Bird's-eye view" (sent is final)."""
    design = {P: {IN, K}, IN: {IN, S, F, P, U}, U: {S, P}, F: {P}, K: {P}, S: set()}
    assert dict(TRANSITIONS) == design


# (method, starting states where it is legal, the state it leads to)
_MOVES = {
    "claim": ({P, IN}, IN),
    "sent": ({IN}, S),
    "rejected": ({IN}, F),
    "throttled": ({IN}, P),
    "ambiguous": ({IN}, IN),
    "release": ({IN}, P),
    "unknown": ({IN}, U),
    "found_sent": ({U}, S),
    "retry": ({F, U}, P),
}


def _apply(ledger: Ledger, move: str, key: str = "ann@x.com") -> None:
    outcomes = {"sent": SENT, "rejected": REJECTED, "throttled": THROTTLED, "ambiguous": AMBIGUOUS}
    if move == "claim":
        ledger.claim(key)
    elif move in outcomes:
        ledger.record_outcome(key, outcomes[move], sender="alice")
    elif move == "release":
        ledger.release(key)
    elif move == "unknown":
        ledger.record_unknown(key)
    elif move == "found_sent":
        ledger.record_found_sent(key, message_id="m-9", sender="alice", sent_at=None, note="found")
    else:
        ledger.record_retry(key, note="retry")


@pytest.mark.parametrize("start", list(RowState))
@pytest.mark.parametrize("move", list(_MOVES))
def test_every_transition_is_legal_or_raises(ledger, start, move):
    """Each operation from each state makes its documented move or raises LedgerError, changing nothing."""
    _put(ledger, start)
    legal, to = _MOVES[move]
    before = _row(ledger)
    if start in legal:
        _apply(ledger, move)
        assert _row(ledger).state == to
        assert to in TRANSITIONS[start]
    else:
        with pytest.raises(LedgerError, match=r"ann@x\.com"):
            _apply(ledger, move)
        assert _row(ledger) == before


def test_skipping_is_only_for_pending_rows(ledger):
    """record_skipped moves pending to skipped and refuses (False, no change) any other state."""
    assert ledger.record_skipped("ann@x.com", SkipReason.UNSUBSCRIBED, "clicked") is True
    assert _row(ledger).reason == "unsubscribed: clicked"
    _put(ledger, IN, "bob@x.com")
    assert ledger.record_skipped("bob@x.com", SkipReason.UNSUBSCRIBED, "clicked") is False
    assert _row(ledger, "bob@x.com").state == IN


def test_operations_on_a_key_not_in_the_ledger_raise(ledger):
    """Every operation names the missing key."""
    for move in _MOVES:
        with pytest.raises(LedgerError, match=r"nobody@x\.com"):
            _apply(ledger, move, key="nobody@x.com")


# --- keys, columns, outcomes --------------------------------------------------------


def test_claim_then_sent_records_every_column_and_the_send_log(ledger, clock):
    """A claim stamps key, issue time and subject; a 2xx records message and request ids, attempts, time."""
    claim = ledger.claim("ann@x.com", subject="Spring news")
    assert claim.fresh
    assert claim.idempotency_key.startswith("spring-")
    assert "ann" not in claim.idempotency_key
    row = _row(ledger)
    assert (row.state, row.idempotency_key, row.subject) == (IN, claim.idempotency_key, "Spring news")
    assert datetime.fromisoformat(row.key_issued_at) == clock.now()
    assert row.first_claimed_at == row.claimed_at == row.key_issued_at
    clock.advance(2)
    assert ledger.record_outcome("ann@x.com", SENT, sender="alice") == S
    row = _row(ledger)
    assert (row.message_id, row.request_id, row.attempts, row.replayed) == ("m-1", "r-1", 1, False)
    assert datetime.fromisoformat(row.sent_at) == clock.now()
    assert (row.error_type, row.error_status, row.error_message) == (None, None, None)
    assert ledger.sent_recipients_since("alice", clock.now().timestamp() - 10) == [
        (clock.now().timestamp(), 1)
    ]


def test_a_replayed_success_is_recorded_as_a_replay(ledger):
    """Idempotent-Response: true on a 2xx is kept in the row (the message went out once, earlier)."""
    ledger.claim("ann@x.com")
    replay = SendOutcome(OutcomeKind.SENT, status=200, message_id="m-7", replayed=True)
    ledger.record_outcome("ann@x.com", replay, sender="alice")
    assert (_row(ledger).replayed, _row(ledger).message_id) == (True, "m-7")


def test_ambiguous_outcome_keeps_row_inflight_with_same_key_and_the_error(ledger):
    """A timeout or 5xx leaves the row in flight, same key, with type, status and message of the error."""
    first = ledger.claim("ann@x.com")
    assert ledger.record_outcome("ann@x.com", AMBIGUOUS, sender="alice") == IN
    row = _row(ledger)
    assert (row.idempotency_key, row.error_type, row.error_status, row.error_message) == (
        first.idempotency_key,
        "api.internal_error",
        503,
        "x",
    )
    assert ledger.claim("ann@x.com").idempotency_key == first.idempotency_key


def test_a_replayed_ambiguous_answer_makes_the_row_unknown_at_once(ledger):
    """A cached 5xx replayed: the same key can only replay it again, so the row is unknown."""
    ledger.claim("ann@x.com")
    replayed = SendOutcome(OutcomeKind.AMBIGUOUS, status=504, error_type="provider_error", replayed=True)
    assert ledger.record_outcome("ann@x.com", replayed, sender="alice") == U
    assert _row(ledger).replayed is True


def test_a_key_reused_with_another_payload_makes_the_row_unknown(ledger):
    """409 invalid_idempotent_request: an earlier request with that key may have gone out; not 'failed'."""
    ledger.claim("ann@x.com")
    mismatch = SendOutcome(OutcomeKind.REJECTED, status=409, error_type="api.invalid_idempotent_request")
    assert ledger.record_outcome("ann@x.com", mismatch, sender="alice") == U


def test_throttle_returns_row_to_pending_with_a_new_key_next_time(ledger):
    """A 429 is a definite 'not sent': the next claim uses a new idempotency key."""
    first = ledger.claim("ann@x.com")
    assert ledger.record_outcome("ann@x.com", THROTTLED, sender="alice") == P
    second = ledger.claim("ann@x.com")
    assert second.idempotency_key != first.idempotency_key
    assert second.attempt_no == first.attempt_no + 1


def test_a_refusal_on_a_key_an_earlier_request_may_have_used_keeps_that_key(ledger):
    """A fresh 429 after a re-claim (or after an ambiguous answer) keeps the key; a replayed 429 frees it."""
    first = ledger.claim("ann@x.com")
    ledger.claim("ann@x.com")  # resumed after a crash: the first request may have gone out
    assert ledger.record_outcome("ann@x.com", THROTTLED, sender="alice") == IN
    assert ledger.claim("ann@x.com").idempotency_key == first.idempotency_key
    replayed = SendOutcome(OutcomeKind.THROTTLED, status=429, throttle=ThrottleKind.PROVIDER, replayed=True)
    assert ledger.record_outcome("ann@x.com", replayed, sender="alice") == P  # the key's first answer
    assert ledger.claim("ann@x.com").idempotency_key != first.idempotency_key
    ledger.claim("bob@x.com")
    ledger.record_outcome("bob@x.com", AMBIGUOUS, sender="bob")
    refused = SendOutcome(OutcomeKind.AUTH_REFUSED, status=401)
    assert ledger.record_outcome("bob@x.com", refused, sender="bob") == IN
    assert _row(ledger, "bob@x.com").key_uses == 1


def test_release_keeps_the_unused_key(ledger):
    """A claim whose request never left is undone: the next claim gets the same, never used, key."""
    first = ledger.claim("ann@x.com")
    ledger.release("ann@x.com")
    assert ledger.claim("ann@x.com").idempotency_key == first.idempotency_key


def test_reclaiming_an_inflight_row_keeps_its_key_and_its_age(ledger, clock):
    """Resume re-sends an in-flight row with its key; the key's age counts from its first claim."""
    first = ledger.claim("ann@x.com")
    clock.advance(600)
    again = ledger.claim("ann@x.com")
    assert (again.idempotency_key, again.fresh) == (first.idempotency_key, False)
    assert again.usable_until == first.usable_until
    assert again.usable_until == clock.now() - timedelta(seconds=600) + timedelta(seconds=KEY_REUSE_S)


def test_expired_claims_become_unknown_even_if_reclaimed_recently(ledger, clock):
    """The 1 h window runs from the key's first claim: re-claiming at 50 min does not extend it."""
    ledger.claim("ann@x.com")
    clock.advance(3000)
    ledger.claim("ann@x.com")  # a resume that crashed again
    ledger.claim("bob@x.com")
    clock.advance(600)
    assert ledger.record_expired_claims() == 1
    assert (_row(ledger).state, _row(ledger, "bob@x.com").state) == (U, IN)
    assert "replay window" in (_row(ledger).note or "")


def test_reconcile_found_it_marks_sent_with_the_message_and_logs_the_send(ledger, clock):
    """unknown -> sent with the message id and the time the API gave; it counts in the rolling budget."""
    _put(ledger, U)
    when = clock.now() - timedelta(minutes=3)
    ledger.record_found_sent(
        "ann@x.com", message_id="m-5", sender="alice", sent_at=when, note="found by metadata"
    )
    row = _row(ledger)
    assert (row.state, row.message_id, row.note) == (S, "m-5", "found by metadata")
    assert datetime.fromisoformat(row.sent_at) == when
    assert ledger.sent_recipients_since("alice", when.timestamp() - 1) == [(when.timestamp(), 1)]


def test_retry_gives_failed_and_unknown_rows_a_new_key(ledger):
    """retry: failed/unknown -> pending, attempt counter +1 so the next claim's key is new."""
    first = ledger.claim("ann@x.com")
    ledger.record_outcome("ann@x.com", REJECTED, sender="alice")
    _put(ledger, U, "bob@x.com")
    assert ledger.record_retry_all([F, U], note="campaign retry --failed --unknown") == 2
    assert ledger.counts()[P] == 2
    assert ledger.claim("ann@x.com").idempotency_key != first.idempotency_key
    assert _row(ledger, "bob@x.com").note == "campaign retry --failed --unknown"
    assert ledger.journal()[-1].kind == "retry"


def test_timestamps_come_from_the_clock(ledger, clock):
    """Rows are stamped with the injected clock's time."""
    ledger.claim("ann@x.com")
    assert datetime.fromisoformat(_row(ledger).claimed_at) == clock.now().astimezone(UTC)


# --- the list -------------------------------------------------------------------------


def test_record_plan_adds_pending_and_skipped_and_keeps_existing(ledger):
    """New rows are pending, skips are skipped with their reason, and a second sync adds nothing; a
    pending row goes out from the sender the plan now gives it (its old one renamed, say), while a row in
    flight keeps its own (its key may have been used on that grant)."""
    assert (ledger.counts()[P], ledger.counts()[K]) == (2, 1)
    assert _row(ledger, "eve@x.com").reason == "suppressed: in unsubscribed.txt"
    ledger.claim("bob@x.com", sender="alice")
    planned = [
        PlannedRow("ann@x.com", 1, "ann@x.com", "carol"),
        PlannedRow("bob@x.com", 2, "bob@x.com", "carol"),
    ]
    report = ledger.record_plan(planned, [])
    assert (report.added, report.existing, report.missing) == (0, 2, 1)
    assert ledger.assigned_senders()["ann@x.com"] == "carol"
    assert ledger.assigned_senders()["bob@x.com"] == "alice"


def test_a_duplicates_skip_does_not_skip_its_original(tmp_path, clock):
    """The duplicate of a planned row shares its key: the planned row stays pending."""
    ledger = open_ledger(tmp_path / "l.sqlite", clock=clock, campaign="c")
    planned = [PlannedRow("a@x", 1, "a@x", "s")]
    dup = [Skip(2, "a@x", "A@x", SkipReason.DUPLICATE, "duplicate of row 1")]
    ledger.record_plan(planned, dup)
    ledger.record_plan(planned, dup)
    assert ledger.row("a@x").state == P


def test_rows_removed_from_the_list_are_left_alone_and_reported(ledger):
    """A key no longer in the list keeps its state, is marked not listed and counted by state."""
    _put(ledger, S, "bob@x.com")
    report = ledger.record_plan([PlannedRow("new@x.com", 4, "new@x.com", "alice")], [])
    assert report.missing == 3
    assert report.missing_states == {P: 1, S: 1, K: 1}
    assert (_row(ledger, "bob@x.com").state, _row(ledger, "bob@x.com").listed) == (S, False)
    assert ledger.counts(listed=True)[P] == 1
    assert ledger.counts()[P] == 2
    ledger.record_plan([PlannedRow("ann@x.com", 1, "ann@x.com", "alice")], [])
    assert _row(ledger).listed is True


def test_a_pending_row_now_suppressed_becomes_skipped_and_an_inflight_one_unknown(ledger):
    """Suppressed since the last run: pending -> skipped; in flight (maybe sent) -> unknown, never re-sent."""
    _put(ledger, IN, "bob@x.com")
    skips = [
        Skip(1, "ann@x.com", "ann@x.com", SkipReason.SUPPRESSED, "in list"),
        Skip(2, "bob@x.com", "bob@x.com", SkipReason.SUPPRESSED, "in list"),
    ]
    report = ledger.record_plan([], skips)
    assert report.newly_skipped == 2
    assert (_row(ledger).state, _row(ledger).reason) == (K, "suppressed: in list")
    assert _row(ledger, "bob@x.com").state == U


def test_an_invalid_row_that_now_validates_is_pending_again_but_a_suppressed_one_is_not(tmp_path, clock):
    """Only a row skipped as invalid comes back when it validates; suppressed rows stay skipped."""
    ledger = open_ledger(tmp_path / "l.sqlite", clock=clock, campaign="c")
    ledger.record_plan(
        [],
        [
            Skip(1, "a@x", "a@x", SkipReason.INVALID, "undefined variable"),
            Skip(2, "b@x", "b@x", SkipReason.SUPPRESSED, "in list"),
        ],
    )
    report = ledger.record_plan([PlannedRow("a@x", 1, "a@x", "s"), PlannedRow("b@x", 2, "b@x", "s")], [])
    assert report.restored == 1
    assert (ledger.row("a@x").state, ledger.row("a@x").sender, ledger.row("a@x").reason) == (P, "s", None)
    assert ledger.row("b@x").state == K


# --- batches ----------------------------------------------------------------------------


def test_a_batch_is_one_commit_and_a_failed_write_undoes_only_itself(ledger):
    """Writes in a batch share a transaction; an illegal one inside it is undone alone."""
    before = ledger.commits
    with ledger.batch():
        ledger.claim("ann@x.com")
        with pytest.raises(LedgerError):
            ledger.record_outcome("bob@x.com", SENT, sender="bob")  # bob is pending: illegal
        ledger.claim("bob@x.com")
    assert ledger.commits == before + 1
    assert (_row(ledger).state, _row(ledger, "bob@x.com").state) == (IN, IN)


def test_a_batch_that_dies_leaves_nothing_behind(ledger):
    """A crash inside a batch (any exception escaping it) rolls the whole transaction back."""

    class Crash(BaseException):
        pass

    def die_in_a_batch() -> None:
        with ledger.batch():
            ledger.claim("ann@x.com")
            raise Crash

    with pytest.raises(Crash):
        die_in_a_batch()
    assert _row(ledger).state == P
    ledger.claim("ann@x.com")  # and the ledger is still usable
    assert _row(ledger).state == IN


def test_other_connections_see_a_claim_as_soon_as_it_returns(ledger):
    """A claim is committed when claim() returns: another process reading the file sees it in flight."""
    claim = ledger.claim("ann@x.com")
    with sqlite3.connect(ledger.path) as other:
        state, key = other.execute(
            "SELECT state, idempotency_key FROM recipients WHERE key = 'ann@x.com'"
        ).fetchone()
    assert (state, key) == ("inflight", claim.idempotency_key)


def test_counts_by_sender_and_sample_emails(ledger):
    """Per-sender counts cover every state; sample_emails gives a few addresses per state."""
    _put(ledger, S)
    by_sender = ledger.counts_by_sender()
    assert (by_sender["alice"][S], by_sender["bob"][P]) == (1, 1)
    assert ledger.sample_emails([P, S]) == {P: ["bob@x.com"], S: ["ann@x.com"]}


def test_send_log_window(ledger, clock):
    """Only sends after the given time are returned."""
    _put(ledger, S)
    later = clock.now() + timedelta(hours=25)
    assert ledger.sent_recipients_since("alice", (later - timedelta(hours=24)).timestamp()) == []
