"""Where a campaign stands: what `campaign status` prints and `--json` emits.

Reads the ledger; writes nothing. `Status.as_json()` is a contract documented in the README
(its keys, their order and their values), so the typed fields below map onto it one to one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from campaign.clock import Clock
from campaign.ledger import ErrorGroup, Ledger, LedgerSite, WorkerView
from campaign.manifest import Manifest
from campaign.models import RowState
from campaign.nextsteps import NextStep, load_next_steps
from campaign.plan import DAY_S, Schedule, SenderSchedule, WindowPlan, build_schedule, plan_window
from campaign.unsubscribe import SuppressionStore, find_engagement, list_store_paths, open_existing_stores

__all__ = [
    "OPEN_STATES",
    "ErrorCause",
    "SenderStatus",
    "Status",
    "StepStatus",
    "build_status",
    "build_unstarted_status",
    "load_status",
]

# A campaign is not done while any row is in one of these.
OPEN_STATES = (RowState.PENDING, RowState.INFLIGHT, RowState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class ErrorCause:
    """Rows not sent for one cause ("402 message_rejected", "- unknown") and the latest message given."""

    cause: str
    count: int
    latest: str | None = None  # None: none of its rows has an error message or a note


@dataclass(frozen=True, slots=True)
class SenderStatus:
    """One sender of the manifest: its mailbox, its rows per state, its rolling-24 h budget, its schedule."""

    name: str
    grant_id: str  # where its sends go: the grant, or `domain:<domain>` (as `preview --json` says it)
    domain: str | None
    email: str | None
    states: Mapping[RowState, int]  # every state, in RowState order
    sent_last_24h: int  # recipients, not messages: the providers' daily limits count recipients
    per_day: int | None
    budget_left: int | None  # None: no daily limit
    schedule: SenderSchedule | None = None  # None before the campaign started
    window: WindowPlan | None = None  # its send window, and its open rows' finish inside it; None: any time

    def as_json(self) -> dict[str, object]:
        """The sender's entry under `senders` in `status --json`."""
        data: dict[str, object] = {"grant_id": self.grant_id}
        # A campaign not started has always been reported without `domain`, `next_24h` and `eta_s`;
        # the JSON is a contract, so that shape stays.
        if self.schedule is not None:
            data["domain"] = self.domain
        data |= {
            "email": self.email,
            "states": _named(self.states),
            "sent_last_24h": self.sent_last_24h,
            "per_day": self.per_day,
            "budget_left": self.budget_left,
        }
        if self.schedule is not None:
            data |= {"next_24h": self.schedule.next_24h, "eta_s": self.schedule.duration_s}
        if self.window is not None:  # only senders with a window have these keys
            data |= self.window.as_json()
        return data


@dataclass(frozen=True, slots=True)
class StepStatus:
    """One step of a campaign with follow-ups: its rows per state, what is due, and who stopped."""

    step: str
    after: str | None  # the follow-up's delay; None for step 1
    states: Mapping[RowState, int]
    due_now: int
    scheduled: int
    next_due: datetime | None
    stopped: Mapping[str, int]  # skip cause -> rows (replied, auto-replied, unsubscribed, bounced, …)
    auto_replied: int  # auto-replies seen before this step that did not stop it

    def as_json(self) -> dict[str, object]:
        """The step's entry under `steps` in `status --json`."""
        return {
            "after": self.after,
            "states": _named(self.states),
            "sent": self.states[RowState.SENT],
            "due_now": self.due_now,
            "scheduled": self.scheduled,
            "next_due": _iso(self.next_due),
            "stopped": dict(self.stopped),
            "auto_replied_continuing": self.auto_replied,
        }


@dataclass(frozen=True, slots=True)
class EngagementSummary:
    """Of the messages sent, how many were opened, clicked and replied to, per the tracking notifications."""

    sent: int
    opened: int
    clicked: int
    replied: int

    def as_json(self) -> dict[str, object]:
        """The `engagement` key of `status --json`."""
        return {
            "sent": self.sent,
            "opened": self.opened,
            "clicked": self.clicked,
            "replied": self.replied,
            "open_rate": round(self.opened / self.sent, 4) if self.sent else None,
            "click_rate": round(self.clicked / self.sent, 4) if self.sent else None,
            "note": OPENS_NOTE,
        }


