"""The HTTP layer alone: httpcore (stock httpx), a bigger pool, and campaign's transport.

    python -m benchmarks.transport                        # every variant at 1, 8, 32 and 64 in flight
    python -m benchmarks.transport --requests 3000 --concurrency 32 --variant campaign

Serves the fake (benchmarks/server.py, 20 grants, no latency) in another process and,
for each variant, runs a child that sends N newsletter-sized messages through
`campaign.nylas.NylasClient` over `build_http_client(transport=…)` with C requests
in flight, spread over the grants (the fake allows 200/s per grant). Each child
reports requests/s and its own CPU milliseconds per request (getrusage), which is
what the client can control: the server shares the same two cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.data import API_KEY, grant_id
from benchmarks.patches import apply_patches, build_transport

__all__ = ["VARIANTS", "main"]

GRANTS = 20
# name -> (transport, patches). "campaign" is build_http_client's default (ApiTransport, aiohttp);
# answers are parsed with orjson in every variant (campaign.nylas._answers), bodies too unless "stdlib-json".
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "httpcore": ("stock", ("stdlib-json",)),
    "httpcore-pool": ("pool", ("stdlib-json",)),
    "campaign+stdlib-json": ("campaign", ("stdlib-json",)),
    "campaign": ("campaign", ()),
}
BODY = "<p>" + "Spring news for you, with a story or two and a button. " * 70 + "</p>"


async def _send_all(port: int, transport_kind: str, requests: int, concurrency: int) -> float:
    import anyio

    from campaign.clock import SystemClock
    from campaign.models import Address, Message
    from campaign.nylas import NylasClient, build_http_client, build_send_request

    stamp = time.time_ns()
    http = build_http_client(
        base_url=f"http://127.0.0.1:{port}", timeout_s=30, transport=build_transport(transport_kind)
    )
    failures = 0
    async with http:
        client = NylasClient(http, api_key=API_KEY, clock=SystemClock())

        async def worker(first: int) -> None:
            nonlocal failures
            for number in range(first, requests, concurrency):
                to = Address(f"user{number}@example.com")
                message = Message(to.email, number, "s", (to,), f"Hello {number}", html=BODY)
                outcome = await client.send_message(
                    grant_id(1 + number % GRANTS),
                    build_send_request(message),
                    idempotency_key=f"t{stamp}-{number}",
                )
                failures += outcome.status != 200

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for first in range(concurrency):
                group.start_soon(worker, first)
        elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(f"{failures} of {requests} requests were not accepted")
    return elapsed


def _child(args: argparse.Namespace) -> None:
    import anyio

    kind, patches = VARIANTS[args.variant]
    apply_patches(patches)
    before = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = anyio.run(_send_all, args.port, kind, args.requests, args.concurrency)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"per_s": round(args.requests / elapsed), "cpu_ms": round(1000 * cpu / args.requests, 3)}
    print(json.dumps(result))


def _measure(variant: str, concurrency: int, requests: int, folder: Path) -> dict[str, Any]:
    port = procs.free_port()
    server_args = ["-m", "benchmarks.server", "--port", str(port), "--grants", str(GRANTS)]
    with procs.serve(server_args, port=port, log=folder / "server.log"):
        before = procs.fetch_stats(port)["cpu_s"]
        command = [sys.executable, "-m", "benchmarks.transport", "--child", "--port", str(port)]
        command += ["--variant", variant, "--requests", str(requests), "--concurrency", str(concurrency)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=procs.child_env())
        after = procs.fetch_stats(port)["cpu_s"]
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"server_cpu_ms": round(1000 * (after - before) / requests, 3)}


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table: variant, in flight, requests/s, client and server CPU ms per request."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--concurrency", action="append", type=int)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.variant = args.variant[0]
        args.concurrency = args.concurrency[0]
        _child(args)
        return 0
    import statistics
    import tempfile

    print("| variant | in flight | requests/s | client CPU ms/request | server CPU ms/request |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variant or list(VARIANTS):
            for concurrency in args.concurrency or [1, 8, 32, 64]:
                runs = [
                    _measure(variant, concurrency, args.requests, Path(scratch)) for _ in range(args.runs)
                ]
                runs.sort(key=lambda run: run["per_s"])
                middle = runs[(len(runs) - 1) // 2]
                client = statistics.median(run["cpu_ms"] for run in runs)
                server = statistics.median(run["server_cpu_ms"] for run in runs)
                print(
                    f"| {variant} | {concurrency} | {middle['per_s']:,} | {client:.2f} | {server:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
