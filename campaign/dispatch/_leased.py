"""Sending as one of several workers: rounds over the grants this worker holds a lease on.

Where several workers share a campaign (a PostgreSQL ledger), each sends only from the grants it
leases (`ledger.GrantLeases`), so that a grant's pace, budget and keys stay with one process. A
worker takes its share of the grants that have work, sends a round from them (the usual loop, with
their lanes only), gives them back, and looks again, until no grant has work. While a round runs,
a heartbeat renews the leases every few seconds; the round is stopped gracefully (no new claim, the
sends in flight settled and recorded) when a lease is lost or cannot be renewed, well before it
could expire, or when the worker holds more than its share because another worker joined. When
every grant with work is another live worker's, it waits and looks again: a dead worker's grants
come free when their leases expire. With --wait, a worker for which no grant has work due now goes
on while work is scheduled for later (a follow-up): it waits for it, looking again meanwhile, so that
it takes over from a worker that dies; it ends once nothing is left. It never prints; time is its
`Clock`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from campaign.clock import Clock
from campaign.dispatch._types import DispatchResult
from campaign.errors import LedgerError
from campaign.ledger import share_of

__all__ = ["Leases", "send_under_leases"]

# The leases are renewed this often (a tenth of their life: 3 s of 30 s), and a worker with no grant
# looks for one again this often.
_HEARTBEATS_PER_LEASE = 10
_LOOKS_PER_LEASE = 15


class Leases(Protocol):
    """One worker's leases on a campaign's grants (`ledger.GrantLeases`), on the event loop."""

    expiry_s: float

    async def join(self) -> None: ...
    async def leave(self) -> None: ...
    async def live_workers(self) -> int: ...
    async def acquire(self, wanted: Sequence[str], share: int) -> tuple[str, ...]: ...
    async def renew(self) -> tuple[str, ...]: ...
    async def release(self, senders: Sequence[str]) -> None: ...
    async def free(self, wanted: Sequence[str]) -> tuple[str, ...]: ...


async def send_under_leases(
    leases: Leases,
    *,
    with_work: Callable[[], Sequence[str]],
    send_round: Callable[[Sequence[str], anyio.Event], Awaitable[DispatchResult]],
    clock: Clock,
    stop: anyio.Event,
    wait_for_work: Callable[[anyio.Event, float], Awaitable[bool]] | None = None,
) -> DispatchResult | None:
    """Send rounds from leased grants until no grant has work that may go now (`with_work`: those
    senders) or `stop` is set; the rounds' results added up (None: no round ran).

    `send_round(senders, round_stop)` sends from `senders` until their work is done or `round_stop` is
    set. `wait_for_work(stop, most_s)` (--wait) is awaited instead of ending when no grant has work that
    may go now: it waits until some comes due, at most `most_s`, and says whether any is left at all
    (False: the worker ends). LedgerError when a lease was lost or could not be kept (its round was
    stopped first)."""
    await leases.join()
    total: DispatchResult | None = None
    look_s = leases.expiry_s / _LOOKS_PER_LEASE
    try:
        while not stop.is_set():
            wanted = await anyio.to_thread.run_sync(with_work)
            if not wanted:
                if wait_for_work is None:
                    break
                # Work due later (a follow-up) is still the campaign's: a worker that waits for it, looking
                # again every lease interval, takes over if the worker holding its grant dies meanwhile. Its
                # heartbeat goes on, as while it waits for a grant: it is live, and counted in the shares.
                await leases.renew()
                if not await wait_for_work(stop, look_s):
                    break
                continue
            workers = await leases.live_workers()
            held = await leases.acquire(wanted, share_of(len(wanted), workers))
            if not held:  # every grant with work is another live worker's
                await clock.wait_for(stop, look_s)
                continue
            result = await _LeasedRound(leases, held, wanted, clock, stop).send(send_round)
            total = result if total is None else total.then(result)
            if result.auth_refused or result.unreachable or result.rejecting or result.limit_reached:
                break  # as one worker would stop: the rest is for another run
            if not (result.sent or result.failed or result.unknown):  # nothing could go: not at once again
                await clock.wait_for(stop, look_s)
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(LedgerError):  # the database is gone: the leases expire by themselves
                await leases.leave()
    return total


class _LeasedRound:
    """One round from the grants `held`, their leases renewed meanwhile and given back after."""

    def __init__(
        self,
        leases: Leases,
        held: Sequence[str],
        wanted: Sequence[str],
        clock: Clock,
        stop: anyio.Event,
    ) -> None:
        self._leases = leases
        self._held = held
        self._wanted = wanted  # the grants with work when the round began
        self._clock = clock
        self._stop = stop
        self._heartbeat_s = leases.expiry_s / _HEARTBEATS_PER_LEASE
        self._renewed_at = clock.monotonic()  # the leases were taken (renewed) just before the round
        self._round_stop = anyio.Event()
        self._lost: str | None = None

    async def send(
        self, send_round: Callable[[Sequence[str], anyio.Event], Awaitable[DispatchResult]]
    ) -> DispatchResult:
        async with anyio.create_task_group() as group:
            group.start_soon(self._keep_leases)
            try:
                result = await send_round(self._held, self._round_stop)
            finally:
                group.cancel_scope.cancel()
        if self._lost is not None:
            message = (
                f"this worker stopped sending from {', '.join(self._held)}: {self._lost}; the sends in "
                "flight keep their idempotency keys, so the grants' next owner mails nobody twice"
            )
            raise LedgerError(message)
        await self._leases.release(self._held)
        return result

    async def _keep_leases(self) -> None:
        """Renew the leases every heartbeat; stop the round (gracefully) when one is lost, when they
        cannot be renewed in time, on a stop request, when a worker joined (this one holds more than
        its share: the grants go back after the round), or when a grant with work came free (its
        worker died or left) while this one holds less than its share: the next round takes it."""
        leases = self._leases
        while True:
            if await self._clock.wait_for(self._stop, self._heartbeat_s):
                break  # Ctrl-C, SIGTERM: the sends in flight finish and are recorded
            started = self._clock.monotonic()
            deadline_s = max(self._heartbeat_s, self._renewed_at + leases.expiry_s / 2 - started)
            try:
                # Well within a lease's expiry: a worker that cannot renew stops claiming once its leases
                # are down to half their life, long before another could take its grants; a renewal that
                # is merely slow (a loaded machine, a busy database) has until then, not one heartbeat.
                # Shielded from the round's end (which cancels this task): a query is cut off by its
                # deadline alone, not half-way because the round is over.
                with (
                    anyio.CancelScope(shield=True),
                    anyio.fail_after(deadline_s),
                ):
                    still = await leases.renew()
                    share = share_of(len(self._wanted), await leases.live_workers())
                    came_free = len(self._held) < share and bool(await leases.free(self._wanted))
            except LedgerError as exc:
                self._lost = f"it cannot renew its leases ({exc})"
                break
            except TimeoutError:
                self._lost = "the database did not answer in time to renew its leases"
                break
            gone = [name for name in self._held if name not in still]
            if gone:
                self._lost = f"its lease on {', '.join(gone)} expired"
                break
            self._renewed_at = started
            if len(self._held) > share or came_free:
                break
        self._round_stop.set()
