"""`campaign send-test`: one row, rendered as the campaign would, sent to a tester by the API; no ledger."""

from __future__ import annotations

import json

import pytest
from conftest import API_KEY, copy_sample
from support import refusing_url

from campaign.manifest import load_manifest
from campaign.testing import FakeNylas, Fault


def _register(api: FakeNylas, manifest_path) -> dict[str, str]:
    manifest = load_manifest(manifest_path)
    for sender in manifest.senders:
        assert sender.grant_id is not None
        api.add_grant(sender.grant_id, sender.email or "")
    return {sender.grant_id or "": sender.name for sender in manifest.senders}


def _headers(payload) -> dict[str, str]:
    return {h["name"]: h["value"] for h in payload.get("custom_headers", [])}


def test_send_test_sends_one_message_to_the_tester_and_leaves_no_ledger(api, cli, tmp_path):
    """Row 2 goes to me@example.com with [TEST] before its subject; its id is printed; no ledger appears."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    result = cli("send-test", manifest, "--to", "me@example.com", "--row", "2")
    assert result.exit_code == 0, result.output
    assert len(api.deliveries) == 1
    sent = api.deliveries[0]
    assert sent.payload["to"] == [{"email": "me@example.com"}]
    assert sent.payload["subject"] == "[TEST] Spring news for Bob"
    assert "Hi Bob," in sent.payload["body"]
    assert sent.payload["from"] == [{"email": "maya@example.com", "name": "Maya from Example"}]
    assert _headers(sent.payload)["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "key1" not in sent.payload["metadata"]  # reconcile can never take it for row 2's message
    assert "key2" not in sent.payload["metadata"]
    assert result.stdout.strip().splitlines()[-1] == sent.id
    assert API_KEY not in result.output
    assert not (manifest.parent / "campaign.ledger.sqlite").exists()


def test_send_test_sends_to_an_internationalised_domain_in_ascii(api, cli, tmp_path):
    """The API refuses non-ASCII participant addresses: --to with a Unicode domain goes out in ASCII."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    result = cli("send-test", manifest, "--to", "me@bücher.example", "--row", "2")
    assert result.exit_code == 0, result.output
    assert [d.payload["to"] for d in api.deliveries] == [[{"email": "me@xn--bcher-kva.example"}]]


def test_send_test_renders_the_row_exactly_as_the_run_would(api, cli, tmp_path):
    """Apart from To, the [TEST] prefix and the metadata, the test is the message `run` sends for that row."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("send-test", manifest, "--to", "me@example.com", "--row", "4").exit_code == 0
    assert cli("run", manifest, "--yes").exit_code == 0
    test, *real = api.deliveries
    dora = next(d for d in real if d.payload["to"][0]["email"] == "dora@example.com")
    assert test.grant_id == dora.grant_id
    for field in ("body", "from", "reply_to", "custom_headers", "tracking_options", "is_plaintext"):
        assert test.payload[field] == dora.payload[field], field
    assert test.payload["subject"] == "[TEST] " + dora.payload["subject"]


def test_send_test_leaves_an_existing_ledger_untouched(api, cli, tmp_path):
    """After a partial run, a test send changes no row of the ledger and the next run sends the same."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    ledger = manifest.parent / "campaign.ledger.sqlite"
    before = json.loads(cli("status", manifest, "--json").stdout)
    assert cli("send-test", manifest, "--to", "qa@example.com", "--row", "6").exit_code == 0
    after = json.loads(cli("status", manifest, "--json").stdout)
    assert after == before
    assert ledger.exists()
    assert [d.payload["to"][0]["email"] for d in api.deliveries].count("qa@example.com") == 1
    assert len(api.deliveries) == 3


def test_send_test_uses_the_rows_own_sender_or_the_one_asked_for(api, cli, tmp_path):
    """Outreach row 2 is pinned to bob; --sender carol sends it from carol instead."""
    manifest = copy_sample("outreach", tmp_path)
    grants = _register(api, manifest)
    assert cli("send-test", manifest, "--to", "me@example.com", "--row", "2").exit_code == 0
    assert (
        cli("send-test", manifest, "--to", "me@example.com", "--row", "2", "--sender", "carol").exit_code == 0
    )
    first, second = api.deliveries
    assert grants[first.grant_id] == "bob"
    assert grants[second.grant_id] == "carol"
    assert first.payload["subject"] == "[TEST] Contoso and Acme: a quick question"
    assert first.payload["is_plaintext"] is True


def test_send_test_refuses_bad_requests_before_sending(api, cli, tmp_path):
    """A bad --to, --row past the list, a duplicate row or an unknown --sender: exit 2, nothing sent."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    cases = [
        (["--to", "not-an-address"], "--to"),
        (["--to", "me@example.com", "--row", "99"], "row 99"),
        (["--to", "me@example.com", "--row", "5"], "duplicate of row 1"),
        (["--to", "me@example.com", "--sender", "zoe"], "zoe"),
    ]
    for args, expected in cases:
        result = cli("send-test", manifest, *args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.stderr
    assert api.requests == []


def test_send_test_reports_a_refused_key_with_exit_77(api, cli, tmp_path, monkeypatch):
    """A wrong API key: exit 77, the key never printed."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    monkeypatch.setenv("NYLAS_API_KEY", "nyk_v0_wrong_key")
    result = cli("send-test", manifest, "--to", "me@example.com")
    assert result.exit_code == 77
    assert "nyk_v0_wrong_key" not in result.output
    assert api.deliveries == []


