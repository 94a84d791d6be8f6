"""Limiter accuracy in real time: one sender at 50/s for 20 s against the fake API with 100 ms latency.

Serves `campaign.testing.FakeNylas` over uvicorn on loopback, sends through the real
client and send loop (durable ledger in a temporary folder), and prints, from the
fake's own arrival log, the achieved rate, its error against the configured rate,
and the busiest one-second window (which must not exceed rate + burst).

    python benchmarks/limiter_accuracy.py                       # 50/s for 20 s
    python benchmarks/limiter_accuracy.py --rate 10 --seconds 3 --json
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from pathlib import Path

import anyio

from campaign.clock import SystemClock
from campaign.dispatch import dispatch
from campaign.ledger import PlannedRow, open_ledger
from campaign.manifest import SenderSettings
from campaign.models import Address, Message, Recipient
from campaign.nylas import NylasClient, build_http_client
from campaign.plan import Job
from campaign.testing import FakeNylas, serve_on_loopback

KEY = "bench-key"


def _busiest_window(times: list[float]) -> int:
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def _render(job: Job) -> Message:
    to = job.recipient.address
    return Message(job.recipient.key, job.recipient.row, job.sender, (to,), "Accuracy", html="<p>x</p>")


async def _measure(rate: float, seconds: float, latency_s: float, folder: Path) -> dict[str, float]:
    clock = SystemClock()
    fake = FakeNylas(api_key=KEY)
    fake.add_grant("grant-a", "a@corp.example.com")
    fake.latency_s = latency_s
    count = int(rate * seconds)
    # Enough in flight that latency never limits the pace: rate × latency, with room to spare.
    sender = SenderSettings(
        name="a", grant_id="grant-a", per_second=rate, concurrency=max(2, int(rate * latency_s * 2))
    )
    jobs = [
        Job(Recipient(f"r{n}@example.com", n, Address(f"r{n}@example.com"), {}), "a") for n in range(count)
    ]
    ledger = open_ledger(folder / "accuracy.ledger.sqlite", clock=clock, campaign="accuracy")
    ledger.record_plan([PlannedRow(j.recipient.key, j.recipient.row, j.recipient.key, "a") for j in jobs], [])
    with serve_on_loopback(fake) as url:
        async with build_http_client(base_url=url, timeout_s=30) as http:
            client = NylasClient(http, api_key=KEY, clock=clock)
            await dispatch(jobs, senders=[sender], render=_render, client=client, ledger=ledger, clock=clock)
    arrivals = sorted(r.arrived_at_monotonic for r in fake.requests if r.status == 200)
    achieved = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    return {
        "configured_per_s": rate,
        "achieved_per_s": round(achieved, 3),
        "error_pct": round(100 * (achieved - rate) / rate, 2),
        "busiest_second": _busiest_window(arrivals),
        "allowed_per_second": rate + sender.burst,
        "sent": len(arrivals),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print it (a table line, or JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        figures = anyio.run(_measure, args.rate, args.seconds, args.latency_ms / 1000, Path(folder))
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"limiter accuracy: {figures['achieved_per_s']}/s achieved of {figures['configured_per_s']}/s "
            f"({figures['error_pct']:+}%), busiest second {figures['busiest_second']} "
            f"(allowed {figures['allowed_per_second']:g}), {figures['sent']} sent"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
