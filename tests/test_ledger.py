"""The ledger: every state transition (legal and illegal), keys, columns, the plan and batches, on both
backends (SQLite and PostgreSQL: the `ledgers` fixture); SQLite's file, migrations and lock.

PostgreSQL's own matters (its connection, migrations, campaigns side by side, lock) are in
test_ledger_postgres.py.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign.errors import LedgerError
from campaign.ledger import ClaimRequest, Ledger, OutcomeReport, PlannedRow, ScheduledStep, open_ledger
from campaign.ledger._ledger import KEY_REUSE_S, TRANSITIONS
from campaign.ledger._schema import MIGRATIONS
from campaign.manifest import RecipientsSettings
from campaign.models import OutcomeKind, RowState, SendOutcome, Skip, SkipReason, ThrottleKind
from campaign.pipeline import record_rows_given_away
from campaign.recipients import encode_cells
from campaign.testing.clock import FakeClock

SENT = SendOutcome(OutcomeKind.SENT, status=200, message_id="m-1", request_id="r-1")
AMBIGUOUS = SendOutcome(OutcomeKind.AMBIGUOUS, status=503, error_type="api.internal_error", error_message="x")
REJECTED = SendOutcome(OutcomeKind.REJECTED, status=402, error_type="message_rejected", error_message="no")
THROTTLED = SendOutcome(OutcomeKind.THROTTLED, status=429, throttle=ThrottleKind.NYLAS)
_CAMPAIGNS = itertools.count()
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
def _ledger(ledgers, clock) -> Ledger:
    ledger = ledgers.open("spring", clock=clock)
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


def test_new_ledger_is_private_and_in_wal_mode(tmp_path, clock):
    """The file is created 0600 and uses WAL."""
    path = tmp_path / "c.ledger.sqlite"
    open_ledger(path, clock=clock, campaign="spring").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_ledger_syncs_each_commit_so_a_claim_outlives_a_power_cut(tmp_path, clock):
    """The writing connection syncs every commit (FULL; 2): NORMAL in WAL mode syncs at checkpoints only,
    and a power cut could take back claims whose requests had left."""
    ledger = open_ledger(tmp_path / "c.ledger.sqlite", clock=clock, campaign="spring")
    try:
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        ledger.close()


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
    """Each operation from each state makes its documented move or raises LedgerError, changing nothing;
    a claim of a settled row (another worker's, or a command's beside the run) finds nothing to send."""
    _put(ledger, start)
    legal, to = _MOVES[move]
    before = _row(ledger)
    if start in legal:
        _apply(ledger, move)
        assert _row(ledger).state == to
        assert to in TRANSITIONS[start]
    elif move == "claim":
        assert ledger.claim("ann@x.com", sender="bob") is None
        assert _row(ledger) == before
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


def test_no_connection_to_the_api_is_not_sent_and_frees_the_key_unless_an_earlier_request_used_it(ledger):
    """A request that never connected used nothing: pending, a new key next time, nothing counted as a use
    of the key. After an ambiguous answer the key may be used: the row keeps it, in flight."""
    unreachable = SendOutcome(
        OutcomeKind.UNREACHABLE, error_type="network", error_message="could not connect; nothing was sent"
    )
    first = ledger.claim("ann@x.com")
    assert ledger.record_outcome("ann@x.com", unreachable, sender="alice") == P
    row = _row(ledger)
    assert (row.key_uses, row.attempts, row.error_type) == (0, 1, "network")
    assert ledger.claim("ann@x.com").idempotency_key != first.idempotency_key
    maybe_used = ledger.claim("bob@x.com")
    ledger.record_outcome("bob@x.com", AMBIGUOUS, sender="bob")
    assert ledger.record_outcome("bob@x.com", unreachable, sender="bob") == IN
    assert _row(ledger, "bob@x.com").key_uses == 1
    assert ledger.claim("bob@x.com").idempotency_key == maybe_used.idempotency_key


def test_the_rows_sent_to_some_addresses_are_found_without_case(ledger, clock):
    """Sent rows only (not ones merely claimed), each with its time and message id."""
    ledger.claim("ann@x.com")
    ledger.record_outcome("ann@x.com", SENT, sender="alice")
    ledger.claim("bob@x.com")  # in flight: not sent
    (found,) = ledger.sent_messages_to(["ANN@x.com", "bob@x.com", "nobody@x.com"])
    assert (found.key, found.email, found.message_id) == ("ann@x.com", "ann@x.com", "m-1")
    assert found.sent_at == clock.now()
    assert ledger.sent_messages_to([]) == []


def test_rows_of_step_1_are_found_by_address_whatever_their_key(ledgers, clock):
    """A key column's campaign: `listed_addresses` finds the first listed row at each address, and
    `mailed_keys` another key whose row was mailed there (sent, in flight, unknown; not pending or
    failed), without case, whether or not a row's key is its address; a follow-up's row is not step 1's."""

    ledger = ledgers.open("keyed", clock=clock)
    plan = [
        PlannedRow("1", 1, "Ann@x.com", "alice"),
        PlannedRow("2", 2, "bob@x.com", "alice"),
        PlannedRow("carl@x.com", 3, "Carl@x.com", "alice"),  # a key column that holds addresses
        PlannedRow("4", 4, "dora@x.com", "alice"),
        PlannedRow("5", 5, "eve@x.com", "alice"),
        PlannedRow("7", 7, "ann@X.com", "alice"),
    ]
    ledger.record_plan(plan, [Skip(6, "6", "fay@x.com", SkipReason.DUPLICATE, "duplicate of row 9")])
    for key in ("1", "carl@x.com", "4", "5"):
        ledger.claim(key)
    ledger.record_outcome("1", SENT, sender="alice")
    ledger.record_unknown("4")
    ledger.record_outcome("5", REJECTED, sender="alice")
    wanted = ["ann@x.com", "bob@x.com", "carl@x.com", "fay@x.com", "nobody@x.com"]
    assert ledger.listed_addresses(wanted) == {
        "ann@x.com": 1,
        "bob@x.com": 2,
        "carl@x.com": 3,
        "fay@x.com": 6,
    }
    asked = [("a", "ann@x.com"), ("1", "ann@x.com"), ("b", "bob@x.com"), ("c", "carl@x.com")]
    asked += [("d", "dora@x.com"), ("e", "eve@x.com"), ("n", "nobody@x.com")]
    assert ledger.mailed_keys(asked) == {"a": "1", "c": "carl@x.com", "d": "4"}
    assert ledger.mailed_keys([]) == ledger.listed_addresses([]) == {}
    keys = ["1", "2", "carl@x.com", "4", "5", "none"]
    assert ledger.mailed_addresses(keys) == {"1": "Ann@x.com", "4": "dora@x.com"}  # sent, or unknown
    # Ann's follow-up, sent: a row of its own with her address, which is not another key of hers.
    nudge = ScheduledStep("1", "nudge", 1, "Ann@x.com", "alice", "1", clock.now())
    assert ledger.record_followups([nudge]) == 1
    (due,) = ledger.due_steps_of("alice", P, clock.now())
    ledger.claim(due.key)
    ledger.record_outcome(due.key, SENT, sender="alice")
    assert ledger.mailed_keys([("1", "ann@x.com")]) == {}
    # Key 1 left the list: still mailed, no longer listed (row 7 is the first listed at Ann's address).
    ledger.record_plan(plan[1:], [])
    assert ledger.listed_addresses(["ann@x.com"]) == {"ann@x.com": 7}
    assert ledger.mailed_keys([("7", "ann@x.com")]) == {"7": "1"}


