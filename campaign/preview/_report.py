"""The dry run: what a run would send, to whom, from which mailbox, and when it would be done.

`run_preview` streams the recipient list through the checked-row pipeline a run uses
(`pipeline.check_rows`) and keeps only counts, per-sender tallies, every problem row, a capped
listing of rows and the first few messages, so a million-row list previews in bounded memory;
the campaign's ledger, when it ran before, is asked a batch at a time. It reads the list, the
templates and the ledger; it never sends and never writes. `campaign.preview._site` writes the
browsable site; `campaign.preview._json` the `--json` form.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from campaign.clock import Clock
from campaign.collector import collecting_less
from campaign.errors import DataError
from campaign.ledger import Ledger
from campaign.manifest import FollowupSettings, Manifest, SenderSettings
from campaign.models import FIRST_STEP, Message, Problem, SkipReason
from campaign.nylas import CapturedRequest, build_send_payload, capture_requests
from campaign.pipeline import (
    Rendered,
    Reuse,
    RowCheck,
    RowPipeline,
    build_unsubscribe_warnings,
    check_rows,
    checked_rows,
    describe_mailed_elsewhere,
    find_skipped_invalid,
)
from campaign.plan import DAY_S, Job, WindowPlan, build_quota_warnings, build_schedule, plan_window
from campaign.recipients import BATCH_ROWS, CheckedRow, describe_key_only_entries
from campaign.render import MESSAGE_CHECKS, AttachmentLoader, load_message_attachments

__all__ = [
    "INDEX_ROWS",
    "Issue",
    "ListedRow",
    "PreviewReport",
    "RowProblem",
    "Sample",
    "SenderPlan",
    "StepPlan",
    "run_preview",
]

INDEX_ROWS = 10_000  # rows listed on index.html; problem rows are listed whatever their number
STATE_SEND = "to send"
STATE_INVALID = "invalid"
_SKIPPED = "skipped"  # with --skip-invalid
_SKIPPED_EARLIER = "skipped earlier"  # by a run with --skip-invalid, the row unchanged since


@dataclass(frozen=True, slots=True)
class Issue:
    """One thing wrong with a row: where (column, variable, field) and what to do; `text` is run's line."""

    where: str
    message: str
    text: str


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that fails preflight, with its cells (for its page) and every issue found."""

    row: int
    email: str
    fields: tuple[tuple[str, str], ...]
    issues: tuple[Issue, ...]


@dataclass(frozen=True, slots=True)
class ListedRow:
    """One row as index.html lists it; `sample` numbers its message page, if it has one."""

    row: int
    email: str
    name: str
    sender: str
    subject: str
    state: str
    detail: str = ""
    warnings: tuple[str, ...] = ()
    sample: int | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """A rendered message, its send payload, and the exact request a run would make for it; step 1's
    sample holds its recipient's follow-ups (`steps`), each a sample of its own step."""

    number: int
    message: Message
    payload: dict[str, Any]
    request: CapturedRequest
    step: str = FIRST_STEP
    steps: tuple[Sample, ...] = ()
    after: str | None = None  # a follow-up's delay after the step before
    stops: str = ""  # a follow-up's stop rules, as the manifest says them


