"""Bounce reports in the senders' own inboxes: `campaign events pull`, for users without a public endpoint.

A bounce comes back to the mailbox that sent the message, as a delivery status notification
(DSN). For each sender's grant this lists the inbox since the campaign's first send, or since what
an earlier pull read (the store keeps an `InboxCursor` per grant), paged and bounded; picks the
likely reports (from `MAILER-DAEMON` or `postmaster`, or a subject such as "Undeliverable" or
"Delivery Status Notification"), fetches their MIME (`fields=raw_mime`), and lets flufl.bounce
(GNU Mailman's bounce detectors) say which addresses failed, for good or for now. Where the report
is a standard DSN (RFC 3464), each address's `Status` code and the remote server's
`Diagnostic-Code` go with it, for `campaign report` to show. They are recorded in the unsubscribe
store like webhook bounces, once per report: pulling twice records nothing twice.

The same walk picks up unsubscribe requests sent to `unsubscribe.mailto` when that address is a
sender's mailbox: a mail client (Outlook.com acts on nothing else) mails it with the subject
`unsubscribe-<token>` campaign wrote into `List-Unsubscribe`; a token that verifies under the
campaign's secrets is recorded in the store as the one-click endpoint records one (source `mailto`).
The store is read and written in worker threads: a run pulls between its rounds, and a slow store must
not hold its event loop (the sends, a worker's lease heartbeat).
"""

from __future__ import annotations

import email
import email.message
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Protocol, runtime_checkable

import anyio
import anyio.to_thread
from flufl.bounce import all_failures

from campaign.events._notifications import BOUNCE, field_text, is_blocked
from campaign.nylas import Folder, MessagePage
from campaign.recipients import comparable_address, matching_form
from campaign.unsubscribe import (
    BLOCK_KIND,
    INBOX_EVENT_PREFIX,
    BounceRecord,
    InboxCursor,
    SuppressionStore,
    find_mailto_token,
    verify_token,
)

__all__ = ["MAX_PAGES", "InboxReader", "PullReport", "pull_bounces"]

PAGE = 200
MAX_PAGES = 10  # per grant and pull: 2,000 inbox messages; the next pull goes on from where it stopped
# Each pull lists again from this long before the newest message the last one saw: a provider syncs
# some messages late, under an earlier date. Reports listed twice are recorded once.
_OVERLAP = timedelta(hours=1)
_SECOND = timedelta(seconds=1)
_REPORT_SENDERS = re.compile(r"^(mailer-daemon|postmaster)@", re.IGNORECASE)
_REPORT_SUBJECTS = re.compile(
    r"undeliver|delivery status notification|returned mail|mail delivery (failed|subsystem)"
    r"|failure notice|delivery has failed|could not be delivered",
    re.IGNORECASE,
)


