"""Test doubles for the outside world: a fake Nylas v3 API and a clock that only moves when told.

`FakeNylas` is an in-memory Nylas (send, list, folders, schedules; idempotency, rate
limits, quotas, scripted `Fault`s) with a starlette `.app` for `httpx.ASGITransport`
or `serve_on_loopback`. It is written from `nylas-api.md` alone and never imports
the client it tests. `FakeClock` stands in for `campaign.clock.SystemClock`.
"""

from campaign.testing.clock import FakeClock
from campaign.testing.fake_nylas import FakeNylas
from campaign.testing.records import (
    DeliveredAttachment,
    Delivery,
    FakeConnectionReset,
    Fault,
    QuotaStyle,
    RequestRecord,
)
from campaign.testing.server import HasApp, run_sandbox_server, serve_on_loopback
from campaign.testing.state import next_outbox_number

__all__ = [
    "DeliveredAttachment",
    "Delivery",
    "FakeClock",
    "FakeConnectionReset",
    "FakeNylas",
    "Fault",
    "HasApp",
    "QuotaStyle",
    "RequestRecord",
    "next_outbox_number",
    "run_sandbox_server",
    "serve_on_loopback",
]
