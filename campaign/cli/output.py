"""Everything the user sees on a terminal: tables, summaries, errors (rich).

Takes data from the engine and prints it; decides nothing. The live progress display of a
run is `campaign.cli.progress`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from campaign.timetext import format_duration, format_local_time

if TYPE_CHECKING:  # for annotations only: commands that print no preview or run need not load those engines
    from campaign.dispatch import DispatchResult
    from campaign.manifest import Manifest
    from campaign.nextsteps import NextStep
    from campaign.plan import WindowPlan
    from campaign.preview import PreviewReport
    from campaign.reconcile import ReconcileReport
    from campaign.report import WrittenReport
    from campaign.status import Status
    from campaign.testing import FakeNylas

__all__ = [
    "format_duration",
    "plural",
    "print_checked",
    "print_deliveries",
    "print_error",
    "print_json",
    "print_next_steps",
    "print_preview",
    "print_reconciled",
    "print_report_written",
    "print_retried",
    "print_run_summary",
    "print_status",
    "print_test_sent",
    "show",
]

# C0 and C1 controls (ESC starts terminal sequences), and the bidirectional overrides that make a
# terminal show text in another order than it is.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_NAMES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
VALUE_WIDTH = 200  # characters of one value on a terminal; a longer one is cut with "…"
_ERROR_WIDTH = 2_000
_BODY_WIDTH = 600


def show(value: object, *, width: int = VALUE_WIDTH, lines: bool = False) -> str:
    """A value from a list, a store or an API answer, ready to print: control characters spelled out
    (ESC as `\\x1b`, a line break as `\\n` unless `lines`), at most `width` characters (then `…`),
    and rich markup escaped, so nothing in it can move the cursor, recolour or restyle the terminal.
    """
    text = str(value)
    cut = len(text) > width
    text = _CONTROLS.sub(_spell_control if not lines else _spell_control_but_newline, text[: width + 1])
    if cut or len(text) > width:
        text = text[:width].rstrip() + "…"
    return escape(text)


def _spell_control(found: re.Match[str]) -> str:
    char = found.group(0)
    return _CONTROL_NAMES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def _spell_control_but_newline(found: re.Match[str]) -> str:
    return "\n" if found.group(0) == "\n" else _spell_control(found)


def plural(count: int, one: str, many: str | None = None) -> str:
    """The word that goes with `count`: `one` for 1, else `many` (`one` + "s" unless given), e.g.
    f"{n:,} {plural(n, 'row')} {plural(n, 'is', 'are')} pending"."""
    if count == 1:
        return one
    return one + "s" if many is None else many


def print_error(console: Console, message: str) -> None:
    """One line, red, on the error console."""
    console.print(f"[bold red]error:[/] {show(message, width=_ERROR_WIDTH)}", highlight=False, soft_wrap=True)


def print_json(console: Console, data: Mapping[str, Any]) -> None:
    """Machine-readable output: plain JSON, no colour."""
    console.file.write(json.dumps(data, indent=2, default=str) + "\n")


def print_checked(
    console: Console,
    *,
    source: str,
    to_send: int,
    skipped: Mapping[str, int],
    unchanged: bool = False,
    appended: int = 0,
    notes: Sequence[str] = (),
) -> None:
    """The preflight tally before sending: e.g. `recipients.csv: 5 to send, 1 duplicate, 1 suppressed`.

    `unchanged`: the list was not checked again, because nothing changed since a run that checked it;
    `appended`: only the rows added at its end since then were checked (how many); `notes`: what the
    check found that the user should know (they hold list values: shown as such).
    """
    parts = [f"{to_send:,} to send", *(f"{count:,} {reason}" for reason, count in sorted(skipped.items()))]
    how = "unchanged since it was checked" if unchanged else "checked"
    if appended:
        how = f"checked the {appended:,} {plural(appended, 'row')} added at its end"
    console.print(f"{escape(source)}: {how}, " + ", ".join(parts), soft_wrap=True)
    print_notes(console, notes)


def print_notes(console: Console, notes: Sequence[str]) -> None:
    """What a command found that the user should know, one `note:` line each, as `print_checked` shows
    a plan's."""
    for note in notes:
        console.print(f"[yellow]note:[/] {show(note, width=_ERROR_WIDTH)}", soft_wrap=True)