def test_a_sent_messages_message_id_header_is_kept_for_the_follow_up_that_answers_it(ledgers, clock):
    """The Message-ID header a send's answer gave (an IMAP grant's follow-up names the message by it) is
    kept by the batch write and the one-row write alike, and read back with the follow-up due: None for
    a message whose answer gave none."""
    ledger = ledgers.open("headers", clock=clock)
    ledger.record_plan(
        [PlannedRow(key, n, key, "alice") for n, key in enumerate(("a@x", "b@x", "c@x"), 1)], []
    )
    for key in ("a@x", "b@x", "c@x"):
        ledger.claim(key)
    with_header = replace(SENT, internet_message_id="<a.1@yahoo.example>")
    ledger.record_outcomes([OutcomeReport("a@x", with_header, "alice"), OutcomeReport("c@x", SENT, "alice")])
    ledger.record_outcome("b@x", replace(SENT, internet_message_id="<b.1@yahoo.example>"), sender="alice")
    steps = [
        ScheduledStep(key, "nudge", n, key, "alice", key, clock.now())
        for n, key in enumerate(("a@x", "b@x", "c@x"), 1)
    ]
    assert ledger.record_followups(steps) == 3
    due = {
        step.recipient: step.previous_internet_message_id
        for step in ledger.due_steps_of("alice", P, clock.now())
    }
    assert due == {"a@x": "<a.1@yahoo.example>", "b@x": "<b.1@yahoo.example>", "c@x": None}


def test_a_follow_up_answered_404_goes_back_with_a_new_key_answering_the_message_found(ledgers, clock):
    """`record_reply_refused`: the in-flight follow-up is pending again, its next claim has a new key (the
    old one replays the 404), the 404 is its last error, and with `reply_to` the step it answers is read
    back with that id (a resume sends the same bytes); the previous row keeps its own message id. Without
    one, the row can then be stopped as `thread_lost`."""

    ledger = ledgers.open("relink", clock=clock)
    ledger.record_plan([PlannedRow("ann@x.com", 1, "ann@x.com", "alice")], [])
    ledger.claim("ann@x.com")
    ledger.record_outcome("ann@x.com", SENT, sender="alice")
    nudge = ScheduledStep("ann@x.com", "nudge", 1, "ann@x.com", "alice", "ann@x.com", clock.now())
    assert ledger.record_followups([nudge]) == 1
    (due,) = ledger.due_steps_of("alice", P, clock.now())
    assert due.previous_message_id == "m-1"
    first = ledger.claim(due.key)
    assert first is not None
    gone = SendOutcome(
        OutcomeKind.REJECTED,
        status=404,
        error_type="not_found_error",
        error_message="requested object not found",
    )
    ledger.record_reply_refused(due.key, gone, reply_to="m-1-filed")
    row = ledger.row(due.key)
    assert (row.state, row.error_status, row.error_type) == (P, 404, "not_found_error")
    (again,) = ledger.due_steps_of("alice", P, clock.now())
    assert again.previous_message_id == "m-1-filed"
    assert ledger.row("ann@x.com").message_id == "m-1"
    second = ledger.claim(due.key)
    assert second is not None
    assert second.idempotency_key != first.idempotency_key
    ledger.record_reply_refused(due.key, gone, reply_to=None)  # the id found before stays
    (still,) = ledger.due_steps_of("alice", P, clock.now())
    assert still.previous_message_id == "m-1-filed"
    assert ledger.record_skipped(due.key, SkipReason.THREAD_LOST, "message m-1-filed is gone")
    assert ledger.step_counts(["nudge"], clock.now())[0].stopped == {"thread_lost": 1}


def test_a_ledger_read_before_a_run_added_the_address_index_finds_the_same_rows(sqlite_ledgers, clock):
    """A read-only open (a preview) of a ledger that lacks `recipients_address` (an index migration,
    after READABLE_FROM) looks addresses up all the same, one pass over the table a batch."""
    ledger = sqlite_ledgers.open("keyed", clock=clock)
    ledger.record_plan(
        [PlannedRow("1", 1, "Ann@x.com", "alice"), PlannedRow("b@x.com", 2, "b@x.com", "a")], []
    )
    ledger.claim("b@x.com")
    ledger.record_outcome("b@x.com", SENT, sender="alice")
    ledger.close()
    with sqlite3.connect(sqlite_ledgers.path("keyed")) as db:
        db.execute("DROP INDEX recipients_address")
    reading = sqlite_ledgers.open("keyed", clock=clock, read_only=True)
    assert reading.listed_addresses(["ann@x.com", "b@x.com", "c@x.com"]) == {"ann@x.com": 1, "b@x.com": 2}
    assert reading.mailed_keys([("2", "b@x.com"), ("b@x.com", "b@x.com"), ("3", "ann@x.com")]) == {
        "2": "b@x.com"
    }


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


def test_a_stopped_senders_movable_rows_go_to_the_others_through_the_ledger(ledgers, clock):
    """`record_rows_given_away`: a stopped grant's pending rows go to the senders that may still send, in
    turn; a row pinned to it by the list's sender column stays, and so does a row in flight (its key may
    have been used on that grant) or already sent."""
    ledger = ledgers.open("given", clock=clock)
    cells = {n: encode_cells({"email": f"r{n}@x.com", "sender": "alice" if n == 2 else ""}) for n in range(6)}
    ledger.record_plan(
        [PlannedRow(f"r{n}@x.com", n, f"r{n}@x.com", "alice", cells=cells[n]) for n in range(6)], []
    )
    ledger.claim("r0@x.com", sender="alice")  # in flight
    ledger.claim("r1@x.com", sender="alice")
    ledger.record_outcome("r1@x.com", SENT, sender="alice")  # sent
    settings = RecipientsSettings(source=Path("list.csv"), sender_column="sender")
    moved = record_rows_given_away(ledger, settings, "alice", ["bob", "carol"], page=2)
    assert moved == 3
    senders = ledger.assigned_senders()
    assert [senders[f"r{n}@x.com"] for n in range(6)] == ["alice", "alice", "alice", "bob", "carol", "bob"]
    assert ledger.record_senders({"r0@x.com": "bob", "r1@x.com": "bob"}) == 0  # in flight, sent: kept


