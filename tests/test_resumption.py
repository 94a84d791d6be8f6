"""Resuming an unchanged campaign: the plan stamp, the open rows read back, when the list is checked again."""

from __future__ import annotations

import pytest
from conftest import SECRET, copy_sample

import campaign.run as run_module
from campaign.clock import SystemClock
from campaign.ledger import PlanSpool, open_ledger
from campaign.manifest import load_manifest
from campaign.models import SkipReason
from campaign.pipeline import (
    LedgerJobs,
    check_rows,
    load_content_fingerprint,
    load_plan_stamp,
    run_preflight,
)
from campaign.testing import FakeNylas
from campaign.unsubscribe import parse_secrets


def _register(api: FakeNylas, manifest_path) -> None:
    for sender in load_manifest(manifest_path).senders:
        api.add_grant(sender.grant_id, sender.email or "")


@pytest.mark.parametrize("sample", ["newsletter", "outreach", "invoices"])
def test_open_rows_read_back_are_the_jobs_a_full_preflight_makes(sample, tmp_path):
    """CSV and Parquet lists (names, pinned senders, duplicates, suppressed rows): the jobs rebuilt from
    the cells the plan recorded are those the check made from the list itself (Parquet numbers too)."""
    path = copy_sample(sample, tmp_path)
    manifest = load_manifest(path)
    pipeline = check_rows(manifest, secrets=parse_secrets(SECRET))
    checked = [row.job for batch in pipeline.assigned() for row in batch if row.job is not None]
    assert len(checked) >= 3
    ledger = open_ledger(tmp_path / "ledger.sqlite", clock=SystemClock(), campaign=manifest.campaign.name)
    try:
        with PlanSpool() as spool:
            run_preflight(manifest, spool, secrets=parse_secrets(SECRET), skip_invalid=False)
            ledger.record_plan(spool.planned(), spool.skips())
        second, last = checked[1], checked[-1]
        ledger.claim(last.recipient.key, sender=last.sender)  # left in flight: it comes first
        ledger.record_skipped(second.recipient.key, SkipReason.UNSUBSCRIBED, "unsubscribed since")
        source = LedgerJobs(ledger, manifest.recipients, None)
        jobs = {sender: list(source(sender, 1_000)) for sender in source.counts}
    finally:
        ledger.close()
    # Each sender's rows: the one left in flight first (its key ages), then the pending ones in list order.
    listed = [last] + [job for job in checked if job not in (second, last)]
    expected = {sender: [job for job in listed if job.sender == sender] for sender in jobs}
    assert jobs == expected
    assert sum(map(len, jobs.values())) == len(checked) - 1
    assert [j.recipient.fields for j in jobs[last.sender]] == [
        j.recipient.fields for j in expected[last.sender]
    ]