@dataclass(frozen=True, slots=True)
class BounceSummary:
    """Of the messages sent, how many bounced (any hard bounce makes it hard), per the stores' bounces."""

    sent: int
    hard: int
    soft: int

    def as_json(self) -> dict[str, object]:
        """The `bounces` key of `status --json`."""
        bounced = self.hard + self.soft
        return {
            "sent": self.sent,
            "bounced": bounced,
            "hard": self.hard,
            "soft": self.soft,
            "bounce_rate": round(bounced / self.sent, 4) if self.sent else None,
        }


OPENS_NOTE = "opens are inflated: Apple Mail Privacy Protection loads every message's images, opened or not"


@dataclass(frozen=True, slots=True)
class Status:
    """The status of a campaign, started (it has a ledger) or not."""

    campaign: str
    manifest: Path
    ledger: str | None  # None: no ledger yet, the campaign has not started
    schedule: Schedule | None  # when it will be done at the current limits; None before it started
    done: bool  # no row still in the list is open (rows removed from it are left as they were)
    total: int
    states: Mapping[RowState, int]  # every state, in RowState order
    skipped: Mapping[str, int]  # skipped rows per cause, by cause
    errors: tuple[ErrorCause, ...]  # failed and unknown rows per cause, most first
    removed_from_list: int
    next_steps: tuple[NextStep, ...]
    senders: tuple[SenderStatus, ...]  # in manifest order
    engagement: EngagementSummary | None = None  # None: the campaign's stores keep no tracking events
    bounces: BounceSummary | None = None  # None: none of its sent messages bounced (or no store)
    steps: tuple[StepStatus, ...] = ()  # with [[followups]]: every step, step 1 first
    # A campaign shared in PostgreSQL: its workers, live ones first (none once they all left); None: a file.
    workers: tuple[WorkerView, ...] | None = None
    waiting: tuple[ErrorCause, ...] = ()  # open rows whose last try failed, per cause, most first
    # False: the ledger holds the campaign (a database's row) but no plan yet: its first worker is
    # checking the list, or stopped before it recorded the plan.
    planned: bool = True

    @property
    def started(self) -> bool:
        """Whether the campaign has a ledger and a first run recorded its plan in it."""
        return self.ledger is not None and self.planned

    def as_json(self) -> dict[str, object]:
        """`status --json`: the keys, their order and their values are documented in the README."""
        data: dict[str, object] = {
            "campaign": self.campaign,
            "manifest": str(self.manifest),
            "ledger": None if self.ledger is None else str(self.ledger),
        }
        if self.schedule is not None:
            data |= {"per_day": self.schedule.per_day, "eta_s": self.schedule.duration_s}
        return (
            data
            | {
                "started": self.started,
                "done": self.done,
                "total": self.total,
                "states": _named(self.states),
                "skipped": dict(self.skipped),
                "errors": {error.cause: error.count for error in self.errors},
                "last_errors": {
                    error.cause: error.latest for error in self.errors if error.latest is not None
                },
                "removed_from_list": self.removed_from_list,
                "next": [step.as_json() for step in self.next_steps],
                "senders": {sender.name: sender.as_json() for sender in self.senders},
            }
            | ({"waiting": _waiting_json(self.waiting)} if self.waiting else {})
            | ({} if self.engagement is None else {"engagement": self.engagement.as_json()})
            | ({} if self.bounces is None else {"bounces": self.bounces.as_json()})
            | ({"steps": {step.step: step.as_json() for step in self.steps}} if self.steps else {})
            | ({} if self.workers is None else {"workers": [_worker_json(worker) for worker in self.workers]})
        )


def load_status(
    manifest: Manifest, site: LedgerSite, *, clock: Clock, command_path: str, sandbox: bool = False
) -> Status:
    """The status of the campaign whose ledger is (or would be) at `site`; opened read-only.

    `command_path`: the manifest as the user named it (and their `--ledger`), as a shell takes them, for
    the commands in `next_steps`.
    """
    if not site.exists(manifest.campaign.name):
        return build_unstarted_status(manifest)
    ledger = site.open(clock=clock, campaign=manifest.campaign.name, read_only=True)
    try:
        status = build_status(manifest, ledger, clock=clock, command_path=command_path, sandbox=sandbox)
        if not status.started:  # no plan yet: no message of its to look up in the stores
            return status
        with open_existing_stores(list_store_paths(manifest), clock=clock) as stores:
            return replace(
                status,
                engagement=find_engagement_summary(stores, ledger),
                bounces=find_bounce_summary(stores, ledger),
            )
    finally:
        ledger.close()


