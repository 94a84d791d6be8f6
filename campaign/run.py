"""Sending a campaign: the use case behind `campaign run` and `campaign resume`.

`run_campaign` checks every row (or, when the ledger's plan stamp says nothing changed since a
run that checked them, only that the open rows' files are still there), checks that the content
and the key scheme may continue, asks the caller to confirm the plan, records the plan, sends the
open rows through `dispatch` (Ctrl-C stops it gracefully), and keeps the senders' quota parks.
It holds the ledger's writer lock from the first check (a first run: once its checks pass, so bad
input leaves no file) to the last write, and opens the ledger once. On a ledger several workers share
(PostgreSQL), the lock is the plan's: a worker that joins waits for it and finds the plan checked,
and each worker sends from the grants it leases (`dispatch.send_under_leases`). It prints nothing and picks
no exit code: the caller takes part through `RunHooks` and gets a `RunOutcome`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, ExitStack, closing
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Protocol

import anyio

from campaign.clock import Clock
from campaign.dispatch import (
    DispatchEvent,
    DispatchResult,
    DispatchSettings,
    JobSource,
    chain_sources,
    dispatch,
    run_interruptible,
    send_under_leases,
)
from campaign.errors import CampaignError, InputFileError, LedgerError
from campaign.events import InboxReader, events_store_path, pull_senders_inboxes
from campaign.followups import (
    DueJobs,
    ReplyClient,
    ReplyNotices,
    build_relink,
    build_screen,
    first_due_time,
    schedule_followups,
)
from campaign.ledger import (
    GrantLeases,
    Ledger,
    LedgerSite,
    PlanSink,
    PlanSpool,
    SyncReport,
    check_key_scheme,
    record_key_scheme,
)
from campaign.manifest import Manifest, SenderSettings
from campaign.models import Recipient, Relink, RowState, Screening, SkipReason
from campaign.nextsteps import NextStep
from campaign.nylas import SendClient
from campaign.pipeline import (
    ContentCheck,
    LedgerJobs,
    ListExtent,
    Preflight,
    Reuse,
    check_content,
    find_appended,
    find_store_notes,
    load_content_fingerprint,
    load_list_extent,
    load_plan_stamp,
    load_recipients,
    load_row_cells,
    load_rules_stamp,
    may_move_to,
    record_content,
    record_read_stores,
    record_rows_given_away,
    render_job,
    run_preflight,
)
from campaign.plan import DAY_S, Job
from campaign.recipients import SuppressionFiles
from campaign.render import Composer, build_composer
from campaign.status import build_status
from campaign.unsubscribe import UnsubscribeWatch, list_store_paths

# A follow-up whose reply lookup failed is looked up again after this long (with --wait).
_HOLD_RETRY_S = 300.0
_PAGE = 1_000  # open rows read at a time when they are all looked over (attachments re-checked)

__all__ = ["RunHooks", "RunOptions", "RunOutcome", "RunPlan", "SenderShare", "run_campaign"]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What the user chose for this run."""

    resuming: bool = False  # `resume`: the ledger must exist
    limit: int | None = None
    skip_invalid: bool = False
    wait: bool = False
    allow_changed_content: bool = False
    sandbox: bool = False  # only for the commands `next` suggests


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What the run will send, as the caller shows it before confirming."""

    source: Path
    to_send: int
    skipped: Mapping[str, int]  # skip reason -> rows
    unchanged: bool  # the plan stamp matched: the rows were checked by an earlier run
    senders: int
    appended: int = 0  # only rows appended to the list since the last plan were checked: how many
    notes: tuple[str, ...] = ()  # what the user should know of the plan (`Preflight.notes`)


@dataclass(frozen=True, slots=True)
class SenderShare:
    """A sender's part of this run: messages to send, and recipients its daily budget still allows."""

    sender: str
    messages: int
    budget_left: int | None


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How the run ended. `result` is None when a second Ctrl-C cancelled it at once."""

    result: DispatchResult | None
    signals: int  # Ctrl-C presses: 1, a graceful stop
    states: Mapping[str, int]  # listed rows per state, after the run
    next_steps: tuple[NextStep, ...]
    sync: SyncReport
    content: ContentCheck
    next_due: datetime | None = None  # the next follow-up scheduled (the run ended before it was due)


class RunHooks(Protocol):
    """What the caller does at the run's turns: show the check, confirm, show the sends, hear of a Ctrl-C."""

    def confirm(self, plan: RunPlan) -> bool:
        """Show the plan; whether to go on (False: stop, nothing recorded or sent)."""
        ...

    def progress(
        self, total: int, shares: Sequence[SenderShare]
    ) -> AbstractContextManager[Callable[[DispatchEvent], None]]:
        """A context around the sends, giving the function each dispatch event goes to."""
        ...

    def stopping(self, signals: int) -> None:
        """A Ctrl-C arrived (1: stop gracefully; 2: cancel)."""
        ...

    def checking(self) -> AbstractContextManager[Callable[[int, int], None]]:
        """A context around the row check, giving the function told of (rows done, rows in all)."""
        ...

    def waiting(
        self, until: datetime, scheduled: int, *, waiting: Sequence[str] = ()
    ) -> AbstractContextManager[None]:
        """A context around --wait's sleep until `until`: the next follow-up (`scheduled` are waiting) is due,
        or one of the senders `waiting` (for their window, or a pause) may send again."""
        ...


