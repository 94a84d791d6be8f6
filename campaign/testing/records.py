"""What the fake Nylas API remembers and what a test can script into it.

Plain values only: the scripted `Fault` kinds, the `Delivery` and `RequestRecord`
logs a test inspects, and the exception that stands for a dropped connection.
Nothing here reads the clock or touches the HTTP layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import httpx

__all__ = [
    "DeliveredAttachment",
    "Delivery",
    "FakeConnectionReset",
    "Fault",
    "QuotaStyle",
    "RequestRecord",
]

QuotaStyle = Literal["google", "microsoft"]


class Fault(enum.Enum):
    """A failure the fake answers a send with, once scripted with `FakeNylas.script`.

    Gateway faults (NYLAS_RATE_LIMIT, UNAUTHORIZED, BAD_GATEWAY, RESET) strike before
    the idempotency layer: nothing is cached, and a retry with the same key is
    processed afresh. The others strike while the request is processed: their answer
    is cached under the Idempotency-Key and replayed.
    """

    NYLAS_RATE_LIMIT = "nylas_rate_limit"  # 429 nylas_rate_limit_exceeded, no provider_error
    PROVIDER_THROTTLE = "provider_throttle"  # 429 rate_limit_error, Microsoft style, Retry-After
    QUOTA_EXCEEDED = "quota_exceeded"  # 429 quota_exceeded_error, Google "Retry after <ISO>"
    # 429 with the older Gmail quota text and no time at all (nylas-api.md §3.4: a support article's words)
    DAILY_LIMIT = "daily_limit"
    UNAUTHORIZED = "unauthorized"  # 401
    FORBIDDEN = "forbidden"  # 403 insufficient_scopes
    REJECTED = "rejected"  # 402 "Sending to at least one recipient failed."
    INTERNAL_ERROR = "internal_error"  # 500 api.internal_error
    BAD_GATEWAY = "bad_gateway"  # 502 with an HTML body
    UNAVAILABLE = "unavailable"  # 503
    TIMEOUT_AFTER_SEND = "timeout_after_send"  # delivered, then 504 provider_error
    SLOW = "slow"  # waits delay_s on the clock, then handles the request normally
    RESET = "reset"  # the connection drops before anything is sent
    RESET_AFTER_SEND = "reset_after_send"  # delivered and cached as 200, then the connection drops

    @property
    def at_gateway(self) -> bool:
        """True when the fault strikes before the idempotency layer (never cached)."""
        return self in _GATEWAY_FAULTS


_GATEWAY_FAULTS = frozenset({Fault.NYLAS_RATE_LIMIT, Fault.UNAUTHORIZED, Fault.BAD_GATEWAY, Fault.RESET})


class FakeConnectionReset(httpx.ReadError):
    """Raised by the fake app to drop a connection (Fault.RESET).

    Over `httpx.ASGITransport` it reaches the client as what it is, an
    `httpx.TransportError`; over uvicorn the server closes the socket mid-response.
    """


@dataclass(frozen=True, slots=True)
class DeliveredAttachment:
    """One attachment of a delivered message, with its decoded bytes."""

    filename: str
    content_type: str
    content: bytes
    content_id: str | None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message the fake accepted and "sent" (replays are not deliveries)."""

    id: str
    grant_id: str
    payload: dict[str, Any]  # the parsed JSON body (for multipart: the `message` part)
    attachments: tuple[DeliveredAttachment, ...]
    idempotency_key: str | None
    delivered_at: datetime
    multipart: bool
    # The message's MIME headers as its recipients get them: Message-ID, and a reply's In-Reply-To and
    # References, which the provider writes (what `fields=include_headers` lists).
    headers: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One send request as the fake saw it; status 0 means the connection was dropped."""

    arrived_at_monotonic: float
    grant_id: str  # the resolved grant id, or the path segment as given when unknown
    status: int
    idempotency_key: str | None
    replayed: bool
