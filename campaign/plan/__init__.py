"""Who sends each row and when: sender assignment, schedules, and the pace and budget arithmetic. Pure.

`SenderAssigner`/`assign_senders` pick each row's sender (pinned, kept from the ledger, else the
one that finishes soonest); `build_schedule` estimates each sender's finish; `_ratelimit` holds
the token-bucket pace and the rolling 24-hour budget as arithmetic on times it is given;
`_calendar` holds the delays ("3 business days"), send windows and holidays that follow-up
steps will be scheduled by.
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
from campaign.plan._calendar import (
    Delay,
    SendWindow,
    add_delay,
    load_zone,
    next_open,
    parse_delay,
    parse_window,
)
from campaign.plan._ratelimit import DAY_S, NYLAS_MULTIPART_PER_SECOND, DailyBudget, Pace

__all__ = [
    "DAY_S",
    "NYLAS_MULTIPART_PER_SECOND",
    "DailyBudget",
    "Delay",
    "Job",
    "Pace",
    "Schedule",
    "SendWindow",
    "SenderAssigner",
    "SenderSchedule",
    "add_delay",
    "assign_senders",
    "build_quota_warnings",
    "build_schedule",
    "daily_capacity",
    "load_zone",
    "next_open",
    "parse_delay",
    "parse_window",
]
