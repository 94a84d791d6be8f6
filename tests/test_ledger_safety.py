"""Issue 12's ledger items through the CLI: nobody mailed twice after a change the user thinks harmless,
and a ledger that is not one, or is busy or read-only, is handled in one line without a send."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from conftest import copy_sample
from test_cli import _register

from campaign.cli import sending
from campaign.ledger import _ledger as ledger_module
from campaign.ledger import open_ledger
from campaign.ledger._schema import MIGRATIONS, READABLE_FROM, connect_ledger
from campaign.testing import FakeClock, Fault


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_renamed_manifest_finds_its_campaigns_ledger_and_mails_nobody_again(api, cli, tmp_path):
    """mv campaign.toml newsletter.toml, then run: refused (exit 2, one line naming the ledger), no send."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes").exit_code == 0
    assert len(api.deliveries) == 5
    renamed = manifest.with_name("newsletter.toml")
    manifest.rename(renamed)
    for command in ("run", "resume"):
        result = cli(command, renamed, "--yes")
        assert result.exit_code == 2, result.output
        (line,) = _lines(result.stderr)
        assert "newsletter.ledger.sqlite: no ledger, but" in line
        assert "campaign.ledger.sqlite belongs to campaign 'spring-newsletter'" in line
        assert "rename campaign.ledger.sqlite to newsletter.ledger.sqlite" in line
    assert not renamed.with_name("newsletter.ledger.sqlite").exists()
    assert len(api.deliveries) == 5
    # Adopting it as told: nothing is sent twice.
    manifest.with_name("campaign.ledger.sqlite").rename(renamed.with_name("newsletter.ledger.sqlite"))
    assert cli("run", renamed, "--yes").exit_code == 0
    assert len(api.deliveries) == 5


def test_a_renamed_manifest_is_refused_in_the_sandbox_too(cli, tmp_path):
    """The sandbox's own ledger follows the same rule."""
    manifest = copy_sample("newsletter", tmp_path)
    assert cli("run", manifest, "--yes", "--sandbox").exit_code == 0
    renamed = manifest.with_name("other.toml")
    manifest.rename(renamed)
    result = cli("run", renamed, "--yes", "--sandbox")
    assert result.exit_code == 2
    (line,) = _lines(result.stderr)
    assert "campaign.sandbox/ledger.sqlite belongs to campaign 'spring-newsletter'" in line
    assert "rename the folder campaign.sandbox to other.sandbox to go on with it" in line
    assert not renamed.with_name("other.sandbox").exists()
    renamed.with_name("campaign.sandbox").rename(renamed.with_name("other.sandbox"))
    again = cli("run", renamed, "--yes", "--sandbox")
    assert again.exit_code == 0, again.output
    assert "The sandbox received no messages this run." in again.stdout
    assert "Ledger: 5 sent, 1 skipped" in again.stdout


def test_a_renamed_manifest_after_an_unclean_stop_is_told_to_move_the_write_ahead_log_too(api, cli, tmp_path):
    """The latest sends are only in the ledger's -wal file (its last user was killed): the refusal names
    that file too, and adopting both as told mails nobody again."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    # A reader that is then killed keeps SQLite from folding the log into the file when the run closes.
    code = "import sqlite3, sys, time; sqlite3.connect(sys.argv[1]).execute('SELECT 1 FROM meta'); "
    code += "print('ready', flush=True); time.sleep(60)"
    with subprocess.Popen([sys.executable, "-c", code, str(ledger_file)], stdout=subprocess.PIPE) as reader:
        assert reader.stdout is not None
        assert reader.stdout.readline() == b"ready\n"
        assert cli("run", manifest, "--yes").exit_code == 0
        reader.kill()
    assert len(api.deliveries) == 5
    assert manifest.with_name("campaign.ledger.sqlite-wal").stat().st_size > 0
    renamed = manifest.with_name("newsletter.toml")
    manifest.rename(renamed)
    result = cli("run", renamed, "--yes")
    assert result.exit_code == 2, result.output
    (line,) = _lines(result.stderr)
    assert (
        "rename campaign.ledger.sqlite to newsletter.ledger.sqlite and campaign.ledger.sqlite-wal "
        "to newsletter.ledger.sqlite-wal to go on with it"
    ) in line
    for suffix in ("", "-wal"):
        ledger_file.with_name(f"campaign.ledger.sqlite{suffix}").rename(
            renamed.with_name(f"newsletter.ledger.sqlite{suffix}")
        )
    assert cli("run", renamed, "--yes").exit_code == 0
    assert len(api.deliveries) == 5


def test_another_campaign_beside_it_does_not_block_a_new_one(api, cli, tmp_path):
    """A ledger of another campaign name in the folder is no reason to refuse."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    open_ledger(manifest.with_name("old.ledger.sqlite"), clock=FakeClock(), campaign="autumn").close()
    assert cli("run", manifest, "--yes").exit_code == 0
    assert len(api.deliveries) == 5


