"""Progress while checking a long list: the pipeline reports its batches, the CLI shows them."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from conftest import SECRET, copy_sample
from rich.console import Console
from support import check_plan

from campaign.cli.progress import CHECK_LOG_EVERY_S, SENDER_LINES, SendProgress, show_checking
from campaign.dispatch import DispatchEvent, EventKind
from campaign.manifest import SenderSettings, load_manifest
from campaign.models import OutcomeKind, SendOutcome
from campaign.testing import FakeClock
from campaign.unsubscribe import parse_secrets


def test_the_row_check_reports_every_batch_up_to_the_whole_list(tmp_path):
    """run_preflight tells its caller how many rows are done after each batch, ending at all of them."""
    manifest_path = copy_sample("newsletter", tmp_path)
    rows = [f"person{i}@example.com,Person {i},P{i},Berlin" for i in range(250)]
    (manifest_path.parent / "recipients.csv").write_text(
        "email,name,first_name,city\n" + "\n".join(rows) + "\n"
    )
    heard: list[tuple[int, int]] = []
    manifest = load_manifest(manifest_path)
    preflight = check_plan(
        manifest, secrets=parse_secrets(SECRET), skip_invalid=False, on_rows=lambda *a: heard.append(a)
    )
    assert heard
    assert heard[-1] == (250, 250)
    assert [done for done, _ in heard] == sorted(done for done, _ in heard)
    assert len(preflight.jobs) == 250


def test_without_a_terminal_a_long_check_logs_a_line_every_few_seconds_with_rate_and_time_left():
    """In a log: nothing for the first seconds, then one line per interval, saying rows, rate and ETA."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    clock = FakeClock()
    with show_checking(console, clock=clock) as report:
        report(1_000, 100_000)
        clock.advance(CHECK_LOG_EVERY_S / 2)
        report(20_000, 100_000)
        assert buffer.getvalue() == ""
        clock.advance(CHECK_LOG_EVERY_S)
        report(50_000, 100_000)
        clock.advance(1)
        report(55_000, 100_000)
    lines = buffer.getvalue().splitlines()
    assert lines == ["checked 50,000 of 100,000 rows (6,667 rows/s, about 8 s left)"]


def test_a_run_of_many_senders_shows_a_line_for_the_first_ones_and_one_for_the_rest():
    """Twenty senders get a line each; the other 2,000 share one, which counts their messages and says
    how many are parked or refused (a line per sender would redraw thousands of lines, several times a
    second)."""
    senders = [SenderSettings(name=f"s{n}", grant_id=f"g{n}", per_second=1.0) for n in range(2_020)]
    console = Console(file=io.StringIO(), width=160, record=True)
    clock = FakeClock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    with SendProgress(console, total=2_020, senders=senders, clock=clock) as progress:
        for sender in senders:
            progress.set_share(sender.name, 1)
        for sender in senders[:1_500]:
            progress.handle(DispatchEvent(EventKind.SENT, sender.name))
        until = clock.now() + timedelta(hours=1)
        progress.handle(DispatchEvent(EventKind.PARKED, "s30", until=until))
        progress.handle(DispatchEvent(EventKind.PARKED, "s31", until=until))
        progress.handle(DispatchEvent(EventKind.RESUMED, "s31"))
        progress.handle(DispatchEvent(EventKind.AUTH_REFUSED, "s40"))
        progress.handle(DispatchEvent(EventKind.UNREACHABLE, "s41"))
        progress.handle(DispatchEvent(EventKind.REJECTING, "s42"))
    lines = console.export_text().splitlines()
    assert len(lines) == 1 + SENDER_LINES + 1
    assert lines[1].split()[0] == "s0"
    shared = lines[-1]
    assert "2,000 more senders" in shared
    assert "1480/2000" in shared  # the 1,500 sent, less the twenty senders with lines of their own
    assert "1 API unreachable, 1 credentials refused, 1 messages refused, 1 parked" in shared
    assert "1500/2020" in lines[0]


