"""Follow-ups as work: scheduling each next step when the previous one was sent, reading back the
ones due, and the reply check right before each is claimed.

`schedule_followups` gives every recipient whose step N was sent a pending row for step N+1, due
`after` the send (business days and holidays in the sender's zone), at `deliver_at` in the
recipient's zone if asked, and inside the sender's window. `DueJobs` reads the rows due now back, a
page at a time, as jobs with the step they answer. `build_screen` makes the check the send loop awaits before
each follow-up's claim: a reply (or a bounce report) stops the sequence as its step says, an
auto-reply is noted or stops it, a failed lookup holds the follow-up back.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from itertools import pairwise
from zoneinfo import ZoneInfo

import anyio
import anyio.to_thread

from campaign.errors import CampaignError
from campaign.followups._notices import ReplyNotices
from campaign.followups._replies import Answer, AnswerKind, ReplyClient, find_answer, read_answer_kind
from campaign.ledger import DueStep, Ledger, ScheduledStep, SentStep
from campaign.manifest import FollowupSettings, Manifest, SenderSettings
from campaign.models import FIRST_STEP, PreviousStep, Recipient, RowState, Screening, SkipReason
from campaign.plan import Job
from campaign.sendtime import add_delay, load_zone, next_delivery, parse_deliver_at
from campaign.unsubscribe import ThreadReply

__all__ = [
    "DueJobs",
    "build_screen",
    "due_time",
    "first_due_time",
    "recipient_zone",
    "schedule_followups",
]

_BATCH = 1000
# Rebuilds recipients from (row, key, address) of the recorded plan (`pipeline.load_recipients`).
RecipientsAt = Callable[[Sequence[tuple[int, str, str]]], list[Recipient]]


def due_time(
    manifest: Manifest,
    followup: FollowupSettings,
    sender: SenderSettings,
    sent_at: datetime,
    recipient_zone: ZoneInfo | None = None,
) -> datetime:
    """When `followup` is due for a recipient whose previous step `sender` sent at `sent_at`. Pure."""
    zone = load_zone(sender.timezone)
    due = add_delay(sent_at, followup.delay, zone=zone, holidays=manifest.campaign.holidays)
    return _delivery(manifest, sender, due, followup.deliver_at, recipient_zone)


def first_due_time(manifest: Manifest, job: Job, now: datetime) -> datetime | None:
    """When step 1 may go to `job`'s recipient: None (at once) unless [message] has `deliver_at`. Pure."""
    if manifest.message.deliver_at is None:
        return None
    sender = manifest.sender(job.sender)
    return _delivery(
        manifest, sender, now, manifest.message.deliver_at, recipient_zone(manifest, job.recipient)
    )


def recipient_zone(manifest: Manifest, recipient: Recipient) -> ZoneInfo | None:
    """The recipient's zone from `recipients.timezone_column` (None: none given; the sender's applies)."""
    column = manifest.recipients.timezone_column
    name = "" if column is None else str(recipient.fields.get(column) or "").strip()
    return load_zone(name) if name else None  # checked with the list: a bad zone stopped the run then


def _delivery(
    manifest: Manifest, sender: SenderSettings, due: datetime, deliver_at: str | None, zone: ZoneInfo | None
) -> datetime:
    """`due`, moved to `deliver_at` in the recipient's (else the sender's) zone, inside the window."""
    return next_delivery(
        due,
        window=sender.send_window,
        deliver_at=None if deliver_at is None else parse_deliver_at(deliver_at),
        zone=zone or load_zone(sender.timezone),
        holidays=manifest.campaign.holidays,
    )


def timing_stamp(manifest: Manifest, step: str) -> str:
    """What decides follow-up `step`'s due times, as text: its `after` and `deliver_at`, the campaign's
    holidays, where recipients' zones come from, and each sender's window and zone. Pure."""
    followup = manifest.followup(step)
    assert followup is not None
    decides = {
        "after": followup.after,
        "deliver_at": followup.deliver_at,
        "holidays": sorted(day.isoformat() for day in manifest.campaign.holidays),
        "timezone_column": manifest.recipients.timezone_column,
        "senders": {sender.name: [sender.window, sender.timezone] for sender in manifest.senders},
    }
    return json.dumps(decides, sort_keys=True)