def find_engagement_summary(stores: Sequence[SuppressionStore], ledger: Ledger) -> EngagementSummary | None:
    """Opens and clicks of this campaign's sent messages, from the tracking notifications its open
    `stores` keep."""
    tracked = find_engagement(stores)
    if not tracked:
        return None
    ours = ledger.sent_message_ids(tracked)  # a store is shared: only this campaign's messages count
    return EngagementSummary(
        sent=ledger.counts()[RowState.SENT],
        opened=sum(1 for message_id in ours if tracked[message_id].opens),
        clicked=sum(1 for message_id in ours if tracked[message_id].clicks),
        replied=sum(1 for message_id in ours if tracked[message_id].replies),
    )


def find_bounce_summary(stores: Sequence[SuppressionStore], ledger: Ledger) -> BounceSummary | None:
    """How many of this campaign's sent messages bounced, from the bounces its open `stores` keep (None:
    none)."""
    if not stores:
        return None
    # Imported here: a campaign without a store (most) does not pay for it in `status`'s start-up.
    from campaign.events import find_row_bounces

    bounced = find_row_bounces(stores, ledger)
    if not bounced:
        return None
    hard = sum(1 for bounce in bounced.values() if bounce.hard)
    return BounceSummary(sent=ledger.counts()[RowState.SENT], hard=hard, soft=len(bounced) - hard)


def build_status(
    manifest: Manifest,
    ledger: Ledger,
    *,
    clock: Clock,
    command_path: str,
    sandbox: bool = False,
) -> Status:
    """The status of a campaign in `ledger` (`command_path`: the manifest's arguments, quoted, for `next`);
    not started while no plan is recorded in it."""
    if not _plan_recorded(ledger):
        # A database holds the campaign's row before its plan: the first worker records the plan after
        # the check, in one transaction. Until then nothing is counted yet, so nothing is done.
        unstarted = build_unstarted_status(manifest)
        return replace(unstarted, ledger=ledger.where, planned=False, workers=_workers(ledger))
    per_sender = ledger.counts_per_sender()  # one pass over the state index gives the totals too
    counts = {state: sum(tally[state] for tally in per_sender.values()) for state in RowState}
    unlisted = ledger.counts(listed=False)
    listed = {state: counts[state] - unlisted[state] for state in RowState}  # removed rows: not open work
    removed = sum(counts.values()) - sum(listed.values())
    since = clock.now().timestamp() - DAY_S
    sent_24h = {
        sender.name: ledger.sent_recipients_total(
            sender.name, since, via=sender.mailbox, address=sender.mailbox_address
        )
        for sender in manifest.senders
    }
    states = {name: per_sender.get(name, dict.fromkeys(RowState, 0)) for name in sent_24h}
    schedule = build_schedule(
        manifest.senders,
        remaining={
            name: tally[RowState.PENDING] + tally[RowState.INFLIGHT] for name, tally in states.items()
        },
        used_24h=sent_24h,
    )
    plans = {plan.name: plan for plan in schedule.senders}
    now = clock.now()
    senders = tuple(
        SenderStatus(
            name=sender.name,
            grant_id=sender.route,
            domain=sender.domain,
            email=sender.email,
            states=_every_state(states[sender.name]),
            sent_last_24h=sent_24h[sender.name],
            per_day=sender.per_day,
            budget_left=None if sender.per_day is None else max(0, sender.per_day - sent_24h[sender.name]),
            schedule=plans[sender.name],
        )
        for sender in manifest.senders
    )
    senders = tuple(_with_window(manifest, sender, now) for sender in senders)
    steps = load_next_steps(
        ledger,
        listed=listed,
        removed=removed,
        manifest=command_path,
        now=clock.now(),
        sandbox=sandbox,
    )
    return Status(
        campaign=manifest.campaign.name,
        manifest=manifest.path,
        ledger=ledger.where,
        schedule=schedule,
        done=all(listed[state] == 0 for state in OPEN_STATES),
        total=sum(counts.values()),
        states=_every_state(counts),
        skipped=dict(sorted(ledger.skip_causes().items())),
        errors=_error_causes(ledger.error_groups()),
        waiting=_error_causes(ledger.error_groups(waiting=True)),
        removed_from_list=removed,
        next_steps=tuple(steps),
        senders=senders,
        steps=_steps(manifest, ledger, now),
        workers=_workers(ledger),
    )


