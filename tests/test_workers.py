"""Several workers on one campaign in PostgreSQL: grant leases, hand-over, and nobody mailed twice.

Leases on a FakeClock: a grant changes owner only once its lease expired, and the new owner re-sends
the rows left in flight with their own keys. Then real worker processes (`campaign run`) against the
fake Nylas on loopback: they share the grants, one killed with SIGKILL every second or two and
restarted, with 504-after-send and 429 faults; counted at the fake, every recipient is mailed once,
and no grant ever had more requests in flight, or in a second, than its sender allows. With follow-ups
and --wait, on the CLI's virtual clock: a worker without a grant waits for the follow-ups and takes them
over from a worker that died. A slow database holds the sends, not the heartbeat: an unsubscribe store
whose reads block for two lease lives, or a renewal held up for three heartbeats, lapses no lease. And a
campaign whose plan is not recorded yet is not reported done.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import psycopg
import pytest
from conftest import API_KEY, REPO, SECRET, serve_fake
from postgres import fresh_database, without_password
from psycopg import sql

from campaign.clock import SystemClock
from campaign.dispatch import DispatchResult, send_under_leases
from campaign.errors import LedgerError
from campaign.ledger import GrantLeases, Ledger, PlannedRow, ledger_site, share_of
from campaign.ledger._pg_schema import _WRITER_LOCK
from campaign.ledger._write import KEY_REUSE_S
from campaign.models import OutcomeKind, RowState, SendOutcome
from campaign.testing import FakeClock, FakeNylas, Fault
from campaign.unsubscribe import open_store

GRANTS = 6
PER_SECOND = 8
CONCURRENCY = 2


@pytest.fixture(name="database", scope="module")
def _database():
    with fresh_database() as url:
        yield url


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock(start=datetime(2026, 3, 2, 9, 0, tzinfo=UTC))


@asynccontextmanager
async def _shared_campaign(
    database: str, clock: FakeClock, name: str
) -> AsyncIterator[tuple[Ledger, GrantLeases, GrantLeases]]:
    """A campaign `name` in the database with two pending rows on grant g1 and one on g2, and two
    workers' leases on it (not joined yet); all closed after."""
    site = ledger_site(database)
    ledger = site.open(clock=clock, campaign=name)
    first, second = site.leases(name, clock), site.leases(name, clock)
    assert isinstance(first, GrantLeases)
    assert isinstance(second, GrantLeases)
    try:
        rows = [PlannedRow(f"r{n}@example.com", n, f"r{n}@example.com", sender) for n, sender in
                ((1, "g1"), (2, "g1"), (3, "g2"))]  # fmt: skip
        ledger.record_plan(rows, [])
        yield ledger, first, second
    finally:
        await first.close()
        await second.close()
        ledger.close()


@pytest.mark.anyio
async def test_a_grant_changes_owner_only_once_its_lease_expired(database, clock):
    async with _shared_campaign(database, clock, "lease-expiry") as (ledger, first, second):
        await first.join()
        await second.join()
        assert await first.acquire(["g1", "g2"], 2) == ("g1", "g2")
        assert await second.acquire(["g1", "g2"], 2) == ()
        clock.advance(first.expiry_s - 1)  # the first has stopped renewing, but its leases still hold
        assert await second.acquire(["g1", "g2"], 2) == ()
        clock.advance(2)
        assert await second.acquire(["g1", "g2"], 2) == ("g1", "g2")
        assert await first.renew() == ()  # an expired lease is not revived: it is the other's now
        assert await first.acquire(["g1", "g2"], 2) == ()
        views = {view.id: view for view in ledger.workers()}
        assert views[second.id].grants == ("g1", "g2")
        assert views[first.id].grants == ()


@pytest.mark.anyio
async def test_renewed_leases_hold_and_given_back_ones_are_free_at_once(database, clock):
    async with _shared_campaign(database, clock, "lease-renewal") as (_, owner, other):
        await owner.join()
        await other.join()
        assert await owner.acquire(["g1", "g2"], 2) == ("g1", "g2")
        for _ in range(20):  # over three lease lifetimes, renewed every sixth of one
            clock.advance(owner.expiry_s / 6)
            assert await owner.renew() == ("g1", "g2")
            assert await other.acquire(["g1", "g2"], 2) == ()
        assert await owner.live_workers() == 2
        assert share_of(GRANTS, await owner.live_workers()) == 3
        await owner.release(["g2"])
        assert await other.acquire(["g1", "g2"], 1) == ("g2",)
        await owner.leave()
        assert await other.live_workers() == 1
        assert await other.acquire(["g1", "g2"], 2) == ("g1", "g2")


