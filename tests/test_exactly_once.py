"""The send loop's exactly-once discipline against the in-process fake Nylas on virtual time.

Claims on disk before requests leave, group commit, replays, 409 in progress, keys too old
to reuse, and the graceful stop (first Ctrl-C) with its grace period; on both ledgers (SQLite and
PostgreSQL: the `ledgers` fixture).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from support import make_jobs, render_plain, run_inline

from campaign.dispatch import DispatchEvent, DispatchSettings, EventKind, dispatch
from campaign.ledger import Ledger, PlannedRow
from campaign.ledger._ledger import KEY_REUSE_S
from campaign.manifest import SenderSettings
from campaign.models import OutcomeKind, RowState, SendOutcome
from campaign.nylas import NylasClient, build_send_payload
from campaign.plan import Job
from campaign.reconcile import reconcile_unknown
from campaign.testing import FakeNylas, Fault
from campaign.testing.clock import FakeClock

if TYPE_CHECKING:
    from postgres import Ledgers

pytestmark = pytest.mark.anyio
KEY = "test-key"

# The in-process fake lists a message as soon as it is sent: no settle time is needed here.
NO_SETTLE_TIME = timedelta(0)


def _sender(name: str = "a", **limits: Any) -> SenderSettings:
    limits = {"per_second": 10, "concurrency": 1, **limits}
    return SenderSettings(name=name, grant_id=f"grant-{name}", email=f"{name}@corp.example.com", **limits)


class _World:
    """A fake Nylas, a ledger and a clock; `run` is one campaign run (a resume is another `run`)."""

    def __init__(self, ledgers: Ledgers, senders: list[SenderSettings]) -> None:
        self.clock = FakeClock()
        self.fake = FakeNylas(api_key=KEY, clock=self.clock)
        for sender in senders:
            self.fake.add_grant(sender.grant_id or "", sender.email or "")
        self.senders = senders
        self.ledger: Ledger = ledgers.open("test", clock=self.clock)
        self.events: list[DispatchEvent] = []

    def plan(self, jobs: list[Job]) -> None:
        self.ledger.record_plan(
            [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.key, j.sender) for j in jobs], []
        )

    async def run(self, jobs: list[Job], *, wrap: Callable[[NylasClient], Any] | None = None, **kwargs: Any):
        self.plan(jobs)
        open_rows = {r.key for r in self.ledger.rows(states=(RowState.PENDING, RowState.INFLIGHT))}
        kwargs.setdefault("offload", run_inline)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.fake.app), base_url="http://f"
        ) as http:
            client = NylasClient(http, api_key=KEY, clock=self.clock)
            return await dispatch(
                [j for j in jobs if j.recipient.key in open_rows],
                senders=self.senders,
                render=render_plain,
                client=wrap(client) if wrap else client,
                ledger=self.ledger,
                clock=self.clock,
                on_event=self.events.append,
                **kwargs,
            )

    async def reconcile(self):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.fake.app), base_url="http://f"
        ) as http:
            client = NylasClient(http, api_key=KEY, clock=self.clock)
            return await reconcile_unknown(
                self.ledger,
                campaign="test",
                senders=self.senders,
                client=client,
                clock=self.clock,
                min_age=NO_SETTLE_TIME,
            )

    def states(self) -> dict[str, RowState]:
        return {row.key: row.state for row in self.ledger.rows()}

    def delivered(self) -> list[str]:
        return [d.payload["to"][0]["email"] for d in self.fake.deliveries]


class _Spy:
    """Wraps the client; `before_send` runs right before each request leaves."""

    def __init__(self, client: NylasClient, before_send: Callable[[str], None]) -> None:
        self._client = client
        self._before = before_send

    async def send_message(self, grant_id: str, payload: Any, *, idempotency_key: str):
        self._before(idempotency_key)
        return await self._client.send_message(grant_id, payload, idempotency_key=idempotency_key)


async def test_every_row_is_inflight_on_disk_before_its_request_leaves_and_writes_are_batched(ledgers):
    """Another connection sees each row in flight with the request's key when it leaves; commits < writes."""
    world = _World(ledgers, [_sender("a", per_second=200, concurrency=4), _sender("b", concurrency=3)])
    seen: list[list[str]] = []

    def check_on_disk(key: str) -> None:
        seen.append([state for state, _ in ledgers.rows_elsewhere("test", "idempotency_key", key)])

    jobs = make_jobs(12, "a") + make_jobs(6, "b", start=50)
    world.plan(jobs)
    before = world.ledger.commits
    # The real thread offload, as in production.
    result = await world.run(jobs, wrap=lambda c: _Spy(c, check_on_disk), offload=None)
    assert result.sent == 18
    assert seen == [["inflight"]] * 18  # the request's key, on exactly one row, in flight
    writes = 2 * 18  # a claim and an outcome per message
    assert world.ledger.commits - before - 1 < writes  # (the plan is one more commit)
    assert sorted(world.delivered()) == sorted({*world.delivered()})


