"""Which of a campaign's sent messages bounced, from the bounces its stores keep.

A store is shared by campaigns, so a bounce is this campaign's only when it follows one of its sends:
- a bounce that names the message (a webhook's origin message id) belongs to the row sent with that id;
- one that does not (a report found in an inbox names its own id) belongs to the latest send to its
  address at or before it (less `PULL_SKEW` for the clocks), if this campaign made one.

`match_bounces` is pure; `find_row_bounces` reads the stores it is given and the ledger.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from campaign.events._pulling import PULL_SKEW
from campaign.ledger import Ledger, SentMessage
from campaign.recipients import matching_form
from campaign.unsubscribe import BounceRecord, SuppressionStore

__all__ = ["RowBounce", "find_row_bounces", "match_bounces"]


@dataclass(frozen=True, slots=True)
class RowBounce:
    """What came back for one sent row: its first bounce, and whether any of its bounces was hard."""

    hard: bool
    bounced_at: datetime
    reason: str | None


def match_bounces(sent: Iterable[SentMessage], bounces: Iterable[BounceRecord]) -> dict[str, RowBounce]:
    """The sent rows that bounced, by ledger key."""
    by_id: dict[str, SentMessage] = {}
    by_address: dict[str, list[SentMessage]] = defaultdict(list)
    for row in sent:
        if row.message_id:
            by_id[row.message_id] = row
        by_address[row.email.lower()].append(row)
    for sends in by_address.values():
        sends.sort(key=lambda row: row.sent_at)
    found: dict[str, RowBounce] = {}
    for bounce in sorted(bounces, key=lambda bounce: bounce.bounced_at):
        at = datetime.fromisoformat(bounce.bounced_at)
        sends = by_address.get(matching_form(bounce.email), [])  # the sent rows' addresses are keys already
        message = by_id.get(bounce.message_id or "") or _latest_before(sends, at)
        if message is None:
            continue
        earlier = found.get(message.key)
        if earlier is None:
            found[message.key] = RowBounce(bounce.hard, at, bounce.reason or bounce.code or bounce.kind)
        elif bounce.hard and not earlier.hard:
            found[message.key] = RowBounce(True, earlier.bounced_at, earlier.reason)
    return found


def _latest_before(sends: Sequence[SentMessage], at: datetime) -> SentMessage | None:
    """The latest of `sends` (by sent_at) at or before `at`, give or take the clocks' skew."""
    place = bisect_right([message.sent_at for message in sends], at + PULL_SKEW)
    return sends[place - 1] if place else None


def find_row_bounces(stores: Iterable[SuppressionStore], ledger: Ledger) -> dict[str, RowBounce]:
    """The campaign's sent rows that bounced, by ledger key, from the campaign's open `stores` (none: {})."""
    first = ledger.first_claim()
    if first is None:
        return {}
    bounces = [bounce for store in stores for bounce in store.bounces_since(first - PULL_SKEW)]
    if not bounces:
        return {}
    return match_bounces(ledger.sent_messages_to({bounce.email for bounce in bounces}), bounces)
