"""`campaign status` from SQL aggregates gives exactly what a pass over every ledger row gives.

The reference below computes the whole status from `ledger.rows()` (one Python object per row,
the way status used to), and the ledgers are real SQLite files with every state, several
senders (one no longer in the manifest, one unassigned), errors whose counts tie, messages
whose times tie, odd skip reasons and rows removed from the list; on both ledgers (SQLite and
PostgreSQL: the `ledgers` fixture) where status reads through the ledger, on SQLite alone where a test
looks at its file.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import campaign.ledger._read as read_module
from campaign.ledger import Ledger, PlannedRow, SqliteSite, open_ledger
from campaign.ledger._read import OPEN_COUNTS
from campaign.manifest import Manifest, load_manifest
from campaign.models import FIRST_STEP, OutcomeKind, RowState, SendOutcome, Skip, SkipReason
from campaign.nextsteps import build_next_steps
from campaign.plan import DAY_S, build_schedule
from campaign.status import OPEN_STATES, ErrorCause, build_status, build_unstarted_status, load_status
from campaign.testing.clock import FakeClock

if TYPE_CHECKING:
    from postgres import Ledgers

MANIFEST = """\
[campaign]
name = "status-check"

[recipients]
source = "list.csv"

[message]
subject = "Hello"
text = "note.txt.j2"

[[senders]]
name = "alice"
grant_id = "g-alice"
per_day = 40

[[senders]]
name = "bob"
grant_id = "g-bob"
provider = "gmail"

[[senders]]
name = "carol"
domain = "mail.example.com"
from = "news@mail.example.com"
"""
SENDERS = ("alice", "bob", "carol", "dave")  # dave: a sender the manifest no longer names
ROWS = 48
SENT = SendOutcome(OutcomeKind.SENT, status=200, message_id="m", request_id="r")
REPLAYED_5XX = SendOutcome(
    OutcomeKind.AMBIGUOUS,
    status=503,
    error_type="api.internal_error",
    error_message="upstream",
    replayed=True,
)
HEAVY = ("polars", "httpx", "jinja2", "starlette", "uvicorn", "markdown_it", "css_inline")


def _key(n: int) -> str:
    return f"k{n:02d}@x.com"


def _rejected(status: int | None, error_type: str | None, message: str | None) -> SendOutcome:
    return SendOutcome(OutcomeKind.REJECTED, status=status, error_type=error_type, error_message=message)


def _manifest(folder: Path) -> Manifest:
    (folder / "list.csv").write_text("email\na@x.com\n")
    (folder / "note.txt.j2").write_text("Hi\n")
    # Named for the campaign: its ledger file is where `ledgers` opens the campaign's (SQLite).
    (folder / "status-check.toml").write_text(MANIFEST)
    return load_manifest(folder / "status-check.toml")


def _planned(n: int) -> PlannedRow:
    # List order is not insertion order: row numbers are a permutation of 1..ROWS.
    return PlannedRow(_key(n), (n * 31) % ROWS + 1, _key(n), SENDERS[n % len(SENDERS)])


SKIPS = [
    Skip(101, "s1@x.com", "s1@x.com", SkipReason.SUPPRESSED, "in a.txt"),
    Skip(102, "s2@x.com", "s2@x.com", SkipReason.SUPPRESSED, "in b.txt"),
    Skip(103, "s3@x.com", "s3@x.com", SkipReason.DUPLICATE, "duplicate of row 3"),
    Skip(104, "s4@x.com", "s4@x.com", SkipReason.INVALID, "email: not an address"),
    Skip(105, "s5@x.com", "s5@x.com", SkipReason.UNSUBSCRIBED, "in the store"),
    Skip(106, "s6@x.com", "s6@x.com", SkipReason.SUPPRESSED, "reason rewritten below"),
    Skip(107, "s7@x.com", "s7@x.com", SkipReason.SUPPRESSED, "reason rewritten below"),
    Skip(108, "s8@x.com", "s8@x.com", SkipReason.SUPPRESSED, "reason rewritten below"),
    Skip(109, "s9@x.com", "s9@x.com", SkipReason.SUPPRESSED, "reason rewritten below"),
]


def _busy_ledger(ledgers: Ledgers, folder: Path) -> tuple[Manifest, Ledger, FakeClock]:
    """A ledger in every state, through the ledger's own transitions (plus a few odd stored values)."""
    manifest = _manifest(folder)
    clock = FakeClock()
    ledger = ledgers.open("status-check", clock=clock)
    planned = [_planned(n) for n in range(ROWS)]
    ledger.record_plan(planned, SKIPS)

    def send(n: int, outcome: SendOutcome, *, recipients: int = 1) -> None:
        ledger.claim(_key(n), subject="Hello")
        ledger.record_outcome(_key(n), outcome, sender=SENDERS[n % len(SENDERS)], recipients=recipients)

    for n in range(6):  # sent more than a day before the status
        send(n, SENT)
    clock.advance(25 * 3600)
    for n in range(6, 14):  # sent within the day, one message to two recipients
        send(n, SENT, recipients=2 if n == 8 else 1)
    # Failed: 402s at one instant (the latest message is then the last in list order), and one
    # later without a message; 400s of which the last updated is not the last in the list.
    for n in (14, 15, 16):
        send(n, _rejected(402, "message_rejected", f"no such mailbox {n}"))
    for n in (17, 18):
        send(n, _rejected(400, "invalid_request", f"bad request {n}"))
    clock.advance(60)
    send(19, _rejected(400, "invalid_request", "bad request 19"))
    send(22, _rejected(402, "message_rejected", None))
    send(20, _rejected(None, None, "r20"))  # stored as error type "rejected", no status
    send(21, _rejected(None, None, "r21"))
    # Unknown: a replayed 5xx (with its error), a claim given up with a note, one without.
    for n in (23, 24):
        send(n, REPLAYED_5XX)
    for n, note in ((25, "gave up"), (26, None)):
        ledger.claim(_key(n), subject="Hello")
        ledger.record_unknown(_key(n), note=note)
    # In flight: three claims, one with an ambiguous answer recorded.
    for n in (27, 28, 29):
        ledger.claim(_key(n), subject="Hello")
    ledger.record_outcome(_key(29), SendOutcome(OutcomeKind.AMBIGUOUS, status=504), sender="bob")
    # Pending with an error: a 429 sends it back to the queue.
    send(30, SendOutcome(OutcomeKind.THROTTLED, status=429, error_type="rate_limit"))
    ledger.record_skipped(_key(47), SkipReason.UNSUBSCRIBED, "clicked")
    ledger.close()
    # Values the transitions do not write today but a column may hold: a 0 status, an empty
    # error type or message, skip reasons without a colon, empty, missing or non-ASCII.
    ledgers.set_column("status-check", "error_status", 0, where="key", equals=_key(21))
    ledgers.set_column("status-check", "error_type", "", where="key", equals=_key(26))
    ledgers.set_column("status-check", "error_message", "", where="key", equals=_key(25))
    for email, reason in (
        ("s6@x.com", None),
        ("s7@x.com", ""),
        ("s8@x.com", "no colon here"),
        ("s9@x.com", "désabonné: é:x"),
    ):
        ledgers.set_column("status-check", "reason", reason, where="email", equals=email)
    ledger = ledgers.open("status-check", clock=clock)
    # Rows removed from the list, in several states (and a skipped one).
    removed = {0, 15, 23, 27, 31}
    ledger.record_plan([p for n, p in enumerate(planned) if n not in removed], SKIPS[1:])
    return manifest, ledger, clock


