"""Child processes for the benchmark cases: a fake API server, and the `campaign` command under measurement.

Servers are started by the case and stopped by their own process id (SIGINT, then
SIGKILL if they do not stop). The command runs through `benchmarks.measured`, which
reports its getrusage; this module adds its wall time, measured here from spawn to exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Measured",
    "Server",
    "child_env",
    "fetch_stats",
    "free_port",
    "run_measured",
    "run_timed",
    "serve",
    "spawn_measured",
    "stop_process",
    "wait_measured",
]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Measured:
    """A finished `campaign` command: exit code, wall seconds (spawn to exit), its own rusage."""

    code: int
    wall_s: float
    rusage: dict[str, float]
    log: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The children import campaign and benchmarks from this checkout, whatever the current folder.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("COLUMNS", "120")
    env |= dict(extra or {})
    return env


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {START_TIMEOUT_S:g} s")


def _reap(process: subprocess.Popen[bytes], *, timeout_s: float | None) -> dict[str, float] | None:
    """Wait for `process` with os.wait4 (which gives that one child's CPU and peak RSS); None on timeout."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return {
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            }
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def stop_process(process: subprocess.Popen[bytes]) -> dict[str, float]:
    """Stop a process this module started (SIGINT, then SIGKILL after a grace period); its rusage."""
    if process.returncode is not None:
        return {}
    process.send_signal(signal.SIGINT)
    usage = _reap(process, timeout_s=STOP_TIMEOUT_S)
    if usage is None:
        process.kill()
        usage = _reap(process, timeout_s=None)
    return usage or {}


def run_timed(
    command: Sequence[str], *, cwd: Path, out: Path, env: Mapping[str, str] | None = None, timeout_s: float
) -> tuple[int, float, dict[str, float]]:
    """Run any command to its end, stdout and stderr to `out`: exit code, wall seconds, its rusage."""
    with out.open("wb") as handle:
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(env),
        )
    usage = _reap(process, timeout_s=timeout_s)
    if usage is None:
        stop_process(process)
        raise RuntimeError(f"{command[0]} did not finish within {timeout_s:g} s")
    return int(process.returncode or 0), round(time.monotonic() - started, 3), usage


@dataclass
class Server:
    """A server process started by `serve`; `rusage` is filled in once it has been stopped."""

    process: subprocess.Popen[bytes]
    port: int
    rusage: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def serve(
    args: Sequence[str],
    *,
    port: int,
    log: Path,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """Run `PYTHON ARGS…` (a server listening on `port`) for the duration of the block."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [python, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(env),
        )
    server = Server(process, port)
    try:
        _wait_listening(port, process, log)
        yield server
    finally:
        server.rusage = stop_process(process)


def fetch_stats(port: int) -> dict[str, Any]:
    """The bench server's `GET /_bench/stats` (plain sockets: no client library in the measurement)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /_bench/stats HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stats request failed: {head[:80]!r}")
    stats: dict[str, Any] = json.loads(body)
    return stats


def spawn_measured(
    args: Sequence[str],
    *,
    folder: Path,
    name: str,
    env: Mapping[str, str] | None = None,
    patches: Sequence[str] = (),
    profile: Path | None = None,
) -> tuple[subprocess.Popen[bytes], float, Path]:
    """Start `campaign ARGS…` under benchmarks.measured: the process, its start (monotonic), its report."""
    report = folder / f"{name}.rusage.jsonl"
    report.unlink(missing_ok=True)
    log = folder / f"{name}.log"
    patch_args = [arg for patch in patches for arg in ("--patch", patch)]
    if profile is not None:
        patch_args += ["--profile", str(profile)]
    command = [sys.executable, "-m", "benchmarks.measured", "--report", str(report), *patch_args, "--", *args]
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(env)
        )
    return process, started, report


def wait_measured(
    process: subprocess.Popen[bytes], started: float, report: Path, *, timeout_s: float | None = None
) -> Measured:
    """Wait for a command from `spawn_measured` and collect its exit code, wall time and rusage."""
    try:
        code = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop_process(process)
        raise
    wall = time.monotonic() - started
    lines = report.read_text(encoding="utf-8").splitlines() if report.exists() else []
    rusage = json.loads(lines[-1]) if lines else {}
    log = report.with_name(report.name.replace(".rusage.jsonl", ".log"))
    return Measured(code, round(wall, 3), rusage, log)


def run_measured(
    args: Sequence[str],
    *,
    folder: Path,
    name: str,
    env: Mapping[str, str] | None = None,
    patches: Sequence[str] = (),
    profile: Path | None = None,
    timeout_s: float | None = None,
    ok_codes: Sequence[int] = (0,),
) -> Measured:
    """Run `campaign ARGS…` to its end; raise with its output if it exits with another code."""
    process, started, report = spawn_measured(
        args, folder=folder, name=name, env=env, patches=patches, profile=profile
    )
    measured = wait_measured(process, started, report, timeout_s=timeout_s)
    if measured.code not in ok_codes:
        tail = measured.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"campaign {' '.join(args)} exited {measured.code}:\n{tail}")
    return measured
