"""The cases of issue 18: the ledger in PostgreSQL, one worker or several, and a worker's grants taken over.

- send-postgres, send-postgres-3: the send case (`campaign sandbox` serving the fake, no limits to
  speak of) with the campaign's ledger in a fresh PostgreSQL database, sent by one `campaign run`, or
  by three at once on this machine, sharing the grants under leases. The figure is the send phase's
  rate from the ledger (first claim to last `sent_at`), as the send case reads it from SQLite.
- takeover: two workers share four grants at a pace that leaves them work; one is killed (SIGKILL).
  The figure is the time from the kill to the first send claimed, by the other worker, on a grant the
  dead one held: its leases must expire first (`lease_s`), then the next owner takes them.

The database is made on the server CAMPAIGN_BENCH_DATABASE_URL names (else CAMPAIGN_TEST_DATABASE_URL,
else postgres on 127.0.0.1:5432) and dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from benchmarks import procs
from benchmarks.child import Options
from benchmarks.sending import SEND_TIMEOUT_S, sending_env

__all__ = ["run_send_postgres", "run_takeover"]

_SERVER = os.environ.get(
    "CAMPAIGN_BENCH_DATABASE_URL",
    os.environ.get("CAMPAIGN_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)


@contextlib.contextmanager
def _fresh_database() -> Iterator[str]:
    name = f"campaign_bench_{secrets.token_hex(6)}"
    with psycopg.connect(_SERVER, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(_SERVER)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(_SERVER, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _with_ledger(folder: Path, url: str, *, lease_s: float = 30) -> Path:
    """A copy of the case's manifest with its ledger in the database at `url`."""
    # A SQLite ledger another case left in this folder holds the same campaign: campaign would refuse
    # to start it over in the database (it would mail everyone again).
    for path in folder.glob("*.ledger.sqlite*"):
        path.unlink()
    manifest = folder / "campaign-postgres.toml"
    text = (folder / "campaign.toml").read_text(encoding="utf-8")
    manifest.write_text(f'{text}\n[ledger]\nurl = "{url}"\nlease_s = {lease_s}\n', encoding="utf-8")
    return manifest


def _send_span(url: str) -> tuple[int, float]:
    """Rows sent, and the seconds from the first claim to the last `sent_at` (the send phase)."""
    with psycopg.connect(url) as db:
        sent, first, last = db.execute(
            "SELECT count(*), min(first_claimed_at), max(sent_at) FROM campaign_ledger.recipients "
            "WHERE state = 'sent'"
        ).fetchone() or (0, None, None)
    if not sent:
        return 0, 0.0
    return int(sent), (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()


def run_send_postgres(options: Options) -> dict[str, Any]:
    """Cases send-postgres and send-postgres-3: the send case with the ledger in PostgreSQL."""
    folder, params = options.folder, options.params
    workers = params["workers"]
    port = procs.free_port()
    with _fresh_database() as url:
        manifest = str(_with_ledger(folder, url))
        sandbox = ["-m", "campaign", "sandbox", manifest, "--port", str(port)]
        with procs.serve(sandbox, port=port, log=folder / "sandbox.log"):
            started = [
                procs.spawn_measured(
                    ["run", manifest, "--yes"],
                    folder=folder,
                    name=f"worker-{number}",
                    env=sending_env(port),
                    patches=options.patches,
                    profile=options.profile if number == 1 else None,
                )
                for number in range(1, workers + 1)
            ]
            measured = [procs.wait_measured(*spawned, timeout_s=SEND_TIMEOUT_S) for spawned in started]
        sent, span = _send_span(url)
    for run in measured:
        if run.code != 0:
            raise RuntimeError(f"a worker exited {run.code}:\n{run.log.read_text(errors='replace')[-3000:]}")
    rows = params["rows"]
    rate = (sent - 1) / span if span > 0 else 0.0
    first = measured[0]
    return {
        "value": round(rate),
        "figure": f"{rate:,.0f} msg/s sending, {workers} worker{'s' * (workers > 1)}",
        "passed": sent == rows,
        "details": {
            "sent": sent,
            "send_phase_s": round(span, 3),
            "workers": workers,
            "worker_wall_s": [run.wall_s for run in measured],
            "worker_cpu_s": [run.rusage.get("cpu_s") for run in measured],
        },
        "rusage": first.rusage,
        "wall_s": max(run.wall_s for run in measured),
    }


def _holders(url: str) -> dict[int, list[str]]:
    """Worker pid -> the grants it holds a lease on now."""
    with psycopg.connect(url) as db:
        if db.execute("SELECT to_regclass('campaign_ledger.leases')").fetchone() == (None,):
            return {}  # the first worker has not made the schema yet
        rows = db.execute(
            "SELECT w.pid, l.sender FROM campaign_ledger.leases AS l JOIN campaign_ledger.workers AS w "
            "ON w.campaign_id = l.campaign_id AND w.id = l.owner WHERE l.expires_at > %s",
            (time.time(),),
        ).fetchall()
    held: dict[int, list[str]] = {}
    for pid, sender in rows:
        held.setdefault(int(pid), []).append(str(sender))
    return held


def _first_claim_after(url: str, senders: list[str], moment: datetime) -> datetime | None:
    with psycopg.connect(url) as db:
        found = db.execute(
            "SELECT min(claimed_at) FROM campaign_ledger.recipients "
            "WHERE sender = ANY(%s) AND claimed_at > %s",
            (senders, moment.isoformat(timespec="milliseconds")),
        ).fetchone()
    return None if found is None or found[0] is None else datetime.fromisoformat(found[0])


def run_takeover(options: Options) -> dict[str, Any]:
    """Case takeover: from a worker's SIGKILL to its grants sending again under the other worker."""
    folder, params = options.folder, options.params
    lease_s = params["lease_s"]
    port = procs.free_port()
    with _fresh_database() as url:
        manifest = str(_with_ledger(folder, url, lease_s=lease_s))
        sandbox = ["-m", "campaign", "sandbox", manifest, "--port", str(port)]
        with procs.serve(sandbox, port=port, log=folder / "sandbox.log"):
            spawned = [
                procs.spawn_measured(
                    ["run", manifest, "--yes"], folder=folder, name=f"worker-{n}", env=sending_env(port)
                )
                for n in (1, 2)
            ]
            pids = {process.pid for process, _, _ in spawned}
            deadline = time.monotonic() + 120
            while set(held := _holders(url)) != pids:  # each worker holds its share
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the workers never both held grants: {held}")
                time.sleep(0.05)
            victim, _, _ = spawned[0]
            orphaned = held[victim.pid]
            killed_at = datetime.now(UTC)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            taken = None
            while taken is None and time.monotonic() < deadline:
                time.sleep(0.02)
                taken = _first_claim_after(url, orphaned, killed_at)
            survivor = procs.wait_measured(*spawned[1], timeout_s=SEND_TIMEOUT_S)
        sent, _ = _send_span(url)
    if taken is None:
        raise RuntimeError("the dead worker's grants never sent again")
    seconds = (taken - killed_at).total_seconds()
    return {
        "value": round(seconds, 2),
        "figure": f"{seconds:.1f} s from SIGKILL to its grants sending again (lease {lease_s:g} s)",
        "passed": seconds <= lease_s + 5 and sent == params["rows"] and survivor.code == 0,
        "details": {"orphaned": orphaned, "lease_s": lease_s, "sent": sent, "survivor_exit": survivor.code},
        "rusage": survivor.rusage,
        "wall_s": survivor.wall_s,
    }
