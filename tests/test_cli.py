"""The CLI end to end: both samples against the fake Nylas on loopback, re-runs, limits, status."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
from urllib.parse import urlparse

import httpx
import pytest
from conftest import API_KEY, REPO, SECRET, copy_sample
from support import serve_sandbox

from campaign.manifest import load_manifest
from campaign.testing import FakeNylas
from campaign.unsubscribe import parse_secrets, verify_token


def _register(api: FakeNylas, manifest_path) -> dict[str, str]:
    manifest = load_manifest(manifest_path)
    for sender in manifest.senders:
        api.add_grant(sender.grant_id, sender.email or "")
    return {sender.grant_id: sender.name for sender in manifest.senders}


def _headers(delivery) -> dict[str, str]:
    return {h["name"]: h["value"] for h in delivery.payload.get("custom_headers", [])}


def test_newsletter_sample_sends_every_recipient_exactly_once(api, cli, tmp_path):
    """The CSV sample: 7 rows, 1 duplicate and 1 suppressed, so 5 messages, each right and each once."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert "5 to send, 1 duplicate, 1 suppressed" in result.stdout
    delivered = {d.payload["to"][0]["email"]: d for d in api.deliveries}
    assert sorted(delivered) == [
        "ann.lee@example.com",
        "bob@example.org",
        "chen.wei@example.net",
        "dora@example.com",
        "eve@example.org",
    ]
    assert len(api.deliveries) == 5
    ann = delivered["ann.lee@example.com"]
    assert ann.payload["subject"] == "Spring news for Ann"
    assert ann.payload["to"] == [{"email": "ann.lee@example.com", "name": "Ann Lee"}]
    assert "Hi Ann," in ann.payload["body"]
    assert ann.payload.get("is_plaintext", False) is False
    assert ann.payload["reply_to"] == [{"email": "hello@example.com"}]
    assert ann.payload["tracking_options"]["opens"] is True
    assert ann.payload["metadata"]["key1"] == "spring-newsletter"
    assert ann.payload["metadata"]["key2"] == "ann.lee@example.com"
    headers = _headers(ann)
    assert headers["X-Campaign"] == "spring-newsletter"
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https_url = headers["List-Unsubscribe"].split(",")[0].strip()[1:-1]
    assert urlparse(https_url).scheme == "https"
    token = urlparse(https_url).query.removeprefix("t=")
    claims = verify_token(token, secrets=parse_secrets(SECRET))
    assert claims is not None
    assert (claims.campaign, claims.recipient_key) == ("spring-newsletter", "ann.lee@example.com")
    assert token in ann.payload["body"]  # the footer link is the same per-recipient URL
    keys = [d.idempotency_key for d in api.deliveries]
    assert None not in keys
    assert len(set(keys)) == 5


def test_second_run_sends_nothing(api, cli, tmp_path):
    """Re-running a finished campaign sends nothing and exits 0."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes").exit_code == 0
    before = len(api.requests)
    again = cli("run", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert len(api.requests) == before


def test_new_rows_are_sent_on_the_next_run(api, cli, tmp_path):
    """Adding a row to the list and re-running sends only to that row."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes").exit_code == 0
    with (manifest.parent / "recipients.csv").open("a", encoding="utf-8") as handle:
        handle.write("gina@example.com,Gina Hale,Gina,Oslo\n")
    assert cli("run", manifest, "--yes").exit_code == 0
    assert [d.payload["to"][0]["email"] for d in api.deliveries].count("gina@example.com") == 1
    assert len(api.deliveries) == 6


