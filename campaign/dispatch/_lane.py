"""One sender's lane: its queue and every limit on it, as state the send loop consults. Pure.

A lane combines the sender's pace (and Nylas's 10/s ceiling for multipart sends),
its rolling-24 h budgets in recipients and in messages, the earliest time a throttle
(or a failed connection) allows the next request, an adaptive slowdown after repeated
throttles, and whether it is parked (until a time) or halted (refused credentials, no
connection to the API, a run of refused messages). Callers pass the current time; nothing
here reads a clock or sleeps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from campaign.manifest import SenderSettings
from campaign.plan import NYLAS_MULTIPART_PER_SECOND, DailyBudget, Job, Pace
from campaign.sendtime import SendWindow, next_open

__all__ = ["Lane", "open_lane"]

# After a throttle the pace halves, down to a tenth; every RECOVER_AFTER sends without
# one it climbs back by a quarter, so a sender recovers slowly and does not oscillate.
MIN_SLOWDOWN = 0.1
RECOVER_AFTER = 20


@dataclass(slots=True)
class Lane:
    """The mutable per-sender state of one run."""

    sender: SenderSettings
    pace: Pace
    multipart_pace: Pace
    recipients_budget: DailyBudget
    messages_budget: DailyBudget
    jobs: deque[Job] = field(default_factory=deque)
    slowdown: float = 1.0
    calm_sends: int = 0
    throttles: int = 0
    throttled_at: float = float("-inf")  # monotonic time the last wave of throttles began
    hold_until: float = float("-inf")  # monotonic time before which no request may leave
    parked_until: datetime | None = None
    provider_refused: bool = False  # parked by the provider (a quota, long throttling), not just its budget
    auth_refused: bool = False
    refusal: str | None = None  # what the API said when it refused the credentials (or the application)
    unreachable: str | None = None  # halted: no connection to the API for too long (the last error)
    unreachable_since: float | None = None  # monotonic time of the first of the connect failures in a row
    connect_failures: int = 0  # connect failures in a row
    rejections: int = 0  # messages refused in a row (none sent between)
    lookup_failures: int = 0  # follow-ups' reply lookups failed in a row
    rejecting: str | None = None  # halted: `stop_after_rejections` refusals in a row (the last error)
    workers: int = 0  # the send loop's workers currently serving this lane
    more: bool = True  # the feed may hold more of its jobs (`jobs` is only what it read ahead)
    refilling: bool = False  # a worker is reading its next jobs
    window: SendWindow | None = None  # when the sender may send (None: any time)
    holidays: frozenset[date] = frozenset()  # days its window stays shut
    closed_until: datetime | None = None  # the run ended with the window shut: it opens then

    def opens_at(self, now: datetime) -> datetime | None:
        """None while the sender's window is open at `now`; else when it next opens."""
        if self.window is None:
            return None
        opens = next_open(self.window, now, holidays=self.holidays)
        return opens if opens > now else None

    @property
    def halted(self) -> bool:
        """Stopped for the rest of the run, with no time to wait for: refused credentials, no API, or
        a run of refused messages."""
        return self.auth_refused or self.unreachable is not None or self.rejecting is not None

    @property
    def stopped(self) -> bool:
        """Parked or halted: it takes no new work now."""
        return self.parked_until is not None or self.halted

    @property
    def refused(self) -> bool:
        """The provider takes nothing from it now (a quota, long throttling, refused credentials, no
        connection): not even a send already booked. A park by its own budget stops new work only: a
        booked send fits it."""
        return self.provider_refused or self.halted

    @property
    def rate_per_s(self) -> float:
        """The pace in force now (the configured rate times the slowdown)."""
        return self.sender.rate_per_s * self.slowdown

    def budget_frees_at(self, wall: float, recipients: int) -> float | None:
        """None if a message to `recipients` fits both budgets at Unix time `wall`, else when it will."""
        if self.recipients_budget.allows(wall, recipients) and self.messages_budget.allows(wall, 1):
            return None
        return max(self.recipients_budget.frees_at(wall, recipients), self.messages_budget.frees_at(wall, 1))

    def book(self, wall: float, recipients: int) -> None:
        """Count a message against both budgets before it is sent."""
        self.recipients_budget.book(wall, recipients)
        self.messages_budget.book(wall, 1)

    def release(self, wall: float, recipients: int) -> None:
        """Give back a booking whose message was definitely not sent."""
        self.recipients_budget.release(wall, recipients)
        self.messages_budget.release(wall, 1)

    def reserve(self, mono: float, *, multipart: bool = False) -> float:
        """Book the next send slot at or after `mono`, and after any hold: the sends waiting out a hold
        leave at the pace from its end, not all at once; return the monotonic time it may start."""
        after = max(mono, self.hold_until)
        start = self.pace.reserve(after)
        if multipart:
            start = max(start, self.multipart_pace.reserve(after))
        return start

    def spend_burst(self, mono: float) -> None:
        """Start with the bucket empty at `mono`: the grant may have been sent from a moment ago by
        another worker, whose sends and this lane's together then keep to the pace."""
        self.pace.spend(mono)
        self.multipart_pace.spend(mono)

    def record_throttle(self, *, mono: float, wait_s: float, sent_at: float) -> None:
        """A 429 to a request that left at `sent_at`: hold every request for `wait_s`. The first of a wave
        (a request that left after the wave before began) counts and halves the pace; the requests
        already in flight with it were refused for the same reason, and must not count again."""
        self.hold_until = max(self.hold_until, mono + wait_s)
        if sent_at < self.throttled_at:
            return
        self.throttled_at = mono
        self.throttles += 1
        self.calm_sends = 0
        self.slowdown = max(MIN_SLOWDOWN, self.slowdown / 2)
        self.pace.set_rate(self.rate_per_s)

    def record_unreachable(self, *, mono: float, wait_s: float) -> float:
        """No connection to the API: hold every request for `wait_s`; return how long the API has been
        unreachable (since the first of the failures in a row)."""
        if self.unreachable_since is None:
            self.unreachable_since = mono
        self.connect_failures += 1
        self.hold_until = max(self.hold_until, mono + wait_s)
        return mono - self.unreachable_since

    def record_reached(self) -> None:
        """An answer came (any answer): the API is reachable."""
        self.connect_failures = 0
        self.unreachable_since = None

    def record_rejected(self, error: str) -> None:
        """A message refused for good (a 4xx): once `stop_after_rejections` come in a row (no message
        accepted between), the lane halts."""
        self.rejections += 1
        limit = self.sender.stop_after_rejections
        if limit and self.rejections >= limit and self.rejecting is None:
            self.rejecting = error

    def record_sent(self) -> None:
        """A send went through: forget consecutive throttles and, slowly, recover the pace."""
        self.throttles = 0
        self.calm_sends += 1
        if self.slowdown < 1.0 and self.calm_sends >= RECOVER_AFTER:
            self.slowdown = min(1.0, self.slowdown * 1.25)
            self.calm_sends = 0
            self.pace.set_rate(self.rate_per_s)


def open_lane(
    sender: SenderSettings, *, history: Sequence[tuple[float, int]] = (), holidays: Collection[date] = ()
) -> Lane:
    """A lane for `sender`, its budgets seeded with earlier sends: (Unix time, recipients) each; its
    window shut on `holidays`."""
    return Lane(
        sender=sender,
        pace=Pace(sender.rate_per_s, burst=sender.burst),
        multipart_pace=Pace(NYLAS_MULTIPART_PER_SECOND),
        recipients_budget=DailyBudget(sender.per_day, history=history),
        messages_budget=DailyBudget(sender.per_day_messages, history=[(at, 1) for at, _ in history]),
        window=sender.send_window,
        holidays=frozenset(holidays),
    )
