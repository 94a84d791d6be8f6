"""Everything the user sees on a terminal: progress, tables, summaries, errors (rich).

Takes data from the engine and prints it; decides nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from campaign.clock import Clock
from campaign.dispatch import DispatchEvent, DispatchResult, EventKind
from campaign.manifest import SenderSettings
from campaign.preview import PreviewReport

__all__ = [
    "SendProgress",
    "format_duration",
    "print_checked",
    "print_deliveries",
    "print_error",
    "print_json",
    "print_preview",
    "print_run_summary",
    "print_status",
]


def print_error(console: Console, message: str) -> None:
    """One line, red, on the error console."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def print_json(console: Console, data: Mapping[str, Any]) -> None:
    """Machine-readable output: plain JSON, no colour."""
    console.file.write(json.dumps(data, indent=2, default=str) + "\n")


def format_duration(seconds: float) -> str:
    """A short human duration: '45 s', '12 min', '3 h 5 min', '2 days 4 h'."""
    if seconds < 60:
        return f"{max(seconds, 0):.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} day{'s' if days > 1 else ''} {hours} h"


class _RateColumn(ProgressColumn):
    """Messages per second, as measured over the last few seconds."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:5.1f}/s")


class _StateColumn(ProgressColumn):
    """What a sender is doing: budget left, or a live countdown while it is parked."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._clock = clock

    def render(self, task: Task) -> Text:
        until = task.fields.get("parked_until")
        if until is not None:
            left = (until - self._clock.now()).total_seconds()
            return Text.from_markup(f"[yellow]parked, {format_duration(left)} left (until {_local(until)})")
        budget = task.fields.get("budget_left")
        text = task.fields.get("detail", "")
        if budget is not None:
            text = f"{budget} left today  {text}"
        return Text.from_markup(text)


class SendProgress:
    """A live progress display fed with dispatch events: an overall bar and one line per sender."""

    def __init__(
        self, console: Console, *, total: int, senders: Sequence[SenderSettings], clock: Clock
    ) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            _StateColumn(clock),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            get_time=clock.monotonic,
        )
        self._overall = self._progress.add_task("[bold]all senders", total=total, detail="")
        share = {sender.name: 0 for sender in senders}
        self._senders: dict[str, TaskID] = {
            name: self._progress.add_task(f"  {name}", total=None, detail="") for name in share
        }
        self._failed = dict.fromkeys(share, 0)
        self._budget_left: dict[str, int | None] = dict.fromkeys(share)

    def __enter__(self) -> SendProgress:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._progress.stop()

    def set_share(self, sender: str, messages: int, *, budget_left: int | None = None) -> None:
        """How many messages `sender` has to send this run, and how many recipients its budget allows."""
        self._budget_left[sender] = budget_left
        self._progress.update(self._senders[sender], total=messages, budget_left=budget_left)

    def handle(self, event: DispatchEvent) -> None:
        """Update the display for one event."""
        task = self._senders[event.sender]
        if event.kind == EventKind.SENT:
            self._progress.advance(task)
            self._progress.advance(self._overall)
            left = self._budget_left[event.sender]
            if left is not None:
                self._budget_left[event.sender] = left - 1
                self._progress.update(task, budget_left=left - 1)
        elif event.kind in (EventKind.FAILED, EventKind.UNKNOWN):
            self._failed[event.sender] += 1
            self._progress.advance(task)
            self._progress.advance(self._overall)
            self._progress.update(task, detail=f"[red]{self._failed[event.sender]} not sent")
        elif event.kind == EventKind.PARKED and event.until is not None:
            self._progress.update(task, parked_until=event.until)
        elif event.kind == EventKind.RESUMED:
            self._progress.update(task, parked_until=None, detail="")
        elif event.kind == EventKind.AUTH_REFUSED:
            self._progress.update(task, detail="[red]credentials refused")
        elif event.kind == EventKind.THROTTLED:
            self._progress.update(task, detail="[yellow]throttled, slowing down")


def print_checked(console: Console, *, source: str, to_send: int, skipped: Mapping[str, int]) -> None:
    """The preflight tally before sending: e.g. `recipients.csv: 5 to send, 1 duplicate, 1 suppressed`."""
    parts = [f"{to_send} to send", *(f"{count} {reason}" for reason, count in sorted(skipped.items()))]
    console.print(f"{escape(source)}: checked, " + ", ".join(parts), soft_wrap=True)