def test_a_row_skipped_for_a_missing_file_is_sent_once_the_file_is_there(api, cli, tmp_path):
    """--skip-invalid skips a row whose invoice file is missing (a run without the flag keeps it skipped);
    add the file and run again, the list itself unchanged: the row validates, goes back to pending and
    is sent, once."""
    manifest = copy_sample("invoices", tmp_path)
    _register(api, manifest)
    with (manifest.parent / "recipients.csv").open("a", encoding="utf-8") as handle:
        handle.write("dan@example.com,Dan Ray,Dan,INV-1004,10.00\n")
    first = cli("run", manifest, "--yes", "--skip-invalid")
    assert first.exit_code == 0, first.output
    assert "dan@example.com" not in [d.payload["to"][0]["email"] for d in api.deliveries]
    # Without the flag, the file still missing: the row stays skipped, as the first run decided.
    again = cli("run", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert "dan@example.com" not in [d.payload["to"][0]["email"] for d in api.deliveries]
    invoices = manifest.parent / "invoices"
    (invoices / "INV-1004.pdf").write_bytes((invoices / "INV-1001.pdf").read_bytes())
    second = cli("run", manifest, "--yes")
    assert second.exit_code == 0, second.output
    assert "1 row skipped earlier as invalid now validates and is pending again" in second.output
    sent = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sent.count("dan@example.com") == 1
    assert len(sent) == len(set(sent)) == 4
    files = [a["filename"] for a in api.deliveries[-1].payload.get("attachments", [])]
    assert "Invoice INV-1004.pdf" in files


def test_outreach_sample_respects_sender_column(api, cli, tmp_path):
    """The Parquet sample: 9 plain-text messages; pinned rows go from their rep's grant."""
    manifest = copy_sample("outreach", tmp_path)
    grants = _register(api, manifest)
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert len(api.deliveries) == 9
    by_email = {d.payload["to"][0]["email"]: d for d in api.deliveries}
    assert grants[by_email["tom@contoso.example.com"].grant_id] == "bob"
    assert grants[by_email["priya@northwind.example.com"].grant_id] == "alice"
    assert grants[by_email["noah@fourthcoffee.example.com"].grant_id] == "carol"
    tom = by_email["tom@contoso.example.com"].payload
    assert tom["is_plaintext"] is True
    assert tom["subject"] == "Contoso and Acme: a quick question"
    assert "growing its sales team" in tom["body"]
    assert tom["from"] == [{"email": "bob@acme.example.com", "name": "Bob Ortiz"}]
    assert "mailto:" not in _headers(by_email["tom@contoso.example.com"])["List-Unsubscribe"]


def test_limit_stops_with_75_and_resume_finishes(api, cli, tmp_path):
    """--limit 2 sends two and exits 75 with the resume command; resume sends the other three once."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    first = cli("run", manifest, "--yes", "--limit", "2")
    assert first.exit_code == 75, first.output
    assert f"campaign resume {manifest}" in first.output
    assert len(api.deliveries) == 2
    second = cli("resume", manifest, "--yes")
    assert second.exit_code == 0, second.output
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert len(emails) == 5
    assert len(set(emails)) == 5


def test_status_json_reports_the_ledger(api, cli, tmp_path):
    """status --json has the documented keys and agrees with what the fake received."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    before = json.loads(cli("status", manifest, "--json").stdout)
    assert before["started"] is False
    cli("run", manifest, "--yes")
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert status["done"] is True
    assert status["states"]["sent"] == len(api.deliveries) == 5
    # The duplicate shares its original's key, so the ledger has one row for both.
    assert status["skipped"] == {"suppressed": 1}
    assert status["senders"]["founder"]["sent_last_24h"] == 5
    assert status["senders"]["founder"]["budget_left"] == 495
    assert API_KEY not in json.dumps(status)


def test_permanent_failure_exits_1(api, cli, tmp_path):
    """A 402 for one recipient: the others are sent, exit 1, status names the cause."""
    from campaign.testing import Fault

    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(Fault.REJECTED, times=1)
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 1, result.output
    assert len(api.deliveries) == 4
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert status["states"]["failed"] == 1
    assert any(cause.startswith("402") for cause in status["errors"])


def test_refused_api_key_exits_77_and_loses_nothing(api, cli, tmp_path, monkeypatch):
    """A wrong API key: exit 77, nothing sent, every row still pending for the next run."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    monkeypatch.setenv("NYLAS_API_KEY", "nyk_v0_wrong_key")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 77, result.output
    assert "nyk_v0_wrong_key" not in result.output
    assert api.deliveries == []
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert status["states"]["pending"] == 5


def test_a_grant_deleted_mid_run_stops_its_sender_with_exit_77_and_loses_nothing(api, cli, tmp_path):
    """The mailbox's owner disconnected it after two sends: Nylas answers 404 not_found_error to the next
    send. That is the grant's fault, not the message's: one send at a time, so exactly one 404 at the
    fake and no request after it, no row failed (before, every row failed one by one until
    stop_after_rejections), the rest pending for a run once it is connected again, exit 77 with a line
    saying what to check."""
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(manifest.read_text().replace("concurrency = 2", "concurrency = 1"))
    (grant,) = _register(api, manifest)
    result = cli("run", manifest, "--yes", "--limit", "2")
    assert result.exit_code == 75, result.output
    api.remove_grant(grant)
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 77, result.output
    assert "knows no such grant" in result.output
    assert len(api.deliveries) == 2
    assert [record.status for record in api.requests] == [200, 200, 404]
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert (status["states"]["pending"], status["states"]["failed"]) == (3, 0)


def test_a_new_unsubscribe_store_after_sending_began_is_refused_saying_it_counts(api, cli, tmp_path):
    """[unsubscribe] is step 1's content: pointing it at another store after the first send is refused as
    a changed template is (exit 2, nothing sent), and the line says the store counts (it named only the
    subject, a template or a header, and the user had changed none)."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    text = manifest.read_text()
    manifest.write_text(
        text.replace('secret_env = "CAMPAIGN', 'store = "moved.sqlite"\nsecret_env = "CAMPAIGN')
    )
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 2, refused.output
    assert "its store included" in refused.stderr
    assert len(api.deliveries) == 1


def test_run_without_terminal_and_without_yes_refuses(api, cli, tmp_path):
    """No terminal to confirm on and no --yes: exit 2, nothing sent, no ledger."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    result = cli("run", manifest)
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert api.requests == []
    assert not (manifest.parent / "campaign.ledger.sqlite").exists()
    assert "Send 5 messages from 1 sender for real? There is no terminal" in result.stderr
    (manifest.parent / "recipients.csv").write_text("email,name,first_name,city\nbob@example.org,Bob,Bob,\n")
    one = cli("run", manifest)
    assert one.exit_code == 2
    assert "Send 1 message from 1 sender for real? There is no terminal" in one.stderr
    assert api.requests == []


def test_preview_sends_nothing_and_writes_no_ledger(api, cli, tmp_path):
    """preview renders every message, writes the sample payloads, sends nothing."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    out = tmp_path / "preview"
    result = cli("preview", manifest, "--out", out, "--sample", "2")
    assert result.exit_code == 0, result.output
    assert "Spring news for Ann" in result.stdout
    assert api.requests == []
    assert not (manifest.parent / "campaign.ledger.sqlite").exists()
    payload = json.loads((out / "messages" / "0001.json").read_text())
    assert payload["subject"] == "Spring news for Ann"
    dry = cli("run", manifest, "--dry-run")
    assert dry.exit_code == 0
    assert "Spring news for Ann" in dry.stdout
    assert api.requests == []
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    ledger = (manifest.parent / "campaign.ledger.sqlite").read_bytes()
    dry = cli("resume", manifest, "--dry-run")  # README: resume takes run's options
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing sent" in dry.stdout
    assert len(api.requests) == 1
    assert (manifest.parent / "campaign.ledger.sqlite").read_bytes() == ledger


def test_preview_json_summary(api, cli, tmp_path):
    """preview --json gives counts and per-sender plans for pipelines."""
    manifest = copy_sample("outreach", tmp_path)
    data = json.loads(cli("preview", manifest, "--json").stdout)
    assert data["to_send"] == 9
    assert {s["name"]: s["messages"] for s in data["senders"]}["bob"] >= 2
    assert sum(s["messages"] for s in data["senders"]) == 9
    assert api.requests == []


def test_a_domain_sender_has_the_same_grant_id_in_preview_and_status_json(api, cli, tmp_path):
    """A sender that is a domain: `grant_id` is `domain:<domain>` in preview --json and in status --json,
    before the campaign started and after it sent (its `domain` key says the domain too)."""
    manifest = copy_sample("newsletter", tmp_path)
    grant = 'grant_id = "0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11"'
    manifest.write_text(manifest.read_text().replace(grant, 'domain = "example.com"'))
    preview = json.loads(cli("preview", manifest, "--json").stdout)
    assert [sender["grant_id"] for sender in preview["senders"]] == ["domain:example.com"]
    before = json.loads(cli("status", manifest, "--json").stdout)
    assert before["senders"]["founder"]["grant_id"] == "domain:example.com"
    api.add_domain("example.com")
    sent = cli("run", manifest, "--yes")
    assert sent.exit_code == 0, sent.output
    assert {d.grant_id for d in api.deliveries} == {"domain:example.com"}
    after = json.loads(cli("status", manifest, "--json").stdout)["senders"]["founder"]
    assert (after["grant_id"], after["domain"]) == ("domain:example.com", "example.com")


def test_sandbox_run_needs_no_account(cli, tmp_path, monkeypatch):
    """--sandbox sends to the in-process fake with no key or secret set, and writes the outbox."""
    for name in ("NYLAS_API_KEY", "CAMPAIGN_UNSUBSCRIBE_SECRET", "NYLAS_API_URI"):
        monkeypatch.delenv(name, raising=False)
    manifest = copy_sample("newsletter", tmp_path)
    result = cli("run", manifest, "--sandbox", "--yes")
    assert result.exit_code == 0, result.output
    outbox = manifest.parent / "campaign.sandbox" / "outbox"
    payloads = sorted(outbox.glob("*.json"))
    assert len(payloads) == 5
    assert "dora@example.com" in result.stdout
    assert not (manifest.parent / "campaign.ledger.sqlite").exists()  # the real ledger is untouched
    again = cli("run", manifest, "--sandbox", "--yes")
    assert again.exit_code == 0
    assert "no messages" in again.stdout


def _unwritable_outbox(outbox, how: str) -> None:
    """Make `outbox` a place the sandbox cannot write: a file in the folder's place, or a read-only
    folder (root writes there anyway, unless it dropped CAP_DAC_OVERRIDE: that case is skipped then)."""
    outbox.parent.mkdir(exist_ok=True)
    if how == "file":
        outbox.write_text("not a folder\n")
    else:
        outbox.mkdir()
        outbox.chmod(0o500)


def _writes_in_read_only_folders(tmp_path) -> bool:
    """Whether this process writes in a folder it made read-only (root does, unless it dropped the
    capability to)."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o500)
    try:
        (probe / "file").write_text("")
    except PermissionError:
        return False
    return True


@pytest.mark.parametrize("how", ["file", "read-only"])
def test_a_sandbox_run_whose_outbox_cannot_be_written_stops_before_sending(cli, tmp_path, how):
    """An outbox the sandbox cannot write is found before the first send: exit 66, one line naming it,
    nothing sent and no ledger (it was a traceback after every message went, before)."""
    if how == "read-only" and _writes_in_read_only_folders(tmp_path):
        pytest.skip("this user writes in a read-only folder (root)")
    manifest = copy_sample("newsletter", tmp_path)
    outbox = manifest.parent / "campaign.sandbox" / "outbox"
    _unwritable_outbox(outbox, how)
    result = cli("run", manifest, "--sandbox", "--yes")
    assert result.exit_code == 66, result.output
    assert result.stderr.count("\n") == 1
    assert f"{outbox}: the sandbox cannot write its outbox" in result.stderr
    assert "nothing was sent" in result.stderr
    assert not (outbox.parent / "ledger.sqlite").exists()  # nothing recorded either


def test_a_sandbox_outbox_that_fails_after_the_sends_is_one_line_and_the_sends_stay_sent(
    cli, tmp_path, monkeypatch
):
    """The outbox is written once the sends are done: if it can no longer be written then (here a file
    put in its place during the run), one line names it and says the sends stand, exit 66, and the
    ledger still holds every message the sandbox accepted as sent."""
    from campaign.cli import sending

    manifest = copy_sample("newsletter", tmp_path)
    outbox = manifest.parent / "campaign.sandbox" / "outbox"
    run_campaign = sending.run_campaign

    def run_then_block_the_outbox(*args, **kwargs):
        outcome = run_campaign(*args, **kwargs)
        if outbox.exists():  # made (empty) before the first send, written after the last
            outbox.rmdir()
        outbox.write_text("not a folder\n")
        return outcome

    monkeypatch.setattr(sending, "run_campaign", run_then_block_the_outbox)
    result = cli("run", manifest, "--sandbox", "--yes")
    assert result.exit_code == 66, result.output
    assert result.stderr.count("\n") == 1
    assert f"{outbox}: the sandbox cannot write its outbox (not a folder)" in result.stderr
    assert "stays sent" in result.stderr
    status = json.loads(cli("status", manifest, "--sandbox", "--json").stdout)
    assert status["states"]["sent"] == 5


def test_resume_without_a_ledger_exits_66(api, cli, tmp_path):
    """resume on a campaign never run says so and exits 66."""
    manifest = copy_sample("newsletter", tmp_path)
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 66
    assert "nothing to resume" in result.stderr
    assert api.requests == []
    sandboxed = cli("resume", manifest, "--yes", "--sandbox")  # the command it suggests runs as it is
    assert sandboxed.exit_code == 66
    assert "start with `campaign run " in sandboxed.stderr
    assert sandboxed.stderr.rstrip().endswith("--sandbox`")
    previewed = cli("resume", manifest, "--dry-run")  # resume needs the ledger, dry run or not
    assert previewed.exit_code == 66, previewed.output
    assert "start with `campaign run " in previewed.stderr


def test_init_writes_a_starter_and_never_overwrites(cli, tmp_path):
    """init writes a campaign that previews cleanly; a second init exits 1 and changes nothing."""
    target = tmp_path / "new folder"
    made = cli("init", target)
    assert made.exit_code == 0
    manifest = target / "campaign.toml"
    original = manifest.read_text()
    # The next step it prints works as printed, with no account and no secret set.
    next_step = next(line for line in made.stdout.splitlines() if line.startswith("Next: campaign "))
    assert shlex.split(next_step.removeprefix("Next: campaign ")) == ["preview", str(manifest), "--sandbox"]
    assert cli("preview", manifest, "--sandbox").exit_code == 0
    again = cli("init", target)
    assert again.exit_code == 1
    assert "never overwrites" in again.stderr
    assert manifest.read_text() == original


def test_init_never_writes_through_a_dangling_link(cli, tmp_path):
    """A link where a starter file goes, even one to nothing yet: exit 1, nothing written anywhere."""
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "recipients.csv").symlink_to(tmp_path / "victim.txt")
    result = cli("init", folder)
    assert result.exit_code == 1, result.output
    assert "recipients.csv already exists" in result.output
    assert not (tmp_path / "victim.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["recipients.csv"]


def test_init_into_a_folder_it_cannot_make_is_one_line_not_a_traceback(cli, tmp_path):
    """A path under a file, or a folder that cannot be written: one line naming it, no traceback, and exit
    66 as for any output that cannot be written (1 is for files it would overwrite)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    failed = cli("init", blocker / "campaign")
    assert failed.exit_code == 66
    assert failed.stderr.strip().count("\n") == 0
    assert str(blocker) in failed.stderr
    assert "Traceback" not in failed.output


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_out_of_range_is_a_usage_error(cli, port):
    """`sandbox`, `serve` and `unsubscribe serve` take 0-65535 (a traceback from bind() before)."""
    for command in (
        ["sandbox"],
        ["serve", "--store", "x.sqlite"],
        ["unsubscribe", "serve", "--store", "x.sqlite"],
    ):
        refused = cli(*command, "--port", port)
        assert refused.exit_code == 2, refused.output
        assert "--port" in refused.output


def test_help_shows_the_ledger_table_name():
    """Rich markup would eat `[ledger]` in the --ledger help."""
    from typer.testing import CliRunner

    from campaign.cli import app

    shown = CliRunner().invoke(app, ["status", "--help"], env={"COLUMNS": "300"}).output
    assert "instead of [ledger] url" in " ".join(shown.replace("│", " ").split())


def _schema_paths(schema: dict, node: dict, prefix: str = "") -> set[str]:
    """Every key path the schema describes (`senders.grant_id`, `message.attachments.path`, …)."""
    paths: set[str] = set()
    for choice in [node, *node.get("anyOf", []), *node.get("allOf", [])]:
        if "$ref" in choice:
            choice = schema["$defs"][choice["$ref"].rsplit("/", 1)[1]]
        if "items" in choice:
            paths |= _schema_paths(schema, choice["items"], prefix)
        for name, child in choice.get("properties", {}).items():
            paths.add(prefix + name)
            paths |= _schema_paths(schema, child, f"{prefix}{name}.")
    return paths


def _toml_paths(value: object, prefix: str = "") -> set[str]:
    """Every key path a parsed TOML document uses; free-form tables (headers) stop at their own key."""
    if isinstance(value, list):
        return set().union(*(_toml_paths(item, prefix) for item in value)) if value else set()
    if not isinstance(value, dict) or prefix in {"message.headers.", "message.tracking."}:
        return set()
    return {prefix + key for key in value} | set().union(
        *(_toml_paths(child, f"{prefix}{key}.") for key, child in value.items())
    )


def test_schema_is_json_schema_describing_every_key_the_samples_use(cli):
    """schema prints the manifest's JSON Schema: every table, and every key any sample manifest uses."""
    schema = json.loads(cli("schema").stdout)
    assert schema["additionalProperties"] is False
    described = _schema_paths(schema, schema)
    expected = {"campaign", "recipients.email_column", "senders.grant_id", "message.attachments.path"}
    assert expected <= described
    for manifest in sorted((REPO / "samples").glob("*/campaign.toml")):
        used = _toml_paths(tomllib.loads(manifest.read_text(encoding="utf-8")))
        assert used - described == set(), manifest


def test_schema_takes_the_from_spelling_of_a_senders_address_as_the_loader_does(cli):
    """The README writes a domain sender as `from = "news@mail.example.com"`; the loader takes it, so the
    schema (which editors check manifests against) must not call it unknown."""
    schema = json.loads(cli("schema").stdout)
    sender = schema["$defs"]["SenderSettings"]
    assert sender["additionalProperties"] is False
    email = {k: v for k, v in sender["properties"]["email"].items() if k != "description"}
    assert {k: v for k, v in sender["properties"]["from"].items() if k != "description"} == email
    assert 'from = "news@mail.example.com"' in (REPO / "README.md").read_text(encoding="utf-8")


def test_sandbox_command_serves_the_fake_api_on_loopback(tmp_path):
    """`campaign sandbox MANIFEST` serves the fake with the manifest's grants until stopped."""
    manifest = copy_sample("newsletter", tmp_path)
    with serve_sandbox(manifest) as base:
        url = f"{base}/v3/grants/0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11/messages/send"
        body = {"to": [{"email": "ann@example.com"}], "subject": "hi", "body": "x"}
        response = httpx.post(url, json=body, headers={"Authorization": "Bearer sandbox-key"}, timeout=5)
        assert response.status_code == 200
        assert response.json()["data"]["to"] == [{"email": "ann@example.com"}]


def test_python_dash_m_runs_the_cli():
    """`python -m campaign --help` works."""
    result = subprocess.run(
        [sys.executable, "-m", "campaign", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "preview" in result.stdout
