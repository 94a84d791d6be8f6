"""Assigning recipients to senders, and the duration estimate behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.manifest import SenderSettings
from campaign.models import Address, Recipient
from campaign.plan import DAY_S, assign_senders, daily_capacity
from campaign.plan._assign import estimate_duration_s


def _recipients(count: int, sender: str | None = None) -> list[Recipient]:
    return [
        Recipient(key=f"r{n}@x.com", row=n, address=Address(f"r{n}@x.com"), fields={}, sender=sender)
        for n in range(1, count + 1)
    ]


def _sender(name: str, **limits) -> SenderSettings:
    return SenderSettings(name=name, grant_id=f"g-{name}", **limits)


def test_pinned_rows_go_to_their_sender():
    """A row whose sender column names a sender is always given to it."""
    jobs = assign_senders(_recipients(3, sender="b"), [_sender("a"), _sender("b")])
    assert {job.sender for job in jobs} == {"b"}


def test_unpinned_rows_go_to_whoever_finishes_first():
    """A sender four times faster gets about four times the rows."""
    jobs = assign_senders(_recipients(50), [_sender("slow", per_second=1), _sender("fast", per_second=4)])
    counts = {name: sum(job.sender == name for job in jobs) for name in ("slow", "fast")}
    assert counts == {"slow": 10, "fast": 40}


def test_daily_budget_shifts_work_to_the_sender_with_room():
    """A sender with per_day = 5 stops taking rows once more would spill into tomorrow."""
    jobs = assign_senders(_recipients(20), [_sender("small", per_day=5), _sender("big", per_day=1000)])
    counts = {name: sum(job.sender == name for job in jobs) for name in ("small", "big")}
    assert counts == {"small": 5, "big": 15}


def test_existing_assignment_is_kept_on_resume():
    """Rows the ledger already assigned keep their sender, so resuming never moves work."""
    recipients = _recipients(4)
    jobs = assign_senders(
        recipients, [_sender("a"), _sender("b")], assigned={"r1@x.com": "b", "r2@x.com": "b"}
    )
    assert [job.sender for job in jobs][:2] == ["b", "b"]
    assert [job.sender for job in jobs][2:] == ["a", "a"]


def test_assignment_to_a_removed_sender_is_redone():
    """If the ledger names a sender the manifest no longer has, the row is assigned afresh."""
    jobs = assign_senders(_recipients(1), [_sender("a")], assigned={"r1@x.com": "gone"})
    assert jobs[0].sender == "a"


_ASSIGN_IN_A_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_plan import _recipients, _sender
from campaign.plan._assign import assign_senders
senders = [_sender("a", per_second=3), _sender("b", per_second=2), _sender("c", per_minute=30)]
print(json.dumps([job.sender for job in assign_senders(_recipients(30), senders)]))
"""


def test_assignment_is_deterministic_across_processes():
    """The same inputs give the same assignment in processes with different hash seeds (resume)."""
    results = [
        subprocess.run(
            [sys.executable, "-c", _ASSIGN_IN_A_CHILD, str(Path(__file__).parent)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    ]
    assert results[0] == results[1] == results[2]
    assigned = json.loads(results[0])
    assert {name: assigned.count(name) for name in "abc"} == {"a": 17, "b": 11, "c": 2}


@pytest.mark.parametrize(
    ("messages", "rate", "per_day", "expected"),
    [
        (0, 1.0, None, 0.0),
        (10, 2.0, None, 5.0),
        (10, 2.0, 10, 5.0),
        (25, 1.0, 10, 2 * DAY_S + 5.0),
        (20, 1.0, 10, DAY_S + 10.0),
    ],
)
def test_estimate_duration(messages, rate, per_day, expected):
    """Pace within a day; a full rolling day of waiting per exhausted budget."""
    assert estimate_duration_s(messages, rate_per_s=rate, per_day=per_day) == pytest.approx(expected)


def test_daily_capacity_is_the_smaller_of_pace_and_budget():
    """per_second = 1 allows 86,400 a day; per_day = 500 caps it."""
    assert daily_capacity(_sender("a", per_second=1)) == DAY_S
    assert daily_capacity(_sender("a", per_second=1, per_day=500)) == 500


@settings(max_examples=150, deadline=None)
@given(
    limits=st.lists(
        st.tuples(st.sampled_from([0.5, 1.0, 2.0, 3.0]), st.sampled_from([None, 1, 3, 7])),
        min_size=1,
        max_size=6,
    ),
    rows=st.lists(st.tuples(st.integers(min_value=-1, max_value=5), st.booleans()), max_size=60),
)
def test_the_assigner_picks_what_a_walk_over_every_sender_picks(limits, rows):
    """The heap of finish times gives, row by row, the sender a walk over all senders would (the first
    listed on ties), with pinned rows and kept ones changing the loads in between."""
    from campaign.plan import SenderAssigner

    senders = [_sender(f"s{i}", per_second=rate, per_day=per_day) for i, (rate, per_day) in enumerate(limits)]
    assigner = SenderAssigner(senders)
    load = {sender.name: 0 for sender in senders}

    def finish(sender: SenderSettings) -> float:
        return estimate_duration_s(
            load[sender.name] + 1, rate_per_s=sender.rate_per_s, per_day=sender.per_day
        )

    for number, (pin, kept) in enumerate(rows):
        named = senders[pin % len(senders)].name if pin >= 0 else None
        recipient = Recipient(
            f"r{number}@example.com", number + 1, Address(f"r{number}@example.com"), {}, None
        )
        if named is not None and kept:
            assert assigner.assign(recipient, kept=named) == named  # the ledger's: no load added
            continue
        if named is not None:
            recipient = Recipient(recipient.key, recipient.row, recipient.address, {}, named)
            expected = named
        else:
            expected = min(senders, key=finish).name
        assert assigner.assign(recipient) == expected
        load[expected] += 1