async def test_a_replayed_5xx_makes_the_row_unknown_and_reconcile_requeues_it(ledgers):
    """500 (cached, not sent) replayed on the same-key retry: unknown at once; reconcile re-queues it."""
    world = _World(ledgers, [_sender()])
    world.fake.script(Fault.INTERNAL_ERROR, times=1)
    result = await world.run(make_jobs(1))
    requests = world.fake.requests
    assert [(r.status, r.replayed) for r in requests] == [(500, False), (500, True)]
    assert requests[0].idempotency_key == requests[1].idempotency_key
    assert result.unknown == 1
    row = world.ledger.row("r1@example.com")
    assert (row.state, row.replayed, row.error_status) == (RowState.UNKNOWN, True, 500)
    found = await world.reconcile()
    assert [d.verdict for d in found.decisions] == ["pending"]
    await world.run(make_jobs(1))
    assert world.delivered() == ["r1@example.com"]
    assert world.fake.deliveries[0].idempotency_key != requests[0].idempotency_key
    assert world.states() == {"r1@example.com": RowState.SENT}


async def test_a_504_after_the_provider_sent_is_settled_by_reconcile_as_sent(ledgers):
    """Delivered but answered 504: unknown after the replay; reconcile finds it by metadata; never re-sent."""
    world = _World(ledgers, [_sender()])
    world.fake.script(Fault.TIMEOUT_AFTER_SEND, times=1)
    await world.run(make_jobs(2))
    assert world.states()["r1@example.com"] == RowState.UNKNOWN
    found = await world.reconcile()
    assert [(d.key, d.verdict) for d in found.decisions] == [("r1@example.com", "sent")]
    row = world.ledger.row("r1@example.com")
    assert (row.state, row.message_id) == (RowState.SENT, world.fake.deliveries[0].id)
    before = len(world.fake.requests)
    await world.run(make_jobs(2))
    assert len(world.fake.requests) == before
    assert sorted(world.delivered()) == ["r1@example.com", "r2@example.com"]


class _FirstTimesOut:
    """The first request goes on at the server in the background while the caller sees a timeout."""

    def __init__(self, client: NylasClient, group: anyio.abc.TaskGroup) -> None:
        self._client = client
        self._group = group
        self._fired = False

    async def send_message(self, grant_id: str, payload: Mapping[str, Any], *, idempotency_key: str):
        send = partial(self._client.send_message, grant_id, payload, idempotency_key=idempotency_key)
        if self._fired:
            return await send()
        self._fired = True
        self._group.start_soon(send)
        return SendOutcome(OutcomeKind.AMBIGUOUS, error_type="timeout", error_message="no answer in time")


class _Hangs:
    """The first request reaches the server (which delivers it), but its answer never comes back."""

    def __init__(
        self, client: NylasClient, *, group: anyio.abc.TaskGroup, clock: FakeClock, stop: anyio.Event
    ):
        self._client = client
        self._group = group
        self._clock = clock
        self._stop = stop
        self._fired = False

    async def send_message(self, grant_id: str, payload: Any, *, idempotency_key: str):
        send = partial(self._client.send_message, grant_id, payload, idempotency_key=idempotency_key)
        if self._fired:
            return await send()
        self._fired = True
        self._group.start_soon(send)
        self._stop.set()  # Ctrl-C while this request hangs
        await self._clock.sleep(1000)
        raise AssertionError("the grace period should have ended this request")


async def test_409_in_progress_is_waited_out_with_the_same_key_apart_from_ambiguous_retries(ledgers):
    """Client timeout while Nylas still works: 409s are waited out, then the replayed 200 settles it once."""
    world = _World(ledgers, [_sender()])
    world.fake.script(Fault.SLOW, times=1, delay_s=20)
    settings = DispatchSettings(ambiguous_retries=1, in_progress_wait_s=3, in_progress_retries=20)
    async with anyio.create_task_group() as group:
        result = await world.run(make_jobs(1), wrap=lambda c: _FirstTimesOut(c, group), settings=settings)
    statuses = [r.status for r in world.fake.requests]
    assert statuses.count(409) >= 3  # more than the one ambiguous retry allowed: counted apart
    assert len({r.idempotency_key for r in world.fake.requests}) == 1
    assert result.sent == 1
    assert world.delivered() == ["r1@example.com"]
    assert world.ledger.row("r1@example.com").replayed is True


async def test_endless_409s_end_unknown_after_the_bounded_waits(ledgers):
    """409 in progress forever: after in_progress_retries waits the row is unknown, not retried forever."""
    world = _World(ledgers, [_sender()])
    world.fake.script(Fault.SLOW, times=1, delay_s=10_000)
    settings = DispatchSettings(in_progress_wait_s=3, in_progress_retries=4)
    async with anyio.create_task_group() as group:
        result = await world.run(make_jobs(1), wrap=lambda c: _FirstTimesOut(c, group), settings=settings)
        group.cancel_scope.cancel()
    assert result.unknown == 1
    assert [r.status for r in world.fake.requests].count(409) == 5  # the first wait and 4 more


