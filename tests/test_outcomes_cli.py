"""Acting on outcomes through the CLI, against the fake Nylas on loopback: report, retry, reconcile,
changed content, rows removed from the list, the writer lock, and the run summary's next steps."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest
from conftest import copy_sample

from campaign.ledger import open_ledger
from campaign.manifest import load_manifest
from campaign.testing import FakeNylas, Fault
from campaign.testing.clock import FakeClock


def _register(api: FakeNylas, manifest_path) -> None:
    for sender in load_manifest(manifest_path).senders:
        api.add_grant(sender.grant_id or "", sender.email or "")


def _delivered(api: FakeNylas) -> Counter[str]:
    return Counter(d.payload["to"][0]["email"] for d in api.deliveries)


def _status(cli, manifest) -> dict:
    return json.loads(cli("status", manifest, "--json").stdout)


def test_report_writes_one_row_per_recipient_to_csv_and_parquet(api, cli, tmp_path):
    """report: every ledger row with state, sender, attempts, message id, error and times; --state filters."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(Fault.REJECTED, times=1)
    assert cli("run", manifest, "--yes").exit_code == 1
    result = cli("report", manifest, "--out", tmp_path / "all.csv")
    assert result.exit_code == 0, result.output
    assert "Wrote 6 rows" in result.stdout
    frame = pl.read_csv(tmp_path / "all.csv", infer_schema=False)
    assert frame.height == 6  # 5 to send + 1 suppressed (the duplicate shares its original's row)
    assert set(frame["state"]) == {"sent", "failed", "skipped"}
    sent = frame.filter(pl.col("state") == "sent")
    assert set(sent["message_id"]) == {d.id for d in api.deliveries}
    assert set(sent["sender"]) == {"founder"}
    assert all(value.endswith("Z") for value in sent["sent_at"])
    failed = cli("report", manifest, "--out", tmp_path / "failed.parquet", "--state", "failed")
    assert failed.exit_code == 0, failed.output
    only = pl.read_parquet(tmp_path / "failed.parquet")
    assert only.height == 1
    assert (only["state"][0], only["error_status"][0], only["attempts"][0]) == ("failed", 402, 1)
    assert "recipient failed" in only["error_message"][0]
    assert only.schema["sent_at"] == pl.Datetime("ms", "UTC")


def test_report_refuses_other_suffixes_and_needs_a_ledger(api, cli, tmp_path):
    """--out must be .csv or .parquet (exit 2); with no ledger yet there is nothing to report (exit 66)."""
    manifest = copy_sample("newsletter", tmp_path)
    none = cli("report", manifest, "--out", tmp_path / "r.csv")
    assert none.exit_code == 66
    assert "has not run" in none.stderr
    _register(api, manifest)
    cli("run", manifest, "--yes")
    bad = cli("report", manifest, "--out", tmp_path / "r.xlsx")
    assert bad.exit_code == 2
    assert ".csv or .parquet" in bad.stderr


def test_report_never_writes_over_the_campaigns_own_list(api, cli, tmp_path):
    """--out naming the recipient list (or a suppression file) is refused (exit 2), the file untouched."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    cli("run", manifest, "--yes")
    for name in ("recipients.csv", "unsubscribed.txt"):
        before = (manifest.parent / name).read_bytes()
        result = cli("report", manifest, "--out", manifest.parent / name)
        assert result.exit_code == 2, result.output
        assert "is the campaign's own" in result.stderr
        assert (manifest.parent / name).read_bytes() == before


def test_retry_failed_then_resume_sends_those_rows_once_with_a_new_key(api, cli, tmp_path):
    """A 402 fails a row; after the fix, retry --failed and resume send it, once, under a new key."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(Fault.REJECTED, times=1)
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 1
    assert f"campaign retry {manifest} --failed" in first.stdout
    failed_key = api.requests[0].idempotency_key
    assert cli("retry", manifest).exit_code == 2  # say which rows
    retried = cli("retry", manifest, "--failed")
    assert retried.exit_code == 0, retried.output
    assert "1 failed row is pending again, with a new idempotency key" in retried.stdout
    assert f"campaign resume {manifest}" in retried.stdout
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert list(_delivered(api).values()) == [1] * 5
    assert all(d.idempotency_key != failed_key for d in api.deliveries)
    assert _status(cli, manifest)["done"] is True


