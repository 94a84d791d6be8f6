"""The counting parts of the fake: rate windows, provider quotas and the idempotency cache.

All times are seconds on the fake's monotonic clock, passed in by the caller; these
classes never read a clock, sleep or lock. `FakeNylas` calls them under its lock.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from campaign.testing.envelopes import Answer
from campaign.testing.records import QuotaStyle

__all__ = [
    "IdempotencyCache",
    "KeyState",
    "Quota",
    "QuotaLog",
    "SlidingWindow",
]

DAY_S = 24 * 3600.0
MINUTE_S = 60.0


class SlidingWindow:
    """At most `limit` admitted events in any `span_s` seconds."""

    def __init__(self, limit: int, span_s: float = 1.0) -> None:
        self.limit = limit
        self.span_s = span_s
        self._times: deque[float] = deque()

    def admit(self, now: float) -> bool:
        """Count an event at `now` if the window has room; False (not counted) if it is full."""
        while self._times and self._times[0] <= now - self.span_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True

    def wait_s(self, now: float) -> float:
        """Seconds until the window next has room (0 if it has room now)."""
        if len(self._times) < self.limit:
            return 0.0
        return max(0.0, self._times[-self.limit] + self.span_s - now)


@dataclass(frozen=True, slots=True)
class Quota:
    """A provider's sending quota for one grant."""

    recipients_per_day: int | None
    messages_per_minute: int | None
    style: QuotaStyle


@dataclass
class QuotaLog:
    """Sends of one grant as (time, recipients), for rolling-window quota checks."""

    sends: deque[tuple[float, int]] = field(default_factory=deque)

    def record(self, now: float, recipients: int) -> None:
        """Count a delivered message."""
        self.sends.append((now, recipients))
        while self.sends and self.sends[0][0] <= now - DAY_S:
            self.sends.popleft()

    def find_release(self, quota: Quota, now: float, recipients: int) -> float | None:
        """When a send of `recipients` would fit the quota: None if it fits now, else a monotonic time."""
        release: float | None = None
        if quota.recipients_per_day is not None:
            window = [(at, count) for at, count in self.sends if at > now - DAY_S]
            excess = sum(count for _, count in window) + recipients - quota.recipients_per_day
            if excess > 0:
                # A message larger than the whole budget never fits; say "a day from now".
                release = now + DAY_S
                freed = 0
                for at, count in window:
                    freed += count
                    if freed >= excess:
                        release = at + DAY_S
                        break
        if quota.messages_per_minute is not None:
            recent = [at for at, _ in self.sends if at > now - MINUTE_S]
            if len(recent) >= quota.messages_per_minute:
                frees = recent[len(recent) - quota.messages_per_minute] + MINUTE_S
                release = frees if release is None else max(release, frees)
        return release


class KeyState(enum.Enum):
    """What the idempotency cache says about a request's key."""

    FRESH = "fresh"  # claimed: process the request, then `store` or `release`
    REPLAY = "replay"
    MISMATCH = "mismatch"
    IN_PROGRESS = "in_progress"


@dataclass
class _Entry:
    fingerprint: str
    created: float
    answer: Answer | None = None


class IdempotencyCache:
    """One grant's Idempotency-Key cache: first request's payload fingerprint and answer, for `ttl_s`."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def claim(
        self, key: str, fingerprint: str, *, now: float, ttl_s: float
    ) -> tuple[KeyState, Answer | None]:
        """Look a key up; when FRESH it is now held as in progress."""
        entry = self._entries.get(key)
        # An entry in progress never expires under its own request.
        if entry is not None and entry.answer is not None and now - entry.created >= ttl_s:
            entry = None
        if entry is None:
            self._entries[key] = _Entry(fingerprint, now)
            return KeyState.FRESH, None
        if entry.fingerprint != fingerprint:
            return KeyState.MISMATCH, None
        if entry.answer is None:
            return KeyState.IN_PROGRESS, None
        return KeyState.REPLAY, entry.answer

    def store(self, key: str, answer: Answer) -> None:
        """Keep the answer of a claimed key for replay."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.answer = answer

    def release(self, key: str) -> None:
        """Forget a claimed key whose request ended without an answer to cache."""
        entry = self._entries.get(key)
        if entry is not None and entry.answer is None:
            del self._entries[key]
