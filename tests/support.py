"""Helpers shared by the engine and server tests: jobs, a plain message, inline writes, a port wait, and
`campaign serve` over a store another writer may hold."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign.clock import Clock
from campaign.ledger import PlanSpool
from campaign.manifest import Manifest
from campaign.models import Address, Message, Recipient, Skip
from campaign.pipeline import Preflight, run_preflight
from campaign.pipeline._resume import jobs_at
from campaign.plan import Job
from campaign.testing import FakeNylas, serve_on_loopback
from campaign.unsubscribe import SuppressionStore


def make_jobs(count: int, sender: str = "a", start: int = 1, *, pinned: bool = False) -> list[Job]:
    """`count` jobs for r{start}@example.com … assigned to `sender` (pinned to it by the list if asked)."""
    return [
        Job(
            Recipient(
                key=f"r{n}@example.com",
                row=n,
                address=Address(f"r{n}@example.com", f"R {n}"),
                fields={"email": f"r{n}@example.com"},
                sender=sender if pinned else None,
            ),
            sender,
        )
        for n in range(start, start + count)
    ]


@dataclass(frozen=True)
class CheckedPlan:
    """What `run_preflight` found, and the plan it wrote read back whole (small lists only)."""

    preflight: Preflight
    jobs: list[Job]
    skips: list[Skip]

    @property
    def problems(self) -> tuple[str, ...]:
        return self.preflight.problems

    def render(self, job: Job) -> Message:
        return self.preflight.render(job)


def check_plan(manifest: Manifest, **options: Any) -> CheckedPlan:
    """`run_preflight` into a fresh spool; the jobs (rebuilt from the cells the plan recorded, as a run's
    `LedgerJobs` rebuilds them) and skips it wrote."""
    with PlanSpool() as spool:
        preflight = run_preflight(manifest, spool, **options)
        planned, skips = list(spool.planned()), list(spool.skips())
    return CheckedPlan(preflight, jobs_at(manifest.recipients, planned), skips)


def fake_with_grants(api_key: str, names: Sequence[str]) -> FakeNylas:
    """A fake Nylas with a grant `grant-NAME` for each sender name, mailbox `NAME@corp.example.com`."""
    fake = FakeNylas(api_key=api_key)
    for name in names:
        fake.add_grant(f"grant-{name}", f"{name}@corp.example.com")
    return fake


def render_plain(job: Job, *, campaign: str = "test") -> Message:
    """A small HTML message for `job`, with the metadata reconcile looks up."""
    return Message(
        recipient_key=job.recipient.key,
        row=job.recipient.row,
        sender=job.sender,
        to=(job.recipient.address,),
        subject=f"Hello {job.recipient.row}",
        html=f"<p>Hi {job.recipient.row}</p>",
        metadata=(("key1", campaign), ("key2", job.recipient.key)),
    )


async def run_inline(call: Callable[[], Any]) -> Any:
    """Run ledger writes on the loop: on virtual time a worker thread would let the clock jump past them."""
    return call()


def wait_until_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    """Poll (bounded to ~10 s) until the port accepts connections; fail fast if the process exits."""
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.05).close()
            return
        except OSError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.05)
            assert process.returncode is None, "the server process exited early"
    raise AssertionError(f"nothing listens on port {port}")


@contextlib.contextmanager
def serve_sandbox(manifest: Path, *options: str) -> Iterator[str]:
    """`campaign sandbox MANIFEST [OPTIONS]` as a process on a free loopback port; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "campaign", "sandbox", str(manifest), "--port", str(port), *options]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
        try:
            wait_until_listening(port, server)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()


@contextlib.contextmanager
def refusing_url() -> Iterator[str]:
    """The URL of a loopback port that is bound but never listens: every connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def tcp_keepalive(connection: Any) -> tuple[int, int, int, int, int]:
    """What the socket of a psycopg `connection` is set to send when idle, and how long it lets sent data
    go unacknowledged, as the kernel holds it: (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT,
    TCP_USER_TIMEOUT in ms). Linux's names; a TCP connection only."""
    with socket.socket(fileno=os.dup(connection.fileno())) as sock:
        assert sock.family in (socket.AF_INET, socket.AF_INET6), "the test server must be reached over TCP"
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )


@contextlib.contextmanager
def serve_events(
    where: Path | str, clock: Clock, *, webhook_secret: bytes, unsubscribe_secret: str
) -> Iterator[tuple[SuppressionStore, str]]:
    """`campaign serve`'s app over the store at `where` (opened now), on loopback: (its store, its webhook
    URL)."""
    from campaign.unsubscribe import open_store, parse_secrets
    from campaign.web import EventService, UnsubscribeEndpoint

    store = open_store(where, clock=clock)
    endpoint = UnsubscribeEndpoint(store, secrets=parse_secrets(unsubscribe_secret))
    service = EventService(endpoint, webhook_secrets=[webhook_secret], clock=clock)
    try:
        with serve_on_loopback(service) as url:
            yield store, f"{url}/nylas/webhook"
    finally:
        store.close()


@contextlib.contextmanager
def store_held(where: Path | str) -> Iterator[None]:
    """Another writer holds the unsubscribe store's write lock for the block (a long import elsewhere, a
    stalled machine): the store's own writes wait for it, then fail with StoreError."""
    import sqlite3

    import psycopg

    import campaign.unsubscribe._pgstore as pgstore_module

    if isinstance(where, Path):
        with contextlib.closing(sqlite3.connect(where, isolation_level=None)) as file:
            file.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                file.execute("ROLLBACK")
        return
    with psycopg.connect(where) as database:
        lock = (pgstore_module._LOCK_CLASS, pgstore_module._WRITING)
        database.execute("SELECT pg_advisory_xact_lock(%s, %s)", lock)
        try:
            yield
        finally:
            database.rollback()


def short_store_waits(monkeypatch: Any) -> None:
    """A store's write gives up on another writer after 0.3 s instead of 5 s (stores opened after this)."""
    import campaign.unsubscribe._pgstore as pgstore_module
    import campaign.unsubscribe._sqlitestore as sqlitestore_module

    monkeypatch.setattr(sqlitestore_module, "_BUSY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(pgstore_module, "_LOCK_TIMEOUT_S", 0.3)
