"""The pure rules of follow-ups: what an answer is (auto-reply headers, bounce reports), when a step is
due (business days, holidays, DST, windows, deliver_at), how windows stretch a finish time; and the
fake's answers and read failures that the end-to-end tests rely on."""

from __future__ import annotations

import email
import email.policy
import email.utils
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.followups import AnswerKind, classify_answer, due_time
from campaign.manifest import load_manifest
from campaign.sendtime import finish_within, load_zone, next_delivery, parse_deliver_at, parse_window
from campaign.testing import FakeClock, FakeNylas
from campaign.testing.bounces import build_dsn

BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("headers", "subject", "senders", "kind"),
    [
        ((), "Re: Renewal", ("ann@example.net",), AnswerKind.REPLY),
        ((("Auto-Submitted", "no"),), "Re: Renewal", ("ann@example.net",), AnswerKind.REPLY),
        ((("Auto-Submitted", "auto-replied"),), "Re: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((("Auto-Submitted", "auto-generated"),), "Notice", ("ann@example.net",), AnswerKind.AUTO),
        ((("X-Autoreply", "yes"),), "Re: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((("X-Autorespond", "1"),), "Re: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((("Precedence", "auto_reply"),), "Re: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((("Precedence", "bulk"),), "Re: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((("X-Auto-Response-Suppress", "All"),), "Re: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((), "Automatic reply: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((), "Out of Office: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((), "Abwesenheitsnotiz: Renewal", ("ann@example.net",), AnswerKind.AUTO),
        ((), "Undeliverable: Renewal", ("MAILER-DAEMON@googlemail.com",), AnswerKind.BOUNCE),
        (
            (("Content-Type", 'multipart/report; report-type="delivery-status"; boundary="x"'),),
            "Undeliverable",
            ("postmaster@outlook.com",),
            AnswerKind.BOUNCE,
        ),
        ((), "Re: Out of office plans for the team", ("ann@example.net",), AnswerKind.REPLY),
    ],
)
def test_answers_are_classified_by_their_headers_and_subject_last(headers, subject, senders, kind):
    assert classify_answer(headers, subject, senders) == kind


def _manifest(
    tmp_path: Path, *, sender: str = "", campaign: str = "", nudge: str = 'after = "3 business days"'
):
    (tmp_path / "r.csv").write_text("email\nann@example.net\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Hi\n", encoding="utf-8")
    path = tmp_path / "campaign.toml"
    path.write_text(
        f'[campaign]\nname = "rules"\n{campaign}\n[recipients]\nsource = "r.csv"\n'
        '[message]\nsubject = "S"\ntext = "a.txt"\n'
        f'[[followups]]\nname = "nudge"\ntext = "a.txt"\n{nudge}\n'
        f'[[senders]]\nname = "ana"\ngrant_id = "g"\n{sender}\n',
        encoding="utf-8",
    )
    return load_manifest(path)


def test_business_days_skip_the_weekend_and_holidays_across_a_dst_change(tmp_path):
    """Sent Friday 27 March 2026 09:00 in Berlin (CET); Monday 30 is a holiday; DST begins on Sunday 29:
    three business days later is Thursday 2 April, 09:00 CEST (07:00 UTC, not 08:00)."""
    manifest = _manifest(tmp_path, sender='timezone = "Europe/Berlin"', campaign='holidays = ["2026-03-30"]')
    (followup,) = manifest.followups
    sent = datetime(2026, 3, 27, 9, 0, tzinfo=BERLIN)
    due = due_time(manifest, followup, manifest.senders[0], sent)
    assert due == datetime(2026, 4, 2, 7, 0, tzinfo=UTC)
    assert due.astimezone(BERLIN).hour == 9


def test_a_due_time_outside_the_window_moves_to_its_next_opening(tmp_path):
    """Due Saturday at 10:00 (3d after a Wednesday send): the Mon-Fri window opens Monday 09:00."""
    manifest = _manifest(
        tmp_path,
        sender='window = "Mon-Fri 09:00-17:30"\ntimezone = "Europe/Berlin"',
        nudge='after = "3d"',
    )
    (followup,) = manifest.followups
    sent = datetime(2026, 12, 2, 10, 0, tzinfo=BERLIN)
    due = due_time(manifest, followup, manifest.senders[0], sent)
    assert due == datetime(2026, 12, 7, 9, 0, tzinfo=BERLIN)


def test_deliver_at_is_the_recipients_morning_inside_the_senders_window():
    window = parse_window("Mon-Fri 09:00-17:30", BERLIN)
    at = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)  # Monday 07:00 Berlin
    tokyo = next_delivery(
        at, window=window, deliver_at=parse_deliver_at("09:30"), zone=ZoneInfo("Asia/Tokyo")
    )
    # 09:30 in Tokyo is 01:30 in Berlin: outside the window on every day, so the window's next opening.
    assert tokyo == datetime(2026, 12, 7, 9, 0, tzinfo=BERLIN)
    lisbon = next_delivery(
        at, window=window, deliver_at=parse_deliver_at("09:30"), zone=ZoneInfo("Europe/Lisbon")
    )
    assert lisbon == datetime(2026, 12, 7, 9, 30, tzinfo=ZoneInfo("Europe/Lisbon"))
    assert window.contains(lisbon)


@settings(max_examples=200, deadline=None)
@given(
    start=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
    ),
    hours=st.floats(min_value=0, max_value=200),
)
def test_sending_inside_a_window_takes_exactly_the_open_time_asked_for(start, hours):
    """The open time between the start and the finish is the sending time asked for, and the finish is
    inside the window (or at its closing time)."""
    window = parse_window("Mon-Fri 09:00-17:30", BERLIN)
    end = finish_within(window, start, hours * 3600)
    open_s = 0.0
    day = start.astimezone(BERLIN).date()
    while day <= end.astimezone(BERLIN).date():
        if day.weekday() < 5:
            opens = datetime(day.year, day.month, day.day, 9, 0, tzinfo=BERLIN)
            closes = datetime(day.year, day.month, day.day, 17, 30, tzinfo=BERLIN)
            overlap = (min(closes, end) - max(opens, start)).total_seconds()
            open_s += max(0.0, overlap)
        day += timedelta(days=1)
    assert abs(open_s - hours * 3600) < 1e-3
    assert end >= start
    if hours * 3600 > 1e-3:
        assert window.contains(end - timedelta(milliseconds=1))


def test_without_a_window_the_finish_is_start_plus_the_time():
    start = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert finish_within(None, start, 90) == start + timedelta(seconds=90)


def test_zone_names_are_checked():
    with pytest.raises(ValueError, match="not a time zone"):
        load_zone("Europe/Atlantis")


@pytest.mark.anyio
async def test_the_fake_answers_a_share_of_sent_messages_in_their_thread():
    """reply_share and auto_reply_share: some recipients answer in the thread, a person or an
    autoresponder (RFC 3834 headers); the answers list by `thread_id` and `from`, carry their headers
    with `fields=include_headers`, and a second fake answers the same recipients alike."""
    clock = FakeClock()

    async def answered(fake: FakeNylas) -> dict[str, str]:
        kinds = {}
        auth = {"Authorization": "Bearer k"}
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake.test") as http:
            for n in range(40):
                body = {"to": [{"email": f"p{n}@example.net"}], "subject": "Renewal", "body": "Hi"}
                sent = (await http.post("/v3/grants/g/messages/send", json=body, headers=auth)).json()["data"]
                clock.advance(fake.reply_lag_s)  # an answer arrives a moment after the message
                query = {"thread_id": sent["thread_id"], "received_after": str(int(clock.now().timestamp()))}
                listed = (await http.get("/v3/grants/g/messages", params=query, headers=auth)).json()["data"]
                others = [m for m in listed if m["id"] != sent["id"]]
                if not others:
                    continue
                (answer,) = others
                assert answer["from"][0]["email"] == f"p{n}@example.net"
                by_from = {"from": f"p{n}@example.net"}
                assert [
                    m["id"]
                    for m in (await http.get("/v3/grants/g/messages", params=by_from, headers=auth)).json()[
                        "data"
                    ]
                ] == [answer["id"]]
                one = await http.get(
                    f"/v3/grants/g/messages/{answer['id']}",
                    params={"fields": "include_headers"},
                    headers=auth,
                )
                headers = {h["name"].lower(): h["value"] for h in one.json()["data"]["headers"]}
                kinds[f"p{n}"] = "auto" if headers.get("auto-submitted") == "auto-replied" else "reply"
                assert kinds[f"p{n}"] == "auto" or "auto-submitted" not in headers
        return kinds

    def make() -> FakeNylas:
        fake = FakeNylas(api_key="k", clock=clock)
        fake.add_grant("g", "me@corp.example.com")
        fake.reply_share, fake.auto_reply_share = 0.3, 0.2
        return fake

    first = await answered(make())
    assert set(first.values()) == {"reply", "auto"}
    assert 0.2 < len(first) / 40 < 0.8
    assert await answered(make()) == first


@pytest.mark.anyio
async def test_the_fake_fails_a_grants_reads_when_told():
    fake = FakeNylas(api_key="k")
    fake.add_grant("g", "me@corp.example.com")
    fake.fail_reads("g", times=2)
    auth = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="http://f") as http:
        statuses = [(await http.get("/v3/grants/g/messages", headers=auth)).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]


def test_a_bounce_report_in_the_thread_is_a_bounce_not_a_reply():
    dsn = build_dsn("gone@example.net", mailbox="me@corp.example.com", subject="S", at=datetime.now(UTC))
    parsed = email.message_from_bytes(dsn, policy=email.policy.default)
    headers = [(name, str(value)) for name, value in parsed.items()]
    sender = email.utils.parseaddr(str(parsed["From"]))[1]
    assert classify_answer(headers, str(parsed["Subject"]), (sender,)) == AnswerKind.BOUNCE
    # A person's reply is not one, even with a "Re:" of a report's subject.
    assert classify_answer([], "Re: " + str(parsed["Subject"]), ("ann@example.net",)) == AnswerKind.REPLY


class _Thread:
    """A thread listing: the sender's own earlier message, its domain written in Unicode by the provider."""

    def __init__(self, *messages: object) -> None:
        self.messages = messages
        self.headers_read: list[str] = []

    async def list_messages(self, grant_id, *, from_=None, thread_id=None, **kwargs):
        from campaign.nylas import MessagePage

        return MessagePage(self.messages if thread_id is not None else (), None)

    async def fetch_headers(self, grant_id, message_id):
        self.headers_read.append(message_id)
        return (("From", "Me <me@bücher.example>"), ("Subject", "Re: Hello"))


@pytest.mark.anyio
async def test_the_senders_own_message_is_no_answer_whichever_form_its_domain_is_written_in():
    """A mailbox sender's own message in the thread (a copy the provider files, a message sent by hand)
    is not the recipient's reply, also when the provider writes the sender's internationalised domain in
    Unicode while the manifest's address is ASCII: the follow-up is not stopped by it."""
    from campaign.followups import find_answer
    from campaign.nylas import ListedMessage

    at = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
    own = ListedMessage("own-1", "Re: Hello", ("ann@example.com",), at, {}, senders=("Me@Bücher.example",))
    client = _Thread(own)
    answer = await find_answer(
        client,
        grant_id="g",
        thread_id="t",
        address="ann@example.com",
        previous_sent_at=at - timedelta(hours=1),
        first_sent_at=at - timedelta(hours=1),
        ours=lambda _ids: set(),
        own_address="me@xn--bcher-kva.example",
    )
    assert (answer, client.headers_read) == (None, [])