def test_adding_key_column_after_sending_began_is_refused(api, cli, tmp_path):
    """key_column set on a campaign that sent: exit 2, one line, nothing mailed again, ledger unchanged."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes").exit_code == 0
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    before = ledger_file.read_bytes()
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace('email_column = "email"', 'email_column = "email"\nkey_column = "name"'))
    assert 'key_column = "name"' in manifest.read_text(encoding="utf-8")
    for args in (("run", manifest, "--yes"), ("preview", manifest, "--out", tmp_path / "site")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        (line,) = _lines(result.stderr)
        assert "recipients.key_column: the ledger's recipients are keyed by email address" in line
        assert "restore recipients.key_column" in line
    assert len(api.deliveries) == 5
    assert ledger_file.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"not a database at all\n", b"SQLite format 3\x00" + b"\x00" * 100])
def test_an_empty_or_foreign_file_where_the_ledger_belongs_is_an_error(api, cli, tmp_path, content):
    """A 0-byte or foreign ledger file: run and status exit 74 in one line; nothing sent, file unchanged."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    ledger_file.write_bytes(content)
    for args in (
        ("run", manifest, "--yes"),
        ("status", manifest),
        ("report", manifest, "--out", tmp_path / "r.csv"),
    ):
        result = cli(*args)
        assert result.exit_code == 74, (args, result.output)
        (line,) = _lines(result.stderr)
        assert "campaign.ledger.sqlite" in line
    assert api.deliveries == []
    assert ledger_file.read_bytes() == content


def test_an_empty_sqlite_database_is_not_a_ledger(api, cli, tmp_path):
    """A valid SQLite file without the ledger's tables is refused, never given a schema."""
    import sqlite3

    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    sqlite3.connect(ledger_file).execute("CREATE TABLE other (x)").connection.close()
    before = ledger_file.read_bytes()
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 74
    assert "is not a campaign ledger" in result.stderr
    assert ledger_file.read_bytes() == before
    assert api.deliveries == []


def test_status_and_report_never_change_the_ledger_and_cannot_write_it(api, cli, tmp_path):
    """status, report and preview open the ledger read-only: its bytes stay as they were, and the
    connection they use refuses any write (SQLite's own mode=ro, which binds root too)."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes").exit_code == 0
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    before = ledger_file.read_bytes()
    assert cli("status", manifest, "--json").exit_code == 0
    assert cli("report", manifest, "--out", tmp_path / "report.csv").exit_code == 0
    assert cli("preview", manifest, "--out", tmp_path / "site").exit_code == 0
    assert ledger_file.read_bytes() == before
    connection = connect_ledger(ledger_file, read_only=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        connection.execute("UPDATE meta SET value = 'x' WHERE key = 'campaign'")
    connection.close()


def test_status_of_an_old_ledger_asks_for_an_upgrade_instead_of_migrating(api, cli, tmp_path):
    """An older ledger: status exits 74 saying how to upgrade it, and leaves the file untouched."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes").exit_code == 0
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    connection = sqlite3.connect(ledger_file)
    connection.execute("DELETE FROM schema_migrations WHERE version >= ?", (READABLE_FROM,))
    connection.commit()
    connection.close()
    before = ledger_file.read_bytes()
    result = cli("status", manifest)
    assert result.exit_code == 74
    assert "written by an older campaign; `campaign resume` upgrades it" in result.stderr
    assert ledger_file.read_bytes() == before


