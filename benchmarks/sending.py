"""The cases that run the real `campaign` command against a fake API in another process.

- send: `campaign sandbox MANIFEST` serves the fake (200/s per grant, as Nylas);
  `campaign run MANIFEST --yes` sends 20,000 messages through it with the durable
  ledger. The figure is the send phase's rate from the ledger (first claim to last
  `sent_at`); the table's wall time is the whole command, preflight included.
- latency: benchmarks/server.py serves the fake with 200 ms latency; 20 senders at
  10/s; the figure is the accepted requests' rate at the server over 200/s.
- resume: a 1,000,000-row ledger with 900,000 sent; `campaign resume --yes --limit 1`;
  the figure is from spawning the command to the first request arriving at the server.
- resume-open: the same on a 1,000,000-row ledger with nothing sent (every row open).
- resume-appended: the resume case after 10,000 rows were appended to its list (the plan stamp no
  longer matches, the rules stamp does: only the new rows are rendered).
- resume-appended-invalid: the same with every 10,000th row of the list skipped as invalid before
  (the rows skipped are not read again either).
- fresh-run, fresh-run-10m: a first `campaign run --yes --limit 1` of 1,000,000 (10,000,000) rows;
  the figures are the time from spawning it to the first request, and its peak RSS.
- status: `campaign status --json` on that ledger; the figure is the command's wall time.
- status-fresh: the same on a fresh campaign's 1,000,000-row ledger (every row pending).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.child import SECRET, Options
from benchmarks.data import API_KEY

__all__ = [
    "read_send_span",
    "run_fresh",
    "run_latency",
    "run_resume",
    "run_send",
    "run_status",
    "sending_env",
]

SEND_TIMEOUT_S = 900.0
FIRST_REQUEST_TIMEOUT_S = 600.0


def sending_env(port: int) -> dict[str, str]:
    return {
        "NYLAS_API_URI": f"http://127.0.0.1:{port}",
        "NYLAS_API_KEY": API_KEY,
        "BENCH_UNSUBSCRIBE_SECRET": SECRET[0].decode(),
    }


def _fresh_ledger(folder: Path) -> None:
    for path in folder.glob("campaign.ledger.sqlite*"):
        path.unlink()


def read_send_span(ledger: Path) -> tuple[int, float, int]:
    """Rows sent, the seconds from the first claim to the last `sent_at` (the send phase), and retries.

    Retries are attempts beyond one per sent row: each is a 429 from the fake (or another
    definite "not sent"), which also halves the sender's pace for a while.
    """
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        sent, first, last, attempts = db.execute(
            "SELECT count(*), min(first_claimed_at), max(sent_at), sum(attempts) FROM recipients "
            "WHERE state = 'sent'"
        ).fetchone()
    finally:
        db.close()
    if not sent:
        return 0, 0.0, 0
    span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return int(sent), span, int(attempts) - int(sent)


def run_send(options: Options) -> dict[str, Any]:
    """Case send: the whole `campaign run` against `campaign sandbox` on loopback."""
    folder = options.folder
    manifest = str(folder / "campaign.toml")
    _fresh_ledger(folder)
    port = procs.free_port()
    sandbox = ["-m", "campaign", "sandbox", manifest, "--port", str(port)]
    with procs.serve(sandbox, port=port, log=folder / "sandbox.log") as server:
        measured = procs.run_measured(
            ["run", manifest, "--yes"],
            folder=folder,
            name="send",
            env=sending_env(port),
            patches=options.patches,
            profile=options.profile,
            timeout_s=SEND_TIMEOUT_S,
        )
    rows = options.params["rows"]
    sent, span, retries = read_send_span(folder / "campaign.ledger.sqlite")
    rate = (sent - 1) / span if span > 0 else 0.0
    return {
        "value": round(rate),
        "figure": f"{rate:,.0f} msg/s sending ({rows / measured.wall_s:,.0f}/s end to end)",
        "passed": sent == rows and rate >= 1500,
        "details": {
            "sent": sent,
            "send_phase_s": round(span, 3),
            "retries": retries,
            "end_to_end_per_s": round(rows / measured.wall_s),
            "server_cpu_s": server.rusage.get("cpu_s"),
            "client_cpu_ms_per_message": round(1000 * measured.rusage.get("cpu_s", 0) / max(1, sent), 3),
            "patches": list(options.patches),
        },
        "rusage": measured.rusage,
        "wall_s": measured.wall_s,
    }


def _bench_server(port: int, *, grants: int, latency_ms: float) -> list[str]:
    return [
        "-m",
        "benchmarks.server",
        "--port",
        str(port),
        "--grants",
        str(grants),
        "--latency-ms",
        str(latency_ms),
    ]


def run_latency(options: Options) -> dict[str, Any]:
    """Case latency: 20 senders at 10/s each against 200 ms of server latency."""
    folder, params = options.folder, options.params
    manifest = str(folder / "campaign.toml")
    _fresh_ledger(folder)
    port = procs.free_port()
    args = _bench_server(port, grants=params["senders"], latency_ms=params["latency_ms"])
    with procs.serve(args, port=port, log=folder / "server.log") as server:
        measured = procs.run_measured(
            ["run", manifest, "--yes"],
            folder=folder,
            name="latency",
            env=sending_env(port),
            patches=options.patches,
            profile=options.profile,
            timeout_s=SEND_TIMEOUT_S,
        )
        stats = procs.fetch_stats(server.port)
    allowed = params["senders"] * params["per_second"]
    span = (stats["last_accepted"] or 0) - (stats["first_accepted"] or 0)
    rate = (stats["accepted"] - 1) / span if span > 0 else 0.0
    share = 100 * rate / allowed
    # CPU a message on each side (the client's whole run: its check and start too): at `allowed` a second
    # the two together may use at most the machine's cores (a fake needing more than them caps the rate).
    client_ms = 1000 * measured.rusage.get("cpu_s", 0.0) / max(1, stats["accepted"])
    fake_ms = 1000 * stats["cpu_s"] / max(1, stats["requests"])
    cores = (client_ms + fake_ms) * allowed / 1000
    return {
        "value": round(share, 2),
        "figure": (
            f"{rate:,.1f}/s = {share:.1f}% of {allowed:g}/s (CPU a message: client's run {client_ms:.2f} ms, "
            f"fake {fake_ms:.2f} ms; {cores:.1f} cores at {allowed:g}/s)"
        ),
        "passed": stats["accepted"] == params["rows"] and share >= 99,
        "details": {
            "server": stats,
            "allowed_per_s": allowed,
            "achieved_per_s": round(rate, 2),
            "client_cpu_ms_per_message": round(client_ms, 3),
            "fake_cpu_ms_per_message": round(fake_ms, 3),
            "cores_needed_at_allowed": round(cores, 2),
        },
        "rusage": measured.rusage,
        "wall_s": measured.wall_s,
    }


def _ledger_copy(options: Options) -> str:
    """Put a fresh copy of the prepared ledger where the manifest expects it; the manifest's path."""
    folder = options.folder
    _fresh_ledger(folder)
    shutil.copyfile(folder / "pristine.ledger.sqlite", folder / "campaign.ledger.sqlite")
    return str(folder / "campaign.toml")


