"""`campaign events pull`: bounce reports found in the senders' inboxes, recorded once, suppressing for good.

The reports are DSN MIME as Gmail and Exchange write them, placed in the fake's inbox of the
sender's grant (`FakeNylas.receive_message`), fetched with `fields=raw_mime` over loopback, and
read by flufl.bounce.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from conftest import copy_sample
from support import refusing_url

from campaign.manifest import load_manifest
from campaign.testing import FakeClock
from campaign.unsubscribe import open_store


def _gmail_dsn(address: str, status: str = "5.1.1") -> bytes:
    return f"""From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: founder@example.com
Subject: Delivery Status Notification (Failure)
MIME-Version: 1.0
Content-Type: multipart/report; boundary="b1"; report-type=delivery-status
Auto-Submitted: auto-replied

--b1
Content-Type: text/plain; charset="UTF-8"

Your message wasn't delivered to {address} because the address couldn't be found.

--b1
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com

Final-Recipient: rfc822; {address}
Action: {"failed" if status.startswith("5") else "delayed"}
Status: {status}
Diagnostic-Code: smtp; 550-{status} The email account that you tried to reach does not exist.

--b1
Content-Type: message/rfc822

From: founder@example.com
To: {address}
Subject: Spring news

Hello
--b1--
""".replace("\n", "\r\n").encode()


def _exchange_ndr(address: str) -> bytes:
    return f"""From: Microsoft Outlook <postmaster@outlook.com>
To: founder@example.com
Subject: Undeliverable: Spring news
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="ndr"

--ndr
Content-Type: text/plain; charset="us-ascii"

Delivery has failed to these recipients or groups:
{address}
The email address you entered couldn't be found.

--ndr
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.exchangelabs.com
Received-From-MTA: dns;AM0PR01MB5678.eurprd01.prod.exchangelabs.com

Final-Recipient: rfc822;{address}
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup

--ndr
Content-Type: text/rfc822-headers

From: founder@example.com
To: {address}
Subject: Spring news
--ndr--
""".replace("\n", "\r\n").encode()


def _reply(address: str) -> bytes:
    return f"""From: Someone <{address}>
To: founder@example.com
Subject: Re: Spring news
MIME-Version: 1.0
Content-Type: text/plain

Thanks, but this is not a bounce. Undeliverable things happen.
""".replace("\n", "\r\n").encode()


def _newsletter_with_store(api, tmp_path):
    """The newsletter sample with an unsubscribe store (store.sqlite), its sender's grant at the fake."""
    manifest = copy_sample("newsletter", tmp_path)
    text = manifest.read_text()
    lists = 'suppress = ["unsubscribed.txt"'
    manifest.write_text(text.replace(lists, f'{lists}, "store.sqlite"'))
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    return manifest, sender


def test_events_pull_records_gmail_and_exchange_bounces_once_and_ignores_ordinary_mail(api, cli, tmp_path):
    """Two permanent failures are suppressed, a temporary one only recorded, a reply ignored; a second
    pull records nothing new; resuming the campaign mails nobody twice."""
    manifest, sender = _newsletter_with_store(api, tmp_path)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    sent = [d.payload["to"][0]["email"] for d in api.deliveries]
    api.receive_message(sender.grant_id, _gmail_dsn(sent[0]))
    api.receive_message(sender.grant_id, _exchange_ndr(sent[1]))
    api.receive_message(sender.grant_id, _gmail_dsn("later@example.org", status="4.2.2"))
    api.receive_message(sender.grant_id, _reply("chen.wei@example.net"))

    first = cli("events", "pull", manifest)
    assert first.exit_code == 0, first.output
    assert "3 bounce reports (3 new)" in first.stdout
    assert "2 addresses failed for good" in first.stdout
    store = open_store(manifest.parent / "store.sqlite", clock=FakeClock(), create=False)
    try:
        assert sorted(e.recipient_key for e in store.entries()) == sorted(sent[:2])
        assert [b.hard for b in store.bounces("later@example.org")] == [False]
        # What each report says of its address (RFC 3464), for `campaign report`.
        (gmail,) = store.bounces(sent[0])
        assert (gmail.code, gmail.kind) == ("5.1.1", "dsn")
        assert gmail.reason == "550-5.1.1 The email account that you tried to reach does not exist."
        (exchange,) = store.bounces(sent[1])
        assert exchange.code == "5.1.10"
        assert (exchange.reason or "").startswith("550 5.1.10 RESOLVER.ADR.RecipientNotFound;")
        assert store.bounces("chen.wei@example.net") == []
    finally:
        store.close()

    again = cli("events", "pull", manifest)
    assert again.exit_code == 0, again.output
    assert "3 bounce reports (0 new)" in again.stdout

    resumed = cli("resume", manifest, "--yes")
    assert resumed.exit_code == 0, resumed.output
    mailed = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert (mailed.count(sent[0]), mailed.count(sent[1])) == (1, 1)  # mailed before they bounced, once
    assert "later@example.org" not in mailed