def test_a_pending_rows_address_follows_the_list_and_one_in_flight_keeps_its_own(ledgers, clock):
    """key_column: the key is the person. A row not claimed yet goes to the address the list gives it now
    (corrected since); a row in flight keeps the one its key was issued for, as it keeps its sender."""
    ledger = ledgers.open("moved", clock=clock)
    ledger.record_plan([PlannedRow(f"k{n}", n, f"old{n}@x.com", "alice") for n in range(2)], [])
    ledger.claim("k1", sender="alice")
    ledger.record_plan([PlannedRow(f"k{n}", n, f"new{n}@x.com", "alice") for n in range(2)], [])
    assert [ledger.row(f"k{n}").email for n in range(2)] == ["new0@x.com", "old1@x.com"]


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


def test_a_duplicates_skip_does_not_skip_its_original(ledgers, clock):
    """The duplicate of a planned row shares its key: the planned row stays pending."""
    ledger = ledgers.open("c", clock=clock)
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


def test_a_row_mailed_under_a_key_the_list_gave_out_afresh_stays_listed_at_the_new_row(ledgers, clock):
    """Keys 1 (in flight: a crash) and 2 (sent) come back as 11 and 12 at their addresses, each skipped as
    already mailed under its old key: the old rows stay listed, at the new rows' numbers, so a run resumes
    key 1's send with its key; key 3, never sent, at an address no new row has, is not listed. A plan
    without those skips (the new keys gone) leaves the old rows unlisted."""
    ledger = ledgers.open("renumbered", clock=clock)
    ledger.record_plan([PlannedRow(k, n, f"{k}@x", "s") for n, k in enumerate(["1", "2", "3"], start=1)], [])
    ledger.claim("1")
    _put(ledger, S, "2")
    skips = [
        Skip(4, "11", "1@X", SkipReason.DUPLICATE, 'already mailed as key "1"'),
        Skip(5, "12", "2@x", SkipReason.DUPLICATE, 'already mailed as key "2"'),
    ]
    report = ledger.record_plan([PlannedRow("4", 1, "4@x", "s")], skips)
    assert (report.missing, report.missing_states) == (1, {P: 1})
    listed = sorted((row.row, row.key) for row in ledger.rows(listed=True))
    assert listed == [(1, "4"), (4, "1"), (4, "11"), (5, "12"), (5, "2")]
    assert [row.key for row in ledger.open_rows_of("s", IN)] == ["1"]
    assert [row.key for row in ledger.open_rows_of("s", P)] == ["4"]
    ledger.record_plan([PlannedRow("4", 1, "4@x", "s")], [])
    assert {row.key for row in ledger.rows(listed=True)} == {"4"}


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


def test_an_invalid_row_that_now_validates_is_pending_again_but_a_suppressed_one_is_not(ledgers, clock):
    """Only a row skipped as invalid comes back when it validates; suppressed rows stay skipped."""
    ledger = ledgers.open("c", clock=clock)
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


def test_a_duplicate_the_plan_now_mails_is_pending_again_at_its_new_address(ledgers, clock):
    """A row skipped as a duplicate is the list's to decide again (`duplicate_skips` names it; no other
    skip): planned now, it is pending from the plan's sender at the plan's address, counted apart from
    the invalid rows restored."""
    ledger = ledgers.open("c", clock=clock)
    dup = "duplicate of row 1 (same address, other key)"
    ledger.record_plan(
        [PlannedRow("1", 1, "ann@x", "s")],
        [
            Skip(2, "2", "ann@x", SkipReason.DUPLICATE, dup),
            Skip(3, "3", "bob@x", SkipReason.SUPPRESSED, "in list"),
            Skip(4, "4", "dan@x", SkipReason.INVALID, "undefined variable"),
        ],
    )
    assert ledger.duplicate_skips(["1", "2", "3", "4", "5"]) == {"2"}
    assert ledger.duplicate_skips([]) == set()
    later = clock.now() + timedelta(hours=3)  # step 1's deliver_at: a restored row waits for it too
    planned = [PlannedRow(key, int(key), f"{key}@x", "t", due_at=later) for key in ("1", "2", "3", "4")]
    report = ledger.record_plan(planned, [])
    assert (report.restored, report.undoubled) == (1, 1)
    restored = ledger.row("2")
    assert (restored.state, restored.sender, restored.email, restored.reason) == (P, "t", "2@x", None)
    assert ledger.row("3").state == K
    assert ledger.duplicate_skips(["2"]) == set()
    # Row 1 was planned due at once, and a plan does not move a pending row's time.
    assert [row.key for row in ledger.open_rows_of("t", P, clock.now() + timedelta(hours=2))] == ["1"]
    assert [row.key for row in ledger.open_rows_of("t", P, later)] == ["1", "2", "4"]


def test_a_row_skipped_as_invalid_keeps_the_cells_it_was_skipped_with(ledgers, clock):
    """`invalid_cells` gives them back for rows skipped as invalid only; a plan that skips the row
    again with other cells records those; a pending row the plan now skips as invalid takes its cells."""
    ledger = ledgers.open("c", clock=clock)
    ledger.record_plan(
        [PlannedRow("c@x", 3, "c@x", "s", cells='["c"]')],
        [
            Skip(1, "row:1", "", SkipReason.INVALID, "bad address", '["a"]'),
            Skip(2, "b@x", "b@x", SkipReason.SUPPRESSED, "in list"),
        ],
    )
    keys = ["row:1", "b@x", "c@x", "nobody"]
    assert ledger.invalid_cells(keys) == {"row:1": '["a"]'}
    ledger.record_plan(
        [],
        [
            Skip(1, "row:1", "", SkipReason.INVALID, "bad address", '["a2"]'),
            Skip(2, "b@x", "b@x", SkipReason.SUPPRESSED, "in list"),
            Skip(3, "c@x", "c@x", SkipReason.INVALID, "undefined variable", '["c2"]'),
        ],
    )
    assert ledger.invalid_cells(keys) == {"row:1": '["a2"]', "c@x": '["c2"]'}
    assert ledger.row("c@x").state == K
    assert ledger.invalid_cells([]) == {}


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


