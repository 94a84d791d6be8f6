"""A clock that only moves when told to, for tests that must never sleep.

`FakeClock` satisfies `campaign.clock.Clock`. Time is virtual: a task that sleeps
waits until every task that can run has run, then the earliest sleeper moves time
to its deadline and wakes, so concurrent sleepers wake in deadline order as they
would in real time, but at once; `wait_for` is a sleep that a set event ends early.
`sleeps` records what was asked for; `advance`
moves time forward from the test. It never reads the real time and never goes back.
"""

from __future__ import annotations

import heapq
import itertools
from datetime import UTC, datetime, timedelta

import anyio.lowlevel

__all__ = ["FakeClock"]

DEFAULT_START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
# How many scheduler passes a sleeper lets other tasks run before time may jump:
# enough for tasks woken by I/O or events to reach their own next sleep.
_SETTLE_PASSES = 5


class FakeClock:
    """A `Clock` whose time is moved by `sleep` and `advance` only."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock start must be timezone-aware")
        self._start = start.astimezone(UTC)
        self._elapsed = 0.0
        self._sleepers: list[tuple[float, int]] = []
        self._tickets = itertools.count()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        """Seconds elapsed since the clock was made (starts at 0.0)."""
        return self._elapsed

    def now(self) -> datetime:
        """The start time plus the elapsed seconds, aware UTC."""
        return self._start + timedelta(seconds=self._elapsed)

    async def sleep(self, seconds: float) -> None:
        """Wait max(0, seconds) of virtual time, waking in deadline order with other sleepers."""
        step = max(0.0, float(seconds))
        self.sleeps.append(step)
        ticket = (self._elapsed + step, next(self._tickets))
        heapq.heappush(self._sleepers, ticket)
        try:
            while True:
                for _ in range(_SETTLE_PASSES):
                    await anyio.lowlevel.checkpoint()
                if ticket[0] <= self._elapsed:
                    return
                if self._sleepers[0] == ticket:
                    self._elapsed = ticket[0]
                    return
        finally:
            self._sleepers.remove(ticket)
            heapq.heapify(self._sleepers)

    async def wait_for(self, event: anyio.Event, seconds: float) -> bool:
        """Like `sleep`, but return at once (time unmoved) when `event` is set; True when it was."""
        step = max(0.0, float(seconds))
        self.sleeps.append(step)
        ticket = (self._elapsed + step, next(self._tickets))
        heapq.heappush(self._sleepers, ticket)
        try:
            while not event.is_set():
                for _ in range(_SETTLE_PASSES):
                    await anyio.lowlevel.checkpoint()
                if event.is_set() or ticket[0] <= self._elapsed:
                    break
                if self._sleepers[0] == ticket:
                    self._elapsed = ticket[0]
                    break
            return event.is_set()
        finally:
            self._sleepers.remove(ticket)
            heapq.heapify(self._sleepers)

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` (>= 0) without yielding."""
        if seconds < 0:
            raise ValueError("FakeClock cannot go back in time")
        self._elapsed += float(seconds)