def test_status_and_report_read_a_ledger_that_lacks_only_an_index_and_leave_it_so(api, cli, tmp_path):
    """The migrations after READABLE_FROM add indexes only: status and report read such a ledger (an
    upgraded campaign need not run, and send, to show it), and change nothing; a run adds them."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    connection = sqlite3.connect(ledger_file)
    connection.execute("DELETE FROM schema_migrations WHERE version > ?", (READABLE_FROM,))
    connection.execute("DROP INDEX recipients_erred")
    connection.commit()
    connection.close()
    before = ledger_file.read_bytes()
    status = cli("status", manifest, "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["states"]["sent"] == 2
    assert cli("report", manifest, "--out", str(tmp_path / "r.csv")).exit_code == 0
    assert ledger_file.read_bytes() == before
    assert cli("resume", manifest, "--yes").exit_code == 0
    with sqlite3.connect(ledger_file) as db:
        assert db.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (len(MIGRATIONS),)
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'recipients_erred'").fetchone()


def test_two_senders_on_one_grant_are_refused_before_anything_is_sent(api, cli, tmp_path):
    """The outreach sample with two senders sharing a grant: exit 78, one line naming both, no request."""
    manifest = copy_sample("outreach", tmp_path)
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace("8e9a-4f1b-a2c3-d4e5f6a7b802", "8e9a-4f1b-a2c3-d4e5f6a7b801"))
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78
    (line,) = _lines(result.stderr)
    assert "both send through grant_id '3f1d2c4b-8e9a-4f1b-a2c3-d4e5f6a7b801'" in line
    assert api.requests == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            'grant_id = "3f1d2c4b-8e9a-4f1b-a2c3-d4e5f6a7b801"',
            'grant_id = "3F1D2C4B-8E9A-4F1B-A2C3-D4E5F6A7B801"',
        ),
        ('domain = "mail.acme.example.com"', 'domain = "Mail.Acme.Example.com."'),
    ],
)
def test_two_senders_on_one_mailbox_spelled_differently_are_refused(api, cli, tmp_path, first, second):
    """A grant id or a domain in another case (or with DNS's final dot) is the same mailbox: exit 78."""
    manifest = copy_sample("outreach", tmp_path)
    text = manifest.read_text(encoding="utf-8")
    for grant, replacement in (("b801", first), ("b802", second)):
        text = text.replace(f'grant_id = "3f1d2c4b-8e9a-4f1b-a2c3-d4e5f6a7{grant}"', replacement)
    manifest.write_text(text.replace('email = "', 'from = "' if "domain" in first else 'email = "'))
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78, result.output
    (line,) = _lines(result.stderr)
    assert "'bob' and 'alice' (senders[1]) both send through" in line
    assert api.requests == []


def test_a_run_refused_for_a_busy_ledger_prints_no_plan(api, cli, tmp_path):
    """Another process holds the ledger: exit 74 with one line, and nothing about what would be sent."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    holder = open_ledger(
        manifest.with_name("campaign.ledger.sqlite"),
        clock=FakeClock(),
        campaign="spring-newsletter",
        exclusive=True,
    )
    try:
        result = cli("run", manifest, "--yes")
    finally:
        holder.close()
    assert result.exit_code == 74
    assert result.stdout == ""
    (line,) = _lines(result.stderr)
    assert "another campaign command" in line
    assert api.requests == []


@pytest.mark.parametrize("key", ["nyk_v0_abc def", "nyk_v0_abc\ndef", "nyk_v0_abcé", "nyk_v0_\x1b[2J"])
def test_an_api_key_with_a_space_line_break_or_foreign_character_is_refused_unprinted(
    api, cli, tmp_path, monkeypatch, key
):
    """A damaged key: exit 78, one line naming the variable (never the key), no ledger, no request."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    monkeypatch.setenv("NYLAS_API_KEY", key)
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78
    (line,) = _lines(result.stderr)
    assert "the value of NYLAS_API_KEY holds a space, line break" in line
    assert "abc" not in result.output
    assert not manifest.with_name("campaign.ledger.sqlite").exists()
    assert api.requests == []


@pytest.mark.parametrize("victim", ["invoices/INV-1003.pdf", "payment-terms.pdf"])
def test_an_attachment_deleted_before_resume_is_one_line_and_sends_nothing(api, cli, tmp_path, victim):
    """The invoices sample: a per-recipient file (65, a row's data) or the shared one (66) removed before
    an otherwise unchanged resume: one line naming the file, no plan printed, ledger untouched."""
    manifest = copy_sample("invoices", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    sent = len(api.deliveries)
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    before = ledger_file.read_bytes()
    (manifest.parent / victim).unlink()
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == (65 if victim.startswith("invoices/") else 66), result.output
    assert result.stdout == ""
    (line,) = _lines(result.stderr)
    assert victim.rsplit("/", 1)[-1] in line
    assert len(api.deliveries) == sent
    assert ledger_file.read_bytes() == before


GRANT = "0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11"


def _crash_after_claiming(manifest, cli, clock) -> tuple[str, str]:
    """Run two of five sends, then leave a third row claimed as a crash would (its request may have left)."""
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    ledger = open_ledger(
        manifest.with_name("campaign.ledger.sqlite"), clock=clock, campaign="spring-newsletter"
    )
    try:
        key = next(row.key for row in ledger.rows() if row.state.value == "pending")
        claim = ledger.claim(key, subject="Spring news", sender="founder", via=GRANT)
    finally:
        ledger.close()
    return key, claim.idempotency_key


def test_a_row_in_flight_is_never_resent_through_a_changed_grant(api, cli, cli_clock, tmp_path):
    """kill -9 mid-send, grant_id edited, resume: the in-flight row is unknown (with why), not mailed through
    the new grant; the other rows go out through it once each."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    key, _ = _crash_after_claiming(manifest, cli, cli_clock)
    manifest.write_text(manifest.read_text(encoding="utf-8").replace(GRANT, "new-grant"))
    api.add_grant("new-grant", "maya@example.com")
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 1, result.output  # finished, one row unknown
    to_key = [d for d in api.deliveries if d.payload["to"][0]["email"].lower() == key]
    assert [d.grant_id for d in to_key] == []
    assert sorted(d.grant_id for d in api.deliveries) == [GRANT, GRANT, "new-grant", "new-grant"]
    ledger = open_ledger(
        manifest.with_name("campaign.ledger.sqlite"), clock=FakeClock(), campaign="spring-newsletter"
    )
    try:
        row = next(row for row in ledger.rows() if row.key == key)
    finally:
        ledger.close()
    assert row.state.value == "unknown"
    assert f"claimed through {GRANT}, which no sender of the manifest has any more" in (row.note or "")


def test_a_renamed_sender_on_the_same_grant_resends_the_row_with_its_key(api, cli, cli_clock, tmp_path):
    """The sender renamed, its grant kept: the in-flight row goes out through that grant with its own key."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    key, idempotency_key = _crash_after_claiming(manifest, cli, cli_clock)
    manifest.write_text(manifest.read_text(encoding="utf-8").replace('name = "founder"', 'name = "maya"'))
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 0, result.output
    to_key = [d for d in api.deliveries if d.payload["to"][0]["email"].lower() == key]
    assert [(d.grant_id, d.idempotency_key) for d in to_key] == [(GRANT, idempotency_key)]
    assert len(api.deliveries) == 5


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("/dev/full", "cannot write the ledger's lock file"),  # ENOSPC: a full disk
        ("missing-folder/lock", "cannot create the ledger's lock file"),  # as in a read-only folder
    ],
)
def test_a_lock_file_that_cannot_be_made_is_one_line_and_sends_nothing(api, cli, tmp_path, target, said):
    """The lock file cannot be written or created: exit 74, one line, no plan printed, no request."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    manifest.with_name("campaign.ledger.sqlite.lock").symlink_to(target)
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 74, result.output
    assert result.stdout == ""  # nothing about what would have been sent
    (line,) = _lines(result.stderr)
    assert said in line
    assert api.requests == []
    assert not manifest.with_name("campaign.ledger.sqlite").exists()


def test_a_full_disk_under_the_ledger_is_one_line_and_mails_nobody_twice(api, cli, tmp_path):
    """The ledger's write-ahead log cannot be written (ENOSPC, from /dev/full): resume exits 74 in one
    line without a traceback; once there is room, resume finishes and nobody got a second message."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    wal = manifest.with_name("campaign.ledger.sqlite-wal")
    assert not wal.exists()
    wal.symlink_to("/dev/full")
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 74, result.output
    (line,) = _lines(result.stderr)
    assert "campaign.ledger.sqlite" in line
    assert "Traceback" not in result.output
    wal.unlink()
    assert cli("resume", manifest, "--yes").exit_code == 0
    emails = [d.payload["to"][0]["email"].lower() for d in api.deliveries]
    assert sorted(emails) == sorted(set(emails))
    assert len(emails) == 5