def test_resume_of_an_unchanged_campaign_does_not_check_the_list_again(api, cli, tmp_path, preflights):
    """run --limit 2 checks the list once; the resume trusts it and sends the other three, each once."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    first = cli("run", manifest, "--yes", "--limit", "2")
    assert first.exit_code == 75, first.output
    assert "checked, 5 to send, 1 duplicate, 1 suppressed" in first.stdout
    assert len(preflights) == 1
    second = cli("resume", manifest, "--yes")
    assert second.exit_code == 0, second.output
    assert "unchanged since it was checked, 3 to send, 1 skipped earlier" in second.stdout
    assert len(preflights) == 1
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == [
        "ann.lee@example.com",
        "bob@example.org",
        "chen.wei@example.net",
        "dora@example.com",
        "eve@example.org",
    ]
    dora = next(d.payload for d in api.deliveries if d.payload["to"][0]["email"] == "dora@example.com")
    assert dora["to"] == [{"email": "dora@example.com", "name": "Dora O'Neil, PhD"}]
    assert dora["subject"] == "Spring news for Dora"


def _stamp(path):
    manifest = load_manifest(path)
    return load_plan_stamp(manifest, content=load_content_fingerprint(manifest))


def _append_row(manifest):
    with (manifest.parent / "recipients.csv").open("a", encoding="utf-8") as handle:
        handle.write("gina@example.com,Gina Hale,Gina,Oslo\n")


def _suppress_more(manifest):
    with (manifest.parent / "unsubscribed.txt").open("a", encoding="utf-8") as handle:
        handle.write("\ndora@example.com\n")


def _slow_the_sender(manifest):
    manifest.write_text(manifest.read_text().replace("per_second = 4", "per_second = 3"))


def _edit_the_template(manifest):
    template = manifest.parent / "spring.html.j2"
    template.write_text(template.read_text() + "\n")


@pytest.mark.parametrize(
    ("change", "flags"),
    [
        (_append_row, ()),
        (_suppress_more, ()),
        (_slow_the_sender, ()),
        (_edit_the_template, ("--allow-changed-content",)),
    ],
    ids=["list", "suppression-list", "manifest", "template"],
)
def test_any_change_to_the_plan_inputs_checks_the_list_again(api, cli, tmp_path, preflights, change, flags):
    """The list, a suppression list, a manifest setting or a template: checked again."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    before = _stamp(manifest)
    change(manifest)
    after = _stamp(manifest)
    assert after != before
    second = cli("resume", manifest, "--yes", *flags)
    assert second.exit_code == 0, second.output
    assert len(preflights) == 2
    appended = change is _append_row
    assert ("checked the 1 row added at its end, " if appended else "checked, ") in second.stdout
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert len(emails) == len(set(emails))
    if change is _suppress_more:
        assert "dora@example.com" not in emails[2:]
    if change is _append_row:
        assert "gina@example.com" in emails


def test_an_address_unsubscribed_between_runs_is_not_mailed_by_an_unchanged_resume(
    api, cli, tmp_path, preflights
):
    """The unsubscribe store is not part of the plan: each send checks it, so the resume skips the row."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    store = manifest.parent / "optouts.sqlite"
    assert cli("suppress", "add", "nobody@example.com", "--store", store).exit_code == 0
    text = manifest.read_text().replace(
        'suppress = ["unsubscribed.txt"]', 'suppress = ["unsubscribed.txt", "optouts.sqlite"]'
    )
    manifest.write_text(text)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    sent = {d.payload["to"][0]["email"] for d in api.deliveries}
    target = next(e for e in ["dora@example.com", "eve@example.org", "chen.wei@example.net"] if e not in sent)
    assert cli("suppress", "add", target, "--store", store).exit_code == 0
    second = cli("resume", manifest, "--yes")
    assert second.exit_code == 0, second.output
    assert len(preflights) == 1
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert target not in emails
    assert len(emails) == 4


def test_an_unreadable_list_falls_back_to_the_full_check_and_its_error(api, cli, tmp_path):
    """A list deleted between runs: the stamp cannot match, and the full check names the missing file."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    (manifest.parent / "recipients.csv").unlink()
    second = cli("resume", manifest, "--yes")
    assert second.exit_code == 66, second.output
    assert "recipients.csv: recipient list not found" in second.output
    assert len(api.deliveries) == 2


def test_a_plan_recorded_by_another_command_meanwhile_stops_the_resume(api, cli, tmp_path, monkeypatch):
    """The stamp is checked again before sending: if something changed the plan meanwhile, nothing is sent."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    recorded = run_module.record_key_scheme

    def record_then_another_run_writes(ledger, manifest):
        recorded(ledger, manifest)
        # A writer that ignored the lock, between this run's checks and its sends.
        ledger._set_meta("plan_stamp", "recorded by another run")

    monkeypatch.setattr(run_module, "record_key_scheme", record_then_another_run_writes)
    second = cli("resume", manifest, "--yes")
    assert second.exit_code == 74, second.output
    assert "another command changed the ledger" in second.output
    assert len(api.deliveries) == 2


def test_a_changed_template_is_refused_before_any_row_is_checked(api, cli, tmp_path, preflights):
    """Without --allow-changed-content, a content change after sending began fails at once (exit 2),
    before the list is checked: on a million-row list that is seconds, not minutes."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    before = len(preflights)
    _edit_the_template(manifest)
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 2, refused.output
    assert "--allow-changed-content" in refused.stderr
    assert len(preflights) == before
    assert len(api.deliveries) == 2