def _status_from_rows(
    manifest: Manifest, ledger: Ledger, *, clock: Any, command_path: str, sandbox: bool = False
) -> dict[str, Any]:
    """The status as a pass over every row computes it: the reference for the aggregates."""
    rows = list(ledger.rows())
    counts = Counter(row.state for row in rows)
    listed = Counter(row.state for row in rows if row.listed)
    since = clock.now().timestamp() - DAY_S
    senders: dict[str, dict[str, Any]] = {}
    for sender in manifest.senders:
        mine = Counter(row.state for row in rows if row.sender == sender.name)
        sent_24h = sum(count for _, count in ledger.sent_recipients_since(sender.name, since))
        senders[sender.name] = {
            "grant_id": sender.route,  # a domain sender's `domain:<domain>`, as preview says
            "domain": sender.domain,
            "email": sender.email,
            "states": {state.value: mine[state] for state in RowState},
            "sent_last_24h": sent_24h,
            "per_day": sender.per_day,
            "budget_left": None if sender.per_day is None else max(0, sender.per_day - sent_24h),
        }
    skipped: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    waiting: Counter[str] = Counter()  # open rows whose last try failed
    last_error: dict[str, tuple[str, str]] = {}
    last_waiting: dict[str, tuple[str, str]] = {}
    for row in rows:
        if row.state == RowState.SKIPPED:
            skipped[(row.reason or "unknown").split(":", 1)[0]] += 1
            continue
        if row.state in (RowState.FAILED, RowState.UNKNOWN):
            tally, last = errors, last_error
        elif row.state in (RowState.PENDING, RowState.INFLIGHT) and row.error_type is not None:
            tally, last = waiting, last_waiting
        else:
            continue
        cause = f"{row.error_status or '-'} {row.error_type or row.state.value}"
        tally[cause] += 1
        said = row.error_message or row.note or ""
        if said and row.updated_at >= last.get(cause, ("", ""))[0]:
            last[cause] = (row.updated_at, said)
    schedule = build_schedule(
        manifest.senders,
        remaining={
            name: info["states"]["pending"] + info["states"]["inflight"] for name, info in senders.items()
        },
        used_24h={name: info["sent_last_24h"] for name, info in senders.items()},
    )
    for plan in schedule.senders:
        senders[plan.name]["next_24h"] = plan.next_24h
        senders[plan.name]["eta_s"] = plan.duration_s
    examples = {
        state: [row.email for row in rows if row.listed and row.state == state][:3]
        for state in (*OPEN_STATES, RowState.FAILED)
    }
    removed = len(rows) - sum(listed.values())
    unknown_claims = [
        datetime.fromisoformat(row.claimed_at)
        for row in rows
        if row.state == RowState.UNKNOWN and row.claimed_at
    ]
    decides_at = max(unknown_claims) + timedelta(minutes=15) if unknown_claims else None
    steps = build_next_steps(
        listed,
        manifest=command_path,
        sandbox=sandbox,
        removed=removed,
        examples=examples,
        reconcile_decides_at=decides_at if decides_at is not None and decides_at > clock.now() else None,
    )
    return (
        {
            "campaign": manifest.campaign.name,
            "manifest": str(manifest.path),
            "ledger": ledger.where,
            "per_day": schedule.per_day,
            "eta_s": schedule.duration_s,
            "started": True,
            "done": all(listed[state] == 0 for state in OPEN_STATES),
            "total": len(rows),
            "states": {state.value: counts[state] for state in RowState},
            "skipped": dict(sorted(skipped.items())),
            "errors": dict(errors.most_common()),
            "last_errors": {
                cause: last_error[cause][1] for cause, _ in errors.most_common() if cause in last_error
            },
            "removed_from_list": removed,
            "next": [step.as_json() for step in steps],
            "senders": senders,
        }
        | (
            {
                "waiting": {
                    cause: {
                        "rows": count,
                        "latest": last_waiting[cause][1] if cause in last_waiting else None,
                    }
                    for cause, count in waiting.most_common()
                }
            }
            if waiting
            else {}
        )
        | ({"workers": []} if ledger.where.startswith("postgresql://") else {})
    )  # no worker holds it now


