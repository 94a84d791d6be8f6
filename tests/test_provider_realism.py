"""Issue 13 end to end over loopback: a fake whose listings lag behind its sends (and, like Microsoft,
whose `to` filter finds nothing), sends that answer 504 after going out, reconcile run too early and
again after the settle time, resumes in between: every recipient mailed exactly once, counted at the fake."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import polars as pl
import pytest
from conftest import API_KEY, copy_sample, serve_fake
from support import serve_sandbox

from campaign.manifest import load_manifest
from campaign.testing import FakeNylas, Fault


@pytest.fixture(name="lagging")
def _lagging(_loopback, cli_clock, monkeypatch):
    """A fake on the CLI's clock (so its listing lag is measured in the same time), served on loopback."""
    fake = FakeNylas(api_key=API_KEY, clock=cli_clock)
    yield from serve_fake(_loopback, fake, monkeypatch, secret="realism-secret-0123456789abcdef")


def _states(cli, manifest) -> dict[str, int]:
    return json.loads(cli("status", manifest, "--json").stdout)["states"]


@pytest.mark.parametrize("provider", ["google", "microsoft"])
def test_a_lagging_mailbox_never_turns_a_sent_message_into_a_second_one(
    lagging, cli, cli_clock, tmp_path, provider
):
    """504 after each send, a 10 s listing lag (and a broken `to` filter on Microsoft): reconcile at once
    calls nothing "not sent", resume sends nothing twice; after the settle time reconcile finds them all."""
    manifest = copy_sample("newsletter", tmp_path)
    if provider == "microsoft":
        _with_provider(manifest, "microsoft")  # as its manifest should say: no List-Unsubscribe headers
    (sender,) = load_manifest(manifest).senders
    lagging.add_grant(sender.grant_id, sender.email or "", provider=provider)
    lagging.set_listing_quirks(sender.grant_id, lag_s=10, to_filter_broken=provider == "microsoft")
    lagging.script(Fault.TIMEOUT_AFTER_SEND, times=5)
    run = cli("run", manifest, "--yes")
    assert run.exit_code == 1, run.output
    assert _states(cli, manifest)["unknown"] == 5
    early = cli("reconcile", manifest)
    assert early.exit_code == 1, early.output
    assert _states(cli, manifest)["pending"] == 0  # the bug: "not found yet" taken for "not sent"
    assert cli("resume", manifest, "--yes").exit_code == 1
    cli_clock.advance(15 * 60)
    late = cli("reconcile", manifest, "--json")
    assert late.exit_code == 0, late.output
    assert cli("resume", manifest, "--yes").exit_code == 0
    states = _states(cli, manifest)
    assert (states["sent"], states["unknown"], states["pending"]) == (5, 0, 0)
    delivered = Counter(d.payload["to"][0]["email"].lower() for d in lagging.deliveries)
    assert sorted(delivered.values()) == [1] * 5


def _domain_campaign(tmp_path):
    """The newsletter sample sent as application mail through a verified domain (no mailbox)."""
    manifest = copy_sample("newsletter", tmp_path)
    text = manifest.read_text(encoding="utf-8")
    grant = load_manifest(manifest).senders[0].grant_id
    manifest.write_text(
        text.replace(f'grant_id = "{grant}"', 'domain = "mail.example.com"').replace(
            'email = "maya@example.com"', 'from = "news@mail.example.com"'
        ),
        encoding="utf-8",
    )
    assert load_manifest(manifest).senders[0].domain == "mail.example.com"
    return manifest


