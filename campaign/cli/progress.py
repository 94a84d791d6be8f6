"""The live progress displays (rich): the row check, and a send run (an overall bar, a line per sender,
up to `SENDER_LINES` of them).

`SendProgress` is fed the loop's `DispatchEvent`s (`campaign.dispatch._types`) and shows
sends, failures, throttles, refused credentials, each sender's budget left and a live
countdown while a sender is parked. It takes events and prints; it decides nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from campaign.cli.output import plural
from campaign.clock import Clock
from campaign.dispatch import DispatchEvent, EventKind
from campaign.manifest import SenderSettings
from campaign.models import OutcomeKind
from campaign.timetext import format_duration, format_local_time

__all__ = ["CHECK_LOG_EVERY_S", "SENDER_LINES", "SendProgress", "show_checking", "show_waiting"]

CHECK_LOG_EVERY_S = 5.0  # without a terminal, one line this often while a long check runs


class _RateColumn(ProgressColumn):
    """Messages (or rows) per second, as measured over the last few seconds."""

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
            why = task.fields.get("paused", "parked")
            return Text.from_markup(
                f"[yellow]{why}, {format_duration(left)} left (until {format_local_time(until)})"
            )
        budget = task.fields.get("budget_left")
        text = task.fields.get("detail", "")
        if budget is not None:
            text = f"{budget} left today  {text}"
        return Text.from_markup(text)


# Senders shown on a line of their own; the others share one line (a campaign of 2,000 senders would
# otherwise redraw 2,000 lines several times a second: most of the run's CPU, and a log of that length).
SENDER_LINES = 20


# What a sender's line says after an event that changes how it sends.
_SENDER_DETAILS = {
    EventKind.AUTH_REFUSED: "[red]credentials refused",
    EventKind.UNREACHABLE: "[red]API unreachable",
    EventKind.REJECTING: "[red]stopped: its messages are refused",
    EventKind.THROTTLED: "[yellow]throttled, slowing down",
}


def _no_connection(event: DispatchEvent) -> bool:
    return event.outcome is not None and event.outcome.kind == OutcomeKind.UNREACHABLE


class SendProgress:
    """A live progress display fed with dispatch events: an overall bar, one line per sender (the first
    `SENDER_LINES` of them), and one line for the others: how many are parked or refused."""

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
            # In a log the display is printed once, as it ends: redrawing it ten times a second for
            # nobody cost a send of 2,000 senders 2.5 % of its CPU.
            auto_refresh=console.is_terminal,
        )
        self._overall = self._progress.add_task("[bold]all senders", total=total, detail="")
        names = [sender.name for sender in senders]
        self._senders: dict[str, TaskID] = {
            name: self._progress.add_task(f"  {name}", total=None, detail="") for name in names[:SENDER_LINES]
        }
        others = names[SENDER_LINES:]
        self._others = (
            self._progress.add_task(
                f"  {len(others):,} more {plural(len(others), 'sender')}", total=0, detail=""
            )
            if others
            else None
        )
        self._other_total = 0
        self._other_states: dict[str, str] = {}  # another sender -> "parked" | "refused" | "not sent"
        self._failed = dict.fromkeys(names, 0)
        self._refusing: set[str] = set()  # stopped by refused messages: their failures say so too
        self._budget_left: dict[str, int | None] = dict.fromkeys(names)

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
        task = self._senders.get(sender)
        if task is not None:
            self._progress.update(task, total=messages, budget_left=budget_left)
        elif self._others is not None:
            self._other_total += messages
            self._progress.update(self._others, total=self._other_total)

    def handle(self, event: DispatchEvent) -> None:
        """Update the display for one event."""
        task = self._senders.get(event.sender)
        if event.kind == EventKind.REJECTING:
            self._refusing.add(event.sender)
        if task is None:
            self._handle_other(event)
        else:
            self._handle_own(task, event)

    def _handle_own(self, task: TaskID, event: DispatchEvent) -> None:
        """An event of a sender with a line of its own."""
        if event.kind == EventKind.SENT:
            self._progress.advance(task)
            self._progress.advance(self._overall)
            left = self._budget_left[event.sender]
            if left is not None:
                self._budget_left[event.sender] = left - 1
                self._progress.update(task, budget_left=left - 1)
        elif event.kind in (EventKind.FAILED, EventKind.UNKNOWN):
            self._failed[event.sender] += 1
            self._advance(task)
            self._show_failed(task, event.sender)
        elif event.kind in (EventKind.PARKED, EventKind.CLOSED) and event.until is not None:
            paused = "window shut" if event.kind == EventKind.CLOSED else "parked"
            self._progress.update(task, parked_until=event.until, paused=paused)
        elif event.kind == EventKind.RESUMED:
            self._progress.update(task, parked_until=None, detail="")
        elif event.kind in _SENDER_DETAILS:
            self._progress.update(task, detail=_SENDER_DETAILS[event.kind])
        elif event.kind == EventKind.RETRYING and _no_connection(event):
            self._progress.update(task, detail="[yellow]no connection to the API; trying again")
        elif event.kind == EventKind.SKIPPED:  # unsubscribed (or replied) while the campaign ran: settled
            self._advance(task)
        elif event.kind == EventKind.HELD:  # a follow-up's reply lookup failed: due again, never sent blind
            self._advance(task)
            self._progress.update(task, detail="[yellow]reply lookup failed; held back")

    def _show_failed(self, task: TaskID, sender: str) -> None:
        stopped = "; stopped: its messages are refused" if sender in self._refusing else ""
        self._progress.update(task, detail=f"[red]{self._failed[sender]} not sent{stopped}")

    def _advance(self, task: TaskID) -> None:
        self._progress.advance(task)
        self._progress.advance(self._overall)

    def _handle_other(self, event: DispatchEvent) -> None:
        """An event of a sender without a line of its own: counted on the shared line."""
        assert self._others is not None  # every sender has a line, or shares this one
        if event.kind in (EventKind.SENT, EventKind.SKIPPED, EventKind.HELD):
            self._advance(self._others)
        elif event.kind in (EventKind.FAILED, EventKind.UNKNOWN):
            self._advance(self._others)
            self._other_states.setdefault(event.sender, "not sent")
        elif event.kind in (EventKind.PARKED, EventKind.CLOSED) and event.until is not None:
            self._other_states[event.sender] = "parked"
        elif event.kind == EventKind.RESUMED:
            self._other_states.pop(event.sender, None)
        elif event.kind == EventKind.AUTH_REFUSED:
            self._other_states[event.sender] = "credentials refused"
        elif event.kind == EventKind.UNREACHABLE:
            self._other_states[event.sender] = "API unreachable"
        elif event.kind == EventKind.REJECTING:
            self._other_states[event.sender] = "messages refused"
        else:
            return
        counts = Counter(self._other_states.values())
        detail = ", ".join(f"{count:,} {state}" for state, count in sorted(counts.items()))
        self._progress.update(self._others, detail=f"[yellow]{detail}" if detail else "")


class _CountdownColumn(ProgressColumn):
    """Time left until a moment, live."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._clock = clock

    def render(self, task: Task) -> Text:
        until = task.fields["until"]
        left = (until - self._clock.now()).total_seconds()
        return Text(f"{format_duration(max(0.0, left))} left (at {format_local_time(until)})")