def print_run_summary(
    console: Console,
    result: DispatchResult,
    *,
    states: Mapping[str, int],
    resume_command: str,
) -> None:
    """What this run did, what is not done, and the exact command to continue."""
    console.print(f"This run: {result.sent} sent, {result.failed} failed, {result.unknown} unknown.")
    ledger = ", ".join(f"{count} {state}" for state, count in states.items() if count) or "empty"
    done = not any(states.get(state, 0) for state in ("pending", "inflight", "unknown"))
    console.print(f"Ledger: {ledger}" + (" (every recipient settled)." if done else "."))
    for sender, until in sorted(result.parked.items()):
        console.print(
            f"sender [bold]{escape(sender)}[/] is at its limit; it can send again at {_local(until)}"
        )
    for sender in result.auth_refused:
        console.print(
            f"sender [bold]{escape(sender)}[/]: the API refused the credentials; "
            "check the API key and that the grant is valid"
        )
    if result.limit_reached:
        console.print("stopped at --limit")
    if result.remaining or states.get("pending", 0) or states.get("inflight", 0):
        console.print(f"Not done. Continue with: [bold]{escape(resume_command)}[/]", soft_wrap=True)
    if states.get("failed", 0) or states.get("unknown", 0):
        console.print("Some recipients were not sent: `campaign status` shows why.")


def print_deliveries(console: Console, deliveries: Sequence[tuple[str, str, str]], outbox: Path) -> None:
    """The sandbox's record of what it accepted: (sender, to, subject) per message."""
    if not deliveries:
        console.print("The sandbox received no messages this run.")
        return
    table = Table(title=f"Sent to the sandbox ({len(deliveries)} messages)", title_justify="left")
    for column in ("#", "from sender", "to", "subject"):
        table.add_column(column)
    for number, (sender, to, subject) in enumerate(deliveries, start=1):
        table.add_row(str(number), escape(sender), escape(to), escape(subject))
    console.print(table)
    where = escape(str(outbox))
    console.print(f"Each message's JSON payload and HTML body: [bold]{where}[/]", soft_wrap=True)


def print_preview(console: Console, report: PreviewReport, *, out_files: Sequence[Path] = ()) -> None:
    """The dry-run report: counts, senders and timing, warnings, problems, sample messages."""
    console.print(f"[bold]{escape(report.campaign)}[/]: dry run, nothing sent")
    counts = Table(show_header=False, title="Recipients", title_justify="left")
    counts.add_row("to send", str(report.to_send))
    counts.add_row("already done (per the ledger)", str(report.already_done))
    for reason, count in sorted(report.skipped.items()):
        counts.add_row(f"skipped: {reason.value}", str(count))
    counts.add_row("problems", str(len(report.problems)))
    console.print(counts)
    senders = Table(title="Senders", title_justify="left")
    for column in ("sender", "mailbox", "messages", "pace", "per day", "in flight", "takes"):
        senders.add_column(column)
    for sender in report.senders:
        senders.add_row(
            escape(sender.name),
            escape(sender.email or sender.grant_id),
            str(sender.messages),
            f"{sender.rate_per_s:g}/s",
            "-" if sender.per_day is None else str(sender.per_day),
            str(sender.concurrency),
            format_duration(sender.duration_s),
        )
    console.print(senders)
    console.print(f"Estimated time to send everything: {format_duration(report.duration_s)}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    for problem in report.problems:
        console.print(f"[red]problem:[/] {escape(problem)}", soft_wrap=True)
    for sample in report.samples:
        message = sample.message
        console.rule(f"{escape(message.to[0].email)} (row {message.row}, sender {escape(message.sender)})")
        console.print(f"Subject: {escape(message.subject)}")
        for name, value in message.headers:
            console.print(f"{escape(name)}: {escape(value)}", soft_wrap=True)
        body = message.text if message.text is not None else message.html or ""
        console.print(escape(body[:600]) + (" …" if len(body) > 600 else ""))
    if out_files:
        console.print(f"Wrote {len(out_files)} files to {escape(str(out_files[0].parent))}")


def print_status(console: Console, status: Mapping[str, Any]) -> None:
    """The status table of a campaign."""
    if not status["started"]:
        console.print(f"[bold]{escape(status['campaign'])}[/]: not started (no ledger yet)")
        return
    done = "done" if status["done"] else "not done"
    console.print(f"[bold]{escape(status['campaign'])}[/]: {done}, {status['total']} recipients")
    if not status["done"]:
        senders = len(status["senders"])
        console.print(
            f"{status['per_day']:,}/day over {senders} sender{'s' if senders > 1 else ''}: "
            f"done in ~{format_duration(status['eta_s'])} at the current limits"
        )
    table = Table(
        title="By sender (24 h: recipients mailed in the last day; left: of per_day)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    states = list(status["states"])
    for column in ("sender", *states, "24 h", "left"):
        table.add_column(column, no_wrap=True, justify="left" if column == "sender" else "right")
    for name, sender in status["senders"].items():
        left = sender["budget_left"]
        table.add_row(
            escape(name),
            *(str(sender["states"][state]) for state in states),
            str(sender["sent_last_24h"]),
            "-" if left is None else str(left),
        )
    table.add_row("[bold]all", *(f"[bold]{status['states'][state]}" for state in states), "", "")
    console.print(table)
    for reason, count in status["skipped"].items():
        console.print(f"skipped ({escape(reason)}): {count}")
    for cause, count in status["errors"].items():
        console.print(f"[red]not sent[/] ({escape(cause)}): {count}")


def _local(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