def _workers(ledger: Ledger) -> tuple[WorkerView, ...] | None:
    workers = ledger.workers()
    return None if workers is None else tuple(workers)


def _plan_recorded(ledger: Ledger) -> bool:
    """Whether a plan was recorded in `ledger`: every run records its stamp with it (a ledger whose rows
    came without one, as an older version or a test wrote them, has its rows to show)."""
    return ledger.plan_stamp() is not None or any(ledger.counts().values())


def _waiting_json(causes: Iterable[ErrorCause]) -> dict[str, object]:
    return {cause.cause: {"rows": cause.count, "latest": cause.latest} for cause in causes}


def _worker_json(worker: WorkerView) -> dict[str, object]:
    return {
        "id": worker.id,
        "host": worker.host,
        "pid": worker.pid,
        "grants": list(worker.grants),
        "heartbeat_at": datetime.fromtimestamp(worker.heartbeat_at, UTC).isoformat(timespec="seconds"),
        "live": worker.live,
    }


def _with_window(manifest: Manifest, status: SenderStatus, now: datetime) -> SenderStatus:
    """`status` with its sender's window: when it next opens, and when its open rows finish inside it."""
    if status.schedule is None:
        return status
    holidays = manifest.campaign.holidays
    sender = manifest.sender(status.name)
    window = plan_window(sender, now=now, duration_s=status.schedule.duration_s, holidays=holidays)
    return status if window is None else replace(status, window=window)


def _steps(manifest: Manifest, ledger: Ledger, now: datetime) -> tuple[StepStatus, ...]:
    if not manifest.followups:
        return ()
    return tuple(
        StepStatus(
            step=counts.step,
            after=None if (followup := manifest.followup(counts.step)) is None else followup.after,
            states=_every_state(counts.states),
            due_now=counts.due_now,
            scheduled=counts.scheduled,
            next_due=counts.next_due,
            stopped=dict(sorted(counts.stopped.items())),
            auto_replied=counts.auto_replied,
        )
        for counts in ledger.step_counts(manifest.steps, now)
    )


def build_unstarted_status(manifest: Manifest) -> Status:
    """The status of a campaign that has no ledger yet."""
    zero = dict.fromkeys(RowState, 0)
    return Status(
        campaign=manifest.campaign.name,
        manifest=manifest.path,
        ledger=None,
        schedule=None,
        done=False,
        total=0,
        states=zero,
        skipped={},
        errors=(),
        removed_from_list=0,
        next_steps=(),
        senders=tuple(
            SenderStatus(
                name=sender.name,
                grant_id=sender.route,
                domain=sender.domain,
                email=sender.email,
                states=zero,
                sent_last_24h=0,
                per_day=sender.per_day,
                budget_left=sender.per_day,
            )
            for sender in manifest.senders
        ),
    )


def _error_causes(groups: Iterable[ErrorGroup]) -> tuple[ErrorCause, ...]:
    """Rows per cause ("402 message_rejected", "- unknown"), most first, with each cause's latest message.

    Equal counts keep the order in which the causes first occur in the list, and the
    latest message is the last updated one (the last in list order among equals), as
    a pass over the rows in list order would find them.
    """
    counts: dict[str, int] = {}
    first: dict[str, tuple[int, str]] = {}
    latest: dict[str, tuple[str, int, str, str]] = {}
    for group in groups:
        cause = f"{group.status or '-'} {group.error_type or group.state.value}"
        counts[cause] = counts.get(cause, 0) + group.count
        first[cause] = min(first.get(cause, group.first), group.first)
        if group.latest is not None and (cause not in latest or group.latest[:3] > latest[cause][:3]):
            latest[cause] = group.latest
    ranked = sorted(sorted(counts, key=first.__getitem__), key=counts.__getitem__, reverse=True)
    return tuple(
        ErrorCause(cause, counts[cause], latest[cause][3] if cause in latest else None) for cause in ranked
    )


def _every_state(counts: Mapping[RowState, int]) -> dict[RowState, int]:
    return {state: counts.get(state, 0) for state in RowState}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def _named(counts: Mapping[RowState, int]) -> dict[str, int]:
    return {state.value: counts.get(state, 0) for state in RowState}