@dataclass(frozen=True, slots=True)
class _Checked:
    """The plan checked now (`preflight`, its rows in the run's `PlanSpool`), or unchanged since a run
    that checked it (None)."""

    composer: Composer
    preflight: Preflight | None
    plan: RunPlan
    stamp: str
    rules: str  # the stamp of all but the list's rows (`pipeline.load_rules_stamp`)
    content: ContentCheck
    extent: ListExtent | None = None  # the list file the checked plan is of
    appended: bool = False  # the plan holds only the rows appended since the ledger's plan


def run_campaign(
    manifest: Manifest,
    site: LedgerSite,
    options: RunOptions,
    *,
    secrets: Sequence[bytes] | None,
    connect: Callable[[], AbstractAsyncContextManager[SendClient]],
    clock: Clock,
    hooks: RunHooks,
    command_path: str,
) -> RunOutcome | None:
    """Check, confirm, record and send; None when the caller did not confirm (nothing was written)."""
    campaign = manifest.campaign.name
    if options.resuming and not site.exists(campaign):
        start = f"campaign run {command_path}{' --sandbox' if options.sandbox else ''}"
        message = f"{site.where}: no ledger, so nothing to resume; start with `{start}`"
        raise InputFileError(message)
    # Workers sharing a database each send from the grants they lease; None: one command at a time.
    # The leases connect when the sending starts, and give back and close when it ends.
    leases = site.leases(campaign, clock)
    if leases is None:
        site.check_free(campaign)  # before any check: a refused run says nothing of a plan
    with ExitStack() as held:
        spool = held.enter_context(PlanSpool())
        planning = held.enter_context(ExitStack())  # the writer lock, until the plan is recorded at least
        ledger = None
        # Held from the first check: nobody changes the plan in between. A worker that joins a shared
        # campaign waits here for the one planning it, then finds the plan checked (its stamp).
        if leases is not None or site.exists(campaign):
            planning.enter_context(site.hold(campaign, wait=leases is not None))
        if site.exists(campaign):  # asked again: the worker it waited for may have made it meanwhile
            ledger = held.enter_context(closing(site.open(clock=clock, campaign=campaign, create=False)))
        # A first run's plan is written aside as it is checked, where the site allows (a file).
        first = None if ledger is not None else site.first_plan(campaign, clock)
        sink = spool if first is None else held.enter_context(first)
        checked = _check(manifest, ledger, sink, options, secrets=secrets, hooks=hooks, now=clock.now())
        if ledger is None and leases is None:
            # A first run: bad input has made no file; the lock is held through the prompt.
            planning.enter_context(site.hold(campaign))
        if not hooks.confirm(checked.plan):
            return None
        if first is not None:
            sync = first.record(stamp=checked.stamp, rules=checked.rules, extent=_extent(checked))
            ledger = held.enter_context(closing(site.open(clock=clock, campaign=campaign, create=False)))
        else:
            if ledger is None:
                ledger = held.enter_context(closing(site.open(clock=clock, campaign=campaign, create=True)))
            sync = _record_plan(ledger, checked, spool)
        spool.close()  # recorded: its pages need not wait for the sends
        if leases is not None:
            planning.close()  # the plan is recorded: the other workers may send from it now
        return _send_checked(
            manifest,
            ledger,
            checked,
            sync,
            options,
            connect=connect,
            clock=clock,
            hooks=hooks,
            path=command_path,
            leases=leases,
        )