def print_run_summary(
    console: Console,
    result: DispatchResult,
    *,
    states: Mapping[str, int],
    next_steps: Sequence[NextStep],
) -> None:
    """What this run did, what is not done, and the exact commands to continue (`next_steps`)."""
    console.print(f"This run: {result.sent:,} sent, {result.failed:,} failed, {result.unknown:,} unknown.")
    ledger = ", ".join(f"{count:,} {state}" for state, count in states.items() if count) or "empty"
    done = not any(states.get(state, 0) for state in ("pending", "inflight", "unknown"))
    console.print(f"Ledger: {ledger}" + (" (every recipient settled)." if done else "."))
    for sender, until in sorted(result.parked.items()):
        when = format_local_time(until)
        console.print(f"sender [bold]{escape(sender)}[/] is at its limit; it can send again at {when}")
    for sender, until in sorted(result.closed.items()):
        when = format_local_time(until)
        console.print(f"sender [bold]{escape(sender)}[/]'s send window is shut; it opens at {when}")
    if result.held:
        one = result.held == 1
        console.print(
            f"{result.held} {plural(result.held, 'follow-up')} held back: "
            f"{'its' if one else 'their'} reply lookup failed ({'it is' if one else 'they are'} never sent "
            f"blind); {'it is' if one else 'they are'} looked up again on the next run"
        )
    from campaign.nylas import is_trial_app_refusal  # loaded by the run already: no cost to other commands

    for sender in result.auth_refused:
        said = result.refusals.get(sender) or ""
        words = f" ({show(said)})" if said else ""
        if is_trial_app_refusal(said):
            what, fix = (
                "refused the application",
                "a trial (Sandbox) application may not track: turn \\[message] tracking off",
            )
        else:
            what = "refused the credentials or knows no such grant"
            fix = "check the API key and that the grant is valid (a disconnected mailbox must be reconnected)"
        console.print(f"sender [bold]{escape(sender)}[/]: the API {what}{words}; {fix}", soft_wrap=True)
    for sender, error in sorted(result.unreachable.items()):
        console.print(
            f"sender [bold]{escape(sender)}[/] stopped: {show(error)}. "
            "Its rows stay pending, for `campaign resume` once the API can be reached",
            soft_wrap=True,
        )
    for sender, error in sorted(result.rejecting.items()):
        console.print(
            f"sender [bold]{escape(sender)}[/] stopped: the API refused its last messages, one after "
            f"another (its stop_after_rejections; the last: {show(error)}). Its rows not tried stay pending: "
            "fix what the API says, then retry the failed rows and resume",
            soft_wrap=True,
        )
    if result.limit_reached:
        console.print("stopped at --limit")
    if result.stopped:
        console.print("Interrupted: no send was started after Ctrl-C; the sends in flight were recorded.")
    print_next_steps(console, next_steps)


def print_deliveries(
    console: Console, fake: FakeNylas, manifest: Manifest, outbox: Path, *, first: int
) -> None:
    """What the sandbox received (sender, recipient, subject), numbered from `first` as its files in
    `outbox` are."""
    grants = {sender.route: sender.name for sender in manifest.senders}
    deliveries = [
        (grants.get(d.grant_id, d.grant_id), d.payload["to"][0]["email"], d.payload.get("subject", ""))
        for d in fake.deliveries
    ]
    if not deliveries:
        console.print("The sandbox received no messages this run.")
        return
    sent = len(deliveries)
    table = Table(title=f"Sent to the sandbox ({sent} {plural(sent, 'message')})", title_justify="left")
    for column in ("#", "from sender", "to", "subject"):
        table.add_column(column)
    for number, (sender, to, subject) in enumerate(deliveries, start=first):
        table.add_row(f"{number:04d}", show(sender), show(to), show(subject))
    console.print(table)
    where = escape(str(outbox))
    console.print(f"Each message's JSON payload and HTML body: [bold]{where}[/]", soft_wrap=True)


