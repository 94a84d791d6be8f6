"""Which recipients still need a send, and which sender sends each. Pure.

Rows pinned by `sender_column` go to that sender; a row the ledger already
assigned keeps its sender, so resuming never moves work around; each other row
goes to the sender that would finish it soonest under its limits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from campaign.manifest import SenderSettings
from campaign.models import Recipient
from campaign.ratelimit import DAY_S

__all__ = ["Job", "assign_senders", "daily_capacity", "estimate_duration_s"]


@dataclass(frozen=True, slots=True)
class Job:
    """One recipient to mail, and the sender that mails it."""

    recipient: Recipient
    sender: str


def daily_capacity(sender: SenderSettings) -> float:
    """Recipients a sender can mail in a day under its limits."""
    by_pace = sender.rate_per_s * DAY_S
    return by_pace if sender.per_day is None else min(by_pace, float(sender.per_day))


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


def assign_senders(
    recipients: Sequence[Recipient],
    senders: Sequence[SenderSettings],
    *,
    assigned: Mapping[str, str] | None = None,
) -> list[Job]:
    """Give every recipient a sender, in list order (deterministic for the same inputs)."""
    known = {sender.name for sender in senders}
    previous = {key: name for key, name in (assigned or {}).items() if name in known}
    load = dict.fromkeys(known, 0)
    for name in previous.values():
        load[name] += 1
    by_name = {sender.name: sender for sender in senders}
    order = [sender.name for sender in senders]

    def finish_with_one_more(name: str) -> float:
        sender = by_name[name]
        return estimate_duration_s(load[name] + 1, rate_per_s=sender.rate_per_s, per_day=sender.per_day)

    jobs: list[Job] = []
    for recipient in recipients:
        pinned = recipient.sender or previous.get(recipient.key)
        # Ties go to the first listed sender, so the assignment is deterministic.
        name = pinned if pinned is not None else min(order, key=finish_with_one_more)
        if recipient.key not in previous:
            load[name] += 1
        jobs.append(Job(recipient=recipient, sender=name))
    return jobs
