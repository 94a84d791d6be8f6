"""Delays, send windows and holidays for follow-up steps, in the sender's time zone, across DST."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.sendtime import Delay, add_delay, load_zone, next_open, parse_delay, parse_window

BERLIN = load_zone("Europe/Berlin")
NEW_YORK = load_zone("America/New_York")


def _berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


@pytest.mark.parametrize(
    ("text", "delay"),
    [
        ("90s", Delay(seconds=90)),
        ("15m", Delay(seconds=900)),
        ("2h", Delay(seconds=7200)),
        ("3d", Delay(seconds=3 * 86_400)),
        ("3 business days", Delay(business_days=3)),
        ("1  Business Day", Delay(business_days=1)),
    ],
)
def test_delays_read_as_written(text, delay):
    assert parse_delay(text) == delay


@pytest.mark.parametrize("text", ["3", "three days", "3 weeks", "-1d", "3 business", ""])
def test_a_bad_delay_says_the_accepted_forms(text):
    with pytest.raises(ValueError, match="3 business days"):
        parse_delay(text)


@pytest.mark.parametrize("text", ["999999999999d", "5000000 business days", "366d", "261 business days"])
def test_a_delay_over_a_year_is_refused_before_anything_is_sent(text):
    """Such a delay is a typo; one of millions of days crashed the run once step 1 had gone out."""
    with pytest.raises(ValueError, match="more than a year"):
        parse_delay(text)
    assert parse_delay("365d") == Delay(seconds=365 * 86_400)


def test_business_days_skip_weekends_and_holidays_and_keep_the_wall_clock_across_dst():
    """Thu 26 Mar 2026 09:30 Berlin + 3 business days = Tue 31 Mar 09:30 (CEST since Sunday): the
    weekend is skipped and 09:30 stays 09:30 though the offset changed; a holiday Monday adds a day."""
    sent = _berlin(2026, 3, 26, 9, 30)
    due = add_delay(sent, Delay(business_days=3), zone=BERLIN)
    assert due.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 31, 9, 30)
    assert due - sent.astimezone(UTC) == timedelta(days=5) - timedelta(hours=1)  # the DST hour is gone
    later = add_delay(sent, Delay(business_days=3), zone=BERLIN, holidays={date(2026, 3, 30)})
    assert later.astimezone(BERLIN).date() == date(2026, 4, 1)


def test_plain_delays_are_elapsed_time_not_wall_clock():
    sent = _berlin(2026, 3, 28, 12, 0)  # the night of the DST change follows: 24 h later is 13:00
    due = add_delay(sent, Delay(seconds=86_400), zone=BERLIN)
    assert due - sent.astimezone(UTC) == timedelta(days=1)
    assert due.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 29, 13, 0)


def test_business_days_are_counted_in_the_senders_zone():
    """Friday 23:30 in New York is Saturday in Berlin: one business day later is Monday there, but
    Monday in New York only for the New York sender."""
    sent = datetime(2026, 6, 5, 23, 30, tzinfo=NEW_YORK)
    assert add_delay(sent, Delay(business_days=1), zone=NEW_YORK).astimezone(NEW_YORK).date() == date(
        2026, 6, 8
    )
    assert add_delay(sent, Delay(business_days=1), zone=BERLIN).astimezone(BERLIN).date() == date(2026, 6, 8)


def test_a_window_opens_on_its_next_listed_day_in_its_zone():
    window = parse_window("Mon-Fri 09:00-17:30", BERLIN)
    assert window.days == frozenset(range(5))
    friday_evening = _berlin(2026, 3, 27, 18, 0)
    opens = next_open(window, friday_evening)
    assert opens.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 30, 9, 0)  # CEST by then
    inside = _berlin(2026, 3, 30, 10, 0)
    assert next_open(window, inside) == inside
    assert next_open(window, _berlin(2026, 3, 30, 8, 0)).astimezone(BERLIN).time() == time(9, 0)
    easter = next_open(window, friday_evening, holidays={date(2026, 3, 30)})
    assert easter.astimezone(BERLIN).date() == date(2026, 3, 31)


def test_window_day_lists_and_wrapping_ranges():
    assert parse_window("Mon,Wed,Fri 08:00-12:00", BERLIN).days == frozenset({0, 2, 4})
    assert parse_window("Fri-Mon 10:00-14:00", BERLIN).days == frozenset({4, 5, 6, 0})
    assert parse_window("saturday 10:00-11:00", BERLIN).days == frozenset({5})


@pytest.mark.parametrize("text", ["Mon-Fri", "Mon-Fri 17:00-09:00", "Xyz 09:00-10:00", "Mon-Fri 25:00-26:00"])
def test_a_bad_window_is_refused(text):
    with pytest.raises(ValueError, match="window"):
        parse_window(text, BERLIN)


def test_an_unknown_zone_is_refused_naming_it():
    with pytest.raises(ValueError, match="Mars/Olympus"):
        load_zone("Mars/Olympus")


@settings(max_examples=200, deadline=None)
@given(
    start=st.datetimes(
        min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
    ),
    days=st.integers(min_value=1, max_value=15),
)
def test_business_days_never_land_on_a_weekend_and_count_exactly(start, days):
    """Whatever the start, the due day is a weekday with exactly `days` weekdays after the start day."""
    due = add_delay(start, Delay(business_days=days), zone=BERLIN).astimezone(BERLIN)
    assert due.weekday() < 5
    first = start.astimezone(BERLIN).date()
    counted = sum(
        1 for n in range(1, (due.date() - first).days + 1) if (first + timedelta(days=n)).weekday() < 5
    )
    assert counted == days
    assert (
        due.time() == start.astimezone(BERLIN).time()
        or due.utcoffset() != start.astimezone(BERLIN).utcoffset()
    )


@settings(max_examples=200, deadline=None)
@given(
    at=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC))
)
def test_next_open_is_inside_the_window_and_nothing_earlier_is(at):
    window = parse_window("Mon-Fri 09:00-17:30", BERLIN)
    opens = next_open(window, at)
    assert opens >= at
    assert window.contains(opens)
    if opens > at:  # every minute between was closed
        probe = at
        while probe < opens:
            assert not window.contains(probe)
            probe += timedelta(minutes=37)


@pytest.mark.parametrize(
    ("window", "holidays", "at", "opens"),
    [
        # a holiday on a one-day window takes a whole week off it
        (
            "Tue 09:00-17:00",
            ["2026-12-08"],
            datetime(2026, 12, 6, 12, tzinfo=UTC),
            datetime(2026, 12, 15, 8, tzinfo=UTC),
        ),
        (
            "Mon 09:00-17:00",
            ["2026-12-28"],
            datetime(2026, 12, 22, 10, tzinfo=UTC),
            datetime(2027, 1, 4, 8, tzinfo=UTC),
        ),
        # four holidays over Christmas on a two-day window
        (
            "Tue,Thu 09:00-17:00",
            ["2026-12-22", "2026-12-24", "2026-12-29", "2026-12-31"],
            datetime(2026, 12, 20, 12, tzinfo=UTC),
            datetime(2027, 1, 5, 8, tzinfo=UTC),
        ),
    ],
)
def test_holidays_on_a_window_of_few_days_move_it_weeks_on(window, holidays, at, opens):
    """Each holiday may skip a week of a window open one or two days a week: the next opening is found
    (it raised "the window has no day left open", and run and status crashed)."""
    parsed = parse_window(window, load_zone("Europe/Berlin"))
    days = [date.fromisoformat(day) for day in holidays]
    assert next_open(parsed, at, holidays=days) == opens


@pytest.mark.parametrize(
    ("window", "opens"),
    [
        # every minute of it falls in the gap of Sunday 28 March 2027: next Sunday's is the first
        ("Sun 02:00-02:59", datetime(2027, 4, 4, 0, 0, tzinfo=UTC)),
        # it starts in the gap: it opens when the clock reads 03:00, not the gap's length later
        ("Sun 02:30-04:00", datetime(2027, 3, 28, 1, 0, tzinfo=UTC)),
        ("Sun 01:00-03:30", datetime(2027, 3, 28, 0, 0, tzinfo=UTC)),
    ],
)
def test_a_window_in_the_spring_forward_gap_opens_only_inside_itself(window, opens):
    """On the night Berlin's clocks skip from 02:00 to 03:00 a window opens only at a moment it contains
    (a window of 02:00-02:59 opened at 03:00 and sent an hour outside itself)."""
    parsed = parse_window(window, BERLIN)
    found = next_open(parsed, datetime(2027, 3, 27, 12, 0, tzinfo=UTC))
    assert found == opens
    assert parsed.contains(found)


@settings(max_examples=200, deadline=None)
@given(
    at=st.datetimes(min_value=datetime(2027, 3, 20), max_value=datetime(2027, 4, 5), timezones=st.just(UTC)),
    window=st.sampled_from(
        ["Sun 02:00-02:59", "Sun 02:30-04:00", "Sat-Sun 01:30-02:30", "Mon-Sun 02:15-02:45"]
    ),
)
def test_next_open_around_the_gap_is_always_inside_the_window(at, window):
    parsed = parse_window(window, BERLIN)
    opens = next_open(parsed, at)
    assert opens >= at
    assert parsed.contains(opens)
