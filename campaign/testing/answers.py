"""Answers as recipients' mail clients write them, for the fake to place in a grant's inbox.

`build_answer` writes a person's reply (`Re: <subject>`) or an out-of-office auto-reply as the
common autoresponders mark it (RFC 3834 `Auto-Submitted: auto-replied`, `X-Autoreply`,
`Precedence: auto_reply`, an "Automatic reply:" subject, as Exchange and Gmail write them).
"""

from __future__ import annotations

from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

__all__ = ["build_answer"]


def build_answer(
    address: str,
    *,
    mailbox: str,
    subject: str,
    at: datetime,
    auto: bool = False,
    replying: tuple[str, str] | None = None,
) -> bytes:
    """The message `address` sends back to `mailbox` about `subject` (CRLF line ends).

    `replying`: (In-Reply-To, References) for the message answered, as a mail client writes them
    from its Message-ID and References (RFC 5322 §3.6.4); autoresponders do so too (RFC 3834 §3.1.4).
    """
    message = EmailMessage()
    message["From"] = address
    message["To"] = mailbox
    message["Date"] = format_datetime(at)
    message["Message-ID"] = make_msgid(domain=address.rsplit("@", 1)[-1])
    if replying is not None:
        message["In-Reply-To"], message["References"] = replying
    if auto:
        message["Subject"] = f"Automatic reply: {subject}"
        message["Auto-Submitted"] = "auto-replied"
        message["X-Autoreply"] = "yes"
        message["Precedence"] = "auto_reply"
        message.set_content("I am out of the office until next week, with limited access to email.")
    else:
        message["Subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}"
        message.set_content("Thanks, this is interesting: can we talk next week?")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
