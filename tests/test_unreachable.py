"""An API that cannot be reached: no connection means nothing was sent, so rows go back to pending (never
`unknown`), the sender stops for the run once it has failed to connect for a while, and each recipient is
mailed once when the API is back. Real connections on loopback: a port nothing listens on, and the fake."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_sample
from support import make_jobs, refusing_url, render_plain

from campaign.clock import Clock
from campaign.dispatch import DispatchEvent, DispatchSettings, EventKind, dispatch
from campaign.ledger import Ledger, PlannedRow, open_ledger
from campaign.manifest import SenderSettings, load_manifest
from campaign.models import OutcomeKind, RowState, SendOutcome
from campaign.nylas import NylasClient, build_http_client
from campaign.plan import Job
from campaign.testing import FakeNylas, Fault, serve_on_loopback
from campaign.testing.clock import FakeClock

KEY = "test-key"
SENDER = SenderSettings(
    name="a", grant_id="grant-a", email="a@corp.example.com", per_second=10, concurrency=2
)


@asynccontextmanager
async def _client(url: str, clock: Clock) -> AsyncIterator[NylasClient]:
    async with build_http_client(base_url=url, timeout_s=5) as http:
        yield NylasClient(http, api_key=KEY, clock=clock)


class _Outage:
    """The real client, sending to the fake, or, for the requests `is_down(n)` names (n from 1), to a port
    nothing listens on. Counts the requests that found no connection."""

    def __init__(self, up: NylasClient, down: NylasClient, is_down: Callable[[int], bool]) -> None:
        self._up, self._down, self._is_down = up, down, is_down
        self.requests = 0
        self.refused = 0

    async def send_message(self, grant_id: str, payload: Any, *, idempotency_key: str) -> SendOutcome:
        self.requests += 1
        client = self._down if self._is_down(self.requests) else self._up
        outcome = await client.send_message(grant_id, payload, idempotency_key=idempotency_key)
        self.refused += outcome.kind == OutcomeKind.UNREACHABLE
        return outcome

    async def send_domain_message(self, domain: str, payload: Any, *, idempotency_key: str) -> SendOutcome:
        raise AssertionError("no domain sender here")


def _ledger(tmp_path: Path, clock: FakeClock, jobs: list[Job]) -> Ledger:
    ledger = open_ledger(tmp_path / "l.sqlite", clock=clock, campaign="test")
    ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, j.sender) for j in jobs], []
    )
    return ledger


def _fake() -> FakeNylas:
    fake = FakeNylas(api_key=KEY)
    fake.add_grant(SENDER.grant_id, SENDER.email or "")
    return fake


def _delivered(fake: FakeNylas) -> list[str]:
    return [d.payload["to"][0]["email"] for d in fake.deliveries]


@pytest.mark.anyio
async def test_a_sender_that_cannot_connect_stops_with_its_rows_pending_and_sends_each_once_later(tmp_path):
    """Connections refused: every row stays pending, none unknown or in flight, and the sender stops after
    a minute of failures held apart by backoffs (exit 75's case). Then the API is back: six deliveries."""
    clock, fake, jobs = FakeClock(), _fake(), make_jobs(6, "a")
    ledger = _ledger(tmp_path, clock, jobs)
    events: list[DispatchEvent] = []
    with refusing_url() as down:
        async with _client(down, clock) as client:
            result = await dispatch(
                jobs, senders=[SENDER], render=render_plain, client=client, ledger=ledger, clock=clock,
                on_event=events.append,
            )  # fmt: skip
    assert list(result.unreachable) == ["a"]
    assert "nothing was sent" in result.unreachable["a"]
    assert (result.sent, result.failed, result.unknown, result.remaining) == (0, 0, 0, 6)
    rows = list(ledger.rows())
    assert {row.state for row in rows} == {RowState.PENDING}
    assert all(row.key_uses == 0 for row in rows)
    tried = sum(row.attempts for row in rows)
    assert 3 <= tried <= 20  # held apart: a few attempts, not a storm
    after_s = DispatchSettings().unreachable_after_s
    assert after_s <= clock.monotonic() <= after_s + 2  # stopped as that time was up, not a backoff later
    kinds = [event.kind for event in events]
    assert kinds.count(EventKind.UNREACHABLE) == 1
    assert kinds.index(EventKind.RETRYING) < kinds.index(EventKind.UNREACHABLE)  # said before it stopped

    with serve_on_loopback(fake) as up:
        async with _client(up, clock) as client:
            again = await dispatch(
                jobs, senders=[SENDER], render=render_plain, client=client, ledger=ledger, clock=clock
            )
    assert (again.sent, again.unknown, again.unreachable) == (6, 0, {})
    assert sorted(_delivered(fake)) == sorted({job.recipient.address.email for job in jobs})
    assert {row.state for row in ledger.rows()} == {RowState.SENT}


@pytest.mark.anyio
async def test_with_wait_a_sender_rides_out_an_outage_and_sends_each_once(tmp_path):
    """--wait: the first five requests find no connection; the sender backs off and goes on, never stops,
    however short its limit; each row goes out once."""
    clock, fake, jobs = FakeClock(), _fake(), make_jobs(4, "a")
    ledger = _ledger(tmp_path, clock, jobs)
    with refusing_url() as down_url, serve_on_loopback(fake) as up_url:
        async with _client(up_url, clock) as up, _client(down_url, clock) as down:
            client = _Outage(up, down, lambda n: n <= 5)
            settings = DispatchSettings(wait=True, unreachable_after_s=1.0)
            events: list[DispatchEvent] = []
            result = await dispatch(
                jobs, senders=[SENDER], render=render_plain, client=client, ledger=ledger, clock=clock,
                settings=settings, on_event=events.append,
            )  # fmt: skip
    assert client.refused == 5
    kinds = [event.kind for event in events]
    assert EventKind.UNREACHABLE not in kinds
    assert kinds.count(EventKind.RETRYING) == 5
    assert kinds.index(EventKind.RESUMED) > max(
        i for i, kind in enumerate(kinds) if kind == EventKind.RETRYING
    )
    assert (result.sent, result.unknown, result.remaining, result.unreachable) == (4, 0, 0, {})
    assert sorted(_delivered(fake)) == sorted({job.recipient.address.email for job in jobs})
    assert sum(row.attempts for row in ledger.rows()) == 4 + 5
    assert clock.monotonic() >= 1.0 + 2.0 + 4.0  # at least half of each of the first backoffs


@pytest.mark.anyio
async def test_a_row_whose_key_may_have_been_used_keeps_it_through_an_outage_and_is_delivered_once(tmp_path):
    """The first request is delivered but its answer is lost (a reset), then the API cannot be reached: the
    row stays in flight with its key, never unknown and never a new key. Back, the same key is replayed."""
    clock, fake, jobs = FakeClock(), _fake(), make_jobs(1, "a")
    fake.script(Fault.RESET_AFTER_SEND, grant_id=SENDER.grant_id)
    ledger = _ledger(tmp_path, clock, jobs)
    key = jobs[0].recipient.key
    with refusing_url() as down_url, serve_on_loopback(fake) as up_url:
        async with _client(up_url, clock) as up, _client(down_url, clock) as down:
            client = _Outage(up, down, lambda n: n > 1)
            result = await dispatch(
                jobs, senders=[SENDER], render=render_plain, client=client, ledger=ledger, clock=clock
            )
            assert list(result.unreachable) == ["a"]
            assert (result.sent, result.unknown) == (0, 0)
            row = ledger.row(key)
            assert row.state == RowState.INFLIGHT
            assert row.key_uses > 0
            first_key = row.idempotency_key
            assert _delivered(fake) == [jobs[0].recipient.address.email]

            client = _Outage(up, down, lambda _n: False)
            again = await dispatch(
                jobs, senders=[SENDER], render=render_plain, client=client, ledger=ledger, clock=clock,
                bound={key},
            )  # fmt: skip
    assert again.sent == 1
    row = ledger.row(key)
    assert (row.state, row.idempotency_key, row.replayed) == (RowState.SENT, first_key, True)
    assert len(fake.deliveries) == 1


def test_run_against_an_api_that_cannot_be_reached_exits_75_and_resume_sends_each_once(
    api, cli, tmp_path, monkeypatch
):
    """`campaign run` with the API down: exit 75, a line saying so, nothing unknown or in flight, and
    `status` says why the rows wait; once it is back, `campaign resume` sends the five messages, each once."""
    manifest = copy_sample("newsletter", tmp_path)
    for sender in load_manifest(manifest).senders:
        api.add_grant(sender.grant_id, sender.email or "")
    up = os.environ["NYLAS_API_URI"]
    with refusing_url() as down:
        monkeypatch.setenv("NYLAS_API_URI", down)
        result = cli("run", manifest, "--yes")
    assert result.exit_code == 75, result.output
    assert "stopped: could not connect to the API" in result.stdout
    assert "nothing was sent" in result.stdout
    assert "campaign resume" in result.stdout
    assert api.requests == []
    monkeypatch.setenv("NYLAS_API_URI", up)
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert status["states"]["pending"] == 5
    assert status["states"]["unknown"] == status["states"]["inflight"] == 0
    # Why they wait: the rows tried say so (the sender stopped before trying the others).
    (cause,) = status["waiting"]
    assert cause == "- network"
    # The sample's sender has concurrency 2: the two rows in flight together were tried (again and
    # again), the other three never.
    assert status["waiting"][cause]["rows"] == 2
    assert "could not connect to the API" in status["waiting"][cause]["latest"]
    assert "to retry (- network)" in cli("status", manifest).stdout
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 0, again.output
    delivered = _delivered(api)
    assert len(delivered) == len(set(delivered)) == 5
    assert "waiting" not in json.loads(cli("status", manifest, "--json").stdout)  # none left to retry


def test_reconcile_that_cannot_reach_the_api_exits_75_and_leaves_the_rows_unknown(
    api, cli, tmp_path, monkeypatch
):
    """Rows reconcile could not look up for want of the API may be decided by running it again later:
    exit 75 ("try again later"), not 1; once the API is back, it decides them."""
    manifest = copy_sample("newsletter", tmp_path)
    loaded = load_manifest(manifest)
    for sender in loaded.senders:
        api.add_grant(sender.grant_id, sender.email or "")
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    ledger = open_ledger(loaded.ledger_path, clock=FakeClock(), campaign=loaded.campaign.name)
    (pending, *_) = [row.key for row in ledger.rows(states=(RowState.PENDING,))]
    ledger.claim(pending, subject="Spring news")
    ledger.record_unknown(pending)
    ledger.close()
    up = os.environ["NYLAS_API_URI"]
    with refusing_url() as down:
        monkeypatch.setenv("NYLAS_API_URI", down)
        refused = cli("reconcile", manifest, "--min-age", "0s")
    assert refused.exit_code == 75, refused.output
    assert "1 row could not be looked up: the API could not be reached" in refused.stdout
    ledger = open_ledger(loaded.ledger_path, clock=FakeClock(), campaign=loaded.campaign.name, read_only=True)
    assert ledger.row(pending).state == RowState.UNKNOWN
    ledger.close()
    monkeypatch.setenv("NYLAS_API_URI", up)
    settled = cli("reconcile", manifest, "--min-age", "0s")
    assert settled.exit_code == 0, settled.output  # not found: back to pending, for resume
