"""The send loop: one lane per sender, each with its limits, claiming, sending and recording.

For every message: check the sender's budgets, mark the row in flight in the
ledger (with its idempotency key), wait for the sender's next slot, send, record
the outcome. The per-sender limits live in `campaign.lane`. It sees the API
client and the ledger through protocols, reads time only through its `Clock`,
and reports progress as `DispatchEvent`s; it never prints.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from campaign.clock import Clock
from campaign.lane import Lane, open_lane
from campaign.ledger import Claim
from campaign.manifest import SenderSettings
from campaign.models import Message, OutcomeKind, RowState, SendOutcome, ThrottleKind
from campaign.nylas import SendClient
from campaign.payload import build_send_payload
from campaign.plan import Job

__all__ = [
    "DispatchEvent",
    "DispatchResult",
    "DispatchSettings",
    "EventKind",
    "Offload",
    "ProgressLedger",
    "build_thread_offload",
    "dispatch",
]

_T = TypeVar("_T")


class Offload(Protocol):
    """Runs a blocking call (a ledger write) so that the event loop does not wait on it."""

    async def __call__(self, call: Callable[[], _T]) -> _T: ...


def build_thread_offload() -> Offload:
    """The default: one worker thread at a time, so the ledger is never written from two threads at once."""
    limiter = anyio.CapacityLimiter(1)

    async def offload(call: Callable[[], _T]) -> _T:
        return await anyio.to_thread.run_sync(call, limiter=limiter)

    return offload


class ProgressLedger(Protocol):
    """What the engine needs from the ledger."""

    def claim(self, key: str) -> Claim: ...

    def record_outcome(
        self, key: str, outcome: SendOutcome, *, sender: str, recipients: int = 1
    ) -> RowState: ...

    def release(self, key: str) -> None: ...

    def record_unknown(self, key: str) -> None: ...


class EventKind(StrEnum):
    """What a `DispatchEvent` reports."""

    SENT = "sent"
    FAILED = "failed"
    THROTTLED = "throttled"
    RETRYING = "retrying"
    UNKNOWN = "unknown"
    PARKED = "parked"
    RESUMED = "resumed"
    AUTH_REFUSED = "auth_refused"


@dataclass(frozen=True, slots=True)
class DispatchEvent:
    """Something that happened to one send or one sender."""

    kind: EventKind
    sender: str
    key: str | None = None
    email: str | None = None
    outcome: SendOutcome | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Knobs of the send loop; the defaults suit real mailboxes."""

    limit: int | None = None  # at most this many sends this run
    ambiguous_retries: int = 3  # same-key retries after a timeout / 5xx before the row is `unknown`
    retry_base_s: float = 2.0  # first backoff; doubles each time, with jitter
    retry_max_s: float = 120.0
    park_after_s: float = 900.0  # a throttle asking for a longer wait parks the sender for the run
    park_after_throttles: int = 8  # consecutive throttles with no send in between park the sender
    wait: bool = False  # sleep through parks (quota, long throttles) instead of stopping with them


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """What a dispatch run came to."""

    sent: int
    failed: int
    unknown: int
    remaining: int
    parked: Mapping[str, datetime] = field(default_factory=dict)
    auth_refused: tuple[str, ...] = ()
    limit_reached: bool = False


async def dispatch(
    jobs: Sequence[Job],
    *,
    senders: Sequence[SenderSettings],
    render: Callable[[Job], Message],
    client: SendClient,
    ledger: ProgressLedger,
    clock: Clock,
    history: Mapping[str, Sequence[tuple[float, int]]] | None = None,
    parked: Mapping[str, datetime] | None = None,
    on_event: Callable[[DispatchEvent], None] = lambda _event: None,
    settings: DispatchSettings | None = None,
    offload: Offload | None = None,
) -> DispatchResult:
    """Send every job under its sender's limits; return what was done and what is left.

    `history` holds each sender's earlier sends (Unix time, recipients) for its rolling
    budgets; `parked` the senders that must not send before a time (from an earlier run);
    `offload` runs the ledger's blocking writes (a worker thread unless told otherwise).
    """
    lanes = {
        sender.name: open_lane(sender, history=(history or {}).get(sender.name, ())) for sender in senders
    }
    now = clock.now()
    for name, until in (parked or {}).items():
        if name in lanes and until > now:
            lanes[name].parked_until = until
    for job in jobs:
        lanes[job.sender].jobs.append(job)
    loop = _Loop(
        render=render,
        client=client,
        ledger=ledger,
        clock=clock,
        on_event=on_event,
        settings=settings or DispatchSettings(),
        offload=offload or build_thread_offload(),
    )
    return await loop.run(lanes)


