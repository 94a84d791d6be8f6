"""Warnings about one rendered message that do not stop a run: a long subject, big attachments.

Each check takes a `Message` and returns None, or (what is wrong, said of every such
message; this message's own note), so a preview can count them and list them per row.
Add a check by adding a function to `MESSAGE_CHECKS`. Pure.
"""

from __future__ import annotations

from collections.abc import Callable

from campaign.models import Message
from campaign.render._attachments import check_missing_inline_images, check_unused_inline_images

__all__ = [
    "JSON_SEND_LIMIT",
    "MESSAGE_CHECKS",
    "MULTIPART_SEND_LIMIT",
    "SUBJECT_WARN_CHARS",
    "check_attachments",
    "check_subject",
]

SUBJECT_WARN_CHARS = 78  # RFC 5322's recommended line length; mail apps cut longer subjects off
JSON_SEND_LIMIT = 3_000_000  # bytes in one JSON send request (nylas-api.md §2)
MULTIPART_SEND_LIMIT = 25_000_000  # bytes in one multipart send request


def check_subject(message: Message) -> tuple[str, str] | None:
    """A subject long enough that mail apps cut it off."""
    length = len(message.subject)
    if length <= SUBJECT_WARN_CHARS:
        return None
    return f"subjects longer than {SUBJECT_WARN_CHARS} characters (mail apps cut them off)", (
        f"subject is {length} characters"
    )


def check_attachments(message: Message) -> tuple[str, str] | None:
    """Attachments too big for a JSON send, or for any send."""
    if not message.attachments:
        return None
    raw = sum(attachment.size for attachment in message.attachments)
    wire = (raw + 2) // 3 * 4  # base64 in a JSON send
    size = f"attachments are {raw / 1_000_000:.1f} MB"
    if raw > MULTIPART_SEND_LIMIT:
        return f"attachments over {MULTIPART_SEND_LIMIT // 1_000_000} MB, which Nylas refuses", size
    if wire > JSON_SEND_LIMIT:
        return (
            f"attachments too big for a {JSON_SEND_LIMIT // 1_000_000} MB JSON send "
            "(multipart sends allow 25 MB, at most 10 a second per grant)",
            size,
        )
    return None


MESSAGE_CHECKS: tuple[Callable[[Message], tuple[str, str] | None], ...] = (
    check_subject,
    check_attachments,
    check_missing_inline_images,  # issue 7: <img src="cid:…"> wiring
    check_unused_inline_images,
)