def print_preview(console: Console, report: PreviewReport, *, site: Path | None = None) -> None:  # noqa: C901 - one section after another of the preview summary; each is an if
    """The dry-run report: counts, senders and schedule, warnings, failing rows, the first messages."""
    console.print(f"[bold]{escape(report.campaign)}[/]: dry run: nothing sent, no ledger written")
    counts = Table(show_header=False, title="Recipients", title_justify="left")
    counts.add_row(f"rows in {escape(report.source)}", f"{report.rows:,}")
    counts.add_row("to send", f"[bold]{report.to_send:,}")
    for state, count in sorted(report.already_done.items()):
        counts.add_row(f"already {escape(state)} (per the ledger)", f"{count:,}")
    for reason, count in sorted(report.skipped.items()):
        counts.add_row(f"skipped: {reason.value}", f"{count:,}")
    bad = len(report.problems)
    counts.add_row("rows with problems", f"[red]{bad:,}" if bad else "0")
    console.print(counts)
    senders = Table(title="Senders (effective limits)", title_justify="left")
    for column in (
        "sender",
        "mailbox",
        "messages",
        "pace",
        "burst",
        "per day",
        "in flight",
        "left 24 h",
        "takes",
    ):
        senders.add_column(column, justify="left" if column in ("sender", "mailbox") else "right")
    for plan in report.senders:
        pace = f"{plan.rate_per_s:g}/s" if plan.rate_per_s >= 1 else f"{plan.rate_per_s * 60:g}/min"
        left = "-" if plan.per_day is None else f"{max(0, plan.per_day - plan.used_24h):,}"
        senders.add_row(
            escape(plan.name),
            escape(plan.email or plan.route) + (f" ({escape(plan.provider)})" if plan.provider else ""),
            f"{plan.messages:,}",
            pace,
            str(plan.burst),
            "-" if plan.per_day is None else f"{plan.per_day:,}",
            str(plan.concurrency),
            left,
            format_duration(plan.duration_s),
        )
    console.print(senders)
    console.print(
        f"Estimated time to send everything: [bold]{format_duration(report.duration_s)}[/]"
        + (f" (started now, done about {format_local_time(report.finishes_at)})" if report.to_send else "")
    )
    _print_preview_windows_and_steps(console, report)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {show(warning, width=_ERROR_WIDTH)}", soft_wrap=True)
    if report.problems:
        _print_problems(console, report, site=site)
    for sample in report.samples:
        message = sample.message
        console.rule(f"{show(message.to[0].email)} (row {message.row}, sender {show(message.sender)})")
        if message.from_ is not None:
            console.print(f"From: {show(message.from_.name or '')} <{show(message.from_.email)}>")
        console.print(f"Subject: {show(message.subject, width=_ERROR_WIDTH)}", soft_wrap=True)
        for name, value in message.headers:
            console.print(f"{show(name)}: {show(value, width=_ERROR_WIDTH)}", soft_wrap=True)
        # The text a reader sees: the text body, else the HTML body as text (the site shows the HTML).
        body = message.text if message.text is not None else _html_as_text(message.html or "")
        console.print(show(body.rstrip(), width=_BODY_WIDTH, lines=True))
    if site is not None:
        console.print(f"Preview site (open it in a browser): [bold]{escape(str(site))}[/]", soft_wrap=True)


