"""Bounce reports as mail servers write them, and Nylas notifications about them, for the fake to emit.

`build_dsn` writes a delivery status notification (RFC 3464 `multipart/report`) in Gmail's or
Exchange Online's style: the sender (`mailer-daemon@googlemail.com`, `postmaster@outlook.com`),
the subject, the human part, the `message/delivery-status` part with `Final-Recipient`,
`Action`, `Status` and `Diagnostic-Code`, and the original's headers. `build_bounce_object` is the
`message.bounce_detected` object Nylas sends for it (reference/next-capabilities.md §2.2:
`bounced_addresses` a string, `code` a string). Written from those documents, not from our client.
"""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Any, Literal

__all__ = ["DsnStyle", "build_bounce_object", "build_dsn"]

DsnStyle = Literal["gmail", "exchange"]


def build_dsn(
    address: str,
    *,
    mailbox: str,
    subject: str,
    at: datetime,
    style: DsnStyle = "gmail",
    permanent: bool = True,
) -> bytes:
    """The report `mailbox` gets back when its message to `address` bounced (CRLF line ends)."""
    status = ("5.1.1" if style == "gmail" else "5.1.10") if permanent else "4.2.2"
    action = "failed" if permanent else "delayed"
    if style == "gmail":
        sender, title = (
            "Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
            "Delivery Status Notification",
        )
        title += " (Failure)" if permanent else " (Delay)"
        human = f"Your message wasn't delivered to {address} because the address couldn't be found."
        diagnostic = f"smtp; 550-{status} The email account that you tried to reach does not exist."
        reporting = "dns; googlemail.com"
        original = "message/rfc822"
    else:
        sender, title = "Microsoft Outlook <postmaster@outlook.com>", f"Undeliverable: {subject}"
        human = f"Delivery has failed to these recipients or groups:\n{address}"
        diagnostic = f"smtp;550 {status} RESOLVER.ADR.RecipientNotFound; Recipient not found"
        reporting = "dns;AM0PR01MB1234.eurprd01.prod.exchangelabs.com"
        original = "text/rfc822-headers"
    text = f"""From: {sender}
To: {mailbox}
Subject: {title}
Date: {format_datetime(at)}
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="dsn-boundary"
Auto-Submitted: auto-replied

--dsn-boundary
Content-Type: text/plain; charset="UTF-8"

{human}

--dsn-boundary
Content-Type: message/delivery-status

Reporting-MTA: {reporting}

Final-Recipient: rfc822; {address}
Action: {action}
Status: {status}
Diagnostic-Code: {diagnostic}

--dsn-boundary
Content-Type: {original}

From: {mailbox}
To: {address}
Subject: {subject}

--dsn-boundary--
"""
    return text.replace("\n", "\r\n").encode()


def build_bounce_object(address: str, *, message_id: str, subject: str, at: datetime) -> dict[str, Any]:
    """The `data.object` of a `message.bounce_detected` notification for a hard bounce."""
    return {
        "bounce_reason": "Mailbox does not exist",
        "bounce_date": format_datetime(at),
        "bounced_addresses": address,
        "type": "mailbox_unavailable",
        "code": "550",
        "origin": {"id": message_id, "to": [{"email": address}], "subject": subject},
        "message_id": message_id,
    }