def test_many_claims_and_outcomes_are_one_commit_and_each_gets_its_own_result(ledger):
    """claim_many and record_outcomes (the send loop's writes of a batch, one statement each on
    PostgreSQL): one transaction, each write its own result, a failed one its own LedgerError, the
    others standing; the results as the one-row methods would give them."""
    before = ledger.commits
    claims = ledger.claim_many(
        [
            ClaimRequest("ann@x.com", "Hi", "alice", "grant:a"),
            ClaimRequest("eve@x.com"),
            ClaimRequest("no@x.com"),
        ]
    )
    assert ledger.commits == before + 1
    ann, eve, nobody = claims
    assert ann.fresh
    assert ann.sender == "alice"
    assert ann.idempotency_key == ledger.row("ann@x.com").idempotency_key
    assert eve is None  # skipped by the plan: nothing to send
    assert isinstance(nobody, LedgerError)
    assert "no@x.com" in str(nobody)
    assert (_row(ledger).state, _row(ledger).subject, _row(ledger, "eve@x.com").state) == (IN, "Hi", K)
    (again,) = ledger.claim_many([ClaimRequest("ann@x.com", sender="bob")])  # in flight: its key, its sender
    assert (again.idempotency_key, again.fresh, again.sender) == (ann.idempotency_key, False, "alice")
    ledger.claim("bob@x.com", sender="bob")
    states = ledger.record_outcomes(
        [
            OutcomeReport("ann@x.com", SENT, "alice", 2),
            OutcomeReport("bob@x.com", REJECTED, "bob"),
            OutcomeReport("eve@x.com", SENT, "alice"),
        ]
    )
    assert states[:2] == [S, F]
    assert isinstance(states[2], LedgerError)
    assert "eve@x.com" in str(states[2])
    assert ledger.commits == before + 4  # and the two claims between
    assert (_row(ledger).message_id, _row(ledger).attempts, _row(ledger, "bob@x.com").error_status) == (
        "m-1",
        1,
        402,
    )
    assert ledger.sent_recipients_total("alice", 0.0) == 2  # the send log: ann's two recipients
    assert ledger.sent_recipients_total("bob", 0.0) == 0


def test_other_connections_see_a_claim_as_soon_as_it_returns(ledgers, ledger):
    """A claim is committed when claim() returns: another process reading the ledger sees it in flight."""
    claim = ledger.claim("ann@x.com")
    assert ledgers.rows_elsewhere("spring", "key", "ann@x.com") == [("inflight", claim.idempotency_key)]


def test_counts_by_sender_and_sample_emails(ledger):
    """Per-sender counts cover every state; sample_emails gives a few addresses per state."""
    _put(ledger, S)
    by_sender = ledger.counts_per_sender()
    assert (by_sender["alice"][S], by_sender["bob"][P], by_sender[None][K]) == (1, 1, 1)
    assert ledger.sample_emails([P, S]) == {P: ["bob@x.com"], S: ["ann@x.com"]}


def test_send_log_window(ledger, clock):
    """Only sends after the given time are returned."""
    _put(ledger, S)
    later = clock.now() + timedelta(hours=25)
    assert ledger.sent_recipients_since("alice", (later - timedelta(hours=24)).timestamp()) == []


# --- the plan, recorded whole --------------------------------------------------------------------


def test_a_plan_that_fails_while_read_records_nothing(ledger):
    """The plan is consumed as it is recorded; an error half way (the spool unreadable, say) leaves the
    ledger as it was, and so does a plan with a key twice."""

    def planned_then_broken():
        yield PlannedRow("new@x.com", 4, "new@x.com", "alice")
        raise OSError("the spool is gone")

    before = list(ledger.rows())
    with pytest.raises(OSError, match="spool"):
        ledger.record_plan(planned_then_broken(), [], stamp="s-1")
    twice = [PlannedRow("new@x.com", 4, "new@x.com", "alice"), PlannedRow("new@x.com", 5, "new@x.com", "bob")]
    with pytest.raises(LedgerError, match="cannot write the ledger"):
        ledger.record_plan(twice, [], stamp="s-2")
    assert list(ledger.rows()) == before
    assert ledger.plan_stamp() is None
    ledger.record_plan([PlannedRow("new@x.com", 4, "new@x.com", "alice")], [], stamp="s-3")  # still usable
    assert (ledger.row("new@x.com").state, ledger.plan_stamp()) == (P, "s-3")


_KEYS = st.sampled_from(["a@x", "b@x", "c@x", "d@x", "e@x", "f@x"])
_PLANS = st.tuples(
    st.lists(_KEYS, unique=True, max_size=4),  # the planned rows' keys (a plan has each once)
    st.lists(st.tuples(_KEYS, st.sampled_from(list(SkipReason))), max_size=6),  # skips may repeat keys
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=_PLANS)
def test_a_first_plan_records_what_a_plan_into_a_ledger_with_rows_records(sqlite_ledgers, clock, plan):
    """A ledger without rows takes its first plan straight into its table; the rows and the report are
    those of the comparing path (a ledger holding one other row), duplicates' and repeated skips too."""
    keys, skipped = plan
    planned = [
        PlannedRow(key, row, key.upper(), f"s{row % 2}", cells=f'["{row}"]')
        for row, key in enumerate(keys, 1)
    ]
    skips = [
        Skip(row, key, key, reason, f"why {row}") for row, (key, reason) in enumerate(skipped, len(keys) + 1)
    ]
    name = f"c{next(_CAMPAIGNS)}"
    first = sqlite_ledgers.open(f"{name}-first", clock=clock)
    other = sqlite_ledgers.open(f"{name}-other", clock=clock)
    other.record_plan([PlannedRow("other@x", 99, "other@x", "s0")], [])
    first_report = first.record_plan(iter(planned), iter(skips))
    other_report = other.record_plan(iter(planned), iter(skips))
    assert (first_report.added, first_report.skipped_added, first_report.existing) == (
        other_report.added,
        other_report.skipped_added,
        other_report.existing,
    )
    assert (first_report.missing, other_report.missing) == (0, 1)
    assert list(first.rows()) == [row for row in other.rows() if row.key != "other@x"]
    assert [first.key_cells([key]) for key in keys] == [other.key_cells([key]) for key in keys]


def test_a_first_plan_with_a_key_twice_records_nothing(sqlite_ledgers, clock):
    """The first plan's own path refuses a key planned twice, as the comparing path does."""
    ledger = sqlite_ledgers.open(clock=clock)
    twice = [PlannedRow("new@x.com", 4, "new@x.com", "alice"), PlannedRow("new@x.com", 5, "new@x.com", "bob")]
    with pytest.raises(LedgerError, match="cannot write the ledger"):
        ledger.record_plan(twice, [], stamp="s-1")
    assert (list(ledger.rows()), ledger.plan_stamp()) == ([], None)


