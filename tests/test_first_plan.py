"""A first run's plan, written aside while the list is checked (`FirstPlan`), then put in place.

What matters: the ledger it makes is the one `record_plan` makes of the same plan, row for row; and
until `record`, nothing is where the ledger goes. A bad row, a "no", an error or a crash leaves no
ledger and, once the next first run has looked, no file aside either.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import copy_sample
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import _register

import campaign.ledger._firstplan as firstplan_module
import campaign.pipeline._parallel as parallel_module
from campaign.cli import sending
from campaign.errors import LedgerError
from campaign.ledger import FirstPlan, PlannedRow, open_ledger
from campaign.models import Skip, SkipReason
from campaign.testing import FakeClock

MOMENT = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
# Text a list may hold: markup, quotes, JSON's own escapes, control characters, a NUL, astral planes.
_TEXT = st.sampled_from(
    ["", "plain", '"quoted" \\ back', "\x00nul\x00", "tab\tline\nfeed", "😀 é", "\\u0000"]
)


def _aside(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.plan*"))


def _rows(db_path: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute(
            "SELECT key, row, email, sender, state, reason, due_at, cells, listed, step, created_at "
            "FROM recipients ORDER BY key"
        ).fetchall()
        meta = db.execute("SELECT key, value FROM meta WHERE key != 'created_at' ORDER BY key").fetchall()
    finally:
        db.close()
    return [*rows, *meta]


@st.composite
def _plans(draw: st.DrawFn) -> list[tuple[list[PlannedRow], list[Skip]]]:
    """Batches of a plan: unique planned keys; skips of new keys, repeated keys and planned keys."""
    keys = draw(st.lists(st.integers(0, 40), unique=True, max_size=25))
    texts = draw(st.lists(_TEXT, min_size=len(keys), max_size=len(keys)))
    planned = [
        PlannedRow(
            f"k{key}@example.com",
            n + 2,
            f"k{key}@example.com",
            f"s{key % 3}",
            due_at=None if key % 4 else MOMENT + timedelta(minutes=key),
            cells=None if key % 7 == 0 else f'{{"name": {text!r}}}' + text,
        )
        for n, (key, text) in enumerate(zip(keys, texts, strict=True))
    ]
    skip_keys = draw(st.lists(st.integers(0, 60), max_size=10))
    reasons = draw(
        st.lists(st.sampled_from(list(SkipReason)), min_size=len(skip_keys), max_size=len(skip_keys))
    )
    skips = [
        Skip(100 + n, f"k{key}@example.com", f"k{key}@example.com", reason, f"detail {n}")
        for n, (key, reason) in enumerate(zip(skip_keys, reasons, strict=True))
    ]
    cuts = sorted(draw(st.lists(st.integers(0, len(planned)), max_size=3)))
    bounds = [0, *cuts, len(planned)]
    batches: list[tuple[list[PlannedRow], list[Skip]]] = [(planned[a:b], []) for a, b in pairwise(bounds)]
    batches[-1] = (batches[-1][0], skips)
    return batches


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=_plans(), by_json=st.booleans())
def test_the_ledger_made_aside_is_the_one_record_plan_makes(tmp_path_factory, monkeypatch, batches, by_json):
    """Row for row and stamp for stamp, whatever the text (a NUL too), in JSON batches or row by row."""
    folder = tmp_path_factory.mktemp("plans")
    clock = FakeClock(MOMENT)
    monkeypatch.setattr(firstplan_module, "_json_works", lambda _db: by_json)
    stamps = {"stamp": "plan-stamp", "rules": "rules-stamp", "extent": '{"size": 10}'}

    with FirstPlan(folder / "aside.sqlite", clock=clock) as first:
        for planned, skips in batches:
            first.add(planned, skips)
        report = first.record(**stamps)
    reference = open_ledger(folder / "direct.sqlite", clock=clock, campaign="c")
    try:
        expected = reference.record_plan(
            [row for planned, _ in batches for row in planned],
            [skip for _, skips in batches for skip in skips],
            **stamps,
        )
    finally:
        reference.close()
    made = open_ledger(folder / "aside.sqlite", clock=clock, campaign="c")
    made.close()

    assert report == expected
    assert _rows(folder / "aside.sqlite") == _rows(folder / "direct.sqlite")
    assert _aside(folder) == []
    assert (folder / "aside.sqlite").stat().st_mode & 0o777 == 0o600


def test_until_recorded_nothing_is_where_the_ledger_goes(tmp_path):
    """Rows written aside are in a hidden file; closing without `record` removes it, and the folder it
    made for it, but never a folder that was there before."""
    clock = FakeClock(MOMENT)
    row = PlannedRow("a@example.com", 2, "a@example.com", "s", due_at=None, cells="{}")
    made = tmp_path / "sandbox"
    with FirstPlan(made / "ledger.sqlite", clock=clock) as first:
        first.add([row], [])
        assert not (made / "ledger.sqlite").exists()
        assert len(_aside(made)) == 1
    assert not made.exists()
    with FirstPlan(tmp_path / "ledger.sqlite", clock=clock) as first:
        first.add([row], [])
    assert list(tmp_path.iterdir()) == []


def test_a_ledger_made_meanwhile_is_never_replaced(tmp_path):
    """Another command made the ledger while this plan was checked: LedgerError naming it, the other
    ledger as it was, nothing left aside."""
    clock = FakeClock(MOMENT)
    path = tmp_path / "ledger.sqlite"
    with FirstPlan(path, clock=clock) as first:
        first.add([PlannedRow("a@example.com", 2, "a@example.com", "s", due_at=None, cells="{}")], [])
        other = open_ledger(path, clock=clock, campaign="c")
        other.record_plan([PlannedRow("b@example.com", 2, "b@example.com", "s", due_at=None, cells="{}")], [])
        other.close()
        before = _rows(path)
        with pytest.raises(LedgerError, match=r"ledger\.sqlite: another command made this ledger"):
            first.record(stamp="s", rules="r", extent=None)
    assert _rows(path) == before
    assert _aside(tmp_path) == []


def test_a_write_that_fails_aside_is_a_ledger_error_and_leaves_nothing(tmp_path):
    """The writer thread's error (here a key planned twice, which the check never hands over) is
    raised by the next `add` or by `record`, naming the ledger; nothing is left aside."""
    clock = FakeClock(MOMENT)
    row = PlannedRow("a@example.com", 2, "a@example.com", "s", due_at=None, cells="{}")
    with FirstPlan(tmp_path / "ledger.sqlite", clock=clock) as first:
        first.add([row, row], [])
        raised = None
        try:  # the failure is seen by an `add` once the writer got to the batch, or else by `record`
            for n in range(firstplan_module._AHEAD + 2):
                first.add([row._replace(key=f"other{n}")], [])
            first.record(stamp="s", rules="r", extent=None)
        except LedgerError as error:
            raised = str(error)
    assert raised is not None
    assert "ledger.sqlite: cannot write the ledger (UNIQUE constraint failed" in raised
    assert list(tmp_path.iterdir()) == []


def test_a_file_aside_abandoned_by_a_killed_run_is_removed_and_a_live_one_kept(tmp_path):
    """Files aside whose run is gone (no lock on them) go when the next first run starts; one whose
    run still holds its lock stays."""
    path = tmp_path / "ledger.sqlite"
    abandoned = tmp_path / ".ledger.sqlite.99998.plan"
    abandoned.write_bytes(b"half a plan")
    abandoned.with_name(abandoned.name + "-journal").write_bytes(b"journal")
    alive = tmp_path / ".ledger.sqlite.99999.plan"
    alive.write_bytes(b"a plan being written")
    holder = os.open(alive, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with FirstPlan(path, clock=FakeClock(MOMENT)) as first:
            first.add([PlannedRow("a@example.com", 2, "a@example.com", "s", due_at=None, cells="{}")], [])
            first.record(stamp="s", rules="r", extent=None)
    finally:
        os.close(holder)
    assert _aside(tmp_path) == [alive]
    assert path.exists()


# kill -9 from inside the writer thread, once a batch is written aside (uncommitted, no journal).
_KILL_ASIDE = """
import os, signal
import campaign.pipeline._parallel as parallel
import campaign.ledger._firstplan as first
parallel.BATCH = 2
original = first._insert_batch
def insert(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
first._insert_batch = insert
"""
# kill -9 once the plan aside is committed and on disk, just before it would be linked into place.
_KILL_BEFORE_LINK = """
import os, signal
def link(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
os.link = link
"""


@pytest.mark.parametrize("kill", [_KILL_ASIDE, _KILL_BEFORE_LINK], ids=["aside", "before-link"])
def test_a_first_run_killed_while_its_plan_is_aside_leaves_no_ledger_and_the_next_mails_each_once(
    api, cli, tmp_path, kill
):
    """No ledger after the kill, so the next run is a first run too: it removes the abandoned file
    and mails every recipient once."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    folder = manifest.parent
    _run_killed(manifest, kill)
    assert api.deliveries == []
    assert not (folder / "campaign.ledger.sqlite").exists()
    assert len(_aside(folder)) == 1
    _run_mails_each_once(api, cli, manifest)
    assert _aside(folder) == []


def _run_killed(manifest: Path, kill: str) -> None:
    """`campaign run --yes` in a process that `kill` (code run first) kills with SIGKILL."""
    env = {**os.environ, "COLUMNS": "120"}
    code = textwrap.dedent(kill) + "\nfrom campaign.cli import main\nmain()\n"
    command = [sys.executable, "-c", code, "run", str(manifest), "--yes"]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stdout + killed.stderr


def _run_mails_each_once(api, cli, manifest: Path) -> None:
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    delivered = Counter(d.payload["to"][0]["email"] for d in api.deliveries)
    assert len(delivered) == 5
    assert max(delivered.values()) == 1


# kill -9 once the plan is linked into place, before its hidden name is removed.
_KILL_AFTER_LINK = """
import os, signal
original = os.link
def link(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
os.link = link
"""


def test_a_first_run_killed_between_linking_its_plan_and_removing_the_name_aside(api, cli, tmp_path):
    """The ledger is in place and the hidden name is a second link to it: the next run sends from the
    ledger, mails every recipient once, and removes that name (a ledger deleted to start over must
    not live on under it)."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    folder = manifest.parent
    ledger = folder / "campaign.ledger.sqlite"
    _run_killed(manifest, _KILL_AFTER_LINK)
    assert api.deliveries == []
    (second,) = _aside(folder)
    assert second.stat().st_ino == ledger.stat().st_ino
    _run_mails_each_once(api, cli, manifest)
    assert _aside(folder) == []
    assert ledger.exists()


def test_removing_the_ledgers_second_name_keeps_this_process_locks_on_the_ledger(tmp_path):
    """The name aside is unlinked without being opened: closing any descriptor of the ledger would drop
    every POSIX lock this process holds on it (SQLite's locks are such locks)."""
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"a ledger")
    os.link(path, tmp_path / ".ledger.sqlite.99999.plan")
    holder = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(holder, fcntl.LOCK_EX)
        firstplan_module.remove_abandoned_plans(path)
        probe = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n"
        )
        other = subprocess.run([sys.executable, "-c", probe, str(path)], check=False, timeout=60)
        assert other.returncode == 3  # still locked by this process
    finally:
        os.close(holder)
    assert _aside(tmp_path) == []
    assert path.read_bytes() == b"a ledger"


def test_a_bad_row_after_rows_went_aside_leaves_nothing(api, cli, tmp_path, monkeypatch):
    """The check hands over batch after batch before it finds a bad row in the last: exit 65, no
    request, and the folder as it was."""
    monkeypatch.setattr(parallel_module, "BATCH", 1)
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    folder = manifest.parent
    source = folder / "recipients.csv"
    source.write_text(
        source.read_text(encoding="utf-8") + "not-an-address,Nobody,No,Nowhere\n", encoding="utf-8"
    )
    before = sorted(folder.iterdir())
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 65, result.output
    assert api.requests == []
    assert sorted(folder.iterdir()) == before


def test_a_run_declined_at_its_prompt_leaves_nothing(api, cli, tmp_path, monkeypatch):
    """The plan was written aside during the check; "no" at the prompt removes it: no ledger."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    folder = manifest.parent
    asked: list[list[Path]] = []

    def decline(question: str) -> bool:
        asked.append(_aside(folder))
        return False

    monkeypatch.setattr(sending, "sys", SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True)))
    monkeypatch.setattr(sending.typer, "confirm", decline)
    result = cli("run", manifest)
    assert [len(found) for found in asked] == [1]  # the plan was aside while the user was asked
    assert api.requests == []
    assert not (folder / "campaign.ledger.sqlite").exists()
    assert _aside(folder) == []
    assert result.exit_code == 0, result.output  # a "no" is no error
