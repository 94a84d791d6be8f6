"""Contract tests of the fake's webhook delivery: retries, fan-out and failure states as Nylas documents them.

reference/next-capabilities.md §2.1-2.4: retries only on 408, 429, 502, 503, 504, 507 (and a timeout),
3 tries in all with `webhook_delivery_attempt` 1..3 and the last 10-20 min after the first; a retry
goes to every destination of the trigger type; 95 % failures over 15 min make an endpoint `failing`,
over the next 72 h `failed`, and a failed one gets nothing more. Counted at a receiver of our own
here (what it was POSTed), never through `campaign serve`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from campaign.testing import FakeClock, FakeNylas, serve_on_loopback

SECRET = b"whsec-test"
KIND = "message.bounce_detected"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


class Receiver:
    """A webhook endpoint that answers the challenge, then each POST with the next scripted status."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.envelopes: list[dict[str, Any]] = []
        self.signed = True
        self._app = Starlette(
            routes=[
                Route("/hook", self._challenge, methods=["GET"]),
                Route("/hook", self._receive, methods=["POST"]),
            ]
        )

    @property
    def app(self) -> ASGIApp:
        return self._app

    @property
    def attempts(self) -> list[int]:
        return [int(e["webhook_delivery_attempt"]) for e in self.envelopes]

    async def _challenge(self, request: Request) -> Response:
        return PlainTextResponse(request.query_params["challenge"])

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        self.signed &= hmac.compare_digest(expected, request.headers["x-nylas-signature"])
        self.envelopes.append(json.loads(body))
        return Response(status_code=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def fake(clock: FakeClock) -> FakeNylas:
    return FakeNylas(api_key="k", clock=clock)


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(receiver) -> its webhook URL, served until the test ends."""
    stack: list[Any] = []

    def start(receiver: Receiver) -> str:
        context = serve_on_loopback(receiver)
        stack.append(context)
        return f"{context.__enter__()}/hook"

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def notify(fake: FakeNylas) -> str:
    return fake.queue_notification(KIND, "g", {"bounced_addresses": "ann@example.com", "code": "550"})


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504, 507])
def test_a_retried_status_gets_the_notification_again_five_minutes_later(
    fake: FakeNylas, clock: FakeClock, serve: Any, status: int
) -> None:
    """A try answered with a status Nylas retries is made again, signed anew, with its attempt number;
    not before it is due on the clock; a 200 ends it."""
    receiver = Receiver(status)
    url = serve(receiver)
    fake.add_webhook(url, SECRET, [KIND])
    event = notify(fake)
    assert fake.deliver_webhooks() == 1
    assert fake.pending_webhooks == 1
    clock.advance(299)
    assert fake.deliver_webhooks() == 0
    clock.advance(1)
    assert fake.deliver_webhooks() == 1
    assert fake.pending_webhooks == 0
    assert receiver.attempts == [1, 2]
    assert [e["id"] for e in receiver.envelopes] == [event, event]
    assert receiver.signed
    assert fake.webhook_status(url) == "active"


@pytest.mark.parametrize("status", [400, 401, 404, 500])
def test_any_other_status_is_final(fake: FakeNylas, clock: FakeClock, serve: Any, status: int) -> None:
    """Nylas retries only 408, 429 and 502-507: a 500 (or any 4xx besides) loses the notification."""
    receiver = Receiver(status)
    fake.add_webhook(serve(receiver), SECRET, [KIND])
    notify(fake)
    assert fake.deliver_webhooks() == 1
    assert fake.pending_webhooks == 0
    clock.advance(3600)
    assert fake.deliver_webhooks() == 0
    assert receiver.attempts == [1]


def test_three_tries_in_all_the_last_fifteen_minutes_after_the_first(
    fake: FakeNylas, clock: FakeClock, serve: Any
) -> None:
    """An endpoint that keeps answering 503 gets the notification three times, at 0, 5 and 15 minutes,
    and never again."""
    receiver = Receiver(503, 503, 503, 503)
    fake.add_webhook(serve(receiver), SECRET, [KIND])
    notify(fake)
    tried_at: list[float] = []
    for _ in range(40):  # every minute for 40 minutes
        if fake.deliver_webhooks():
            tried_at.append((clock.now() - START).total_seconds())
        clock.advance(60)
    assert tried_at == [0, 300, 900]
    assert receiver.attempts == [1, 2, 3]
    assert fake.pending_webhooks == 0


def test_a_retry_goes_to_every_webhook_of_the_trigger_type(
    fake: FakeNylas, clock: FakeClock, serve: Any
) -> None:
    """One destination's 503 makes the retry go to all destinations of that type, the one that took the
    first try included (the receiver must dedupe on the envelope id); one of another type gets none."""
    healthy, flaky, other = Receiver(), Receiver(503), Receiver()
    fake.add_webhook(serve(healthy), SECRET, [KIND])
    fake.add_webhook(serve(flaky), SECRET, [KIND, "thread.replied"])
    fake.add_webhook(serve(other), SECRET, ["message.opened"])
    notify(fake)
    assert fake.deliver_webhooks() == 2
    clock.advance(300)
    assert fake.deliver_webhooks() == 2
    assert (healthy.attempts, flaky.attempts, other.attempts) == ([1, 2], [1, 2], [])


def test_an_endpoint_that_cannot_be_reached_is_retried_not_raised(fake: FakeNylas, clock: FakeClock) -> None:
    """A receiver that is down (connection refused) keeps the notification for a retry: the sandbox's
    delivery loop no longer loses what was queued."""
    receiver = Receiver()
    with serve_on_loopback(receiver) as base:
        fake.add_webhook(f"{base}/hook", SECRET, [KIND])
    notify(fake)
    assert fake.deliver_webhooks() == 1
    assert fake.pending_webhooks == 1
    assert receiver.envelopes == []


def test_an_endpoint_that_keeps_failing_becomes_failing_then_failed_and_gets_nothing_more(
    fake: FakeNylas, clock: FakeClock, serve: Any
) -> None:
    """95 % failures over 15 min: failing, and delivery goes on; 95 % over the next 72 h: failed, and
    nothing is delivered to it any more, not even to a receiver that would now answer 200."""
    receiver = Receiver(*[503] * 3)
    url = serve(receiver)
    fake.add_webhook(url, SECRET, [KIND])
    notify(fake)
    fake.deliver_webhooks()
    clock.advance(300)
    fake.deliver_webhooks()
    assert fake.webhook_status(url) == "active"
    clock.advance(600)
    assert fake.deliver_webhooks() == 1  # the third try, 15 minutes after the first: still made
    assert fake.webhook_status(url) == "failing"
    clock.advance(72 * 3600)
    notify(fake)
    assert fake.deliver_webhooks() == 0
    assert fake.webhook_status(url) == "failed"
    assert receiver.attempts == [1, 2, 3]


def test_an_endpoint_failing_for_a_while_then_healthy_is_active_again(
    fake: FakeNylas, clock: FakeClock, serve: Any
) -> None:
    """A failing endpoint whose deliveries succeed over the next 72 h is active again."""
    receiver = Receiver(*[503] * 3)
    url = serve(receiver)
    fake.add_webhook(url, SECRET, [KIND])
    notify(fake)
    for wait in (0, 300, 600):
        clock.advance(wait)
        fake.deliver_webhooks()
    assert fake.webhook_status(url) == "failing"
    clock.advance(3600)
    notify(fake)
    assert fake.deliver_webhooks() == 1
    clock.advance(72 * 3600)
    notify(fake)
    assert fake.deliver_webhooks() == 1
    assert fake.webhook_status(url) == "active"
    assert receiver.attempts == [1, 2, 3, 1, 1]