def test_a_domain_sender_without_a_from_name_sends_from_its_address(api, cli, tmp_path):
    """A send through a domain must name its From: with no `from_name`, each message carries the domain
    sender's `from` alone, and all five are delivered (each was refused 400 and its row failed)."""
    manifest = _domain_campaign(tmp_path)
    manifest.write_text(manifest.read_text().replace('from_name = "Maya from Example"\n', ""))
    assert load_manifest(manifest).senders[0].from_name is None
    api.add_domain("mail.example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert [d.payload["from"] for d in api.deliveries] == [[{"email": "news@mail.example.com"}]] * 5


@pytest.mark.parametrize("shape", ["id", "message_id", "messageId"])
def test_both_transactional_answer_shapes_settle_as_sent(api, cli, tmp_path, shape):
    """A domain send answered with `id`, `message_id` or `messageId` is sent, with that message id."""
    manifest = _domain_campaign(tmp_path)
    api.add_domain("mail.example.com")
    api.domain_answer_id = shape
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert len(api.deliveries) == 5
    report = tmp_path / "report.csv"
    assert cli("report", manifest, "--out", report).exit_code == 0
    ids = pl.read_csv(report)["message_id"].drop_nulls().to_list()
    assert sorted(ids) == sorted(d.id for d in api.deliveries)


def test_a_transactional_answer_without_an_id_is_not_taken_as_sent(api, cli, tmp_path):
    """A 200 whose data holds no message id is ambiguous: the rows end unknown, never `sent` blind."""
    manifest = _domain_campaign(tmp_path)
    api.add_domain("mail.example.com")
    api.domain_answer_id = "reference"  # a shape we do not know
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 1, result.output
    assert _states(cli, manifest)["sent"] == 0
    assert _states(cli, manifest)["unknown"] == 5
    assert len(api.deliveries) == 5  # each went out once: the same-key retries were replays


def _with_provider(manifest, provider: str, *, headers: str | None = None):
    text = manifest.read_text(encoding="utf-8").replace(
        'from_name = "Maya from Example"', f'from_name = "Maya from Example"\nprovider = "{provider}"'
    )
    if headers is not None:
        text = text.replace('headers = { "X-Campaign" = "spring-newsletter" }', headers)
    manifest.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(("provider", "expected"), [("microsoft", False), ("icloud", False), ("gmail", True)])
def test_list_unsubscribe_headers_go_only_to_providers_that_take_them(api, cli, tmp_path, provider, expected):
    """Microsoft and iCloud senders send no List-Unsubscribe(-Post) (Graph would refuse them); the body link
    stays; a Gmail sender sends both."""
    manifest = copy_sample("newsletter", tmp_path)
    _with_provider(manifest, provider)
    (sender,) = load_manifest(manifest).senders
    api.add_grant(
        sender.grant_id, sender.email or "", provider="microsoft" if provider == "microsoft" else "google"
    )
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert len(api.deliveries) == 5
    for delivery in api.deliveries:
        names = {h["name"] for h in delivery.payload.get("custom_headers", [])}
        assert ({"List-Unsubscribe", "List-Unsubscribe-Post"} <= names) is expected
        assert "X-Campaign" in names
        assert "https://example.com/unsubscribe?t=" in delivery.payload["body"]


def test_a_header_graph_would_refuse_is_a_manifest_error_for_a_microsoft_sender(api, cli, tmp_path):
    """A custom header without X- on a Microsoft sender: exit 78 naming header and sender; nothing sent."""
    manifest = copy_sample("newsletter", tmp_path)
    _with_provider(manifest, "microsoft", headers='headers = { "Campaign-Id" = "spring" }')
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert (
        "message.headers: 'Campaign-Id' cannot be sent by senders[1] 'founder' (provider microsoft)" in line
    )
    assert "rename it X-Campaign-Id" in line
    assert api.requests == []


def test_the_fake_refuses_a_non_x_header_on_a_microsoft_grant_as_graph_does(api, cli, tmp_path):
    """A Microsoft grant the manifest does not call one: the fake answers 400 with Graph's
    InvalidInternetMessageHeader, and the row fails with that reason (never a silent success)."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "", provider="microsoft")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 1
    assert api.deliveries == []
    report = tmp_path / "failed.csv"
    assert cli("report", manifest, "--out", report).exit_code == 0
    errors = pl.read_csv(report)["error_message"].drop_nulls().to_list()
    assert len(errors) == 5
    assert all("List-Unsubscribe" in error and "x-" in error for error in errors)


def test_the_sandbox_serves_a_microsoft_sender_as_a_microsoft_grant(tmp_path):
    """`campaign sandbox MANIFEST` gives a sender with `provider = "microsoft"` a Microsoft grant: a
    non-X- custom header gets Graph's InvalidInternetMessageHeader in a 400 envelope, an X- header is sent."""
    manifest = copy_sample("newsletter", tmp_path)
    _with_provider(manifest, "microsoft")
    (sender,) = load_manifest(manifest).senders
    with serve_sandbox(manifest) as base:
        url = f"{base}/v3/grants/{sender.grant_id}/messages/send"

        def send(header: str) -> httpx.Response:
            body = {
                "to": [{"email": "ann@example.com"}],
                "subject": "hi",
                "body": "x",
                "custom_headers": [{"name": header, "value": "1"}],
            }
            return httpx.post(url, json=body, headers={"Authorization": "Bearer sandbox-key"}, timeout=5)

        refused = send("List-Unsubscribe-Post")
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["type"] == "provider_error"
        assert error["provider_error"]["error"]["code"] == "InvalidInternetMessageHeader"
        assert "List-Unsubscribe-Post" in error["provider_error"]["error"]["message"]
        assert send("X-Campaign").status_code == 200


def test_the_thread_of_every_sent_message_is_recorded_and_reported(api, cli, tmp_path):
    """Each send answer's thread_id is kept in the ledger and shown by `report` (follow-ups reply in it)."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    assert cli("run", manifest, "--yes").exit_code == 0
    report = tmp_path / "report.parquet"
    assert cli("report", manifest, "--out", report, "--state", "sent").exit_code == 0
    threads = pl.read_parquet(report)["thread_id"].to_list()
    assert len(threads) == 5
    assert None not in threads
    assert len(set(threads)) == 5


def test_gzip_encoded_answers_are_read_over_the_real_transport(api, cli, tmp_path):
    """The fake compresses every answer (Content-Encoding: gzip): sends settle with their ids, reconcile's
    listings are read, over loopback through campaign's aiohttp transport."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    api.gzip_answers = True
    api.script(Fault.TIMEOUT_AFTER_SEND, times=1)  # one row for reconcile to look up in a gzip listing
    assert cli("run", manifest, "--yes").exit_code == 1
    assert api.gzip_answered >= 5
    assert cli("reconcile", manifest).exit_code == 0  # found by metadata at once: sent
    report = tmp_path / "report.parquet"
    assert cli("report", manifest, "--out", report, "--state", "sent").exit_code == 0
    ids = pl.read_parquet(report)["message_id"].to_list()
    assert sorted(ids) == sorted(d.id for d in api.deliveries)
    assert len(ids) == 5


def test_a_microsoft_mailbox_over_its_concurrency_is_throttled_and_every_row_still_goes_out_once(
    api, cli, tmp_path
):
    """A Microsoft sender set to more sends at once than its mailbox takes: the fake answers the extra
    ones Graph's 429 MailboxConcurrency (nothing sent), the client holds and sends those rows again, and
    each recipient gets one message."""
    manifest = copy_sample("newsletter", tmp_path)
    _with_provider(manifest, "microsoft")
    manifest.write_text(
        manifest.read_text(encoding="utf-8").replace("concurrency = 2", "concurrency = 5"), encoding="utf-8"
    )
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "", provider="microsoft")
    api.set_mailbox_concurrency(sender.grant_id, 2)
    api.latency_s = 0.3  # real seconds: the sends overlap at the fake
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    refused = [r for r in api.requests if r.status == 429]
    assert refused, "the sends never overlapped past the mailbox's concurrency"
    assert api.most_in_flight(sender.grant_id) > 2
    delivered = Counter(d.payload["to"][0]["email"].lower() for d in api.deliveries)
    assert sorted(delivered.values()) == [1] * 5
    assert _states(cli, manifest)["sent"] == 5


def test_a_campaign_that_tracks_sent_from_a_trial_app_sends_nothing_and_says_why(api, cli, tmp_path):
    """A Sandbox (trial) Nylas application refuses tracking, which every message of the campaign asks
    for: one send at a time, the sender stops at the first refusal (one request at the fake), nothing
    goes out, no row fails (each failed before, one by one), and the run says why in Nylas's words,
    with exit 77 as for refused credentials."""
    manifest = copy_sample("newsletter", tmp_path)  # tracks opens and links
    manifest.write_text(manifest.read_text().replace("concurrency = 2", "concurrency = 1"))
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    api.trial_app = True
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 77, result.output
    assert "Tracking options are not allowed for trial accounts" in result.output
    assert "turn [message] tracking off" in result.output
    assert api.deliveries == []
    assert [record.status for record in api.requests] == [400]
    states = _states(cli, manifest)
    assert (states["failed"], states["pending"]) == (0, 5)
