"""Per-sender limits end to end in the engine, on virtual time: Retry-After, quotas, --wait, accuracy."""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_jobs, render_plain, run_inline

from campaign.dispatch import DispatchSettings, dispatch
from campaign.ledger import PlannedRow, open_ledger
from campaign.manifest import SenderSettings
from campaign.models import Address, Message, OutcomeKind, Recipient, SendOutcome
from campaign.nylas import NylasClient
from campaign.plan import Job
from campaign.testing import FakeNylas, Fault
from campaign.testing.clock import FakeClock

pytestmark = pytest.mark.anyio
KEY = "k"


async def _run(tmp_path: Path, fake: FakeNylas, clock: FakeClock, senders, jobs, **kwargs: Any):
    ledger = open_ledger(tmp_path / f"l{len(list(tmp_path.iterdir()))}.sqlite", clock=clock, campaign="t")
    ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.key, j.sender) for j in jobs], []
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fake.app), base_url="http://f.test"
    ) as http:
        client = NylasClient(http, api_key=KEY, clock=clock)
        result = await dispatch(
            jobs,
            senders=senders,
            render=render_plain,
            client=client,
            ledger=ledger,
            clock=clock,
            **{"offload": run_inline, **kwargs},
        )
    return result, ledger


def _fake(clock: FakeClock, *grants: str) -> FakeNylas:
    fake = FakeNylas(api_key=KEY, clock=clock)
    for grant in grants:
        fake.add_grant(grant, f"{grant}@corp.example.com")
    return fake


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


async def test_retry_after_is_honoured(tmp_path):
    """After a 429 with Retry-After: 30 no request reaches that grant for 30 s; then all are sent once."""
    clock = FakeClock()
    fake = _fake(clock, "ga")
    fake.script(Fault.PROVIDER_THROTTLE, grant_id="ga", times=1, retry_after_s=30)
    sender = SenderSettings(name="a", grant_id="ga", per_second=10, concurrency=2)
    result, _ = await _run(tmp_path, fake, clock, [sender], make_jobs(5, "a"))
    assert result.sent == 5
    requests = fake.requests
    refused = next(r for r in requests if r.status == 429)
    later = [
        r.arrived_at_monotonic for r in requests if r.arrived_at_monotonic > refused.arrived_at_monotonic
    ]
    assert later
    assert min(later) >= refused.arrived_at_monotonic + 30
    assert len(fake.deliveries) == 5


async def test_quota_refusal_parks_until_the_time_the_provider_gave(tmp_path):
    """A Gmail 'Retry after <ISO>' quota refusal parks the sender exactly until that time."""
    clock = FakeClock()
    fake = _fake(clock, "ga")
    fake.set_quota("ga", recipients_per_day=3)
    sender = SenderSettings(name="a", grant_id="ga", per_second=10, concurrency=1)
    result, _ = await _run(tmp_path, fake, clock, [sender], make_jobs(5, "a"))
    assert (result.sent, result.remaining) == (3, 2)
    first_delivery = fake.deliveries[0].delivered_at
    assert abs((result.parked["a"] - first_delivery).total_seconds() - 86_400) < 2


@pytest.mark.parametrize("concurrency", [2, 4, 8])
async def test_a_quota_park_stops_every_worker_at_once(tmp_path, concurrency):
    """Quota 3, several workers claiming and waiting for their slots when the refusal parks the sender:
    none of them waits out the provider's day (virtual time), and no request follows the refusals."""
    clock = FakeClock()
    fake = _fake(clock, "ga")
    fake.set_quota("ga", recipients_per_day=3)
    sender = SenderSettings(name="a", grant_id="ga", per_second=2, concurrency=concurrency)
    start = clock.now()

    async def slow_disk(call: Callable[[], Any]) -> Any:  # a claim may end after another worker's refusal
        await clock.sleep(0.2)
        return call()

    result, _ = await _run(tmp_path, fake, clock, [sender], make_jobs(12, "a"), offload=slow_disk)
    assert (result.sent, result.remaining) == (3, 9)
    assert "a" in result.parked
    assert (clock.now() - start).total_seconds() < 60
    assert len(fake.deliveries) == 3
    assert len(fake.requests) <= 3 + concurrency  # a refusal each for the sends already on their way


async def test_wait_sleeps_through_quotas_across_days(tmp_path):
    """With --wait a campaign three times the daily quota finishes in one run, each recipient once."""
    clock = FakeClock()
    fake = _fake(clock, "ga")
    fake.set_quota("ga", recipients_per_day=3)
    sender = SenderSettings(name="a", grant_id="ga", per_second=10, concurrency=2)
    start = clock.now()
    result, _ = await _run(
        tmp_path, fake, clock, [sender], make_jobs(8, "a"), settings=DispatchSettings(wait=True)
    )
    assert (result.sent, result.remaining, dict(result.parked)) == (8, 0, {})
    emails = [d.payload["to"][0]["email"] for d in fake.deliveries]
    assert sorted(emails) == sorted({*emails})
    assert len(emails) == 8
    assert (clock.now() - start).total_seconds() >= 2 * 86_400


async def test_own_daily_budget_with_wait_never_trips_the_provider(tmp_path):
    """per_day below the provider's quota: with --wait the provider never refuses anything."""
    clock = FakeClock()
    fake = _fake(clock, "ga")
    fake.set_quota("ga", recipients_per_day=5)
    sender = SenderSettings(name="a", grant_id="ga", per_second=10, per_day=4, concurrency=2)
    result, _ = await _run(
        tmp_path, fake, clock, [sender], make_jobs(9, "a"), settings=DispatchSettings(wait=True)
    )
    assert result.sent == 9
    assert all(r.status == 200 for r in fake.requests)


