"""What comes back: `campaign serve`'s webhook receiver, bounces in the store, and campaigns skipping them.

Nylas notifications arrive over a real loopback socket, signed as Nylas signs them (hex HMAC-SHA256
of the raw body, reference/next-capabilities.md §2.3), with the store on real SQLite and, each such
test again, on a real PostgreSQL database (`store_at`).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SECRET, copy_sample
from support import serve_events, wait_until_listening

from campaign.events import parse_bounces, parse_notification, record_notification, sign_body
from campaign.manifest import load_manifest
from campaign.models import Address, Recipient, SkipReason
from campaign.testing import FakeClock, FakeNylas, serve_on_loopback
from campaign.unsubscribe import (
    INBOX_EVENT_PREFIX,
    BounceRecord,
    BounceRules,
    StoreError,
    SuppressionStore,
    UnsubscribeWatch,
    open_store,
    parse_secrets,
)
from campaign.unsubscribe import _store as store_module
from campaign.web import EventService, UnsubscribeEndpoint

WEBHOOK_SECRET = b"nylas-webhook-secret-for-tests"


def _envelope(event_id: str, kind: str, obj: dict[str, Any], *, time: int = 1_767_000_000) -> bytes:
    document = {
        "specversion": "1.0",
        "type": kind,
        "source": "/nylas/send",
        "id": event_id,
        "time": time,
        "webhook_delivery_attempt": 1,
        "data": {"application_id": "app", "grant_id": "grant-1", "object": obj},
    }
    return json.dumps(document).encode()


def _bounce(
    event_id: str,
    addresses: Any,
    *,
    code: str = "550",
    kind: str = "mailbox_unavailable",
    date: str = "Tue, 05 Jan 2027 10:00:00 +0000",
) -> bytes:
    obj = {
        "bounce_reason": "Mailbox does not exist",
        "bounce_date": date,
        "bounced_addresses": addresses,
        "type": kind,
        "code": code,
        "origin": {"id": "provider-msg-1", "to": [{"email": "x@example.com"}], "subject": "Hi"},
        "message_id": "nylas-msg-1",
        "unknown_field": None,
    }
    return _envelope(event_id, "message.bounce_detected", obj)


def _record(store: SuppressionStore, body: bytes) -> None:
    record_notification(store, body, clock=FakeClock())


def _signed(body: bytes, *, secret: bytes = WEBHOOK_SECRET) -> dict[str, str]:
    return {"x-nylas-signature": sign_body(body, secret), "content-type": "application/json"}


@pytest.fixture(name="service")
def _service(store_at) -> Iterator[tuple[EventService, str]]:
    clock = FakeClock(datetime(2027, 1, 5, 12, 0, tzinfo=UTC))
    store = open_store(store_at, clock=clock)
    endpoint = UnsubscribeEndpoint(store, secrets=parse_secrets(SECRET))
    service = EventService(endpoint, webhook_secrets=[WEBHOOK_SECRET], clock=clock)
    try:
        with serve_on_loopback(service) as url:
            yield service, url
    finally:
        store.close()


def test_the_challenge_is_echoed_as_plain_text(service):
    """Nylas checks the URL when the webhook is created: the exact value back, 200, text/plain."""
    _, url = service
    answer = httpx.get(f"{url}/nylas/webhook", params={"challenge": "ab-12_3"})
    assert answer.status_code == 200
    assert answer.text == "ab-12_3"
    assert answer.headers["content-type"].startswith("text/plain")
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_what_the_webhook_route_answers_is_never_taken_for_a_page(service):
    """The challenge is echoed, so anyone can make the site's domain answer their text: every answer of
    the route (and /healthz) tells a browser not to sniff it for HTML, run or load anything, or keep it."""
    _, url = service
    body = _bounce("evt-h", "ann@example.com")
    answers = [
        httpx.get(f"{url}/nylas/webhook", params={"challenge": "<script>alert(1)</script>"}),
        httpx.get(f"{url}/nylas/webhook"),
        httpx.post(f"{url}/nylas/webhook", content=body),
        httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body)),
        httpx.post(f"{url}/nylas/webhook", content=b"<p>x</p>", headers=_signed(b"<p>x</p>")),
        httpx.get(f"{url}/healthz"),
    ]
    assert [answer.status_code for answer in answers] == [200, 400, 401, 200, 400, 200]
    assert answers[0].text == "<script>alert(1)</script>"
    for answer in answers:
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert answer.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("case", "status", "recorded"),
    [
        ("good", 200, 1),
        ("sha256= prefix, upper case", 200, 1),
        ("tampered body", 401, 0),
        ("wrong secret", 401, 0),
        ("no header", 401, 0),
        ("gzip, signed compressed", 200, 1),
        ("gzip, signed inflated", 401, 0),
    ],
)
def test_only_a_delivery_signed_with_the_webhook_secret_is_recorded(service, case, status, recorded):
    """The signature is checked on the raw bytes, before parsing (the compressed bytes for gzip)."""
    svc, url = service
    body = _bounce("evt-1", "ann@example.com")
    headers = _signed(body)
    sent = body
    if case == "sha256= prefix, upper case":
        headers["x-nylas-signature"] = "sha256=" + headers["x-nylas-signature"].upper()
    elif case == "tampered body":
        sent = body.replace(b"ann@", b"bob@")
    elif case == "wrong secret":
        headers = _signed(body, secret=b"another-secret")
    elif case == "no header":
        del headers["x-nylas-signature"]
    elif case.startswith("gzip"):
        sent = gzip.compress(body)
        headers = _signed(sent if case == "gzip, signed compressed" else body)
        headers["content-encoding"] = "gzip"
    answer = httpx.post(f"{url}/nylas/webhook", content=sent, headers=headers)
    assert answer.status_code == status
    assert svc.store.event_count() == recorded
    assert len(svc.store.bounces("ann@example.com")) == recorded


def test_a_redelivered_notification_is_recorded_once(service):
    """Nylas delivers at least once: the same envelope id twice is one event and one bounce."""
    svc, url = service
    body = _bounce("evt-dup", "ann@example.com")
    for _ in range(3):
        assert httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body)).status_code == 200
    assert svc.store.event_count() == 1
    assert len(svc.store.bounces("ann@example.com")) == 1


def test_a_store_that_cannot_be_written_answers_503_so_nylas_retries(service, monkeypatch):
    """Nylas retries only 408, 429 and 502-507 (next-capabilities.md §2.4): a store that is locked or
    down must not answer 500, which would lose the notification for good."""
    svc, url = service
    body = _bounce("evt-busy", "ann@example.com")

    def unavailable(*_args: Any, **_kwargs: Any) -> bool:
        raise StoreError(f"{svc.store.where}: database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(svc.store, "record_event", unavailable)
        answer = httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body))
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "60"
    assert svc.store.event_count() == 0
    retried = httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body))
    assert retried.status_code == 200
    assert [b.email for b in svc.store.bounces("ann@example.com")] == ["ann@example.com"]


def test_bad_bodies_get_400_and_413_and_record_nothing(service):
    """Signed but not JSON: 400. Over 1 MB: 413, before any signature work."""
    svc, url = service
    junk = b"{not json"
    assert httpx.post(f"{url}/nylas/webhook", content=junk, headers=_signed(junk)).status_code == 400
    no_id = json.dumps({"type": "message.opened"}).encode()
    assert httpx.post(f"{url}/nylas/webhook", content=no_id, headers=_signed(no_id)).status_code == 400
    huge = b"{" + b" " * (1024 * 1024 + 10) + b"}"
    assert httpx.post(f"{url}/nylas/webhook", content=huge, headers=_signed(huge)).status_code == 413
    assert svc.store.event_count() == 0


# The envelope's time, 1_767_000_000 s, as a bounce dated by it is kept.
_ENVELOPE_TIME = "2025-12-29T09:20:00+00:00"


@pytest.mark.parametrize(
    ("body", "bounced_at", "reason", "suppressed"),
    [
        pytest.param(  # past the calendar's end once in UTC: unknown, so the notification's own time
            _bounce("e-9999", "ann@example.com", date="Fri, 31 Dec 9999 23:59:59 -1200"),
            _ENVELOPE_TIME,
            "Mailbox does not exist",
            True,
            id="date past 9999 in UTC",
        ),
        pytest.param(  # a soft bounce dated at the calendar's end: its 30-day window is cut there
            _bounce(
                "e-end",
                "ann@example.com",
                code="452",
                kind="mailbox_full",
                date="Fri, 31 Dec 9999 10:00:00 +0000",
            ),
            "9999-12-31T10:00:00+00:00",
            "Mailbox does not exist",
            False,
            id="soft bounce on 31 Dec 9999",
        ),
        pytest.param(  # `time` in milliseconds, no bounce_date: read as milliseconds
            _envelope(
                "e-ms",
                "message.bounce_detected",
                {"bounced_addresses": "ann@example.com", "code": "550"},
                time=1_767_000_000_000,
            ),
            _ENVELOPE_TIME,
            None,
            True,
            id="time in milliseconds",
        ),
        pytest.param(  # a lone surrogate escape (an emoji cut in half): kept as U+FFFD
            _bounce("e-sur", "ann@example.com").replace(b"Mailbox does not exist", b"\\ud83d cut"),
            "2027-01-05T10:00:00+00:00",
            "\ufffd cut",
            True,
            id="lone surrogate",
        ),
    ],
)
def test_a_bounce_whose_values_cannot_be_kept_as_given_is_recorded_with_them_unknown(
    service, body, bounced_at, reason, suppressed
):
    """A date past the calendar, a time in milliseconds, a lone surrogate: each answered 500 and was
    lost (Nylas does not retry a 500). Now each is kept, what could not be read taken as unknown."""
    svc, url = service
    answer = httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body))
    assert answer.status_code == 200
    assert svc.store.event_count() == 1
    (bounce,) = svc.store.bounces("ann@example.com")
    assert (bounce.bounced_at, bounce.reason) == (bounced_at, reason)
    assert [e.recipient_key for e in svc.store.entries()] == (["ann@example.com"] if suppressed else [])


def test_json_nested_deeper_than_any_notification_is_400(service):
    """100,000 levels overflowed the parser's stack (a 500); 100 levels parsed here but could fail a
    reader of the store deeper in its own stack. Neither is a notification: 400, nothing kept."""
    svc, url = service
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = json.dumps({"id": "e-deep", "type": "message.opened", "data": json.loads("[" * 100 + "]" * 100)})
    for body in (deep, nested.encode()):
        answer = httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body))
        assert answer.status_code == 400
        assert "nests too deeply" in answer.text
    assert svc.store.event_count() == 0


def test_a_store_that_fails_is_told_in_the_log_a_line_a_minute_with_a_count(store_at, monkeypatch, caplog):
    """Every delivery answered 503 because the store fails: the server's log says so (the route and the
    store's error), at once, then at most a line a minute with the failures not logged since, and once
    the store answers again one line with those still untold; a success alone logs nothing. What the
    driver's words may quote (an address, a token, the webhook secret) is hidden, the signature never
    logged."""
    clock = FakeClock(datetime(2027, 1, 5, 12, 0, tzinfo=UTC))
    served = serve_events(store_at, clock, webhook_secret=WEBHOOK_SECRET, unsubscribe_secret=SECRET)
    with served as (store, webhook):
        _tell_a_stuck_store(store, webhook, clock, monkeypatch, caplog)


def _tell_a_stuck_store(store: SuppressionStore, webhook: str, clock: FakeClock, monkeypatch, caplog) -> None:
    token = "Zm9yZ2VkLXRva2VuLWp1bmstdmFsdWUtMDEyMzQ1Njc4OQ"
    body = _bounce("evt-stuck", "ann@example.com")
    calls: list[int] = []

    def unavailable(*_args: Any, **_kwargs: Any) -> bool:
        calls.append(1)
        said = f"{store.where}: cannot write ({WEBHOOK_SECRET.decode()} ann@example.com {token})"
        raise StoreError(said)

    def post() -> int:
        return httpx.post(webhook, content=body, headers=_signed(body)).status_code

    assert post() == 200  # a success logs nothing
    with monkeypatch.context() as patch, caplog.at_level("WARNING"):
        patch.setattr(store, "record_event", unavailable)
        answers = [post() for _ in range(3)]
        clock.advance(59)
        answers.append(post())
        clock.advance(1)
        answers.append(post())
        answers.append(post())
        patch.undo()
        assert post() == 200  # within the minute of the last line: not yet told
        clock.advance(60)
        assert post() == 200
        assert post() == 200
    assert (answers, len(calls)) == ([503] * 6, 6)
    told = (
        f"POST /nylas/webhook: the unsubscribe store failed ({store.where}: cannot write (*** "
        "(an address) (a value that looks like a secret, not shown))); answered 503"
    )
    assert [r.getMessage() for r in caplog.records if r.name.startswith("campaign")] == [
        told,
        f"{told} (3 more since the last line)",
        "POST /nylas/webhook: the unsubscribe store answers again (1 more failures, answered 503, since "
        "the last line)",
    ]
    for secret in (WEBHOOK_SECRET.decode(), "ann@example.com", token, _signed(body)["x-nylas-signature"]):
        assert secret not in caplog.text


def test_anything_that_fails_while_recording_answers_503_and_logs_one_line(service, monkeypatch, caplog):
    """Not only a StoreError: whatever fails while a notification is kept answers 503 with Retry-After,
    so Nylas delivers it again, and logs the error's type alone (its text may quote the body or the
    database), never a traceback."""
    svc, url = service
    body = _bounce("evt-bug", "ann@example.com")

    def broken(*_args: Any, **_kwargs: Any) -> bool:
        raise RuntimeError("a value from the body: ann@example.com")

    with monkeypatch.context() as patch, caplog.at_level("WARNING"):
        patch.setattr(svc.store, "record_event", broken)
        answer = httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body))
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "60")
    assert svc.store.event_count() == 0
    logged = [r for r in caplog.records if r.name.startswith("campaign")]
    assert [r.getMessage() for r in logged] == [
        "a notification could not be recorded (RuntimeError); answered 503"
    ]
    assert all(r.exc_info is None for r in caplog.records)
    assert "ann@example.com" not in caplog.text
    retried = httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body))
    assert retried.status_code == 200
    assert svc.store.event_count() == 1


def test_a_body_is_utf8_its_byte_order_mark_dropped_and_kept_as_parsed(service):
    """A BOM before the JSON was accepted and kept with it, and no reader could parse it back (a reply
    that stopped no follow-up); UTF-16 was guessed at by json.loads and kept as garbled text. UTF-8 with
    a BOM is read and kept without it; any other encoding is 400, and nothing is kept."""
    svc, url = service
    reply = {"root_message_id": "m1", "message_id": "m2", "label": "c:k:1"}
    with_bom = b"\xef\xbb\xbf" + _envelope("r-bom", "thread.replied", reply)
    answer = httpx.post(f"{url}/nylas/webhook", content=with_bom, headers=_signed(with_bom))
    assert answer.status_code == 200
    _, replies = svc.store.replies_since(0)
    assert [(r.label, r.root_message_id, r.message_id) for r in replies] == [("c:k:1", "m1", "m2")]
    utf16 = _envelope("r-16", "thread.replied", reply).decode().encode("utf-16")
    answer = httpx.post(f"{url}/nylas/webhook", content=utf16, headers=_signed(utf16))
    assert answer.status_code == 400
    assert "not UTF-8" in answer.text
    assert svc.store.event_count() == 1


def test_a_tracking_notification_timed_in_milliseconds_counts_at_its_time(store_at):
    """An open whose envelope `time` is in milliseconds was kept, and then every `status` and `report`
    reading the store failed (year 57964 is out of range): it counts at the time it names."""
    store = open_store(store_at, clock=FakeClock())
    try:
        _record(store, _envelope("o-ms", "message.opened", {"message_id": "m1"}, time=1_767_000_100_000))
        _record(store, _envelope("o-s", "message.opened", {"message_id": "m1"}, time=1_767_000_200))
        seen = store.engagement()["m1"]
        assert (seen.opens, seen.first_open) == (2, datetime.fromtimestamp(1_767_000_100, UTC).isoformat())
    finally:
        store.close()


def test_200_concurrent_deliveries_are_all_stored_once(service):
    """Concurrent POSTs (some redelivered): every distinct notification once, none lost."""
    svc, url = service
    bodies = [_bounce(f"evt-{n % 150}", f"user{n % 150}@example.com") for n in range(200)]
    with httpx.Client() as client, ThreadPoolExecutor(max_workers=20) as pool:
        codes = list(
            pool.map(
                lambda b: client.post(f"{url}/nylas/webhook", content=b, headers=_signed(b)).status_code,
                bodies,
            )
        )
    assert codes == [200] * 200
    assert svc.store.event_count() == 150
    assert sum(len(svc.store.bounces(f"user{n}@example.com")) for n in range(150)) == 150


def test_a_hard_bounce_suppresses_at_once_and_soft_ones_after_the_threshold(store_at):
    """5xx: suppressed by the first bounce. 4xx: only the third within 30 days; older ones do not count."""
    store = open_store(store_at, clock=FakeClock())
    hard = parse_notification(_bounce("e1", "Ann <ann@example.com>"))
    store.record_event(
        "e1", hard.type, grant_id=None, body="{}", bounces=parse_bounces(hard, received_at=datetime.now(UTC))
    )
    assert [e.source for e in store.entries()] == ["bounce"]

    def soft(event_id: str, day: int) -> None:
        date = (datetime(2027, 1, 1, tzinfo=UTC) + timedelta(days=day)).strftime(
            "%a, %d %b %Y %H:%M:%S +0000"
        )
        found = parse_notification(
            _bounce(event_id, ["bob@example.com"], code="452", kind="mailbox_full", date=date)
        )
        bounces = parse_bounces(found, received_at=datetime.now(UTC))
        assert [b.hard for b in bounces] == [False]
        store.record_event(event_id, found.type, grant_id=None, body="{}", bounces=bounces)

    soft("s1", 0)
    soft("s2", 40)  # the first is now more than 30 days old
    soft("s3", 45)
    assert [e.recipient_key for e in store.entries()] == ["ann@example.com"]
    soft("s4", 50)  # three within 30 days
    assert [e.recipient_key for e in store.entries()] == ["ann@example.com", "bob@example.com"]
    store.set_bounce_rules(BounceRules(limit=1, days=7))
    soft_once = parse_notification(_bounce("s5", "carl@example.com", code="4.2.2", kind="other"))
    store.record_event(
        "s5",
        soft_once.type,
        grant_id=None,
        body="{}",
        bounces=parse_bounces(soft_once, received_at=datetime.now(UTC)),
    )
    assert "carl@example.com" in [e.recipient_key for e in store.entries()]
    store.close()


def _soft_bounce(store: SuppressionStore, event_id: str, at: datetime) -> None:
    stamp = at.isoformat(timespec="seconds")
    bounce = BounceRecord("bob@example.com", False, stamp, "4.2.2", "mailbox_full", "Mailbox full")
    store.record_event(event_id, "message.bounce_detected", grant_id="g", body="{}", bounces=[bounce])


@pytest.mark.parametrize("oldest_first", [True, False])
def test_the_soft_rule_counts_any_30_days_whatever_order_bounces_arrive_in(store_at, oldest_first):
    """`events pull` reads the newest reports first: bounces 39, 2 and 1 days old are no 3 within 30 days
    in either order; a fourth 20 days old makes 3 within 30 days with the two newest."""
    store = open_store(store_at, clock=FakeClock())
    now = datetime(2027, 3, 1, tzinfo=UTC)
    days = [39, 2, 1] if oldest_first else [1, 2, 39]
    try:
        for number, age in enumerate(days):
            _soft_bounce(store, f"{INBOX_EVENT_PREFIX}g:m{number}", now - timedelta(days=age))
        assert store.entries() == []
        _soft_bounce(store, f"{INBOX_EVENT_PREFIX}g:m9", now - timedelta(days=20))
        assert [(e.recipient_key, e.source) for e in store.entries()] == [("bob@example.com", "bounce")]
    finally:
        store.close()


def test_a_soft_bounce_seen_by_webhook_and_in_the_inbox_counts_once(store_at):
    """Nylas notifies the report it found in the sender's inbox, and `events pull` finds that report too:
    two bounces each seen both ways (in either order) are two, not four; a third reaches the rule."""
    store = open_store(store_at, clock=FakeClock())
    start = datetime(2027, 3, 1, 9, tzinfo=UTC)
    try:
        day_one = [("evt-0", 0), (f"{INBOX_EVENT_PREFIX}g:dsn-0", 3)]  # the notification first
        day_two = [(f"{INBOX_EVENT_PREFIX}g:dsn-1", 0), ("evt-1", -2)]  # the report pulled first
        for day, seen in enumerate([day_one, day_two]):
            for event_id, minutes in seen:
                _soft_bounce(store, event_id, start + timedelta(days=day, minutes=minutes))
        assert len(store.bounces("bob@example.com")) == 4  # every one is kept, for the report
        assert store.entries() == []
        _soft_bounce(store, "evt-2", start + timedelta(days=5))
        assert [e.recipient_key for e in store.entries()] == ["bob@example.com"]
    finally:
        store.close()


_GMAIL_SPAM = (
    "550-5.7.1 Our system has detected that this message is likely unsolicited mail. To reduce the amount "
    "of spam sent to Gmail, this message has been blocked."
)


@pytest.mark.parametrize(
    ("code", "kind", "reason", "hard"),
    [
        ("550", None, _GMAIL_SPAM, False),  # the sender refused: a block
        ("5.7.708", "", "Service unavailable. Access denied, traffic not accepted from this IP", False),
        ("550", "other", "Client host [203.0.113.9] blocked using Spamhaus", False),
        ("554", None, "Message rejected due to sender reputation", False),
        ("550", None, "5.1.1 The email account that you tried to reach does not exist", True),
        ("5.1.10", None, "RESOLVER.ADR.RecipientNotFound; Recipient not found", True),
        ("550", "mailbox_unavailable", "blocked as spam", True),  # the provider's kind wins over words
        ("452", None, "4.2.2 The email account that you tried to reach is over quota", False),
    ],
)
def test_a_bounce_that_refused_the_sender_is_soft_not_a_hard_bounce_of_the_address(
    store_at, code, kind, reason, hard
):
    """A spam, reputation or policy refusal (x.7.x) says nothing of the address: suppressing it for good
    on one such bounce would empty a list after one bad day (next-capabilities.md §3.5)."""
    obj = {"bounce_reason": reason, "bounced_addresses": ["ann@example.com"], "code": code, "type": kind}
    found = parse_notification(_envelope("b1", "message.bounce_detected", obj))
    bounces = parse_bounces(found, received_at=datetime.now(UTC))
    assert [b.hard for b in bounces] == [hard]
    blocked = not hard and not reason.startswith("4.2.2")
    assert [b.kind == "block" for b in bounces] == [blocked]
    store = open_store(store_at, clock=FakeClock())
    try:
        store.record_event("b1", found.type, grant_id=None, body="{}", bounces=bounces)
        assert [e.recipient_key for e in store.entries()] == (["ann@example.com"] if hard else [])
        assert len(store.bounces("ann@example.com")) == 1  # kept, whatever it was
    finally:
        store.close()


@pytest.mark.parametrize(
    ("reason", "hard"),
    [
        ("Message delayed: delivery will be retried for 48 hours", False),
        ("The recipient's mailbox is full; try again later", False),
        ("", False),
        ("Delivery failed: user unknown", True),
        ("The email account does not exist", True),
        ("Permanent failure: recipient rejected", True),
    ],
)
def test_a_bounce_with_no_code_or_type_is_hard_only_when_it_says_the_address_is_gone(store_at, reason, hard):
    """With no code and no type only its words tell: a delay or a full mailbox is soft and never suppresses
    the address at once (such an NDR counted as hard, and a temporary failure dropped someone for good)."""
    obj = {"bounce_reason": reason, "bounced_addresses": ["ann@example.com"], "code": None, "type": None}
    found = parse_notification(_envelope("b1", "message.bounce_detected", obj))
    bounces = parse_bounces(found, received_at=datetime.now(UTC))
    assert [b.hard for b in bounces] == [hard]
    store = open_store(store_at, clock=FakeClock())
    try:
        store.record_event("b1", found.type, grant_id=None, body="{}", bounces=bounces)
        assert [e.recipient_key for e in store.entries()] == (["ann@example.com"] if hard else [])
    finally:
        store.close()


def test_bounce_payloads_are_read_defensively():
    """`bounced_addresses` as a string or a list, codes as strings, nulls and unknown fields."""
    as_list = parse_notification(_bounce("a", ["A@Example.com", "b@example.com"], code="5.1.1", kind=None))
    assert [(b.email, b.hard) for b in parse_bounces(as_list, received_at=datetime.now(UTC))] == [
        ("a@example.com", True),
        ("b@example.com", True),
    ]
    unicode = parse_notification(_bounce("u", ["Ann@Bücher.example"], code="5.1.1", kind=None))
    # In the ASCII form campaign keys and sends it in, so the bounce finds its row and suppresses it.
    assert [b.email for b in parse_bounces(unicode, received_at=datetime.now(UTC))] == [
        "ann@xn--bcher-kva.example"
    ]
    spaced = parse_notification(_bounce("s", "ann@example.com bob@example.com; cat@example.com", code="550"))
    assert [b.email for b in parse_bounces(spaced, received_at=datetime.now(UTC))] == [
        "ann@example.com",
        "bob@example.com",
        "cat@example.com",
    ]
    nothing = parse_notification(_envelope("c", "message.bounce_detected", {"bounced_addresses": None}))
    assert parse_bounces(nothing, received_at=datetime.now(UTC)) == ()
    opened = parse_notification(_envelope("d", "message.opened", {"message_id": "m"}))
    assert parse_bounces(opened, received_at=datetime.now(UTC)) == ()


def test_a_bounce_keeps_only_addresses_so_the_stores_export_imports_again(service, cli, tmp_path, store_at):
    """A bounce report is written by any remote server: what it names that is no address (a control
    character, a quoted local part with a line break) never becomes an entry, nor hides the addresses
    named after it. Kept, it could match no recipient, and the store's text or CSV export would stop
    `suppress import` of it (exit 65)."""
    svc, url = service
    hostile = [
        "\x1b]8;;http://evil\x07ann@example.com",
        '<"a\r\nb"@evil.example>',
        "<x\u2028y@evil.example>",
        "Bob@Example.com",
    ]
    body = _bounce("evt-hostile", hostile)
    assert httpx.post(f"{url}/nylas/webhook", content=body, headers=_signed(body)).status_code == 200
    assert svc.store.event_count() == 1  # the notification itself is kept whole
    assert [entry.email for entry in svc.store.entries()] == ["bob@example.com"]
    for name in ("export.txt", "export.csv"):
        exported = cli("suppress", "export", tmp_path / name, "--store", store_at)
        assert exported.exit_code == 0, exported.output
        imported = cli("suppress", "import", tmp_path / name, "--store", tmp_path / f"{name}.sqlite")
        assert imported.exit_code == 0, imported.output
        copy = open_store(tmp_path / f"{name}.sqlite", clock=FakeClock())
        try:
            assert [entry.email for entry in copy.entries()] == ["bob@example.com"]
        finally:
            copy.close()


def test_a_bounced_address_is_skipped_by_the_next_campaign_and_a_running_one(api, cli, tmp_path, store_at):
    """The store a campaign reads: a bounced recipient is a `bounced` skip at planning, and a running
    campaign's watch says `bounced` for an address that bounced after the run began."""
    manifest = copy_sample("newsletter", tmp_path)
    text = manifest.read_text()
    store_path = store_at
    manifest.write_text(
        text.replace('suppress = ["unsubscribed.txt"]', f'suppress = ["unsubscribed.txt", "{store_at}"]')
    )
    first = manifest.parent.joinpath("recipients.csv").read_text().splitlines()[1].split(",")[0]
    store = open_store(store_path, clock=FakeClock())
    found = parse_notification(_bounce("b1", first))
    store.record_event(
        "b1",
        found.type,
        grant_id=None,
        body="{}",
        bounces=parse_bounces(found, received_at=datetime.now(UTC)),
    )
    store.close()
    for sender in load_manifest(manifest).senders:
        api.add_grant(sender.grant_id, sender.email or "")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert "1 bounced" in result.stdout
    assert first not in [d.payload["to"][0]["email"] for d in api.deliveries]
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert status["skipped"]["bounced"] == 1

    watch = UnsubscribeWatch([store_path], clock=FakeClock())
    ann = Recipient(first, 1, Address(first), {})
    assert watch.opt_out(ann) is None  # recorded before the watch began: known once looked up
    watch.look_up([ann])
    assert watch.opt_out(ann) == SkipReason.BOUNCED
    later = "later@example.com"
    store = open_store(store_path, clock=FakeClock())
    found = parse_notification(_bounce("b2", later))
    bounces = parse_bounces(found, received_at=datetime.now(UTC))
    store.record_event("b2", found.type, grant_id=None, body="{}", bounces=bounces)
    store.close()
    watch.reread_next()
    assert watch.opt_out(Recipient(later, 9, Address(later), {})) == SkipReason.BOUNCED
    watch.close()


