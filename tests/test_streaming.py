"""The streaming engine (issue 15): the plan goes through a spool into the ledger, and the lanes read
their work back from the ledger a page at a time. What matters is that this changes nothing of who is
mailed, by whom, with what, and that no moment of death in the plan's writing can mail anyone twice
or leave half a plan that sends.

Counted at the fake: the deliveries it received, never our own logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import check_plan, fake_with_grants

import campaign.dispatch._loop as loop_module
import campaign.pipeline._parallel as parallel_module
from campaign.clock import SystemClock
from campaign.ledger import open_ledger
from campaign.manifest import load_manifest
from campaign.models import RowState
from campaign.preview import PreviewReport, run_preview
from campaign.recipients import load_audience
from campaign.testing import FakeClock, FakeNylas
from campaign.testing.server import serve_on_loopback

API_KEY = "nyk_v0_streaming_test_key_0123456789"
SENDERS = ("north", "south", "west")


def _write_campaign(folder: Path, rows: list[str], *, suppressed: tuple[str, ...] = ()) -> Path:
    """A three-sender plain-text campaign over `rows` (CSV lines: email,name,sender)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipients.csv").write_text("email,name,sender\n" + "".join(f"{r}\n" for r in rows), "utf-8")
    (folder / "suppressed.txt").write_text("".join(f"{s}\n" for s in suppressed), "utf-8")
    (folder / "note.txt.j2").write_text("Hello {{ name }}, row {{ email }}.\n", encoding="utf-8")
    senders = "".join(
        f'\n[[senders]]\nname = "{name}"\ngrant_id = "grant-{name}"\nemail = "{name}@corp.example.com"\n'
        "per_second = 1000\nconcurrency = 2\n"
        for name in SENDERS
    )
    manifest = folder / "campaign.toml"
    manifest.write_text(
        '[campaign]\nname = "streaming"\n\n'
        '[recipients]\nsource = "recipients.csv"\nname_column = "name"\nsender_column = "sender"\n'
        'suppress = ["suppressed.txt"]\n\n'
        '[message]\nsubject = "A note for {{ name }}"\ntext = "note.txt.j2"\n' + senders,
        encoding="utf-8",
    )
    return manifest


def _fake() -> FakeNylas:
    return fake_with_grants(API_KEY, SENDERS)


