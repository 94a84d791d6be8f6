"""Who sends each row and when: sender assignment, schedules, and the pace and budget arithmetic. Pure.

`SenderAssigner`/`assign_senders` pick each row's sender (pinned, kept from the ledger, else the
one that finishes soonest); `build_schedule` estimates each sender's finish; `_ratelimit` holds
the token-bucket pace and the rolling 24-hour budget as arithmetic on times it is given;
`plan_window` a sender's send window as a plan shows it.
Nothing here reads the clock, sleeps or does I/O.
"""

from __future__ import annotations

from campaign.plan._assign import (
    Job,
    Schedule,
    SenderAssigner,
    SenderSchedule,
    assign_senders,
    build_quota_warnings,
    build_schedule,
    daily_capacity,
)
from campaign.plan._ratelimit import (
    DAY_S,
    NYLAS_JSON_PER_SECOND,
    NYLAS_MULTIPART_PER_SECOND,
    DailyBudget,
    Pace,
)
from campaign.plan._windows import WindowPlan, plan_window

__all__ = [
    "DAY_S",
    "NYLAS_JSON_PER_SECOND",
    "NYLAS_MULTIPART_PER_SECOND",
    "DailyBudget",
    "Job",
    "Pace",
    "Schedule",
    "SenderAssigner",
    "SenderSchedule",
    "WindowPlan",
    "assign_senders",
    "build_quota_warnings",
    "build_schedule",
    "daily_capacity",
    "plan_window",
]
