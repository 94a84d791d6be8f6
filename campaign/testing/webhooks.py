"""Webhook delivery as Nylas does it: signed POSTs, retries, and an endpoint's failing and failed states.

Written from reference/next-capabilities.md §2.1-2.4 (Nylas's webhook pages, the OpenAPI spec's
"How to handle webhook failures", nylas/skills), never from our receiver:

- A notification is POSTed, signed (`x-nylas-signature`: hex HMAC-SHA256 of the raw body under the
  webhook's secret), and the receiver has 10 s to answer; a slow 200 counts as a failure.
- Retries only on 408, 429, 502, 503, 504 and 507 (and on the timeout), two more times at most (3 tries
  in all, `webhook_delivery_attempt` 1..3), with exponential back-off, the last 10-20 min after the
  first: here 5 min after the first try, then 10 min after the second (15 min; the spacing is the
  fake's choice). Any other status (a 500 too) is final: the notification is lost. A receiver that
  cannot be reached is retried as a timeout is (the reference does not say; the fake's choice).
- A retry goes to every destination subscribed to that trigger type, the ones that took it included.
- An endpoint whose deliveries fail 95 % over 15 min becomes `failing` and delivery goes on; one that
  fails 95 % over the next 72 h becomes `failed`, and delivery stops for good (no reactivation, no
  replay). The fake counts in back-to-back windows from an endpoint's first try (the reference gives
  the shares and spans, not how they are counted).

Pure values and one blocking POST; `FakeState` keeps the queue and calls these on the fake's clock.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx

__all__ = [
    "DELIVERY_TIMEOUT_S",
    "MAX_ATTEMPTS",
    "PendingNotification",
    "Webhook",
    "WebhookStatus",
    "post_notification",
    "retry_delay",
]

WebhookStatus = Literal["active", "failing", "failed"]

DELIVERY_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 3
RETRIED_STATUSES = frozenset({408, 429, 502, 503, 504, 507})
_FIRST_RETRY = timedelta(minutes=5)  # doubled for each later one: 5 min, then 10 min
_FAILING_SPAN = timedelta(minutes=15)
_FAILED_SPAN = timedelta(hours=72)
_FAILED_SHARE = 0.95


def retry_delay(attempt: int) -> timedelta:
    """How long after try number `attempt` (1-based) the next one is made."""
    return _FIRST_RETRY * (1 << (attempt - 1))


@dataclass
class Webhook:
    """One destination (`POST /v3/webhooks`), with its status and the window its tries are counted in."""

    url: str
    secret: bytes
    trigger_types: frozenset[str]
    status: WebhookStatus = "active"
    window_start: datetime | None = None
    tries: int = 0
    failures: int = 0

    def accepts(self, now: datetime) -> bool:
        """Whether a delivery is made to it at `now`; closes a window whose span has passed first."""
        if self.status == "failed":
            return False
        if self.window_start is None:
            self.window_start = now
            return True
        span = _FAILING_SPAN if self.status == "active" else _FAILED_SPAN
        if now - self.window_start < span:
            return True
        failed = self.tries > 0 and self.failures >= _FAILED_SHARE * self.tries
        if self.status == "active":
            self.status = "failing" if failed else "active"
        else:
            self.status = "failed" if failed else "active"
        self.window_start, self.tries, self.failures = now, 0, 0
        return self.status != "failed"

    def count(self, *, delivered: bool) -> None:
        """Count one try in the current window."""
        self.tries += 1
        self.failures += 0 if delivered else 1


@dataclass
class PendingNotification:
    """A notification waiting for its try number `attempt`, due at `due`."""

    kind: str
    envelope: dict[str, Any]
    due: datetime
    attempt: int = 1

    def next_try(self, now: datetime) -> PendingNotification | None:
        """The retry after a try made at `now`, or None after the last."""
        if self.attempt >= MAX_ATTEMPTS:
            return None
        return replace(self, due=now + retry_delay(self.attempt), attempt=self.attempt + 1)


def post_notification(hook: Webhook, body: bytes) -> tuple[bool, bool]:
    """POST `body` signed to the webhook: (delivered, to be retried)."""
    signature = hmac.new(hook.secret, body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "x-nylas-signature": signature}
    try:
        answer = httpx.post(hook.url, content=body, headers=headers, timeout=DELIVERY_TIMEOUT_S)
    except httpx.TransportError:  # a timeout (a slow 200 included), or nobody listening
        return False, True
    delivered = 200 <= answer.status_code < 300
    return delivered, answer.status_code in RETRIED_STATUSES
