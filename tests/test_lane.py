"""A sender's lane: budgets in recipients and messages, the Retry-After hold, the adaptive pace."""

from __future__ import annotations

import pytest

from campaign.dispatch._lane import MIN_SLOWDOWN, RECOVER_AFTER, open_lane
from campaign.manifest import SenderSettings
from campaign.plan import DAY_S


def _sender(**limits) -> SenderSettings:
    return SenderSettings(name="a", grant_id="g-a", **limits)


def test_budget_counts_recipients_and_messages_separately():
    """per_day counts recipients, per_day_messages counts messages; either can refuse."""
    lane = open_lane(_sender(per_day=10, per_day_messages=2))
    lane.book(0.0, 3)
    lane.book(1.0, 3)
    assert lane.budget_frees_at(2.0, 1) == pytest.approx(DAY_S)  # two messages used up


def test_budget_is_seeded_from_earlier_sends():
    """Sends from the ledger's log count against the rolling day."""
    lane = open_lane(_sender(per_day=5), history=[(0.0, 1), (10.0, 4)])
    assert lane.budget_frees_at(20.0, 1) == pytest.approx(DAY_S)
    assert lane.budget_frees_at(DAY_S + 1, 1) is None


def test_release_gives_the_booking_back():
    """A booking for a message that was not sent is undone in both budgets."""
    lane = open_lane(_sender(per_day=1, per_day_messages=1))
    lane.book(5.0, 1)
    assert lane.budget_frees_at(6.0, 1) is not None
    lane.release(5.0, 1)
    assert lane.budget_frees_at(6.0, 1) is None


def test_throttle_holds_requests_until_retry_after():
    """After a 429 with a 30 s wait no slot starts before then."""
    lane = open_lane(_sender(per_second=10))
    lane.reserve(0.0)
    lane.record_throttle(mono=1.0, wait_s=30.0, sent_at=1.0)
    assert lane.reserve(1.0) >= 31.0


def test_sends_waiting_out_a_hold_leave_at_the_pace_from_its_end():
    """At 1/s, a 10 s hold: the sends booked after it leave at the pace (halved by the throttle: 2 s apart)
    from its end, not together at its end (the provider would see one burst, and throttle again)."""
    lane = open_lane(_sender(per_second=1))
    assert lane.reserve(0.0) == 0.0
    lane.record_throttle(mono=0.5, wait_s=10.0, sent_at=0.0)
    assert [lane.reserve(0.6) for _ in range(3)] == pytest.approx([10.5, 12.5, 14.5])


def test_throttles_to_requests_already_in_flight_count_once():
    """Eight requests in flight when the first 429 comes back are one wave: it counts once and halves the
    pace once, and only a request that left after it starts a new one."""
    lane = open_lane(_sender(per_second=8))
    for at in range(8):
        lane.record_throttle(mono=1.0 + at / 100, wait_s=1.0, sent_at=0.5)
    assert (lane.throttles, lane.rate_per_s) == (1, pytest.approx(4))
    assert lane.hold_until == pytest.approx(2.07)
    lane.record_throttle(mono=3.0, wait_s=1.0, sent_at=2.1)
    assert (lane.throttles, lane.rate_per_s) == (2, pytest.approx(2))


def test_throttles_halve_the_pace_down_to_a_floor():
    """Each throttle halves the pace, never below a tenth of the configured rate."""
    lane = open_lane(_sender(per_second=8))
    lane.record_throttle(mono=0.0, wait_s=0.0, sent_at=0.0)
    assert lane.rate_per_s == pytest.approx(4)
    for _ in range(10):
        lane.record_throttle(mono=0.0, wait_s=0.0, sent_at=0.0)
    assert lane.rate_per_s == pytest.approx(8 * MIN_SLOWDOWN)
    start = lane.reserve(100.0)
    assert lane.reserve(100.0) - start == pytest.approx(1 / (8 * MIN_SLOWDOWN))


def test_pace_recovers_slowly_after_calm_sends():
    """Only after RECOVER_AFTER sends without a throttle does the pace climb, by a quarter."""
    lane = open_lane(_sender(per_second=8))
    lane.record_throttle(mono=0.0, wait_s=0.0, sent_at=0.0)
    for _ in range(RECOVER_AFTER - 1):
        lane.record_sent()
    assert lane.rate_per_s == pytest.approx(4)
    lane.record_sent()
    assert lane.rate_per_s == pytest.approx(5)
    for _ in range(RECOVER_AFTER * 10):
        lane.record_sent()
    assert lane.rate_per_s == pytest.approx(8)


def test_multipart_sends_also_respect_ten_per_second():
    """A multipart send takes a slot from Nylas's 10/s multipart bucket as well."""
    lane = open_lane(_sender(per_second=100))
    starts = [lane.reserve(0.0, multipart=True) for _ in range(3)]
    assert starts[2] - starts[0] == pytest.approx(0.2)


def test_a_send_resets_consecutive_throttles():
    """Consecutive-throttle counting restarts after a successful send."""
    lane = open_lane(_sender())
    lane.record_throttle(mono=0.0, wait_s=0.0, sent_at=0.0)
    lane.record_throttle(mono=0.0, wait_s=0.0, sent_at=0.0)
    lane.record_sent()
    assert lane.throttles == 0