@runtime_checkable
class InboxReader(Protocol):
    """What a pull needs from the API (campaign.nylas.NylasClient)."""

    async def list_folders(self, grant_id: str) -> list[Folder]: ...

    async def list_messages(
        self,
        grant_id: str,
        *,
        in_folder: str | None = None,
        received_after: datetime | int | None = None,
        received_before: datetime | int | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> MessagePage: ...

    async def fetch_raw_mime(self, grant_id: str, message_id: str) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PullReport:
    """What a pull looked at and found; `calls` is the API requests it made."""

    grants: int
    listed: int
    reports: int
    recorded: int  # reports not seen by an earlier pull
    hard: tuple[str, ...]  # addresses that failed for good (suppressed)
    soft: tuple[str, ...]  # addresses that failed for now (suppressed after repeated ones)
    calls: int
    cut_short: tuple[str, ...] = ()  # grants with more inbox messages than MAX_PAGES pages
    unsubscribed: tuple[str, ...] = ()  # addresses whose mailto unsubscribe request was recorded now


async def pull_bounces(
    client: InboxReader,
    grants: Sequence[str],
    store: SuppressionStore,
    *,
    since: datetime,
    secrets: Sequence[bytes] = (),
) -> PullReport:
    """Look through each grant's inbox since `since` for bounce reports and record them in `store`, and
    with the unsubscribe `secrets`, for mailto unsubscribe requests (recorded as unsubscribes)."""
    tally = _Tally(secrets=tuple(secrets))
    for grant in grants:
        await _pull_grant(client, grant, store, since, tally)
    return PullReport(
        grants=len(grants),
        listed=tally.listed,
        reports=tally.reports,
        recorded=tally.recorded,
        hard=tuple(tally.hard),
        soft=tuple(tally.soft),
        calls=tally.calls,
        cut_short=tuple(tally.cut_short),
        unsubscribed=tuple(tally.unsubscribed),
    )


@dataclass
class _Tally:
    secrets: tuple[bytes, ...] = ()
    listed: int = 0
    reports: int = 0
    recorded: int = 0
    calls: int = 0
    hard: list[str] = field(default_factory=list)
    soft: list[str] = field(default_factory=list)
    cut_short: list[str] = field(default_factory=list)
    unsubscribed: list[str] = field(default_factory=list)


async def _pull_grant(
    client: InboxReader, grant: str, store: SuppressionStore, since: datetime, tally: _Tally
) -> None:
    """Read the part of the inbox no pull has read yet, oldest part first, within MAX_PAGES pages.

    The listing is newest first, so a pull that reaches its page limit has read the newest messages
    only: the cursor keeps the part before them (the gap), which the next pull reads first. Bounce
    reports come soon after the sends, so they are in that oldest part.
    """
    folders = await client.list_folders(grant)
    tally.calls += 1
    inbox = next((f.id for f in folders if "\\Inbox" in f.attributes), None)
    if inbox is None:
        return
    cursor = await anyio.to_thread.run_sync(store.inbox_cursor, grant)
    if cursor is None or cursor.start > since:
        cursor = InboxCursor(start=since, through=since)
    pages = MAX_PAGES
    if (gap_before := cursor.gap_before) is not None:
        gap = await _read_inbox(client, grant, inbox, store, tally, cursor, pages, before=gap_before)
        pages -= gap.pages
        if gap.complete:
            cursor = InboxCursor(cursor.start, cursor.gap_through or cursor.through)
        else:
            # At least a second further back each time, even with a page limit's worth in one second.
            oldest = min(gap.oldest or gap_before, gap_before - _SECOND)
            cursor = replace(cursor, gap_before=oldest)
    read_all = False
    if cursor.gap_before is None and pages:
        new = await _read_inbox(client, grant, inbox, store, tally, cursor, pages, before=None)
        newest = max(cursor.through, new.newest or cursor.through)
        if new.complete:
            cursor, read_all = InboxCursor(cursor.start, newest), True
        else:
            cursor = replace(cursor, gap_before=new.oldest or cursor.through, gap_through=newest)
    await anyio.to_thread.run_sync(store.record_inbox_cursor, grant, cursor)
    if not read_all:
        tally.cut_short.append(grant)


@dataclass(frozen=True, slots=True)
class _Read:
    """One listing walked: its pages, whether it reached the end, and the dates it saw."""

    pages: int
    complete: bool
    oldest: datetime | None
    newest: datetime | None


async def _read_inbox(
    client: InboxReader,
    grant: str,
    inbox: str,
    store: SuppressionStore,
    tally: _Tally,
    cursor: InboxCursor,
    pages: int,
    *,
    before: datetime | None,
) -> _Read:
    """List the inbox from a little before `cursor.through` (to `before`, if given), at most `pages`
    pages, and record the bounce reports found."""
    dates: list[datetime] = []
    token: str | None = None
    for page_number in range(1, pages + 1):
        page = await client.list_messages(
            grant,
            in_folder=inbox,
            received_after=cursor.through - _OVERLAP,
            received_before=before,
            limit=PAGE,
            page_token=token,
        )
        tally.calls += 1
        tally.listed += len(page.messages)
        for message in page.messages:
            if message.date is not None:
                dates.append(message.date)
            if _looks_like_a_report(message.senders, message.subject):
                await _record_report(client, grant, message.id, message.date or cursor.through, store, tally)
            elif tally.secrets and (token := find_mailto_token(message.subject)) is not None:
                await anyio.to_thread.run_sync(_record_unsubscribe, token, store, tally)
        token = page.next_cursor
        if token is None:
            return _Read(page_number, True, min(dates, default=None), max(dates, default=None))
    return _Read(pages, False, min(dates, default=None), max(dates, default=None))


async def _record_report(
    client: InboxReader,
    grant: str,
    message_id: str,
    received: datetime,
    store: SuppressionStore,
    tally: _Tally,
) -> None:
    raw = await client.fetch_raw_mime(grant, message_id)
    tally.calls += 1
    tally.reports += 1
    bounces = _read_report(raw, received=received, message_id=message_id)
    body = json.dumps({"grant_id": grant, "message_id": message_id, "source": "inbox"})
    event_id = f"{INBOX_EVENT_PREFIX}{grant}:{message_id}"
    record = partial(store.record_event, event_id, BOUNCE, grant_id=grant, body=body, bounces=bounces)
    if await anyio.to_thread.run_sync(record):
        tally.recorded += 1
        tally.hard.extend(b.email for b in bounces if b.hard)
        tally.soft.extend(b.email for b in bounces if not b.hard)


def _record_unsubscribe(token: str, store: SuppressionStore, tally: _Tally) -> None:
    """A mailto unsubscribe request: recorded as the endpoint records a click, if its token verifies (a
    forged or another campaign's token is ignored, as the endpoint refuses it)."""
    claims = verify_token(token, secrets=tally.secrets)
    if claims is None:
        return
    if store.record(claims.campaign, claims.recipient_key, email=claims.email, source="mailto"):
        tally.unsubscribed.append(claims.email or claims.recipient_key)


def _looks_like_a_report(senders: Sequence[str], subject: str) -> bool:
    return any(_REPORT_SENDERS.match(sender) for sender in senders) or bool(_REPORT_SUBJECTS.search(subject))


def _read_report(raw: bytes, *, received: datetime, message_id: str) -> tuple[BounceRecord, ...]:
    """The failed addresses a DSN names (flufl.bounce), permanent ones hard, unless the server refused the
    sender (`is_blocked`: a block, `BLOCK_KIND`); none for ordinary mail."""
    parsed = email.message_from_bytes(raw)
    temporary, permanent = all_failures(parsed)
    when = received.astimezone(UTC).isoformat(timespec="seconds")
    found: dict[str, bool] = {}
    for failed, permanently in [(a, True) for a in permanent] + [(a, False) for a in temporary]:
        # Only an address (as a webhook's bounce, `_notifications`): a report is anyone's mail.
        address = comparable_address(failed.decode("utf-8", errors="replace"))
        if address is not None:
            found[address] = found.get(address, False) or permanently
    said = _delivery_status(parsed)
    bounces = []
    for address, is_hard in found.items():
        code, kind, reason = said.get(address, (None, "dsn", None))
        if is_blocked(code, reason):  # refused the sender, not the address: never suppresses it
            is_hard, kind = False, BLOCK_KIND
        bounces.append(BounceRecord(address, is_hard, when, code, kind, reason, message_id))
    return tuple(bounces)


def _delivery_status(report: email.message.Message) -> dict[str, tuple[str | None, str, str | None]]:
    """Per recipient (lower-cased), what a standard DSN says of it (RFC 3464): its Status code, "dsn",
    and the remote server's Diagnostic-Code (one line, bounded: it is the remote server's text)."""
    found: dict[str, tuple[str | None, str, str | None]] = {}
    for part in report.walk():
        blocks = part.get_payload() if part.get_content_type() == "message/delivery-status" else None
        if not isinstance(blocks, list):
            continue
        for block in blocks[1:]:  # the first block is about the message, the others a recipient each
            if not isinstance(block, email.message.Message):
                continue
            recipient = block.get("Final-Recipient") or block.get("Original-Recipient")
            if recipient is None:
                continue
            address = matching_form(str(recipient).rpartition(";")[2])
            status = field_text(block.get("Status"))
            # "smtp; 550 5.1.1 …": the text after its type (all of it, when a server leaves the type out)
            diagnostic = field_text(str(block.get("Diagnostic-Code") or "").split(";", 1)[-1])
            found.setdefault(address, (status, "dsn", diagnostic))
    return found
