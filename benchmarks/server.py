"""The fake Nylas API in its own process, with server latency and an arrival log the harness can read.

`campaign sandbox` serves the fake but has no latency option and no way to ask when
requests arrived, so the latency and resume cases serve `campaign.testing.FakeNylas`
through `campaign.testing.run_sandbox_server` here, with `latency_s` set and grants
`grant-01` … `grant-NN`. `GET /_bench/stats` answers the send requests' count, status
counts, first arrival and the span of the accepted ones, on `time.monotonic()` (one
clock for every process on Linux, so a caller can compare it with its own). It stops
on SIGINT or SIGTERM.

    python -m benchmarks.server --port 8766 --grants 20 --latency-ms 200
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
from collections import Counter
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from benchmarks.data import API_KEY, grant_id
from campaign.testing import FakeNylas, run_sandbox_server

__all__ = ["STATS_PATH", "BenchFake", "main"]

STATS_PATH = "/_bench/stats"


class BenchFake:
    """A `FakeNylas` behind an ASGI app that also answers `GET /_bench/stats`."""

    def __init__(self, fake: FakeNylas) -> None:
        self.fake = fake

    def stats(self) -> dict[str, Any]:
        """Send requests answered so far: count, statuses, first arrival, and the accepted ones' span."""
        records = list(self.fake.requests)
        accepted = [record.arrived_at_monotonic for record in records if record.status == 200]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "cpu_s": usage.ru_utime + usage.ru_stime,  # this server process's CPU so far
            "requests": len(records),
            "statuses": dict(Counter(str(record.status) for record in records)),
            "first_arrival": min((record.arrived_at_monotonic for record in records), default=None),
            "accepted": len(accepted),
            "first_accepted": min(accepted, default=None),
            "last_accepted": max(accepted, default=None),
        }

    @property
    def app(self) -> ASGIApp:
        """The fake's app, with the stats route in front."""
        inner = self.fake.app

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == STATS_PATH:
                body = json.dumps(self.stats()).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await inner(scope, receive, send)

        return serve


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grants", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    fake = FakeNylas(api_key=API_KEY)
    fake.latency_s = args.latency_ms / 1000
    for number in range(1, args.grants + 1):
        fake.add_grant(grant_id(number), f"s{number:02d}@example.com")
    # uvicorn turns SIGINT/SIGTERM into a clean shutdown itself; SIGTERM before it starts must still stop us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_sandbox_server(BenchFake(fake), host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
