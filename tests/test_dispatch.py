"""The send loop against the in-process fake Nylas: exactly once, limits, throttles, faults."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import make_jobs, render_plain

from campaign.collector import YOUNG_THRESHOLD
from campaign.dispatch import DispatchEvent, DispatchSettings, EventKind, dispatch
from campaign.ledger import Ledger, PlannedRow, open_ledger
from campaign.manifest import SenderSettings
from campaign.models import Message, RowState, SendOutcome, SkipReason
from campaign.nylas import NylasClient, build_send_request
from campaign.plan import Job
from campaign.testing import FakeNylas, Fault
from campaign.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

KEY = "test-key"


def _sender(name: str, **limits: Any) -> SenderSettings:
    return SenderSettings(name=name, grant_id=f"grant-{name}", email=f"{name}@corp.example.com", **limits)


class _Harness:
    def __init__(
        self, tmp_path: Path, senders: list[SenderSettings], *, start: datetime | None = None
    ) -> None:
        self.clock = FakeClock() if start is None else FakeClock(start=start)
        self.fake = FakeNylas(api_key=KEY, clock=self.clock)
        for sender in senders:
            self.fake.add_grant(sender.grant_id, sender.email or "")
        self.senders = senders
        self.ledger: Ledger = open_ledger(tmp_path / "l.sqlite", clock=self.clock, campaign="test")
        self.events: list[DispatchEvent] = []
        self.in_flight = 0
        self.max_in_flight: dict[str, int] = {}
        self.send_times: dict[str, list[float]] = {}

    async def run(self, jobs: list[Job], render: Callable[[Job], Message] = render_plain, **kwargs: Any):
        self.ledger.record_plan(
            [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, j.sender) for j in jobs],
            [],
        )
        transport = httpx.ASGITransport(app=self.fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake.test") as http:
            client = _Watching(NylasClient(http, api_key=KEY, clock=self.clock), self)
            return await dispatch(
                jobs,
                senders=self.senders,
                render=render,
                client=client,
                ledger=self.ledger,
                clock=self.clock,
                on_event=self.events.append,
                **kwargs,
            )

    def states(self) -> dict[str, RowState]:
        return {row.key: row.state for row in self.ledger.rows()}


class _Watching:
    """Wraps the real client to observe concurrency and timing per grant."""

    def __init__(self, client: NylasClient, harness: _Harness) -> None:
        self._client = client
        self._h = harness
        self._per_grant: dict[str, int] = {}

    async def send_message(
        self, grant_id: str, payload: Mapping[str, Any], *, idempotency_key: str
    ) -> SendOutcome:
        self._per_grant[grant_id] = self._per_grant.get(grant_id, 0) + 1
        self._h.max_in_flight[grant_id] = max(
            self._h.max_in_flight.get(grant_id, 0), self._per_grant[grant_id]
        )
        self._h.send_times.setdefault(grant_id, []).append(self._h.clock.monotonic())
        try:
            return await self._client.send_message(grant_id, payload, idempotency_key=idempotency_key)
        finally:
            self._per_grant[grant_id] -= 1


async def test_every_job_is_sent_exactly_once(tmp_path):
    """Twenty jobs over two senders: twenty deliveries, each recipient once, each with its own key."""
    h = _Harness(
        tmp_path, [_sender("a", per_second=50, concurrency=4), _sender("b", per_second=50, concurrency=2)]
    )
    result = await h.run(make_jobs(12, "a") + make_jobs(8, "b", start=100))
    assert (result.sent, result.failed, result.remaining) == (20, 0, 0)
    delivered = [d.payload["to"][0]["email"] for d in h.fake.deliveries]
    assert sorted(delivered) == sorted({*delivered})
    assert len(delivered) == 20
    keys = [d.idempotency_key for d in h.fake.deliveries]
    assert None not in keys
    assert len(set(keys)) == 20
    assert set(h.states().values()) == {RowState.SENT}


async def test_the_loop_freezes_old_objects_and_collects_less_while_it_sends_and_only_then(tmp_path):
    """A full collection over the process's older objects (30 ms and more) would hold a paced request
    past its slot, so the loop freezes them while it sends; a caller's own freeze is left alone. Young
    passes run less often, so that a request in flight does not reach the oldest generation."""
    gc.unfreeze()
    default = gc.get_threshold()
    seen_at_render: list[tuple[int, int]] = []

    def render(job: Job) -> Message:
        seen_at_render.append((gc.get_freeze_count(), gc.get_threshold()[0]))
        return render_plain(job)

    older = [[n] for n in range(100)]  # tracked by the collector, as modules and plans are
    await _Harness(tmp_path, [_sender("a", per_second=50)]).run(make_jobs(3, "a"), render=render)
    assert len(seen_at_render) == 3
    assert min(frozen for frozen, _ in seen_at_render) >= len(older)
    assert {threshold for _, threshold in seen_at_render} == {YOUNG_THRESHOLD}
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == default

    gc.freeze()
    try:
        (tmp_path / "again").mkdir()
        await _Harness(tmp_path / "again", [_sender("a", per_second=50)]).run(make_jobs(2, "a"))
        assert gc.get_freeze_count() > 0  # the caller's objects stay frozen
    finally:
        gc.unfreeze()


async def test_concurrency_cap_per_sender_is_respected(tmp_path):
    """No sender ever has more requests in flight than its concurrency."""
    h = _Harness(
        tmp_path, [_sender("a", per_second=200, concurrency=3), _sender("b", per_second=200, concurrency=1)]
    )
    h.fake.latency_s = 0.5
    await h.run(make_jobs(9, "a") + make_jobs(4, "b", start=50))
    assert h.max_in_flight["grant-a"] <= 3
    assert h.max_in_flight["grant-b"] == 1


async def test_pace_spaces_sends_per_sender(tmp_path):
    """At 2/s the sends of one sender start at least 0.5 s apart."""
    h = _Harness(tmp_path, [_sender("a", per_second=2, concurrency=2)])
    await h.run(make_jobs(6, "a"))
    times = h.send_times["grant-a"]
    assert len(times) == 6
    assert all(later - earlier >= 0.5 - 1e-9 for earlier, later in itertools.pairwise(times))
    assert times[-1] - times[0] == pytest.approx(2.5, abs=0.05)  # paced, not slower than asked


async def test_nylas_rate_limit_requeues_with_a_new_key(tmp_path):
    """A 429 puts the message back in the queue; the retry uses a new idempotency key and it is sent once."""
    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=1)])
    h.fake.script(Fault.NYLAS_RATE_LIMIT, times=1)
    result = await h.run(make_jobs(3, "a"))
    assert result.sent == 3
    assert len(h.fake.deliveries) == 3
    refused, retried = h.fake.requests[0], h.fake.requests[1]
    assert refused.status == 429
    assert retried.status == 200
    assert refused.idempotency_key != retried.idempotency_key
    assert any(event.kind == EventKind.THROTTLED for event in h.events)


async def test_quota_refusal_parks_only_that_sender_and_its_pinned_rows(tmp_path):
    """A daily-quota 429 parks its sender until the given time; rows pinned to it wait, the other finishes."""
    h = _Harness(
        tmp_path, [_sender("a", per_second=10, concurrency=1), _sender("b", per_second=10, concurrency=1)]
    )
    h.fake.script(Fault.QUOTA_EXCEEDED, grant_id="grant-a", times=1)
    result = await h.run(make_jobs(3, "a", pinned=True) + make_jobs(3, "b", start=10))
    assert "a" in result.parked
    assert result.parked["a"] > h.clock.now()
    assert result.remaining == 3
    states = h.states()
    assert [states[f"r{n}@example.com"] for n in (10, 11, 12)] == [RowState.SENT] * 3
    assert [states[f"r{n}@example.com"] for n in (1, 2, 3)] == [RowState.PENDING] * 3


async def test_a_parked_senders_unpinned_rows_flow_to_the_others(tmp_path):
    """Unpinned rows of a sender at its quota are sent by the other sender, each once, recorded under it."""
    h = _Harness(
        tmp_path, [_sender("a", per_second=10, concurrency=1), _sender("b", per_second=10, concurrency=1)]
    )
    h.fake.script(Fault.QUOTA_EXCEEDED, grant_id="grant-a", times=1)
    result = await h.run(make_jobs(3, "a") + make_jobs(3, "b", start=10))
    assert (result.sent, result.remaining) == (6, 0)
    assert {d.grant_id for d in h.fake.deliveries} == {"grant-b"}
    emails = [d.payload["to"][0]["email"] for d in h.fake.deliveries]
    assert len(emails) == len(set(emails)) == 6
    assert h.ledger.assigned_senders()["r1@example.com"] == "b"


async def test_a_refused_senders_unpinned_rows_flow_to_the_others(tmp_path):
    """A sender whose grant is refused (403) stops; its unpinned rows go out through the other sender."""
    h = _Harness(
        tmp_path, [_sender("a", per_second=10, concurrency=1), _sender("b", per_second=10, concurrency=1)]
    )
    h.fake.script(Fault.FORBIDDEN, grant_id="grant-a", times=1)
    result = await h.run(
        make_jobs(2, "a") + make_jobs(1, "a", start=5, pinned=True) + make_jobs(2, "b", start=10)
    )
    assert result.auth_refused == ("a",)
    states = h.states()
    assert states["r5@example.com"] == RowState.PENDING  # pinned to the refused sender
    assert [states[f"r{n}@example.com"] for n in (1, 2, 10, 11)] == [RowState.SENT] * 4


async def test_daily_budget_parks_sender_before_the_provider_refuses(tmp_path):
    """per_day = 3 with 5 to send: 3 go out, then the sender is parked until its window frees."""
    sender = _sender("a", per_second=10, per_day=3, concurrency=1)
    h = _Harness(tmp_path, [sender])
    start = h.clock.now()
    result = await h.run(make_jobs(5, "a"))
    assert result.sent == 3
    assert result.remaining == 2
    assert len(h.fake.requests) == 3
    assert (result.parked["a"] - start).total_seconds() == pytest.approx(86_400, abs=5)


@pytest.mark.parametrize("concurrency", [2, 4])
async def test_the_whole_daily_budget_is_used_with_workers_in_parallel(tmp_path, concurrency):
    """per_day = 3, several workers: the ones that booked a send within the budget send it, though
    another found the budget full and parked the sender meanwhile (before, one was given back)."""
    sender = _sender("a", per_second=4, per_day=3, concurrency=concurrency)
    h = _Harness(tmp_path, [sender])
    result = await h.run(make_jobs(6, "a"))
    assert len(h.fake.deliveries) == 3
    assert (result.sent, result.remaining) == (3, 3)
    assert "a" in result.parked
    assert sorted(h.states().values()).count(RowState.SENT) == 3


async def test_permanent_rejection_fails_that_row_and_goes_on(tmp_path):
    """A 402 fails one row; the rest are sent."""
    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=1)])
    h.fake.script(Fault.REJECTED, times=1)
    result = await h.run(make_jobs(3, "a"))
    assert (result.sent, result.failed) == (2, 1)
    assert sorted(h.states().values()) == [RowState.FAILED, RowState.SENT, RowState.SENT]


async def test_refused_credentials_stop_the_sender_and_keep_rows_pending(tmp_path):
    """A 401 stops that sender; rows pinned to it stay pending for a later run, the other sender goes on."""
    h = _Harness(
        tmp_path, [_sender("a", per_second=10, concurrency=1), _sender("b", per_second=10, concurrency=1)]
    )
    h.fake.script(Fault.UNAUTHORIZED, grant_id="grant-a", times=1)
    result = await h.run(make_jobs(2, "a", pinned=True) + make_jobs(2, "b", start=10))
    assert result.auth_refused == ("a",)
    states = h.states()
    assert states["r1@example.com"] == RowState.PENDING
    assert states["r10@example.com"] == RowState.SENT


async def test_timeout_after_send_is_not_sent_twice(tmp_path):
    """504 after the provider sent: same-key retries, one delivery, the row ends unknown."""
    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=1)])
    h.fake.script(Fault.TIMEOUT_AFTER_SEND, times=1)
    result = await h.run(make_jobs(1, "a"))
    assert len(h.fake.deliveries) == 1
    assert result.unknown == 1
    assert h.states()["r1@example.com"] == RowState.UNKNOWN
    assert len({r.idempotency_key for r in h.fake.requests}) == 1


async def test_transient_server_error_retries_same_key_then_settles(tmp_path):
    """A 500 then the replayed answer: the same key is used for every attempt and nothing is sent twice."""
    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=1)])
    h.fake.script(Fault.INTERNAL_ERROR, times=1)
    await h.run(make_jobs(2, "a"))
    first_key = h.fake.requests[0].idempotency_key
    assert all(r.idempotency_key == first_key for r in h.fake.requests if r.status >= 500 or r.replayed)
    emails = [d.payload["to"][0]["email"] for d in h.fake.deliveries]
    assert len(emails) == len(set(emails))


async def test_limit_stops_after_n_sends(tmp_path):
    """--limit 2 sends exactly two messages and reports the rest as remaining."""
    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=2)])
    result = await h.run(make_jobs(5, "a"), settings=DispatchSettings(limit=2))
    assert result.sent == 2
    assert result.limit_reached
    assert result.remaining == 3
    assert len(h.fake.deliveries) == 2


async def test_a_row_whose_key_may_be_used_is_never_sent_through_another_grant(tmp_path):
    """Sent via a, crash before recording, a parked on resume: b must not re-send it (other grant)."""
    h = _Harness(
        tmp_path, [_sender("a", per_second=10, concurrency=1), _sender("b", per_second=10, concurrency=1)]
    )
    jobs = make_jobs(2, "a")
    h.ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, j.sender) for j in jobs], []
    )
    claim = h.ledger.claim("r1@example.com", sender="a")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=h.fake.app), base_url="http://f.test"
    ) as http:
        payload = build_send_request(render_plain(jobs[0]))
        await NylasClient(http, api_key=KEY, clock=h.clock).send_message(
            "grant-a", payload, idempotency_key=claim.idempotency_key
        )  # delivered; the process dies before recording it
    until = h.clock.now() + timedelta(hours=1)
    result = await h.run(jobs, parked={"a": until})  # no `bound` hint: dispatch must find out itself
    to_r1 = [d for d in h.fake.deliveries if d.payload["to"][0]["email"] == "r1@example.com"]
    assert [d.grant_id for d in to_r1] == ["grant-a"]
    assert h.states()["r1@example.com"] == RowState.INFLIGHT  # resumed with its key once a may send
    assert h.states()["r2@example.com"] == RowState.SENT
    assert result.parked == {"a": until}


async def test_a_row_settled_elsewhere_after_its_lane_read_it_is_not_sent_and_the_run_goes_on(tmp_path):
    """Between a lane's reading of its jobs and a claim, another worker (or `suppress` beside the run)
    settled a row: the claim finds nothing to send, so that row is not mailed, and the rest are."""
    h = _Harness(tmp_path, [_sender("a", per_second=50, concurrency=2)])
    claim = h.ledger.claim

    def claim_after_another_settled_r3(key: str, **kwargs: Any):
        if key == "r3@example.com":
            h.ledger.record_skipped(key, SkipReason.UNSUBSCRIBED, "unsubscribed on another machine")
        return claim(key, **kwargs)

    h.ledger.claim = claim_after_another_settled_r3  # type: ignore[method-assign]
    result = await h.run(make_jobs(5, "a"))
    delivered = sorted(d.payload["to"][0]["email"] for d in h.fake.deliveries)
    assert delivered == [f"r{n}@example.com" for n in (1, 2, 4, 5)]
    assert (result.sent, result.failed, result.unknown) == (4, 0, 0)
    assert h.states()["r3@example.com"] == RowState.SKIPPED


async def test_a_wave_of_throttles_to_requests_in_flight_is_one_throttle(tmp_path):
    """Eight requests in flight (200 ms each) all answered 429 "retry after 1 s" are one throttle, not eight
    in a row: the sender waits a second and goes on, instead of stopping for the run."""
    h = _Harness(tmp_path, [_sender("a", per_second=100, concurrency=8)])
    h.fake.latency_s = 0.2
    h.fake.script(Fault.PROVIDER_THROTTLE, grant_id="grant-a", times=8, retry_after_s=1)
    result = await h.run(make_jobs(30, "a"))
    assert [r.status for r in h.fake.requests].count(429) == 8
    assert (result.sent, result.remaining, dict(result.parked)) == (30, 0, {})


async def test_a_pace_slower_than_a_keys_life_still_sends_every_row(tmp_path):
    """One send every two hours: a row claimed before its pace slot holds a key older than the hour Nylas
    keeps it by the time it leaves; the unused key is swapped for a new one, and every row is sent."""
    h = _Harness(tmp_path, [_sender("a", per_minute=1 / 120, concurrency=1)])
    result = await h.run(make_jobs(3, "a"))
    assert (result.sent, result.remaining) == (3, 0)
    assert len(h.fake.deliveries) == 3
    assert set(h.states().values()) == {RowState.SENT}


async def test_a_message_that_can_no_longer_be_built_fails_its_row_and_the_others_go_on(tmp_path):
    """An attachment replaced, grown or gone since the check makes its message unbuildable at send time:
    that row fails with the reason (for `retry --failed`), nothing is sent for it, the run goes on."""
    from campaign.errors import UnsendableError

    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=1)])

    def render(job: Job) -> Message:
        if job.recipient.row == 2:
            raise UnsendableError("attachment invoices/B.pdf is not a file", row=2, field="attachments")
        return render_plain(job)

    result = await h.run(make_jobs(3, "a"), render=render)
    assert (result.sent, result.failed, result.remaining) == (2, 1, 0)
    assert sorted(d.payload["to"][0]["email"] for d in h.fake.deliveries) == [
        "r1@example.com",
        "r3@example.com",
    ]
    row = h.ledger.row("r2@example.com")
    assert row.state == RowState.FAILED
    assert row.error_type == "unsendable"
    assert "invoices/B.pdf is not a file" in (row.error_message or "")


async def test_an_api_answering_5xx_to_everything_stops_the_sender_not_the_whole_list(tmp_path):
    """A provider outage (503 to every send): the sender backs off as from a lost connection and stops
    after a minute of it, its rows left for resume, instead of trying each row four times and leaving
    the whole list unknown."""
    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=2)])
    h.fake.script(Fault.UNAVAILABLE, grant_id="grant-a", times=10_000)
    result = await h.run(make_jobs(200, "a"))
    assert "a" in result.unreachable
    states = list(h.states().values())
    assert states.count(RowState.UNKNOWN) <= 10
    assert len(h.fake.requests) < 100  # four a row would be 800


async def test_failed_reply_lookups_back_off_instead_of_asking_all_at_once(tmp_path):
    """Each follow-up's reply lookup is a request to the grant: when they fail (a 429, the provider down),
    the next waits a backoff that grows with each failure, instead of every due follow-up asking at once."""
    from campaign.models import Screening

    h = _Harness(tmp_path, [_sender("a", per_second=100, concurrency=1)])
    asked: list[float] = []

    async def screen(job: Job) -> Screening:
        asked.append(h.clock.monotonic())
        return Screening(hold=True)

    result = await h.run([job._replace(step="nudge") for job in make_jobs(6, "a")], screen=screen)
    assert result.held == 6
    assert h.fake.requests == []
    gaps = [later - earlier for earlier, later in itertools.pairwise(asked)]
    assert len(gaps) == 5
    assert min(gaps) >= 1.0  # at least half the 2 s first backoff
    assert gaps[-1] > gaps[0]


async def test_a_quota_park_is_kept_in_the_ledger_as_it_happens(tmp_path):
    """The park a quota refusal makes is written at once (dispatch itself keeps nothing at its end): a run
    killed later does not leave the next one to knock on the locked mailbox again."""
    h = _Harness(tmp_path, [_sender("a", per_second=10, concurrency=1), _sender("b", per_second=10)])
    h.fake.script(Fault.QUOTA_EXCEEDED, grant_id="grant-a", times=1, retry_after_s=7_200)
    result = await h.run(make_jobs(3, "a", pinned=True) + make_jobs(3, "b", start=10))
    assert "a" in result.parked
    assert h.ledger.parked_senders() == {"a": result.parked["a"]}


async def test_no_message_leaves_after_its_window_shut_during_the_pace_wait(tmp_path):
    """One send a minute, three minutes before a Mon-Fri 09:00-17:30 Berlin window shuts: the sends whose
    slot comes after 17:30 wait for the window (the run stops: exit 75 then), none goes at 17:30 or after
    (they went at 17:30 and 17:31: the window was looked at before the pace wait only)."""
    sender = _sender("a", per_minute=1, concurrency=2, window="Mon-Fri 09:00-17:30", timezone="Europe/Berlin")
    h = _Harness(tmp_path, [sender], start=datetime(2026, 12, 7, 16, 27, tzinfo=UTC))  # Monday, 17:27 CET
    result = await h.run(make_jobs(10, "a"))
    shuts = datetime(2026, 12, 7, 16, 30, tzinfo=UTC)
    assert [d.delivered_at for d in h.fake.deliveries] == [
        datetime(2026, 12, 7, 16, minute, tzinfo=UTC) for minute in (27, 28, 29)
    ]
    assert all(d.delivered_at < shuts for d in h.fake.deliveries)
    assert (result.sent, result.remaining) == (3, 7)
    assert set(h.states().values()) == {RowState.SENT, RowState.PENDING}