def test_a_watch_that_cannot_reread_its_store_for_long_stops_the_sends(tmp_path, monkeypatch):
    """A re-read that fails for a moment is tried again (what is known still holds); one that has failed
    for longer than 10 s raises: an opt-out recorded meanwhile (by `campaign serve`, say) would be missed,
    so "no opt-out known" is no longer an answer a send may go on."""
    clock = FakeClock()
    path = tmp_path / "u.sqlite"
    open_store(path, clock=clock).close()
    watch = UnsubscribeWatch([path], clock=clock, refresh_s=1.0)
    ann = Recipient("ann@example.com", 1, Address("ann@example.com"), {})
    try:
        assert watch.opt_out(ann) is None

        def out_of_reach(store: SuppressionStore, after: int) -> tuple[int, list[Any]]:
            raise StoreError("the database is out of reach")

        monkeypatch.setattr(SuppressionStore, "read_since", out_of_reach)
        for _ in range(9):  # a blip: the watch answers from what it knows
            clock.advance(1.0)
            assert watch.opt_out(ann) is None
        clock.advance(2.0)
        with pytest.raises(StoreError, match="out of reach"):
            watch.opt_out(ann)
        monkeypatch.undo()  # back: read through again, and the clock starts over
        clock.advance(1.0)
        assert watch.opt_out(ann) is None
    finally:
        watch.close()