@dataclass(frozen=True, slots=True)
class SenderPlan:
    """One sender's share of the campaign, its effective limits and its timing."""

    name: str
    route: str
    email: str | None
    provider: str | None
    messages: int
    rate_per_s: float
    burst: int
    per_day: int | None
    concurrency: int
    used_24h: int
    next_24h: int
    duration_s: float
    window: WindowPlan | None = None  # its send window, and its messages' finish inside it; None: any time


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step of a campaign with follow-ups: its name, its delay and its stop rules."""

    name: str
    after: str | None  # None for step 1
    stops: str  # e.g. "stops on reply, bounce, unsubscribe; auto-replies: ignore"


@dataclass(frozen=True, slots=True)
class PreviewReport:
    """Everything `campaign preview` shows and writes."""

    campaign: str
    manifest: Path
    source: str
    rows: int
    to_send: int
    already_done: Mapping[str, int]
    skipped: Mapping[SkipReason, int]
    problems: tuple[RowProblem, ...]
    senders: tuple[SenderPlan, ...]
    samples: tuple[Sample, ...]
    warnings: tuple[str, ...]
    listed: tuple[ListedRow, ...]
    listed_all: bool
    started_at: datetime
    skip_invalid: bool
    steps: tuple[StepPlan, ...] = ()  # with [[followups]]: every step, [message] first

    @property
    def duration_s(self) -> float:
        """How long the whole campaign takes: the slowest sender decides."""
        return max((sender.duration_s for sender in self.senders), default=0.0)

    @property
    def finishes_at(self) -> datetime:
        """When the last message would go out if the run started now (windows stretch it)."""
        plain = self.started_at + timedelta(seconds=self.duration_s)
        return max((s.window.finishes_at for s in self.senders if s.window is not None), default=plain)

    @property
    def problem_texts(self) -> tuple[str, ...]:
        """Every issue as run would print it, in row order (empty with --skip-invalid)."""
        if self.skip_invalid:
            return ()
        return tuple(issue.text for problem in self.problems for issue in problem.issues)


@dataclass
class _Tally:
    """What the streaming pass keeps: counts, tallies, problems, a capped listing, the samples."""

    index_rows: int
    samples_wanted: int
    to_send: int = 0
    per_sender: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)
    skipped: Counter[SkipReason] = field(default_factory=Counter)
    problems: list[RowProblem] = field(default_factory=list)
    listed: list[ListedRow] = field(default_factory=list)
    unlisted: int = 0
    # Each sampled recipient's step 1 with its sender, then its follow-ups' messages.
    samples: list[tuple[Message, SenderSettings, tuple[Message, ...]]] = field(default_factory=list)
    message_warnings: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # label -> n, row, note
    moved: int = 0  # rows whose key the ledger mailed at another address (`RowCheck.mailed_at`)
    first_moved: RowCheck | None = None

    def lists(self, *, always: bool = False) -> bool:
        """Whether the next row goes into the listing (the first `index_rows` rows, and every row
        `always` names); counted as unlisted otherwise. Asked before its `ListedRow` is made: most rows
        of a long list have none."""
        if always or len(self.listed) - len(self.problems) < self.index_rows:
            return True
        self.unlisted += 1
        return False


def run_preview(
    manifest: Manifest,
    *,
    secrets: Sequence[bytes] | None,
    skip_invalid: bool,
    sample: int,
    ledger: Ledger | None,
    api_uri: str,
    clock: Clock,
    index_rows: int = INDEX_ROWS,
    batch_rows: int = BATCH_ROWS,
) -> PreviewReport:
    """Check and render every row as a run would, keeping what the report needs; nothing is sent.

    File-level faults raise as in a run; row-level problems are collected in the report.
    """
    started_at = clock.now()
    # Rows sent already are not rendered: no run sends them again (nor renders them: `Reuse`).
    reuse = Reuse.NONE if ledger is None else Reuse.SENT_ROWS
    pipeline = check_rows(manifest, secrets=secrets, ledger=ledger, reuse=reuse)
    scan, composer = pipeline.scan, pipeline.composer
    source = scan.source.name
    tally = _Tally(index_rows=max(0, index_rows), samples_wanted=max(0, sample))
    with collecting_less():
        for batch in checked_rows(pipeline, secrets, summarise_for_preview, size=batch_rows):
            rendered = ((row, isinstance(summary, DataError)) for row, summary in batch)
            # A run keeps these skipped: no problem.
            earlier = frozenset() if skip_invalid else find_skipped_invalid(ledger, rendered)
            for row, summary in batch:
                skipped = _SKIPPED_EARLIER if row.row in earlier else _SKIPPED if skip_invalid else None
                if row.job is None:
                    _tally_unsent(tally, row.checked, manifest, source, skipped=skipped)
                elif isinstance(summary, DataError):
                    issues = (_render_issue(summary, source),)
                    _tally_problem(tally, row.checked, manifest, issues, skipped)
                elif summary is None:  # not rendered: sent already
                    _tally_sent_before(tally, row, row.job, row.settled or "")
                else:
                    _tally_message(tally, pipeline, row, summary)
    loader = composer.attachment_loader  # samples carry their real files (a run reads them at send time)
    samples = _samples(manifest, tally.samples, loader, api_uri=api_uri, clock=clock)
    return PreviewReport(
        campaign=manifest.campaign.name,
        manifest=manifest.path,
        source=source,
        rows=scan.row_count,
        to_send=tally.to_send,
        already_done=dict(tally.done),
        skipped=dict(tally.skipped),
        problems=tuple(tally.problems),
        senders=_sender_plans(manifest, tally.per_sender, _used_24h(manifest, ledger, clock), started_at),
        samples=samples,
        warnings=(
            *_warnings(manifest, tally.per_sender),
            *pipeline.store_notes,
            *describe_key_only_entries(manifest.recipients, scan.suppression),
            *_message_warnings(tally),
            *_moved_warnings(tally),
        ),
        listed=tuple(tally.listed),
        listed_all=tally.unlisted == 0,
        started_at=started_at,
        skip_invalid=skip_invalid,
        steps=_step_plans(manifest),
    )


def _step_plans(manifest: Manifest) -> tuple[StepPlan, ...]:
    if not manifest.followups:
        return ()
    first = StepPlan(FIRST_STEP, None, "")
    return (first, *(StepPlan(step.name, step.after, _stops(step)) for step in manifest.followups))


def _stops(step: FollowupSettings) -> str:
    return f"stops on {', '.join(step.stop_on)}; auto-replies: {step.auto_replies}"


def _tally_unsent(
    tally: _Tally, checked: CheckedRow, manifest: Manifest, source: str, *, skipped: str | None
) -> None:
    if checked.problems:
        issues = tuple(_audience_issue(problem, source) for problem in checked.problems)
        _tally_problem(tally, checked, manifest, issues, skipped)
        return
    skip = checked.skip
    assert skip is not None  # a checked row is a recipient, a skip, or has problems
    tally.skipped[skip.reason] += 1
    if tally.lists():
        name = _cell(checked.fields, manifest.recipients.name_column)
        tally.listed.append(ListedRow(checked.row, skip.email, name, "", "", skip.reason.value, skip.detail))


def _tally_problem(
    tally: _Tally, checked: CheckedRow, manifest: Manifest, issues: tuple[Issue, ...], skipped: str | None
) -> None:
    """A row that fails its checks: a problem (`skipped` None), skipped by --skip-invalid (still shown
    as a problem, for fixing), or skipped by an earlier run's --skip-invalid (a run keeps it skipped)."""
    if skipped is not None:
        tally.skipped[SkipReason.INVALID] += 1
    settings = manifest.recipients
    email = _cell(checked.fields, settings.email_column)
    if skipped != _SKIPPED_EARLIER:
        cells = tuple((str(column), str(value)) for column, value in checked.fields.items())
        tally.problems.append(RowProblem(checked.row, email, cells, issues))
    elif not tally.lists():
        return
    detail = "; ".join(f"{issue.where}: {issue.message}" for issue in issues)
    name = _cell(checked.fields, settings.name_column)
    state = STATE_INVALID if skipped is None else f"{STATE_INVALID} ({skipped})"
    tally.listed.append(ListedRow(checked.row, email, name, "", "", state, detail))  # every problem is listed


