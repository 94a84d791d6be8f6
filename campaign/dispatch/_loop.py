"""The send loop: one lane per sender, each with its limits, claiming, sending and recording.

For every message: check the sender's budgets, mark the row in flight in the ledger (with
its idempotency key), wait for the sender's next slot, send, record the outcome. The limits
live in `campaign.dispatch._lane`, the waiting rules in `campaign.dispatch._retries`, the loop's settings,
events and result in `campaign.dispatch._types` (importable from here too). It sees the API
client and the ledger through protocols, reads time only through its `Clock`, and reports
progress as `DispatchEvent`s; it never prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import date, datetime, timedelta
from functools import partial
from typing import TypeVar

import anyio
import anyio.abc

from campaign.clock import Clock
from campaign.collector import collecting_less, old_objects_frozen
from campaign.dispatch._feed import JobFeed, JobSource, source_of
from campaign.dispatch._lane import Lane, open_lane
from campaign.dispatch._retries import GAVE_UP_NOTE, KEY_TOO_OLD_NOTE, OWNER_GONE_NOTE, RetryPolicy
from campaign.dispatch._tasks import Stopper, first_error
from campaign.dispatch._types import (
    DispatchEvent,
    DispatchResult,
    DispatchSettings,
    EventKind,
    Offload,
    build_thread_offload,
)
from campaign.errors import UnsendableError
from campaign.ledger import ClaimRequest, GroupCommit, Ledger, OutcomeReport
from campaign.manifest import SenderSettings
from campaign.models import (
    FIRST_STEP,
    Message,
    OutcomeKind,
    Recipient,
    Relink,
    RowState,
    Screening,
    SendOutcome,
    SkipReason,
)
from campaign.nylas import SendClient, SendRequest, build_send_request, send_as
from campaign.plan import Job

# The loop's values, re-exported for callers; its protocols are in campaign.dispatch._types.
__all__ = ["DispatchEvent", "DispatchResult", "DispatchSettings", "EventKind", "dispatch"]

# A lane reads this many jobs ahead (plus a few per worker), and tops up when it holds no more than
# its workers: memory stays flat in list size, and a top-up (a ledger page) is rare.
_LOOK_AHEAD = 256

# What a follow-up's lookup found (`screen`'s, `relink`'s): each says whether it must be held back.
_Found = TypeVar("_Found", Screening, Relink)


async def dispatch(
    jobs: Sequence[Job] | JobSource,
    *,
    senders: Sequence[SenderSettings],
    render: Callable[[Job], Message],
    client: SendClient,
    ledger: Ledger,
    clock: Clock,
    history: Mapping[str, Sequence[tuple[float, int]]] | None = None,
    parked: Mapping[str, datetime] | None = None,
    on_event: Callable[[DispatchEvent], None] = lambda _event: None,
    settings: DispatchSettings | None = None,
    offload: Offload | None = None,
    unsubscribed: Callable[[Recipient], Awaitable[SkipReason | None]] | None = None,
    screen: Callable[[Job], Awaitable[Screening]] | None = None,
    relink: Callable[[Job], Awaitable[Relink]] | None = None,
    stop: anyio.Event | None = None,
    bound: Collection[str] = (),
    holidays: Collection[date] = (),
    handed_over: bool = False,
    movable_to: Callable[[Job, str], bool] | None = None,
) -> DispatchResult:
    """Send every job under its sender's limits; return what was done and what is left.

    `jobs` is a list, or a source the lanes read a page at a time (`JobSource`: a run's, from the
    ledger), so that a lane holds only the next few hundred. When a sender is parked or refused,
    its jobs go to the other senders (`JobFeed`), except follow-ups, rows pinned by the list's
    sender column and rows whose idempotency key may already have been used: Nylas scopes keys
    per grant, so such a row is only ever sent by its own sender (the ledger's claim says whose
    it is; `bound` names such rows up front, in flight from an earlier run, so they are not moved
    at all). `movable_to` may refuse a move to a sender: the row then stays for its own.

    `history` holds each sender's earlier sends (Unix time, recipients) for its rolling
    budgets; `parked` the senders that must not send before a time (from an earlier run);
    `offload` runs the ledger's blocking writes (a worker thread unless told otherwise);
    `unsubscribed` is awaited right before each claim (cheap, but for a store's re-read now and
    then, which it makes off the event loop), and a recipient it names is recorded as skipped
    instead of mailed. `screen` is awaited right before each
    follow-up's claim (the reply lookups): it may stop the recipient's sequence (recorded as
    skipped), or hold the follow-up back when it could not look (not sent, still due). `relink` is
    awaited when a follow-up's send is answered 404 (the message it answers is not under its id): it
    finds that message again (the follow-up is sent once more, answering it, with a new key), or says it
    is gone (the sequence stops, `thread_lost`), or could not look (held back, as by `screen`); the
    404 stands only when the lookup met a 404 too (the grant is gone). A sender
    with a send window sends only inside it (shut on `holidays`): with `wait` the loop sleeps until
    it opens (as through a park), else the sender stops for this run; with `leave_to_wait` too, it
    stops for the round instead, and the caller waits. With `handed_over` (grants leased from a campaign
    several workers share) each lane starts with its burst spent, so that the previous owner's last
    sends and its first keep to the pace together. Once `stop` is set no new work starts:
    sends in flight get `stop_grace_s` to finish and be recorded, then are abandoned
    (their rows stay in flight, for resume).
    """
    lanes = {
        sender.name: open_lane(sender, history=(history or {}).get(sender.name, ()), holidays=holidays)
        for sender in senders
    }
    if handed_over:
        for lane in lanes.values():
            lane.spend_burst(clock.monotonic())
    now = clock.now()
    for name, until in (parked or {}).items():
        if name in lanes and until > now:
            lanes[name].parked_until = until
    loop = _Loop(
        source_of(jobs) if isinstance(jobs, Sequence) else jobs,
        render=render,
        client=client,
        ledger=ledger,
        clock=clock,
        on_event=on_event,
        settings=settings or DispatchSettings(),
        offload=offload or build_thread_offload(),
        unsubscribed=unsubscribed,
        screen=screen,
        relink=relink,
        stop=stop,
        bound=bound,
        movable_to=movable_to,
    )
    try:
        with old_objects_frozen(), collecting_less():
            return await loop.run(lanes)
    except BaseExceptionGroup as group:
        # A worker's error (e.g. the ledger cannot be written) ends the run: raise it as itself.
        raise first_error(group) from None


class _Loop:
    def __init__(
        self,
        source: JobSource,
        *,
        render: Callable[[Job], Message],
        client: SendClient,
        ledger: Ledger,
        clock: Clock,
        on_event: Callable[[DispatchEvent], None],
        settings: DispatchSettings,
        offload: Offload,
        unsubscribed: Callable[[Recipient], Awaitable[SkipReason | None]] | None = None,
        screen: Callable[[Job], Awaitable[Screening]] | None = None,
        relink: Callable[[Job], Awaitable[Relink]] | None = None,
        stop: anyio.Event | None = None,
        bound: Collection[str] = (),
        movable_to: Callable[[Job, str], bool] | None = None,
    ) -> None:
        self._render = render
        self._client = client
        self._ledger = ledger
        self._clock = clock
        self._emit = on_event
        self._settings = settings
        self._started = 0
        self._counts = {RowState.SENT: 0, RowState.FAILED: 0, RowState.UNKNOWN: 0}
        self._limit_reached = False
        # Every ledger write goes through group commit: writes asked for together share a
        # transaction, and each caller goes on only once its own write is on disk.
        self._in_thread = GroupCommit(offload, ledger.batch)
        self._retry = RetryPolicy(settings)
        self._unsubscribed = unsubscribed
        self._screen = screen
        self._relink = relink
        self._held = 0
        self._stop = Stopper(stop, clock=clock)
        self._left_inflight = 0
        self._bound = set(bound)
        self._feed = JobFeed(source, bound=self._bound, movable_to=movable_to)
        self._lanes: Mapping[str, Lane] = {}
        self._workers: anyio.abc.TaskGroup | None = None

    async def run(self, lanes: Mapping[str, Lane]) -> DispatchResult:
        for lane in lanes.values():  # in the ledger's thread, as every page after it: the loop goes on
            first = partial(self._feed.take, lane.sender.name, _look_ahead(lane))
            lane.jobs.extend(await self._in_thread(first))
        for lane in lanes.values():
            if lane.parked_until is not None and lane.jobs:
                self._emit(DispatchEvent(EventKind.PARKED, lane.sender.name, until=lane.parked_until))
        async with anyio.create_task_group() as group:
            group.start_soon(self._stop.cancel_after_grace, group.cancel_scope, self._settings.stop_grace_s)
            async with anyio.create_task_group() as workers:
                self._lanes, self._workers = lanes, workers
                for lane in lanes.values():
                    if lane.stopped:
                        self._hand_over(lane)
                for lane in lanes.values():
                    self._start_workers(lane)
            group.cancel_scope.cancel()  # the work is over: the grace timer has nothing to do
        return DispatchResult(
            sent=self._counts[RowState.SENT],
            failed=self._counts[RowState.FAILED],
            unknown=self._counts[RowState.UNKNOWN],
            remaining=sum(len(lane.jobs) for lane in lanes.values()) + self._feed.left(),
            parked={
                name: lane.parked_until
                for name, lane in lanes.items()
                if lane.parked_until is not None and self._has_work(lane)
            },
            auth_refused=tuple(name for name, lane in lanes.items() if lane.auth_refused),
            refusals={name: lane.refusal for name, lane in lanes.items() if lane.refusal is not None},
            unreachable={
                name: lane.unreachable for name, lane in lanes.items() if lane.unreachable is not None
            },
            rejecting={name: lane.rejecting for name, lane in lanes.items() if lane.rejecting is not None},
            limit_reached=self._limit_reached,
            stopped=self._stopping,
            left_inflight=self._left_inflight,
            held=self._held,
            closed={
                name: lane.closed_until
                for name, lane in lanes.items()
                if lane.closed_until is not None and self._has_work(lane)
            },
        )

    def _has_work(self, lane: Lane) -> bool:
        return bool(lane.jobs) or self._feed.holds(lane.sender.name)

    def _start_workers(self, lane: Lane) -> None:
        """Run up to `concurrency` workers on a lane that has work, or one to look for it (more join when
        a top-up or a hand-over brings work)."""
        assert self._workers is not None
        wanted = min(lane.sender.concurrency, len(lane.jobs) or int(lane.more))
        while lane.workers < wanted and not lane.stopped:
            lane.workers += 1
            self._workers.start_soon(self._work, lane)

    async def _work(self, lane: Lane) -> None:
        try:
            await self._work_lane(lane)
        finally:
            lane.workers -= 1
            if lane.stopped:
                self._hand_over(lane)

    def _hand_over(self, lane: Lane) -> None:
        """Give a parked or refused sender's movable jobs to the other senders, and start them on it."""
        self._feed.release(lane.sender.name, lane.jobs)
        lane.jobs.clear()
        lane.more = True  # should it send again (--wait), its own jobs are in the feed
        for taker in self._lanes.values():
            if taker is not lane and not taker.stopped:
                taker.more = True
                self._start_workers(taker)

    async def _top_up(self, lane: Lane) -> None:
        """Read the lane's next jobs once it holds no more than its workers (one worker reads at a time,
        the others go on sending), and start workers on them."""
        if lane.refilling or not lane.more or len(lane.jobs) > lane.sender.concurrency:
            return
        lane.refilling = True
        try:
            wanted = _look_ahead(lane)
            jobs = await self._in_thread(partial(self._feed.take, lane.sender.name, wanted))
        finally:
            lane.refilling = False
        # A short page may be short only of rows already in a lane (`JobFeed.finished`): ask the feed.
        lane.more = len(jobs) == wanted or self._feed.holds(lane.sender.name)
        lane.jobs.extend(jobs)
        self._start_workers(lane)

    async def _work_lane(self, lane: Lane) -> None:
        while not lane.halted and not self._stopping:
            await self._top_up(lane)
            if not lane.jobs:
                return
            ready = await self._ready(lane)
            if ready is None:
                return
            if not ready:
                continue
            if self._settings.limit is not None and self._started >= self._settings.limit:
                self._limit_reached = True
                return
            job = lane.jobs.popleft()
            # Counted before any await (the checks before a claim may look up replies): concurrent
            # workers then never start more than --limit between them.
            self._started += 1
            if not await self._send_job(lane, job):
                self._started -= 1

    async def _send_job(self, lane: Lane, job: Job) -> bool:
        """The checks, the budgets and the send of one job; False if it was not sent after all (it does
        not count towards --limit): skipped, handed back to its owner, or back in the queue."""
        if await self._not_to_send(lane, job):
            self._feed.finished(job.key)
            return False
        try:
            message = self._render(job)
            payload = build_send_request(message)  # JSON, or multipart for big attachments
        except UnsendableError as exc:
            await self._fail_unsendable(lane, job, exc)
            return False
        wall = self._clock.now().timestamp()
        frees_at = lane.budget_frees_at(wall, message.recipient_count)
        if frees_at is not None:
            lane.jobs.appendleft(job)
            self._park(lane, self._clock.now() + timedelta(seconds=frees_at - wall))
            return False
        lane.book(wall, message.recipient_count)
        try:
            state = await self._send(lane, job, message, payload)
        except anyio.get_cancelled_exc_class():
            # Abandoned (a stop's grace ran out, or a second Ctrl-C): the row stays in
            # flight, or pending if its claim was not written yet; resume settles it.
            self._left_inflight += 1
            lane.jobs.appendleft(job)
            raise
        if state is None:  # handed back to the sender it belongs to, or not this worker's
            lane.release(wall, message.recipient_count)
            return False
        # Not sent (PENDING), or left in flight for resume by a stop (INFLIGHT): it goes
        # back to the front of the queue.
        if state in (RowState.PENDING, RowState.INFLIGHT):
            lane.release(wall, message.recipient_count)
            lane.jobs.appendleft(job)
            return False
        self._feed.finished(job.key)
        return True

    async def _fail_unsendable(self, lane: Lane, job: Job, error: UnsendableError) -> None:
        """A message that can no longer be built as checked (an attachment file replaced, grown or gone
        since): its row fails with the reason, and the others go on (`retry --failed` sends it once
        fixed). A row in flight from an earlier run may have gone out with its key: it stays in flight."""
        key = job.key
        claim = await self._in_thread.each(
            self._ledger.claim_many, ClaimRequest(key, None, lane.sender.name, lane.sender.mailbox)
        )
        self._feed.finished(key)
        if claim is None:
            return
        if not claim.fresh:
            self._left_inflight += 1
            return
        outcome = SendOutcome(OutcomeKind.REJECTED, error_type="unsendable", error_message=str(error))
        report = OutcomeReport(key, outcome, lane.sender.name, 1)
        state = await self._in_thread.each(self._ledger.record_outcomes, report)
        self._after(lane, job, outcome, state)

    async def _skip_if_unsubscribed(self, lane: Lane, job: Job) -> bool:
        """Unsubscribe re-check (issue 5): record a recipient who unsubscribed since the plan as skipped.

        A row that is not pending (in flight after a crash) is settled by sending as usual.
        """
        assert self._unsubscribed is not None
        reason = await self._unsubscribed(job.recipient)
        if reason is None:
            return False
        key = job.key
        record = partial(self._ledger.record_skipped, key, reason, f"{reason.value} while the campaign ran")
        if not await self._in_thread(record):
            return False
        self._emit(DispatchEvent(EventKind.SKIPPED, lane.sender.name, key, job.recipient.address.email))
        return True

    async def _ready(self, lane: Lane) -> bool | None:
        """Whether the lane may send now: True; False after waiting (a park, a shut window) with --wait
        (look again); None when it stops for this run."""
        if lane.parked_until is not None:
            if not self._settings.wait or self._settings.leave_to_wait:
                return None
            await self._wait_out_park(lane, lane.parked_until)
            return False
        opens = None if lane.window is None else lane.opens_at(self._clock.now())
        if opens is None:
            return True
        return False if await self._wait_for_window(lane, opens) else None

    async def _not_to_send(self, lane: Lane, job: Job) -> bool:
        """The checks right before a claim: an opt-out since the plan; for a follow-up, an answer."""
        if self._unsubscribed is not None and await self._skip_if_unsubscribed(lane, job):
            return True
        return self._screen is not None and job.step != FIRST_STEP and await self._screened_out(lane, job)

    async def _screened_out(self, lane: Lane, job: Job) -> bool:
        """The reply lookups right before a follow-up's claim: True if it is not to be sent now (the
        recipient answered, or the lookup failed); an auto-reply that does not stop it is noted."""
        assert self._screen is not None
        found = await self._look_up(lane, self._screen, job)
        email = job.recipient.address.email
        if found.hold:
            self._hold(lane, job)
            return True
        if found.stop is not None:
            record = partial(self._ledger.record_skipped, job.key, found.stop, found.detail)
            if not await self._in_thread(record):
                return False  # in flight from an earlier run: its key may have been used; settle it
            self._emit(DispatchEvent(EventKind.SKIPPED, lane.sender.name, job.key, email))
            return True
        if found.auto_reply is not None:
            await self._in_thread(partial(self._ledger.record_auto_reply, job.key, found.auto_reply))
        return False

    async def _look_up(self, lane: Lane, lookup: Callable[[Job], Awaitable[_Found]], job: Job) -> _Found:
        """A follow-up's lookups in its sender's mailbox (`screen`, `relink`), counted for the lane's hold."""
        # Lookups are requests to the grant too: after a failed one (a 429, the provider down) the next
        # waits out the sender's hold, which grows with each failure in a row, instead of all the due
        # follow-ups asking at once.
        await self._stop.sleep(lane.hold_until - self._clock.monotonic())
        found = await lookup(job)
        lane.lookup_failures = lane.lookup_failures + 1 if found.hold else 0
        return found

    def _hold(self, lane: Lane, job: Job) -> None:
        """A follow-up whose lookup failed: not sent now (due again later), and the sender's next lookup
        waits a backoff."""
        wait_s = self._retry.backoff_s(lane.lookup_failures)
        lane.hold_until = max(lane.hold_until, self._clock.monotonic() + wait_s)
        self._held += 1
        self._emit(DispatchEvent(EventKind.HELD, lane.sender.name, job.key, job.recipient.address.email))

    async def _look_again(self, lane: Lane, job: Job) -> Relink | None:
        """For a follow-up's send answered 404, what the lookup found of the message it answers; None
        when the 404 stands (the lookup met a 404 too: the grant is gone)."""
        assert self._relink is not None
        found = await self._look_up(lane, self._relink, job)
        return found if found.message_id is not None or found.lost is not None or found.hold else None

    async def _after_refused_reply(
        self, lane: Lane, job: Job, outcome: SendOutcome, found: Relink
    ) -> RowState | None:
        """A follow-up's send answered 404, and what the lookup found of the message it answers: send
        again once answering it under its new id, or stop the sequence (`thread_lost`), or hold it back.
        Nothing went out: Nylas looks the key up before the message (a 404 is cached under the key as
        any answer), so a 404 not replayed means no earlier request under the key was processed. The row
        goes back to pending with a new key (the old one replays the 404): the grant is fine, so this
        is no refusal of the sender's messages (`stop_after_rejections`)."""
        key, ledger = job.key, self._ledger
        if found.message_id is not None:
            await self._in_thread(
                partial(ledger.record_reply_refused, key, outcome, reply_to=found.message_id)
            )
            assert job.previous is not None  # a follow-up's
            moved = job._replace(previous=dataclasses.replace(job.previous, message_id=found.message_id))
            try:
                message = self._render(moved)
                payload = build_send_request(message)
            except UnsendableError as exc:
                await self._fail_unsendable(lane, moved, exc)
                return None
            return await self._send(lane, moved, message, payload, relinked=True)
        if found.lost is None:  # held: looked up again later, never sent blind
            await self._in_thread(partial(ledger.record_reply_refused, key, outcome, reply_to=None))
            self._hold(lane, job)
            self._feed.finished(key)
            return None
        lost = found.lost

        def stop_sequence() -> bool:
            with ledger.batch():
                ledger.record_reply_refused(key, outcome, reply_to=None)
                return ledger.record_skipped(key, SkipReason.THREAD_LOST, lost)

        await self._in_thread(stop_sequence)
        self._emit(DispatchEvent(EventKind.SKIPPED, lane.sender.name, key, job.recipient.address.email))
        self._feed.finished(key)
        return None

    async def _wait_for_window(self, lane: Lane, opens: datetime) -> bool:
        """The sender's window is shut until `opens`: with --wait sleep until then (True), else stop."""
        if lane.closed_until != opens:
            lane.closed_until = opens
            self._emit(DispatchEvent(EventKind.CLOSED, lane.sender.name, until=opens))
        if not self._settings.wait or self._settings.leave_to_wait:
            return False
        await self._stop.sleep((opens - self._clock.now()).total_seconds())
        if lane.closed_until == opens:
            lane.closed_until = None
            self._emit(DispatchEvent(EventKind.RESUMED, lane.sender.name))
        return True

    async def _wait_out_park(self, lane: Lane, until: datetime) -> None:
        """--wait: sleep until the park ends (the first worker to wake lifts it)."""
        await self._stop.sleep((until - self._clock.now()).total_seconds())
        if lane.parked_until == until:
            lane.parked_until = None
            lane.provider_refused = False
            self._emit(DispatchEvent(EventKind.RESUMED, lane.sender.name))

    async def _wait_for_slot(self, lane: Lane, *, multipart: bool) -> None:
        # Nothing may await between the end of this wait and the request, or sends
        # could bunch up behind a slow step; so the ledger claim comes before it.
        # A throttle that arrives meanwhile moves the hold: then wait again. A lane the provider refuses
        # meanwhile (a quota: its hold is the provider's day) is not waited for: the caller gives the claim
        # back. One parked by its own daily budget is: this send was booked within that budget.
        while not (lane.refused or self._stopping):
            start = lane.reserve(self._clock.monotonic(), multipart=multipart)
            await self._stop.sleep(start - self._clock.monotonic())
            if self._clock.monotonic() >= lane.hold_until:
                return

    async def _send(  # noqa: C901, PLR0915 - the life of one claimed key is one loop; split, its invariants would be spread apart
        self, lane: Lane, job: Job, message: Message, payload: SendRequest, *, relinked: bool = False
    ) -> RowState | None:
        """Send one message until its outcome is settled for this run; return the row's state.

        A follow-up answered 404 is looked up (`relink`) and, found under a new id, sent once more
        answering it (`relinked`: that send's 404 stands).

        PENDING: not sent, back to the queue. INFLIGHT: left in flight (a stop, or a row
        re-claimed from an earlier run whose sender stopped), to be re-sent with its key. None: not
        this lane's to send (handed back to its own sender, or taken or settled by another worker).
        """
        key = job.key
        request = ClaimRequest(key, message.subject, lane.sender.name, lane.sender.mailbox)
        claim = await self._in_thread.each(self._ledger.claim_many, request)
        if claim is None:  # another worker holds or settled the row: nothing to send from here
            self._feed.finished(key)
            return None
        if not claim.fresh and claim.sender not in (None, lane.sender.name):
            return await self._return_to_owner(lane, job, claim.sender)
        await self._wait_for_slot(lane, multipart=payload.multipart)
        if lane.refused or self._stopping or self._window_shut(lane):
            # Its request never left (the sender's window may have shut during the pace wait: no message
            # leaves outside it). A fresh key goes back unused; a key from an earlier run
            # may have been used, so that row stays in flight, to be re-sent with that key.
            if not claim.fresh:
                return RowState.INFLIGHT
            await self._in_thread(partial(self._ledger.release, key))
            return RowState.PENDING
        # This check awaits nothing unless a store is due a re-read (about once a second): a slow store
        # then delays this request, not every lane's (as a re-read on the event loop did).
        check = self._unsubscribed if claim.fresh else None
        if check is not None and await check(job.recipient) is not None:
            # An opt-out recorded while the claim waited for its pace slot (a minute at 1/min): its
            # key is unused, so the row goes back and is skipped, as it would have been a moment earlier.
            await self._in_thread(partial(self._ledger.release, key))
            if not await self._skip_if_unsubscribed(lane, job):
                return RowState.PENDING
            self._feed.finished(key)
            return None
        if claim.fresh and self._clock.now() >= claim.usable_until:
            # A pace slower than a key's life (one send every two hours): the key, never used, goes back,
            # and the row takes a new one for the slot it waited for (else it would give up, unknown).
            await self._in_thread(partial(self._ledger.release, key))
            claim = await self._in_thread.each(self._ledger.claim_many, request)
            if claim is None:
                self._feed.finished(key)
                return None
        retries = waits = 0
        while True:
            if self._clock.now() >= claim.usable_until:
                return await self._give_up(lane, job, None, note=KEY_TOO_OLD_NOTE)
            sent_at = self._clock.monotonic()
            outcome = await send_as(self._client, lane.sender, payload, idempotency_key=claim.idempotency_key)
            # Only a follow-up's 404 is looked up (awaited); every other answer goes on without a wait.
            if not relinked and self._relink is not None and _refused_reply(message, outcome):
                found = await self._look_again(lane, job)
                if found is not None:
                    return await self._after_refused_reply(lane, job, outcome, found)
            parked = lane.parked_until
            self._apply_to_lane(lane, outcome, sent_at)  # before any await: no other worker may send into it
            state = await self._in_thread.each(
                self._ledger.record_outcomes,
                OutcomeReport(key, outcome, lane.sender.name, message.recipient_count),
            )
            if lane.provider_refused and lane.parked_until not in (None, parked):
                # Kept at once, not only when the run ends: a run killed meanwhile must not leave the
                # next one to knock on a mailbox locked for the day.
                await self._in_thread(
                    partial(self._ledger.record_parks, {lane.sender.name: lane.parked_until})
                )
            if state != RowState.INFLIGHT:
                break
            if outcome.kind in (OutcomeKind.THROTTLED, OutcomeKind.AUTH_REFUSED, OutcomeKind.UNREACHABLE):
                # Not sent now, but an earlier request may have used the key: the row keeps
                # it (bound to this grant) and goes back to the queue, to be sent with it.
                self._bound.add(key)
                self._after(lane, job, outcome, state)
                return RowState.INFLIGHT
            # Ambiguous (timeout, reset, 5xx) or still in progress: the same key again,
            # so that Nylas replays the first answer instead of sending twice. A 409
            # "in progress" is waited out apart from the ambiguous retries.
            if outcome.kind == OutcomeKind.IN_PROGRESS:
                waits += 1
            else:
                retries += 1
            delay = self._retry.retry_delay_s(outcome, retries=retries, waits=waits)
            if delay is None:
                return await self._give_up(lane, job, outcome, note=GAVE_UP_NOTE)
            self._emit(
                DispatchEvent(EventKind.RETRYING, lane.sender.name, key, job.recipient.address.email, outcome)
            )
            await self._stop.sleep(delay)
            await self._wait_for_slot(lane, multipart=payload.multipart)
            if self._stopping:  # no new request after a stop: resume re-sends it with this key
                self._left_inflight += 1
                return RowState.INFLIGHT
            if lane.refused or self._window_shut(lane):
                # Refused meanwhile, or its window shut: it keeps its key, bound to this grant, for when
                # it may send.
                self._bound.add(key)
                return RowState.INFLIGHT
        self._after(lane, job, outcome, state)
        return state

    async def _return_to_owner(self, lane: Lane, job: Job, owner: str | None) -> RowState | None:
        """A row whose key may be used goes back to its own sender: the key is valid on that grant only."""
        self._bound.add(job.key)
        home = self._lanes.get(owner or "")
        if home is None:  # its sender is gone from the manifest: no grant can send it safely
            return await self._give_up(lane, job, None, note=OWNER_GONE_NOTE)
        home.jobs.append(job._replace(sender=home.sender.name))
        self._start_workers(home)
        return None

    async def _give_up(self, lane: Lane, job: Job, outcome: SendOutcome | None, *, note: str) -> RowState:
        """The row's fate cannot be known now: it becomes unknown, for reconcile to settle."""
        key = job.key
        await self._in_thread(partial(self._ledger.record_unknown, key, note=note))
        self._counts[RowState.UNKNOWN] += 1
        self._emit(
            DispatchEvent(EventKind.UNKNOWN, lane.sender.name, key, job.recipient.address.email, outcome)
        )
        return RowState.UNKNOWN

    @property
    def _stopping(self) -> bool:
        return self._stop.requested

    def _window_shut(self, lane: Lane) -> bool:
        """Whether the sender's window is shut now (the worker's next look at the lane says so and waits
        or stops)."""
        return lane.opens_at(self._clock.now()) is not None

    def _after(self, lane: Lane, job: Job, outcome: SendOutcome, state: RowState) -> None:
        name, key, email = lane.sender.name, job.key, job.recipient.address.email
        if state == RowState.SENT:
            lane.record_sent()
            self._counts[RowState.SENT] += 1
            self._emit(DispatchEvent(EventKind.SENT, name, key, email, outcome))
        elif state == RowState.FAILED:
            self._counts[RowState.FAILED] += 1
            self._emit(DispatchEvent(EventKind.FAILED, name, key, email, outcome))
        elif state == RowState.UNKNOWN:  # a replayed 5xx: retrying would only replay it again
            self._counts[RowState.UNKNOWN] += 1
            self._emit(DispatchEvent(EventKind.UNKNOWN, name, key, email, outcome))
        elif outcome.kind == OutcomeKind.AUTH_REFUSED:
            self._emit(DispatchEvent(EventKind.AUTH_REFUSED, name, key, email, outcome))
        elif outcome.kind == OutcomeKind.THROTTLED:
            self._emit(DispatchEvent(EventKind.THROTTLED, name, key, email, outcome))

    def _apply_to_lane(self, lane: Lane, outcome: SendOutcome, sent_at: float) -> None:
        """What an answer means for the sender: a throttle holds or parks it, refused credentials stop it,
        and so do refused messages once too many come in a row; no connection holds it (stops it, once
        too long)."""
        if outcome.kind == OutcomeKind.UNREACHABLE or _failing_server(outcome):
            self._unreachable(lane, outcome)
            return
        if outcome.kind == OutcomeKind.AMBIGUOUS and outcome.replayed:
            return  # the key's first answer again, from Nylas's cache: nothing about the API now
        if lane.connect_failures:  # an answer after connections failed: the API is back
            self._emit(DispatchEvent(EventKind.RESUMED, lane.sender.name))
        lane.record_reached()
        if outcome.kind == OutcomeKind.THROTTLED:
            self._throttled(lane, outcome, sent_at)
        elif outcome.kind == OutcomeKind.AUTH_REFUSED:
            lane.auth_refused, lane.refusal = True, outcome.error_message
        elif outcome.kind == OutcomeKind.SENT:
            lane.rejections = 0
        elif outcome.kind == OutcomeKind.REJECTED and lane.rejecting is None:
            lane.record_rejected(_refusal_text(outcome))
            if lane.rejecting is not None:
                self._emit(DispatchEvent(EventKind.REJECTING, lane.sender.name, outcome=outcome))

    def _unreachable(self, lane: Lane, outcome: SendOutcome) -> None:
        """Each failed connection holds the sender a backoff; after `unreachable_after_s` of them it stops
        for the run (its rows are pending: nothing left), unless the run waits things out."""
        mono, after_s = self._clock.monotonic(), self._settings.unreachable_after_s
        wait_s = self._retry.backoff_s(lane.connect_failures + 1)
        if not self._settings.wait:
            # The last try comes as that time is up, not a long backoff later (concurrent workers' failures
            # each count, so the backoff grows fast).
            since = mono if lane.unreachable_since is None else lane.unreachable_since
            wait_s = min(wait_s, max(0.0, since + after_s - mono))
        failing_s = lane.record_unreachable(mono=mono, wait_s=wait_s)
        if lane.halted:
            return
        if self._settings.wait or failing_s < after_s:
            self._emit(DispatchEvent(EventKind.RETRYING, lane.sender.name, outcome=outcome))
            return
        lane.unreachable = outcome.error_message or "no connection to the API"
        self._emit(DispatchEvent(EventKind.UNREACHABLE, lane.sender.name, outcome=outcome))

    def _throttled(self, lane: Lane, outcome: SendOutcome, sent_at: float) -> None:
        now = self._clock.now()
        wait_s = self._retry.throttle_wait_s(outcome, now=now, throttles=lane.throttles)
        lane.record_throttle(mono=self._clock.monotonic(), wait_s=wait_s, sent_at=sent_at)
        if self._retry.parks(outcome, wait_s=wait_s, throttles=lane.throttles):
            lane.provider_refused = True
            self._park(lane, now + timedelta(seconds=wait_s))

    def _park(self, lane: Lane, until: datetime) -> None:
        if lane.parked_until is None:
            lane.parked_until = until
            self._emit(DispatchEvent(EventKind.PARKED, lane.sender.name, until=until))