def _print_preview_windows_and_steps(console: Console, report: PreviewReport) -> None:
    for plan in report.senders:
        if plan.window is not None:
            _print_window(console, plan.name, plan.window)
    if report.steps:
        names = ", ".join(escape(step.name) for step in report.steps)
        console.print(f"Steps: {names} (each follow-up a reply in the thread)")
        for step in report.steps[1:]:
            after, stops = escape(step.after or ""), escape(step.stops)
            console.print(f"  {escape(step.name)}: {after} after the step before; {stops}")


def _html_as_text(html: str) -> str:
    from campaign.render import build_text_from_html

    return build_text_from_html(html)


_PROBLEMS_SHOWN = 50


def _print_problems(console: Console, report: PreviewReport, *, site: Path | None) -> None:
    verdict = "skipped with --skip-invalid" if report.skip_invalid else "a run stops before sending (exit 65)"
    table = Table(
        title=f"Rows with problems: {len(report.problems):,} ({verdict})",
        title_justify="left",
        title_style="red",
    )
    for column in ("row", "address", "column / variable", "problem and fix"):
        table.add_column(column, overflow="fold")
    for problem in report.problems[:_PROBLEMS_SHOWN]:
        for issue in problem.issues:
            table.add_row(str(problem.row), show(problem.email), show(issue.where), show(issue.message))
    console.print(table)
    more = len(report.problems) - _PROBLEMS_SHOWN
    if more > 0:
        where = "the preview site" if site is None else escape(str(site))
        rows = plural(more, "row")
        console.print(f"… and {more:,} more {rows} with problems: {where} lists every one (so does --json)")


def print_test_sent(
    console: Console, *, message_id: str, to: str, sender: str, row: int, recipient: str
) -> None:
    """What `send-test` did: the Nylas message id (alone on the last line, for scripts)."""
    console.print(
        f"Sent row {row} ({show(recipient)}) as a test to {show(to)} from sender {show(sender)}; "
        "the ledger is unchanged.",
        soft_wrap=True,
    )
    console.print(
        f"[yellow]note:[/] its unsubscribe link is row {row}'s real one: "
        f"using it unsubscribes {show(recipient)}.",
        soft_wrap=True,
    )
    console.file.write(f"{message_id}\n")