@contextmanager
def show_waiting(
    console: Console, *, until: datetime, scheduled: int, waiting: Sequence[str] = (), clock: Clock
) -> Iterator[None]:
    """--wait's sleep until the next follow-up is due, or a sender `waiting` (its window shut, paused) may
    send again: a live countdown on a terminal, a line in a log."""
    what = f"{scheduled:,} follow-up{'s' if scheduled != 1 else ''} scheduled; waiting for the next one"
    if waiting:
        what += f" or for {', '.join(waiting)} to send again"
    if not console.is_terminal:
        console.print(f"{what}, at {format_local_time(until)} (Ctrl-C stops; resume goes on)", soft_wrap=True)
        yield
        return
    progress = Progress(TextColumn(what), _CountdownColumn(clock), console=console, transient=True)
    progress.add_task("wait", total=None, until=until)
    with progress:
        yield


@contextmanager
def show_checking(console: Console, *, clock: Clock) -> Iterator[Callable[[int, int], None]]:
    """Progress of the row check: a live bar with rate and ETA on a terminal; in a log, one line every
    few seconds (none for a check that takes less)."""
    if console.is_terminal:
        progress = Progress(
            TextColumn("checking rows"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            get_time=clock.monotonic,
        )
        task = progress.add_task("check", total=None)
        with progress:
            yield lambda done, total: progress.update(task, completed=done, total=total)
        return
    started = last = clock.monotonic()

    def log(done: int, total: int) -> None:
        nonlocal last
        now = clock.monotonic()
        if now - last < CHECK_LOG_EVERY_S:
            return
        last = now
        rate = done / (now - started) if now > started else 0.0
        left = f", about {format_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
        rows = plural(total, "row")
        console.print(f"checked {done:,} of {total:,} {rows} ({rate:,.0f} rows/s{left})", soft_wrap=True)

    yield log