@pytest.mark.anyio
async def test_the_next_owner_resends_rows_in_flight_with_their_own_keys(database, clock):
    async with _shared_campaign(database, clock, "lease-handover") as (ledger, dead, heir):
        await dead.join()
        assert await dead.acquire(["g1"], 1) == ("g1",)
        claim = ledger.claim("r1@example.com", sender="g1", via="grant:g1")  # then the worker is killed
        await heir.join()
        assert await heir.acquire(["g1"], 1) == ()
        clock.advance(dead.expiry_s + 1)
        assert await heir.acquire(["g1"], 1) == ("g1",)
        in_flight = ledger.open_rows_of("g1", RowState.INFLIGHT)
        assert [row.key for row in in_flight] == ["r1@example.com"]
        again = ledger.claim("r1@example.com", sender="g1", via="grant:g1")
        assert again.idempotency_key == claim.idempotency_key
        assert not again.fresh
        outcome = SendOutcome(OutcomeKind.SENT, status=200, message_id="m1")
        assert ledger.record_outcome("r1@example.com", outcome, sender="g1") == RowState.SENT


# --- real workers ---------------------------------------------------------------------------------


def _write_campaign(
    folder: Path, database: str, rows: int, *, grants: int = GRANTS, lease_s: float = 3, suppress: str = ""
) -> Path:
    folder.mkdir()
    lines = ["email,name"] + [f"person{n:04d}@example.com,Person {n}" for n in range(rows)]
    (folder / "list.csv").write_text("\n".join(lines) + "\n")
    (folder / "body.txt.j2").write_text("Hello {{ recipient.name }}\n")
    senders = "".join(
        f'\n[[senders]]\nname = "g{n}"\ngrant_id = "grant-{n}"\nemail = "g{n}@example.com"\n'
        f"per_second = {PER_SECOND}\nconcurrency = {CONCURRENCY}\n"
        for n in range(grants)
    )
    manifest = folder / "campaign.toml"
    manifest.write_text(
        f'[campaign]\nname = "{folder.name}"\n\n[recipients]\nsource = "list.csv"\nname_column = "name"\n'
        + (f'suppress = ["{suppress}"]\n' if suppress else "")
        + '\n[message]\nsubject = "Hi {{ recipient.name }}"\ntext = "body.txt.j2"\n\n'
        f'[ledger]\nurl = "{database}"\nlease_s = {lease_s:g}\n{senders}'
    )
    return manifest


def _start_worker(manifest: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "campaign", "run", str(manifest), "--yes"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "NYLAS_API_KEY": API_KEY, "CAMPAIGN_UNSUBSCRIBE_SECRET": SECRET},
        )


def _status(manifest: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "campaign", "status", str(manifest), "--json"],
        capture_output=True,
        cwd=REPO,
        check=True,
        env={**os.environ, "NYLAS_API_KEY": API_KEY},
    )
    return json.loads(done.stdout)


