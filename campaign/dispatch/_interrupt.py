"""Ctrl-C as a graceful stop: the first SIGINT (or SIGTERM) asks the work to stop, a second cancels it.

`run_interruptible` runs `work(stop)` with the signal handlers installed (only in
the main thread; elsewhere signals keep their usual effect) and returns the work's
result with the number of signals received: 0; 1, a graceful stop (`stop` was set
and the work ended by itself); 2, cancelled (no result). It knows nothing of what
the work is, and prints nothing: `on_signal` is told of each signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

from campaign.dispatch._tasks import first_error

__all__ = ["Interruptible", "run_interruptible"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Interruptible(Generic[_T]):
    """The work's result (None when a second signal cancelled it) and how many signals came."""

    result: _T | None
    signals: int


async def run_interruptible(
    work: Callable[[anyio.Event], Awaitable[_T]], *, on_signal: Callable[[int], None]
) -> Interruptible[_T]:
    """Run `work(stop)`: the first SIGINT/SIGTERM sets `stop`, the second cancels the work."""
    stop = anyio.Event()
    received = 0
    result: _T | None = None

    async def watch(scope: anyio.CancelScope, *, task_status: TaskStatus[None]) -> None:
        nonlocal received
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                received += 1
                on_signal(received)
                stop.set()
                if received >= 2:
                    scope.cancel()
                    return

    try:
        async with anyio.create_task_group() as group:
            if threading.current_thread() is threading.main_thread():
                await group.start(watch, group.cancel_scope)
            result = await work(stop)
            group.cancel_scope.cancel()
    except BaseExceptionGroup as failed:
        # The work's own error (e.g. an attachment gone since the plan was checked), as itself:
        # the CLI words it in one line, as it does any CampaignError.
        raise first_error(failed) from None
    return Interruptible(result, received)
