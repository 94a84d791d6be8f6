"""The send loop's waiting rules: same-key retries of an unsettled send, and what a throttle does.

A send without a definite answer (a timeout, a reset, a 5xx) goes again with the same
idempotency key after a jittered exponential backoff, a limited number of times; a 409
"still in progress" is waited out apart from those retries. A throttle holds the sender
for the time the API asked for (else a backoff), and parks it for the run when it is a
quota, asks for too long a wait, or is one throttle too many. The *_NOTE texts say why
a row became unknown when no same-key retry could settle it. `RetryPolicy` decides;
`campaign.dispatch._loop` acts (sleeps, records, reports). Nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import random
from datetime import datetime

from campaign.dispatch._types import DispatchSettings
from campaign.models import OutcomeKind, SendOutcome, ThrottleKind

__all__ = ["GAVE_UP_NOTE", "KEY_TOO_OLD_NOTE", "OWNER_GONE_NOTE", "RetryPolicy"]

# Why a row became unknown when no same-key retry could settle it (shown by status and report).
OWNER_GONE_NOTE = (
    "it was in flight through a sender that is no longer in the manifest, and its idempotency key "
    "is valid only on that grant; `campaign reconcile` settles it"
)
KEY_TOO_OLD_NOTE = (
    "its idempotency key is near the end of Nylas's 1 h replay window; "
    "a same-key retry could send twice, so `campaign reconcile` settles it"
)
GAVE_UP_NOTE = "no definite answer after same-key retries; `campaign reconcile` settles it"


class RetryPolicy:
    """The waiting rules under one run's `DispatchSettings`, with its own source of jitter."""

    def __init__(self, settings: DispatchSettings) -> None:
        self._settings = settings
        self._random = random.Random()

    def retry_delay_s(self, outcome: SendOutcome, *, retries: int, waits: int) -> float | None:
        """Seconds before the same key goes again, or None when the row must be given up.

        `retries` counts the ambiguous answers so far, `waits` the 409 "in progress" ones.
        """
        settings = self._settings
        if outcome.kind == OutcomeKind.IN_PROGRESS:
            return None if waits > settings.in_progress_retries else settings.in_progress_wait_s
        return None if retries > settings.ambiguous_retries else self.backoff_s(retries)

    def throttle_wait_s(self, outcome: SendOutcome, *, now: datetime, throttles: int) -> float:
        """How long a throttle holds the sender: until the time the API gave, else a backoff (an hour,
        `quota_wait_s`, for a daily quota)."""
        if outcome.retry_at is not None:
            return max(0.0, (outcome.retry_at - now).total_seconds())
        if outcome.throttle == ThrottleKind.QUOTA:
            return self._settings.quota_wait_s
        return self.backoff_s(throttles + 1)

    def parks(self, outcome: SendOutcome, *, wait_s: float, throttles: int) -> bool:
        """Whether a throttle parks the sender for the run: a quota, a long wait, or too many in a row."""
        return (
            outcome.throttle == ThrottleKind.QUOTA
            or wait_s > self._settings.park_after_s
            or throttles >= self._settings.park_after_throttles
        )

    def backoff_s(self, attempt: int) -> float:
        """The wait before attempt `attempt` (from 1): retry_base_s, doubling up to retry_max_s, jittered."""
        ceiling = min(self._settings.retry_max_s, self._settings.retry_base_s * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + self._random.random() / 2)  # jitter: between half and all of it
