"""The SQLite ledger: states, transitions, idempotency keys, send log, migrations, file mode."""

from __future__ import annotations

import sqlite3
import stat
from datetime import UTC, datetime, timedelta

import pytest

from campaign.errors import LedgerError
from campaign.ledger import Ledger, PlannedRow, open_ledger
from campaign.models import OutcomeKind, RowState, SendOutcome, Skip, SkipReason, ThrottleKind
from campaign.testing.clock import FakeClock

SENT = SendOutcome(OutcomeKind.SENT, status=200, message_id="m-1", request_id="r-1")


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


def test_new_ledger_is_private_and_in_wal_mode(ledger):
    """The file is created 0600 and uses WAL."""
    mode = stat.S_IMODE(ledger.path.stat().st_mode)
    assert mode == 0o600
    with sqlite3.connect(ledger.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrations_are_recorded_once(tmp_path, clock):
    """Opening a ledger twice applies each migration once and records it."""
    path = tmp_path / "l.sqlite"
    open_ledger(path, clock=clock, campaign="c").close()
    open_ledger(path, clock=clock, campaign="c").close()
    with sqlite3.connect(path) as db:
        versions = [v for (v,) in db.execute("SELECT version FROM schema_migrations")]
    assert versions == [1]


def test_ledger_of_another_campaign_is_refused(tmp_path, clock):
    """A ledger written for one campaign name cannot be used by another."""
    path = tmp_path / "l.sqlite"
    open_ledger(path, clock=clock, campaign="one").close()
    with pytest.raises(LedgerError, match="belongs to campaign 'one'"):
        open_ledger(path, clock=clock, campaign="two")


def test_record_plan_adds_pending_and_skipped_and_keeps_existing(ledger):
    """New rows are pending, skips are skipped with their reason, and a second sync adds nothing."""
    counts = ledger.counts()
    assert counts[RowState.PENDING] == 2
    assert counts[RowState.SKIPPED] == 1
    skipped = next(iter(ledger.rows(states=[RowState.SKIPPED])))
    assert skipped.reason == "suppressed: in unsubscribed.txt"
    report = ledger.record_plan([PlannedRow("ann@x.com", 1, "ann@x.com", "carol")], [])
    assert (report.added, report.existing, report.missing) == (0, 1, 2)
    assert ledger.assigned_senders()["ann@x.com"] == "alice"


def test_new_rows_are_added_to_an_existing_ledger(ledger):
    """Adding a row to the list adds exactly that row as pending."""
    report = ledger.record_plan(
        [PlannedRow("ann@x.com", 1, "ann@x.com", "alice"), PlannedRow("new@x.com", 9, "new@x.com", "bob")], []
    )
    assert report.added == 1
    assert ledger.counts()[RowState.PENDING] == 3


def test_claim_then_sent_records_message_and_send_log(ledger, clock):
    """A claimed row carries an idempotency key; a 2xx makes it sent and logs the send."""
    claim = ledger.claim("ann@x.com")
    assert claim.idempotency_key.startswith("spring-")
    assert "ann" not in claim.idempotency_key
    row = next(r for r in ledger.rows() if r.key == "ann@x.com")
    assert row.state == RowState.INFLIGHT
    assert row.idempotency_key == claim.idempotency_key
    assert ledger.record_outcome("ann@x.com", SENT, sender="alice") == RowState.SENT
    row = next(r for r in ledger.rows() if r.key == "ann@x.com")
    assert (row.state, row.message_id, row.attempts) == (RowState.SENT, "m-1", 1)
    assert ledger.sent_recipients_since("alice", clock.now().timestamp() - 10) == [
        (clock.now().timestamp(), 1)
    ]


def test_inflight_row_keeps_its_key_when_claimed_again(ledger):
    """Resuming an in-flight row re-sends it with the same key."""
    first = ledger.claim("ann@x.com")
    again = ledger.claim("ann@x.com")
    assert again.idempotency_key == first.idempotency_key


def test_ambiguous_outcome_keeps_row_inflight_with_same_key(ledger):
    """A timeout or 5xx leaves the row in flight, same key, with the error recorded."""
    first = ledger.claim("ann@x.com")
    state = ledger.record_outcome(
        "ann@x.com",
        SendOutcome(OutcomeKind.AMBIGUOUS, status=503, error_type="api.internal_error"),
        sender="alice",
    )
    assert state == RowState.INFLIGHT
    row = next(r for r in ledger.rows() if r.key == "ann@x.com")
    assert (row.idempotency_key, row.error_status) == (first.idempotency_key, 503)


def test_throttle_returns_row_to_pending_with_a_new_key_next_time(ledger):
    """A 429 is a definite 'not sent': the next claim uses a new idempotency key."""
    first = ledger.claim("ann@x.com")
    throttled = SendOutcome(OutcomeKind.THROTTLED, status=429, throttle=ThrottleKind.NYLAS)
    assert ledger.record_outcome("ann@x.com", throttled, sender="alice") == RowState.PENDING
    second = ledger.claim("ann@x.com")
    assert second.idempotency_key != first.idempotency_key
    assert second.attempt_no == first.attempt_no + 1


def test_rejection_is_final(ledger):
    """A permanent 4xx makes the row failed; it cannot be claimed again."""
    ledger.claim("bob@x.com")
    rejected = SendOutcome(
        OutcomeKind.REJECTED, status=402, error_message="Sending to at least one recipient failed."
    )
    assert ledger.record_outcome("bob@x.com", rejected, sender="bob") == RowState.FAILED
    with pytest.raises(LedgerError, match="it is failed"):
        ledger.claim("bob@x.com")


@pytest.mark.parametrize("key", ["eve@x.com", "nobody@x.com"])
def test_illegal_claims_raise(ledger, key):
    """A skipped or unknown key cannot be claimed."""
    with pytest.raises(LedgerError):
        ledger.claim(key)


def test_outcome_for_a_row_not_in_flight_raises(ledger):
    """Recording an outcome for a pending row is a bug and raises."""
    with pytest.raises(LedgerError, match="not inflight"):
        ledger.record_outcome("ann@x.com", SENT, sender="alice")


def test_sent_row_cannot_be_sent_twice(ledger):
    """Once sent, a row can neither be claimed nor given another outcome."""
    ledger.claim("ann@x.com")
    ledger.record_outcome("ann@x.com", SENT, sender="alice")
    with pytest.raises(LedgerError):
        ledger.claim("ann@x.com")
    with pytest.raises(LedgerError):
        ledger.record_outcome("ann@x.com", SENT, sender="alice")


def test_expired_claims_become_unknown(ledger, clock):
    """An in-flight row older than the idempotency window becomes unknown; a young one stays."""
    ledger.claim("ann@x.com")
    clock.advance(3601)
    ledger.claim("bob@x.com")
    assert ledger.record_expired_claims(older_than_s=3600) == 1
    states = {row.key: row.state for row in ledger.rows()}
    assert states["ann@x.com"] == RowState.UNKNOWN
    assert states["bob@x.com"] == RowState.INFLIGHT


def test_counts_by_sender(ledger):
    """Per-sender counts cover every state."""
    ledger.claim("ann@x.com")
    ledger.record_outcome("ann@x.com", SENT, sender="alice")
    by_sender = ledger.counts_by_sender()
    assert by_sender["alice"][RowState.SENT] == 1
    assert by_sender["bob"][RowState.PENDING] == 1


def test_send_log_window(ledger, clock):
    """Only sends after the given time are returned."""
    ledger.claim("ann@x.com")
    ledger.record_outcome("ann@x.com", SENT, sender="alice")
    later = clock.now() + timedelta(hours=25)
    assert ledger.sent_recipients_since("alice", (later - timedelta(hours=24)).timestamp()) == []


def test_unreadable_ledger_is_a_ledger_error(tmp_path, clock):
    """A file that is not SQLite gives a LedgerError naming it."""
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match=r"bad\.sqlite"):
        open_ledger(path, clock=clock, campaign="c")


def test_timestamps_come_from_the_clock(ledger, clock):
    """Rows are stamped with the injected clock's time."""
    ledger.claim("ann@x.com")
    row = next(r for r in ledger.rows() if r.key == "ann@x.com")
    assert datetime.fromisoformat(row.claimed_at) == clock.now().astimezone(UTC)