def test_a_pull_cut_short_goes_on_with_the_oldest_part_the_next_time(api, cli, tmp_path):
    """The listing is newest first and a pull reads 2,000 messages: with more since the first send, the
    bounce report (the oldest, right after the send) is found by the next pull, which reads the part
    the first one left; a pull after that lists only what is new (with an hour's overlap)."""
    manifest, sender = _newsletter_with_store(api, tmp_path)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    sent = api.deliveries[0].payload["to"][0]["email"]
    start = datetime.now(UTC)
    api.receive_message(sender.grant_id, _gmail_dsn(sent), received_at=start + timedelta(minutes=1))
    for number in range(2100):  # then ordinary mail, one every ten minutes for two weeks
        at = start + timedelta(minutes=2 + 10 * number)
        api.receive_message(sender.grant_id, _reply(f"p{number}@example.org"), received_at=at)
    api.clock = FakeClock(start=start + timedelta(days=15))  # pulled two weeks later

    def pull() -> str:
        result = cli("events", "pull", manifest)
        assert result.exit_code == 0, result.output
        return " ".join(result.stdout.split())

    def bounced() -> list[str]:
        store = open_store(manifest.parent / "store.sqlite", clock=FakeClock(), create=False)
        try:
            return [e.recipient_key for e in store.entries()]
        finally:
            store.close()

    first = pull()
    assert "2,000 inbox messages looked at" in first
    assert "pull again for the rest" in first
    assert bounced() == []
    second = pull()
    assert "pull again" not in second
    assert bounced() == [sent]
    third = pull()  # nothing left before: only the newest hour is listed again
    assert re.search(r"\b[1-9] inbox messages? looked at", third), third
    assert "0 new" in third
    assert bounced() == [sent]


def test_events_pull_needs_a_store_and_a_started_campaign(api, cli, tmp_path):
    """No store named: exit 2 in one line. Nothing sent yet: nothing to look for."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    assert cli("events", "pull", manifest).exit_code == 66  # no ledger yet
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    refused = cli("events", "pull", manifest)
    assert refused.exit_code == 2
    assert "unsubscribe.store" in refused.stderr


def test_events_pull_that_cannot_reach_the_api_exits_75_and_records_nothing(api, cli, tmp_path, monkeypatch):
    """No connection is a "try again later" (75), not a failure no retry fixes (69)."""
    manifest, sender = _newsletter_with_store(api, tmp_path)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    api.receive_message(sender.grant_id, _gmail_dsn(api.deliveries[0].payload["to"][0]["email"]))
    with refusing_url() as down:
        monkeypatch.setenv("NYLAS_API_URI", down)
        refused = cli("events", "pull", manifest)
    assert refused.exit_code == 75, refused.output
    assert "try again" in refused.stderr
    store = open_store(manifest.parent / "store.sqlite", clock=FakeClock(), create=False)
    try:
        assert list(store.entries()) == []
    finally:
        store.close()


def test_a_reports_diagnostic_is_kept_as_one_bounded_line_of_text():
    """The remote server's text is data: control characters and line breaks go, and it is cut short."""
    from campaign.events._pull import _read_report

    hostile = "=cmd|' /C calc'!A0\x07 <b>no</b>\t" + "x" * 5_000
    raw = _gmail_dsn("ann@example.com").replace(
        b"smtp; 550-5.1.1 The email account that you tried to reach does not exist.",
        f"smtp; {hostile}\r\n  continued".encode(),
    )
    (bounce,) = _read_report(raw, received=datetime.now(UTC), message_id="m-1")
    assert bounce.code == "5.1.1"
    assert bounce.reason is not None
    assert bounce.reason.startswith("=cmd|' /C calc'!A0 <b>no</b> xxx")
    assert len(bounce.reason) == 500
    assert not any(ord(char) < 32 for char in bounce.reason)


