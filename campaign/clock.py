"""The one place that reads time or sleeps.

Everything that waits or stamps is handed a `Clock`; tests hand it
`campaign.testing.FakeClock` so that no test sleeps.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Time as the rest of the code sees it."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (at least zero) and yield to other tasks."""
        ...

    async def wait_for(self, event: anyio.Event, seconds: float) -> bool:
        """Wait until `event` is set or `seconds` have passed; True when the event was set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """Seconds from `time.monotonic`."""
        return time.monotonic()

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        """Sleep on the running event loop."""
        await anyio.sleep(max(0.0, seconds))

    async def wait_for(self, event: anyio.Event, seconds: float) -> bool:
        """Wait on the running event loop for `event`, at most `seconds`."""
        with anyio.move_on_after(max(0.0, seconds)):
            await event.wait()
        return event.is_set()
