"""The unsubscribe store (SQLite, and PostgreSQL where a test is about the store itself): recording,
reading, refusing other files; import, export, commands."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading

import anyio
import anyio.lowlevel
import polars as pl
import pytest
from conftest import API_KEY, SECRET

from campaign.errors import InputFileError, ManifestError, RecipientDataError
from campaign.ledger import open_ledger
from campaign.manifest._load import parse_manifest
from campaign.models import Address, Recipient, Skip, SkipReason
from campaign.pipeline._optouts import skip_unsubscribed_row
from campaign.recipients import CheckedRow, load_import_addresses, write_entries
from campaign.recipients._audience import load_suppression
from campaign.testing import FakeClock
from campaign.unsubscribe import (
    StoreEntry,
    StoreError,
    UnsubscribeWatch,
    list_store_paths,
    load_unsubscribed,
    lookup_unsubscribed,
    open_store,
    store_exists,
)


def _recipient(key: str, row: int, email: str | None = None) -> Recipient:
    return Recipient(key, row, Address(email or key), {"email": email or key})


def test_a_store_records_once_per_campaign_and_key(store_at):
    """A repeated record is not a second entry; the same key from another campaign is."""
    clock = FakeClock()
    store = open_store(store_at, clock=clock)
    assert store.record("spring", "Ann@Example.com", source="one-click") is True
    assert store.record("spring", "Ann@Example.com", source="page") is False
    assert store.entries() == [
        StoreEntry("spring", "Ann@Example.com", "ann@example.com", "2026-01-05T09:00:00+00:00", "one-click")
    ]
    assert store.find("spring", "Ann@Example.com") is not None
    assert store.find("autumn", "Ann@Example.com") is None
    batch = [store.build_entry(c, "cus-1", email=None, source="import") for c in ("", "autumn", "")]
    assert store.record_many(batch) == 2
    assert store.count() == 3
    store.close()


def test_store_is_created_private_in_wal_mode(tmp_path):
    """A new store file is 0600 and WAL."""
    store = open_store(tmp_path / "sub" / "u.sqlite", clock=FakeClock())
    store.record("spring", "Ann@Example.com", source="one-click")
    store.close()
    assert (tmp_path / "sub" / "u.sqlite").stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(tmp_path / "sub" / "u.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_store_commits_each_write_to_the_disk(tmp_path):
    """The store's own connection syncs every commit (FULL; 2): an opt-out the endpoint answered 200 for
    survives a power cut, where NORMAL in WAL mode syncs at checkpoints only."""
    store = open_store(tmp_path / "u.sqlite", clock=FakeClock())
    try:
        store.record("spring", "ann@example.com", source="one-click")
        assert store._sql._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        store.close()


def test_read_since_returns_only_new_rows(store_at):
    """read_since gives the rows after an id and the newest id, for cheap re-reads."""
    store = open_store(store_at, clock=FakeClock())
    assert store.newest_id() == 0
    store.record("c", "a@example.com", source="one-click")
    last, first = store.read_since(0)
    store.record("c", "b@example.com", source="one-click")
    newest, second = store.read_since(last)
    assert [e.recipient_key for e in first] == ["a@example.com"]
    assert [e.recipient_key for e in second] == ["b@example.com"]
    assert store.read_since(newest) == (newest, [])
    assert store.newest_id() == newest
    store.close()


def test_a_ledger_or_another_file_is_not_taken_for_a_store(tmp_path):
    """A ledger, a text file or a missing file named as a store is a clear error, and nothing changes."""
    ledger_path = tmp_path / "campaign.ledger.sqlite"
    open_ledger(ledger_path, clock=FakeClock(), campaign="spring").close()
    before = ledger_path.read_bytes()
    with pytest.raises(InputFileError, match="not an unsubscribe store"):
        open_store(ledger_path, clock=FakeClock())
    assert ledger_path.read_bytes() == before
    text = tmp_path / "list.sqlite"
    text.write_text("ann@example.com\n" * 100)
    with pytest.raises(InputFileError, match="not an unsubscribe store"):
        open_store(text, clock=FakeClock())
    with pytest.raises(InputFileError, match="no unsubscribe store"):
        open_store(tmp_path / "missing.sqlite", clock=FakeClock(), create=False)
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    """A store whose schema version is newer than ours is not written to."""
    open_store(tmp_path / "u.sqlite", clock=FakeClock()).close()
    with sqlite3.connect(tmp_path / "u.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer version"):
        open_store(tmp_path / "u.sqlite", clock=FakeClock())


def test_missing_store_suppresses_no_one_and_is_not_created(store_at):
    """A configured store that does not exist yet (no file; no schema in the database) holds no one,
    and preflight does not create it."""
    assert not store_exists(store_at)
    assert len(load_unsubscribed([store_at])) == 0
    assert not store_exists(store_at)
    with pytest.raises(InputFileError, match="no unsubscribe store"):
        open_store(store_at, clock=FakeClock(), create=False)
    assert not store_exists(store_at)


def test_skip_unsubscribed_matches_by_key_or_address(store_at):
    """Recipients whose key or address is in the store become `unsubscribed` skips; others stay, in order."""
    store = open_store(store_at, clock=FakeClock())
    store.record("spring", "ann@example.com", source="one-click")
    store.record("", "cus-9", source="manual")
    store.close()
    rows = [
        CheckedRow(1, {}, recipient=_recipient("ann@example.com", 1)),
        CheckedRow(2, {}, recipient=_recipient("bob@example.com", 2)),
        CheckedRow(3, {}, recipient=_recipient("cus-9", 3, "carl@example.com")),
        CheckedRow(4, {}, recipient=_recipient("cus-10", 4, "ANN@example.com")),
        CheckedRow(5, {}, skip=Skip(5, "dup", "d@example.com", SkipReason.DUPLICATE, "duplicate of row 2")),
    ]
    unsubscribed = load_unsubscribed([store_at])
    result = [skip_unsubscribed_row(row, unsubscribed) for row in rows]
    assert [row.recipient.key for row in result if row.recipient is not None] == ["bob@example.com"]
    skips = [
        row.skip for row in result if row.skip is not None and row.skip.reason == SkipReason.UNSUBSCRIBED
    ]
    assert [(s.row, s.key) for s in skips] == [(1, "ann@example.com"), (3, "cus-9"), (4, "cus-10")]
    assert skips[0].detail == "unsubscribed 2026-01-05 (one-click, campaign spring)"
    assert result[4].skip is not None
    assert result[4].skip.reason == SkipReason.DUPLICATE


def test_manifest_store_keys(tmp_path):
    """unsubscribe.store resolves beside the manifest, must be .sqlite; require_body_link is a strict bool."""
    base = """