def print_status(console: Console, status: Status) -> None:
    """The status table of a campaign."""
    if not status.started:
        why = (
            "no ledger yet"
            if status.ledger is None
            else "no plan recorded yet: a run is checking the list, or stopped before it recorded the "
            "plan, which the next run checks again"
        )
        console.print(f"[bold]{escape(status.campaign)}[/]: not started ({why})", soft_wrap=True)
        return
    done = "done" if status.done else "not done"
    if status.steps:  # a row per (recipient, step)
        people = sum(status.steps[0].states.values())
        steps = len(status.steps)
        console.print(
            f"[bold]{escape(status.campaign)}[/]: {done}, {people} {plural(people, 'recipient')}, "
            f"{status.total} {plural(status.total, 'message')} over {steps} {plural(steps, 'step')}"
        )
    else:
        total = status.total
        console.print(f"[bold]{escape(status.campaign)}[/]: {done}, {total} {plural(total, 'recipient')}")
    if not status.done and status.schedule is not None:
        senders = len(status.senders)
        console.print(
            f"{status.schedule.per_day:,}/day over {senders} {plural(senders, 'sender')}: "
            f"done in ~{format_duration(status.schedule.duration_s)} at the current limits"
        )
    table = Table(
        title="By sender (24 h: recipients mailed in the last day; left: of per_day)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    states = list(status.states)
    for column in ("sender", *(state.value for state in states), "24 h", "left"):
        table.add_column(column, no_wrap=True, justify="left" if column == "sender" else "right")
    for sender in status.senders:
        left = sender.budget_left
        table.add_row(
            escape(sender.name),
            *(str(sender.states[state]) for state in states),
            str(sender.sent_last_24h),
            "-" if left is None else str(left),
        )
    table.add_row("[bold]all", *(f"[bold]{status.states[state]}" for state in states), "", "")
    console.print(table)
    _print_windows(console, status)
    if status.steps:
        _print_steps(console, status)
    for reason, count in status.skipped.items():
        console.print(f"skipped ({escape(reason)}): {count}")
    for label, causes in (("[red]not sent[/]", status.errors), ("[yellow]to retry[/]", status.waiting)):
        for error in causes:
            last = f" (latest: {show(error.latest)})" if error.latest else ""
            console.print(f"{label} ({show(error.cause)}): {error.count}{last}", soft_wrap=True)
    _print_workers(console, status)
    _print_engagement(console, status)
    print_next_steps(console, status.next_steps)


def _print_engagement(console: Console, status: Status) -> None:
    """What came back for the messages sent: opens, clicks and replies; bounces."""
    if (seen := status.engagement) is not None and seen.sent:
        from campaign.status import OPENS_NOTE  # loaded by the commands that print a status only

        console.print(
            f"opened: {seen.opened} of {seen.sent} sent ({seen.opened / seen.sent:.1%}), clicked: "
            f"{seen.clicked} ({seen.clicked / seen.sent:.1%}), replied: {seen.replied}; {escape(OPENS_NOTE)}",
            soft_wrap=True,
        )
    if (bounces := status.bounces) is not None and bounces.sent:
        bounced = bounces.hard + bounces.soft
        console.print(
            f"bounced: {bounced} of {bounces.sent} sent ({bounced / bounces.sent:.1%}): "
            f"{bounces.hard} hard, {bounces.soft} soft (`campaign report` says which)",
            soft_wrap=True,
        )


def _print_workers(console: Console, status: Status) -> None:
    """A campaign shared in PostgreSQL: each worker, the grants it holds, its last heartbeat."""
    for worker in status.workers or ():
        held = ", ".join(worker.grants) or "no grant"
        beat = format_local_time(datetime.fromtimestamp(worker.heartbeat_at, UTC))
        alive = "" if worker.live else " [yellow](no heartbeat: gone)[/]"
        console.print(
            f"worker {escape(worker.id)} on {show(worker.host)} (pid {worker.pid}): {show(held)}; "
            f"last heartbeat {beat}{alive}",
            soft_wrap=True,
        )


def _print_windows(console: Console, status: Status) -> None:
    for sender in status.senders:
        if sender.window is not None:
            _print_window(console, sender.name, sender.window)


def _print_window(console: Console, sender: str, window: WindowPlan) -> None:
    """One sender's window: when it opens, and when its work is done counting only open time."""
    opens = "open now" if window.opens is None else f"opens {format_local_time(window.opens)}"
    done = format_local_time(window.finishes_at)
    console.print(f"sender {escape(sender)}: window {escape(window.window)}, {opens}; done by {done}")


def _print_steps(console: Console, status: Status) -> None:
    table = Table(title="By step", title_justify="left", box=None, pad_edge=False)
    for column in ("step", "after", "sent", "due now", "scheduled", "next due", "stopped", "auto-replied"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("step", "stopped") else "right")
    step_sent = next(state for state in status.states if state.value == "sent")  # no models import here
    for step in status.steps:
        stopped = ", ".join(f"{count} {escape(cause)}" for cause, count in step.stopped.items()) or "-"
        table.add_row(
            escape(step.step),
            escape(step.after or "-"),
            str(step.states[step_sent]),
            str(step.due_now),
            str(step.scheduled),
            "-" if step.next_due is None else format_local_time(step.next_due),
            stopped,
            f"{step.auto_replied} (continuing)" if step.auto_replied else "-",
        )
    console.print(table)


# --- outcomes: what is left, reconcile, retry, report (issue 3) ----------------


def print_next_steps(console: Console, steps: Sequence[NextStep]) -> None:
    """What is not done, state by state, each with the exact commands to run."""
    for step in steps:
        if step.state is None:  # rows removed from the list: nothing to do
            rows = f"{step.count:,} {plural(step.count, 'row')} {plural(step.count, 'is', 'are')}"
            console.print(f"{rows} no longer in the list: {escape(step.what)}.")
    open_steps = [step for step in steps if step.state is not None]
    if open_steps:
        console.print("[bold]Not done:[/]")
    for step in open_steps:
        more = ", …" if step.count > len(step.examples) else ""
        shown = ", ".join(show(example) for example in step.examples)
        who = f" ({shown}{more})" if step.examples else ""
        console.print(f"  {step.count:,} {step.state}{who}: {escape(step.what)}", soft_wrap=True)
        for command in step.commands:
            console.print(f"      [bold]{escape(command)}[/]", soft_wrap=True)
    first = next((step.commands[0] for step in open_steps if step.commands), None)
    if first is not None:
        console.print(f"Continue with: [bold]{escape(first)}[/]", soft_wrap=True)


def print_reconciled(console: Console, report: ReconcileReport) -> None:
    """What reconcile decided for each unknown row, and why (and when it can decide the young ones)."""
    from campaign.reconcile import Verdict  # loaded already: only `reconcile` prints this

    if not report.decisions:
        console.print("No unknown rows: nothing to reconcile.")
    colours = {Verdict.SENT: "green", Verdict.PENDING: "yellow", Verdict.UNKNOWN: "red"}
    for decision in report.decisions:
        verdict = decision.verdict
        found = f" (message {show(decision.message_id)})" if decision.message_id else ""
        who, why = show(decision.email), show(decision.reason)
        console.print(f"[{colours[verdict]}]{verdict.value:<8}[/] {who}: {why}{found}", soft_wrap=True)
    decided, sent, pending = len(report.decisions), report.count(Verdict.SENT), report.count(Verdict.PENDING)
    console.print(
        f"Reconciled {decided} unknown {plural(decided, 'row')}: {sent} {plural(sent, 'was', 'were')} sent, "
        f"{pending} {plural(pending, 'was', 'were')} not (back to pending, with a new key), "
        f"{report.count(Verdict.UNKNOWN)} still unknown."
    )
    if report.decide_after is not None:
        console.print(
            f"Rows not found yet were sent too recently to call them not sent: run reconcile again after "
            f"{format_local_time(report.decide_after)} (or choose --min-age)."
        )
    if report.unreachable:
        one = report.unreachable == 1
        console.print(
            f"{report.unreachable} {'row' if one else 'rows'} could not be looked up: the API could not be "
            f"reached or asked to wait. Nothing about {'it' if one else 'them'} changed; run reconcile again "
            "later."
        )
    if report.in_flight:
        one = report.in_flight == 1
        console.print(
            f"{report.in_flight} {'row is' if one else 'rows are'} still in flight from an interrupted run: "
            f"resume re-sends {'it with its' if one else 'them with their'} own key (safe; Nylas drops the "
            "duplicate)."
        )


def print_retried(console: Console, *, moved: int, states: Sequence[str], resume_command: str) -> None:
    """What `campaign retry` moved back to pending, and what to run next."""
    what = " or ".join(states)
    if not moved:
        console.print(f"No {what} rows: nothing to retry.")
        return
    if moved == 1:
        console.print(f"1 {what} row is pending again, with a new idempotency key.")
    else:
        console.print(f"{moved:,} {what} rows are pending again, each with a new idempotency key.")
    console.print(
        f"Send {'it' if moved == 1 else 'them'} with: [bold]{escape(resume_command)}[/]", soft_wrap=True
    )


def print_report_written(console: Console, written: WrittenReport) -> None:
    """Where the report went and what it holds."""
    held = ", ".join(f"{count:,} {state}" for state, count in written.states.items() if count) or "no rows"
    where = escape(str(written.path))
    rows = f"{written.rows:,} {plural(written.rows, 'row')}"
    console.print(f"Wrote {rows} to [bold]{where}[/] ({held}).", soft_wrap=True)