def test_the_send_display_redraws_itself_on_a_terminal_only_and_a_log_gets_it_once_at_the_end():
    """A log is not redrawn while the sends go on (nobody sees it); it gets the final display."""
    senders = [SenderSettings(name="s0", grant_id="g0", per_second=1.0)]
    clock = FakeClock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    terminal = Console(file=io.StringIO(), width=160, force_terminal=True)
    assert SendProgress(terminal, total=1, senders=senders, clock=clock)._progress.live.auto_refresh
    log = io.StringIO()
    console = Console(file=log, width=160, force_terminal=False)
    progress = SendProgress(console, total=1, senders=senders, clock=clock)
    assert not progress._progress.live.auto_refresh
    with progress:
        progress.set_share("s0", 1)
        progress.handle(DispatchEvent(EventKind.SENT, "s0"))
    assert "1/1" in log.getvalue().splitlines()[0]


def test_a_senders_line_says_when_it_cannot_connect_and_clears_once_the_api_answers():
    """No connection: 'trying again', then 'API unreachable' when it stops; an answer clears the line. A
    same-key retry of one message (an ambiguous answer) says nothing of the sender."""
    senders = [SenderSettings(name="s0", grant_id="g0", per_second=1.0)]
    clock = FakeClock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    no_connection = SendOutcome(OutcomeKind.UNREACHABLE, error_message="could not connect to the API")
    shown: list[str] = []
    console = Console(file=io.StringIO(), width=200)
    with SendProgress(console, total=3, senders=senders, clock=clock) as progress:
        (line,) = (task for task in progress._progress.tasks if task.id == progress._senders["s0"])
        progress.set_share("s0", 3)
        for event in (
            DispatchEvent(EventKind.RETRYING, "s0", outcome=no_connection),
            DispatchEvent(EventKind.RESUMED, "s0"),
            DispatchEvent(EventKind.RETRYING, "s0", "k", "a@x.com", SendOutcome(OutcomeKind.AMBIGUOUS)),
            DispatchEvent(EventKind.UNREACHABLE, "s0", outcome=no_connection),
        ):
            progress.handle(event)
            shown.append(line.fields["detail"])
    assert "no connection to the API; trying again" in shown[0]
    assert "no connection" not in shown[1]
    assert "no connection" not in shown[2]
    assert "API unreachable" in shown[3]


def test_a_senders_line_says_it_stopped_for_refused_messages_and_keeps_saying_so():
    """The sender stopped after refusals in a row: its line says so, and the failures of the sends that
    were still in flight, counted after, do not hide it."""
    senders = [SenderSettings(name="s0", grant_id="g0", per_second=1.0)]
    clock = FakeClock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    console = Console(file=io.StringIO(), width=200)
    with SendProgress(console, total=9, senders=senders, clock=clock) as progress:
        (line,) = (task for task in progress._progress.tasks if task.id == progress._senders["s0"])
        progress.set_share("s0", 9)
        progress.handle(DispatchEvent(EventKind.FAILED, "s0", "k1", "a@x.com"))
        assert line.fields["detail"] == "[red]1 not sent"
        progress.handle(DispatchEvent(EventKind.REJECTING, "s0"))
        progress.handle(DispatchEvent(EventKind.FAILED, "s0", "k2", "b@x.com"))
        progress.handle(DispatchEvent(EventKind.FAILED, "s0", "k3", "c@x.com"))
    assert line.fields["detail"] == "[red]3 not sent; stopped: its messages are refused"


def test_the_check_and_the_run_summary_group_the_thousands_of_a_big_list():
    """A million-row list's tally reads as the progress lines do: "1,009,899 to send", not "1009899"."""
    from campaign.cli.output import print_checked, print_run_summary
    from campaign.dispatch import DispatchResult

    console = Console(file=io.StringIO(), width=200)
    print_checked(console, source="r.csv", to_send=1_009_899, skipped={"invalid": 1_100}, appended=10_000)
    result = DispatchResult(sent=1_000_000, failed=0, unknown=0, remaining=0)
    print_run_summary(console, result, states={"sent": 1_000_000, "skipped": 1_100}, next_steps=())
    text = console.file.getvalue()
    assert "r.csv: checked the 10,000 rows added at its end, 1,009,899 to send, 1,100 invalid" in text
    assert "This run: 1,000,000 sent, 0 failed, 0 unknown." in text
    assert "Ledger: 1,000,000 sent, 1,100 skipped" in text
