"""Tests of FakeClock: time moves only by sleep and advance, never back, and sleep yields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import anyio
import pytest

from campaign.clock import Clock
from campaign.testing import FakeClock


def test_starts_at_the_default_monday_morning() -> None:
    """A new clock reads 2026-01-05 09:00 UTC and monotonic 0."""
    clock = FakeClock()
    assert clock.now() == datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    assert clock.now().tzinfo is UTC
    assert clock.monotonic() == 0.0


def test_start_is_converted_to_utc_and_must_be_aware() -> None:
    """An aware start in another zone reads back in UTC; a naive one is refused."""
    clock = FakeClock(datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))))
    assert clock.now() == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    assert clock.now().utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeClock(datetime(2026, 1, 1))


def test_advance_moves_both_clocks_and_never_back() -> None:
    """advance() moves monotonic and wall time together; a negative step is an error."""
    clock = FakeClock()
    clock.advance(90.5)
    assert clock.monotonic() == 90.5
    assert clock.now() == datetime(2026, 1, 5, 9, 1, 30, 500000, tzinfo=UTC)
    with pytest.raises(ValueError, match="back"):
        clock.advance(-1)
    assert clock.monotonic() == 90.5


@pytest.mark.anyio
async def test_sleep_advances_and_records() -> None:
    """sleep(s) advances by max(0, s) at once and records each wait in `sleeps`."""
    clock: Clock = FakeClock()
    with anyio.fail_after(1):
        await clock.sleep(3600)
        await clock.sleep(-5)
        await clock.sleep(0.25)
    assert isinstance(clock, FakeClock)
    assert clock.sleeps == [3600, 0.0, 0.25]
    assert clock.monotonic() == 3600.25
    assert clock.now() == datetime(2026, 1, 5, 10, 0, 0, 250000, tzinfo=UTC)


@pytest.mark.anyio
async def test_sleep_yields_to_other_tasks() -> None:
    """sleep(0) is a checkpoint: a task started just before it gets to run."""
    clock = FakeClock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with anyio.create_task_group() as group:
        group.start_soon(other)
        await clock.sleep(0)
        ran.append("after sleep")
    assert ran == ["other", "after sleep"]
