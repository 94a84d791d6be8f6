"""Quotas through the CLI against the fake on loopback: exit 75 with the time, parks survive, --wait."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta

import pytest
from conftest import API_KEY, SECRET, copy_sample
from postgres import fresh_database

from campaign.clock import SystemClock
from campaign.ledger import open_ledger
from campaign.manifest import load_manifest
from campaign.testing import FakeNylas, Fault, serve_on_loopback
from campaign.testing.clock import FakeClock

FOUNDER = "0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11"


@pytest.fixture(name="quota_api")
def _quota_api(monkeypatch):
    """A loopback fake whose own clock starts now and can be moved on by the test."""
    clock = FakeClock(start=SystemClock().now())
    fake = FakeNylas(api_key=API_KEY, clock=clock)
    fake.add_grant(FOUNDER, "maya@example.com")
    with serve_on_loopback(fake) as url:
        monkeypatch.setenv("NYLAS_API_URI", url)
        monkeypatch.setenv("NYLAS_API_KEY", API_KEY)
        monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", SECRET)
        yield fake, clock


def test_quota_stop_exits_75_and_resume_finishes_after_the_window(quota_api, cli, cli_clock, tmp_path):
    """Provider quota 3, 5 to send: exit 75 with the time; resume waits for it, then finishes once."""
    fake, clock = quota_api
    fake.set_quota(FOUNDER, recipients_per_day=3)
    manifest = copy_sample("newsletter", tmp_path)
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 75, first.output
    assert "founder" in first.output
    assert "can send again at" in first.output
    assert f"campaign resume {manifest}" in first.output
    assert len(fake.deliveries) == 3

    # The park is stored with the ledger: resuming at once sends nothing to that grant.
    before = len(fake.requests)
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 75, again.output
    assert len(fake.requests) == before

    # A day later (the fake's window and our stored park both expired) resume finishes the rest once.
    clock.advance(86_401)
    ledger = open_ledger(load_manifest(manifest).ledger_path, clock=clock, campaign="spring-newsletter")
    parked = ledger.parked_senders()[
        "founder"
    ]  # the provider's own "Retry after": a day after the first send
    window_frees = fake.deliveries[0].delivered_at + timedelta(days=1)
    assert abs(parked - window_frees) < timedelta(seconds=2)
    # On the CLI's clock: real time may be seconds ahead of it on a loaded machine.
    ledger.record_parks({"founder": cli_clock.now() - timedelta(seconds=1)})
    ledger.close()
    last = cli("resume", manifest, "--yes")
    assert last.exit_code == 0, last.output
    emails = [d.payload["to"][0]["email"] for d in fake.deliveries]
    assert len(emails) == 5
    assert len(set(emails)) == 5
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert status["done"] is True


def test_wait_continues_by_itself_after_a_quota_refusal(quota_api, cli, tmp_path):
    """--wait: a quota refusal that frees in a second is waited out in the same run (exit 0)."""
    fake, _ = quota_api
    fake.script(Fault.QUOTA_EXCEEDED, grant_id=FOUNDER, times=1, retry_after_s=1)
    manifest = copy_sample("newsletter", tmp_path)
    result = cli("run", manifest, "--yes", "--wait")
    assert result.exit_code == 0, result.output
    assert len(fake.deliveries) == 5
    refused = [r for r in fake.requests if r.status == 429]
    assert len(refused) == 1


def test_status_shows_the_schedule(quota_api, cli, tmp_path):
    """status --json gives the daily capacity and an ETA per sender and in total."""
    fake, _ = quota_api
    fake.set_quota(FOUNDER, recipients_per_day=2)
    manifest = copy_sample("newsletter", tmp_path)
    cli("run", manifest, "--yes")
    status = json.loads(cli("status", manifest, "--json").stdout)
    founder = status["senders"]["founder"]
    assert founder["states"]["pending"] == 3
    assert founder["next_24h"] == 3
    assert status["per_day"] == 500
    assert status["eta_s"] > 0
    text = cli("status", manifest).stdout
    assert "500/day over 1 sender: done in ~" in text


MOVING = """\
[campaign]
name = "moving"

[recipients]
source = "recipients.csv"

[message]
subject = "News"
text = "message.txt.j2"