def test_send_test_that_cannot_reach_the_api_exits_75_saying_nothing_was_sent(
    api, cli, tmp_path, monkeypatch
):
    """No connection is a "try again later" (75), not a failure no retry fixes (69)."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    with refusing_url() as down:
        monkeypatch.setenv("NYLAS_API_URI", down)
        result = cli("send-test", manifest, "--to", "me@example.com")
    assert result.exit_code == 75, result.output
    assert "the test message was not sent" in result.stderr
    assert "try again later" in result.stderr
    assert api.requests == []


@pytest.mark.parametrize(
    ("fault", "code", "said", "delivered"),
    [
        (Fault.NYLAS_RATE_LIMIT, 75, "was not sent", 0),
        (Fault.TIMEOUT_AFTER_SEND, 75, "may or may not have been sent", 1),
        (Fault.REJECTED, 69, "was not sent", 0),
    ],
    ids=["throttled", "ambiguous", "rejected"],
)
def test_send_test_exit_code_says_whether_trying_again_can_help(
    api, cli, tmp_path, fault, code, said, delivered
):
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    api.script(fault, times=50)
    result = cli("send-test", manifest, "--to", "me@example.com")
    assert result.exit_code == code, result.output
    assert said in result.stderr
    assert len(api.deliveries) == delivered


def test_send_test_in_the_sandbox_needs_no_account(cli, tmp_path, monkeypatch):
    """--sandbox sends to the in-process fake with no key or secret set."""
    for name in ("NYLAS_API_KEY", "CAMPAIGN_UNSUBSCRIBE_SECRET", "NYLAS_API_URI"):
        monkeypatch.delenv(name, raising=False)
    manifest = copy_sample("newsletter", tmp_path)
    result = cli("send-test", manifest, "--to", "me@example.com", "--sandbox")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1]
    assert "row 1 (ann.lee@example.com)" in " ".join(result.stdout.split())


def test_a_sandbox_send_test_is_written_to_the_outbox_after_the_runs(cli, tmp_path):
    """--sandbox: the test message joins the sandbox's outbox, numbered after the run's messages, so it
    can be read as the run's can; the run's files stay as they were."""
    manifest = copy_sample("newsletter", tmp_path)
    assert cli("run", manifest, "--sandbox", "--yes").exit_code == 0
    outbox = manifest.parent / "campaign.sandbox" / "outbox"
    before = {path.name: path.read_bytes() for path in outbox.iterdir()}
    result = cli("send-test", manifest, "--to", "me@example.com", "--row", "2", "--sandbox")
    assert result.exit_code == 0, result.output
    added = sorted(path.name for path in outbox.iterdir() if path.name not in before)
    assert added == ["0006-me@example.com.html", "0006-me@example.com.json"]
    assert {name: (outbox / name).read_bytes() for name in before} == before
    payload = json.loads((outbox / "0006-me@example.com.json").read_text(encoding="utf-8"))
    assert payload["subject"].startswith("[TEST] ")
    assert "0006" in result.output


def test_a_sandbox_send_test_whose_outbox_cannot_be_written_is_not_sent(cli, tmp_path):
    """A file where the sandbox's outbox goes: exit 66 and one line naming it, before the test is sent
    (it was sent, then a traceback)."""
    manifest = copy_sample("newsletter", tmp_path)
    outbox = manifest.parent / "campaign.sandbox" / "outbox"
    outbox.parent.mkdir()
    outbox.write_text("not a folder\n")
    result = cli("send-test", manifest, "--to", "me@example.com", "--sandbox")
    assert result.exit_code == 66, result.output
    assert result.stdout == ""  # no message id: nothing was sent
    assert result.stderr.count("\n") == 1
    assert f"{outbox}: the sandbox cannot write its outbox (not a folder); nothing was sent" in result.stderr


def test_a_send_test_carries_no_recipients_reply_tracking_label(api, cli, tmp_path):
    """With reply tracking, the real message's label names campaign, recipient and step, and a reply that
    carries it stops that recipient's follow-ups: the test sends tracking without it, so a reply to the
    test is nobody's."""
    manifest = copy_sample("newsletter", tmp_path)
    text = manifest.read_text()
    tracking = 'tracking = { opens = true, links = true, label = "spring-newsletter" }'
    assert tracking in text
    manifest.write_text(text.replace(tracking, "tracking = { opens = true, thread_replies = true }"))
    _register(api, manifest)
    result = cli("send-test", manifest, "--to", "me@example.com", "--row", "2")
    assert result.exit_code == 0, result.output
    (sent,) = api.deliveries
    assert sent.payload["tracking_options"]["thread_replies"] is True
    assert "label" not in sent.payload["tracking_options"]
