"""What comes back after a send: Nylas notifications verified, kept once, and bounces turned into opt-outs.

`verify_signature` checks a webhook delivery's `x-nylas-signature` against its raw bytes;
`parse_notification` reads the envelope defensively; `record_notification` keeps it in the
unsubscribe store (once per envelope id) with the bounces it reports, so that a hard bounce, or
enough soft ones, stops every campaign that reads the store from mailing that address again
(skip reason `bounced`). The web service that receives them is `campaign.web`. No network.
"""

from __future__ import annotations

from campaign.events._notifications import BOUNCE, Notification, parse_bounces, parse_notification
from campaign.events._recording import record_notification
from campaign.events._signature import sign_body, verify_signature

__all__ = [
    "BOUNCE",
    "Notification",
    "parse_bounces",
    "parse_notification",
    "record_notification",
    "sign_body",
    "verify_signature",
]