def _run(url: str, *args: str | Path, script: str = "") -> subprocess.CompletedProcess[str]:
    """`campaign ARGS` in a process of its own (`script` runs first in it, to arrange its death)."""
    env = {**os.environ, "NYLAS_API_URI": url, "NYLAS_API_KEY": API_KEY, "COLUMNS": "120"}
    code = textwrap.dedent(script) + "\nfrom campaign.cli import main\nmain()\n"
    command = [sys.executable, "-c", code, *(str(arg) for arg in args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def _delivered(fake: FakeNylas) -> Counter[str]:
    return Counter(d.payload["to"][0]["email"] for d in fake.deliveries)


# A process that dies by SIGKILL once the plan's writing has gone so far.
_KILL_IN_CHECK = """
import os, signal
import campaign.ledger._firstplan as first
def add(self, planned, skips):
    os.kill(os.getpid(), signal.SIGKILL)
first.FirstPlan.add = add
"""
# A first run's plan is written aside and committed; it dies just before linking it into place.
_KILL_IN_FIRST_RECORD = """
import os, signal
def link(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
os.link = link
"""
_KILL_IN_RECORD = """
import os, signal
import campaign.ledger._spool as spool
original = spool.PlanSpool.planned
def planned(self):
    for n, row in enumerate(original(self)):
        if n == {at}:  # mid-transaction: some rows are written, none committed
            os.kill(os.getpid(), signal.SIGKILL)
        yield row
spool.PlanSpool.planned = planned
"""


@pytest.mark.parametrize("moment", ["check", "record"])
def test_kill_while_the_plan_is_written_then_run_again_mails_everyone_once(tmp_path, moment):
    """kill -9 while the first run checks the list or records the plan (written aside, about to be put in
    place), then again while a second run records the rows appended since (the ledger's transaction):
    each next run completes the plan, and every recipient is mailed exactly once."""
    rows = [f"person{n:03d}@example.com,Person {n}," for n in range(1, 121)]
    manifest = _write_campaign(tmp_path / "c", rows)
    ledger_path = manifest.with_name("campaign.ledger.sqlite")
    fake = _fake()
    kill = _KILL_IN_CHECK if moment == "check" else _KILL_IN_FIRST_RECORD
    with serve_on_loopback(fake) as url:
        killed = _run(url, "run", manifest, "--yes", script=kill)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert fake.deliveries == []
        assert not ledger_path.exists()  # nothing of a plan where the ledger goes: not even a file
        first = _run(url, "run", manifest, "--yes", "--limit", "30")
        assert first.returncode == 75, first.stdout + first.stderr  # --limit: more to send
        assert not list(manifest.parent.glob(".*.plan"))  # the abandoned plan aside is gone too
        more = [f"late{n:03d}@example.com,Late {n}," for n in range(1, 41)]
        (manifest.parent / "recipients.csv").write_text(
            "email,name,sender\n" + "".join(f"{r}\n" for r in rows + more), "utf-8"
        )
        # Only the 40 rows appended are checked and recorded (the list only grew): killed halfway.
        killed = _run(url, "resume", manifest, "--yes", script=_KILL_IN_RECORD.format(at=20))
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        last = _run(url, "resume", manifest, "--yes")
        assert last.returncode == 0, last.stdout + last.stderr
    delivered = _delivered(fake)
    assert set(delivered) == {row.split(",")[0] for row in rows + more}
    assert max(delivered.values()) == 1


@pytest.fixture
def switch(_loopback, monkeypatch):
    """The session's loopback server, the CLI pointed at it (each example serves a fresh fake)."""
    switchboard, url = _loopback
    monkeypatch.setenv("NYLAS_API_URI", url)
    monkeypatch.setenv("NYLAS_API_KEY", API_KEY)
    yield switchboard
    switchboard.target = None


@pytest.fixture
def small_pages(monkeypatch):
    """Pages of a few rows, so that any list spans many: lanes top up, the check and its spool go a few
    rows a batch."""
    monkeypatch.setattr(loop_module, "_LOOK_AHEAD", 1)
    monkeypatch.setattr(parallel_module, "BATCH", 3)


_ADDRESSES = [
    *(f"p{n}@example.com" for n in range(12)),
    "P3@Example.com",
    "not-an-address",
    "a@x.com;b@x.com",
]
_ROW = st.tuples(st.sampled_from(_ADDRESSES), st.sampled_from(["", *SENDERS, "nobody"]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    listed=st.lists(_ROW, min_size=1, max_size=25),
    suppressed=st.lists(st.sampled_from(_ADDRESSES[:12]), max_size=3),
    limit=st.sampled_from([None, 4]),
)
def test_the_streamed_plan_mails_what_the_whole_list_says(
    tmp_path_factory, cli, switch, small_pages, listed, suppressed, limit
):
    """Random small lists with duplicates, bad rows, suppressed and pinned rows, sent in pages through
    the spool and the ledger (and, with --limit, resumed): the fake receives one message for each
    recipient the in-memory audience (`load_audience`) lists, from its pinned sender if it has one,
    and the ledger skips exactly the rows the audience skips or finds bad."""
    rows = [f"{email},Name {n},{sender}" for n, (email, sender) in enumerate(listed, start=1)]
    manifest_path = _write_campaign(tmp_path_factory.mktemp("c"), rows, suppressed=tuple(suppressed))
    manifest = load_manifest(manifest_path)
    audience = load_audience(manifest.recipients, sender_names=SENDERS)
    switch.target = fake = _fake()
    args = ["--limit", str(limit)] if limit is not None else []
    result = cli("run", manifest_path, "--yes", "--skip-invalid", *args)
    while result.exit_code == 75:  # --limit: resume until done
        result = cli("resume", manifest_path, "--yes", "--skip-invalid", *args)
    switch.target = None
    assert result.exit_code == 0, result.output
    delivered = _delivered(fake)
    assert sorted(delivered) == sorted(recipient.address.email for recipient in audience.recipients)
    assert set(delivered.values()) <= {1}
    by_email = {d.payload["to"][0]["email"]: d.grant_id for d in fake.deliveries}
    for recipient in audience.recipients:
        if recipient.sender is not None:
            assert by_email[recipient.address.email] == f"grant-{recipient.sender}"
    ledger = open_ledger(manifest.ledger_path, clock=SystemClock(), campaign="streaming")
    try:
        skipped = sorted(row.row for row in ledger.rows(states=(RowState.SKIPPED,)))
    finally:
        ledger.close()
    # A key's row is its first: a duplicate of a mailed or skipped row is not a row of its own.
    mailed = {recipient.key for recipient in audience.recipients}
    first_skips: dict[str, int] = {}
    for skip in audience.skipped:
        if skip.key not in mailed:
            first_skips.setdefault(skip.key, skip.row)
    assert skipped == sorted({*first_skips.values(), *(problem.row for problem in audience.problems)})


def _mixed_rows() -> list[str]:
    """Duplicates, bad addresses, an unknown sender, rows whose name breaks the subject header (only
    rendering finds it) and rows whose subject is long enough for a preview's warning."""
    rows = []
    for n in range(1, 61):
        name = f"Name {n}" if n % 7 else "x\x0bBcc: victim@example.com"  # breaks the subject
        name = name if n % 5 else "N" * 80
        email = f"p{n}@example.com" if n % 11 else "not-an-address"
        rows.append(f"{email if n % 13 else 'p1@example.com'},{name},{'nobody' if n == 30 else ''}")
    return rows


def _on_every_core(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The check's rendering in two worker processes, seven rows a batch, whatever the list's size; the
    rows each batch sent to the workers, as they are submitted."""
    submitted: list[int] = []

    class CountingPool(parallel_module.ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            submitted.append(len(args[0]))
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(parallel_module, "PARALLEL_FROM", 0)
    monkeypatch.setattr(parallel_module, "_cores", lambda: 2)
    monkeypatch.setattr(parallel_module, "ProcessPoolExecutor", CountingPool)
    monkeypatch.setattr(parallel_module, "BATCH", 7)
    return submitted


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_the_check_on_every_core_finds_what_the_check_in_one_process_finds(
    tmp_path, monkeypatch, skip_invalid
):
    """A list with duplicates, bad addresses, unknown senders and rows whose data breaks a header (an
    error only rendering finds), checked in worker processes a batch at a time and in this process:
    the same plan, the same skips, the same problems, in the same order."""
    manifest = load_manifest(_write_campaign(tmp_path / "c", _mixed_rows(), suppressed=("p5@example.com",)))
    in_one = check_plan(manifest, secrets=None, skip_invalid=skip_invalid)
    submitted = _on_every_core(monkeypatch)
    on_all = check_plan(manifest, secrets=None, skip_invalid=skip_invalid)
    assert sum(submitted) > 0  # the workers rendered
    assert on_all.jobs == in_one.jobs
    assert on_all.skips == in_one.skips
    assert on_all.problems == in_one.problems
    assert (on_all.preflight.planned, on_all.preflight.skipped) == (
        in_one.preflight.planned,
        in_one.preflight.skipped,
    )
    assert in_one.problems or skip_invalid
    assert any("U+000B" in text for text in (*in_one.problems, *(skip.detail for skip in in_one.skips)))


def test_the_preview_on_every_core_reports_what_the_preview_in_one_process_reports(tmp_path, monkeypatch):
    """The same report, row for row: problems found only by rendering, skips, subjects, each message's
    warnings and their counts, and the samples (rendered here, the rest in the workers)."""
    manifest = load_manifest(_write_campaign(tmp_path / "c", _mixed_rows(), suppressed=("p5@example.com",)))

    def preview() -> PreviewReport:
        clock = FakeClock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
        options = {"secrets": None, "sample": 3, "ledger": None, "api_uri": "http://127.0.0.1:9"}
        return run_preview(manifest, skip_invalid=False, clock=clock, batch_rows=7, **options)

    in_one = preview()
    submitted = _on_every_core(monkeypatch)
    on_all = preview()
    assert sum(submitted) > 0  # the workers rendered
    assert on_all == in_one
    assert any("U+000B" in text for text in in_one.problem_texts)
    assert any("subjects longer than" in warning for warning in in_one.warnings)
    assert len(in_one.samples) == 3


def test_ctrl_c_during_the_check_on_every_core_stops_with_one_line_and_no_ledger(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, worker processes included: the run stops
    with its one line and exit 130, no worker prints a traceback, none is left running, and no
    ledger is made."""
    rows = [f"person{n:06d}@example.com,Person {n}," for n in range(1, 3 * parallel_module.PARALLEL_FROM)]
    manifest = _write_campaign(tmp_path / "c", rows)
    env = {
        **os.environ,
        "NYLAS_API_KEY": API_KEY,
        "NYLAS_API_URI": "http://127.0.0.1:9",
        "PYTHONUNBUFFERED": "1",
    }
    # A progress line every 0.1 s (not 5 s) says the check, and so the workers, are under way.
    code = (
        "import campaign.cli.progress as p; p.CHECK_LOG_EVERY_S = 0.1; from campaign.cli import main; main()"
    )
    command = [sys.executable, "-c", code, "run", str(manifest), "--yes"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("checked "):
                break
        else:
            raise AssertionError("".join(lines))
        os.killpg(process.pid, signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "Traceback" not in output
    assert "interrupted; nothing recorded is lost: run the command again to continue" in output
    assert not manifest.with_name("campaign.ledger.sqlite").exists()
    assert _group_gone(process.pid), "a worker outlived the run"


def _group_gone(group: int) -> bool:
    """Whether process group `group` has emptied within a few seconds (multiprocessing's helpers take a
    moment to see their parent gone)."""
    for _ in range(100):
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
