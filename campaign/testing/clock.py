"""A clock that only moves when told to, for tests that must never sleep.

`FakeClock` satisfies `campaign.clock.Clock`: `sleep` advances time at once and
records how long it was asked to wait, and `advance` moves time forward from the
test. It never reads the real time and never goes back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio.lowlevel

__all__ = ["FakeClock"]

DEFAULT_START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


class FakeClock:
    """A `Clock` whose time is moved by `sleep` and `advance` only."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock start must be timezone-aware")
        self._start = start.astimezone(UTC)
        self._elapsed = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        """Seconds elapsed since the clock was made (starts at 0.0)."""
        return self._elapsed

    def now(self) -> datetime:
        """The start time plus the elapsed seconds, aware UTC."""
        return self._start + timedelta(seconds=self._elapsed)

    async def sleep(self, seconds: float) -> None:
        """Advance by max(0, seconds), record it in `sleeps`, and yield to other tasks."""
        step = max(0.0, float(seconds))
        self.sleeps.append(step)
        self._elapsed += step
        await anyio.lowlevel.checkpoint()

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` (>= 0) without yielding."""
        if seconds < 0:
            raise ValueError("FakeClock cannot go back in time")
        self._elapsed += float(seconds)