async def test_parked_sender_from_an_earlier_run_sends_nothing_before_its_time(tmp_path):
    """A park stored by an earlier run keeps that sender and its pinned rows quiet; the other goes on."""
    clock = FakeClock()
    fake = _fake(clock, "ga", "gb")
    a = SenderSettings(name="a", grant_id="ga", per_second=10)
    b = SenderSettings(name="b", grant_id="gb", per_second=10)
    until = datetime.fromtimestamp(clock.now().timestamp() + 3600, tz=clock.now().tzinfo)
    pinned = [
        Job(Recipient(j.recipient.key, j.recipient.row, j.recipient.address, {}, "a"), "a")
        for j in make_jobs(2, "a")
    ]
    result, _ = await _run(tmp_path, fake, clock, [a, b], pinned + make_jobs(2, "b", 10), parked={"a": until})
    assert result.parked == {"a": until}
    assert {d.grant_id for d in fake.deliveries} == {"gb"}


async def test_domain_sender_sends_through_the_domain_endpoint(tmp_path):
    """A domain sender posts to /v3/domains/{domain}/messages/send with a single `from` object."""
    clock = FakeClock()
    fake = _fake(clock)
    fake.add_domain("mail.example.com")
    sender = SenderSettings(name="app", domain="mail.example.com", email="news@mail.example.com")

    def render(job: Job) -> Message:
        return Message(
            job.recipient.key,
            job.recipient.row,
            job.sender,
            (job.recipient.address,),
            "Hi",
            text="x",
            from_=Address("news@mail.example.com", "News"),
        )

    ledger = open_ledger(tmp_path / "l.sqlite", clock=clock, campaign="t")
    jobs = make_jobs(2, "app")
    ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.key, j.sender) for j in jobs], []
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fake.app), base_url="http://f.test"
    ) as http:
        client = NylasClient(http, api_key=KEY, clock=clock)
        result = await dispatch(
            jobs, senders=[sender], render=render, client=client, ledger=ledger, clock=clock
        )
    assert result.sent == 2
    assert {d.grant_id for d in fake.deliveries} == {"domain:mail.example.com"}
    assert fake.deliveries[0].payload["from"] == [{"email": "news@mail.example.com", "name": "News"}]


async def test_achieved_rate_is_within_two_percent_of_the_configured_rate(tmp_path):
    """50/s for 20 s with 100 ms latency: the fake's arrival log shows 50/s ±2% and no window above 51."""
    clock = FakeClock()
    fake = _fake(clock, "ga")
    fake.latency_s = 0.1
    sender = SenderSettings(name="a", grant_id="ga", per_second=50, concurrency=10)
    result, _ = await _run(tmp_path, fake, clock, [sender], make_jobs(1000, "a"))
    assert result.sent == 1000
    arrivals = sorted(r.arrived_at_monotonic for r in fake.requests)
    achieved = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert achieved == pytest.approx(50, rel=0.02)
    assert _max_in_window(arrivals) <= 50 + 1


class _RandomLatency:
    """A send client whose answers take the given (virtual) times; it records arrivals and overlap."""

    def __init__(self, clock: FakeClock, latencies: list[float]) -> None:
        self._clock, self._latencies = clock, latencies
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def send_message(self, grant_id: str, payload: Any, *, idempotency_key: str) -> SendOutcome:
        self.arrivals.append(self._clock.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._clock.sleep(self._latencies[len(self.arrivals) % len(self._latencies)])
        finally:
            self.in_flight -= 1
        return SendOutcome(OutcomeKind.SENT, status=200, message_id=f"m{len(self.arrivals)}")

    async def send_domain_message(self, domain: str, payload: Any, *, idempotency_key: str) -> SendOutcome:
        raise AssertionError("no domain senders here")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rate=st.sampled_from([1.0, 2.5, 10.0, 40.0]),
    burst=st.integers(1, 4),
    concurrency=st.integers(1, 6),
    count=st.integers(1, 60),
    latencies=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=10),
)
def test_limits_hold_for_random_latencies(tmp_path, rate, burst, concurrency, count, latencies):
    """Whatever the latencies: no window above rate + burst, never more in flight than allowed, all sent."""

    async def scenario() -> None:
        clock = FakeClock()
        client = _RandomLatency(clock, latencies)
        sender = SenderSettings(
            name="a", grant_id="ga", per_second=rate, burst=burst, concurrency=concurrency
        )
        ledger = open_ledger(tmp_path / f"h{uuid.uuid4().hex}.sqlite", clock=clock, campaign="t")
        jobs = make_jobs(count, "a")
        ledger.record_plan(
            [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.key, "a") for j in jobs], []
        )
        result = await dispatch(
            jobs,
            senders=[sender],
            render=render_plain,
            client=client,
            ledger=ledger,
            clock=clock,
            offload=run_inline,
        )
        assert result.sent == count
        assert client.max_in_flight <= concurrency
        assert _max_in_window(client.arrivals) <= rate + burst
        if latencies == [0.0] and count > 1:  # work-conserving: with instant answers, exactly the pace
            assert client.arrivals[-1] - client.arrivals[0] <= max(0, count - burst) / rate + 1e-6

    anyio.run(scenario)