def run_resume(options: Options) -> dict[str, Any]:
    """Cases resume, resume-open and resume-appended(-invalid): from spawning `campaign resume` to the first
    request arriving at the fake."""
    manifest = _ledger_copy(options)
    result = _first_request(options, ["resume", manifest, "--yes", "--limit", "1"])
    result["passed"] = result["value"] <= options.params.get("limit_s", 3)
    return result


def run_fresh(options: Options) -> dict[str, Any]:
    """Cases fresh-run and fresh-run-10m: a first `campaign run` of the whole list, from spawning it to
    the first request at the fake, and its peak RSS (the check streams: memory flat in list size)."""
    folder = options.folder
    _fresh_ledger(folder)
    result = _first_request(options, ["run", str(folder / "campaign.toml"), "--yes", "--limit", "1"])
    peak_mb = result["rusage"].get("peak_rss_mb", 0.0)
    limits = options.params
    result["figure"] += f", peak RSS {peak_mb:,.0f} MB"
    result["passed"] = result["value"] <= limits["first_s"] and peak_mb <= limits["peak_mb"]
    return result


def _first_request(options: Options, command: list[str]) -> dict[str, Any]:
    """Spawn `campaign <command>` against the bench server; the seconds to the first request arriving."""
    params = options.params
    port = procs.free_port()
    args = _bench_server(port, grants=params["senders"], latency_ms=0)
    with procs.serve(args, port=port, log=options.folder / "server.log") as server:
        process, started, report = procs.spawn_measured(
            command,
            folder=options.folder,
            name=command[0],
            env=sending_env(port),
            patches=options.patches,
            profile=options.profile,
        )
        first = None
        deadline = time.monotonic() + FIRST_REQUEST_TIMEOUT_S
        while first is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            first = procs.fetch_stats(server.port)["first_arrival"]
        measured = procs.wait_measured(process, started, report, timeout_s=SEND_TIMEOUT_S)
        first = first if first is not None else procs.fetch_stats(server.port)["first_arrival"]
    if first is None:
        raise RuntimeError(f"no request reached the fake; see {measured.log}")
    to_first = first - started
    return {
        "value": round(to_first, 3),
        "figure": f"first request after {to_first:.2f} s",
        "passed": True,
        "details": {"rows": params["rows"], "sent_before": params.get("sent", 0), "exit": measured.code},
        "rusage": measured.rusage,
        "wall_s": measured.wall_s,
    }


def run_status(options: Options) -> dict[str, Any]:
    """Case status: the wall time of `campaign status --json` on the prepared ledger."""
    manifest = _ledger_copy(options)
    measured = procs.run_measured(
        ["status", manifest, "--json"], folder=options.folder, name="status", profile=options.profile
    )
    return {
        "value": measured.wall_s,
        "figure": f"{measured.wall_s:.2f} s",
        "passed": measured.wall_s <= options.params.get("limit_s", 1.0),
        "details": {"rows": options.params["rows"], "in_process_s": measured.rusage.get("in_process_s")},
        "rusage": measured.rusage,
        "wall_s": measured.wall_s,
    }