def test_an_appended_plan_keeps_the_rows_before_it_listed(ledger):
    """`appended`: the plan holds only the rows added to the list; the rows recorded before stay listed,
    and a new row whose key an earlier row has is that row's duplicate, not a skip of its own."""
    report = ledger.record_plan(
        [PlannedRow("new@x.com", 4, "new@x.com", "bob")],
        [Skip(5, "ann@x.com", "ANN@x.com", SkipReason.DUPLICATE, "duplicate of row 1")],
        appended=True,
    )
    assert (report.added, report.skipped_added, report.existing, report.missing) == (1, 0, 0, 0)
    assert ledger.counts(listed=True) == {P: 3, IN: 0, S: 0, F: 0, U: 0, K: 1}
    assert ledger.row("ann@x.com").state == P


def test_kept_facts_are_read_back_as_recorded(ledger, clock):
    """Plan, rules and list stamps (with the plan), content fingerprints per step (a change journaled),
    the key scheme and the senders' parks (None clears one)."""
    assert (ledger.plan_stamp(), ledger.rules_stamp(), ledger.list_extent()) == (None, None, None)
    ledger.record_plan([], [], stamp="plan-1", rules="rules-1", extent='{"rows": 3}')
    assert (ledger.plan_stamp(), ledger.rules_stamp(), ledger.list_extent()) == (
        "plan-1",
        "rules-1",
        '{"rows": 3}',
    )
    ledger.record_content_fingerprint("fp-1")
    ledger.record_content_fingerprint("fp-2", changed_from="fp-1")
    ledger.record_content_fingerprint("nudge-1", step="nudge")
    assert (ledger.content_fingerprint(), ledger.content_fingerprint("nudge")) == ("fp-2", "nudge-1")
    assert [(entry.kind, entry.detail) for entry in ledger.journal()] == [
        ("content_changed", "content fingerprint fp-1 -> fp-2 (--allow-changed-content)")
    ]
    assert ledger.key_scheme() is None
    ledger.record_key_scheme("column:id")
    assert ledger.key_scheme() == "column:id"
    until = clock.now() + timedelta(hours=2)
    ledger.record_parks({"alice": until, "bob": until})
    ledger.record_parks({"bob": None})
    assert ledger.parked_senders() == {"alice": until}


# --- reading a sender's work, and rows by key ---------------------------------------------------


def test_a_senders_open_rows_come_a_page_at_a_time_in_list_order(ledgers, clock):
    """open_rows_of pages a sender's listed rows in the order the plan listed them: pending ones due at
    `now` (any, without it), or those in flight, each with its cells; open_counts counts the same."""
    ledger = ledgers.open("pages", clock=clock)
    later = clock.now() + timedelta(hours=1)
    planned = [PlannedRow(f"r{n}@x", n, f"r{n}@x", "alice", cells=f'["r{n}"]') for n in (5, 2, 9, 7, 1)]
    planned[2] = PlannedRow("r9@x", 9, "r9@x", "alice", due_at=later)
    ledger.record_plan([*planned, PlannedRow("b@x", 3, "b@x", "bob")], [])
    ledger.claim("r2@x")
    first = ledger.open_rows_of("alice", P, clock.now(), limit=2)
    assert [(row.key, row.inflight, row.cells) for row in first] == [
        ("r5@x", False, '["r5"]'),
        ("r7@x", False, '["r7"]'),
    ]
    rest = ledger.open_rows_of("alice", P, clock.now(), after=first[-1].cursor, limit=2)
    assert [row.key for row in rest] == ["r1@x"]
    assert ledger.open_rows_of("alice", P, clock.now(), after=rest[-1].cursor) == []
    assert [row.key for row in ledger.open_rows_of("alice", P)] == ["r5@x", "r9@x", "r7@x", "r1@x"]
    assert [(row.key, row.row, row.inflight) for row in ledger.open_rows_of("alice", IN, clock.now())] == [
        ("r2@x", 2, True)
    ]
    assert ledger.open_counts(clock.now()) == {"alice": 4, "bob": 1}
    assert ledger.open_counts() == {"alice": 5, "bob": 1}
    ledger.record_plan(planned[:2], [])  # the others leave the list: no longer anybody's work
    assert [row.key for row in ledger.open_rows_of("alice", P)] == ["r5@x"]


def test_rows_are_looked_up_by_a_batch_of_keys(ledger):
    """listed_rows, key_cells, key_states, assigned_senders and sent_message_ids take any number of keys
    (unknown ones, or none, give nothing)."""
    ledger.record_plan(
        [
            PlannedRow("ann@x.com", 1, "ann@x.com", "alice", cells='["ann"]'),
            PlannedRow("bob@x.com", 2, "bob@x.com", "bob"),
        ],
        [Skip(3, "eve@x.com", "eve@x.com", SkipReason.SUPPRESSED, "in unsubscribed.txt")],
    )
    _put(ledger, S)
    keys = ["ann@x.com", "eve@x.com", "nobody@x.com"]
    assert ledger.listed_rows(keys) == {"ann@x.com": 1, "eve@x.com": 3}
    assert ledger.key_cells(keys) == {"ann@x.com": '["ann"]'}
    assert ledger.key_states([S, K], keys) == {"ann@x.com": "sent", "eve@x.com": "skipped"}
    assert ledger.key_states([P]) == {"bob@x.com": "pending"}
    assert ledger.assigned_senders(keys) == {"ann@x.com": "alice"}
    assert ledger.assigned_senders() == {"ann@x.com": "alice", "bob@x.com": "bob"}
    assert ledger.assigned_counts() == {"alice": 1, "bob": 1}
    assert ledger.sent_message_ids(["m-1", "m-2"]) == {"m-1"}
    for empty in (ledger.listed_rows([]), ledger.key_cells([]), ledger.key_states([S], [])):
        assert empty == {}
    assert ledger.sent_message_ids([]) == set()


def test_claim_times_and_the_first_started_row(ledger, clock):
    """first_claim, latest_claim and started_row: None before any claim, then the claims' times."""
    assert (ledger.first_claim(), ledger.latest_claim(IN), ledger.started_row()) == (None, None, None)
    ledger.claim("ann@x.com")
    clock.advance(60)
    ledger.claim("bob@x.com")
    ledger.record_unknown("bob@x.com")
    assert ledger.first_claim() == clock.now() - timedelta(seconds=60)
    assert ledger.latest_claim(U) == clock.now()
    assert ledger.latest_claim(S) is None
    assert ledger.started_row() in {("ann@x.com", "ann@x.com"), ("bob@x.com", "bob@x.com")}


def test_rows_and_samples_by_state_and_list_membership(ledger):
    """rows() in list order, by state and membership; sample_emails of those still listed."""
    ledger.record_plan([PlannedRow("bob@x.com", 2, "bob@x.com", "bob")], [])  # ann and eve leave the list
    assert [row.key for row in ledger.rows()] == ["ann@x.com", "bob@x.com", "eve@x.com"]
    assert [row.key for row in ledger.rows(states=[P], listed=False)] == ["ann@x.com"]
    assert [row.key for row in ledger.rows(states=[P, K])] == ["ann@x.com", "bob@x.com", "eve@x.com"]
    assert ledger.sample_emails([P, K], listed=True) == {P: ["bob@x.com"], K: []}
    assert ledger.counts(step="message") == ledger.counts()
    assert sum(ledger.counts(step="nudge").values()) == 0