[unsubscribe]
url = "https://example.com/u/{{{{ unsubscribe_token }}}}"

[[senders]]
name = "alice"
grant_id = "grant-alice"
email = "alice@example.com"
provider = "gmail"
per_second = 10
concurrency = 1

[[senders]]
name = "bob"
grant_id = "grant-bob"
email = "bob@example.com"
provider = "microsoft"
per_minute = 1
"""


@pytest.mark.parametrize("linked", [False, True])
def test_rows_move_to_a_microsoft_sender_only_with_a_body_link(quota_api, cli, tmp_path, linked):
    """A Gmail sender's quota moves its rows to the others; a Microsoft sender sends no List-Unsubscribe
    headers, so it takes them only if their body links to unsubscribe: else they wait for their own
    sender (exit 75), and nobody gets a message they cannot opt out of."""
    fake, _ = quota_api
    fake.add_grant("grant-alice", "alice@example.com")
    fake.add_grant("grant-bob", "bob@example.com", provider="microsoft")
    fake.script(Fault.QUOTA_EXCEEDED, grant_id="grant-alice", times=1)
    (tmp_path / "campaign.toml").write_text(MOVING.format())
    (tmp_path / "recipients.csv").write_text("email\n" + "".join(f"r{i}@example.org\n" for i in range(3)))
    body = "Hi there, news.\n" + ("Unsubscribe: {{ unsubscribe_url }}\n" if linked else "")
    (tmp_path / "message.txt.j2").write_text(body)
    result = cli("run", tmp_path / "campaign.toml", "--yes")
    by_bob = [d for d in fake.deliveries if d.grant_id == "grant-bob"]
    assert len(fake.deliveries) == len(by_bob)  # alice's only request was refused
    if linked:
        assert result.exit_code == 0, result.output
        assert sorted(d.payload["to"][0]["email"] for d in by_bob) == [f"r{i}@example.org" for i in range(3)]
        assert all("https://example.com/u/" in d.payload["body"] for d in by_bob)
    else:
        assert result.exit_code == 75, result.output  # the rows wait for alice
        assert by_bob == []


def test_a_daily_limit_naming_no_time_stops_the_sender_an_hour(quota_api, cli, cli_clock, tmp_path):
    """Gmail's daily limit in words with no time (nylas-api.md §3.4): the sender stops for an hour, not a
    backoff of seconds (which knocked on the locked mailbox hundreds of times), and the stop is stored."""
    fake, _ = quota_api
    manifest = copy_sample("newsletter", tmp_path)
    fake.script(Fault.DAILY_LIMIT, grant_id=FOUNDER, times=1)
    started = cli_clock.now()
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 75, result.output
    assert "can send again at" in result.output
    assert [r.status for r in fake.requests].count(429) == 1
    ledger = open_ledger(load_manifest(manifest).ledger_path, clock=cli_clock, campaign="spring-newsletter")
    try:
        assert ledger.parked_senders()["founder"] - started >= timedelta(minutes=59)
    finally:
        ledger.close()


def test_wait_knocks_on_a_mailbox_at_its_daily_limit_once_an_hour(quota_api, cli, cli_clock, tmp_path):
    """--wait through a daily limit that names no time: a try an hour until the mailbox takes mail again,
    then every recipient once."""
    fake, _ = quota_api
    manifest = copy_sample("newsletter", tmp_path)
    fake.script(Fault.DAILY_LIMIT, grant_id=FOUNDER, times=3)
    started = cli_clock.now()
    result = cli("run", manifest, "--yes", "--wait")
    assert result.exit_code == 0, result.output
    assert [r.status for r in fake.requests].count(429) == 3
    assert len({d.payload["to"][0]["email"] for d in fake.deliveries}) == len(fake.deliveries) == 5
    assert cli_clock.now() - started >= timedelta(hours=2)  # the refusals came at least an hour apart


def test_a_renamed_sender_keeps_its_mailboxs_daily_budget(quota_api, cli, tmp_path):
    """per_day = 3 used up; the sender renamed in the manifest (the same grant): resume sends nothing more
    today, where it started a fresh day under the new name (a mailbox's limit is the mailbox's)."""
    fake, _ = quota_api
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(manifest.read_text().replace("per_day = 500", "per_day = 3"))
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 75, first.output
    assert len(fake.deliveries) == 3
    manifest.write_text(manifest.read_text().replace('name = "founder"', 'name = "maya"'))
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 75, again.output
    assert len(fake.deliveries) == 3
    # status says what the run does: the mailbox's day is used up, whatever its sender is called now.
    maya = json.loads(cli("status", manifest, "--json").stdout)["senders"]["maya"]
    assert (maya["sent_last_24h"], maya["budget_left"]) == (3, 0)


RECONNECTED = "5d1e0c7a-2f4b-4c38-8e2a-6a4f3b9c1d20"  # maya's mailbox again, through a new grant
OTHER_MAILBOX = "7c2f9a14-8b3e-4d51-9f60-1e2d3c4b5a69"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("same_mailbox", [True, False])
def test_a_reconnected_mailbox_keeps_its_daily_budget(quota_api, cli, tmp_path, backend, same_mailbox):
    """per_day = 3, two sent through the founder's grant; the manifest then names a new grant with the
    same address (the mailbox reconnected through Nylas): status counts the two, and resume sends only
    the one left of the day, through the new grant. A new grant with another address is another
    mailbox: its day starts empty, and it sends its three."""
    fake, _ = quota_api
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(manifest.read_text().replace("per_day = 500", "per_day = 3"))
    with contextlib.ExitStack() as stack:
        ledger = () if backend == "sqlite" else ("--ledger", stack.enter_context(fresh_database()))
        first = cli("run", manifest, "--yes", "--limit", "2", *ledger)
        assert first.exit_code == 75, first.output  # stopped at --limit, work left
        assert [d.grant_id for d in fake.deliveries] == [FOUNDER, FOUNDER]
        grant, address = (
            (RECONNECTED, "maya@example.com") if same_mailbox else (OTHER_MAILBOX, "sam@example.com")
        )
        fake.add_grant(grant, address)
        manifest.write_text(
            manifest.read_text()
            .replace(FOUNDER, grant)
            .replace('email = "maya@example.com"', f'email = "{address.upper()}"')
        )
        used = 2 if same_mailbox else 0
        founder = json.loads(cli("status", manifest, "--json", *ledger).stdout)["senders"]["founder"]
        assert (founder["sent_last_24h"], founder["budget_left"]) == (used, 3 - used)
        again = cli("resume", manifest, "--yes", *ledger)
        assert again.exit_code == (75 if same_mailbox else 0), again.output
        by_new_grant = [d for d in fake.deliveries if d.grant_id == grant]
        assert len(by_new_grant) == 3 - used
        assert len(fake.deliveries) == 5 - used
        founder = json.loads(cli("status", manifest, "--json", *ledger).stdout)["senders"]["founder"]
        assert (founder["sent_last_24h"], founder["budget_left"]) == (3, 0)


def test_another_campaign_in_the_database_counts_the_reconnected_mailboxs_day(quota_api, cli, tmp_path):
    """Two campaigns in one PostgreSQL database: the spring one sent two through the founder's grant;
    the autumn one names the mailbox's new grant, per_day = 3: it sends one, and its status counts the
    spring campaign's two with it (a mailbox's limit is the mailbox's, whichever campaign or grant
    sent)."""
    fake, _ = quota_api
    fake.add_grant(RECONNECTED, "maya@example.com")
    spring = copy_sample("newsletter", tmp_path / "spring")
    autumn = copy_sample("newsletter", tmp_path / "autumn")
    autumn.write_text(
        autumn.read_text()
        .replace('name = "spring-newsletter"', 'name = "autumn-newsletter"')
        .replace(FOUNDER, RECONNECTED)
        .replace("per_day = 500", "per_day = 3")
    )
    with fresh_database() as url:
        first = cli("run", spring, "--yes", "--limit", "2", "--ledger", url)
        assert first.exit_code == 75, first.output
        second = cli("run", autumn, "--yes", "--ledger", url)
        assert second.exit_code == 75, second.output
        assert [d.grant_id for d in fake.deliveries] == [FOUNDER, FOUNDER, RECONNECTED]
        founder = json.loads(cli("status", autumn, "--json", "--ledger", url).stdout)["senders"]["founder"]
        assert (founder["sent_last_24h"], founder["budget_left"]) == (3, 0)