[campaign]
name = "c"
[recipients]
source = "r.csv"
suppress = ["old.csv", "more.sqlite"]
[message]
subject = "s"
text = "t.txt"
[unsubscribe]
url = "https://example.com/u?t={{ unsubscribe_token }}"
%s
[[senders]]
name = "a"
grant_id = "g"
"""
    manifest = parse_manifest(base % 'store = "unsubscribes.sqlite"', path=tmp_path / "campaign.toml")
    assert manifest.unsubscribe is not None
    assert manifest.unsubscribe.store == tmp_path / "unsubscribes.sqlite"
    assert manifest.unsubscribe.require_body_link is True
    assert list_store_paths(manifest) == (tmp_path / "more.sqlite", tmp_path / "unsubscribes.sqlite")
    with pytest.raises(ManifestError, match=r"unsubscribe\.store: must name an SQLite file"):
        parse_manifest(base % 'store = "unsubscribes.csv"', path=tmp_path / "campaign.toml")
    with pytest.raises(ManifestError, match=r"unsubscribe\.require_body_link"):
        parse_manifest(base % 'require_body_link = "no"', path=tmp_path / "campaign.toml")


def test_export_and_import_round_trip_through_csv_parquet_and_text(tmp_path, store_at):
    """Entries written as CSV, Parquet or text read back as the same addresses; junk values are reported."""
    store = open_store(store_at, clock=FakeClock())
    store.record("spring", "ann@example.com", source="one-click")
    store.record("", "bob@example.org", source="manual")
    entries = store.entries()
    store.close()
    for name in ("out.csv", "out.parquet", "out.txt"):
        write_entries(entries, tmp_path / name)
        found = load_import_addresses(tmp_path / name, clock=FakeClock())
        assert found.addresses == ("ann@example.com", "bob@example.org"), name
    frame = pl.read_csv(tmp_path / "out.csv")
    assert frame.columns == ["email", "recipient_key", "campaign", "recorded_at", "source"]
    assert pl.read_parquet(tmp_path / "out.parquet")["source"].to_list() == ["one-click", "manual"]
    (tmp_path / "mixed.txt").write_text("# exported\nCarl <Carl@Example.COM>;\n\n")
    mixed = load_import_addresses(tmp_path / "mixed.txt", clock=FakeClock())
    assert (mixed.addresses, mixed.invalid) == (("carl@example.com",), ())
    (tmp_path / "mixed.txt").write_text("# exported\nCarl@Example.COM\nnot-an-address\n\n")
    with pytest.raises(RecipientDataError, match=r"mixed\.txt: line 3 holds no email address"):
        load_import_addresses(tmp_path / "mixed.txt", clock=FakeClock())
    from_store = load_import_addresses(store_at, clock=FakeClock())
    assert from_store.addresses == ("ann@example.com", "bob@example.org")


def test_a_secret_given_to_suppress_add_or_import_is_refused_and_never_kept(cli, tmp_path, monkeypatch):
    """A key or an address holding the API key (or a secret variable's value) is refused, exit 65, one
    line that does not repeat it, and the store holds nothing: `suppress list` and exports show entries."""
    monkeypatch.setenv("NYLAS_API_KEY", API_KEY)
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", SECRET)
    store = tmp_path / "store.sqlite"
    (tmp_path / "export.csv").write_text(f"email,recipient_key\n,cus-1\n,{SECRET}\n")
    (tmp_path / "list.txt").write_text(f"# opt-outs\nann@example.com\n\nBob <{API_KEY}@example.com>\n")
    pl.DataFrame({"email": ["ann@example.com", "bob@example.com", f"{API_KEY}@example.com"]}).write_parquet(
        tmp_path / "list.parquet"
    )
    attempts = {  # a file's line (or row) is named: a list may hold thousands
        "argument 2": ("suppress", "add", "cus-1", API_KEY, "--key"),
        "argument 1": ("suppress", "add", f"Ann <{API_KEY}@example.com>"),
        "export.csv: line 3": ("suppress", "import", tmp_path / "export.csv"),
        "list.txt: line 4": ("suppress", "import", tmp_path / "list.txt"),
        "list.parquet: row 3": ("suppress", "import", tmp_path / "list.parquet"),
    }
    for where, command in attempts.items():
        result = cli(*command, "--store", store)
        assert result.exit_code == 65, result.output
        assert result.stderr.strip().splitlines() == [
            f"error: {where}: holds a secret (an API key, or the value of a secret variable such as "
            "NYLAS_API_KEY), which the store would keep and show; remove it: secrets live only in "
            "environment variables (nothing was added)"
        ]
        assert API_KEY.lower() not in result.output.lower()
        assert SECRET not in result.output
    assert not store.exists()


def test_suppress_commands_add_import_export_list(cli, tmp_path, store_at):
    """`campaign suppress add|import|export|list` manage a store end to end (a file, or a database)."""
    store = store_at
    added = cli("suppress", "add", "Ann@Example.com", "bob@example.org", "--store", store)
    assert added.exit_code == 0, added.output
    assert "2 added" in added.stdout
    again = cli("suppress", "add", "ann@example.com", "--store", store)
    assert "0 added, 1 already there" in again.stdout
    bad = cli("suppress", "add", "not an address", "--store", store)
    assert bad.exit_code == 65
    assert "not a valid address" in bad.stderr
    key = cli("suppress", "add", "cus-42", "--key", "--store", store)
    assert key.exit_code == 0
    (tmp_path / "old.csv").write_text("email,name\ncarl@example.net,Carl\nnope,X\n")
    refused = cli("suppress", "import", tmp_path / "old.csv", "--store", store)
    assert refused.exit_code == 65
    assert "old.csv: line 3 holds no email address" in refused.stderr
    (tmp_path / "old.csv").write_text("email,name\nCarl <carl@example.net>,Carl\n")
    imported = cli("suppress", "import", tmp_path / "old.csv", "--store", store)
    assert imported.exit_code == 0, imported.output
    assert "1 address, 1 new" in imported.stdout
    listed = cli("suppress", "list", "--store", store, "--json")
    rows = json.loads(listed.stdout)
    assert [(r["recipient_key"], r["source"]) for r in rows] == [
        ("ann@example.com", "manual"),
        ("bob@example.org", "manual"),
        ("cus-42", "manual"),
        ("carl@example.net", "import"),
    ]
    shown = cli("suppress", "list", "--store", store)
    assert "4 entries" in shown.stdout
    assert "cus-42" in shown.stdout
    exported = cli("suppress", "export", tmp_path / "all.parquet", "--store", store)
    assert exported.exit_code == 0, exported.output
    assert pl.read_parquet(tmp_path / "all.parquet").height == 4
    missing = cli("suppress", "list", "--store", tmp_path / "none.sqlite")
    assert missing.exit_code == 66
    wrong = cli("suppress", "list", "--store", tmp_path / "u.csv")
    assert wrong.exit_code == 2


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_suppress_export_refuses_the_store_itself_however_it_is_named(cli, tmp_path, monkeypatch):
    """Export onto its own store (another spelling, an absolute path, a link to it): exit 2, one line,
    nothing written; the store still lists its entries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.txt").symlink_to("st.sqlite")
    added = cli("suppress", "add", "ann@example.com", "bob@example.org", "--store", "st.sqlite")
    assert added.exit_code == 0, added.output
    for target in ("st.sqlite", "./st.sqlite", "sub/../st.sqlite", tmp_path / "st.sqlite", "link.txt"):
        result = cli("suppress", "export", target, "--store", "st.sqlite")
        assert result.exit_code == 2, (target, result.output)
        assert "unsubscribe store itself" in _one_error_line(result)
        assert "wrote" not in result.stdout
    assert (tmp_path / "st.sqlite").read_bytes().startswith(b"SQLite format 3\x00")
    assert (tmp_path / "link.txt").is_symlink()
    listed = cli("suppress", "list", "--store", "st.sqlite", "--json")
    assert listed.exit_code == 0, listed.output
    assert [row["email"] for row in json.loads(listed.stdout)] == ["ann@example.com", "bob@example.org"]


def test_suppress_export_refuses_any_sqlite_database(cli, tmp_path):
    """Export onto another store or a ledger (whatever its name): exit 2, one line naming it; its bytes
    are unchanged and it still opens as a store."""
    store, other = tmp_path / "st.sqlite", tmp_path / "other.sqlite"
    assert cli("suppress", "add", "ann@example.com", "--store", store).exit_code == 0
    assert cli("suppress", "add", "carl@example.net", "--store", other).exit_code == 0
    database = tmp_path / "notes.csv"  # an SQLite file named like a list
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    for target in (other, database):
        before = target.read_bytes()
        result = cli("suppress", "export", target, "--store", store)
        assert result.exit_code == 2, result.output
        line = _one_error_line(result)
        assert f"{target}: that is an SQLite database" in line
        assert target.read_bytes() == before
    listed = cli("suppress", "list", "--store", other, "--json")
    assert [row["email"] for row in json.loads(listed.stdout)] == ["carl@example.net"]
    assert cli("suppress", "export", tmp_path / "fine.csv", "--store", store).exit_code == 0


@pytest.mark.parametrize("name", ["x.sqlite", "x.sqlite3", "x.DB"])
def test_suppress_export_refuses_a_new_file_named_as_a_store(cli, tmp_path, monkeypatch, name):
    """A new file named .sqlite/.sqlite3/.db would hold a list that campaigns take for a store: exit 2,
    one line naming it and what to name instead, nothing written; other names keep their format."""
    monkeypatch.chdir(tmp_path)
    assert cli("suppress", "add", "ann@example.com", "--store", "st.sqlite").exit_code == 0
    result = cli("suppress", "export", name, "--store", "st.sqlite")
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert line.startswith(f"error: {name}: ")
    assert "name a .csv or .txt file" in line
    assert not (tmp_path / name).exists()
    assert cli("suppress", "export", "x.csv", "--store", "st.sqlite").exit_code == 0
    assert (tmp_path / "x.csv").read_text().startswith("email,recipient_key,")
    assert cli("suppress", "export", "x.list", "--store", "st.sqlite").exit_code == 0
    assert (tmp_path / "x.list").read_text() == "ann@example.com\n"


def test_suppress_import_of_a_missing_file_names_the_path_given(cli, tmp_path, monkeypatch):
    """A file named on the command line that does not exist: exit 66, one line naming it and saying to
    check the path given; a file named in a manifest still points at the manifest."""
    monkeypatch.chdir(tmp_path)
    for name in ("missing.txt", "missing.csv", "missing.parquet"):
        result = cli("suppress", "import", name, "--store", "st.sqlite")
        assert result.exit_code == 66, result.output
        assert _one_error_line(result) == f"error: {name}: suppression list not found; check the path given"
    assert not (tmp_path / "st.sqlite").exists()
    with pytest.raises(InputFileError, match=r"missing\.txt: .*check the path in the manifest"):
        load_suppression([tmp_path / "missing.txt"])


def _moved_store(tmp_path, store_at) -> None:
    """A store holding an address (by hand), a key-only entry from a campaign's click, and key-only entries
    added by hand, one of them starting like a formula (a CSV export neutralises it)."""
    store = open_store(store_at, clock=FakeClock())
    store.record("", "ann@example.com", source="manual")
    store.record("spring", "cus-7", source="one-click")
    store.record("", "+4915112345", source="manual")
    store.close()


def _key_only(where) -> list[str]:
    store = open_store(where, clock=FakeClock(), create=False)
    try:
        return sorted(entry.recipient_key for entry in store.entries() if entry.email is None)
    finally:
        store.close()


@pytest.mark.parametrize("name", ["moved.csv", "moved.parquet"])
def test_a_store_moved_through_an_export_keeps_its_key_only_entries(cli, tmp_path, store_at, name):
    """Store -> CSV/Parquet -> a new store: the entries that hold a recipient key and no address come
    back as such (the new store skips those recipients too), and the summary counts them."""
    _moved_store(tmp_path, store_at)
    assert cli("suppress", "export", tmp_path / name, "--store", store_at).exit_code == 0
    moved = tmp_path / "moved.sqlite"
    imported = cli("suppress", "import", tmp_path / name, "--store", moved)
    assert imported.exit_code == 0, imported.output
    assert _key_only(moved) == ["+4915112345", "cus-7"]
    assert imported.stdout.strip() == f"{name}: 1 address, 2 recipient keys, 3 new"
    carl = _recipient("cus-7", 1, "carl@example.net")
    assert lookup_unsubscribed([moved], [carl]).match(carl) is not None
    from_store = cli("suppress", "import", store_at, "--store", tmp_path / "copy.sqlite")
    assert from_store.exit_code == 0, from_store.output
    assert _key_only(tmp_path / "copy.sqlite") == ["+4915112345", "cus-7"]


def test_a_text_export_says_it_left_out_key_only_entries(cli, tmp_path, store_at):
    """A text list holds addresses: the export leaves out the key-only entries and says how many, and the
    list it writes imports (a key as a line would stop every import and run reading it)."""
    _moved_store(tmp_path, store_at)
    exported = cli("suppress", "export", tmp_path / "moved.txt", "--store", store_at)
    assert exported.exit_code == 0, exported.output
    assert "left out 2 key-only entries" in exported.stdout
    assert "export to .csv to keep them" in exported.stdout
    assert (tmp_path / "moved.txt").read_text() == "ann@example.com\n"
    imported = cli("suppress", "import", tmp_path / "moved.txt", "--store", tmp_path / "moved.sqlite")
    assert imported.exit_code == 0, imported.output


def test_suppress_import_and_add_read_entries_as_a_run_does(cli, tmp_path, store_at):
    """Import takes a zero-width space, a final dot and a mailto query as a run does, and stops (65, file
    and line) on an entry whose address does not validate, importing nothing; `add` says why, too."""
    (tmp_path / "optouts.txt").write_text(
        "dora@example.com\u200b\neve@example.org.\nmailto:bob@example.org?subject=unsubscribe\n",
        encoding="utf-8",
    )
    imported = cli("suppress", "import", tmp_path / "optouts.txt", "--store", store_at)
    assert imported.exit_code == 0, imported.output
    assert imported.stdout.strip() == "optouts.txt: 3 addresses, 3 new"
    listed = json.loads(cli("suppress", "list", "--store", store_at, "--json").stdout)
    assert sorted(row["email"] for row in listed) == [
        "bob@example.org",
        "dora@example.com",
        "eve@example.org",
    ]
    (tmp_path / "more.txt").write_text("carl@example.net\ncarl@example..net\n", encoding="utf-8")
    refused = cli("suppress", "import", tmp_path / "more.txt", "--store", store_at)
    assert refused.exit_code == 65, refused.output
    assert refused.stderr.strip() == (
        "error: more.txt: line 2: 'carl@example..net' is not a valid address: An email address cannot have "
        "two periods in a row; correct it (e.g. ann@example.com or Ann <ann@example.com>), or start the line "
        "with # to keep it as a comment"
    )
    bad = cli("suppress", "add", "carl@example..net", "--store", store_at)
    assert bad.exit_code == 65, bad.output
    assert bad.stderr.strip() == (
        "error: 'carl@example..net' is not a valid address: An email address cannot have two periods in a "
        "row; give one address per argument (or use --key)"
    )
    assert len(json.loads(cli("suppress", "list", "--store", store_at, "--json").stdout)) == 3


def test_suppression_store_module_loads_no_server_or_cli_library():
    """The store and compliance modules stay in the core: no starlette, uvicorn, typer or rich."""
    for module in (
        "campaign.unsubscribe._store",
        "campaign.unsubscribe._pgstore",
        "campaign.recipients._store_files",
        "campaign.pipeline._compliance",
    ):
        code = (
            "import sys, json; sys.modules['httpx._main'] = None; "
            f"import {module}; "
            "names = ('typer', 'rich', 'uvicorn', 'starlette'); "
            "print(json.dumps(sorted(m for m in names if m in sys.modules)))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert json.loads(result.stdout) == [], module


def test_a_batch_looks_up_only_its_own_recipients_by_key_or_address(tmp_path, store_at):
    """lookup_unsubscribed asks each store for one batch's keys and addresses (first entry wins)."""
    store = open_store(store_at, clock=FakeClock())
    store.record("spring", "ann@example.com", source="one-click")
    store.record("", "cus-9", source="manual")
    store.record("autumn", "cus-10", email="Bob@Example.com", source="one-click")
    store.record("", "zed@example.com", source="import")
    store.close()
    batch = [
        _recipient("ann@example.com", 1),
        _recipient("cus-9", 2, "carl@example.com"),
        _recipient("cus-77", 3, "bob@example.com"),
        _recipient("dora@example.com", 4),
    ]
    found = lookup_unsubscribed([store_at, tmp_path / "missing.sqlite"], batch)
    assert [getattr(found.match(r), "recipient_key", None) for r in batch] == [
        "ann@example.com",
        "cus-9",
        "cus-10",
        None,
    ]
    assert len(found) == 3  # zed, not in the batch, was not read


def test_suppression_files_are_read_again_when_they_change_and_a_bad_edit_keeps_the_last_good_read(
    tmp_path,
):
    """The check before each send: what the files list now (within `refresh_s`), a store in the same
    setting left to the watch; a mistyped save keeps what was read before; a bad file at the start
    refuses, naming file and line."""
    from campaign.recipients import SuppressionFiles

    clock = FakeClock()
    listed = tmp_path / "optouts.txt"
    listed.write_text("ann@example.com\n", encoding="utf-8")
    files = SuppressionFiles([listed, tmp_path / "store.sqlite", "postgresql://db/x"], clock=clock)
    ann, bob = (
        Recipient(key=e, row=1, address=Address(e), fields={}) for e in ("Ann@Example.com", "bob@example.com")
    )
    assert (files.is_listed(ann), files.is_listed(bob)) == (True, False)
    listed.write_text("ann@example.com\nBob <bob@example.com>\n", encoding="utf-8")
    assert files.is_listed(bob) is False  # not looked at again within the second
    clock.advance(1.0)
    assert files.is_listed(bob) is True
    listed.write_text("ann@example.com\nBob <bob@example.com>\nnot an address\n", encoding="utf-8")
    clock.advance(1.0)
    assert (files.is_listed(ann), files.is_listed(bob)) == (True, True)
    with pytest.raises(RecipientDataError, match=r"optouts\.txt: line 3"):
        SuppressionFiles([listed], clock=clock)


@pytest.mark.anyio
async def test_a_changed_suppression_file_is_read_again_off_the_event_loop(tmp_path, monkeypatch):
    """The run's check before each claim reads a changed suppression file in a worker thread: while a slow
    read goes on (a network disk, a long list), the loop's other tasks run, here the one the read waits
    for; and the entry saved is known to the check that waited for the read."""
    from campaign.recipients import SuppressionFiles, _suppression
    from campaign.run import _opt_out

    clock = FakeClock()
    listed = tmp_path / "optouts.txt"
    listed.write_text("ann@example.com\n", encoding="utf-8")
    files = SuppressionFiles([listed], clock=clock)
    listed.write_text("ann@example.com\nbob@example.com\n", encoding="utf-8")
    clock.advance(1.0)
    reading, may_finish = threading.Event(), threading.Event()
    finished: list[bool] = []
    read = _suppression.load_suppression_list

    def slow_read(paths):
        reading.set()
        # Read on the loop's thread, this waits in vain: the task that would let it finish cannot run.
        finished.append(may_finish.wait(timeout=5))
        return read(paths)

    async def other_work_of_the_loop() -> None:
        while not reading.is_set():
            await anyio.lowlevel.checkpoint()
        may_finish.set()

    monkeypatch.setattr(_suppression, "load_suppression_list", slow_read)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(other_work_of_the_loop)
        said = await _opt_out(None, files)(_recipient("bob@example.com", 2))
    assert finished == [True]
    assert said == SkipReason.SUPPRESSED
    assert await _opt_out(None, files)(_recipient("carl@example.com", 3)) is None
    assert finished == [True]  # looked at within the second: not read again


@pytest.mark.parametrize("name", ["moved.csv", "moved.parquet"])
def test_the_check_before_each_send_finds_an_exported_entry_holding_only_a_key(cli, tmp_path, name):
    """A running campaign's suppression files list a recipient by the key of an export's row whose email
    is empty (a formula-like key as the store holds it, not as the CSV neutralised it), as the plan and
    `suppress import` do; by address as before; and no one else."""
    from campaign.recipients import SuppressionFiles

    _moved_store(tmp_path, tmp_path / "store.sqlite")
    assert cli("suppress", "export", tmp_path / name, "--store", tmp_path / "store.sqlite").exit_code == 0
    files = SuppressionFiles([tmp_path / name], clock=FakeClock())
    carl, phone, ann, dora = (
        _recipient("cus-7", 1, "carl@example.net"),
        _recipient("+4915112345", 2, "eve@example.net"),
        _recipient("cus-8", 3, "ann@example.com"),
        _recipient("cus-9", 4, "dora@example.com"),
    )
    assert [files.is_listed(r) for r in (carl, phone, ann, dora)] == [True, True, True, False]


def test_an_opt_out_kept_with_a_unicode_domain_still_matches_its_ascii_address(store_at):
    """Addresses now go to the API (and the ledger) with an internationalised domain in ASCII; stores
    filled before kept the Unicode form, by address and by key. Those people stay suppressed."""
    from campaign.recipients import comparable_address

    store = open_store(store_at, clock=FakeClock())
    try:
        store.record("", "ann@bücher.example", email="ann@bücher.example", source="import")
        store.record("", "bob@bücher.example", source="import")  # a key alone: `suppress add` of an address
    finally:
        store.close()
    people = [
        Recipient(key=email, row=n, address=Address(email), fields={})
        for n, email in enumerate(
            [comparable_address(f"{name}@bücher.example") or "" for name in ("ann", "bob", "carl")], start=1
        )
    ]
    assert [p.key for p in people] == [f"{n}@xn--bcher-kva.example" for n in ("ann", "bob", "carl")]
    found = lookup_unsubscribed([store_at], people)
    assert [found.match(person) is not None for person in people] == [True, True, False]
    watch = UnsubscribeWatch([store_at], clock=FakeClock())
    try:
        watch.look_up(people)
        assert [watch.opt_out(person) for person in people] == [SkipReason.UNSUBSCRIBED] * 2 + [None]
    finally:
        watch.close()
