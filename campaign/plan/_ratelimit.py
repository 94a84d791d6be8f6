"""Per-sender limits as pure arithmetic: a pace (token bucket) and a rolling daily budget.

Nothing here reads time or sleeps: callers pass the current time and sleep
until the time they are given. Slots are *booked* (GCRA), so concurrent
workers asking at the same moment get successive slots and never overshoot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = [
    "DAY_S",
    "JSON_PACE_CEILING",
    "NYLAS_JSON_PER_SECOND",
    "NYLAS_MULTIPART_PER_SECOND",
    "DailyBudget",
    "Pace",
]

DAY_S = 86_400.0
# Nylas's own ceiling per grant (reference/nylas-api.md §3.4); never exceeded whatever the manifest says.
NYLAS_JSON_PER_SECOND = 200.0
NYLAS_MULTIPART_PER_SECOND = 10.0
# A pace right at the JSON ceiling still draws 429s: Nylas counts sends as they arrive, in a strict
# 1-second window, and a pause on either side (a GC, a busy event loop) bunches arrivals. So a
# sender asking for the ceiling is paced 5% under it (benchmarks/ send case: ~50 429s a run at 200/s,
# none at 190/s).
JSON_PACE_CEILING = 0.95 * NYLAS_JSON_PER_SECOND


class Pace:
    """A token bucket of `rate_per_s` with `burst` tokens, as a generic cell rate algorithm.

    With `burst = 1` the sends are spaced exactly 1/rate apart, so no one-second
    window holds more than about `rate` sends, which is how providers count. A one-second window
    holds at most `rate + burst`, so the burst is cut to keep that under Nylas's ceiling too.
    """

    __slots__ = ("_interval", "_tat", "_tolerance")

    def __init__(self, rate_per_s: float, *, burst: int = 1) -> None:
        rate = min(rate_per_s, JSON_PACE_CEILING)
        if rate <= 0 or burst < 1:
            message = f"a pace needs a positive rate and burst >= 1, not {rate_per_s}/s, burst {burst}"
            raise ValueError(message)
        burst = min(burst, max(1, int(JSON_PACE_CEILING - rate)))
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._tat = float("-inf")  # theoretical arrival time of the next send

    @property
    def interval_s(self) -> float:
        """Seconds between sends at the sustained rate."""
        return self._interval

    def reserve(self, now: float) -> float:
        """Book the next slot at or after `now`; return the time at which that send may start."""
        tat = max(self._tat, now)
        start = max(now, tat - self._tolerance)
        self._tat = tat + self._interval
        return start

    def set_rate(self, rate_per_s: float) -> None:
        """Change the sustained rate from now on (slots already booked stay booked)."""
        rate = min(rate_per_s, JSON_PACE_CEILING)
        if rate <= 0:
            message = f"a pace needs a positive rate, not {rate_per_s}/s"
            raise ValueError(message)
        burst = round(self._tolerance / self._interval) + 1
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval

    def spend(self, now: float) -> None:
        """Start as if the bucket had just been emptied at `now` (another process may have sent a moment
        ago): the next send waits one interval more than a full burst."""
        self._tat = max(self._tat, now + self._tolerance + self._interval)

    def delay(self, until: float) -> None:
        """Push the next free slot to at least `until` (after a throttle)."""
        self._tat = max(self._tat, until)


class DailyBudget:
    """Recipients a sender may still mail in any rolling 24 h, given what it already sent."""

    __slots__ = ("_limit", "_sends", "_used")

    def __init__(self, limit: int | None, *, history: Iterable[tuple[float, int]] = ()) -> None:
        self._limit = limit
        self._sends: deque[tuple[float, int]] = deque(history)
        self._used = sum(count for _, count in self._sends)

    @property
    def limit(self) -> int | None:
        """The daily limit, or None when there is none."""
        return self._limit

    def available(self, now: float) -> int | None:
        """Recipients that may be mailed now (None: no limit)."""
        self._expire(now)
        return None if self._limit is None else max(0, self._limit - self._used)

    def allows(self, now: float, recipients: int) -> bool:
        """Whether a message to `recipients` fits in the budget now."""
        left = self.available(now)
        return left is None or left >= recipients

    def book(self, now: float, recipients: int) -> None:
        """Count a send (booked before the request leaves, so parallel sends cannot overshoot)."""
        self._sends.append((now, recipients))
        self._used += recipients

    def release(self, at: float, recipients: int) -> None:
        """Undo a booking whose message was definitely not sent."""
        try:
            self._sends.remove((at, recipients))
        except ValueError:
            return
        self._used -= recipients

    def frees_at(self, now: float, recipients: int) -> float:
        """The earliest time at which `recipients` fit again (now, if they already do)."""
        self._expire(now)
        if self._limit is None or self._limit - self._used >= recipients:
            return now
        needed = self._used + recipients - self._limit
        freed = 0
        for at, count in self._sends:
            freed += count
            if freed >= needed:
                return at + DAY_S
        return now + DAY_S  # a single message larger than the whole budget: never fits; say tomorrow

    def _expire(self, now: float) -> None:
        while self._sends and self._sends[0][0] <= now - DAY_S:
            _, count = self._sends.popleft()
            self._used -= count