@pytest.mark.parametrize("sandbox", [False, True])
def test_status_equals_a_pass_over_every_row(ledgers, tmp_path, sandbox):
    """Every key, value and order of build_status's JSON matches the per-row computation on a busy ledger."""
    manifest, ledger, clock = _busy_ledger(ledgers, tmp_path)
    got = build_status(manifest, ledger, clock=clock, command_path="my campaign.toml", sandbox=sandbox)
    want = _status_from_rows(manifest, ledger, clock=clock, command_path="my campaign.toml", sandbox=sandbox)
    assert json.dumps(got.as_json()) == json.dumps(want)  # order too: the JSON is a contract
    # The ledger really has what the comparison is meant to cover (read from the typed fields the
    # terminal output prints, so those are checked too).
    assert all(got.states[state] > 0 for state in RowState)
    assert got.removed_from_list == 6  # five planned rows and a skipped one
    assert got.total == ROWS + len(SKIPS)
    assert [(error.cause, error.count) for error in got.errors] == [
        ("402 message_rejected", 4),
        ("400 invalid_request", 3),
        ("- unknown", 2),  # ties keep the order the causes first occur in the list
        ("503 api.internal_error", 2),
        ("- rejected", 2),
    ]
    assert {error.cause: error.latest for error in got.errors} == {
        "402 message_rejected": "no such mailbox 15",  # same time: the last in list order
        "400 invalid_request": "bad request 19",  # the last updated, though first in the list
        "- unknown": "gave up",
        "503 api.internal_error": "upstream",
        "- rejected": "r20",
    }
    assert [(error.cause, error.count) for error in got.waiting] == [
        ("429 rate_limit", 1),
        ("504 ambiguous", 1),
    ]
    assert got.skipped == {
        "désabonné": 1,
        "duplicate": 1,
        "invalid": 1,
        "no colon here": 1,
        "suppressed": 2,
        "unknown": 2,
        "unsubscribed": 2,
    }
    alice = next(sender for sender in got.senders if sender.name == "alice")
    assert alice.sent_last_24h == 3  # one message had two recipients
    assert alice.budget_left == 37
    assert {step.state for step in got.next_steps} == {*OPEN_STATES, RowState.FAILED, None}