class _Loop:
    def __init__(
        self,
        *,
        render: Callable[[Job], Message],
        client: SendClient,
        ledger: ProgressLedger,
        clock: Clock,
        on_event: Callable[[DispatchEvent], None],
        settings: DispatchSettings,
        offload: Offload,
    ) -> None:
        self._render = render
        self._client = client
        self._ledger = ledger
        self._clock = clock
        self._emit = on_event
        self._settings = settings
        self._started = 0
        self._counts = {RowState.SENT: 0, RowState.FAILED: 0, RowState.UNKNOWN: 0}
        self._limit_reached = False
        self._in_thread = offload
        self._random = random.Random()

    async def run(self, lanes: Mapping[str, Lane]) -> DispatchResult:
        for lane in lanes.values():
            if lane.parked_until is not None and lane.jobs:
                self._emit(DispatchEvent(EventKind.PARKED, lane.sender.name, until=lane.parked_until))
        async with anyio.create_task_group() as group:
            for lane in lanes.values():
                for _ in range(min(lane.sender.concurrency, len(lane.jobs))):
                    group.start_soon(self._work, lane)
        return DispatchResult(
            sent=self._counts[RowState.SENT],
            failed=self._counts[RowState.FAILED],
            unknown=self._counts[RowState.UNKNOWN],
            remaining=sum(len(lane.jobs) for lane in lanes.values()),
            parked={
                name: lane.parked_until
                for name, lane in lanes.items()
                if lane.parked_until is not None and lane.jobs
            },
            auth_refused=tuple(name for name, lane in lanes.items() if lane.auth_refused),
            limit_reached=self._limit_reached,
        )

    async def _work(self, lane: Lane) -> None:
        while lane.jobs and not lane.auth_refused:
            if lane.parked_until is not None:
                if not self._settings.wait:
                    return
                await self._wait_out_park(lane, lane.parked_until)
                continue
            if self._settings.limit is not None and self._started >= self._settings.limit:
                self._limit_reached = True
                return
            job = lane.jobs.popleft()
            message = self._render(job)
            wall = self._clock.now().timestamp()
            frees_at = lane.budget_frees_at(wall, message.recipient_count)
            if frees_at is not None:
                lane.jobs.appendleft(job)
                self._park(lane, self._clock.now() + timedelta(seconds=frees_at - wall))
                continue
            self._started += 1
            lane.book(wall, message.recipient_count)
            state = await self._send(lane, job, message)
            if state == RowState.PENDING:  # not sent: it goes back to the front of the queue
                self._started -= 1
                lane.release(wall, message.recipient_count)
                lane.jobs.appendleft(job)

    async def _wait_out_park(self, lane: Lane, until: datetime) -> None:
        """--wait: sleep until the park ends (the first worker to wake lifts it)."""
        await self._clock.sleep((until - self._clock.now()).total_seconds())
        if lane.parked_until == until:
            lane.parked_until = None
            self._emit(DispatchEvent(EventKind.RESUMED, lane.sender.name))

    async def _wait_for_slot(self, lane: Lane) -> None:
        # Nothing may await between the end of this wait and the request, or sends
        # could bunch up behind a slow step; so the ledger claim comes before it.
        # A throttle that arrives meanwhile moves the hold: then wait again.
        while True:
            start = lane.reserve(self._clock.monotonic())
            await self._clock.sleep(start - self._clock.monotonic())
            if self._clock.monotonic() >= lane.hold_until or lane.stopped:
                return

    async def _send(self, lane: Lane, job: Job, message: Message) -> RowState:
        """Send one message until its outcome is settled for this run; return the row's state."""
        key = job.recipient.key
        payload = build_send_payload(message)
        claim = await self._in_thread(partial(self._ledger.claim, key))
        await self._wait_for_slot(lane)
        if lane.stopped:  # parked or refused while this worker waited: its request never left
            await self._in_thread(partial(self._ledger.release, key))
            return RowState.PENDING
        retries = 0
        while True:
            outcome = await self._post(lane.sender, payload, claim.idempotency_key)
            state = await self._in_thread(
                partial(
                    self._ledger.record_outcome,
                    key,
                    outcome,
                    sender=lane.sender.name,
                    recipients=message.recipient_count,
                )
            )
            if state != RowState.INFLIGHT:
                break
            # Ambiguous (timeout, reset, 5xx) or still in progress: the same key again,
            # so that Nylas replays the first answer instead of sending twice.
            if retries >= self._settings.ambiguous_retries:
                await self._in_thread(partial(self._ledger.record_unknown, key))
                self._counts[RowState.UNKNOWN] += 1
                self._emit(
                    DispatchEvent(
                        EventKind.UNKNOWN, lane.sender.name, key, job.recipient.address.email, outcome
                    )
                )
                return RowState.UNKNOWN
            retries += 1
            self._emit(
                DispatchEvent(EventKind.RETRYING, lane.sender.name, key, job.recipient.address.email, outcome)
            )
            await self._clock.sleep(self._backoff(retries))
            await self._wait_for_slot(lane)
        self._after(lane, job, outcome, state)
        return state

    async def _post(self, sender: SenderSettings, payload: Mapping[str, Any], key: str) -> SendOutcome:
        if sender.domain is not None:
            return await self._client.send_domain_message(sender.domain, payload, idempotency_key=key)
        assert sender.grant_id is not None  # the manifest requires one of the two
        return await self._client.send_message(sender.grant_id, payload, idempotency_key=key)

    def _after(self, lane: Lane, job: Job, outcome: SendOutcome, state: RowState) -> None:
        name, key, email = lane.sender.name, job.recipient.key, job.recipient.address.email
        if state == RowState.SENT:
            lane.record_sent()
            self._counts[RowState.SENT] += 1
            self._emit(DispatchEvent(EventKind.SENT, name, key, email, outcome))
        elif state == RowState.FAILED:
            self._counts[RowState.FAILED] += 1
            self._emit(DispatchEvent(EventKind.FAILED, name, key, email, outcome))
        elif outcome.kind == OutcomeKind.AUTH_REFUSED:
            lane.auth_refused = True
            self._emit(DispatchEvent(EventKind.AUTH_REFUSED, name, key, email, outcome))
        elif outcome.kind == OutcomeKind.THROTTLED:
            self._throttled(lane, outcome)
            self._emit(DispatchEvent(EventKind.THROTTLED, name, key, email, outcome))

    def _throttled(self, lane: Lane, outcome: SendOutcome) -> None:
        now = self._clock.now()
        if outcome.retry_at is not None:
            wait_s = max(0.0, (outcome.retry_at - now).total_seconds())
        else:
            wait_s = self._backoff(lane.throttles + 1)
        lane.record_throttle(mono=self._clock.monotonic(), wait_s=wait_s)
        if (
            outcome.throttle == ThrottleKind.QUOTA
            or wait_s > self._settings.park_after_s
            or lane.throttles >= self._settings.park_after_throttles
        ):
            self._park(lane, now + timedelta(seconds=wait_s))

    def _park(self, lane: Lane, until: datetime) -> None:
        if lane.parked_until is None:
            lane.parked_until = until
            self._emit(DispatchEvent(EventKind.PARKED, lane.sender.name, until=until))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._settings.retry_max_s, self._settings.retry_base_s * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + self._random.random() / 2)  # jitter: between half and all of it