def test_a_failed_row_suppressed_before_its_retry_is_never_sent(api, cli, tmp_path):
    """A 402 fails the first row; its recipient is then added to the suppression file and a run checks
    the list (the failed row is not open, so it stays failed). `retry --failed` puts it back and the
    resume that follows finds the list unchanged: the check before the claim still skips it."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(Fault.REJECTED, times=1)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75  # rows left
    refused = api.requests[0]
    failed = next(row.email for row in _ledger_rows(manifest) if row.state.value == "failed")
    with (manifest.parent / "unsubscribed.txt").open("a", encoding="utf-8") as optouts:
        optouts.write(f"{failed}\n")
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code in (0, 75)
    assert cli("retry", manifest, "--failed").exit_code == 0
    resumed = cli("resume", manifest, "--yes")
    assert resumed.exit_code == 0, resumed.output
    assert failed not in _delivered(api)
    assert refused.status == 402
    row = next(row for row in _ledger_rows(manifest) if row.email == failed)
    assert (row.state.value, (row.reason or "").split(":")[0]) == ("skipped", "suppressed")


def _ledger_rows(manifest):
    loaded = load_manifest(manifest)
    ledger = open_ledger(
        manifest.parent / "campaign.ledger.sqlite", clock=FakeClock(), campaign=loaded.campaign.name
    )
    try:
        return list(ledger.rows())
    finally:
        ledger.close()


def test_reconcile_settles_unknown_rows_and_resume_sends_the_ones_that_did_not_go(
    api, cli, cli_clock, tmp_path
):
    """A 504 after sending and a cached 503 end unknown; reconcile finds the first at once, and calls the
    second not sent only after the settle time (a mailbox may list a sent message late)."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(Fault.TIMEOUT_AFTER_SEND, times=1)
    api.script(Fault.UNAVAILABLE, times=1)
    run = cli("run", manifest, "--yes")
    assert run.exit_code == 1, run.output
    status = _status(cli, manifest)
    assert status["states"]["unknown"] == 2
    unknown_step = next(step for step in status["next"] if step["state"] == "unknown")
    assert "it can call the others not sent from" in unknown_step["what"]
    assert f"campaign reconcile {manifest}" in run.stdout
    assert "it can call the others not sent from" in run.stdout
    early = cli("reconcile", manifest)
    assert early.exit_code == 1, early.output
    assert "run reconcile again after" in early.stdout
    assert _status(cli, manifest)["states"]["unknown"] == 1  # the one found is sent; the other waits
    cli_clock.advance(15 * 60)
    settled = cli("reconcile", manifest, "--json")
    assert settled.exit_code == 0, settled.output
    decisions = json.loads(settled.stdout)["decisions"]
    assert [d["verdict"] for d in decisions] == ["pending"]
    found = json.loads(cli("status", manifest, "--json").stdout)
    assert found["states"]["unknown"] == 0
    status = _status(cli, manifest)
    assert (status["states"]["sent"], status["states"]["pending"]) == (4, 1)
    assert status["next"][0]["commands"] == [f"campaign resume {manifest}"]
    assert cli("resume", manifest, "--yes").exit_code == 0
    assert list(_delivered(api).values()) == [1] * 5
    again = cli("reconcile", manifest)
    assert again.exit_code == 0
    assert "nothing to reconcile" in again.stdout


def test_the_sandbox_never_teaches_retry_unknown_as_the_step_for_a_real_campaign(cli, tmp_path, monkeypatch):
    """Rows left unknown by a sandbox run: the sandbox cannot look them up (it forgets what it received),
    so its step stays retry, but the words say so and name `campaign reconcile` as the step for a real
    campaign; `status --sandbox` says the same."""
    from campaign.cli import sending

    build_sandbox_api = sending.build_sandbox_api

    def answering_one_send_ambiguously(*args, **kwargs) -> FakeNylas:
        fake = build_sandbox_api(*args, **kwargs)
        fake.script(Fault.TIMEOUT_AFTER_SEND, times=1)
        return fake

    monkeypatch.setattr(sending, "build_sandbox_api", answering_one_send_ambiguously)
    manifest = copy_sample("newsletter", tmp_path)
    run = cli("run", manifest, "--sandbox", "--yes")
    assert run.exit_code == 1, run.output
    said = " ".join(run.stdout.split())
    assert "in the sandbox reconcile cannot look messages up" in said
    assert f"for a real campaign the step is `campaign reconcile {manifest}`" in said
    status = json.loads(cli("status", manifest, "--sandbox", "--json").stdout)
    unknown_step = next(step for step in status["next"] if step["state"] == "unknown")
    assert f"for a real campaign the step is `campaign reconcile {manifest}`" in unknown_step["what"]
    assert unknown_step["commands"][0] == f"campaign retry {manifest} --unknown --sandbox"