def test_a_report_names_only_addresses():
    """A report is anyone's mail: a recipient that is no address (a quoted local part, which no list
    holds) is not kept, and an internationalised domain is kept in the ASCII form campaign sends."""
    from campaign.events._pull import _read_report

    assert _read_report(_gmail_dsn('"a b"@evil.example'), received=datetime.now(UTC), message_id="m-1") == ()
    (bounce,) = _read_report(_gmail_dsn("Ann@Example.COM"), received=datetime.now(UTC), message_id="m-2")
    assert (bounce.email, bounce.code) == ("ann@example.com", "5.1.1")


def test_a_report_of_a_server_that_refused_the_sender_is_a_soft_bounce():
    """Gmail's 5.7.1 "likely unsolicited mail" is about the sender: flufl.bounce calls it permanent, but
    the address is fine and must not be suppressed for good."""
    from campaign.events._pull import _read_report

    raw = _gmail_dsn("ann@example.com", status="5.7.1").replace(
        b"The email account that you tried to reach does not exist.",
        b"Our system has detected that this message is likely unsolicited mail.",
    )
    (bounce,) = _read_report(raw, received=datetime.now(UTC), message_id="m-1")
    assert (bounce.code, bounce.hard, bounce.kind) == ("5.7.1", False, "block")
    (plain,) = _read_report(_gmail_dsn("ann@example.com"), received=datetime.now(UTC), message_id="m-2")
    assert plain.hard


def _mailed_unsubscribe(address: str, to: str, subject: str) -> bytes:
    """What a mail client sends when its user unsubscribes through List-Unsubscribe's mailto."""
    return f"""From: <{address}>
To: <{to}>
Subject: {subject}
MIME-Version: 1.0
Content-Type: text/plain

This message was sent automatically to unsubscribe.
""".replace("\n", "\r\n").encode()


def test_an_unsubscribe_mailed_to_a_senders_own_inbox_is_recorded_once(api, cli, tmp_path):
    """unsubscribe.mailto is the sender's mailbox: the request Outlook.com (which acts on nothing else)
    mails there is found by `events pull` and recorded as an unsubscribe; a forged token is ignored, and
    a second pull records nothing new."""
    manifest, sender = _newsletter_with_store(api, tmp_path)
    manifest.write_text(
        manifest.read_text().replace('mailto = "unsubscribe@example.com"', f'mailto = "{sender.email}"')
    )
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    first = api.deliveries[0]
    header = next(h["value"] for h in first.payload["custom_headers"] if h["name"] == "List-Unsubscribe")
    subject = re.search(r"subject=(unsubscribe-[A-Za-z0-9_-]+)", header).group(1)
    address = first.payload["to"][0]["email"]
    api.receive_message(sender.grant_id, _mailed_unsubscribe(address, sender.email, subject))
    forged = subject[:-4] + ("AAAA" if not subject.endswith("AAAA") else "BBBB")
    api.receive_message(sender.grant_id, _mailed_unsubscribe("mallory@example.org", sender.email, forged))

    pulled = cli("events", "pull", manifest)
    assert pulled.exit_code == 0, pulled.output
    assert "1 unsubscribe request by mail recorded" in pulled.stdout
    store = open_store(manifest.parent / "store.sqlite", clock=FakeClock(), create=False)
    try:
        assert [(e.recipient_key, e.source) for e in store.entries()] == [(address, "mailto")]
    finally:
        store.close()
    again = cli("events", "pull", manifest)
    assert again.exit_code == 0, again.output
    assert "unsubscribe requests by mail recorded" not in again.stdout