@pytest.mark.parametrize("option", [("--soft-bounce-days", "100000000"), ("--soft-bounce-limit", "5000")])
def test_a_soft_bounce_rule_past_any_sense_is_refused_before_it_is_kept(cli, tmp_path, option):
    """A window of a hundred million days overflowed the date of every soft bounce the server was sent
    (each answered 503, lost after Nylas's retries): a usage error, and the store keeps its rules."""
    store = tmp_path / "u.sqlite"
    refused = cli("serve", "--store", store, *option)
    assert refused.exit_code == 2
    assert option[0] in refused.output
    assert not store.exists()


def test_the_serve_command_receives_signed_webhooks_and_refuses_without_its_secret(
    cli, tmp_path, monkeypatch, store_at
):
    """`campaign serve` as a real process: a signed bounce lands in the store; without the webhook
    secret it exits 78 in one line, never printing a secret."""
    store = store_at
    monkeypatch.delenv("NYLAS_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", SECRET)
    refused = cli("serve", "--store", store)
    assert refused.exit_code == 78
    assert "NYLAS_WEBHOOK_SECRET" in refused.stderr
    assert len([line for line in refused.stderr.splitlines() if line.strip()]) == 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "CAMPAIGN_UNSUBSCRIBE_SECRET": SECRET,
        "NYLAS_WEBHOOK_SECRET": WEBHOOK_SECRET.decode(),
    }
    command = [sys.executable, "-m", "campaign", "serve", "--store", str(store), "--port", str(port)]
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:
        try:
            wait_until_listening(port, process)
            body = _bounce("served-1", "ann@example.com")
            answer = httpx.post(f"http://127.0.0.1:{port}/nylas/webhook", content=body, headers=_signed(body))
            assert answer.status_code == 200
        finally:
            process.terminate()
    reader = open_store(store, clock=FakeClock(), create=False)
    assert [e.source for e in reader.entries()] == ["bounce"]
    reader.close()


