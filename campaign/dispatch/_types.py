"""The send loop's vocabulary: its settings, the events it reports, its result, what it needs.

Values and protocols only, so the face (`campaign.cli.output`) and the callers can speak of a
run without the loop itself: `DispatchSettings` (its knobs), `DispatchEvent` (what happened
to one send or sender, as it happens), `DispatchResult` (what a run came to), and the
protocol through which the loop runs its blocking writes (`Offload`); it sees the ledger through
`campaign.ledger.Ledger`. Nothing here sends, records or prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Protocol, TypeVar

import anyio
import anyio.to_thread

from campaign.models import SendOutcome

__all__ = [
    "DispatchEvent",
    "DispatchResult",
    "DispatchSettings",
    "EventKind",
    "Offload",
    "build_thread_offload",
]

_T = TypeVar("_T")


class Offload(Protocol):
    """Runs a blocking call (a ledger write) so that the event loop does not wait on it."""

    async def __call__(self, call: Callable[[], _T]) -> _T: ...


def build_thread_offload() -> Offload:
    """The default: one worker thread at a time, so the ledger is never written from two threads at once."""
    limiter = anyio.CapacityLimiter(1)

    async def offload(call: Callable[[], _T]) -> _T:
        return await anyio.to_thread.run_sync(call, limiter=limiter)

    return offload


class EventKind(StrEnum):
    """What a `DispatchEvent` reports."""

    SENT = "sent"
    FAILED = "failed"
    THROTTLED = "throttled"
    RETRYING = "retrying"
    UNKNOWN = "unknown"
    PARKED = "parked"
    RESUMED = "resumed"
    AUTH_REFUSED = "auth_refused"
    SKIPPED = "skipped"  # the recipient unsubscribed (or, before a follow-up, replied) while the campaign ran
    HELD = "held"  # a follow-up's reply lookup failed: not sent now, due again later
    CLOSED = "closed"  # the sender's send window is shut until `until`
    UNREACHABLE = "unreachable"  # no connection to the API for too long: the sender stops for this run
    REJECTING = "rejecting"  # `stop_after_rejections` messages refused in a row: it stops for this run


@dataclass(frozen=True, slots=True)
class DispatchEvent:
    """Something that happened to one send or one sender."""

    kind: EventKind
    sender: str
    key: str | None = None
    email: str | None = None
    outcome: SendOutcome | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Knobs of the send loop; the defaults suit real mailboxes."""

    limit: int | None = None  # at most this many sends this run
    ambiguous_retries: int = 3  # same-key retries after a timeout / 5xx before the row is `unknown`
    retry_base_s: float = 2.0  # first backoff; doubles each time, with jitter
    retry_max_s: float = 120.0
    park_after_s: float = 900.0  # a throttle asking for a longer wait parks the sender for the run
    park_after_throttles: int = 8  # consecutive throttles with no send in between park the sender
    # A daily-quota refusal that names no time parks its sender this long: the provider's rolling day
    # frees when it frees (up to 24 h), and one request an hour to find out costs nothing, where
    # a short backoff would knock on a locked mailbox hundreds of times.
    quota_wait_s: float = 3600.0
    wait: bool = False  # sleep through parks (quota, long throttles) instead of stopping with them
    # With `wait`: a sender whose window is shut or which is parked leaves the round at once instead, its
    # rows left as they are (`DispatchResult.closed`, `.parked` say until when), for a caller that waits
    # between rounds (follow-ups): a round held by one sender's wait would hold another's next steps.
    leave_to_wait: bool = False
    # 409 concurrent_idempotent_request: the first request with the key is still running at
    # Nylas; wait for it and ask again with the same key (not counted as an ambiguous retry).
    in_progress_retries: int = 10
    in_progress_wait_s: float = 3.0
    stop_grace_s: float = 30.0  # after a stop request, sends in flight get this long to finish
    # A sender whose requests found no connection to the API (each held back a backoff) for this long
    # stops for the run; with `wait` it keeps trying.
    unreachable_after_s: float = 60.0


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """What a dispatch run came to."""

    sent: int
    failed: int
    unknown: int
    remaining: int
    parked: Mapping[str, datetime] = field(default_factory=dict)
    auth_refused: tuple[str, ...] = ()
    refusals: Mapping[str, str] = field(default_factory=dict)  # of those senders: what the API said
    limit_reached: bool = False
    stopped: bool = False  # a stop was requested (Ctrl-C): no new work was started after it
    left_inflight: int = 0  # rows left in flight (stopped mid-retry or abandoned): resume re-sends them
    held: int = 0  # follow-ups whose reply lookup failed: not sent, due again
    closed: Mapping[str, datetime] = field(default_factory=dict)  # senders whose window is shut, until
    unreachable: Mapping[str, str] = field(default_factory=dict)  # senders that could not connect: last error
    rejecting: Mapping[str, str] = field(default_factory=dict)  # stopped by refusals in a row: the last

    def then(self, after: DispatchResult) -> DispatchResult:
        """This round and the `after` one as one result: counts added, the later round's senders."""
        return replace(
            after,
            sent=self.sent + after.sent,
            failed=self.failed + after.failed,
            unknown=self.unknown + after.unknown,
            left_inflight=self.left_inflight + after.left_inflight,
            held=self.held + after.held,
        )
