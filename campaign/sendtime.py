"""Time as follow-ups count it: delays ("3 business days"), send windows ("Mon-Fri 09:00-17:30") in a
sender's time zone, and holidays. Pure: the caller passes every moment; zones come from the stdlib
`zoneinfo`, so a wall-clock time stays the same across a DST change.

`parse_delay` and `parse_window` raise ValueError saying what is wrong and the accepted forms; the
manifest names the key. `add_delay` gives when a step is due after the previous one was sent;
`next_open` gives the first moment a window allows, at or after a given one.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "Delay",
    "SendWindow",
    "add_delay",
    "finish_within",
    "load_zone",
    "next_delivery",
    "next_open",
    "parse_delay",
    "parse_deliver_at",
    "parse_window",
]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_PLAIN = re.compile(r"^(\d+)\s*([smhd])$")
_BUSINESS = re.compile(r"^(\d+)\s+business\s+days?$")
_WINDOW = re.compile(r"^([a-z,\- ]+?)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")
_WEEKEND = frozenset({5, 6})
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")


@dataclass(frozen=True, slots=True)
class Delay:
    """A wait: plain seconds, or business days (weekends and holidays skipped, wall-clock time kept)."""

    seconds: int = 0
    business_days: int = 0


@dataclass(frozen=True, slots=True)
class SendWindow:
    """When a sender may send: these weekdays (0 = Monday), from `start` to `end`, in `zone`."""

    days: frozenset[int]
    start: time
    end: time
    zone: ZoneInfo

    def contains(self, at: datetime) -> bool:
        """Whether the aware moment `at` falls inside the window."""
        local = at.astimezone(self.zone)
        return local.weekday() in self.days and self.start <= local.time() < self.end


def load_zone(name: str) -> ZoneInfo:
    """The IANA zone `name` (e.g. Europe/Berlin); ValueError naming it when there is no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"{name!r} is not a time zone; use an IANA name such as Europe/Berlin or UTC"
        ) from exc


_MAX_DELAY_DAYS = 365
_MAX_DELAY_BUSINESS_DAYS = 260


def parse_delay(text: str) -> Delay:
    """`90s`, `15m`, `2h`, `3d` or `3 business days` as a Delay, of at most a year (a longer one is a
    typo, and one of millions of days cannot even be dated)."""
    value = " ".join(text.strip().lower().split())
    delay: Delay | None = None
    if (found := _PLAIN.match(value)) is not None:
        delay = Delay(seconds=int(found[1]) * _UNITS[found[2]])
    elif (found := _BUSINESS.match(value)) is not None:
        delay = Delay(business_days=int(found[1]))
    if delay is None:
        message = f"{text!r} is not a delay; write e.g. 90s, 2h, 3d or 3 business days"
        raise ValueError(message)
    if delay.seconds > _MAX_DELAY_DAYS * 86_400 or delay.business_days > _MAX_DELAY_BUSINESS_DAYS:
        raise ValueError(f"{text!r} is more than a year; write a delay of at most 365d or 260 business days")
    return delay


def parse_window(text: str, zone: ZoneInfo) -> SendWindow:
    """`Mon-Fri 09:00-17:30` (or `Mon,Wed,Fri 08:00-12:00`; a range may wrap, `Fri-Mon`) in `zone`."""
    value = " ".join(text.strip().lower().split())
    found = _WINDOW.match(value)
    problem = f"{text!r} is not a send window; write e.g. Mon-Fri 09:00-17:30"
    if found is None:
        raise ValueError(problem)
    try:
        start = time(int(found[2]), int(found[3]))
        end = time(int(found[4]), int(found[5]))
    except ValueError as exc:
        raise ValueError(problem) from exc
    if end <= start:
        raise ValueError(f"{text!r}: the window must end after it starts on the same day")
    return SendWindow(_parse_days(found[1], problem), start, end, zone)


def parse_deliver_at(text: str) -> time:
    """`09:30` as a local time of day; ValueError saying the accepted form."""
    found = _CLOCK.match(text.strip())
    try:
        if found is None:
            raise ValueError
        return time(int(found[1]), int(found[2]))
    except ValueError:
        raise ValueError(f"{text!r} is not a time of day; write e.g. 09:30") from None