def test_errors_are_grouped_with_their_first_and_latest_rows_and_skips_by_cause(ledgers, clock):
    """error_groups: per status, type and state, the first row in list order and the latest that says
    something; skip_causes: the reason up to its colon."""
    ledger = ledgers.open("errors", clock=clock)
    ledger.record_plan(
        [PlannedRow(f"r{n}@x", n + 1, f"r{n}@x", "alice") for n in range(4)],
        [
            Skip(20, "s1@x", "s1@x", SkipReason.SUPPRESSED, "in a.txt"),
            Skip(21, "s2@x", "s2@x", SkipReason.INVALID, "email: not an address"),
        ],
    )
    for n in range(3):
        ledger.claim(f"r{n}@x")
        clock.advance(1)
        ledger.record_outcome(f"r{n}@x", REJECTED, sender="alice")
    ledger.claim("r3@x")
    ledger.record_unknown("r3@x", note="gave up")
    groups = {(group.status, group.error_type, group.state): group for group in ledger.error_groups()}
    rejected = groups[(402, "message_rejected", F)]
    assert (rejected.count, rejected.first) == (3, (1, "r0@x"))
    assert rejected.latest == (ledger.row("r2@x").updated_at, 3, "r2@x", "no")
    assert groups[(None, None, U)].latest == (ledger.row("r3@x").updated_at, 4, "r3@x", "gave up")
    assert ledger.skip_causes() == {"suppressed": 1, "invalid": 1}


def test_open_rows_whose_last_try_failed_are_grouped_apart_from_the_rows_not_sent(ledgers, clock):
    """error_groups(waiting=True): pending and in-flight rows that carry their last try's error (a 429, no
    connection, an ambiguous answer being retried), not the rows never tried, failed or sent since."""
    ledger = ledgers.open("waiting", clock=clock)
    ledger.record_plan([PlannedRow(f"r{n}@x", n + 1, f"r{n}@x", "alice") for n in range(6)], [])
    down = SendOutcome(OutcomeKind.UNREACHABLE, error_type="network", error_message="could not connect")
    for key, outcome in (("r0@x", THROTTLED), ("r1@x", down), ("r2@x", AMBIGUOUS), ("r3@x", REJECTED)):
        ledger.claim(key)
        clock.advance(1)
        ledger.record_outcome(key, outcome, sender="alice")
    ledger.claim("r4@x")
    ledger.record_outcome("r4@x", THROTTLED, sender="alice")
    ledger.claim("r4@x")
    ledger.record_outcome("r4@x", SENT, sender="alice")  # sent since: no longer waiting
    assert [ledger.row(f"r{n}@x").state for n in range(6)] == [P, P, IN, F, S, P]
    waiting = {
        (group.status, group.error_type, group.state): group for group in ledger.error_groups(waiting=True)
    }
    assert set(waiting) == {(429, "throttled", P), (None, "network", P), (503, "api.internal_error", IN)}
    assert waiting[(None, "network", P)].latest == (
        ledger.row("r1@x").updated_at,
        2,
        "r1@x",
        "could not connect",
    )
    assert [(group.status, group.state) for group in ledger.error_groups()] == [(402, F)]


# --- follow-up steps ------------------------------------------------------------------------------


def test_follow_ups_are_scheduled_once_and_come_due_in_order(ledger, clock):
    """The steps after step 1: scheduled for each recipient sent to (once), due at their time, read back
    with the step they answer, and counted per step."""
    from campaign.models import step_key

    sent_at = clock.now()
    for key in ("ann@x.com", "bob@x.com"):
        ledger.claim(key, subject=f"Hello {key}")
        ledger.record_outcome(key, SENT, sender="alice")
    unscheduled = ledger.unscheduled_steps("message", "nudge")
    assert [(step.key, step.recipient, step.row, step.sender) for step in unscheduled] == [
        ("ann@x.com", "ann@x.com", 1, "alice"),
        ("bob@x.com", "bob@x.com", 2, "bob"),
    ]
    assert unscheduled[0].sent_at == sent_at
    assert ledger.unscheduled_steps("message", "nudge", after=unscheduled[0].cursor) == unscheduled[1:]
    day = timedelta(days=1)
    scheduled = [
        ScheduledStep(step.recipient, "nudge", step.row, step.email, step.sender, step.key, sent_at + n * day)
        for n, step in enumerate(unscheduled, start=1)
    ]
    assert ledger.record_followups(scheduled) == 2
    assert ledger.record_followups(scheduled) == 0  # a (recipient, step) keeps its row
    assert ledger.unscheduled_steps("message", "nudge") == []
    assert ledger.next_due(clock.now()) == sent_at + day
    assert (ledger.due_senders(clock.now()), ledger.due_senders(sent_at + 2 * day)) == ([], ["alice", "bob"])
    clock.advance(day.total_seconds())
    (due,) = ledger.due_steps_of("alice", P, clock.now())
    assert due.key == step_key("ann@x.com", "nudge")
    assert (due.recipient, due.step, due.row, due.inflight, due.listed) == (
        "ann@x.com",
        "nudge",
        1,
        False,
        True,
    )
    assert (due.previous_step, due.previous_subject, due.previous_message_id) == (
        "message",
        "Hello ann@x.com",
        "m-1",
    )
    assert (due.previous_sent_at, due.first_sent_at) == (sent_at, sent_at)
    ledger.claim(due.key)
    assert [step.key for step in ledger.due_steps_of("alice", IN, clock.now())] == [due.key]
    ledger.record_auto_reply(due.key, "out of office")
    message, nudge = ledger.step_counts(["message", "nudge"], clock.now())
    assert (message.states[S], message.due_now, message.scheduled, message.stopped) == (
        2,
        0,
        0,
        {"suppressed": 1},
    )
    assert (nudge.states[P], nudge.states[IN], nudge.due_now, nudge.scheduled) == (1, 1, 0, 1)
    assert (nudge.next_due, nudge.auto_replied) == (sent_at + 2 * day, 1)
    assert ledger.step_counts(["later"], clock.now())[0].states == dict.fromkeys(RowState, 0)