def test_reconcile_after_a_grant_change_looks_where_the_row_was_sent_and_mails_nobody_twice(
    api, cli, cli_clock, tmp_path
):
    """A send that went out through the old grant but ended unknown (504 after delivery), then grant_id
    changed: reconcile finds it in the grant it was claimed through (sent), so resume sends it again
    through no grant."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(Fault.TIMEOUT_AFTER_SEND, times=1)
    assert cli("run", manifest, "--yes").exit_code == 1  # one row unknown
    assert len(api.deliveries) == 5
    manifest.write_text(manifest.read_text(encoding="utf-8").replace(GRANT, "new-grant"))
    api.add_grant("new-grant", "maya@example.com")
    cli_clock.advance(15 * 60)  # past reconcile's --min-age: a row not found would be called not sent
    result = cli("reconcile", manifest, "--json")
    assert result.exit_code == 0, result.output
    (decision,) = json.loads(result.stdout)["decisions"]
    assert decision["verdict"] == "sent"
    assert f"in grant {GRANT}" in decision["reason"]
    assert cli("resume", manifest, "--yes").exit_code == 0
    assert Counter(d.grant_id for d in api.deliveries) == {GRANT: 5}
    emails = [d.payload["to"][0]["email"].lower() for d in api.deliveries]
    assert len(set(emails)) == 5


def test_every_command_beside_a_renamed_manifest_names_the_campaigns_ledger(api, cli, tmp_path):
    """status, report, reconcile, retry and preview of a renamed manifest: exit 2 naming the ledger of the
    same campaign, not "not started" (which would invite a second run); nothing is written or sent."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes").exit_code == 0
    renamed = manifest.with_name("newsletter.toml")
    manifest.rename(renamed)
    ledger_file = manifest.with_name("campaign.ledger.sqlite")
    before = ledger_file.read_bytes()
    for args in (
        ("status", renamed),
        ("report", renamed, "--out", tmp_path / "r.csv"),
        ("reconcile", renamed),
        ("retry", renamed, "--failed"),
        ("preview", renamed, "--out", tmp_path / "site"),
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        (line,) = _lines(result.stderr)
        assert "campaign.ledger.sqlite belongs to campaign 'spring-newsletter'" in line, args
        assert "rename campaign.ledger.sqlite to newsletter.ledger.sqlite" in line
    assert ledger_file.read_bytes() == before
    assert sorted(path.name for path in tmp_path.rglob("newsletter.*")) == ["newsletter.toml"]
    assert not (tmp_path / "r.csv").exists()
    assert not (tmp_path / "site").exists()
    assert len(api.deliveries) == 5


def test_a_full_disk_in_the_middle_of_a_run_is_one_line_and_mails_nobody_twice(
    api, cli, tmp_path, monkeypatch
):
    """The ledger fills the disk mid-run (SQLite's own SQLITE_FULL, from a page limit set on the real
    connection): exit 74 with one line saying so, no traceback; after resume everyone got one message."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    rows = [f"person{i}@example.com,Person {i},P{i},Berlin" for i in range(60)]
    (manifest.parent / "recipients.csv").write_text("email,name,first_name,city\n" + "\n".join(rows) + "\n")
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    opened = ledger_module.connect_ledger

    def connect_on_a_full_disk(path, *, read_only=False):
        connection = opened(path, read_only=read_only)
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        # Room for a few sends only, then SQLITE_FULL (a page or two: how many rows fit in one varies).
        connection.execute(f"PRAGMA max_page_count = {pages + 2}")
        return connection

    monkeypatch.setattr(ledger_module, "connect_ledger", connect_on_a_full_disk)
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 74, result.output
    (line,) = _lines(result.stderr)
    assert (
        "campaign.ledger.sqlite: cannot write the ledger (database or disk is full); free some space" in line
    )
    assert "Traceback" not in result.output
    # It stopped in the middle: some went out after the first, not all, and nobody twice.
    stopped_with = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert len(stopped_with) > 1
    assert len(stopped_with) < 60
    assert len(set(stopped_with)) == len(stopped_with)
    monkeypatch.setattr(ledger_module, "connect_ledger", opened)  # space again
    assert cli("resume", manifest, "--yes").exit_code == 0
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == sorted(f"person{i}@example.com" for i in range(60))


def test_a_key_scheme_change_is_refused_after_a_send_that_retry_put_back_to_pending(api, cli, tmp_path):
    """The only send so far ended unknown (it went out) and `retry --unknown` made it pending: adding
    key_column is still refused (exit 2), so that recipient is not mailed again under a new key."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(Fault.TIMEOUT_AFTER_SEND, times=1)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75  # its one send: unknown
    assert cli("retry", manifest, "--unknown").exit_code == 0
    assert len(api.deliveries) == 1
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace('email_column = "email"', 'email_column = "email"\nkey_column = "name"'))
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 2, result.output
    (line,) = _lines(result.stderr)
    assert "recipients.key_column: the ledger's recipients are keyed by email address" in line
    assert len(api.deliveries) == 1


