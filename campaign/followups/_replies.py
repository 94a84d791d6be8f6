"""Has the recipient answered? The lookups made right before a follow-up is claimed, and what a message
found is: a person's reply, an auto-reply, or a bounce report.

Two listings per follow-up, both through the grant that sent the thread:
`GET /messages?thread_id=<thread>&received_after=<previous step>` (a reply in the thread) and
`GET /messages?from=<address>&received_after=<step 1>` (a reply outside it), each from 5 minutes
before that send (the provider's clock is not ours). A message we sent
ourselves is never an answer. Only when something was found are its headers fetched
(`GET /messages/{id}?fields=include_headers`), to tell an auto-reply (RFC 3834 and the headers
autoresponders use; the subject as a last resort) or a bounce report from a person. A lookup that
fails raises `ApiError`: the caller holds the follow-up back, it is never sent blind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import getaddresses
from enum import StrEnum
from typing import Protocol, runtime_checkable

import anyio
import anyio.to_thread

from campaign.nylas import ListedMessage, MessagePage
from campaign.recipients import matching_form

__all__ = [
    "SKEW",
    "Answer",
    "AnswerKind",
    "ReplyClient",
    "classify_answer",
    "find_answer",
    "list_pages",
    "read_answer_kind",
]

# Pages of a listing looked at per lookup: a thread or a sender with more than this is unusual, and
# what matters (any answer) shows on the first page.
_MAX_PAGES = 3
_PAGE = 50
_AUTO_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[\s_-]*(reply|response|antwort)|out of (the )?office|ooo\b|oof\b|"
    r"abwesenheitsnotiz|r[ée]ponse automatique|respuesta autom[aá]tica)",
    re.IGNORECASE,
)
_DAEMONS = ("mailer-daemon@", "postmaster@")
# Listings start this long before the send they answer: a message is dated by the provider's clock, not
# ours, and a reply that came while the previous step was going out was not there for its lookup.
SKEW = timedelta(minutes=5)


class AnswerKind(StrEnum):
    """What a message that came back is."""

    REPLY = "reply"  # a person answered
    AUTO = "auto-reply"  # an out-of-office or other autoresponder
    BOUNCE = "bounce"  # a delivery status report


@dataclass(frozen=True, slots=True)
class Answer:
    """A message that came back after a step: which one, when, and what it is."""

    message_id: str
    at: datetime | None
    kind: AnswerKind

    def describe(self) -> str:
        """For the ledger: `message <id> at <time>`."""
        when = "" if self.at is None else f" at {self.at.isoformat(timespec='seconds')}"
        return f"message {self.message_id}{when}"


@runtime_checkable
class ReplyClient(Protocol):
    """The reads reply detection makes (NylasClient has them)."""

    async def list_messages(
        self,
        grant_id: str,
        *,
        from_: str | None = None,
        thread_id: str | None = None,
        received_after: datetime | int | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> MessagePage: ...

    async def fetch_headers(self, grant_id: str, message_id: str) -> tuple[tuple[str, str], ...]: ...


def classify_answer(headers: Sequence[tuple[str, str]], subject: str, senders: Sequence[str]) -> AnswerKind:
    """A bounce report, an auto-reply, or (when nothing says otherwise) a person's reply. Pure."""
    named: dict[str, list[str]] = {}
    for name, value in headers:
        named.setdefault(name.lower(), []).append(value.strip().lower())
    content_type = " ".join(named.get("content-type", []))
    if any(sender.lower().startswith(_DAEMONS) for sender in senders) or (
        "multipart/report" in content_type and "delivery-status" in content_type
    ):
        return AnswerKind.BOUNCE
    auto_submitted = [value for value in named.get("auto-submitted", []) if value and value != "no"]
    precedence = " ".join(named.get("precedence", []))
    if (
        auto_submitted
        or any(name in named for name in ("x-autoreply", "x-autorespond", "x-autoresponder"))
        or "x-auto-response-suppress" in named
        or re.search(r"auto[_-]?reply|bulk|junk", precedence)
        or _AUTO_SUBJECT.match(subject)
    ):
        return AnswerKind.AUTO
    return AnswerKind.REPLY


async def find_answer(
    client: ReplyClient,
    *,
    grant_id: str,
    thread_id: str | None,
    address: str,
    previous_sent_at: datetime,
    first_sent_at: datetime,
    ours: Callable[[Iterable[str]], set[str]],
    own_address: str | None,
) -> Answer | None:
    """The answer that stops a follow-up (a reply or bounce first, else the latest auto-reply), or None.

    `ours` says which message ids this campaign sent (they are never answers); `own_address` is the
    sender's mailbox, whose own messages in the thread are not answers either.
    """
    found: dict[str, ListedMessage] = {}
    if thread_id is not None:
        since = previous_sent_at - SKEW
        for message in await list_pages(client, grant_id, thread_id=thread_id, since=since):
            found[message.id] = message
    for message in await list_pages(client, grant_id, from_=address, since=first_sent_at - SKEW):
        found[message.id] = message
    own = matching_form(own_address) if own_address else ""
    mine = await anyio.to_thread.run_sync(ours, list(found)) if found else set()  # a ledger read
    candidates = [
        message
        for message in found.values()
        if message.id not in mine and not (own and all(matching_form(s) == own for s in message.senders))
    ]
    candidates.sort(key=lambda message: (message.date is None, message.date))
    auto: Answer | None = None
    for message in candidates:
        headers = await client.fetch_headers(grant_id, message.id)
        kind = classify_answer(headers, message.subject, message.senders)
        answer = Answer(message.id, message.date, kind)
        if kind != AnswerKind.AUTO:
            return answer
        auto = answer
    return auto


async def read_answer_kind(client: ReplyClient, grant_id: str, message_id: str) -> AnswerKind:
    """What the message `message_id` is, from its headers alone (its Subject and From among them): one
    `GET /messages/{id}?fields=include_headers`. ApiError when it cannot be read."""
    headers = await client.fetch_headers(grant_id, message_id)
    subject = next((value for name, value in headers if name.lower() == "subject"), "")
    senders = [address for _, address in getaddresses([v for n, v in headers if n.lower() == "from"])]
    return classify_answer(headers, subject, senders)


async def list_pages(
    client: ReplyClient,
    grant_id: str,
    *,
    since: datetime,
    thread_id: str | None = None,
    from_: str | None = None,
) -> list[ListedMessage]:
    """The first pages of the grant's messages since `since` (in a thread, or from an address)."""
    messages: list[ListedMessage] = []
    token: str | None = None
    for _ in range(_MAX_PAGES):
        page = await client.list_messages(
            grant_id, thread_id=thread_id, from_=from_, received_after=since, limit=_PAGE, page_token=token
        )
        messages.extend(page.messages)
        token = page.next_cursor
        if token is None:
            break
    return messages
