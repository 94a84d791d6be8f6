"""The send loop: each sender's lane under its limits, the ledger claim before each send, retries, stop.

`dispatch` runs the jobs concurrently, one lane per sender (pace, concurrency, 24-hour budget),
claims each row in the ledger before its request leaves and records the outcome after,
waits out 429s and retries what is safe to retry (`_retries`), and stops gracefully on a
request (`run_interruptible`: Ctrl-C as a stop). Time only through the `Clock` it is handed.
Lanes read their work a page at a time from a `JobSource` (`source_of` a list, `chain_sources`).
`send_under_leases` runs rounds as one of several workers, from the grants this one leases.
"""

from __future__ import annotations

from campaign.dispatch._feed import JobSource, chain_sources, source_of
from campaign.dispatch._interrupt import run_interruptible
from campaign.dispatch._leased import Leases, send_under_leases
from campaign.dispatch._loop import DispatchSettings, dispatch
from campaign.dispatch._types import DispatchEvent, DispatchResult, EventKind

__all__ = [
    "DispatchEvent",
    "DispatchResult",
    "DispatchSettings",
    "EventKind",
    "JobSource",
    "Leases",
    "chain_sources",
    "dispatch",
    "run_interruptible",
    "send_under_leases",
    "source_of",
]