def _check(
    manifest: Manifest,
    ledger: Ledger | None,
    sink: PlanSink,
    options: RunOptions,
    *,
    secrets: Sequence[bytes] | None,
    hooks: RunHooks,
    now: datetime,
) -> _Checked:
    """The key scheme and content first, then every row (unless the plan stamp says nothing changed
    since a run that checked them), the plan handed to `sink`. Writes nothing to the ledger: the
    plan is recorded after confirmation (a first run's `FirstPlan` writes it aside meanwhile). A new
    row is due at once, or at [message]'s `deliver_at` (after `now`) in its recipient's zone."""
    fingerprint = load_content_fingerprint(manifest)
    # The cheap refusals first: a changed key scheme or content fails in seconds, not after every row.
    if ledger is not None:
        check_key_scheme(ledger, manifest)
    content = check_content(
        ledger, fingerprint, allow_changed=options.allow_changed_content, manifest=manifest
    )
    stamp = load_plan_stamp(manifest, content=content.combined)
    rules = load_rules_stamp(manifest, content=content.combined)
    preflight = extent = start = None
    composer = _unchanged(manifest, ledger, stamp, secrets)
    if composer is None:
        reuse = _reuse(ledger, rules)
        # Rows only appended under the same rules: the earlier ones are checked and recorded already (unless
        # they attach files of their own, which may have changed: every row is read, to compare them).
        if ledger is not None and reuse is Reuse.UNCHANGED_ROWS and not manifest.message.own_files:
            start = find_appended(manifest, ledger)
        with hooks.checking() as on_rows:
            preflight = run_preflight(
                manifest,
                sink,
                secrets=secrets,
                skip_invalid=options.skip_invalid,
                ledger=ledger,
                on_rows=on_rows,
                reuse=reuse,
                due_at=partial(first_due_time, manifest, now=now),
                start=start,
            )
        preflight.raise_for_problems()
        composer, to_send, skipped = preflight.composer, preflight.to_send, preflight.skipped
        extent = load_list_extent(
            manifest.recipients.source,
            size=preflight.list_end,
            rows=preflight.last_row,
        )
        if start is not None and ledger is not None:  # and the rows recorded before that a run still sends
            to_send += _still_to_send(ledger.counts(listed=True))
    else:
        assert ledger is not None
        counts = ledger.counts(listed=True)
        to_send = _still_to_send(counts)
        skipped = {"skipped earlier": counts[RowState.SKIPPED]} if counts[RowState.SKIPPED] else {}
    plan = RunPlan(
        source=manifest.recipients.source,
        to_send=to_send,
        skipped=skipped,
        unchanged=preflight is None,
        senders=len(manifest.senders),
        appended=0 if start is None or preflight is None else preflight.last_row - start.rows,
        notes=(
            *(() if ledger is None else ledger.notes),
            *find_store_notes(manifest, ledger),
            *(() if preflight is None else preflight.notes),
        ),
    )
    return _Checked(composer, preflight, plan, stamp, rules, content, extent, appended=start is not None)


def _still_to_send(counts: Mapping[RowState, int]) -> int:
    """Of the ledger's listed rows (`counts` per state), those a run still sends: pending, or in flight."""
    return counts[RowState.PENDING] + counts[RowState.INFLIGHT]


def _unchanged(
    manifest: Manifest, ledger: Ledger | None, stamp: str, secrets: Sequence[bytes] | None
) -> Composer | None:
    """The composer, when the ledger's plan was checked by an earlier run under this very stamp and its
    open rows' attachment files are still there; else None: the rows are to be checked. With a million
    rows, checking them all takes minutes: a resume of an unchanged campaign reads only its open rows
    (and a run whose rules are unchanged renders only the rows added or changed: `_reuse`)."""
    if ledger is None or ledger.plan_stamp() != stamp:
        return None
    if manifest.message.attachments and ledger.skip_causes().get(SkipReason.INVALID.value):
        # A row skipped for a file that was missing validates once the file is there: the stamp does not
        # cover the files, and only the full check can tell (and put the row back to pending).
        return None
    composer = build_composer(manifest, secrets=secrets)
    return composer if _files_still_there(manifest, composer, ledger) else None


def _reuse(ledger: Ledger | None, rules: str) -> Reuse:
    """Which rows need no render: sent ones always; pending ones unchanged under the same rules (which
    cover the files every message attaches; a row's recorded cells, the files of its own)."""
    if ledger is None:
        return Reuse.NONE
    if ledger.rules_stamp() == rules:
        return Reuse.UNCHANGED_ROWS
    return Reuse.SENT_ROWS