def _busiest_second(arrivals: list[float]) -> int:
    arrivals.sort()
    most, start = 0, 0
    for end, moment in enumerate(arrivals):
        while moment - arrivals[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def _send_with_kills(api: FakeNylas, manifest: Path, log: Path, rows: int) -> tuple[int, dict[str, object]]:
    """Three workers, one killed (SIGKILL) every 1–3 s and another started while rows are left, with a
    fault scripted on a grant each time; returns the kills and `status --json` seen meanwhile."""
    chance = random.Random(20261205)
    workers = [_start_worker(manifest, log) for _ in range(3)]
    kills, seen = 0, {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and any(worker.poll() is None for worker in workers):
            time.sleep(chance.uniform(1.0, 3.0))
            if kills == 2:
                seen = _status(manifest)
            grant = f"grant-{chance.randrange(GRANTS)}"
            api.script(chance.choice([Fault.TIMEOUT_AFTER_SEND, Fault.NYLAS_RATE_LIMIT]), grant_id=grant)
            running = [worker for worker in workers if worker.poll() is None]
            victim = chance.choice(running) if running else None
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                kills += 1
            if len(api.deliveries) < rows:
                workers.append(_start_worker(manifest, log))
        for worker in workers:
            worker.wait(timeout=120)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return kills, seen


def test_workers_killed_at_random_mail_everyone_exactly_once(api: FakeNylas, tmp_path, database):
    rows = 600
    api.latency_s = 0.2  # each send takes a while: two workers on one grant would show in its concurrency
    for n in range(GRANTS):
        api.add_grant(f"grant-{n}", f"g{n}@example.com")
    manifest = _write_campaign(tmp_path / "shared", database, rows)
    log = tmp_path / "workers.log"
    kills, seen = _send_with_kills(api, manifest, log, rows)
    assert kills >= 3, log.read_text()[-3000:]
    workers_seen = seen["workers"]
    assert isinstance(workers_seen, list)
    live = [worker for worker in workers_seen if worker["live"]]
    assert live, workers_seen
    held = [grant for worker in live for grant in worker["grants"]]
    assert len(held) == len(set(held))  # no grant is two workers'
    assert all(set(worker) == {"id", "host", "pid", "grants", "heartbeat_at", "live"} for worker in live)
    # Whatever the kills left (rows in flight, or unknown after a replayed 504), one last worker and
    # reconcile settle; the fake says who was mailed.
    env = {**os.environ, "NYLAS_API_KEY": API_KEY, "CAMPAIGN_UNSUBSCRIBE_SECRET": SECRET}
    for command, *options in (["run", "--yes"], ["reconcile", "--min-age", "1s"], ["run", "--yes"]):
        subprocess.run(
            [sys.executable, "-m", "campaign", command, str(manifest), *options],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
    mailed = Counter(delivery.payload["to"][0]["email"] for delivery in api.deliveries)
    assert len(mailed) == rows, log.read_text()[-3000:]
    assert set(mailed.values()) == {1}, [email for email, times in mailed.items() if times > 1]
    states = _status(manifest)["states"]
    assert states == {**dict.fromkeys(states, 0), "sent": rows}
    for n in range(GRANTS):
        assert api.most_in_flight(f"grant-{n}") <= CONCURRENCY
    arrivals: dict[str, list[float]] = defaultdict(list)
    for request in api.requests:
        arrivals[request.grant_id].append(request.arrived_at_monotonic)
    for grant, times in arrivals.items():
        # The pace and its burst of one, and one more for a request the event loop held back a moment
        # under load (its slot was booked on time); two workers on one grant send 12 or more.
        assert _busiest_second(times) <= PER_SECOND + 2, grant


@pytest.mark.anyio
async def test_a_worker_gives_grants_back_when_another_joins(database, clock):
    """One worker holds all six grants; a second joins: at its next heartbeat the first stops its round
    gracefully, gives the grants back, and takes its share again; the other three are free for the second."""
    grants = [f"g{n}" for n in range(GRANTS)]
    stop = anyio.Event()
    rounds: list[tuple[str, ...]] = []
    taken: list[tuple[str, ...]] = []
    async with _shared_campaign(database, clock, "lease-rebalance") as (_, first, second):

        async def send_round(senders, round_stop):
            rounds.append(tuple(senders))
            if len(rounds) == 1:
                await second.join()
            else:
                taken.append(await second.acquire(grants, share_of(len(grants), 2)))
                stop.set()
            await round_stop.wait()
            return DispatchResult(sent=0, failed=0, unknown=0, remaining=0)

        result = await send_under_leases(
            first, with_work=lambda: grants, send_round=send_round, clock=clock, stop=stop
        )
        assert result is not None
        assert rounds[0] == tuple(grants)
        assert len(rounds) == 2
        assert len(rounds[1]) == 3
        assert len(taken[0]) == 3
        assert set(rounds[1]) | set(taken[0]) == set(grants)
        assert await first.live_workers() == 1  # the first left (its leases given back): only the second
        assert await second.acquire(grants, GRANTS) == tuple(grants)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stopped_by", "error"),
    [
        ("unreachable", "could not connect to the API; nothing was sent"),
        ("rejecting", "HTTP 402 message_rejected: Sending to at least one recipient failed."),
    ],
)
async def test_a_worker_whose_senders_stopped_for_the_run_ends_as_one_worker_would(
    database, clock, stopped_by, error
):
    """A round that ends with its senders unable to reach the API (exit 75 after it), or stopped by refused
    messages (exit 69), ends the worker, its grants given back, rather than starting round after round
    against a dead API or a refusing mailbox."""
    grants = [f"g{n}" for n in range(GRANTS)]
    stop = anyio.Event()
    rounds: list[tuple[str, ...]] = []
    async with _shared_campaign(database, clock, f"lease-{stopped_by}") as (_, first, second):

        async def send_round(senders, round_stop):
            rounds.append(tuple(senders))
            if len(rounds) > 3:
                stop.set()
            down = {stopped_by: dict.fromkeys(senders, error)}
            return DispatchResult(sent=0, failed=0, unknown=0, remaining=len(senders), **down)

        result = await send_under_leases(
            first, with_work=lambda: grants, send_round=send_round, clock=clock, stop=stop
        )
        assert result is not None
        assert len(rounds) == 1
        assert set(getattr(result, stopped_by)) == set(grants)
        assert await second.acquire(grants, GRANTS) == tuple(grants)


@pytest.mark.anyio
async def test_a_worker_waiting_for_work_due_later_stays_live_and_ends_once_none_is_left(database, clock):
    """With --wait (`wait_for_work`), a worker for which nothing is due now waits instead of ending, looking
    again at the lease interval; its heartbeat goes on meanwhile (the other workers count it in the shares,
    status shows it live) over more than a lease's life, and it ends, leaving, once nothing is left."""
    stop = anyio.Event()
    async with _shared_campaign(database, clock, "lease-waiting") as (_, waiting, other):
        await other.join()
        looks: list[float] = []
        seen: list[int] = []

        async def wait_for_work(stop: anyio.Event, most_s: float) -> bool:
            looks.append(most_s)
            await clock.wait_for(stop, waiting.expiry_s / 2)  # as long as the next follow-up is away
            await other.renew()
            seen.append(await other.live_workers())
            return len(looks) < 4  # then nothing is scheduled any more

        async def send_round(senders, round_stop):
            raise AssertionError(f"no grant had work, yet a round from {senders}")

        result = await send_under_leases(
            waiting,
            with_work=list,
            send_round=send_round,
            clock=clock,
            stop=stop,
            wait_for_work=wait_for_work,
        )
        assert result is None
        assert looks == [waiting.expiry_s / 15] * 4  # every lease interval at most
        assert seen == [2, 2, 2, 2]  # two lease lives on, still live
        assert await other.live_workers() == 1  # it left


@pytest.mark.anyio
@pytest.mark.parametrize(("held_s", "kept"), [(0.6, True), (1.6, False)])
async def test_a_renewal_the_database_holds_up_stops_the_round_only_once_the_leases_are_half_spent(
    database, held_s, kept
):
    """Leases of 2 s, renewed every 0.2 s, and another transaction holding the worker's heartbeat row for
    `held_s`, so that a renewal waits (a busy database, a loaded machine). Held up for three heartbeats,
    the renewal still answers within half the leases' life: the round goes on, and ends well. Held up
    longer, it is given up at half their life: the round stops while every lease is still live, and the
    worker says why. Real time, as the renewal's deadline is the event loop's: it cuts off a query the
    database does not answer."""
    clock = SystemClock()
    site = ledger_site(database, lease_s=2)
    name = f"held-{held_s:g}".replace(".", "-")
    site.open(clock=clock, campaign=name).close()  # the campaign's row: its leases need it
    worker = site.leases(name, clock)
    assert worker is not None
    looks = iter((["g1"], []))
    stopped: list[bool] = []
    live_when_stopped: list[bool] = []

    async def send_round(senders, round_stop):
        async with await psycopg.AsyncConnection.connect(database) as db, db.transaction():
            await db.execute("SELECT 1 FROM campaign_ledger.workers WHERE id = %s FOR UPDATE", (worker.id,))
            with anyio.move_on_after(held_s):
                await round_stop.wait()
            if round_stop.is_set():
                live_when_stopped.append(_lease_expiry(database, name) > clock.now().timestamp())
        with anyio.move_on_after(0.5):  # the renewal held up goes through, and the next one
            await round_stop.wait()
        stopped.append(round_stop.is_set())
        return DispatchResult(sent=1, failed=0, unknown=0, remaining=0)

    run = send_under_leases(
        worker, with_work=lambda: next(looks), send_round=send_round, clock=clock, stop=anyio.Event()
    )
    if kept:
        result = await run
        assert result is not None
        assert result.sent == 1
        assert stopped == [False]
    else:
        with pytest.raises(LedgerError, match="did not answer in time to renew its leases"):
            await run
        assert live_when_stopped == [True]


class _CuttableLink:
    """A TCP proxy on loopback in front of the database, which the test can cut: every connection through
    it drops, and new ones are refused (a worker that loses its database)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_a_worker_that_loses_its_database_stops_before_its_leases_expire(api: FakeNylas, tmp_path, database):
    rows = 300
    api.latency_s = 0.05
    for n in range(GRANTS):
        api.add_grant(f"grant-{n}", f"g{n}@example.com")
    parts = urlsplit(database)
    link = _CuttableLink(parts.port or 5432)
    through_link = parts._replace(netloc=f"{parts.username}@127.0.0.1:{link.port}").geturl()
    manifest = _write_campaign(tmp_path / "cut", through_link, rows)
    log = tmp_path / "worker.log"
    worker = _start_worker(manifest, log)
    try:
        _wait_for_deliveries(api, 20, log)
        link.cut()
        assert worker.wait(timeout=90) == 74
    finally:
        link.cut()
        if worker.poll() is None:
            worker.kill()
    output = log.read_text()
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-2000:]
    assert "127.0.0.1" in errors[0]
    assert len(api.deliveries) < rows  # it stopped: the rest is for the next owner
    with psycopg.connect(database) as db:  # the leases it could not give back, as it left them
        (expiry,) = db.execute(
            "SELECT min(l.expires_at) FROM campaign_ledger.leases AS l JOIN campaign_ledger.campaigns AS c "
            "ON c.id = l.campaign_id WHERE c.name = 'cut'"
        ).fetchone()
    last = max(delivery.delivered_at.timestamp() for delivery in api.deliveries)
    assert last < expiry  # nothing was sent once a lease could have expired (another worker's then)


def test_a_store_read_blocked_longer_than_a_lease_holds_the_sends_but_not_the_heartbeat(
    api: FakeNylas, tmp_path, database
):
    """The worker's unsubscribe store is in PostgreSQL, and its reads block (a lock on its table) for two
    lives of the worker's 3 s leases while the campaign runs. The sends wait for the re-read (an opt-out
    that cannot be read is never taken as none), but the event loop does not: the heartbeat renews the
    leases meanwhile (their expiry moves on, read in the database), and once the store answers the worker
    sends the rest and ends with exit 0, everyone mailed once (counted at the fake) but the recipient who
    opted out while it ran."""
    rows = 240
    api.latency_s = 0.05
    for n in range(GRANTS):
        api.add_grant(f"grant-{n}", f"g{n}@example.com")
    store_url = without_password(database)
    store = open_store(store_url, clock=SystemClock())
    manifest = _write_campaign(tmp_path / "blocked", database, rows, suppress=store_url)
    late = f"person{rows - 1:04d}@example.com"  # among the last to be sent
    log = tmp_path / "blocked.log"
    worker = _start_worker(manifest, log)
    try:
        _wait_for_deliveries(api, 20, log)
        store.record("", late, source="manual")
        with psycopg.connect(database) as db:  # one transaction: every read of the store waits for its end
            db.execute("LOCK TABLE campaign_store.unsubscribes IN ACCESS EXCLUSIVE MODE")
            blocked_at = time.time()
            while time.time() < blocked_at + 2 * 3:
                assert worker.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            expiry = _lease_expiry(database, "blocked")
        assert worker.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        store.close()
        if worker.poll() is None:
            worker.kill()
    assert expiry > blocked_at + 3  # renewed while the store's reads were blocked: no lease lapsed
    mailed = Counter(delivery.payload["to"][0]["email"] for delivery in api.deliveries)
    assert late not in mailed
    assert len(mailed) == rows - 1
    assert set(mailed.values()) == {1}


def _wait_for_deliveries(api: FakeNylas, count: int, log: Path) -> None:
    """Until the fake has `count` deliveries (a worker sending in its own process), at most a minute."""
    deadline = time.monotonic() + 60
    while len(api.deliveries) < count:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def _lease_expiry(database: str, campaign: str) -> float:
    """The latest expiry of the campaign's leases (Unix time), read in the database."""
    with psycopg.connect(database) as db:
        (expiry,) = db.execute(
            "SELECT max(l.expires_at) FROM campaign_ledger.leases AS l JOIN campaign_ledger.campaigns AS c "
            "ON c.id = l.campaign_id WHERE c.name = %s",
            (campaign,),
        ).fetchone()
    return float(expiry)


@pytest.mark.anyio
async def test_a_worker_claims_only_under_its_live_lease(database, clock):
    """Bound to a worker, the ledger records a claim only while that worker's lease on the claiming
    sender is live: after it expired (another worker may have the grant), the claim is refused and the
    row stays as it was."""
    async with _shared_campaign(database, clock, "lease-claims") as (ledger, worker, _):
        await worker.join()
        ledger.bind_worker(worker.id)
        with pytest.raises(LedgerError, match="no longer holds the lease on sender 'g1'"):
            ledger.claim("r1@example.com", sender="g1", via="grant:g1")
        assert ledger.row("r1@example.com").state == RowState.PENDING
        assert await worker.acquire(["g1"], 1) == ("g1",)
        assert ledger.claim("r1@example.com", sender="g1", via="grant:g1").fresh
        clock.advance(worker.expiry_s + 1)
        with pytest.raises(LedgerError, match="no longer holds the lease"):
            ledger.claim("r2@example.com", sender="g1", via="grant:g1")
        with pytest.raises(LedgerError, match="no longer holds the lease"):
            ledger.claim("r1@example.com", sender="g1", via="grant:g1")  # its row in flight, too
        assert ledger.row("r2@example.com").state == RowState.PENDING


def test_two_workers_started_together_share_the_grants_and_both_end_done(api: FakeNylas, tmp_path, database):
    """The second waits for the first's plan and checks nothing again; both send, each from its own
    grants, and both exit 0 once every recipient is mailed (once)."""
    rows = 240  # five seconds of sending: the second joins long before the first could be done
    for n in range(GRANTS):
        api.add_grant(f"grant-{n}", f"g{n}@example.com")
    manifest = _write_campaign(tmp_path / "pair", database, rows)
    log = tmp_path / "pair.log"
    workers = [_start_worker(manifest, log) for _ in range(2)]
    try:
        codes = [worker.wait(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    output = log.read_text()
    assert codes == [0, 0], output[-3000:]
    assert output.count(f"list.csv: checked, {rows} to send") == 1  # one plan
    assert "unchanged since it was checked" in output  # the other found it checked
    mailed = Counter(delivery.payload["to"][0]["email"] for delivery in api.deliveries)
    assert len(mailed) == rows
    assert set(mailed.values()) == {1}
    senders_by_worker = [line for line in output.splitlines() if line.startswith("This run: ")]
    assert len(senders_by_worker) == 2
    assert all(not line.startswith("This run: 0 sent") for line in senders_by_worker), output[-3000:]


def _campaign_rows(database: str, campaign: str) -> dict[str, int]:
    """The campaign's rows per state, and its live workers' and leases' rows, read from the database."""
    with psycopg.connect(database) as db:
        if db.execute("SELECT to_regclass('campaign_ledger.leases')").fetchone() == (None,):
            return {}  # no campaign has made the schema yet
        found = {
            str(state): int(count)
            for state, count in db.execute(
                "SELECT r.state, count(*) FROM campaign_ledger.recipients AS r "
                "JOIN campaign_ledger.campaigns AS c ON c.id = r.campaign_id WHERE c.name = %s "
                "GROUP BY r.state",
                (campaign,),
            )
        }
        for table in ("workers", "leases"):
            query = sql.SQL(
                "SELECT count(*) FROM campaign_ledger.{} AS t JOIN campaign_ledger.campaigns AS c "
                "ON c.id = t.campaign_id WHERE c.name = %s"
            ).format(sql.Identifier(table))
            found[table] = int(db.execute(query, (campaign,)).fetchone()[0])
    return found


def test_sigterm_settles_the_sends_in_flight_and_gives_the_leases_back_at_once(
    api: FakeNylas, tmp_path, database
):
    rows = 300
    api.latency_s = 0.1
    for n in range(GRANTS):
        api.add_grant(f"grant-{n}", f"g{n}@example.com")
    manifest = _write_campaign(tmp_path / "term", database, rows)
    log = tmp_path / "term.log"
    worker = _start_worker(manifest, log)
    try:
        _wait_for_deliveries(api, 20, log)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 130
    finally:
        if worker.poll() is None:
            worker.kill()
    found = _campaign_rows(database, "term")
    assert found["workers"] == 0  # it left
    assert found["leases"] == 0  # and gave its grants back: the next worker need not wait for expiry
    assert found.get("inflight", 0) == 0  # its sends in flight were settled and recorded
    assert found["sent"] == len(api.deliveries) < rows


def test_a_worker_killed_while_planning_leaves_no_half_plan_and_the_next_plans_again(
    api: FakeNylas, tmp_path, database
):
    rows = 40_000  # a check of a second or more
    for n in range(GRANTS):
        api.add_grant(f"grant-{n}", f"g{n}@example.com")
    manifest = _write_campaign(tmp_path / "planning", database, rows)
    log = tmp_path / "planning.log"
    planner = _start_worker(manifest, log)
    with psycopg.connect(database, autocommit=True) as db:  # it holds the plan's lock: it is checking
        deadline = time.monotonic() + 60
        while not db.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid AND granted",
            (_WRITER_LOCK,),
        ).fetchone()[0]:
            assert time.monotonic() < deadline, log.read_text()
            assert planner.poll() is None, log.read_text()
            time.sleep(0.02)
    time.sleep(0.3)
    planner.send_signal(signal.SIGKILL)
    planner.wait()
    assert _campaign_rows(database, "planning").get("pending", 0) in (0, rows)  # all or nothing
    env = {**os.environ, "NYLAS_API_KEY": API_KEY, "CAMPAIGN_UNSUBSCRIBE_SECRET": SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "campaign", "run", str(manifest), "--yes", "--limit", "12"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 75, done.stdout[-2000:] + done.stderr[-2000:]  # resumable: --limit
    found = _campaign_rows(database, "planning")
    assert found["sent"] == 12
    assert found["pending"] == rows - 12
    mailed = Counter(delivery.payload["to"][0]["email"] for delivery in api.deliveries)
    assert sum(mailed.values()) == len(mailed) == 12


def test_a_campaign_whose_plan_is_not_recorded_yet_is_neither_started_nor_done(
    cli, cli_clock, tmp_path, database
):
    """The first worker makes the campaign's row, then records the plan after the check, in a transaction of
    its own: in between (and after a kill -9 there) status says not started, not done, never "done, 0
    recipients"; every key a status has is there. Once the plan is recorded, it is counted."""
    manifest = _write_campaign(tmp_path / "unplanned", database, 3)
    site = ledger_site(database, lease_s=3)
    site.open(clock=cli_clock, campaign="unplanned").close()  # the row `open_campaign` makes before the plan
    result = cli("status", manifest, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert (status["started"], status["done"], status["total"]) == (False, False, 0)
    assert status["ledger"] == without_password(database)  # it is there: the plan is not
    expected = ["campaign", "manifest", "ledger", "started", "done", "total", "states", "skipped", "errors"]
    assert list(status)[: len(expected)] == expected
    assert {"last_errors", "removed_from_list", "next", "senders"} <= set(status)
    text = cli("status", manifest)
    assert "not started (no plan recorded yet" in text.output
    assert "done" not in text.output
    ledger = site.open(clock=cli_clock, campaign="unplanned", create=False)
    try:  # the plan committed, with its stamp, as a run records it
        rows = [PlannedRow(f"r{n}@example.com", n, f"r{n}@example.com", "g0") for n in range(3)]
        ledger.record_plan(rows, [], stamp="checked")
    finally:
        ledger.close()
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert (status["started"], status["done"], status["total"]) == (True, False, 3)


def test_a_parked_grants_rows_go_to_a_grant_another_worker_holds_through_the_ledger(
    api: FakeNylas, tmp_path, database
):
    """The worker holds g0 alone (the test holds g1's lease); a quota parks g0 for an hour. Its rows are
    given to g1 in the ledger, and sent from g1 once the worker can take it: nobody mailed twice."""
    rows = 40
    for n in range(2):
        api.add_grant(f"grant-{n}", f"g{n}@example.com")
    manifest = _write_campaign(tmp_path / "parked", database, rows, grants=2)
    site = ledger_site(database, lease_s=3)
    site.open(clock=SystemClock(), campaign="parked").close()  # the campaign's row: its leases need it
    holder = site.leases("parked", SystemClock())
    assert holder is not None
    holding, stop = threading.Event(), threading.Event()

    async def hold_g1() -> None:  # the test's worker keeps its lease on g1, as a live worker does
        await holder.join()
        assert await holder.acquire(["g1"], 1) == ("g1",)
        holding.set()
        try:
            while not stop.is_set():
                await anyio.sleep(0.3)
                await holder.renew()
        finally:
            await holder.leave()  # g1 free: the worker takes it and sends g0's rows from it

    renewing = threading.Thread(target=anyio.run, args=(hold_g1,))
    renewing.start()
    assert holding.wait(timeout=30)
    # Every request to g0 is refused, as a quota is: the lane's second send may leave before the first's
    # answer parks it.
    api.script(Fault.QUOTA_EXCEEDED, grant_id="grant-0", times=rows, retry_after_s=3600)
    log = tmp_path / "parked.log"
    worker = _start_worker(manifest, log)
    try:
        deadline = time.monotonic() + 60
        while _pending_of(database, "parked", "g0") != 0 or _pending_of(database, "parked", "g1") != rows:
            assert time.monotonic() < deadline, log.read_text()
            assert worker.poll() is None, log.read_text()
            time.sleep(0.05)
        assert not api.deliveries  # g1 is not the worker's yet
        stop.set()
        renewing.join()
        assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        stop.set()
        renewing.join()
        if worker.poll() is None:
            worker.kill()
    mailed = Counter(delivery.payload["to"][0]["email"] for delivery in api.deliveries)
    assert len(mailed) == rows
    assert set(mailed.values()) == {1}
    assert {delivery.grant_id for delivery in api.deliveries} == {"grant-1"}


def _pending_of(database: str, campaign: str, sender: str) -> int:
    with psycopg.connect(database) as db:
        return int(
            db.execute(
                "SELECT count(*) FROM campaign_ledger.recipients AS r JOIN campaign_ledger.campaigns AS c "
                "ON c.id = r.campaign_id WHERE c.name = %s AND r.sender = %s AND r.state = 'pending'",
                (campaign, sender),
            ).fetchone()[0]
        )


@pytest.mark.anyio
async def test_a_key_too_old_of_a_grant_another_live_worker_leases_is_left_to_that_worker(database, clock):
    """A starting worker turns rows in flight with keys too old to reuse into unknown, but not those of
    a grant another worker leases (it may be sending them now; its loop gives up on them itself): once
    that lease has expired, they are."""
    async with _shared_campaign(database, clock, "old-keys") as (ledger, owner, _):
        await owner.join()
        assert await owner.acquire(["g1"], 1) == ("g1",)
        ledger.claim("r1@example.com", sender="g1")
        ledger.claim("r3@example.com", sender="g2")
        while clock.monotonic() < KEY_REUSE_S + 1:  # the owner lives on, renewing its lease
            clock.advance(owner.expiry_s / 2)
            assert await owner.renew() == ("g1",)
        assert ledger.record_expired_claims() == 1  # r3: g2 is nobody's
        assert ledger.row("r1@example.com").state == RowState.INFLIGHT
        assert ledger.row("r3@example.com").state == RowState.UNKNOWN
        clock.advance(owner.expiry_s + 1)  # the owner died: its lease expired
        assert ledger.record_expired_claims() == 1
        assert ledger.row("r1@example.com").state == RowState.UNKNOWN


# --- follow-ups and --wait ------------------------------------------------------------------------

# The workers' leases in the follow-up tests: short, as the virtual clock jumps a heartbeat whenever the
# loop waits for the network (step 1's sends must stay well within the follow-up's delay).
LEASE_S = 3


@pytest.fixture(name="clocked_api")
def _clocked_api(_loopback, cli_clock, monkeypatch) -> Iterator[FakeNylas]:
    """A fake Nylas on the CLI's virtual clock (replies are looked up in the run's time), on loopback."""
    yield from serve_fake(_loopback, FakeNylas(api_key=API_KEY, clock=cli_clock), monkeypatch)


def _write_followups(folder: Path, database: str, people: list[str]) -> Path:
    """One grant, step 1 and a follow-up 30 s after it, on a PostgreSQL ledger."""
    folder.mkdir()
    (folder / "list.csv").write_text("email,name\n" + "".join(f"{email},P\n" for email in people))
    (folder / "step1.txt.j2").write_text("Hello {{ recipient.name }}\n")
    (folder / "nudge.txt.j2").write_text("Any news, {{ recipient.name }}?\n")
    manifest = folder / "campaign.toml"
    manifest.write_text(
        f'[campaign]\nname = "{folder.name}"\n\n[recipients]\nsource = "list.csv"\nname_column = "name"\n\n'
        '[message]\nsubject = "Hi {{ recipient.name }}"\ntext = "step1.txt.j2"\n\n'
        '[[followups]]\nname = "nudge"\nafter = "30s"\ntext = "nudge.txt.j2"\n\n'
        f'[ledger]\nurl = "{database}"\nlease_s = {LEASE_S}\n\n'
        '[[senders]]\nname = "ana"\ngrant_id = "grant-ana"\nemail = "ana@corp.example.com"\nper_second = 50\n'
    )
    return manifest


def _steps_delivered(fake: FakeNylas) -> Counter[tuple[str, str]]:
    """(recipient, step) -> deliveries, at the fake (a follow-up's metadata names its step)."""
    return Counter(
        (delivery.payload["to"][0]["email"], delivery.payload.get("metadata", {}).get("step", "message"))
        for delivery in fake.deliveries
    )


def test_a_waiting_worker_without_a_grant_takes_over_the_follow_ups_of_a_worker_that_died(
    clocked_api: FakeNylas, cli, cli_clock, tmp_path, database
):
    """The reporter's case: one grant, a follow-up 30 s after step 1. A worker sent step 1 and holds the
    grant while it waits for the follow-up (its lease outlives the follow-up's due time), then is killed: it
    never renews. A second worker started with --wait does not end with exit 75 because nothing is due
    yet: it waits for the follow-up, finds it due but the grant the dead worker's, takes the grant once
    that lease expired (never before), and sends the follow-ups: each (recipient, step) delivered once,
    counted at the fake; then, nothing being left, it ends with exit 0."""
    fake = clocked_api
    fake.add_grant("grant-ana", "ana@corp.example.com")
    people = [f"person{n}@example.net" for n in range(5)]
    manifest = _write_followups(tmp_path / "waiting", database, people)
    first = cli("run", manifest, "--yes")  # the first worker's step 1; its follow-ups are scheduled
    assert first.exit_code == 75, first.output
    assert _steps_delivered(fake) == Counter({(email, "message"): 1 for email in people})
    dead_lease_s = 60  # beyond the follow-up's due time: the grant is still the dead worker's then

    async def hold_and_die() -> None:  # the first worker, waiting for the follow-up with the grant, killed
        dead = ledger_site(database, lease_s=dead_lease_s).leases("waiting", cli_clock)
        assert dead is not None
        await dead.join()
        assert await dead.acquire(["ana"], 1) == ("ana",)
        await dead.close()  # no leave, no renewal: kill -9

    anyio.run(hold_and_die)
    lapsed = cli_clock.now() + timedelta(seconds=dead_lease_s)
    due = min(delivery.delivered_at for delivery in fake.deliveries) + timedelta(seconds=30)
    assert due < lapsed
    second = cli("run", manifest, "--yes", "--wait")
    assert second.exit_code == 0, second.output
    assert "5 follow-ups scheduled; waiting for the next one" in second.output
    every_step = Counter({(email, step): 1 for email in people for step in ("message", "nudge")})
    assert _steps_delivered(fake) == every_step
    nudges = [delivery for delivery in fake.deliveries if delivery.payload.get("metadata", {}).get("step")]
    assert {delivery.grant_id for delivery in nudges} == {"grant-ana"}
    assert min(delivery.delivered_at for delivery in nudges) >= lapsed  # the dead worker's grant until then
    states = json.loads(cli("status", manifest, "--json").stdout)["states"]
    assert (states["sent"], states["pending"]) == (2 * len(people), 0)


def test_a_waiting_worker_schedules_follow_ups_a_killed_worker_left_unscheduled(
    clocked_api: FakeNylas, cli, cli_clock, tmp_path, database
):
    """A worker killed between step 1's sends and scheduling their follow-ups leaves no follow-up row: a
    --wait worker that finds nothing due or scheduled schedules what was sent before it ends, so the
    follow-ups go out (counted at the fake) instead of a silent gap behind an exit 0."""
    fake = clocked_api
    fake.add_grant("grant-ana", "ana@corp.example.com")
    people = [f"person{n}@example.net" for n in range(3)]
    manifest = _write_followups(tmp_path / "unscheduled", database, people)
    assert cli("run", manifest, "--yes").exit_code == 75
    with psycopg.connect(database, autocommit=True) as db:  # the state a kill -9 before scheduling leaves
        removed = db.execute(
            "DELETE FROM campaign_ledger.recipients WHERE step = 'nudge' AND campaign_id = "
            "(SELECT id FROM campaign_ledger.campaigns WHERE name = 'unscheduled')"
        ).rowcount
    assert removed == len(people)
    second = cli("run", manifest, "--yes", "--wait")
    assert second.exit_code == 0, second.output
    every_step = Counter({(email, step): 1 for email in people for step in ("message", "nudge")})
    assert _steps_delivered(fake) == every_step
