"""Opt-outs as a pipeline step: recipients in an unsubscribe store become skips. Pure.

The reason is `bounced` for an address a bounce suppressed, else `unsubscribed`.
"""

from __future__ import annotations

from campaign.models import Skip, SkipReason
from campaign.recipients import CheckedRow
from campaign.unsubscribe import BOUNCE_SOURCE, Unsubscribed, describe_entry

__all__ = ["skip_unsubscribed_row"]


def skip_unsubscribed_row(checked: CheckedRow, unsubscribed: Unsubscribed) -> CheckedRow:
    """A checked row as an `unsubscribed` skip when its recipient is in `unsubscribed`; else unchanged."""
    recipient = checked.recipient
    entry = None if recipient is None else unsubscribed.match(recipient)
    if recipient is None or entry is None:
        return checked
    reason = SkipReason.BOUNCED if entry.source == BOUNCE_SOURCE else SkipReason.UNSUBSCRIBED
    skip = Skip(recipient.row, recipient.key, recipient.address.email, reason, describe_entry(entry))
    return checked._replace(recipient=None, skip=skip)