def _files_still_there(manifest: Manifest, composer: Composer, ledger: Ledger) -> bool:
    """Whether every open row's own attachment files are as its check found them (their sizes and times
    are in its recorded cells; the files every message attaches are in the plan stamp); if one is not,
    the full check runs, re-checks that row and says what is wrong, before anything is recorded."""
    if not manifest.message.own_files:
        return True
    jobs = LedgerJobs(ledger, manifest.recipients, None)
    for sender in jobs.counts:
        while page := jobs(sender, _PAGE):
            recorded = ledger.key_cells([job.recipient.key for job in page])
            if any(
                recorded.get(job.recipient.key) != load_row_cells(composer, manifest, job) for job in page
            ):
                return False  # changed, or gone: the full check says which
    return True


def _record_plan(ledger: Ledger, checked: _Checked, spool: PlanSpool) -> SyncReport:
    """Record a freshly checked plan from `spool` with its stamps and each row's cells (so that an
    unchanged resume need not check again, and a changed list only its new and changed rows)."""
    if checked.preflight is None:
        return SyncReport(added=0, skipped_added=0, existing=0, missing=0)
    return ledger.record_plan(
        spool.planned(),
        spool.skips(),
        stamp=checked.stamp,
        rules=checked.rules,
        extent=_extent(checked),
        appended=checked.appended,
    )


def _extent(checked: _Checked) -> str | None:
    """The record of the list file the checked plan is of, as the ledger keeps it."""
    return None if checked.extent is None else checked.extent.encode()


def _send_checked(
    manifest: Manifest,
    ledger: Ledger,
    checked: _Checked,
    sync: SyncReport,
    options: RunOptions,
    *,
    connect: Callable[[], AbstractAsyncContextManager[SendClient]],
    clock: Clock,
    hooks: RunHooks,
    path: str,
    leases: GrantLeases | None = None,
) -> RunOutcome:
    record_content(ledger, checked.content)
    record_key_scheme(ledger, manifest)
    record_read_stores(ledger, manifest)
    ledger.record_moved_mailboxes({sender.mailbox: sender.name for sender in manifest.senders})
    # Before any send: a later run whose sender names a new grant for the same address counts these.
    ledger.record_mailbox_addresses(
        (sender.mailbox, sender.mailbox_address)
        for sender in manifest.senders
        if sender.mailbox_address is not None
    )
    ledger.record_expired_claims()
    jobs = _open_jobs(manifest, ledger, checked, now=clock.now())
    settings = DispatchSettings(limit=options.limit, wait=options.wait)
    rounds = _Rounds(manifest, checked.composer, ledger, clock, settings, hooks)
    if leases is None:
        work = partial(rounds.send, jobs, connect)
    else:  # its parks are recorded round by round, for the grants it held then
        work = partial(rounds.send_as_worker, leases, connect)
    interrupted = anyio.run(partial(run_interruptible, work, on_signal=hooks.stopping))
    if interrupted.result is not None and leases is None:
        ledger.record_parks(
            {sender.name: interrupted.result.parked.get(sender.name) for sender in manifest.senders}
        )
    states = {state.value: count for state, count in ledger.counts(listed=True).items()}
    status = build_status(manifest, ledger, clock=clock, command_path=path, sandbox=options.sandbox)
    return RunOutcome(
        result=interrupted.result,
        signals=interrupted.signals,
        states=states,
        next_steps=status.next_steps,
        sync=sync,
        content=checked.content,
        next_due=ledger.next_due(clock.now()),
    )


def _open_jobs(manifest: Manifest, ledger: Ledger, checked: _Checked, *, now: datetime) -> LedgerJobs:
    """The rows that still need a send and are due at `now`, read a page at a time as the lanes need
    them, with the cells their plan recorded."""
    if checked.preflight is None and ledger.plan_stamp() != checked.stamp:
        # another command recorded a plan meanwhile
        message = f"{ledger.where}: another command changed the ledger while this one started; run again"
        raise LedgerError(message)
    return LedgerJobs(ledger, manifest.recipients, now)


class _WatchedSource:
    """A `JobSource` whose every page has its recipients looked up in the unsubscribe stores first, so
    that the watch knows the opt-outs recorded before the run of exactly the rows about to be sent."""

    def __init__(self, source: JobSource, watch: UnsubscribeWatch) -> None:
        self._source = source
        self._watch = watch

    def __call__(self, sender: str, count: int) -> Sequence[Job]:
        jobs = self._source(sender, count)
        self._watch.look_up([job.recipient for job in jobs])
        return jobs

    def left(self) -> int:
        return self._source.left()