def test_a_finished_campaign_with_unknown_rows_removed_from_the_list_is_done(ledgers, tmp_path):
    """Open rows no longer in the list do not keep the campaign open: same answer both ways."""
    manifest = _manifest(tmp_path)
    clock = FakeClock()
    ledger = ledgers.open("status-check", clock=clock)
    planned = [_planned(n) for n in range(6)]
    ledger.record_plan(planned, SKIPS[:2])
    for n in range(5):
        ledger.claim(_key(n))
        ledger.record_outcome(_key(n), SENT, sender=SENDERS[n % len(SENDERS)])
    ledger.claim(_key(5))
    ledger.record_unknown(_key(5), note="crashed")
    ledger.record_plan(planned[:5], SKIPS[:2])
    got = build_status(manifest, ledger, clock=clock, command_path="campaign.toml")
    assert json.dumps(got.as_json()) == json.dumps(
        _status_from_rows(manifest, ledger, clock=clock, command_path="campaign.toml")
    )
    assert got.done is True
    assert got.removed_from_list == 1
    assert got.errors == (ErrorCause("- unknown", 1, "crashed"),)


def test_a_campaign_not_started_has_the_documented_json(tmp_path):
    """Before any run: no ledger, no schedule, every count zero, each sender's full daily budget left."""
    manifest = _manifest(tmp_path)
    got = build_unstarted_status(manifest)
    assert not got.started
    zero = {state.value: 0 for state in RowState}
    assert json.dumps(got.as_json()) == json.dumps(
        {
            "campaign": "status-check",
            "manifest": str(manifest.path),
            "ledger": None,
            "started": False,
            "done": False,
            "total": 0,
            "states": zero,
            "skipped": {},
            "errors": {},
            "last_errors": {},
            "removed_from_list": 0,
            "next": [],
            "senders": {
                sender.name: {
                    "grant_id": sender.route,
                    "email": sender.email,
                    "states": zero,
                    "sent_last_24h": 0,
                    "per_day": sender.per_day,
                    "budget_left": sender.per_day,
                }
                for sender in manifest.senders
            },
        }
    )
    assert (
        load_status(manifest, SqliteSite(manifest.ledger_path), clock=FakeClock(), command_path="c.toml")
        == got
    )


def test_the_send_log_totals_equal_the_sum_of_its_rows(ledgers, tmp_path):
    """sent_recipients_total is the sum of the per-send rows, per sender and window."""
    _, ledger, clock = _busy_ledger(ledgers, tmp_path)
    for since in (0.0, clock.now().timestamp() - DAY_S, clock.now().timestamp()):
        for sender in (*SENDERS, "nobody"):
            rows = ledger.sent_recipients_since(sender, since)
            assert ledger.sent_recipients_total(sender, since) == sum(count for _, count in rows)
    assert ledger.sent_recipients_total("alice", 0.0) == 5  # 3 sends, one to two recipients, + 1 older


def test_listed_and_unlisted_counts_add_up_to_all_rows(ledgers, tmp_path):
    """counts(listed=…) splits counts() by list membership, as the rows say."""
    _, ledger, _ = _busy_ledger(ledgers, tmp_path)
    rows = list(ledger.rows())
    for listed in (True, False):
        expected = Counter(row.state for row in rows if row.listed is listed)
        assert ledger.counts(listed=listed) == {state: expected[state] for state in RowState}
    per_sender = ledger.counts_per_sender()
    assert set(per_sender) == {*SENDERS, None}  # None: skipped rows, never assigned a sender
    for name, counts in per_sender.items():
        expected = Counter(row.state for row in rows if row.sender == name)
        assert counts == {state: expected[state] for state in RowState}


def test_the_status_queries_read_indexes_not_the_table(sqlite_ledgers, tmp_path):
    """The per-sender send sums, the list-membership counts and the open rows' counts are answered from
    covering indexes."""
    manifest, ledger, _ = _busy_ledger(sqlite_ledgers, tmp_path)
    ledger.close()
    with sqlite3.connect(manifest.ledger_path) as db:
        plans = {
            query: " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + query, params))
            for query, params in (
                (
                    "SELECT COALESCE(SUM(recipients), 0) FROM send_log WHERE sender = ? AND sent_at > ?",
                    ("a", 0),
                ),
                ("SELECT state, COUNT(*) FROM recipients WHERE listed = ? GROUP BY state", (0,)),
                ("SELECT state, sender, COUNT(*) FROM recipients GROUP BY state, sender", ()),
                (OPEN_COUNTS, (FIRST_STEP, None, None)),  # every run's start, with and without a time
                (OPEN_COUNTS, (FIRST_STEP, "2026-01-01T00:00:00.000+00:00", "2026-01-01T00:00:00.000+00:00")),
            )
        }
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert all("COVERING INDEX" in plan for plan in plans.values()), plans
    assert "send_log_recipients" in indexes
    assert "send_log_sender" not in indexes  # replaced: the new index starts with its columns