def test_changed_content_after_sending_began_needs_the_flag_and_is_recorded(api, cli, tmp_path):
    """A new subject mid-campaign: resume refuses (exit 2, nothing sent) unless --allow-changed-content."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    text = manifest.read_text().replace("Spring news for", "Spring update for")
    manifest.write_text(text)
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 2
    assert "--allow-changed-content" in refused.stderr
    assert len(api.deliveries) == 2
    allowed = cli("resume", manifest, "--yes", "--allow-changed-content")
    assert allowed.exit_code == 0, allowed.output
    assert "recorded" in allowed.stdout
    subjects = [d.payload["subject"].split(" for ")[0] for d in api.deliveries]
    assert subjects == ["Spring news"] * 2 + ["Spring update"] * 3
    ledger = open_ledger(
        manifest.parent / "campaign.ledger.sqlite", clock=FakeClock(), campaign="spring-newsletter"
    )
    assert [entry.kind for entry in ledger.journal()] == ["content_changed"]
    ledger.close()


def test_a_template_edit_counts_as_changed_content(api, cli, tmp_path):
    """Editing the body template (not only the manifest) is noticed too."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    template = manifest.parent / "spring.html.j2"
    template.write_text(template.read_text() + "\n<p>P.S. new line</p>\n")
    assert cli("resume", manifest, "--yes").exit_code == 2


def test_rows_removed_from_the_list_are_left_alone_and_reported(api, cli, tmp_path):
    """A pending row deleted from the CSV is not sent, not lost from the ledger, and does not block 'done'."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    first = cli("run", manifest, "--yes", "--limit", "2")
    assert first.exit_code == 75
    assert "Not done:" in first.stdout
    assert f"campaign resume {manifest}" in first.stdout
    csv = manifest.parent / "recipients.csv"
    lines = csv.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("eve@")]
    assert len(kept) == len(lines) - 1
    csv.write_text("".join(kept))
    second = cli("resume", manifest, "--yes")
    assert second.exit_code == 0, second.output
    assert "1 row is no longer in the list: left as it was" in second.stdout
    assert "Not done" not in second.stdout
    assert "eve@example.org" not in _delivered(api)
    status = _status(cli, manifest)
    assert (status["done"], status["removed_from_list"], status["states"]["pending"]) == (True, 1, 1)


def test_a_second_command_on_a_ledger_in_use_is_refused(api, cli, tmp_path):
    """While another process holds the ledger, run and reconcile exit 74 and send nothing."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    path = manifest.parent / "campaign.ledger.sqlite"
    holder = open_ledger(path, clock=FakeClock(), campaign="spring-newsletter", exclusive=True)
    try:
        result = cli("run", manifest, "--yes")
        assert result.exit_code == 74
        assert "another campaign command" in result.stderr
        assert cli("reconcile", manifest).exit_code == 74
        assert cli("status", manifest, "--json").exit_code == 0  # reading needs no lock
    finally:
        holder.close()
    assert api.requests == []


@pytest.mark.parametrize("value", ["15", "1d", "-5m", "m", "1.5h"])
def test_reconcile_refuses_a_min_age_it_cannot_read(api, cli, tmp_path, value):
    """--min-age takes 90s, 15m or 1h: anything else is exit 2 with one line, and nothing is asked."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    result = cli("reconcile", manifest, "--min-age", value)
    assert result.exit_code == 2
    assert "--min-age:" in result.stderr
    assert "90s, 15m or 1h" in result.stderr
    assert api.requests == []
