"""A SQLite store or ledger on a file system without WAL (SQLite keeps its rollback journal there, and
a reader then holds a writer's commit back): the command that opens it says so, once.

Such a file system is stood in for by SQLite's `unix-none` VFS (no locks, so no shared WAL index):
`PRAGMA journal_mode=WAL` answers `delete` there, as on those file systems.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_sample

from campaign.ledger import open_ledger
from campaign.manifest import load_manifest
from campaign.testing import FakeClock
from campaign.unsubscribe import open_store


@pytest.fixture(name="no_wal")
def _no_wal_fixture(monkeypatch, tmp_path) -> None:
    _no_wal(monkeypatch, tmp_path)


def _no_wal(monkeypatch: Any, tmp_path: Path) -> None:
    """Every SQLite file under the test's folder is opened through the `unix-none` VFS."""
    real = sqlite3.connect

    def connect(target: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        text = str(target)
        if kwargs.get("uri") and text.startswith(tmp_path.as_uri()):
            return real(f"{text}{'&' if '?' in text else '?'}vfs=unix-none", *args, **kwargs)
        if not kwargs.get("uri") and text.startswith(str(tmp_path)):
            return real(f"{Path(text).as_uri()}?vfs=unix-none", *args, **{**kwargs, "uri": True})
        return real(target, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)


def _store_note(path: Path) -> str:
    return (
        f"unsubscribe store {path}: SQLite could not use WAL on this file system (journal mode 'delete'), "
        "so while a command reads the store its writes wait, and `campaign serve` answers 503 when they wait "
        "too long; keep the store on a local disk, or use a PostgreSQL store"
    )


def test_a_store_without_wal_has_a_note_and_one_with_it_none(tmp_path, monkeypatch):
    with_wal = open_store(tmp_path / "local.sqlite", clock=FakeClock())
    assert with_wal.notes == ()
    with_wal.close()
    _no_wal(monkeypatch, tmp_path)
    store = open_store(tmp_path / "remote.sqlite", clock=FakeClock())
    try:
        assert store.notes == (_store_note(tmp_path / "remote.sqlite"),)
        with sqlite3.connect(tmp_path / "remote.sqlite") as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        store.close()


def test_suppress_add_tells_of_a_store_without_wal_once_on_stderr(cli, tmp_path, no_wal):
    where = tmp_path / "u.sqlite"
    result = cli("suppress", "add", "ann@example.com", "--store", where)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert "could not use WAL" in notes[0]
    assert "note:" not in result.stdout
    reader = open_store(where, clock=FakeClock(), create=False)
    assert [entry.recipient_key for entry in reader.entries()] == ["ann@example.com"]
    reader.close()


def test_a_ledger_without_wal_has_a_note_and_a_run_shows_it_before_sending(api, cli, tmp_path, no_wal):
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    ledger_path = manifest.with_name(f"{manifest.stem}.ledger.sqlite")
    first = cli("run", manifest, "--yes", "--limit", "1")
    assert first.exit_code == 75, first.output
    ledger = open_ledger(ledger_path, clock=FakeClock(), campaign="spring-newsletter", create=False)
    expected = (
        f"ledger {ledger_path}: SQLite could not use WAL on this file system (journal mode 'delete'), so "
        "`campaign status` or `report` run meanwhile holds this run's writes back; keep the ledger on a "
        "local disk"
    )
    try:
        assert ledger.notes == (expected,)
    finally:
        ledger.close()
    resumed = cli("run", manifest, "--yes")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.count("could not use WAL") == 1
    assert len(api.deliveries) == 5
