"""What comes back after a send: Nylas notifications verified, kept once, and bounces turned into opt-outs.

`verify_signature` checks a webhook delivery's `x-nylas-signature` against its raw bytes;
`parse_notification` reads the envelope defensively; `record_notification` keeps it in the
unsubscribe store (once per envelope id) with the bounces it reports, so that a hard bounce, or
enough soft ones, stops every campaign that reads the store from mailing that address again
(skip reason `bounced`). `pull_campaign_bounces` finds bounce reports in the senders' own inboxes
instead, for users without a public endpoint. `find_row_bounces` says which of a campaign's sent
messages bounced (status, report). The web service that receives webhooks is `campaign.web`.
"""

from __future__ import annotations

from campaign.events._bounced import RowBounce, find_row_bounces, match_bounces
from campaign.events._notifications import BOUNCE, Notification, parse_bounces, parse_notification
from campaign.events._pull import MAX_PAGES, InboxReader, PullReport, pull_bounces
from campaign.events._pulling import PULL_SKEW, events_store_path, pull_campaign_bounces, pull_senders_inboxes
from campaign.events._recording import record_notification
from campaign.events._signature import sign_body, verify_signature

__all__ = [
    "BOUNCE",
    "MAX_PAGES",
    "PULL_SKEW",
    "InboxReader",
    "Notification",
    "PullReport",
    "RowBounce",
    "events_store_path",
    "find_row_bounces",
    "match_bounces",
    "parse_bounces",
    "parse_notification",
    "pull_bounces",
    "pull_campaign_bounces",
    "pull_senders_inboxes",
    "record_notification",
    "sign_body",
    "verify_signature",
]