async def test_a_gateway_429_on_a_resumed_row_never_leads_to_a_second_copy(ledgers):
    """Delivered, then killed before recording; on resume Nylas's own 429 refuses the same-key re-send.

    Found by the interleaving test: a new key after that 429 would have mailed the recipient twice.
    """
    world = _World(ledgers, [_sender()])
    world.plan(make_jobs(1))
    claim = world.ledger.claim("r1@example.com")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=world.fake.app), base_url="http://f"
    ) as http:
        client = NylasClient(http, api_key=KEY, clock=world.clock)
        request = build_send_payload(render_plain(make_jobs(1)[0]))
        await client.send_message("grant-a", request, idempotency_key=claim.idempotency_key)  # then: kill -9
    world.fake.script(Fault.NYLAS_RATE_LIMIT, times=1)
    result = await world.run(make_jobs(1))
    assert result.sent == 1
    assert world.delivered() == ["r1@example.com"]
    assert {r.idempotency_key for r in world.fake.requests} == {claim.idempotency_key}
    assert world.ledger.row("r1@example.com").replayed is True


async def test_a_key_too_old_to_reuse_is_never_sent_again(ledgers):
    """An in-flight row whose key is near the end of the 1 h window becomes unknown with no request."""
    world = _World(ledgers, [_sender()])
    world.plan(make_jobs(1))
    world.ledger.claim("r1@example.com")  # a crash right after this claim
    world.clock.advance(KEY_REUSE_S + 1)
    result = await world.run(make_jobs(1))
    assert (result.unknown, world.fake.requests) == (1, [])
    assert "replay window" in (world.ledger.row("r1@example.com").note or "")


async def test_a_row_from_an_earlier_run_stays_in_flight_when_its_sender_parks(ledgers):
    """A re-claimed row whose request never left this run keeps its state and key (it may have gone out)."""
    world = _World(ledgers, [_sender(per_second=1, concurrency=2)])
    world.plan(make_jobs(2))
    old = world.ledger.claim("r2@example.com")  # left in flight by a crash
    world.fake.script(Fault.QUOTA_EXCEEDED, times=1)  # the first request parks the sender
    result = await world.run(make_jobs(2))
    assert "a" in result.parked
    row = world.ledger.row("r2@example.com")
    assert (row.state, row.idempotency_key) == (RowState.INFLIGHT, old.idempotency_key)
    assert all(r.idempotency_key != old.idempotency_key for r in world.fake.requests)


async def test_a_stop_starts_nothing_new_and_records_the_sends_in_flight(ledgers):
    """After the stop no request starts; those in flight finish and are recorded; the rest stay pending."""
    world = _World(ledgers, [_sender(per_second=100, concurrency=3)])
    world.fake.latency_s = 1.0
    stop = anyio.Event()

    def on_event(event: DispatchEvent) -> None:
        world.events.append(event)
        if event.kind == EventKind.SENT:
            stop.set()

    jobs = make_jobs(12)
    world.plan(jobs)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=world.fake.app), base_url="http://f"
    ) as http:
        result = await dispatch(
            jobs,
            senders=world.senders,
            render=render_plain,
            client=NylasClient(http, api_key=KEY, clock=world.clock),
            ledger=world.ledger,
            clock=world.clock,
            on_event=on_event,
            offload=run_inline,
            stop=stop,
        )
    counts = world.ledger.counts()
    assert result.stopped
    assert 0 < result.sent < 12  # the stop came mid-run: some were sent, not all
    assert counts[RowState.INFLIGHT] == 0
    assert counts[RowState.SENT] == len(world.delivered()) == len(world.fake.requests) == result.sent
    assert counts[RowState.PENDING] == 12 - result.sent == result.remaining


async def test_a_send_that_outlasts_the_grace_is_left_in_flight_and_resume_settles_it_once(ledgers):
    """Stop while a slow request runs: abandoned in flight after the grace; resume's replay settles it."""
    world = _World(ledgers, [_sender()])
    stop = anyio.Event()
    settings = DispatchSettings(stop_grace_s=5)
    async with anyio.create_task_group() as group:
        hang = partial(_Hangs, group=group, clock=world.clock, stop=stop)
        result = await world.run(make_jobs(3), wrap=hang, stop=stop, settings=settings)
    assert (result.stopped, result.left_inflight) == (True, 1)
    assert world.clock.monotonic() < 100  # abandoned after the grace, not after the hang
    assert world.states()["r1@example.com"] == RowState.INFLIGHT
    assert world.states()["r2@example.com"] == RowState.PENDING
    await world.run(make_jobs(3))
    assert sorted(world.delivered()) == ["r1@example.com", "r2@example.com", "r3@example.com"]
    assert world.ledger.row("r1@example.com").replayed is True
    assert set(world.states().values()) == {RowState.SENT}