def test_a_row_in_flight_follows_its_mailbox_or_is_given_up(ledger):
    """record_moved_mailboxes: a row keeps the mailbox its key was issued for; a renamed sender takes it
    over, and a mailbox no sender has any more makes it unknown."""
    ledger.claim("ann@x.com", sender="alice", via="grant-1")
    ledger.claim("bob@x.com", sender="bob", via="grant-2")
    assert ledger.record_moved_mailboxes({"grant-1": "carol"}) == ["bob@x.com"]
    assert (_row(ledger).state, _row(ledger).sender) == (IN, "carol")
    assert _row(ledger, "bob@x.com").state == U
    assert "claimed through grant-2" in (_row(ledger, "bob@x.com").note or "")


def test_the_daily_budget_counts_a_mailbox_under_any_sender_name(ledgers, clock):
    """A send is logged with the mailbox it was claimed through: a sender renamed, or another sender
    naming the same grant, counts the same rolling day. On PostgreSQL that is across the database's
    campaigns too (a mailbox's limit is the mailbox's); in a SQLite file, across its senders."""
    spring = ledgers.open("spring", clock=clock)
    spring.record_plan(
        [PlannedRow("ann@x.com", 1, "ann@x.com", "alice"), PlannedRow("bob@x.com", 2, "bob@x.com", "bob")], []
    )
    spring.claim("ann@x.com", subject="Hi", sender="alice", via="grant-1")
    spring.record_outcome("ann@x.com", SENT, sender="alice")
    spring.claim("bob@x.com", subject="Hi", sender="bob", via="grant-2")
    spring.record_outcome("bob@x.com", SENT, sender="bob")
    since = clock.now().timestamp() - 60
    assert len(spring.sent_recipients_since("maya", since, via="grant-1")) == 1  # alice, renamed maya
    assert len(spring.sent_recipients_since("maya", since)) == 0  # by name alone: nothing
    if ledgers.backend == "postgres":
        autumn = ledgers.open("autumn", clock=clock)
        autumn.record_plan([PlannedRow("cat@x.com", 1, "cat@x.com", "carl")], [])
        assert len(autumn.sent_recipients_since("carl", since, via="grant-1")) == 1  # spring's send
        assert len(autumn.sent_recipients_since("carl", since, via="grant-3")) == 0


def test_the_daily_budget_counts_every_grant_recorded_with_the_mailboxs_address(ledgers, clock):
    """The same mailbox reconnected through Nylas has a new grant id: the sends of every grant recorded as
    sending as its address count its day, the current grant's too; another address's do not. On
    PostgreSQL the grants' addresses are the database's, as their sends are: another campaign counts
    them as well."""
    spring = ledgers.open("spring", clock=clock)
    spring.record_plan([PlannedRow(f"r{i}@x.com", i, f"r{i}@x.com", "alice") for i in range(4)], [])
    spring.record_mailbox_addresses([("grant-1", "maya@example.com"), ("grant-9", "sam@example.com")])
    spring.record_mailbox_addresses([("grant-1", "maya@example.com")])  # each run records its senders
    for i, via in enumerate(("grant-1", "grant-1", "grant-2", "grant-9")):
        spring.claim(f"r{i}@x.com", subject="Hi", sender="alice", via=via)
        spring.record_outcome(f"r{i}@x.com", SENT, sender="alice")
    since = clock.now().timestamp() - 60
    # grant-2 not recorded yet (its first run is under way): its own sends and grant-1's.
    assert spring.sent_recipients_total("alice", since, via="grant-2", address="maya@example.com") == 3
    assert len(spring.sent_recipients_since("alice", since, via="grant-2", address="maya@example.com")) == 3
    assert spring.sent_recipients_total("alice", since, via="grant-2") == 1  # by grant alone
    # A different mailbox (its grant and address changed) starts its own day.
    assert spring.sent_recipients_total("alice", since, via="grant-3", address="tom@example.com") == 0
    spring.record_mailbox_addresses([("grant-2", "maya@example.com")])
    assert spring.sent_recipients_total("alice", since, via="grant-1", address="maya@example.com") == 3
    assert spring.sent_recipients_total("alice", since, via="grant-9", address="sam@example.com") == 1
    # The rolling day still applies to every grant's sends: a day and a second later, none count.
    a_day_later = clock.now() + timedelta(days=1, seconds=1)
    day_before = (a_day_later - timedelta(days=1)).timestamp()
    assert spring.sent_recipients_total("alice", day_before, via="grant-2", address="maya@example.com") == 0
    if ledgers.backend == "postgres":
        autumn = ledgers.open("autumn", clock=clock)
        autumn.record_plan([PlannedRow("cat@x.com", 1, "cat@x.com", "carl")], [])
        assert autumn.sent_recipients_total("carl", since, via="grant-5", address="maya@example.com") == 3
        assert (
            len(autumn.sent_recipients_since("carl", since, via="grant-5", address="maya@example.com")) == 3
        )
        assert autumn.sent_recipients_total("carl", since, via="grant-5", address="tom@example.com") == 0


def test_a_ledger_read_before_a_run_recorded_addresses_counts_by_grant(sqlite_ledgers, clock):
    """status on a ledger that predates the grants' addresses (read-only: no migration) counts the
    current grant's sends, as before, instead of failing."""
    ledger = sqlite_ledgers.open("old", clock=clock)
    ledger.record_plan([PlannedRow("ann@x.com", 1, "ann@x.com", "alice")], [])
    ledger.claim("ann@x.com", subject="Hi", sender="alice", via="grant-1")
    ledger.record_outcome("ann@x.com", SENT, sender="alice")
    ledger.close()
    with sqlite3.connect(sqlite_ledgers.path("old")) as db:
        db.execute("DROP TABLE mailboxes")
        db.execute("DELETE FROM schema_migrations WHERE version = ?", (len(MIGRATIONS),))
    reading = sqlite_ledgers.open("old", clock=clock, read_only=True)
    since = clock.now().timestamp() - 60
    assert reading.sent_recipients_total("alice", since, via="grant-1", address="maya@example.com") == 1
    assert reading.sent_recipients_total("alice", since, via="grant-2", address="maya@example.com") == 0
    reading.close()
    writing = sqlite_ledgers.open("old", clock=clock)  # a run migrates it again: the table is back
    writing.record_mailbox_addresses([("grant-1", "maya@example.com")])
    assert writing.sent_recipients_total("alice", since, via="grant-2", address="maya@example.com") == 1


def test_the_next_due_follow_up_is_of_a_recipient_still_listed(ledger, clock):
    """A recipient removed from the list gets no further step: its scheduled follow-up is nothing to wait
    for (a --wait run idled until its time, then said nothing was left)."""

    sent_at = clock.now()
    for key in ("ann@x.com", "bob@x.com"):
        ledger.claim(key, subject="Hello")
        ledger.record_outcome(key, SENT, sender="alice")
    day = timedelta(days=1)
    scheduled = [
        ScheduledStep(step.recipient, "nudge", step.row, step.email, step.sender, step.key, sent_at + n * day)
        for n, step in enumerate(ledger.unscheduled_steps("message", "nudge"), start=1)
    ]
    assert ledger.record_followups(scheduled) == 2
    assert ledger.next_due(clock.now()) == sent_at + day
    ledger.record_plan([PlannedRow("bob@x.com", 1, "bob@x.com", "bob")], [])  # ann left the list
    assert ledger.next_due(clock.now()) == sent_at + 2 * day
    ledger.record_plan([], [])  # and bob
    assert ledger.next_due(clock.now()) is None