def _newsletter_reading(store: Path | str, tmp_path: Path, api: FakeNylas) -> Path:
    """The newsletter sample with `store` among its suppression lists, its sender a grant of `api`."""
    manifest = copy_sample("newsletter", tmp_path)
    lists = 'suppress = ["unsubscribed.txt"'
    manifest.write_text(manifest.read_text().replace(lists, f'{lists}, "{store}"'))
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    return manifest


def _report_rows(cli: Any, manifest: Path, tmp_path: Path) -> dict[str, dict[str, str]]:
    """`campaign report` as CSV, read back: each row by its email."""
    out = tmp_path / "report.csv"
    assert cli("report", manifest, "--out", out).exit_code == 0
    with out.open(encoding="utf-8") as report:
        return {row["email"]: row for row in csv.DictReader(report)}


def test_opens_and_clicks_appear_in_report_and_status(api, cli, tmp_path, store_at):
    """Tracking notifications for this campaign's messages (and one for another campaign's) give
    per-recipient columns in `report` and rates in `status --json`, with the Apple MPP caveat."""
    manifest = _newsletter_reading(store_at, tmp_path, api)
    assert cli("run", manifest, "--yes").exit_code == 0
    first, second = api.deliveries[0], api.deliveries[1]
    store = open_store(store_at, clock=FakeClock())
    opened = {"message_id": first.id, "message_data": {"count": 1, "timestamp": 1_767_000_100}}
    clicked = {"message_id": first.id, "link_data": [{"url": "https://example.com/offer", "count": 1}]}
    _record(store, _envelope("o1", "message.opened", opened, time=1_767_000_100))
    _record(store, _envelope("o2", "message.opened", opened, time=1_767_000_200))
    _record(store, _envelope("c1", "message.link_clicked", clicked))
    _record(store, _envelope("o3", "message.opened", {"message_id": second.id}))
    _record(store, _envelope("x1", "message.opened", {"message_id": "another-campaigns-message"}))
    reply = {"message_id": "reply-1", "root_message_id": second.id, "from_self": False}
    _record(store, _envelope("r1", "thread.replied", reply, time=1_767_000_300))
    own = {"message_id": "reply-2", "root_message_id": first.id, "from_self": True}
    _record(store, _envelope("r2", "thread.replied", own))
    store.close()

    rows = _report_rows(cli, manifest, tmp_path)
    one = rows[first.payload["to"][0]["email"]]
    assert (one["opens"], one["clicks"], one["clicked_urls"]) == ("2", "1", "https://example.com/offer")
    assert one["first_opened_at"].startswith(
        datetime.fromtimestamp(1_767_000_100, UTC).strftime("%Y-%m-%dT%H:%M")
    )
    assert rows[second.payload["to"][0]["email"]]["opens"] == "1"
    assert rows[second.payload["to"][0]["email"]]["replied_at"].startswith(
        datetime.fromtimestamp(1_767_000_300, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    )
    assert one["replied_at"] == ""  # the sender's own reply in the thread is not the recipient's
    untouched = [row for row in rows.values() if row["state"] == "sent" and row["opens"] == "0"]
    assert len(untouched) == len(api.deliveries) - 2

    status = json.loads(cli("status", manifest, "--json").stdout)
    seen = status["engagement"]
    assert (seen["sent"], seen["opened"], seen["clicked"], seen["replied"]) == (len(api.deliveries), 2, 1, 1)
    assert seen["open_rate"] == round(2 / len(api.deliveries), 4)
    assert "Apple Mail Privacy Protection" in seen["note"]
    assert "Apple Mail Privacy Protection" in cli("status", manifest).stdout


def test_a_clicked_url_holding_a_lone_surrogate_is_reported_with_a_replacement_mark(
    api, cli, tmp_path, store_at
):
    """A kept notification is its body as it came, and its JSON may escape a surrogate cut from its pair
    ("\\ud83d"): `report` stopped with a traceback writing it; the URL is reported with U+FFFD there."""
    manifest = _newsletter_reading(store_at, tmp_path, api)
    assert cli("run", manifest, "--yes").exit_code == 0
    first = api.deliveries[0]
    store = open_store(store_at, clock=FakeClock())
    clicked = {"message_id": first.id, "link_data": [{"url": "https://example.com/\ud83d?x=1", "count": 1}]}
    _record(store, _envelope("c1", "message.link_clicked", clicked))
    store.close()
    one = _report_rows(cli, manifest, tmp_path)[first.payload["to"][0]["email"]]
    assert (one["clicks"], one["clicked_urls"]) == ("1", "https://example.com/\ufffd?x=1")


def test_a_bounces_reason_is_kept_on_one_bounded_line():
    """A webhook's bounce_reason, code and type are the remote server's text: kept (and so reported) on
    one line of at most 500 characters, as an inbox report's are; classified whole before the cut (the
    words saying the address is gone come after 2,000 characters here)."""
    obj = {
        "bounce_reason": "line one\r\n=cmd|' /C calc'!A0\x1b[31m\n" + "x" * 2000 + " user unknown",
        "bounced_addresses": ["ann@example.com"],
        "message_id": "m1",
    }

    def parsed(found: dict[str, Any]) -> BounceRecord:
        notification = parse_notification(_envelope("b-long", "message.bounce_detected", found))
        (bounce,) = parse_bounces(notification, received_at=datetime.now(UTC))
        return bounce

    bounce = parsed(obj)
    assert bounce.hard is True
    assert bounce.reason is not None
    assert bounce.reason.startswith("line one =cmd|' /C calc'!A0 [31m x")
    assert len(bounce.reason) == 500
    assert parsed(obj | {"code": "4" + "\n" * 3 + "4" * 900}).code == "4 " + "4" * 498


def _bounce_of(event_id: str, address: str, *, message_id: str, code: str, kind: str, date: str) -> bytes:
    obj = {"bounce_reason": f"{kind} ({code})", "bounce_date": date, "bounced_addresses": [address]}
    return _envelope(
        event_id, "message.bounce_detected", obj | {"type": kind, "code": code, "message_id": message_id}
    )


def test_bounces_of_this_campaigns_messages_appear_in_report_and_status(
    api, cli, tmp_path, store_at, monkeypatch
):
    """A bounce naming a sent message belongs to it; one naming another message, to the latest send to its
    address before it. Bounces of other addresses, and one dated before the campaign began (an older
    campaign's), are not this campaign's. `report` says which rows bounced, `status` how many; each opens
    the store once for its engagement and its bounces (a database store is a connection pool)."""
    manifest = _newsletter_reading(store_at, tmp_path, api)
    assert cli("run", manifest, "--yes").exit_code == 0
    first, second, third = (d.payload["to"][0]["email"] for d in api.deliveries[:3])
    later = "Tue, 05 Jan 2027 10:00:00 +0000"
    store = open_store(store_at, clock=FakeClock())
    hard = {"code": "550", "kind": "mailbox_unavailable"}
    _record(store, _bounce_of("b1", first, message_id=api.deliveries[0].id, date=later, **hard))
    soft = {"code": "452", "kind": "mailbox_full"}
    _record(store, _bounce_of("b2", second.upper(), message_id="an-inbox-report", date=later, **soft))
    _record(store, _bounce_of("b3", "stranger@example.org", message_id="x", date=later, **hard))
    _record(store, _bounce_of("b4", third, message_id="y", date="Thu, 01 Jan 2026 10:00:00 +0000", **hard))
    store.close()
    opened: list[object] = []
    real_open = store_module.open_store
    monkeypatch.setattr(
        store_module, "open_store", lambda where, **kw: opened.append(where) or real_open(where, **kw)
    )

    rows = _report_rows(cli, manifest, tmp_path)
    assert opened == [store_at]
    assert (rows[first]["bounce"], rows[first]["bounce_reason"]) == ("hard", "mailbox_unavailable (550)")
    assert rows[first]["bounced_at"].startswith("2027-01-05T10:00:00")
    assert (rows[second]["bounce"], rows[second]["bounce_reason"]) == ("soft", "mailbox_full (452)")
    assert {email for email, row in rows.items() if row["bounce"]} == {first, second}

    status = json.loads(cli("status", manifest, "--json").stdout)
    assert opened == [store_at, store_at]
    sent = len(api.deliveries)
    assert status["bounces"] == {
        "sent": sent, "bounced": 2, "hard": 1, "soft": 1, "bounce_rate": round(2 / sent, 4)
    }  # fmt: skip
    assert f"bounced: 2 of {sent} sent" in cli("status", manifest).stdout


def test_the_fake_bounces_chosen_recipients_and_sends_signed_webhooks_to_the_service(
    api, cli, service, tmp_path
):
    """The fake (what `campaign sandbox --bounce-share/--webhook` runs): a bounced recipient's DSN lands
    in the sender's inbox and its notification reaches `campaign serve` signed, twice when the fake
    duplicates; the service records it once and suppresses the address; `events pull` finds the DSN."""
    svc, url = service
    manifest = _newsletter_reading(svc.store.where, tmp_path, api)
    first = manifest.parent.joinpath("recipients.csv").read_text().splitlines()[1].split(",")[0]
    api.bounce_addresses.add(first)
    api.duplicate_webhooks = True
    api.add_webhook(f"{url}/nylas/webhook", WEBHOOK_SECRET, ["message.bounce_detected"])
    assert cli("run", manifest, "--yes").exit_code == 0
    assert api.deliver_webhooks() == 2  # one notification, delivered twice
    assert svc.store.event_count() == 1
    assert [(e.recipient_key, e.source) for e in svc.store.entries()] == [(first, "bounce")]
    pulled = cli("events", "pull", manifest)
    assert pulled.exit_code == 0, pulled.output
    assert "1 bounce report (1 new)" in pulled.stdout
    assert [b.hard for b in svc.store.bounces(first)] == [True, True]  # the webhook's and the DSN's


def test_a_webhook_url_that_does_not_echo_the_challenge_is_refused(api, tmp_path):
    """Registration checks the URL first, as `POST /v3/webhooks` does."""
    with pytest.raises((ValueError, httpx.HTTPError)):
        api.add_webhook("http://127.0.0.1:9/nylas/webhook", WEBHOOK_SECRET, ["message.bounce_detected"])


def test_the_fakes_tracking_webhooks_reach_report_and_status(api, cli, service, tmp_path):
    """Opens, a click and a human reply simulated at the fake arrive at `campaign serve` as signed
    webhooks; an auto-sent reply by the sender itself does not count; report and status show them."""
    svc, url = service
    manifest = copy_sample("newsletter", tmp_path)
    text = manifest.read_text().replace(
        'suppress = ["unsubscribed.txt"', f'suppress = ["unsubscribed.txt", "{svc.store.where}"'
    )
    manifest.write_text(
        text.replace(
            "tracking = { opens = true, links = true,",
            "tracking = { opens = true, links = true, thread_replies = true,",
        )
    )
    (sender,) = load_manifest(manifest).senders
    api.add_grant(sender.grant_id, sender.email or "")
    kinds = ["message.opened", "message.link_clicked", "thread.replied"]
    api.add_webhook(f"{url}/nylas/webhook", WEBHOOK_SECRET, kinds)
    assert cli("run", manifest, "--yes").exit_code == 0
    first = api.deliveries[0]
    reader = first.payload["to"][0]["email"]
    assert api.open_message(sender.grant_id, first.id)
    assert api.click_link(sender.grant_id, first.id, "https://example.com/spring")
    human = f"From: {reader}\r\nTo: {sender.email}\r\nSubject: Re: hi\r\n\r\nThanks!".encode()
    api.receive_message(sender.grant_id, human, reply_to=first.id)
    own = f"From: {sender.email}\r\nTo: {reader}\r\nSubject: Re: hi\r\n\r\nnote".encode()
    api.receive_message(sender.grant_id, own, reply_to=first.id)
    assert api.deliver_webhooks() == 4
    status = json.loads(cli("status", manifest, "--json").stdout)["engagement"]
    assert (status["opened"], status["clicked"], status["replied"]) == (1, 1, 1)


def test_blocks_never_suppress_an_address_nor_count_toward_the_soft_rule(store_at):
    """Five blocks of one address within days: kept, not suppressed. Beside two ordinary soft bounces
    they make no third: only a third soft bounce of the address's own does."""
    store = open_store(store_at, clock=FakeClock())

    def bounce(event_id: str, day: int, code: str, reason: str) -> None:
        when = datetime(2027, 1, 1, tzinfo=UTC) + timedelta(days=day)
        obj = {
            "bounce_reason": reason,
            "bounced_addresses": ["ann@example.com"],
            "code": code,
            "bounce_date": when.strftime("%a, %d %b %Y %H:%M:%S +0000"),
        }
        found = parse_notification(_envelope(event_id, "message.bounce_detected", obj))
        bounces = parse_bounces(found, received_at=datetime.now(UTC))
        store.record_event(event_id, found.type, grant_id=None, body="{}", bounces=bounces)

    try:
        for n in range(5):
            bounce(f"block{n}", n, "550", _GMAIL_SPAM)
        assert store.entries() == []
        bounce("soft1", 6, "452", "4.2.2 mailbox full")
        bounce("soft2", 7, "452", "4.2.2 mailbox full")
        assert store.entries() == []
        bounce("soft3", 8, "452", "4.2.2 mailbox full")
        assert [e.recipient_key for e in store.entries()] == ["ann@example.com"]
        assert len(store.bounces("ann@example.com")) == 8
    finally:
        store.close()
