"""The pure limiter: pace (GCRA booking) and the rolling daily budget, with property tests."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.plan import DAY_S, NYLAS_JSON_PER_SECOND, DailyBudget, Pace


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max(
        (bisect.bisect_right(times, start + window - 1e-9) - i for i, start in enumerate(times)), default=0
    )


def test_pace_spaces_sends_evenly():
    """At 4/s with burst 1, booked slots are 0.25 s apart."""
    pace = Pace(4, burst=1)
    starts = [pace.reserve(10.0) for _ in range(5)]
    assert starts == pytest.approx([10.0, 10.25, 10.5, 10.75, 11.0])


def test_pace_allows_a_burst_then_paces():
    """With burst 3, three sends start at once, then the rate applies."""
    pace = Pace(2, burst=3)
    starts = [pace.reserve(0.0) for _ in range(5)]
    assert starts[:3] == [0.0, 0.0, 0.0]
    assert starts[3] == pytest.approx(0.5)
    assert starts[4] == pytest.approx(1.0)


def test_pace_never_exceeds_nylas_ceiling():
    """A configured rate at or above Nylas's 200/s per grant is paced 5% under it, at 190/s."""
    pace = Pace(10_000)
    assert pace.interval_s == pytest.approx(1 / 190)
    assert Pace(200).interval_s == pytest.approx(1 / 190)
    assert Pace(150).interval_s == pytest.approx(1 / 150)


def test_pace_delay_pushes_next_slot():
    """After a throttle, no slot is booked before the given time."""
    pace = Pace(10)
    pace.reserve(0.0)
    pace.delay(30.0)
    assert pace.reserve(1.0) == pytest.approx(30.0)


def test_pace_rejects_nonsense():
    """A zero rate or a burst below 1 is refused."""
    with pytest.raises(ValueError, match="positive rate"):
        Pace(0)
    with pytest.raises(ValueError, match="burst"):
        Pace(1, burst=0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=100),
    burst=st.integers(min_value=1, max_value=10),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=200),
)
def test_no_one_second_window_exceeds_rate_plus_burst(rate, burst, gaps):
    """Whatever the request pattern, booked starts never put more than rate + burst in one second."""
    pace = Pace(rate, burst=burst)
    now, starts = 0.0, []
    for gap in gaps:
        now += gap
        starts.append(pace.reserve(now))
    assert all(start >= 0 for start in starts)
    assert _max_in_window(starts) <= rate + burst


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=1000),
    burst=st.integers(min_value=1, max_value=10_000),
    waits=st.lists(st.floats(min_value=0, max_value=2), max_size=20),
)
def test_no_burst_takes_a_second_over_nylas_ceiling(rate, burst, waits):
    """Whatever the manifest's burst, no one-second window holds more than Nylas's 200 sends per grant: not
    when 400 requests come at once, nor when more come in waves after pauses."""
    pace = Pace(rate, burst=burst)
    now, starts = 0.0, [pace.reserve(0.0) for _ in range(400)]
    for wait in waits:
        now = max(starts) + wait
        starts += [pace.reserve(now) for _ in range(50)]
    assert _max_in_window(starts) <= NYLAS_JSON_PER_SECOND


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(min_value=0.5, max_value=100), gaps=st.lists(st.floats(0, 5), min_size=1, max_size=100))
def test_pace_is_work_conserving(rate, gaps):
    """A request is never made to wait when the previous slot is already a full interval in the past."""
    pace = Pace(rate)
    now, last = 0.0, None
    for gap in gaps:
        now += gap
        start = pace.reserve(now)
        expected = now if last is None else max(now, last + 1 / rate)
        assert start == pytest.approx(expected)
        last = start


def test_budget_counts_recipients_over_a_rolling_day():
    """100 recipients a day: after 100 the budget is empty until the oldest send is 24 h old."""
    budget = DailyBudget(100)
    for i in range(100):
        assert budget.allows(float(i), 1)
        budget.book(float(i), 1)
    assert not budget.allows(100.0, 1)
    assert budget.frees_at(100.0, 1) == pytest.approx(DAY_S)
    assert budget.allows(DAY_S + 0.5, 1)


def test_budget_is_seeded_from_history():
    """Sends from earlier runs (the ledger's send log) count against today's budget."""
    budget = DailyBudget(10, history=[(0.0, 4), (100.0, 5)])
    assert budget.available(200.0) == 1
    assert budget.available(DAY_S + 1) == 5


def test_budget_release_undoes_a_booking():
    """A booking for a message that was not sent is given back."""
    budget = DailyBudget(1)
    budget.book(5.0, 1)
    assert budget.available(6.0) == 0
    budget.release(5.0, 1)
    assert budget.available(6.0) == 1


def test_unlimited_budget_always_allows():
    """No per_day means no daily limit."""
    budget = DailyBudget(None)
    budget.book(0.0, 10_000)
    assert budget.allows(1.0, 10_000)
    assert budget.available(1.0) is None


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 50),
    requests=st.lists(st.tuples(st.floats(0, 20_000), st.integers(1, 5)), max_size=300),
)
def test_budget_never_exceeded_in_any_rolling_day(limit, requests):
    """Sending only when allowed never puts more than the limit in any 24 h window."""
    budget = DailyBudget(limit)
    now, sent = 0.0, []
    for gap, recipients in requests:
        now += gap
        if budget.allows(now, recipients):
            budget.book(now, recipients)
            sent.append((now, recipients))
        else:
            assert budget.frees_at(now, recipients) > now
    for start, _ in sent:
        in_window = sum(n for at, n in sent if start <= at < start + DAY_S)
        assert in_window <= limit