def test_a_ledger_from_before_the_send_log_index_is_migrated_and_keeps_its_totals(sqlite_ledgers, tmp_path):
    """Opening a ledger without the covering index adds it; the totals are unchanged."""
    manifest, ledger, clock = _busy_ledger(sqlite_ledgers, tmp_path)
    since = clock.now().timestamp() - DAY_S
    before = {sender: ledger.sent_recipients_total(sender, since) for sender in SENDERS}
    ledger.close()
    with sqlite3.connect(manifest.ledger_path) as db:
        db.execute("DROP INDEX send_log_recipients")
        db.execute("CREATE INDEX send_log_sender ON send_log (sender, sent_at)")
        db.execute("DELETE FROM schema_migrations WHERE version = 4")  # the migration that made the index
    ledger = open_ledger(manifest.ledger_path, clock=clock, campaign="status-check")
    assert {sender: ledger.sent_recipients_total(sender, since) for sender in SENDERS} == before
    ledger.close()
    with sqlite3.connect(manifest.ledger_path) as db:
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "send_log_recipients" in indexes
    assert "send_log_sender" not in indexes


def test_the_status_command_prints_the_same_json_and_loads_no_send_or_preview_libraries(
    sqlite_ledgers, tmp_path
):
    """`campaign status --json` in a fresh interpreter: the per-row answer, without polars, httpx, …"""
    manifest, ledger, _ = _busy_ledger(sqlite_ledgers, tmp_path)
    ledger.close()
    code = (
        "import sys, json\n"
        "sys.argv = ['campaign', 'status', sys.argv[1], '--json']\n"
        "from campaign.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        f"    loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "    print(json.dumps({'exit': exit.code, 'loaded': loaded}), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(manifest.path)], capture_output=True, text=True, check=False
    )
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"exit": 0, "loaded": []}
    printed = json.loads(result.stdout)
    from campaign.clock import SystemClock

    ledger = open_ledger(manifest.ledger_path, clock=SystemClock(), campaign="status-check")
    want = _status_from_rows(manifest, ledger, clock=SystemClock(), command_path=str(manifest.path))
    assert printed == json.loads(json.dumps(want))
    assert list(printed["errors"]) == list(want["errors"])


_STATES = (RowState.PENDING, RowState.SENT, RowState.SKIPPED, RowState.FAILED)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.sampled_from(_STATES), st.booleans(), st.integers(1, 30)), max_size=30),
    limit=st.integers(1, 4),
)
def test_sample_emails_are_the_first_in_list_order_of_a_states_first_rows(
    tmp_path_factory, monkeypatch, rows, limit
):
    """Whether a state's first rows are found among the table's first ones (read in rowid order) or not
    (read from the state index), the sample is the same: of the state's first `_SAMPLED_FROM` rows
    recorded, the first `limit` in list order."""
    monkeypatch.setattr(read_module, "_SAMPLED_FROM", 3)
    monkeypatch.setattr(read_module, "_SCANNED_FIRST", 6)
    path = tmp_path_factory.mktemp("sample") / "ledger.sqlite"
    ledger = open_ledger(path, clock=FakeClock(), campaign="c")
    ledger.record_plan(
        [PlannedRow(_key(n), row, _key(n), "alice", cells="{}") for n, (_, _, row) in enumerate(rows)], []
    )
    with sqlite3.connect(path) as db:
        db.executemany(
            "UPDATE recipients SET state = ?, listed = ? WHERE key = ?",
            [(state.value, int(listed), _key(n)) for n, (state, listed, _) in enumerate(rows)],
        )
    recorded = [(_key(n), row, state, listed) for n, (state, listed, row) in enumerate(rows)]
    try:
        for listed in (None, True, False):
            expected = {}
            for state in _STATES:
                first = [r for r in recorded if r[2] is state and listed in (None, r[3])][:3]
                expected[state] = [key for key, _, _, _ in sorted(first, key=lambda r: (r[1], r[0]))][:limit]
            assert ledger.sample_emails(_STATES, listed=listed, limit=limit) == expected
    finally:
        ledger.close()