class _Rounds:
    """The sending of one run: step 1's open rows, then, round after round, the follow-ups as they
    come due (scheduled from what was just sent). Without --wait the run ends when nothing is due;
    with it, it sleeps until the next follow-up is due and goes on, across days."""

    def __init__(
        self,
        manifest: Manifest,
        composer: Composer,
        ledger: Ledger,
        clock: Clock,
        settings: DispatchSettings,
        hooks: RunHooks,
    ) -> None:
        self._manifest = manifest
        self._composer = composer
        self._ledger = ledger
        self._clock = clock
        self._settings = settings
        self._hooks = hooks
        self._held: dict[str, datetime] = {}  # follow-ups whose reply lookup failed, and when to retry
        self._resting: dict[str, datetime] = {}  # a worker's senders parked or shut, until when
        # A worker's countdown while no grant has work due (--wait): kept across its looks, until the
        # moment waited for changes or a round begins (one line in a log, not one a look).
        self._idle = ExitStack()
        self._idle_until: datetime | None = None

    async def send_as_worker(
        self,
        leases: GrantLeases,
        connect: Callable[[], AbstractAsyncContextManager[SendClient]],
        stop: anyio.Event,
    ) -> DispatchResult:
        """As one of the workers sharing the campaign: send from the grants this one leases, round
        after round (`dispatch.send_under_leases`), until no grant has work that may go now (with
        --wait: until no work is left, waiting for the work scheduled later)."""
        self._ledger.bind_worker(leases.id)  # a claim is recorded only under its grant's live lease
        await anyio.to_thread.run_sync(self._schedule_sent)
        total: DispatchResult | None = None

        async def send_round(senders: Sequence[str], round_stop: anyio.Event) -> DispatchResult:
            nonlocal total
            self._end_idle()  # the round shows its own progress (and its own waits)
            first = await anyio.to_thread.run_sync(
                LedgerJobs, self._ledger, self._manifest.recipients, self._clock.now()
            )
            mine = tuple(sender for sender in self._manifest.senders if sender.name in senders)
            settings = _rest_of(self._settings, total)  # --limit counts the whole run
            result = await self.send(first, connect, round_stop, senders=mine, settings=settings)
            total = result if total is None else total.then(result)
            now = self._clock.now()
            self._resting.update({**result.parked, **result.closed})
            self._resting = {name: until for name, until in self._resting.items() if until > now}
            parks = {name: result.parked.get(name) for name in senders}
            await anyio.to_thread.run_sync(self._ledger.record_parks, parks)
            stopped = [*result.parked, *result.auth_refused, *result.rejecting]
            await anyio.to_thread.run_sync(self._give_away, stopped)
            return result

        try:
            done = await send_under_leases(
                leases,
                with_work=self._with_work,
                send_round=send_round,
                clock=self._clock,
                stop=stop,
                wait_for_work=self._wait_for_work if self._settings.wait else None,
            )
        finally:
            self._end_idle()
        # What is left is in the ledger's states (the other workers' grants' rows too): a worker ends
        # once no grant has work that may go now, so none of its rounds' sources is left to read.
        return (
            replace(done, remaining=0) if done else DispatchResult(sent=0, failed=0, unknown=0, remaining=0)
        )

    async def _wait_for_work(self, stop: anyio.Event, most_s: float) -> bool:
        """--wait, as a worker for which no grant has work due now: wait until the next row scheduled is
        due (a follow-up, or step 1 at its `deliver_at`), at most `most_s` (the worker looks again
        meanwhile: a dead worker's grants come free, rows come back to send), showing the countdown;
        False when none is scheduled: nothing is left for any worker."""
        now = self._clock.now()
        until = await anyio.to_thread.run_sync(self._ledger.next_due, now)
        if until is None:
            if await anyio.to_thread.run_sync(self._schedule_sent) > 0:
                return True  # a worker that died between sends and scheduling left these: look again
            self._end_idle()
            return False
        if until != self._idle_until:
            self._end_idle()
            scheduled = await anyio.to_thread.run_sync(self._scheduled, now)
            self._idle.enter_context(self._hooks.waiting(until, scheduled))
            self._idle_until = until
        await self._clock.wait_for(stop, min(most_s, (until - now).total_seconds()))
        return True

    def _end_idle(self) -> None:
        self._idle.close()
        self._idle_until = None

    def _scheduled(self, now: datetime) -> int:
        """The follow-ups scheduled after `now`, as a wait shows them."""
        return sum(step.scheduled for step in self._ledger.step_counts(self._manifest.steps[1:], now))

    def _give_away(self, stopped: Sequence[str]) -> None:
        """The movable rows of senders this worker stopped (a quota park, refused credentials or messages)
        to the senders that may still send, through the ledger: another worker may hold them."""
        now = self._clock.now()
        parked = {name for name, until in self._ledger.parked_senders().items() if until > now}
        takers = [s.name for s in self._manifest.senders if s.name not in parked and s.name not in stopped]
        for name in stopped if takers else ():
            record_rows_given_away(self._ledger, self._manifest.recipients, name, takers)

    def _with_work(self) -> list[str]:
        """The senders with work that may go now: rows of step 1 or follow-ups due, and not parked by a
        quota or shut by their window (until then; with --wait their lanes wait it out)."""
        now = self._clock.now()
        busy = set(self._ledger.open_counts(now))
        if self._manifest.followups:
            busy.update(self._ledger.due_senders(now))
        resting = {name for name, until in self._ledger.parked_senders().items() if until > now}
        resting.update(name for name, until in self._resting.items() if until > now)
        if self._settings.wait:
            resting.clear()
        return [sender.name for sender in self._manifest.senders if sender.name in busy - resting]

    async def send(
        self,
        first: LedgerJobs,
        connect: Callable[[], AbstractAsyncContextManager[SendClient]],
        stop: anyio.Event | None = None,
        *,
        senders: Sequence[SenderSettings] | None = None,
        settings: DispatchSettings | None = None,
    ) -> DispatchResult:
        """Send step 1's open rows (`first`), then every follow-up as it comes due; the results of all
        rounds added up. Only from `senders` if given (a worker's leased grants), else from all."""
        senders = self._manifest.senders if senders is None else senders
        names = {sender.name for sender in senders}
        settings = settings or self._settings
        if settings.wait and self._sequenced:  # a sender's wait must not hold another's next steps
            settings = replace(settings, leave_to_wait=True)
        stores = list_store_paths(self._manifest)
        # Re-read the unsubscribe stores and the suppression files (about once a second) so that a
        # mid-run opt-out holds: rows the plan did not check again (follow-ups, retried rows) meet the
        # files here. Every read of a store, a file or the ledger here is made in a worker thread: a slow
        # database or disk holds what waits for its answer, never the event loop (the sends in flight, a
        # worker's lease heartbeat).
        suppress = self._manifest.recipients.suppress
        files = await anyio.to_thread.run_sync(partial(SuppressionFiles, suppress, clock=self._clock))
        watch = await anyio.to_thread.run_sync(partial(UnsubscribeWatch, stores, clock=self._clock))
        # Replies the webhooks reported (`campaign serve` keeps them in the stores) stop follow-ups too.
        notices = ReplyNotices(stores, campaign=self._manifest.campaign.name, clock=self._clock)
        total: DispatchResult | None = None
        waiting: dict[str, datetime] = {}  # senders that left the last round to wait (--wait), until
        try:
            async with connect() as client:
                screen = self._screen(client, notices)
                while True:
                    # Once a round: schedule what was just sent, read what is due (step 1's rows first).
                    step1 = (
                        first
                        if total is None
                        else await anyio.to_thread.run_sync(self._later_first_steps, settings)
                    )
                    followups = await anyio.to_thread.run_sync(self._due_followups)
                    sources = [source for source in (step1, followups) if source is not None]
                    counts: Counter[str] = Counter()
                    for source in sources:
                        counts.update({name: n for name, n in source.counts.items() if name in names})
                    waiting = {name: until for name, until in waiting.items() if until > self._clock.now()}
                    ready = counts.total() - sum(counts[name] for name in waiting)
                    if not ready and total is not None:  # nothing may go now: wait for it, or end here
                        if not settings.wait or not await self._wait_for_next(stop, also=waiting):
                            return total
                        continue
                    if followups is not None and followups.counts.total() and await self._pull_events(client):
                        watch.reread_next()
                    work = chain_sources(*sources)
                    if stores:  # each page's recipients looked up in the stores before any is sent
                        work = _WatchedSource(work, watch)
                    rest = _rest_of(settings, total)  # --limit counts the whole run
                    opt_out = _opt_out(watch if stores else None, files)
                    result = await self._dispatch(work, counts, client, opt_out, screen, stop, rest, senders)
                    total = result if total is None else total.then(result)
                    if not _round_follows(result, settings, stop, sequenced=self._sequenced):
                        return total
                    waiting = {**result.closed, **result.parked}
        finally:
            watch.close()
            notices.close()

    @property
    def _sequenced(self) -> bool:
        """Whether work comes due later: follow-ups, or step 1 at a time of day."""
        return bool(self._manifest.followups) or self._manifest.message.deliver_at is not None

    async def _pull_events(self, client: SendClient) -> bool:
        """Before a round with follow-ups: bounce reports in the senders' inboxes into the campaign's store
        (`campaign events pull`), so that a bounced address gets no follow-up. Bounded and idempotent;
        a failed pull leaves it to the reply lookups, and the next round pulls again."""
        manifest = self._manifest
        store_path = events_store_path(manifest)
        if store_path is None or not isinstance(client, InboxReader):
            return False
        first = await anyio.to_thread.run_sync(self._ledger.first_claim)
        if first is None:
            return False
        try:
            secrets = self._composer.secrets
            report = await pull_senders_inboxes(
                client, manifest, store_path, first_claim=first, clock=self._clock, secrets=secrets
            )
        except CampaignError:
            return False
        return report.recorded > 0 or bool(report.unsubscribed)

    def _later_first_steps(self, settings: DispatchSettings) -> LedgerJobs | None:
        """In a round after the first: step 1's rows that came due since (`deliver_at`), or whose senders
        left the round before to wait (--wait), a page at a time."""
        if self._manifest.message.deliver_at is None and not settings.leave_to_wait:
            return None
        return LedgerJobs(self._ledger, self._manifest.recipients, self._clock.now())

    def _schedule_sent(self) -> int:
        """Schedule the next step of every recipient whose step was sent and has none yet; how many. A
        worker killed between its sends and scheduling them leaves such rows, which nothing else would
        find while no work is due."""
        if not self._manifest.followups:
            return 0
        return schedule_followups(self._manifest, self._ledger, recipients_at=self._recipients_at)

    def _due_followups(self) -> DueJobs | None:
        """The follow-ups due now, once the steps just sent are scheduled. A follow-up whose lookup failed
        waits for its retry."""
        if not self._manifest.followups:
            return None
        now = self._clock.now()
        self._schedule_sent()
        self._held = {key: retry for key, retry in self._held.items() if retry > now}
        return DueJobs(self._manifest, self._ledger, now, recipients_at=self._recipients_at, held=self._held)

    async def _wait_for_next(
        self, stop: anyio.Event | None, also: Mapping[str, datetime] | None = None
    ) -> bool:
        """--wait: sleep until the next follow-up is due (or a held one is retried), or one of the senders
        waiting (`also`: until when) may send again; False if nothing is to come."""
        now = self._clock.now()
        waits = also or {}
        next_due = await anyio.to_thread.run_sync(self._ledger.next_due, now)
        moments = (next_due, *self._held.values(), *waits.values())
        times = [moment for moment in moments if moment is not None]
        if not times:
            return False
        until = max(now, min(times))
        scheduled = await anyio.to_thread.run_sync(self._scheduled, now)
        with self._hooks.waiting(until, scheduled, waiting=tuple(waits)):
            seconds = (until - now).total_seconds()
            if stop is None:
                await self._clock.sleep(seconds)
            else:
                await self._clock.wait_for(stop, seconds)
        return not _asked_to_stop(stop)

    def _recipients_at(self, wanted: Sequence[tuple[int, str, str]]) -> list[Recipient]:
        return load_recipients(self._manifest.recipients, self._ledger, wanted)

    def _screen(
        self, client: SendClient, notices: ReplyNotices
    ) -> Callable[[Job], Awaitable[Screening]] | None:
        if not self._manifest.followups or not isinstance(client, ReplyClient):
            return None
        check = build_screen(self._manifest, self._ledger, client, notices=notices)

        async def screen(job: Job) -> Screening:
            found = await check(job)
            if found.hold:  # looked up again later, never sent blind
                self._held[job.key] = self._clock.now() + timedelta(seconds=_HOLD_RETRY_S)
            return found

        return screen

    def _relink(self, client: SendClient) -> Callable[[Job], Awaitable[Relink]] | None:
        """The lookup after a follow-up's send was answered 404 (`followups.build_relink`); one that
        failed is tried again as a failed reply lookup is."""
        if not self._manifest.followups or not isinstance(client, ReplyClient):
            return None
        look = build_relink(self._manifest, client)

        async def relink(job: Job) -> Relink:
            found = await look(job)
            if found.hold:
                self._held[job.key] = self._clock.now() + timedelta(seconds=_HOLD_RETRY_S)
            return found

        return relink

    def _round_facts(
        self, senders: Sequence[SenderSettings]
    ) -> tuple[dict[str, list[tuple[float, int]]], dict[str, datetime], set[str]]:
        """What a round starts from, read from the ledger: each sender's sends of the last day (for its
        daily limits), the senders parked, and the rows in flight from an earlier run (they keep their
        grant: their key may have been used)."""
        since = self._clock.now().timestamp() - DAY_S
        # Only daily limits look back; a sender without one would load its whole day's sends for nothing.
        history = {
            sender.name: self._ledger.sent_recipients_since(
                sender.name, since, via=sender.mailbox, address=sender.mailbox_address
            )
            for sender in senders
            if sender.per_day is not None or sender.per_day_messages is not None
        }
        bound = {row.key for row in self._ledger.rows(states=(RowState.INFLIGHT,))}
        return history, self._ledger.parked_senders(), bound

    async def _dispatch(
        self,
        jobs: JobSource,
        per_sender: Mapping[str, int],
        client: SendClient,
        opt_out: Callable[[Recipient], Awaitable[SkipReason | None]],
        screen: Callable[[Job], Awaitable[Screening]] | None,
        stop: anyio.Event | None,
        settings: DispatchSettings,
        senders: Sequence[SenderSettings],
    ) -> DispatchResult:
        manifest, ledger = self._manifest, self._ledger
        history, parked, bound = await anyio.to_thread.run_sync(self._round_facts, senders)
        shares = [_share(sender.name, sender.per_day, per_sender, history) for sender in senders]
        with self._hooks.progress(sum(per_sender.values()), shares) as on_event:
            return await dispatch(
                jobs,
                senders=senders,
                render=partial(render_job, self._composer, manifest),
                movable_to=partial(may_move_to, self._composer, manifest),
                client=client,
                ledger=ledger,
                clock=self._clock,
                history=history,
                parked=parked,
                on_event=on_event,
                settings=settings,
                unsubscribed=opt_out,
                screen=screen,
                relink=self._relink(client),
                stop=stop,
                bound=bound,
                holidays=manifest.campaign.holidays,
                # A worker's leased grants: another worker may have sent from them a moment ago.
                handed_over=senders is not manifest.senders,
            )


