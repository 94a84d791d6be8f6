"""Hypothesis: random interleavings of claims, outcomes, faults, crashes, resumes and reconciles.

Each example drives the real send loop and reconcile against the in-process fake Nylas on
virtual time. A "crash" (kill -9) is raised before a chosen ledger write, or before or after
a chosen request reaches the server; the ledger is then reopened, as a new process would.
Whatever the interleaving, no recipient is ever delivered twice, and after resume +
reconcile every row is final: sent exactly when delivered once, failed when never delivered. On
both ledgers (SQLite and PostgreSQL: the `backend` fixture).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import render_plain, run_inline

from campaign.dispatch import dispatch
from campaign.ledger import ClaimRequest, Ledger, OutcomeReport, PlannedRow
from campaign.manifest import SenderSettings
from campaign.models import Address, Recipient, RowState, SendOutcome, SkipReason
from campaign.nylas import NylasClient
from campaign.plan import Job
from campaign.reconcile import reconcile_unknown
from campaign.testing import FakeNylas, Fault
from campaign.testing.clock import FakeClock

if TYPE_CHECKING:
    from postgres import Backend, Ledgers

KEY = "nyk_interleavings_key"
FAULTS = [
    Fault.NYLAS_RATE_LIMIT,
    Fault.PROVIDER_THROTTLE,
    Fault.UNAUTHORIZED,
    Fault.REJECTED,
    Fault.INTERNAL_ERROR,
    Fault.BAD_GATEWAY,
    Fault.UNAVAILABLE,
    Fault.TIMEOUT_AFTER_SEND,
    Fault.RESET,
    Fault.RESET_AFTER_SEND,
]
FINAL = {RowState.SENT, RowState.FAILED, RowState.SKIPPED}

# The in-process fake lists a message as soon as it is sent: no settle time is needed here.
NO_SETTLE_TIME = timedelta(0)


class Crash(BaseException):
    """The process is killed here (BaseException: nothing in the code under test catches it)."""


class _CrashingLedger:
    """The ledger, killed before its `crash_at`-th write (that write never reaches the file)."""

    def __init__(self, ledger: Ledger, crash_at: int | None) -> None:
        self._ledger = ledger
        self._crash_at = crash_at
        self._writes = 0

    def _tick(self) -> None:
        self._writes += 1
        if self._writes == self._crash_at:
            raise Crash

    def claim_many(self, requests: Sequence[ClaimRequest]):
        for _ in requests:  # a crash inside the batch undoes all of it, as before any of its writes
            self._tick()
        return self._ledger.claim_many(requests)

    def record_outcomes(self, reports: Sequence[OutcomeReport]):
        for _ in reports:
            self._tick()
        return self._ledger.record_outcomes(reports)

    def release(self, key: str) -> None:
        self._tick()
        self._ledger.release(key)

    def record_unknown(self, key: str, *, note: str | None = None) -> None:
        self._tick()
        self._ledger.record_unknown(key, note=note)

    def record_skipped(self, key: str, reason: SkipReason, detail: str) -> bool:
        self._tick()
        return self._ledger.record_skipped(key, reason, detail)

    def batch(self):
        return self._ledger.batch()


class _CrashingClient:
    """The client, killed at its `number`-th request: before it leaves, or after the server handled it."""

    def __init__(self, client: NylasClient, crash: tuple[int, bool] | None) -> None:
        self._client = client
        self._crash = crash
        self._sends = 0

    async def send_message(self, grant_id: str, payload: Any, *, idempotency_key: str) -> SendOutcome:
        self._sends += 1
        send = partial(self._client.send_message, grant_id, payload, idempotency_key=idempotency_key)
        if self._crash is not None and self._sends == self._crash[0]:
            if self._crash[1]:
                await send()  # delivered (or refused) at the server; the answer dies with the process
            raise Crash
        return await send()


class _World:
    def __init__(self, ledgers: Ledgers, *, recipients: int, two_senders: bool, concurrency: int) -> None:
        self.clock = FakeClock()
        self.fake = FakeNylas(api_key=KEY, clock=self.clock)
        names = ["a", "b"] if two_senders else ["a"]
        self.senders = [
            SenderSettings(name=n, grant_id=f"g-{n}", per_second=20, concurrency=concurrency) for n in names
        ]
        for sender in self.senders:
            self.fake.add_grant(sender.grant_id or "", f"{sender.name}@corp.example.com")
        self.jobs = [
            Job(Recipient(f"r{i}@x.com", i, Address(f"r{i}@x.com"), {}), names[i % len(names)])
            for i in range(1, recipients + 1)
        ]
        self.ledgers = ledgers
        self.ledger = self._open()
        self.ledger.record_plan(
            [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.key, j.sender) for j in self.jobs], []
        )

    def _open(self) -> Ledger:
        return self.ledgers.open("mix", clock=self.clock)

    def restart(self) -> None:
        """A new process: the old connection is gone; what the ledger holds is all that is left."""
        self.ledger.close()
        self.ledger = self._open()

    def open_jobs(self) -> list[Job]:
        self.ledger.record_expired_claims()
        states = {r.key: r.state for r in self.ledger.rows(states=(RowState.PENDING, RowState.INFLIGHT))}
        return sorted(
            (j for j in self.jobs if j.recipient.key in states),
            key=lambda j: states[j.recipient.key] != RowState.INFLIGHT,
        )

    async def run(self, *, crash: tuple[Any, ...] | None = None) -> None:
        ledger: Any = self.ledger
        crash_write = crash[1] if crash is not None and crash[0] == "write" else None
        crash_send = (crash[1], crash[2]) if crash is not None and crash[0] == "send" else None
        if crash_write is not None:
            ledger = _CrashingLedger(self.ledger, crash_write)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.fake.app), base_url="http://f"
        ) as h:
            client = _CrashingClient(NylasClient(h, api_key=KEY, clock=self.clock), crash_send)
            try:
                await dispatch(
                    self.open_jobs(),
                    senders=self.senders,
                    render=partial(render_plain, campaign="mix"),
                    client=client,
                    ledger=ledger,
                    clock=self.clock,
                    offload=run_inline,
                )
            except Crash:
                self.restart()

    async def reconcile(self) -> None:
        self.ledger.record_expired_claims()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.fake.app), base_url="http://f"
        ) as h:
            client = NylasClient(h, api_key=KEY, clock=self.clock)
            await reconcile_unknown(
                self.ledger,
                campaign="mix",
                senders=self.senders,
                client=client,
                clock=self.clock,
                min_age=NO_SETTLE_TIME,
            )

    def delivered(self) -> Counter[str]:
        return Counter(d.payload["to"][0]["email"] for d in self.fake.deliveries)


_runs = st.fixed_dictionaries(
    {
        "faults": st.lists(st.sampled_from(FAULTS), max_size=4),
        "crash": st.one_of(
            st.none(),
            st.tuples(st.just("write"), st.integers(1, 14)),
            st.tuples(st.just("send"), st.integers(1, 8), st.booleans()),
        ),
        "advance": st.sampled_from([0.0, 30.0, 2000.0, 3700.0]),
        "reconcile_first": st.booleans(),
    }
)


async def _play(world: _World, runs: list[dict[str, Any]]) -> None:
    for run in runs:
        world.clock.advance(run["advance"])
        if run["reconcile_first"]:
            await world.reconcile()
        for fault in run["faults"]:
            world.fake.script(fault, retry_after_s=1.0)
        await world.run(crash=run["crash"])
        assert max(world.delivered().values(), default=0) <= 1
    # Resume and reconcile until everything is settled, as a user would.
    world.fake.clear_faults()
    for _ in range(6):
        world.clock.advance(60)
        await world.reconcile()
        await world.run()
        if set(world.ledger.counts(listed=True)) and not any(
            world.ledger.counts()[state] for state in (RowState.PENDING, RowState.INFLIGHT, RowState.UNKNOWN)
        ):
            break


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recipients=st.integers(1, 6),
    two_senders=st.booleans(),
    concurrency=st.integers(1, 3),
    runs=st.lists(_runs, min_size=1, max_size=5),
)
def test_no_interleaving_sends_twice_or_leaves_a_row_unsettled(
    backend: Backend, recipients, two_senders, concurrency, runs
):
    """Any mix of faults, crashes, clock jumps, resumes and reconciles: each recipient mailed exactly once."""
    with tempfile.TemporaryDirectory() as folder, backend.ledgers(Path(folder)) as ledgers:
        world = _World(ledgers, recipients=recipients, two_senders=two_senders, concurrency=concurrency)
        anyio.run(_play, world, runs)
        delivered = world.delivered()
        rows = {row.key: row for row in world.ledger.rows()}
    assert max(delivered.values(), default=0) <= 1
    assert {row.state for row in rows.values()} <= FINAL, {k: r.state for k, r in rows.items()}
    for key, row in rows.items():
        assert (row.state == RowState.SENT) == (delivered[key] == 1), (key, row.state, delivered[key])
        if row.state == RowState.SENT:
            assert row.message_id in {d.id for d in world.fake.deliveries}
