"""Progress while checking a long list: the pipeline reports its batches, the CLI shows them."""

from __future__ import annotations

import io

from conftest import SECRET, copy_sample
from rich.console import Console
from support import check_plan

from campaign.cli.progress import CHECK_LOG_EVERY_S, show_checking
from campaign.manifest import load_manifest
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
