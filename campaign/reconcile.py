"""Settling `unknown` rows by asking the API whether their message went out, and saying why.

For each unknown row, in its sender's grant: first the metadata lookup
(`metadata_pair=key2:<recipient key>`, keeping messages whose `key1` is this
campaign), then the Sent folder (`/folders` for the folder with `\\Sent`, then
`/messages?in=…&to=…&received_after=…`, matching the subject recorded at claim
time). Found: the row becomes sent with that message id, at any age. Not found
by lookups that worked, and its last send older than the settle time (`min_age`,
default 15 minutes: a mailbox's Sent folder and Nylas's metadata index can show
a message minutes after it went out): it goes back to pending with a new
idempotency key. Younger, or a lookup that failed: the row stays unknown, and the
report says when reconcile can decide. Never sends; writes the ledger off the
event loop.

`reconcile_campaign` is the use case `campaign reconcile` calls: it opens the ledger for
itself alone, settles every unknown row, and says what is left to do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Protocol, TypeVar

import anyio
import anyio.to_thread

from campaign.clock import Clock
from campaign.errors import ApiAuthError, ApiError, ApiUnavailableError
from campaign.ledger import Ledger, LedgerRow, LedgerSite
from campaign.manifest import Manifest, SenderSettings
from campaign.models import FIRST_STEP, RowState
from campaign.nextsteps import DEFAULT_MIN_AGE, NextStep, load_next_steps
from campaign.nylas import Folder, ListedMessage, MessagePage
from campaign.recipients import matching_form

__all__ = [
    "DEFAULT_MIN_AGE",
    "Decision",
    "MessageLister",
    "ReconcileReport",
    "Reconciliation",
    "Verdict",
    "reconcile_campaign",
    "reconcile_unknown",
]

PAGE = 200
MAX_PAGES = 25  # per lookup: 5,000 messages is far more than one recipient gets from one mailbox
# A lookup the API could not serve is tried this many times at most, each after the wait it asked for if
# that is this short; else its grant gets no more lookups until then (its rows stay unknown).
TRIES = 4
LONGEST_WAIT = timedelta(seconds=60)
# Look back this far before the first claim: the provider's clock and ours may differ.
SKEW = timedelta(minutes=5)

_T = TypeVar("_T")


class MessageLister(Protocol):
    """What reconcile needs from the API: listing messages and folders (campaign.nylas.NylasClient)."""

    async def list_messages(
        self,
        grant_id: str,
        *,
        metadata_pair: tuple[str, str] | None = None,
        in_folder: str | None = None,
        to: str | None = None,
        received_after: datetime | int | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> MessagePage: ...

    async def list_folders(self, grant_id: str) -> list[Folder]: ...


class Verdict(StrEnum):
    """What reconcile decided for a row."""

    SENT = "sent"  # found: marked sent with the message id
    PENDING = "pending"  # not found: back to pending with a new key
    UNKNOWN = "unknown"  # could not tell: left unknown


@dataclass(frozen=True, slots=True)
class Decision:
    """One row's verdict and the reason for it."""

    key: str
    email: str
    sender: str | None
    verdict: Verdict
    reason: str
    message_id: str | None = None

    def as_json(self) -> dict[str, object]:
        """The decision as plain data (`reconcile --json` key `decisions`)."""
        return {
            "key": self.key,
            "email": self.email,
            "sender": self.sender,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "message_id": self.message_id,
        }


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """Every decision, and the rows left in flight (resume re-sends those with their own key)."""

    decisions: tuple[Decision, ...]
    in_flight: int
    decide_after: datetime | None = None  # when the youngest row not found yet can be concluded not sent
    unreachable: int = 0  # rows left unknown because the API could not be reached or asked to wait

    def count(self, verdict: Verdict) -> int:
        """How many rows got `verdict`."""
        return sum(1 for decision in self.decisions if decision.verdict == verdict)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What `campaign reconcile` did (`report`) and what is left to do afterwards."""

    report: ReconcileReport
    next_steps: tuple[NextStep, ...]

    @property
    def settled(self) -> bool:
        """Whether every unknown row was decided (none is left unknown for now)."""
        return self.report.count(Verdict.UNKNOWN) == 0

    @property
    def retry_later(self) -> bool:
        """Whether a row was left unknown because the API could not be reached or asked to wait: running
        again later may decide it."""
        return self.report.unreachable > 0

    def as_json(self) -> dict[str, object]:
        """`reconcile --json`: every decision, the rows still in flight, when to run again, what next."""
        decide_after = self.report.decide_after
        return {
            "decisions": [decision.as_json() for decision in self.report.decisions],
            "in_flight": self.report.in_flight,
            "decide_after": None if decide_after is None else decide_after.isoformat(),
            "next": [step.as_json() for step in self.next_steps],
        }


def reconcile_campaign(
    manifest: Manifest,
    site: LedgerSite,
    *,
    connect: Callable[[], AbstractAsyncContextManager[MessageLister]],
    clock: Clock,
    min_age: timedelta = DEFAULT_MIN_AGE,
    command_path: str,
) -> Reconciliation:
    """Settle the campaign's unknown rows (see `reconcile_unknown`), holding its ledger alone meanwhile.

    `connect`: opens the API client (the real one, or a test's). Rows left in flight longer than
    their key's replay window become unknown first, so they are looked up too. `command_path`: the
    manifest as the user named it (and their `--ledger`), as a shell takes them, for `next_steps`.
    """
    ledger = site.open(clock=clock, campaign=manifest.campaign.name, exclusive=True)
    try:
        ledger.record_expired_claims()

        async def settle() -> ReconcileReport:
            async with connect() as client:
                return await reconcile_unknown(
                    ledger,
                    campaign=manifest.campaign.name,
                    senders=manifest.senders,
                    client=client,
                    clock=clock,
                    min_age=min_age,
                )

        report = anyio.run(settle)
        steps = load_next_steps(
            ledger,
            listed=ledger.counts(listed=True),
            removed=sum(ledger.counts(listed=False).values()),
            manifest=command_path,
            now=clock.now(),
        )
    finally:
        ledger.close()
    return Reconciliation(report, tuple(steps))


async def reconcile_unknown(
    ledger: Ledger,
    *,
    campaign: str,
    senders: Sequence[SenderSettings],
    client: MessageLister,
    clock: Clock,
    min_age: timedelta = DEFAULT_MIN_AGE,
) -> ReconcileReport:
    """Look up every unknown row and record what was found (ApiAuthError stops it: nothing is lost).

    A row not found is concluded not sent only when its last claim is older than `min_age` now. The API's
    Retry-After is honoured (a short wait on `clock`; after a long one the grant is left for later).
    """
    now = clock.now()
    run = anyio.to_thread.run_sync
    rows = await run(lambda: list(ledger.rows(states=(RowState.UNKNOWN,))))
    finder = _Finder(
        client,
        campaign,
        {sender.name: sender for sender in senders},
        known=ledger.sent_message_ids,
        clock=clock,
    )
    decisions: list[Decision] = []
    decide_after: datetime | None = None
    for row in rows:
        decision = await finder.decide(row)
        settles_at = _settles_at(row, min_age)
        if decision.verdict == Verdict.PENDING and (settles_at is None or settles_at > now):
            wait = "" if settles_at is None else f" after {settles_at:%Y-%m-%d %H:%M:%S} UTC"
            decision = replace(
                decision,
                verdict=Verdict.UNKNOWN,
                reason=f"{decision.reason.removesuffix(': not sent')}, but it was sent less than "
                f"{_minutes(min_age)} ago and a mailbox can list it later: run reconcile again{wait}",
            )
            if settles_at is not None:
                decide_after = settles_at if decide_after is None else max(decide_after, settles_at)
        if decision.verdict == Verdict.SENT:
            assert decision.message_id is not None
            assert row.sender is not None
            sent_at = finder.sent_at.get(decision.message_id)
            await run(
                partial(
                    ledger.record_found_sent,
                    row.key,
                    message_id=decision.message_id,
                    sender=row.sender,
                    sent_at=sent_at,
                    note=decision.reason,
                )
            )
        elif decision.verdict == Verdict.PENDING:
            await run(partial(ledger.record_retry, row.key, note=f"reconcile: {decision.reason}"))
        decisions.append(decision)
    unreachable = sum(d.verdict == Verdict.UNKNOWN and d.key in finder.unreachable for d in decisions)
    in_flight = ledger.counts()[RowState.INFLIGHT]
    report = ReconcileReport(tuple(decisions), in_flight, decide_after=decide_after, unreachable=unreachable)
    summary = ", ".join(f"{report.count(verdict)} {verdict.value}" for verdict in Verdict)
    await run(partial(ledger.record_event, "reconcile", f"{len(decisions)} unknown rows: {summary}"))
    return report


def _settles_at(row: LedgerRow, min_age: timedelta) -> datetime | None:
    """When "not found" may be read as "not sent" for `row`: its last claim plus `min_age`."""
    claimed = row.claimed_at or row.first_claimed_at
    return None if claimed is None else datetime.fromisoformat(claimed) + min_age


def _minutes(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    return f"{seconds // 60} min" if seconds % 60 == 0 and seconds >= 60 else f"{seconds} s"


class _Undecided(Exception):
    """A lookup that worked but cannot prove "not sent" (e.g. a listing cut short)."""


class _Finder:
    def __init__(
        self,
        client: MessageLister,
        campaign: str,
        senders: dict[str, SenderSettings],
        *,
        known: Callable[[Iterable[str]], set[str]],
        clock: Clock,
    ) -> None:
        self._client = client
        self._clock = clock
        self._resting: dict[str, datetime] = {}  # grant -> the API asked to wait until then
        self._known = known  # which message ids the ledger already holds as another row's
        self._campaign = campaign
        self._senders = senders
        self._sent_folders: dict[str, Folder | None] = {}
        # Per grant: the Sent folder listed since a time (each message with its recipients in the form
        # the ledger keys them, worked out once per listing, not once per row), and whether it was complete.
        self._sent_listings: dict[str, tuple[datetime, list[tuple[ListedMessage, frozenset[str]]], bool]] = {}
        self.sent_at: dict[str, datetime | None] = {}
        self.unreachable: set[str] = set()  # rows a lookup could not decide for want of the API

    async def decide(self, row: LedgerRow) -> Decision:
        def verdict(value: Verdict, reason: str, found: ListedMessage | None = None) -> Decision:
            if found is not None:
                self.sent_at[found.id] = found.date
            return Decision(
                row.key, row.email, row.sender, value, reason, None if found is None else found.id
            )

        sender = self._senders.get(row.sender or "")
        # Looked up in the mailbox the row's key was issued for, not its sender's grant now: after a
        # grant_id change, the new grant would find nothing and call a message that went out not sent.
        mailbox = row.claimed_via or (sender.mailbox if sender is not None else None)
        if mailbox is None:
            return verdict(
                Verdict.UNKNOWN, f"its sender {row.sender!r} is no longer in the manifest; restore it"
            )
        if mailbox.startswith("domain:"):
            return verdict(
                Verdict.UNKNOWN,
                f"sent through domain {mailbox.removeprefix('domain:')} (transactional): Nylas keeps no "
                "copy to look up; if you know it did not arrive, use `campaign retry --unknown`",
            )
        return await self._look_up(row, mailbox, verdict)

    async def _look_up(self, row: LedgerRow, grant: str, verdict: Callable[..., Decision]) -> Decision:
        """Metadata first, then the Sent folder; "not sent" only when the lookups that ran worked."""
        problem, unavailable = "", False
        try:
            found = await self._by_metadata(grant, row.recipient_key, row.step)
        except ApiAuthError:
            raise
        except ApiError as exc:
            found, problem = [], f"the metadata lookup failed ({exc}); "
            unavailable = isinstance(exc, ApiUnavailableError)
        if found:
            more = f"; {len(found)} messages match: it went out {len(found)} times" if len(found) > 1 else ""
            # Newest first: the last is the earliest, the one that counts.
            return verdict(
                Verdict.SENT, f"found by metadata key2={row.recipient_key} in grant {grant}{more}", found[-1]
            )
        decision = await self._look_in_sent_folder(row, grant, problem, verdict)
        if unavailable and decision.verdict == Verdict.UNKNOWN:
            self.unreachable.add(row.key)
        return decision

    async def _look_in_sent_folder(
        self, row: LedgerRow, grant: str, problem: str, verdict: Callable[..., Decision]
    ) -> Decision:
        try:
            folder = await self._sent_folder(grant)
            if folder is None:
                if problem:
                    return verdict(Verdict.UNKNOWN, f"{problem}and the grant has no Sent folder to look in")
                return verdict(Verdict.PENDING, "not found by metadata (the grant has no Sent folder)")
            if row.subject is None:
                if problem:
                    return verdict(Verdict.UNKNOWN, f"{problem}and no subject was recorded to look for")
                return verdict(
                    Verdict.PENDING, "not found by metadata (no subject recorded for the Sent folder)"
                )
            in_sent = await self._in_sent_folder(grant, folder, row)
        except _Undecided as exc:
            return verdict(Verdict.UNKNOWN, f"{problem}not found by metadata, and {exc}; check by hand")
        except ApiAuthError:
            raise
        except ApiError as exc:
            if isinstance(exc, ApiUnavailableError):
                self.unreachable.add(row.key)
            return verdict(
                Verdict.UNKNOWN, f"{problem}could not search the Sent folder ({exc}); try again later"
            )
        if in_sent is not None:
            return verdict(
                Verdict.SENT,
                f"{problem}found in the Sent folder {folder.name!r} by address and subject",
                in_sent,
            )
        where = "" if problem else "by metadata nor "
        return verdict(
            Verdict.PENDING, f"{problem}not found {where}in the Sent folder {folder.name!r}: not sent"
        )

    async def _by_metadata(self, grant: str, key: str, step: str) -> list[ListedMessage]:
        """The campaign's messages to recipient `key` of `step` (a follow-up's carry it in key3)."""
        found, _ = await self._list_all(grant, metadata_pair=("key2", key))
        wanted_step = None if step == FIRST_STEP else step
        return [
            m
            for m in found
            if m.metadata.get("key1") == self._campaign
            and m.metadata.get("key2") == key
            and m.metadata.get("key3") == wanted_step
        ]

    async def _sent_folder(self, grant: str) -> Folder | None:
        if grant not in self._sent_folders:
            folders = await self._asking(grant, lambda: self._client.list_folders(grant))
            sent = [f for f in folders if any(a.lower() == "\\sent" for a in f.attributes)]
            self._sent_folders[grant] = sent[0] if sent else None
        return self._sent_folders[grant]

    async def _in_sent_folder(self, grant: str, folder: Folder, row: LedgerRow) -> ListedMessage | None:
        """The row's message in the Sent folder, matched here by recipient and subject.

        The folder is listed by time window only, once per grant: the API's `to` filter finds
        nothing on some Microsoft grants (the OpenAPI spec says so), and an empty answer from it
        would read as "not sent". A listing cut short by the page bound proves nothing either.
        """
        since = datetime.fromisoformat(row.first_claimed_at or row.created_at) - SKEW
        cached = self._sent_listings.get(grant)
        if cached is None or cached[0] > since:
            messages, complete = await self._list_all(grant, in_folder=folder.id, received_after=since)
            addressed = [(m, frozenset(matching_form(to) for to in m.to)) for m in messages]
            cached = self._sent_listings[grant] = (since, addressed, complete)
        _, listed, complete = cached
        subject = (row.subject or "").strip()
        email = row.email.lower()
        matches = [m for m, to in listed if email in to and m.subject.strip() == subject]
        # Follow-ups share a subject ("Re: …"): a message the ledger holds for another step is not this one.
        taken = self._known(m.id for m in matches)
        matches = [m for m in matches if m.id not in taken]
        if matches:
            return matches[-1]  # newest first: the last is the earliest
        if not complete:
            message = (
                f"the Sent folder holds more than {PAGE * MAX_PAGES} messages since {since:%Y-%m-%d %H:%M} "
                "UTC, more than reconcile reads"
            )
            raise _Undecided(message)
        return None

    async def _list_all(
        self,
        grant: str,
        *,
        metadata_pair: tuple[str, str] | None = None,
        in_folder: str | None = None,
        to: str | None = None,
        received_after: datetime | None = None,
    ) -> tuple[list[ListedMessage], bool]:
        """Every page of a listing, up to MAX_PAGES; and whether that was all of it."""
        messages: list[ListedMessage] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            listing = partial(
                self._client.list_messages,
                grant,
                metadata_pair=metadata_pair,
                in_folder=in_folder,
                to=to,
                received_after=received_after,
                limit=PAGE,
                page_token=token,
            )
            page = await self._asking(grant, listing)
            messages.extend(page.messages)
            token = page.next_cursor
            if token is None or token in seen:
                break
            seen.add(token)
        else:
            return messages, False  # the page bound was reached with pages left
        return messages, True

    async def _asking(self, grant: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call` to the API for `grant`, as the API asks: after a 429, a 5xx or no connection, the call is
        made again once its Retry-After (else a backoff: 1 s, 2 s, 4 s) has passed; after a long wait, or
        too many, the grant is asked nothing more until then (its rows stay unknown). A reconcile of
        thousands of rows would otherwise go on calling an API that asked it to stop."""
        tries = 0
        while True:
            until = self._resting.get(grant)
            if until is not None and until > self._clock.now():
                message = (
                    f"the API asked to wait until {until:%Y-%m-%d %H:%M:%S} UTC before looking in grant "
                    f"{grant} again; run reconcile again after that"
                )
                raise ApiUnavailableError(message, retry_at=until)
            try:
                return await call()
            except ApiUnavailableError as exc:
                tries += 1
                now = self._clock.now()
                retry_at = exc.retry_at or now + timedelta(seconds=2 ** (tries - 1))
                if retry_at - now > LONGEST_WAIT or tries >= TRIES:
                    self._resting[grant] = retry_at
                    raise
                await self._clock.sleep(max(0.0, (retry_at - now).total_seconds()))