def _samples(
    manifest: Manifest,
    wanted: Sequence[tuple[Message, SenderSettings, tuple[Message, ...]]],
    loader: AttachmentLoader | None,
    *,
    api_uri: str,
    clock: Clock,
) -> tuple[Sample, ...]:
    """The sampled messages with their payloads and requests, each recipient's follow-ups with it."""
    flat = [
        (load_message_attachments(message, loader) if number == 0 else message, sender)
        for first, sender, followups in wanted
        for number, message in enumerate((first, *followups))
    ]
    requests = iter(capture_requests(flat, api_uri=api_uri, clock=clock))
    messages = iter(message for message, _ in flat)
    samples = []
    for number, (_, _, followups) in enumerate(wanted, start=1):
        first, request = next(messages), next(requests)  # captured in the order flattened: step 1 first
        steps = []
        for step, _ in zip(manifest.followups, followups, strict=True):
            message = next(messages)
            sample = Sample(number, message, build_send_payload(message), next(requests), step.name)
            steps.append(replace(sample, after=step.after, stops=_stops(step)))
        samples.append(Sample(number, first, build_send_payload(first), request, steps=tuple(steps)))
    return tuple(samples)


def _tally_sent_before(tally: _Tally, row: RowCheck, job: Job, settled: str) -> None:
    tally.done[settled] += 1
    recipient = job.recipient
    detail = _tally_moved(tally, row)
    if tally.lists():
        name = recipient.address.name or ""
        state = f"already {settled}"
        listed = ListedRow(recipient.row, recipient.address.email, name, job.sender, "", state, detail)
        tally.listed.append(listed)


def _tally_moved(tally: _Tally, row: RowCheck) -> str:
    """Count a row whose key the ledger mailed at another address; what its listing says of it."""
    if row.mailed_at is None:
        return ""
    tally.moved += 1
    tally.first_moved = row if tally.first_moved is None else tally.first_moved
    return f"mailed at {row.mailed_at}, not at this address"


def _moved_warnings(tally: _Tally) -> tuple[str, ...]:
    return () if tally.first_moved is None else (describe_mailed_elsewhere(tally.moved, tally.first_moved),)


# What the preview keeps of a rendered row's step 1: (its subject, its warnings), each warning from
# `MESSAGE_CHECKS` (what is wrong, said of every such message; this message's note). A plain tuple: a
# worker of the parallel check pickles one for every row, and a named tuple pickles through two calls of
# Python code (`__getnewargs__` here, `__new__` in the caller), 1.1 µs a row of the 1.2 it costs.
MessageLooks = tuple[str, tuple[tuple[str, str], ...]]