def test_a_corrected_address_of_a_row_not_yet_sent_is_where_its_message_goes(api, cli, tmp_path):
    """key_column: the key is the person. Bob's address corrected between runs, before his turn: his
    message goes to the new address, and the old one (perhaps someone else's now) gets nothing; preview
    and the run agree on where it goes."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(
        text.replace('email_column = "email"', 'email_column = "email"\nkey_column = "first_name"')
    )
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    assert [d.payload["to"][0]["email"] for d in api.deliveries] == ["ann.lee@example.com"]
    listing = manifest.parent / "recipients.csv"
    listing.write_text(listing.read_text().replace("bob@example.org,", "robert@example.org,"))
    previewed = json.loads(cli("preview", manifest, "--json").stdout)
    shown = {sample["to"] for sample in previewed["samples"]}
    assert "robert@example.org" in shown
    assert "bob@example.org" not in shown
    assert cli("resume", manifest, "--yes").exit_code == 0
    mailed = Counter(d.payload["to"][0]["email"] for d in api.deliveries)
    assert mailed["robert@example.org"] == 1
    assert "bob@example.org" not in mailed
    assert set(mailed.values()) == {1}


@contextmanager
def _read_only(folder):
    """Make `folder` read-only even for root (the immutable attribute); skip where that is not possible."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_ledger_in_a_read_only_folder_is_read_by_status_and_report_and_refused_in_one_line(
    api, cli, tmp_path
):
    """status, report and preview read it as it stands; run, resume, retry and reconcile exit 74 in one
    line saying the folder is read-only, before printing a plan; nothing is sent."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    with _read_only(manifest.parent):
        status = cli("status", manifest, "--json")
        assert status.exit_code == 0, status.output
        assert json.loads(status.stdout)["states"]["sent"] == 2
        report = cli("report", manifest, "--out", tmp_path / "r.csv")
        assert report.exit_code == 0, report.output
        assert "Wrote 6 rows" in report.stdout
        assert cli("preview", manifest, "--out", tmp_path / "site").exit_code == 0
        for args in (
            ("run", manifest, "--yes"),
            ("resume", manifest, "--yes"),
            ("retry", manifest, "--failed"),
            ("reconcile", manifest),
        ):
            result = cli(*args)
            assert result.exit_code == 74, (args, result.output)
            assert result.stdout == ""
            (line,) = _lines(result.stderr)
            assert "cannot open the ledger to write" in line
            assert "it or its folder is read-only" in line
    assert len(api.deliveries) == 2


def test_a_first_run_in_a_read_only_folder_is_one_line_and_prints_no_plan(api, cli, tmp_path):
    """No ledger yet and a folder nothing can be created in: exit 74 in one line, no plan, no request."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    with _read_only(manifest.parent):
        result = cli("run", manifest, "--yes")
    assert result.exit_code == 74, result.output
    assert result.stdout == ""
    (line,) = _lines(result.stderr)
    # The first plan is written beside where the ledger goes while the list is checked: that fails first.
    assert "campaign.ledger.sqlite: cannot create the ledger (" in line
    assert "check the folder is writable" in line
    assert api.requests == []


def test_a_run_started_while_another_asks_for_confirmation_is_refused_without_a_plan(
    api, cli, tmp_path, monkeypatch
):
    """A run holds the ledger from before it prints its plan: a second `campaign run` (a real process)
    started while the first waits at its prompt exits 74 in one line, printing no plan and sending
    nothing; the first then sends each message once."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    seen: list[subprocess.CompletedProcess[str]] = []

    def confirm_after_a_second_run(question: str) -> bool:
        command = [sys.executable, "-m", "campaign", "run", str(manifest), "--yes"]
        seen.append(subprocess.run(command, capture_output=True, text=True, timeout=60, check=False))
        assert len(api.deliveries) == 1
        return True

    monkeypatch.setattr(sending, "sys", SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True)))
    monkeypatch.setattr(sending.typer, "confirm", confirm_after_a_second_run)
    first = cli("run", manifest)
    (second,) = seen
    assert second.returncode == 74, second.stdout + second.stderr
    assert second.stdout == ""
    (line,) = _lines(second.stderr)
    assert "campaign.ledger.sqlite: another campaign command (pid " in line
    assert first.exit_code == 0, first.output
    assert "4 to send" in first.output
    assert len(api.deliveries) == 5