def schedule_followups(manifest: Manifest, ledger: Ledger, *, recipients_at: RecipientsAt) -> int:
    """Record the next step for every recipient whose previous step was sent; returns how many.

    A step whose timing changed since its rows were scheduled (`timing_stamp`: an edited `after`, a new
    window or holiday) has its rows not yet claimed made again, due by the new timing: editing a step
    that has not gone out is free, and takes effect.

    A recipient's next step is due from the step it got last. A step inserted before one already
    scheduled goes first (`_unschedule_past_inserted`), and the later step waits its delay from its
    send; a recipient who has a row of a step after the inserted one (sent, on its way, or stopped)
    never gets it."""
    senders = {sender.name: sender for sender in manifest.senders}
    steps = manifest.steps
    total = 0
    _unschedule_past_inserted(manifest, ledger)
    for index in range(1, len(steps)):
        previous, step, later = steps[index - 1], steps[index], steps[index + 1 :]
        followup = manifest.followup(step)
        assert followup is not None  # manifest.steps lists the follow-ups
        stamp = timing_stamp(manifest, step)
        recorded = ledger.timing_stamp(step)
        if recorded != stamp:
            if recorded is not None:
                ledger.unschedule_steps(step)
            ledger.record_timing_stamp(stamp, step)
        cursor = 0
        while batch := ledger.unscheduled_steps(previous, step, later=later, after=cursor, limit=_BATCH):
            cursor = batch[-1].cursor
            zones = _recipient_zones(manifest, batch, recipients_at) if followup.deliver_at else {}
            scheduled = [
                ScheduledStep(
                    recipient=item.recipient,
                    step=step,
                    row=item.row,
                    email=item.email,
                    sender=item.sender,
                    previous=item.key,
                    due_at=_due(manifest, followup, senders.get(item.sender), item, zones.get(item.key)),
                )
                for item in batch
            ]
            total += ledger.record_followups(scheduled)
    return total


def _unschedule_past_inserted(manifest: Manifest, ledger: Ledger) -> None:
    """Remove the rows scheduled and never claimed that answer a step the manifest now has another step
    after (inserted between them), so that the inserted step is scheduled in their place and theirs
    after its send. Where a recipient's inserted step failed or was stopped, its row stays: nothing
    would come after that step.

    Done when the steps' order differs from the one kept (`Ledger.step_order`), and on the first
    scheduling of a ledger that kept none, whose rows an earlier version may have scheduled past an
    inserted step: each pass reads every follow-up row, and once done, none is scheduled so again."""
    steps = manifest.steps
    if ledger.step_order() == steps:
        return
    for index, step in enumerate(steps):
        # (a step before this one's predecessor, the step after it in the manifest now)
        for answering, skipped in pairwise(steps[:index]):
            ledger.unschedule_skipping(step, answering=answering, skipped=skipped)
    ledger.record_step_order(steps)


def _due(
    manifest: Manifest,
    followup: FollowupSettings,
    sender: SenderSettings | None,
    item: SentStep,
    zone: ZoneInfo | None,
) -> datetime:
    if sender is None:  # its sender left the manifest: `DueJobs` says so when it is due
        return item.sent_at
    return due_time(manifest, followup, sender, item.sent_at, zone)


def _recipient_zones(
    manifest: Manifest, batch: Sequence[SentStep], recipients_at: RecipientsAt
) -> dict[str, ZoneInfo]:
    if manifest.recipients.timezone_column is None:
        return {}
    found = recipients_at([(item.row, item.recipient, item.email) for item in batch])
    zones = {
        item.key: recipient_zone(manifest, recipient) for item, recipient in zip(batch, found, strict=True)
    }
    return {key: zone for key, zone in zones.items() if zone is not None}


class DueJobs:
    """The follow-ups due at `now` as jobs for the send loop (`campaign.dispatch.JobSource`), a sender's
    page at a time: its rows left in flight first, then its pending ones in ledger order.

    Built with one pass over the due rows, a page at a time: one that cannot be sent any more (its
    recipient left the list, its step or sender left the manifest) is recorded as skipped, and the
    rest are counted per sender (`counts`). Rows in `held` (a reply lookup failed; retried later) wait.
    Nothing holds more than a page.
    """

    def __init__(
        self,
        manifest: Manifest,
        ledger: Ledger,
        now: datetime,
        *,
        recipients_at: RecipientsAt,
        held: Collection[str] = (),
    ) -> None:
        self._manifest = manifest
        self._ledger = ledger
        self._now = now
        self._recipients_at = recipients_at
        self._held = held
        self._senders = {sender.name for sender in manifest.senders}
        self._after: dict[tuple[str, RowState], int | None] = {}  # None: nothing more
        self._read = 0
        self.counts: Counter[str] = Counter()
        for sender in ledger.due_senders(now):
            for state in (RowState.INFLIGHT, RowState.PENDING):
                after = 0
                while page := ledger.due_steps_of(sender, state, now, after=after, limit=_BATCH):
                    after = page[-1].cursor
                    self.counts.update(item.sender for item in self._sendable(page, record=True))

    def __call__(self, sender: str, count: int) -> list[Job]:
        found: list[DueStep] = []
        for state in (RowState.INFLIGHT, RowState.PENDING):
            while (wanted := count - len(found)) > 0 and (
                after := self._after.get((sender, state), 0)
            ) is not None:
                page = self._ledger.due_steps_of(sender, state, self._now, after=after, limit=wanted)
                self._after[(sender, state)] = page[-1].cursor if len(page) == wanted else None
                found += self._sendable(page, record=False)  # held ones left out: read on
        self._read += len(found)
        recipients = self._recipients_at([(item.row, item.recipient, item.email) for item in found])
        return [_due_job(item, recipient) for item, recipient in zip(found, recipients, strict=True)]

    def left(self) -> int:
        """The jobs not read yet."""
        return max(0, self.counts.total() - self._read)

    def _sendable(self, page: Sequence[DueStep], *, record: bool) -> list[DueStep]:
        sendable = []
        for item in page:
            reason = _unsendable(self._manifest, self._senders, item)
            if reason is None:
                if item.key not in self._held:
                    sendable.append(item)
            elif record and not item.inflight:
                self._ledger.record_skipped(item.key, *reason)
        return sendable


