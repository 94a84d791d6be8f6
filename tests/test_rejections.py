"""A sender whose messages the API keeps refusing stops for the run (its `stop_after_rejections`), its rows
not tried left pending for another sender or a later run, instead of failing the whole list one refusal
at a time (listmonk's `max_send_errors`, YAMM's stop on a bounce spike; peers.md §5). Counted at the fake,
on loopback."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_sample
from postgres import fresh_database
from support import make_jobs, render_plain

from campaign.dispatch import DispatchEvent, EventKind, dispatch
from campaign.ledger import Ledger, PlannedRow, open_ledger
from campaign.manifest import SenderSettings, load_manifest
from campaign.models import RowState, SendOutcome
from campaign.nylas import NylasClient, build_http_client
from campaign.plan import Job
from campaign.testing import FakeNylas, Fault, serve_on_loopback
from campaign.testing.clock import FakeClock

KEY = "test-key"


def _sender(name: str, **limits: Any) -> SenderSettings:
    return SenderSettings(
        name=name, grant_id=f"grant-{name}", email=f"{name}@corp.example.com", per_second=10, **limits
    )


def _setup(tmp_path: Path, jobs: list[Job], *senders: SenderSettings) -> tuple[FakeClock, FakeNylas, Ledger]:
    clock, fake = FakeClock(), FakeNylas(api_key=KEY)
    for sender in senders:
        fake.add_grant(sender.grant_id or "", sender.email or "")
    ledger = open_ledger(tmp_path / "l.sqlite", clock=clock, campaign="test")
    ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, j.sender) for j in jobs], []
    )
    return clock, fake, ledger


def _refused(fake: FakeNylas, grant_id: str) -> int:
    return sum(r.status == 402 and r.grant_id == grant_id for r in fake.requests)


def _states(ledger: Ledger) -> Counter[RowState]:
    return Counter(row.state for row in ledger.rows())


class _Refusing:
    """The real client to the fake, which refuses (402) the requests whose number (from 1) is in `refused`.
    One request at a time (concurrency 1), so each scripted fault meets the request it was meant for."""

    def __init__(self, client: NylasClient, fake: FakeNylas, refused: set[int]) -> None:
        self._client, self._fake, self._refused = client, fake, refused
        self.requests = 0

    async def send_message(self, grant_id: str, payload: Any, *, idempotency_key: str) -> SendOutcome:
        self.requests += 1
        if self.requests in self._refused:
            self._fake.script(Fault.REJECTED, grant_id=grant_id, times=1)
        return await self._client.send_message(grant_id, payload, idempotency_key=idempotency_key)

    async def send_domain_message(self, domain: str, payload: Any, *, idempotency_key: str) -> SendOutcome:
        raise AssertionError("no domain sender here")


@pytest.mark.anyio
async def test_a_sender_stops_after_its_default_run_of_refusals_and_leaves_the_rest_pending(tmp_path):
    """Every message refused: the sender stops once 20 (the default) came in a row; with two in flight at
    most one more is refused. The rest stay pending, untried; none unknown or in flight."""
    sender = _sender("a", concurrency=2)
    assert sender.stop_after_rejections == 20
    jobs = make_jobs(60, "a")
    clock, fake, ledger = _setup(tmp_path, jobs, sender)
    fake.script(Fault.REJECTED, grant_id="grant-a", times=1000)
    events: list[DispatchEvent] = []
    with serve_on_loopback(fake) as url:
        async with build_http_client(base_url=url, timeout_s=5) as http:
            client = NylasClient(http, api_key=KEY, clock=clock)
            result = await dispatch(
                jobs, senders=[sender], render=render_plain, client=client, ledger=ledger, clock=clock,
                on_event=events.append,
            )  # fmt: skip
    refused = _refused(fake, "grant-a")
    assert 20 <= refused <= 21
    assert len(fake.requests) == refused
    assert fake.deliveries == []
    assert result.rejecting == {"a": "HTTP 402 message_rejected: Sending to at least one recipient failed."}
    assert (result.sent, result.failed, result.unknown) == (0, refused, 0)
    assert result.remaining == 60 - refused
    assert _states(ledger) == {RowState.FAILED: refused, RowState.PENDING: 60 - refused}
    assert all(row.attempts == 0 for row in ledger.rows() if row.state == RowState.PENDING)
    assert [event.kind for event in events].count(EventKind.REJECTING) == 1


@pytest.mark.anyio
async def test_a_message_sent_between_refusals_starts_the_count_again(tmp_path):
    """stop_after_rejections = 3: two refused, one sent, two refused, … never three in a row, so the sender
    goes through the whole list; with 0, even refusals without end never stop it."""
    sender = _sender("a", concurrency=1, stop_after_rejections=3)
    jobs = make_jobs(9, "a")
    clock, fake, ledger = _setup(tmp_path, jobs, sender)
    with serve_on_loopback(fake) as url:
        async with build_http_client(base_url=url, timeout_s=5) as http:
            client = _Refusing(NylasClient(http, api_key=KEY, clock=clock), fake, {1, 2, 4, 5, 7, 8})
            result = await dispatch(
                jobs, senders=[sender], render=render_plain, client=client, ledger=ledger, clock=clock
            )
    assert (_refused(fake, "grant-a"), len(fake.deliveries)) == (6, 3)
    assert (result.sent, result.failed, result.remaining, result.rejecting) == (3, 6, 0, {})

    never = _sender("b", concurrency=2, stop_after_rejections=0)
    jobs = make_jobs(30, "b")
    (tmp_path / "never").mkdir()
    clock, fake, ledger = _setup(tmp_path / "never", jobs, never)
    fake.script(Fault.REJECTED, grant_id="grant-b", times=1000)
    with serve_on_loopback(fake) as url:
        async with build_http_client(base_url=url, timeout_s=5) as http:
            client = NylasClient(http, api_key=KEY, clock=clock)
            result = await dispatch(
                jobs, senders=[never], render=render_plain, client=client, ledger=ledger, clock=clock
            )
    assert _refused(fake, "grant-b") == 30
    assert (result.failed, result.remaining, result.rejecting) == (30, 0, {})


@pytest.mark.anyio
async def test_the_rows_of_a_stopped_sender_go_to_the_others_and_each_is_mailed_once(tmp_path):
    """Sender a's mailbox refuses everything; after 3 in a row its rows go to b, which sends them: every
    recipient is refused once or delivered once, and nothing is left."""
    a, b = _sender("a", concurrency=1, stop_after_rejections=3), _sender("b", concurrency=2)
    jobs = make_jobs(10, "a") + make_jobs(10, "b", start=11)
    clock, fake, ledger = _setup(tmp_path, jobs, a, b)
    fake.script(Fault.REJECTED, grant_id="grant-a", times=1000)
    with serve_on_loopback(fake) as url:
        async with build_http_client(base_url=url, timeout_s=5) as http:
            client = NylasClient(http, api_key=KEY, clock=clock)
            result = await dispatch(
                jobs, senders=[a, b], render=render_plain, client=client, ledger=ledger, clock=clock
            )
    assert _refused(fake, "grant-a") == 3
    assert {d.grant_id for d in fake.deliveries} == {"grant-b"}
    delivered = Counter(d.payload["to"][0]["email"] for d in fake.deliveries)
    assert len(delivered) == 17
    assert set(delivered.values()) == {1}
    assert (result.sent, result.failed, result.remaining, list(result.rejecting)) == (17, 3, 0, ["a"])
    assert _states(ledger) == {RowState.SENT: 17, RowState.FAILED: 3}


def _one_slow_sender(manifest: Path, stop_after: int) -> None:
    text = manifest.read_text()
    assert "concurrency = 2\n" in text
    manifest.write_text(
        text.replace("concurrency = 2\n", f"concurrency = 1\nstop_after_rejections = {stop_after}\n")
    )


def _register(api: FakeNylas, manifest: Path) -> None:
    for sender in load_manifest(manifest).senders:
        api.add_grant(sender.grant_id or "", sender.email or "")


def test_run_stops_a_refused_sender_with_exit_69_and_retry_then_resume_mails_each_once(api, cli, tmp_path):
    """`campaign run`: two refusals in a row stop the only sender (exit 69, said on a line of its own), the
    other three rows untried. Once the API takes messages again, resume sends those (exit 1: two failed),
    and retry --failed with resume sends the two: every recipient mailed exactly once."""
    manifest = copy_sample("newsletter", tmp_path)
    _one_slow_sender(manifest, 2)
    _register(api, manifest)
    api.script(Fault.REJECTED, times=2)
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 69, first.output
    assert "founder stopped: the API refused its last messages" in first.stdout
    assert "Sending to at least one recipient failed." in first.stdout
    assert (len(api.requests), api.deliveries) == (2, [])
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert (status["states"]["failed"], status["states"]["pending"]) == (2, 3)

    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 1, again.output
    assert len(api.deliveries) == 3
    assert cli("retry", manifest, "--failed").exit_code == 0
    last = cli("resume", manifest, "--yes")
    assert last.exit_code == 0, last.output
    delivered = Counter(d.payload["to"][0]["email"] for d in api.deliveries)
    assert len(delivered) == 5
    assert set(delivered.values()) == {1}


def test_stop_after_rejections_is_a_whole_number_from_zero(cli, tmp_path):
    """The key is read per sender; a negative or fractional one is a manifest error that names it and says
    what it must be (exit 78)."""
    manifest = copy_sample("newsletter", tmp_path)
    _one_slow_sender(manifest, 0)
    assert [sender.stop_after_rejections for sender in load_manifest(manifest).senders] == [0]
    for value, why in (("-1", "greater than or equal to 0"), ("2.5", "must be an integer")):
        manifest.write_text(
            manifest.read_text().replace("stop_after_rejections = 0\n", f"stop_after_rejections = {value}\n")
        )
        result = cli("status", manifest)
        assert result.exit_code == 78, result.output
        assert "senders[1].stop_after_rejections" in result.stderr
        assert why in result.stderr
        manifest.write_text(manifest.read_text().replace(f"= {value}\n", "= 0\n"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_refused_senders_rows_go_to_another_sender_on_either_ledger(api, cli, tmp_path, backend):
    """Two senders; the founder's mailbox refuses everything. After two refusals it stops and the other
    sender mails the three rows left, as a worker on a PostgreSQL ledger too (its rows given away through
    the ledger): exit 1 for the two failed, each recipient mailed once, from the other mailbox only."""
    manifest = copy_sample("newsletter", tmp_path)
    _one_slow_sender(manifest, 2)
    manifest.write_text(
        manifest.read_text()
        + '\n[[senders]]\nname = "second"\ngrant_id = "grant-second"\nemail = "sam@example.com"\n'
    )
    _register(api, manifest)
    founder = load_manifest(manifest).senders[0].grant_id or ""
    api.script(Fault.REJECTED, grant_id=founder, times=1000)
    with contextlib.ExitStack() as stack:
        ledger = () if backend == "sqlite" else ("--ledger", stack.enter_context(fresh_database()))
        result = cli("run", manifest, "--yes", *ledger)
        assert result.exit_code == 1, result.output
        status = json.loads(cli("status", manifest, "--json", *ledger).stdout)
    assert _refused(api, founder) == 2
    assert {d.grant_id for d in api.deliveries} == {"grant-second"}
    delivered = Counter(d.payload["to"][0]["email"] for d in api.deliveries)
    assert len(delivered) == 3
    assert set(delivered.values()) == {1}
    assert (status["states"]["sent"], status["states"]["failed"], status["states"]["pending"]) == (3, 2, 0)