def test_a_skipped_row_is_renumbered_as_the_list_moves_like_a_planned_one(ledger):
    """A row above removed from the list: the planned rows and the skipped ones below it move up alike,
    so that `report` names each by its row in the list as it is now."""
    ledger.record_plan(
        [PlannedRow("bob@x.com", 1, "bob@x.com", "bob")],
        [Skip(2, "eve@x.com", "eve@x.com", SkipReason.SUPPRESSED, "in unsubscribed.txt")],
    )
    assert (ledger.row("bob@x.com").row, ledger.row("eve@x.com").row) == (1, 2)
    assert ledger.row("eve@x.com").state == RowState.SKIPPED


def test_unscheduling_a_step_removes_only_its_rows_never_claimed(ledger, clock):
    """A follow-up's timing changed: its pending rows never claimed go (to be scheduled again by the new
    timing); one claimed before keeps its row (its key may have been used), and other steps are untouched."""
    from campaign.models import step_key

    for key in ("ann@x.com", "bob@x.com"):
        ledger.claim(key, subject="Hello")
        ledger.record_outcome(key, SENT, sender="alice")
    due = clock.now() + timedelta(days=1)
    steps = ledger.unscheduled_steps("message", "nudge")
    ledger.record_followups(
        [ScheduledStep(s.recipient, "nudge", s.row, s.email, s.sender, s.key, due) for s in steps]
    )
    assert ledger.timing_stamp("nudge") is None
    ledger.record_timing_stamp('{"after": "1d"}', "nudge")
    assert ledger.timing_stamp("nudge") == '{"after": "1d"}'
    clock.advance(86_400)
    ledger.claim(step_key("bob@x.com", "nudge"), subject="Re: Hello")
    ledger.release(step_key("bob@x.com", "nudge"))  # claimed once: stays
    assert ledger.unschedule_steps("nudge") == 1
    assert ledger.unschedule_steps("message") == 0
    assert [s.recipient for s in ledger.unscheduled_steps("message", "nudge")] == ["ann@x.com"]
    assert ledger.row(step_key("bob@x.com", "nudge")).state == RowState.PENDING


def test_a_step_inserted_before_a_later_one_is_scheduled_only_for_whom_it_comes_first(ledger, clock):
    """Steps [message, nudge] became [message, extra, nudge]. `extra` is scheduled for a recipient who
    has no row of a step after it (`later`): never for one who got the nudge, or has it scheduled."""
    from campaign.models import step_key

    for key in ("ann@x.com", "bob@x.com"):
        _put(ledger, S, key)
    nudge = [
        ScheduledStep(key, "nudge", 1, key, "alice", key, clock.now()) for key in ("bob@x.com", "ann@x.com")
    ]
    ledger.record_followups(nudge[:1])
    _put(ledger, S, step_key("bob@x.com", "nudge"))
    assert [s.recipient for s in ledger.unscheduled_steps("message", "extra")] == ["ann@x.com", "bob@x.com"]
    unscheduled = ledger.unscheduled_steps("message", "extra", later=["nudge"])
    assert [s.recipient for s in unscheduled] == ["ann@x.com"]
    ledger.record_followups(nudge[1:])
    assert ledger.unscheduled_steps("message", "extra", later=["last", "nudge"]) == []


def test_a_step_scheduled_past_an_inserted_one_is_unscheduled_unless_that_one_stopped(ledger, clock):
    """`unschedule_skipping`: the nudge rows answering step 1 (scheduled before `extra` was inserted
    between them) go when never claimed, to be made again after `extra`; a nudge claimed once stays, and
    so does one whose recipient's `extra` was skipped or failed (nothing would follow it)."""
    from campaign.models import step_key

    people = [f"r{n}@x" for n in range(5)]
    ledger.record_plan([PlannedRow(key, n, key, "alice") for n, key in enumerate(people, start=1)], [])
    for key in people:
        _put(ledger, S, key)
    due = clock.now() + timedelta(days=1)
    ledger.record_followups([ScheduledStep(key, "nudge", 1, key, "alice", key, due) for key in people])
    ledger.claim(step_key("r1@x", "nudge"), subject="Re: Hello")
    ledger.release(step_key("r1@x", "nudge"))  # claimed once: its key may have been used
    ledger.record_followups(
        [ScheduledStep(key, "extra", 1, key, "alice", key, due) for key in ("r2@x", "r3@x", "r4@x")]
    )
    ledger.record_skipped(step_key("r2@x", "extra"), SkipReason.REPLIED, "test")
    _put(ledger, F, step_key("r3@x", "extra"))
    assert ledger.unschedule_skipping("nudge", answering="extra", skipped="last") == 0  # answers message
    assert ledger.unschedule_skipping("nudge", answering="message", skipped="extra") == 2
    assert [key for key in people if _exists(ledger, step_key(key, "nudge"))] == ["r1@x", "r2@x", "r3@x"]
    assert ledger.unschedule_skipping("nudge", answering="message", skipped="extra") == 0
    assert [s.recipient for s in ledger.unscheduled_steps("message", "extra", later=["nudge"])] == ["r0@x"]


def _exists(ledger: Ledger, key: str) -> bool:
    try:
        ledger.row(key)
    except LedgerError:
        return False
    return True


def test_the_step_order_is_kept(ledger):
    """The steps' order as follow-ups were last scheduled (None before), so that an inserted step is
    noticed once."""
    assert ledger.step_order() is None
    ledger.record_step_order(["message", "extra", "nudge"])
    assert ledger.step_order() == ("message", "extra", "nudge")


def test_a_removed_row_whose_try_failed_is_not_waiting(ledger):
    """`status` says why open rows wait (their last try failed): a row removed from the list is left
    alone, never tried again, so it is not among them."""
    throttled = SendOutcome(
        OutcomeKind.THROTTLED, status=429, error_type="rate_limit_error", error_message="slow"
    )
    ledger.claim("ann@x.com", subject="Hello")
    assert ledger.record_outcome("ann@x.com", throttled, sender="alice") == P
    assert [group.count for group in ledger.error_groups(waiting=True)] == [1]
    ledger.record_plan([PlannedRow("bob@x.com", 2, "bob@x.com", "bob")], [])  # ann left the list
    assert ledger.error_groups(waiting=True) == []