def _refused_reply(message: Message, outcome: SendOutcome) -> bool:
    """Whether a follow-up's send was answered 404: Nylas found no message under the id it answers (or,
    told apart only by looking, no grant)."""
    return (
        message.reply_to_message_id is not None
        and outcome.kind == OutcomeKind.AUTH_REFUSED
        and outcome.status == 404
    )


def _failing_server(outcome: SendOutcome) -> bool:
    """A 5xx but a 504 answered now (not replayed from the key's cache): the API or the provider is down,
    and the sender backs off as from a lost connection, stopping once it lasts (a 503 to every send went
    through the whole list, each row tried and left unknown). A 504 is one slow send, often delivered:
    that row's own same-key retries settle it."""
    status = outcome.status or 0
    return outcome.kind == OutcomeKind.AMBIGUOUS and status >= 500 and status != 504 and not outcome.replayed


def _refusal_text(outcome: SendOutcome) -> str:
    """E.g. `HTTP 402 message_rejected: Sending to at least one recipient failed.`"""
    head = " ".join(part for part in (f"HTTP {outcome.status}", outcome.error_type) if part)
    return f"{head}: {outcome.error_message}" if outcome.error_message else head


def _look_ahead(lane: Lane) -> int:
    return _LOOK_AHEAD + 4 * lane.sender.concurrency