def summarise_for_preview(rendered: Rendered) -> DataError | MessageLooks:
    """A rendered row as the preview tallies it (in a worker of the parallel check, or here)."""
    if isinstance(rendered, DataError):
        return rendered
    message = rendered[0]
    return message.subject, tuple(found for check in MESSAGE_CHECKS if (found := check(message)))


def _tally_message(tally: _Tally, pipeline: RowPipeline, row: RowCheck, looks: MessageLooks) -> None:
    job = row.job
    assert job is not None  # only a row to mail is rendered
    recipient = job.recipient
    subject, warnings = looks
    for label, note in warnings:
        count, first_row, first_note = tally.message_warnings.get(label, (0, recipient.row, note))
        tally.message_warnings[label] = (count + 1, first_row, first_note)
    number = None
    detail = _tally_moved(tally, row)
    if row.settled is not None:
        tally.done[row.settled] += 1
        state = f"already {row.settled}"
    else:
        tally.to_send += 1
        tally.per_sender[job.sender] += 1
        state = STATE_SEND
        if len(tally.samples) < tally.samples_wanted:  # rendered again here: the few samples only
            rendered = pipeline.render(row)
            assert rendered.message is not None  # it rendered once; rendering is pure
            tally.samples.append((rendered.message, pipeline.manifest.sender(job.sender), rendered.followups))
            number = len(tally.samples)
    if tally.lists(always=number is not None):
        name = recipient.address.name or ""
        notes = tuple(note for _, note in warnings)
        listed = ListedRow(
            recipient.row, recipient.address.email, name, job.sender, subject, state, detail, notes, number
        )
        tally.listed.append(listed)


def _cell(fields: Mapping[str, object], column: str | None) -> str:
    return "" if column is None else str(fields.get(column, "")).strip()


def _audience_issue(problem: Problem, source: str) -> Issue:
    return Issue(problem.where, problem.message, problem.describe(source))


def _render_issue(error: DataError, source: str) -> Issue:
    """A render or header error as an issue: the variable or field it names, and run's one line."""
    return Issue(error.where, error.detail, f"{source} {error}")


def _used_24h(manifest: Manifest, ledger: Ledger | None, clock: Clock) -> dict[str, int]:
    """Recipients each sender mailed in the last 24 h, per the ledger (a budget already spent)."""
    if ledger is None:
        return {}
    since = clock.now().timestamp() - DAY_S
    return {
        sender.name: ledger.sent_recipients_total(
            sender.name, since, via=sender.mailbox, address=sender.mailbox_address
        )
        for sender in manifest.senders
    }


def _sender_plans(
    manifest: Manifest, per_sender: Mapping[str, int], used_24h: Mapping[str, int], now: datetime
) -> tuple[SenderPlan, ...]:
    schedule = build_schedule(manifest.senders, remaining=per_sender, used_24h=used_24h)
    timing = {plan.name: plan for plan in schedule.senders}
    plans = tuple(
        SenderPlan(
            name=sender.name,
            route=sender.route,
            email=sender.email,
            provider=sender.provider,
            messages=per_sender.get(sender.name, 0),
            rate_per_s=sender.rate_per_s,
            burst=sender.burst,
            per_day=sender.per_day,
            concurrency=sender.concurrency,
            used_24h=used_24h.get(sender.name, 0),
            next_24h=timing[sender.name].next_24h,
            duration_s=timing[sender.name].duration_s,
        )
        for sender in manifest.senders
    )
    return tuple(_in_window(manifest, plan, now) for plan in plans)


def _in_window(manifest: Manifest, plan: SenderPlan, now: datetime) -> SenderPlan:
    """`plan` with its sender's window: when it opens next, and how it stretches the finish."""
    holidays = manifest.campaign.holidays
    window = plan_window(manifest.sender(plan.name), now=now, duration_s=plan.duration_s, holidays=holidays)
    return plan if window is None else replace(plan, window=window)


# --- warnings -----------------------------------------------------------------
# Campaign-wide checks go in `_warnings` (one line per check module); per-message checks are
# in campaign.render.MESSAGE_CHECKS.


def _warnings(manifest: Manifest, per_sender: Mapping[str, int]) -> tuple[str, ...]:
    """Every campaign-wide warning, given the messages each sender would send."""
    found: list[str] = []
    if manifest.unsubscribe is None:
        found.append(
            "no [unsubscribe] section: messages carry no List-Unsubscribe header "
            "(Gmail and Yahoo require one-click unsubscribe from bulk senders)"
        )
    found.extend(build_quota_warnings(manifest.senders, per_sender))
    found.extend(build_unsubscribe_warnings(manifest, per_sender))
    return tuple(found)


def _message_warnings(tally: _Tally) -> tuple[str, ...]:
    return tuple(
        f"{label}: {count} message{'s' if count != 1 else ''} (first: row {row}, {note})"
        for label, (count, row, note) in tally.message_warnings.items()
    )