def add_delay(at: datetime, delay: Delay, *, zone: ZoneInfo, holidays: Collection[date] = ()) -> datetime:
    """When (in UTC) a wait of `delay` after the aware moment `at` ends.

    Business days are counted in `zone`: Saturdays, Sundays and `holidays` do not count, and the
    local wall-clock time is kept (09:00 stays 09:00 across a DST change).
    """
    if delay.business_days == 0:  # elapsed time: in UTC, where a day is always 24 h
        return at.astimezone(UTC) + timedelta(seconds=delay.seconds)
    local = at.astimezone(zone)
    day, left = local.date(), delay.business_days
    while left:
        day += timedelta(days=1)
        if day.weekday() not in _WEEKEND and day not in holidays:
            left -= 1
    return _localize(day, local.time().replace(tzinfo=None), zone).astimezone(UTC) + timedelta(
        seconds=delay.seconds
    )


def next_open(window: SendWindow, at: datetime, *, holidays: Collection[date] = ()) -> datetime:
    """The first moment at or after `at` inside `window` (and not on a holiday)."""
    local = at.astimezone(window.zone)
    # A holiday, or a spring-forward gap swallowing the window, may take a whole week off a window of one
    # day: look that far past each.
    for offset in range(15 + 7 * len(holidays)):
        day = local.date() + timedelta(days=offset)
        if day.weekday() not in window.days or day in holidays:
            continue
        opens = _localize(day, window.start, window.zone)
        closes = _localize(day, window.end, window.zone)
        if at < closes and opens < closes:  # a window inside the spring-forward gap is not open that day
            return max(at, opens).astimezone(UTC)
    raise ValueError("the window has no day left open")  # only with holidays on every listed day


def next_delivery(
    at: datetime,
    *,
    window: SendWindow | None,
    deliver_at: time | None = None,
    zone: ZoneInfo | None = None,
    holidays: Collection[date] = (),
) -> datetime:
    """When (in UTC) a message due at `at` may leave: at `deliver_at` local time in `zone` (the
    recipient's) if given, and inside the sender's `window`, skipping `holidays` when there is one.

    The first local `deliver_at` at or after `at` that the window allows; when the window never
    allows that time of day, the window's next opening after it.
    """
    if deliver_at is None or zone is None:
        return at.astimezone(UTC) if window is None else next_open(window, at, holidays=holidays)
    local = at.astimezone(zone)
    for offset in range(15 + 7 * len(holidays)):
        candidate = _localize(local.date() + timedelta(days=offset), deliver_at, zone)
        if candidate < at:
            continue
        if window is None:
            return candidate.astimezone(UTC)
        if window.contains(candidate) and candidate.astimezone(window.zone).date() not in holidays:
            return candidate.astimezone(UTC)
    first = _localize(local.date(), deliver_at, zone)
    return next_open(window, max(first, at), holidays=holidays) if window is not None else first


def finish_within(
    window: SendWindow | None, start: datetime, seconds: float, *, holidays: Collection[date] = ()
) -> datetime:
    """When `seconds` of sending that starts at `start` ends, counting only the time `window` is open."""
    at = start.astimezone(UTC)
    if window is None:
        return at + timedelta(seconds=seconds)
    left = max(0.0, seconds)
    while True:
        at = next_open(window, at, holidays=holidays)
        closes = _localize(at.astimezone(window.zone).date(), window.end, window.zone).astimezone(UTC)
        room = (closes - at).total_seconds()
        if left <= room:
            return at + timedelta(seconds=left)
        left -= room
        at = closes


def _parse_days(text: str, problem: str) -> frozenset[int]:
    days: set[int] = set()
    for part in (piece.strip() for piece in text.split(",")):
        first, _, last = (side.strip()[:3] for side in part.partition("-"))
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(problem)
        start, end = _DAYS.index(first), _DAYS.index(last or first)
        days.update((start + step) % 7 for step in range((end - start) % 7 + 1))
    return frozenset(days)


def _localize(day: date, wall: time, zone: ZoneInfo) -> datetime:
    """`day` at `wall` in `zone`: the first moment the zone's clock reads `wall` that day; for a wall time
    in the spring-forward gap, which the clock never reads, the moment the gap ends (the first one after)."""
    local = datetime.combine(day, wall, tzinfo=zone)
    real = local.astimezone(UTC).astimezone(zone)
    if real.replace(tzinfo=None) == local.replace(tzinfo=None):
        return real
    # In the gap, read with the offset before the change it is an instant after the change, and with the
    # offset after it an instant before: the change lies between, on a whole second.
    before, after = sorted(int(at.timestamp()) for at in (local, local.replace(fold=1)))
    offset = datetime.fromtimestamp(after, zone).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == offset:
            after = middle
        else:
            before = middle
    return datetime.fromtimestamp(after, zone)
