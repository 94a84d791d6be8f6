"""The life of the send loop's tasks: a stop request, and the one error a failed task group raises.

`Stopper` wraps the event a caller sets to ask for a stop (Ctrl-C): sleeps wake
at once, and `cancel_after_grace` cancels whatever still runs `grace_s` after the
request. `first_error` picks, from a task group's exceptions, the error to show.
It reads time only through the `Clock` and decides nothing about sending.
"""

from __future__ import annotations

import anyio

from campaign.clock import Clock
from campaign.errors import CampaignError

__all__ = ["Stopper", "first_error"]


class Stopper:
    """A stop request (or none) as the send loop sees it."""

    def __init__(self, event: anyio.Event | None, *, clock: Clock) -> None:
        self._event = event
        self._clock = clock

    @property
    def requested(self) -> bool:
        """A stop was asked for: start no new work."""
        return self._event is not None and self._event.is_set()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the clock, but wake at once when a stop is requested.

        Returns at once when there is nothing to wait for (the send loop asks for a pacing
        wait before every request, most often of a slot that has come); otherwise waits on
        the stop event with the clock's deadline, starting no task of its own.
        """
        if seconds <= 0:
            return
        if self._event is None:
            await self._clock.sleep(seconds)
        elif not self._event.is_set():
            await self._clock.wait_for(self._event, seconds)

    async def cancel_after_grace(self, scope: anyio.CancelScope, grace_s: float) -> None:
        """Once a stop is requested, wait `grace_s` on the clock, then cancel `scope`."""
        if self._event is None:
            return
        await self._event.wait()
        await self._clock.sleep(grace_s)
        scope.cancel()


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to raise for a failed task group: our own error if there is one, else the first."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop(0)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    return next((leaf for leaf in leaves if isinstance(leaf, CampaignError)), leaves[0])
