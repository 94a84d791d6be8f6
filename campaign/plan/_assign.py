"""Which recipients still need a send, and which sender sends each. Pure.

Rows pinned by `sender_column` go to that sender; a row the ledger already
assigned keeps its sender, so resuming never moves work around; each other row
goes to the sender that would finish it soonest under its limits. `SenderAssigner`
does this a row at a time, for passes that stream the list; `assign_senders` is it over
a whole list. `build_schedule` estimates when each sender is done under its limits, and
`build_quota_warnings` names the senders with more messages than a day allows.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from campaign.manifest import SenderSettings
from campaign.models import FIRST_STEP, PreviousStep, Recipient, step_key
from campaign.plan._ratelimit import DAY_S

__all__ = [
    "Job",
    "Schedule",
    "SenderAssigner",
    "SenderSchedule",
    "assign_senders",
    "build_quota_warnings",
    "build_schedule",
    "daily_capacity",
    "estimate_duration_s",
]


class Job(NamedTuple):
    """One message to send: a recipient, the sender that mails it, and the step (a follow-up knows the
    step it answers, and when step 1 went out, for the reply lookups before its claim). A named tuple,
    as `models.Recipient` is (made for every row of a check)."""

    recipient: Recipient
    sender: str
    step: str = FIRST_STEP
    previous: PreviousStep | None = None
    first_sent_at: datetime | None = None

    @property
    def key(self) -> str:
        """The ledger's key of this (recipient, step)."""
        return step_key(self.recipient.key, self.step)

    @property
    def movable(self) -> bool:
        """Whether another sender may take it: step 1 unless pinned (a follow-up's thread is its sender's)."""
        return self.step == FIRST_STEP and self.recipient.sender is None


def daily_capacity(sender: SenderSettings) -> float:
    """Recipients a sender can mail in a day under its limits."""
    by_pace = sender.rate_per_s * DAY_S
    return by_pace if sender.per_day is None else min(by_pace, float(sender.per_day))


def build_quota_warnings(senders: Sequence[SenderSettings], per_sender: Mapping[str, int]) -> list[str]:
    """A warning for each sender with more messages than it can send in a day (the run stops there)."""
    found = []
    for sender in senders:
        messages = per_sender.get(sender.name, 0)
        if messages > daily_capacity(sender):
            found.append(
                f"sender {sender.name!r} has {messages} messages but can send "
                f"{int(daily_capacity(sender))} a day: the run stops at that quota; "
                "resume it later (or run with --wait)"
            )
    return found


def estimate_duration_s(messages: int, *, rate_per_s: float, per_day: int | None) -> float:
    """Seconds to send `messages` at `rate_per_s`, waiting for the rolling window when `per_day` runs out."""
    if messages <= 0:
        return 0.0
    if per_day is None or messages <= per_day:
        return messages / rate_per_s
    full_days, rest = divmod(messages, per_day)
    if rest == 0:
        full_days, rest = full_days - 1, per_day
    return full_days * DAY_S + rest / rate_per_s


@dataclass(frozen=True, slots=True)
class SenderSchedule:
    """When one sender will be done: how many it can send in the next 24 h and how long it needs."""

    name: str
    remaining: int
    next_24h: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Schedule:
    """The whole campaign's timing under the current limits; the slowest sender decides."""

    senders: tuple[SenderSchedule, ...]
    per_day: int

    @property
    def duration_s(self) -> float:
        """Seconds until the last sender is done."""
        return max((sender.duration_s for sender in self.senders), default=0.0)


def build_schedule(
    senders: Sequence[SenderSettings], *, remaining: Mapping[str, int], used_24h: Mapping[str, int]
) -> Schedule:
    """Timing per sender from its messages left and the recipients it mailed in the last 24 h.

    An estimate: the budget already used frees as the rolling window moves, which is
    approximated as "after a day".
    """
    plans = []
    for sender in senders:
        left_today = None if sender.per_day is None else max(0, sender.per_day - used_24h.get(sender.name, 0))
        todo = remaining.get(sender.name, 0)
        pace_per_day = int(sender.rate_per_s * DAY_S)
        now_part = todo if left_today is None else min(todo, left_today)
        duration = now_part / sender.rate_per_s
        if todo > now_part:
            duration = DAY_S + estimate_duration_s(
                todo - now_part, rate_per_s=sender.rate_per_s, per_day=sender.per_day
            )
        next_24h = min(todo, pace_per_day if left_today is None else min(left_today, pace_per_day))
        plans.append(SenderSchedule(sender.name, todo, next_24h, duration if todo else 0.0))
    return Schedule(senders=tuple(plans), per_day=int(sum(daily_capacity(sender) for sender in senders)))


class SenderAssigner:
    """Assign senders to recipients in list order, keeping only a message count per sender.

    For passes that stream the list instead of holding it (preview, send-test, the pipeline);
    `assign_senders` is this over a whole list. The rows an earlier run assigned come either as
    one mapping (`assigned`), or as their counts per sender (`load`) with each row's sender given
    to `assign` as `kept`, so that a streamed pass never holds a key-sized dict.
    """

    def __init__(
        self,
        senders: Sequence[SenderSettings],
        *,
        assigned: Mapping[str, str] | None = None,
        load: Mapping[str, int] | None = None,
    ) -> None:
        known = {sender.name for sender in senders}
        self._known = known
        self._previous = {key: name for key, name in (assigned or {}).items() if name in known}
        self._load = dict.fromkeys(known, 0)
        for name in self._previous.values():
            self._load[name] += 1
        for name, count in (load or {}).items():
            if name in known:
                self._load[name] += count
        self._senders = {sender.name: sender for sender in senders}
        # Each sender's finish with one more row, soonest first; ties go to the first listed sender, so
        # the assignment is deterministic. An entry whose load has changed since is refreshed when it
        # comes to the top (a finish only grows with the load): a row costs log(senders), not senders.
        self._soonest = [
            (self._finish_with_one_more(name), index, name, self._load[name])
            for index, name in enumerate(sender.name for sender in senders)
        ]
        heapq.heapify(self._soonest)

    def assign(self, recipient: Recipient, *, kept: str | None = None) -> str:
        """The sender for `recipient`, the next row of the list (`kept`: the ledger's, if any)."""
        earlier = kept if kept in self._known else self._previous.get(recipient.key)
        pinned = recipient.sender or earlier
        name = pinned if pinned is not None else self._first_to_finish()
        if earlier is None:
            self._load[name] += 1
        return name

    def _first_to_finish(self) -> str:
        while True:
            _, index, name, load = self._soonest[0]
            if load == self._load[name]:
                return name
            fresh = (self._finish_with_one_more(name), index, name, self._load[name])
            heapq.heapreplace(self._soonest, fresh)

    def _finish_with_one_more(self, name: str) -> float:
        sender = self._senders[name]
        return estimate_duration_s(self._load[name] + 1, rate_per_s=sender.rate_per_s, per_day=sender.per_day)


def assign_senders(
    recipients: Sequence[Recipient],
    senders: Sequence[SenderSettings],
    *,
    assigned: Mapping[str, str] | None = None,
) -> list[Job]:
    """Give every recipient a sender, in list order (deterministic for the same inputs)."""
    assigner = SenderAssigner(senders, assigned=assigned)
    return [Job(recipient=recipient, sender=assigner.assign(recipient)) for recipient in recipients]