def _due_job(item: DueStep, recipient: Recipient) -> Job:
    """A due follow-up as a job; `_unsendable` left out the rows without a message id to answer."""
    previous = PreviousStep(
        item.previous_step,
        item.previous_subject,
        item.previous_message_id or "",
        item.previous_thread_id,
        item.previous_sent_at,
        item.previous_internet_message_id,
    )
    return Job(recipient, item.sender, step=item.step, previous=previous, first_sent_at=item.first_sent_at)


def _unsendable(manifest: Manifest, senders: set[str], item: DueStep) -> tuple[SkipReason, str] | None:
    if not item.listed:
        return SkipReason.NOT_LISTED, "the recipient is no longer in the list"
    if item.step not in manifest.steps:
        return SkipReason.INVALID, f"step {item.step!r} is no longer in the manifest's [[followups]]"
    if item.sender not in senders:
        return SkipReason.INVALID, f"its thread's sender {item.sender!r} is no longer in the manifest"
    if item.previous_message_id is None:
        return SkipReason.INVALID, f"step {item.previous_step!r} has no message id to reply to"
    return None


def build_screen(
    manifest: Manifest, ledger: Ledger, client: ReplyClient, *, notices: ReplyNotices | None = None
) -> Callable[[Job], Awaitable[Screening]]:
    """The check awaited right before each follow-up's claim (see the module's docstring): a reply the
    webhooks reported (`notices`) first, then the lookups."""

    async def screen(job: Job) -> Screening:
        followup = manifest.followup(job.step)
        previous = job.previous
        if job.step == FIRST_STEP or followup is None or previous is None or job.first_sent_at is None:
            return Screening()
        sender = manifest.sender(job.sender)
        if notices is not None and "reply" in followup.stop_on:
            # A store read: in a worker thread, so that the event loop goes on meanwhile.
            ids = (previous.message_id,)
            notice = await anyio.to_thread.run_sync(notices.reply_to, job.recipient.key, ids)
            if notice is not None and not await _ignored_auto_reply(client, sender.route, notice, followup):
                detail = f"message {notice.message_id} at {notice.at} (thread.replied notification)"
                return Screening(stop=SkipReason.REPLIED, detail=detail)
        try:
            answer = await find_answer(
                client,
                grant_id=sender.route,
                thread_id=previous.thread_id,
                address=job.recipient.address.email,
                previous_sent_at=previous.sent_at,
                first_sent_at=job.first_sent_at,
                ours=ledger.sent_message_ids,
                own_address=sender.email,
            )
        except CampaignError:  # ApiError and the like: never send blind
            return Screening(hold=True)
        return Screening() if answer is None else judge_answer(followup, answer)

    return screen


async def _ignored_auto_reply(
    client: ReplyClient, grant_id: str, notice: ThreadReply, followup: FollowupSettings
) -> bool:
    """Whether a `thread.replied` notification is an out-of-office that `followup` ignores. Nylas
    notifies auto-replies too, so with `auto_replies = "ignore"` the message is read and classified;
    one that cannot be read stops the sequence as a reply (never sent blind)."""
    if followup.auto_replies != "ignore":
        return False
    try:
        return await read_answer_kind(client, grant_id, notice.message_id) == AnswerKind.AUTO
    except CampaignError:
        return False


def judge_answer(followup: FollowupSettings, answer: Answer) -> Screening:
    """What an answer found before `followup` means for it, by the step's `stop_on` and `auto_replies`."""
    if answer.kind == AnswerKind.BOUNCE:
        stops = "bounce" in followup.stop_on
        return Screening(stop=SkipReason.BOUNCED if stops else None, detail=answer.describe())
    if answer.kind == AnswerKind.AUTO:
        if followup.auto_replies == "stop":
            return Screening(stop=SkipReason.AUTO_REPLIED, detail=answer.describe())
        return Screening(auto_reply=answer.describe())
    if "reply" in followup.stop_on:
        return Screening(stop=SkipReason.REPLIED, detail=answer.describe())
    return Screening()