def _opt_out(
    watch: UnsubscribeWatch | None, files: SuppressionFiles
) -> Callable[[Recipient], Awaitable[SkipReason | None]]:
    """The opt-out check right before each claim: a suppression file lists the recipient now
    (`suppressed`), or a store does (`unsubscribed`, `bounced`), each re-read off the event loop when
    due."""

    async def opt_out(recipient: Recipient) -> SkipReason | None:
        await files.reread_when_due()
        if files.is_listed(recipient):
            return SkipReason.SUPPRESSED
        if watch is None:
            return None
        await watch.reread_when_due()
        return watch.opt_out(recipient)

    return opt_out


def _rest_of(settings: DispatchSettings, done: DispatchResult | None) -> DispatchSettings:
    """The settings of the next round: what --limit leaves after the rounds before it."""
    if settings.limit is None or done is None:
        return settings
    return replace(settings, limit=max(0, settings.limit - (done.sent + done.failed + done.unknown)))


def _asked_to_stop(stop: anyio.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _round_follows(
    result: DispatchResult, settings: DispatchSettings, stop: anyio.Event | None, *, sequenced: bool
) -> bool:
    """Whether another round follows `result`'s: in a sequence, unless it halted or a stop was asked. With
    --wait, senders that left it to wait (a shut window, a park) do not halt it: they are waited for."""
    if not sequenced or _asked_to_stop(stop):
        return False
    if settings.wait:
        result = replace(result, closed={}, parked={})
    return not _halted(result)


def _halted(result: DispatchResult) -> bool:
    """The round stopped short of its work (a park, a shut window, refused credentials, no connection to
    the API, refused messages, --limit, Ctrl-C)."""
    return bool(
        result.parked
        or result.closed
        or result.auth_refused
        or result.unreachable
        or result.rejecting
        or result.limit_reached
        or result.stopped
    )


def _share(
    name: str,
    per_day: int | None,
    per_sender: Mapping[str, int],
    history: Mapping[str, Sequence[tuple[float, int]]],
) -> SenderShare:
    used = sum(count for _, count in history.get(name, ()))
    left = None if per_day is None else max(0, per_day - used)
    return SenderShare(name, per_sender.get(name, 0), left)
