"""Contract tests of the fake Nylas API, with plain httpx over ASGI and over a loopback socket.

These pin the fake to `nylas-api.md` §3, §4, §5 and §11 without going through our
client, so that a misunderstanding shared by the client and the fake cannot pass.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from campaign.testing import FakeClock, FakeNylas, Fault, next_outbox_number, serve_on_loopback
from campaign.testing.server import listen_on_loopback

pytestmark = pytest.mark.anyio

API_KEY = "nyk_v0_test"
GRANT = "e19f8e1a-eb1c-41c0-b6a6-d2e59daf7f47"
EMAIL = "alice@example.com"
MS_GRANT = "5a1c0000-0000-4000-8000-00000000beef"
MS_EMAIL = "bob@contoso.test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def make_fake(clock: FakeClock | None = None) -> FakeNylas:
    fake = FakeNylas(api_key=API_KEY, clock=clock)
    fake.add_grant(GRANT, EMAIL)
    fake.add_grant(MS_GRANT, MS_EMAIL, provider="microsoft")
    return fake


@pytest.fixture
def fake() -> FakeNylas:
    return make_fake()


class Switchboard:
    """One loopback server for the whole module; each test plugs its own fake in (uvicorn stops slowly)."""

    def __init__(self) -> None:
        self.fake: FakeNylas | None = None

    @property
    def app(self) -> ASGIApp:
        return self.forward

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.fake is not None
        await self.fake.app(scope, receive, send)


@pytest.fixture(scope="module")
def loopback() -> Iterator[tuple[Switchboard, str]]:
    board = Switchboard()
    with serve_on_loopback(board) as url:
        yield board, url


@pytest.fixture(params=["asgi", "loopback"])
async def client(
    request: pytest.FixtureRequest, fake: FakeNylas, loopback: tuple[Switchboard, str]
) -> AsyncIterator[httpx.AsyncClient]:
    if request.param == "asgi":
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake.test") as http:
            yield http
        return
    board, url = loopback
    board.fake = fake
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            yield http
    finally:
        board.fake = None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def timed_fake(clock: FakeClock) -> FakeNylas:
    return make_fake(clock)


@pytest.fixture
async def timed_client(timed_fake: FakeNylas) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=timed_fake.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake.test") as http:
        yield http


def message(**extra: Any) -> dict[str, Any]:
    return {"to": [{"email": "ann@example.com", "name": "Ann"}], "subject": "Spring offer", **extra} | (
        {} if "body" in extra else {"body": "<p>Hi <b>Ann</b></p>"}
    )


async def send(
    http: httpx.AsyncClient,
    payload: Any = None,
    *,
    key: str | None = None,
    grant: str = GRANT,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    headers = dict(AUTH)
    if key is not None:
        headers["Idempotency-Key"] = key
    body = payload if payload is not None else message()
    return await http.post(f"/v3/grants/{grant}/messages/send", json=body, headers=headers, params=params)


async def send_multipart(
    http: httpx.AsyncClient, files: Any, *, grant: str = GRANT, key: str | None = None
) -> httpx.Response:
    headers = dict(AUTH) | ({"Idempotency-Key": key} if key else {})
    return await http.post(f"/v3/grants/{grant}/messages/send", files=files, headers=headers)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert response.headers["x-request-id"] == body["request_id"]
    return dict(body["error"])


async def send_through_domain(
    http: httpx.AsyncClient, domain: str, *, key: str, sender: str = "news"
) -> httpx.Response:
    payload = message(**{"from": {"email": f"{sender}@{domain}"}})
    headers = AUTH | {"Idempotency-Key": key}
    return await http.post(f"/v3/domains/{domain}/messages/send", json=payload, headers=headers)


# ---- auth, grants, envelope ----


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
async def test_missing_or_wrong_api_key_is_401(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """Without `Authorization: Bearer <key>` every endpoint answers 401 unauthorized."""
    response = await client.post(f"/v3/grants/{GRANT}/messages/send", json=message(), headers=headers)
    assert response.status_code == 401
    assert error_of(response) == {"type": "unauthorized", "message": "Unauthorized"}


async def test_unknown_grant_is_404(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """A grant nobody added is 404 not_found_error, and the request is logged under the given id."""
    response = await send(client, grant="no-such-grant")
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"
    assert fake.requests[-1].grant_id == "no-such-grant"
    assert fake.deliveries == []


@pytest.mark.parametrize("identifier", [f"grant:{GRANT}", EMAIL, f"email:{EMAIL}", EMAIL.upper()])
async def test_grant_is_found_by_email_and_prefixes(
    client: httpx.AsyncClient, fake: FakeNylas, identifier: str
) -> None:
    """The path accepts the grant id with `grant:`, the address, or `email:<address>`."""
    response = await send(client, grant=identifier)
    assert response.status_code == 200
    assert fake.deliveries[0].grant_id == GRANT


async def test_unknown_path_answers_the_json_envelope(client: httpx.AsyncClient) -> None:
    """Unrouted paths give the API's 404 envelope with a request id, not a text page."""
    response = await client.get(f"/v3/grants/{GRANT}/nothing", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"


# ---- validation ----


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_unparseable_body_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    """A body that is not a JSON object is 400 "error parsing request body"."""
    headers = AUTH | {"Content-Type": "application/json"}
    response = await client.post(f"/v3/grants/{GRANT}/messages/send", content=raw, headers=headers)
    assert response.status_code == 400
    assert error_of(response) == {"type": "invalid_request_error", "message": "error parsing request body"}


@pytest.mark.parametrize(
    "payload",
    [
        {"subject": "no to"},
        {"to": []},
        {"to": [{"name": "no email"}]},
        {"to": "ann@example.com"},
        message(**{"from": [{"email": "a@example.com"}, {"email": "b@example.com"}]}),
        message(custom_headers={"X-A": "1"}),
        message(custom_headers=[{"name": "X-A"}]),
        message(custom_headers=[{"name": "X-A", "value": 1}]),
        message(metadata={"key1": 5}),
        message(metadata={f"k{n}": "v" for n in range(51)}),
        message(use_draft=True),
        message(attachments=[{"filename": "a.txt", "content_type": "text/plain", "content": "***"}]),
    ],
    ids=lambda p: json.dumps(p)[:40],
)
async def test_invalid_payload_is_400_and_not_sent(
    client: httpx.AsyncClient, fake: FakeNylas, payload: dict[str, Any]
) -> None:
    """Malformed fields (§11.2 item 3) answer 400 invalid_request_error and deliver nothing."""
    response = await send(client, payload)
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"
    assert fake.deliveries == []


async def test_a_trial_app_may_send_but_not_track(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """A Sandbox (trial) application: a send with tracking on is 400 "Tracking options are not allowed
    for trial accounts" and is not sent; with tracking off, or all flags false, it goes out."""
    fake.trial_app = True
    for flag in ("opens", "links", "thread_replies"):
        refused = await send(client, message(tracking_options={flag: True, "label": "c"}))
        assert refused.status_code == 400
        assert error_of(refused) == {
            "type": "invalid_request_error",
            "message": "Tracking options are not allowed for trial accounts",
        }
    assert fake.deliveries == []
    assert (await send(client, message(tracking_options={"opens": False}))).status_code == 200
    assert (await send(client, message())).status_code == 200
    assert len(fake.deliveries) == 2


@pytest.mark.parametrize("field", ["to", "cc", "bcc"])
async def test_non_ascii_address_is_402(client: httpx.AsyncClient, fake: FakeNylas, field: str) -> None:
    """A non-ASCII address answers 402 "Sending to at least one recipient failed."."""
    payload = message() | {field: [{"email": "jürgen@example.com"}]}
    response = await send(client, payload)
    assert response.status_code == 402
    assert error_of(response)["message"] == "Sending to at least one recipient failed."
    assert fake.deliveries == []


async def test_metadata_of_50_keys_is_accepted(client: httpx.AsyncClient) -> None:
    """Fifty metadata pairs is the limit, not over it."""
    response = await send(client, message(metadata={f"k{n}": "v" for n in range(50)}))
    assert response.status_code == 200


async def test_json_body_over_3_mb_is_413(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """A JSON request over 3 MB is refused with 413 invalid_request_error."""
    response = await send(client, message(body="x" * 3_000_000))
    assert response.status_code == 413
    assert error_of(response)["type"] == "invalid_request_error"
    assert fake.deliveries == []


async def test_the_3_mb_limit_counts_the_headers_too(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """§2: the limit is the whole request's: a body of 3,000,000 bytes less a little than the headers
    take is refused; with room for them it goes out."""
    base = len(json.dumps(message(body="")).encode())

    async def send_sized(total_body: int, *, padding: str = "") -> httpx.Response:
        payload = message(body="x" * (total_body - base))
        headers = AUTH | {"Content-Type": "application/json", "X-Padding": padding}
        content = json.dumps(payload).encode()
        assert len(content) == total_body
        return await client.post(f"/v3/grants/{GRANT}/messages/send", content=content, headers=headers)

    refused = await send_sized(3_000_000 - 100, padding="p" * 200)
    assert refused.status_code == 413
    assert error_of(refused)["type"] == "invalid_request_error"
    assert fake.deliveries == []
    assert (await send_sized(3_000_000 - 2_048)).status_code == 200  # our client's allowance for them
    assert len(fake.deliveries) == 1


async def test_multipart_body_over_25_mb_is_413(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """A multipart request over 25 MB is refused with 413."""
    files = {"message": (None, json.dumps(message())), "file0": ("big.bin", b"\0" * 25_000_000, "x/y")}
    response = await send_multipart(client, files)
    assert response.status_code == 413
    assert fake.deliveries == []


# ---- success ----


async def test_success_returns_the_full_message_object(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """A send answers 200 with §11.2's envelope and message object, and is delivered once."""
    payload = message(
        cc=[{"email": "cc@example.com"}],
        reply_to=[{"email": "support@example.com"}],
        tracking_options={"opens": True, "links": False},
    )
    response = await send(client, payload)
    assert response.status_code == 200
    body = response.json()
    assert response.headers["x-request-id"] == body["request_id"]
    assert body["grant_id"] == GRANT
    data = body["data"]
    assert data["object"] == "message"
    assert data["grant_id"] == GRANT
    assert data["id"]
    assert data["thread_id"]
    assert data["subject"] == "Spring offer"
    assert data["body"] == "<p>Hi <b>Ann</b></p>"
    assert data["snippet"] == "Hi Ann"
    assert data["from"] == [{"email": EMAIL}]
    assert data["to"] == payload["to"]
    assert data["cc"] == [{"email": "cc@example.com"}]
    assert data["bcc"] == []
    assert data["reply_to"] == [{"email": "support@example.com"}]
    assert isinstance(data["date"], int)
    assert data["folders"] == [fake.sent_folder_id(GRANT)]
    assert data["attachments"] == []
    assert data["tracking_options"]["opens"] is True
    assert data["schedule_id"] == ""
    assert "headers" not in data
    [delivery] = fake.deliveries
    assert (delivery.id, delivery.grant_id, delivery.multipart) == (data["id"], GRANT, False)
    assert delivery.payload == payload


async def test_given_from_is_kept_and_snippet_is_100_chars(client: httpx.AsyncClient) -> None:
    """A `from` in the request wins over the grant address; the snippet is cut at 100 characters."""
    sender = [{"email": "sales@acme.test", "name": "Acme"}]
    response = await send(client, message(**{"from": sender}, body="<div>" + "word " * 60 + "</div>"))
    data = response.json()["data"]
    assert data["from"] == sender
    assert len(data["snippet"]) == 100
    assert data["snippet"].startswith("word word")


async def test_metadata_and_custom_headers_are_stored(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """Metadata and custom headers reach the delivery, the response and the stored message."""
    headers = [
        {"name": "X-Campaign-Id", "value": "cmp-42"},
        {"name": "List-Unsubscribe", "value": "<https://u>"},
    ]
    metadata = {"key1": "cmp-42", "key2": "ann@example.com", "campaign": "cmp-42"}
    response = await send(client, message(custom_headers=headers, metadata=metadata))
    assert response.json()["data"]["metadata"] == metadata
    assert fake.deliveries[0].payload["custom_headers"] == headers
    listed = await client.get(
        f"/v3/grants/{GRANT}/messages", headers=AUTH, params={"fields": "include_headers"}
    )
    [stored] = listed.json()["data"]
    assert stored["metadata"] == metadata
    assert headers[0] in stored["headers"]
    assert headers[1] in stored["headers"]


async def test_send_fields_include_headers(client: httpx.AsyncClient) -> None:
    """`fields=include_headers` returns all headers (custom ones too); basic gives Message-ID only."""
    custom = [{"name": "X-Campaign-Id", "value": "cmp-42"}]
    full = await send(client, message(custom_headers=custom), params={"fields": "include_headers"})
    names = [h["name"] for h in full.json()["data"]["headers"]]
    assert {"Message-ID", "Subject", "To", "From", "X-Campaign-Id"} <= set(names)
    basic = await send(client, message(custom_headers=custom), params={"fields": "include_basic_headers"})
    [header] = basic.json()["data"]["headers"]
    assert header["name"] == "Message-ID"
    assert re.fullmatch(r"<\w+@mailer\.nylas\.com>", header["value"])


# ---- idempotency ----


async def test_same_key_same_payload_replays_without_sending(
    client: httpx.AsyncClient, fake: FakeNylas
) -> None:
    """A repeated key with the same payload replays status and body with Idempotent-Response."""
    first = await send(client, key="k-1")
    again = await send(client, key="k-1")
    assert first.status_code == again.status_code == 200
    assert "idempotent-response" not in first.headers
    assert again.headers["idempotent-response"] == "true"
    assert again.json() == first.json()
    assert len(fake.deliveries) == 1
    assert fake.deliveries[0].idempotency_key == "k-1"
    assert [(r.status, r.replayed, r.idempotency_key) for r in fake.requests] == [
        (200, False, "k-1"),
        (200, True, "k-1"),
    ]


async def test_keys_are_scoped_per_grant(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """The same key on another grant is a different request."""
    await send(client, key="k-1")
    other = await send(client, key="k-1", grant=MS_GRANT)
    assert "idempotent-response" not in other.headers
    assert len(fake.deliveries) == 2


async def test_transactional_keys_are_the_applications_and_domains_are_no_grants(
    client: httpx.AsyncClient, fake: FakeNylas
) -> None:
    """§4, §6: a transactional send's Idempotency-Key is scoped to the application: the same key through
    another domain meets the first (a replay, or 409 for another payload), apart from grant sends'
    keys; and a domain is no grant: its sends are not listed under /v3/grants (§5)."""
    fake.add_domain("mail.example.com")
    fake.add_domain("news.example.org")
    first = await send_through_domain(client, "mail.example.com", key="k-app")
    assert first.status_code == 200
    other = await send_through_domain(client, "news.example.org", key="k-app")
    assert other.status_code == 409
    assert error_of(other)["type"] == "api.invalid_idempotent_request"
    again = await send_through_domain(client, "news.example.org", key="k-app", sender="x")
    assert again.status_code == 409
    replay = await send_through_domain(client, "mail.example.com", key="k-app")
    assert replay.headers["idempotent-response"] == "true"
    assert (await send(client, key="k-app")).status_code == 200  # a grant's keys are its own
    assert len(fake.deliveries) == 2
    for path in ("messages", "folders", f"messages/{first.json()['data']['id']}"):
        listed = await client.get(f"/v3/grants/domain:mail.example.com/{path}", headers=AUTH)
        assert listed.status_code == 404
        assert error_of(listed)["type"] == "not_found_error"


async def test_same_key_different_payload_is_409(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """Reusing a key with another payload answers 409 api.invalid_idempotent_request."""
    await send(client, key="k-1")
    response = await send(client, message(subject="Other"), key="k-1")
    assert response.status_code == 409
    assert error_of(response)["type"] == "api.invalid_idempotent_request"
    assert len(fake.deliveries) == 1


async def test_key_over_256_characters_is_400(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """An Idempotency-Key of 257 characters is 400 api.invalid_idempotency_key; 256 is fine."""
    response = await send(client, key="k" * 257)
    assert response.status_code == 400
    assert error_of(response)["type"] == "api.invalid_idempotency_key"
    assert (await send(client, key="k" * 256)).status_code == 200
    assert len(fake.deliveries) == 1


async def test_same_key_while_first_in_progress_is_409(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """While a slow first request holds the key, a second gets 409 api.concurrent_idempotent_request."""
    fake.script(Fault.SLOW, delay_s=0.2)
    answers: dict[str, httpx.Response] = {}

    async def send_first() -> None:
        answers["first"] = await send(client, key="k-slow")

    async with anyio.create_task_group() as group:
        group.start_soon(send_first)
        with anyio.fail_after(2):
            while fake.in_flight == 0:
                await anyio.sleep(0.002)
        second = await send(client, key="k-slow")
    assert second.status_code == 409
    assert error_of(second)["type"] == "api.concurrent_idempotent_request"
    assert answers["first"].status_code == 200
    assert len(fake.deliveries) == 1


async def test_key_expires_after_one_hour(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """Within the hour a key replays; an hour after the first request it is fresh and sends again."""
    await send(timed_client, key="k-1")
    clock.advance(3599)
    assert (await send(timed_client, key="k-1")).headers["idempotent-response"] == "true"
    clock.advance(1)
    fresh = await send(timed_client, key="k-1")
    assert "idempotent-response" not in fresh.headers
    assert len(timed_fake.deliveries) == 2


async def test_stored_5xx_is_replayed_and_gateway_errors_are_not(
    client: httpx.AsyncClient, fake: FakeNylas
) -> None:
    """A processed 500 is cached under the key; a gateway 502 is not, so a retry sends."""
    fake.script(Fault.INTERNAL_ERROR)
    assert (await send(client, key="k-500")).status_code == 500
    replay = await send(client, key="k-500")
    assert (replay.status_code, replay.headers["idempotent-response"]) == (500, "true")
    fake.script(Fault.BAD_GATEWAY)
    assert (await send(client, key="k-502")).status_code == 502
    retry = await send(client, key="k-502")
    assert retry.status_code == 200
    assert "idempotent-response" not in retry.headers
    assert [d.idempotency_key for d in fake.deliveries] == ["k-502"]


async def test_timeout_after_send_delivers_once_and_replays_504(
    client: httpx.AsyncClient, fake: FakeNylas
) -> None:
    """TIMEOUT_AFTER_SEND delivers, answers 504 provider_error, and the key replays that 504."""
    fake.script(Fault.TIMEOUT_AFTER_SEND)
    first = await send(client, key="k-504")
    assert first.status_code == 504
    assert error_of(first) == {"type": "provider_error", "message": "Provider request timed out."}
    replay = await send(client, key="k-504")
    assert (replay.status_code, replay.headers["idempotent-response"]) == (504, "true")
    assert replay.json() == first.json()
    assert len(fake.deliveries) == 1


# ---- rate limits and quotas ----


async def test_json_sends_over_200_per_second_are_429(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """The 201st JSON send in one second is Nylas' own 429, per grant; a second later it passes."""
    statuses = [(await send(timed_client)).status_code for _ in range(201)]
    assert statuses == [200] * 200 + [429]
    refused = await send(timed_client)
    assert error_of(refused) == {
        "type": "nylas_rate_limit_exceeded",
        "message": "Too many requests, please try again shortly.",
    }
    assert "retry-after" not in refused.headers
    assert (await send(timed_client, grant=MS_GRANT)).status_code == 200
    timed_fake.nylas_retry_after = True
    assert (await send(timed_client)).headers["retry-after"] == "1"
    clock.advance(1)
    assert (await send(timed_client)).status_code == 200


async def test_multipart_sends_over_10_per_second_are_429(
    timed_client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Multipart sends have their own window of 10 per second per grant; JSON sends still pass."""
    files = {"message": (None, json.dumps(message())), "file0": ("a.txt", b"hello", "text/plain")}
    statuses = [(await send_multipart(timed_client, files)).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    assert (await send(timed_client)).status_code == 200
    clock.advance(1.0)
    assert (await send_multipart(timed_client, files)).status_code == 200


async def test_google_quota_names_when_the_window_frees(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """Over a daily recipient quota: 429 quota_exceeded_error with "Retry after <ISO>" and Retry-After."""
    timed_fake.set_quota(GRANT, recipients_per_day=3)
    two = message(to=[{"email": "a@example.com"}, {"email": "b@example.com"}])
    assert (await send(timed_client, two)).status_code == 200
    clock.advance(3600)
    assert (await send(timed_client)).status_code == 200
    refused = await send(timed_client)
    assert refused.status_code == 429
    error = error_of(refused)
    assert (error["type"], error["message"]) == ("quota_exceeded_error", "Activity limit reached")
    assert error["provider_error"] == {
        "error": {
            "code": 429,
            "message": "User-rate limit exceeded. Retry after 2026-01-06T09:00:00.000Z (Mail sending)",
        }
    }
    assert refused.headers["retry-after"] == str(23 * 3600)
    clock.advance(23 * 3600)
    assert (await send(timed_client)).status_code == 200
    assert len(timed_fake.deliveries) == 3


async def test_microsoft_quota_sends_retry_after(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """Over a per-minute message quota, Microsoft style: 429 rate_limit_error, ApplicationThrottled."""
    timed_fake.set_quota(MS_GRANT, messages_per_minute=2, style="microsoft")
    await send(timed_client, grant=MS_GRANT)
    clock.advance(10)
    await send(timed_client, grant=MS_GRANT)
    clock.advance(5)
    refused = await send(timed_client, grant=MS_GRANT)
    assert refused.status_code == 429
    error = error_of(refused)
    assert error["type"] == "rate_limit_error"
    assert error["provider_error"]["error"]["code"] == "ApplicationThrottled"
    assert refused.headers["retry-after"] == "45"
    clock.advance(45)
    assert (await send(timed_client, grant=MS_GRANT)).status_code == 200


async def test_a_microsoft_mailbox_takes_four_sends_at_once_and_refuses_the_fifth(
    client: httpx.AsyncClient, fake: FakeNylas
) -> None:
    """Graph's MailboxConcurrency: past 4 sends of one Microsoft grant at once, 429 rate_limit_error with
    ApplicationThrottled and Retry-After, nothing sent; a Google grant takes them all."""
    fake.latency_s = 0.3
    answers: list[httpx.Response] = []

    async def send_one(grant: str, n: int) -> None:
        answers.append(await send(client, message(subject=f"n{n}"), grant=grant, key=f"{grant}-{n}"))

    for grant in (MS_GRANT, GRANT):
        answers.clear()
        async with anyio.create_task_group() as group:
            for n in range(6):
                group.start_soon(send_one, grant, n)
        statuses = sorted(a.status_code for a in answers)
        if grant == GRANT:
            assert statuses == [200] * 6
            continue
        assert statuses == [200] * 4 + [429] * 2
        for refused in (a for a in answers if a.status_code == 429):
            error = error_of(refused)
            assert error["type"] == "rate_limit_error"
            assert error["provider_error"]["error"] == {
                "code": "ApplicationThrottled",
                "message": "Application is over its MailboxConcurrency limit.",
            }
            assert refused.headers["retry-after"] == "1"
    assert Counter(d.grant_id for d in fake.deliveries) == {MS_GRANT: 4, GRANT: 6}


async def test_throttled_account_refuses_until_the_given_time(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """An account throttled for 20 minutes answers every send 429 with the remaining wait."""
    timed_fake.throttle_account(MS_GRANT, until=START + timedelta(minutes=20))
    clock.advance(60)
    refused = await send(timed_client, grant=MS_GRANT)
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "1140")
    clock.advance(1140)
    assert (await send(timed_client, grant=MS_GRANT)).status_code == 200


# ---- scripted faults ----


@pytest.mark.parametrize(
    ("fault", "status", "error_type"),
    [
        (Fault.NYLAS_RATE_LIMIT, 429, "nylas_rate_limit_exceeded"),
        (Fault.PROVIDER_THROTTLE, 429, "rate_limit_error"),
        (Fault.QUOTA_EXCEEDED, 429, "quota_exceeded_error"),
        (Fault.DAILY_LIMIT, 429, "rate_limit_error"),
        (Fault.UNAUTHORIZED, 401, "unauthorized"),
        (Fault.FORBIDDEN, 403, "insufficient_scopes"),
        (Fault.REJECTED, 402, "message_rejected"),
        (Fault.INTERNAL_ERROR, 500, "api.internal_error"),
        (Fault.UNAVAILABLE, 503, "api.service_unavailable"),
    ],
)
async def test_scripted_fault_answers_once_and_sends_nothing(
    client: httpx.AsyncClient, fake: FakeNylas, fault: Fault, status: int, error_type: str
) -> None:
    """Each JSON fault answers its status and type to the next request only, and sends nothing."""
    fake.script(fault)
    response = await send(client)
    assert response.status_code == status
    assert error_of(response)["type"] == error_type
    assert fake.deliveries == []
    assert (await send(client)).status_code == 200


async def test_throttle_faults_carry_the_wait(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """PROVIDER_THROTTLE sends Retry-After; QUOTA_EXCEEDED names the ISO time it frees."""
    timed_fake.script(Fault.PROVIDER_THROTTLE, retry_after_s=7)
    timed_fake.script(Fault.QUOTA_EXCEEDED, retry_after_s=30)
    throttled = await send(timed_client)
    assert throttled.headers["retry-after"] == "7"
    quota = await send(timed_client)
    text = error_of(quota)["provider_error"]["error"]["message"]
    assert text == "User-rate limit exceeded. Retry after 2026-01-05T09:00:30.000Z (Mail sending)"
    assert quota.headers["retry-after"] == "30"
    timed_fake.quota_retry_after = False
    timed_fake.script(Fault.QUOTA_EXCEEDED)
    assert "retry-after" not in (await send(timed_client)).headers
    assert clock.sleeps == []


async def test_bad_gateway_is_html(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """BAD_GATEWAY answers 502 with an HTML page, not JSON."""
    fake.script(Fault.BAD_GATEWAY)
    response = await send(client)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.lstrip().startswith("<html>")
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_reset_drops_the_connection_before_sending(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """RESET makes the client see a transport error; nothing is delivered or cached."""
    fake.script(Fault.RESET)
    with pytest.raises(httpx.TransportError):
        await send(client, key="k-reset")
    assert fake.deliveries == []
    assert fake.requests[-1].status == 0
    retry = await send(client, key="k-reset")
    assert (retry.status_code, "idempotent-response" in retry.headers) == (200, False)


async def test_reset_after_send_delivers_and_replays_200(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """RESET_AFTER_SEND delivers, drops the connection, and the key then replays the 200."""
    fake.script(Fault.RESET_AFTER_SEND)
    with pytest.raises(httpx.TransportError):
        await send(client, key="k-lost")
    replay = await send(client, key="k-lost")
    assert (replay.status_code, replay.headers["idempotent-response"]) == (200, "true")
    assert replay.json()["data"]["id"] == fake.deliveries[0].id
    assert len(fake.deliveries) == 1


async def test_faults_follow_grant_and_times(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """A fault scripted for one grant spares the others, and strikes exactly `times` requests."""
    fake.script(Fault.INTERNAL_ERROR, grant_id=MS_EMAIL, times=2)
    assert (await send(client)).status_code == 200
    statuses = [(await send(client, grant=MS_GRANT)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]


async def test_slow_and_latency_wait_on_the_clock(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """SLOW waits delay_s and latency_s waits on every send, both on the fake's clock, then send."""
    timed_fake.latency_s = 0.25
    timed_fake.script(Fault.SLOW, delay_s=120)
    assert (await send(timed_client)).status_code == 200
    assert (await send(timed_client)).status_code == 200
    assert clock.sleeps == [0.25, 120, 0.25]
    assert timed_fake.deliveries[0].delivered_at == START + timedelta(seconds=120.25)


async def test_slow_beyond_client_timeout_still_delivers(
    fake: FakeNylas, loopback: tuple[Switchboard, str]
) -> None:
    """Over a real socket a SLOW send times the client out, yet the message is delivered."""
    board, url = loopback
    board.fake = fake
    fake.script(Fault.SLOW, delay_s=0.15)
    async with httpx.AsyncClient(base_url=url, timeout=0.03) as http:
        with pytest.raises(httpx.TimeoutException):
            await send(http, key="k-timeout")
        # Wait until the server has finished the request (delivered AND stored its answer).
        with anyio.fail_after(2):
            while not fake.deliveries or fake.in_flight:
                await anyio.sleep(0.005)
        replay = await send(http, key="k-timeout")
    assert replay.headers["idempotent-response"] == "true"
    assert len(fake.deliveries) == 1


def test_serve_on_loopback_serves_a_fake_and_stops(fake: FakeNylas) -> None:
    """serve_on_loopback serves the fake on 127.0.0.1 and the port is closed after the block."""
    with serve_on_loopback(fake) as url:
        assert url.startswith("http://127.0.0.1:")
        response = httpx.get(f"{url}/v3/grants/{GRANT}/folders", headers=AUTH)
        assert response.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v3/grants/{GRANT}/folders", headers=AUTH)


async def test_connections_to_the_loopback_fake_send_without_nagle() -> None:
    """Accepted from `listen_on_loopback`, a connection has TCP_NODELAY (asyncio sets it only for a socket
    whose protocol is TCP): an answer written in two parts does not wait 40 ms for a delayed ACK."""
    accepted: list[asyncio.BaseTransport] = []
    arrived = asyncio.Event()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)
            arrived.set()

    sock = listen_on_loopback()
    async with await asyncio.get_running_loop().create_server(Accept, sock=sock):
        with socket.create_connection(sock.getsockname()):
            await asyncio.wait_for(arrived.wait(), timeout=10)
            server_side = accepted[0].get_extra_info("socket")
            assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            accepted[0].close()


# ---- multipart ----


@pytest.mark.parametrize("as_file", [False, True], ids=["message-field", "message-file-part"])
async def test_multipart_attachments_arrive_byte_identical(
    client: httpx.AsyncClient, fake: FakeNylas, as_file: bool
) -> None:
    """The `message` part (field or empty-filename file part) and file parts named by cid / file{N}."""
    logo = bytes(range(256)) * 6000
    report = b"%PDF-1.7 \x00\xff binary"
    text = json.dumps(message(body='<img src="cid:logo1">'))
    part: Any = ("", text, "application/json") if as_file else (None, text)
    files = [
        ("message", part),
        ("logo1", ("logo.png", logo, "image/png")),
        ("file1", ("r.pdf", report, "x/pdf")),
    ]
    response = await send_multipart(client, files)
    assert response.status_code == 200
    [delivery] = fake.deliveries
    assert delivery.multipart is True
    assert delivery.payload == json.loads(text)
    assert [(a.filename, a.content_type, a.content, a.content_id) for a in delivery.attachments] == [
        ("logo.png", "image/png", logo, "logo1"),
        ("r.pdf", "x/pdf", report, None),
    ]
    described = response.json()["data"]["attachments"]
    assert [(a["size"], a["is_inline"]) for a in described] == [(len(logo), True), (len(report), False)]


async def test_json_attachments_are_decoded(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """Base64 attachments in a JSON send are decoded into the delivery."""
    content = b"col\n1\n\xff"
    attachment = {
        "filename": "a.csv",
        "content_type": "text/csv",
        "content": base64.b64encode(content).decode(),
    }
    assert (await send(client, message(attachments=[attachment]))).status_code == 200
    [delivered] = fake.deliveries[0].attachments
    assert (delivered.filename, delivered.content, delivered.content_id) == ("a.csv", content, None)


async def test_multipart_without_message_part_is_400(client: httpx.AsyncClient) -> None:
    """A multipart send with no `message` part cannot be parsed."""
    response = await send_multipart(client, {"file0": ("a.txt", b"x", "text/plain")})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


# ---- scheduled send ----


async def test_scheduled_send_is_202_and_cancellable(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """`send_at` answers 202 with a schedule id, delivers nothing, and the schedule can be cancelled."""
    send_at = int((START + timedelta(hours=1)).timestamp())
    response = await send(timed_client, message(send_at=send_at))
    assert response.status_code == 202
    schedule_id = response.json()["data"]["schedule_id"]
    assert schedule_id
    assert response.json()["data"]["send_at"] == send_at
    assert timed_fake.deliveries == []
    path = f"/v3/grants/{GRANT}/messages/schedules"
    listed = await timed_client.get(path, headers=AUTH)
    assert listed.json()["data"][0]["status"]["code"] == "pending"
    cancelled = await timed_client.delete(f"{path}/{schedule_id}", headers=AUTH)
    assert cancelled.status_code == 202
    assert cancelled.json()["data"] == {"message": "requested cancelation for workflow"}
    one = await timed_client.get(f"{path}/{schedule_id}", headers=AUTH)
    assert one.json()["data"]["status"]["code"] == "cancelled"
    assert (await timed_client.get(f"{path}/nope", headers=AUTH)).status_code == 404
    too_soon = await send(timed_client, message(send_at=int(START.timestamp()) + 30))
    assert too_soon.status_code == 400
    later = (await send(timed_client, message(subject="Later", send_at=send_at))).json()["data"][
        "schedule_id"
    ]
    clock.advance(7200)
    done = await timed_client.get(f"{path}/{later}", headers=AUTH)
    assert done.json()["data"]["status"]["code"] == "success"
    assert (await timed_client.delete(f"{path}/{later}", headers=AUTH)).status_code == 400


# ---- listing and folders ----


async def test_folders_include_sent(client: httpx.AsyncClient, fake: FakeNylas) -> None:
    """GET /folders lists Inbox, Sent and Drafts; the Sent one carries the \\Sent attribute."""
    for grant in (GRANT, MS_GRANT):
        response = await client.get(f"/v3/grants/{grant}/folders", headers=AUTH)
        folders = response.json()["data"]
        assert [f["attributes"] for f in folders] == [["\\Inbox"], ["\\Sent"], ["\\Drafts"]]
        assert folders[1]["id"] == fake.sent_folder_id(grant)
        assert all(f["object"] == "folder" and f["grant_id"] == grant for f in folders)


async def fill_mailbox(http: httpx.AsyncClient, clock: FakeClock) -> list[str]:
    """Five sends a minute apart; returns their ids oldest first."""
    ids = []
    for n in range(5):
        payload = message(
            to=[{"email": f"r{n}@example.com"}],
            cc=[{"email": "boss@example.com"}] if n == 3 else [],
            subject=f"Spring Offer {n}",
            metadata={"key1": "cmp-42", "key2": f"r{n}@example.com"},
        )
        ids.append((await send(http, payload)).json()["data"]["id"])
        clock.advance(60)
    return ids


async def list_ids(http: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await http.get(f"/v3/grants/{GRANT}/messages", headers=AUTH, params=params)
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


async def test_list_filters(timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock) -> None:
    """to, from, subject, received_after/before, any_email, in and metadata_pair select the right messages."""
    ids = await fill_mailbox(timed_client, clock)
    start = int(START.timestamp())
    sent = timed_fake.sent_folder_id(GRANT)
    assert await list_ids(timed_client) == ids[::-1]
    assert await list_ids(timed_client, to="R2@example.com") == [ids[2]]
    assert await list_ids(timed_client, **{"from": EMAIL}) == ids[::-1]
    assert await list_ids(timed_client, subject="offer 4") == [ids[4]]
    assert (
        await list_ids(timed_client, received_after=start + 120, received_before=start + 180)
        == ids[2:4][::-1]
    )
    assert await list_ids(timed_client, any_email="nobody@x.test,boss@example.com") == [ids[3]]
    assert await list_ids(timed_client, **{"in": sent}) == ids[::-1]
    assert await list_ids(timed_client, **{"in": "INBOX"}) == []
    assert await list_ids(timed_client, metadata_pair="key2:r1@example.com") == [ids[1]]
    repeated = await timed_client.get(
        f"/v3/grants/{GRANT}/messages?to=r0@example.com&to=r4@example.com", headers=AUTH
    )
    assert [m["id"] for m in repeated.json()["data"]] == [ids[4], ids[0]]


@pytest.mark.parametrize(
    "params",
    [
        {"metadata_pair": "key1:cmp-42", "to": "r1@example.com"},
        {"metadata_pair": "campaign:cmp-42"},
        {"limit": "201"},
        {"limit": "x"},
        {"page_token": "not-a-cursor"},
        {"in": "no-such-folder"},
    ],
)
async def test_list_rejects_bad_parameters(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    """metadata_pair with another filter or an unindexed key, limit over 200, unknown cursor are 400."""
    response = await client.get(f"/v3/grants/{GRANT}/messages", headers=AUTH, params=params)
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "params",
    [
        {"thread_id": "t1", "to": "r1@example.com"},
        {"thread_id": "t1", "subject": "Spring"},
        {"unread": "true", "any_email": "r1@example.com"},
        {"starred": "false", "cc": "boss@example.com"},
        {"thread_id": "t1", "bcc": "r1@example.com"},
    ],
)
async def test_a_microsoft_grant_refuses_thread_id_unread_or_starred_with_a_search(
    client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    """§5: on Microsoft, thread_id, unread and starred exclude subject, to, cc, bcc and any_email (400);
    a Google grant takes them together, and Microsoft takes each alone or with from/dates."""
    refused = await client.get(f"/v3/grants/{MS_GRANT}/messages", headers=AUTH, params=params)
    assert refused.status_code == 400
    assert error_of(refused)["type"] == "invalid_request_error"
    assert "Microsoft" in error_of(refused)["message"]
    taken = await client.get(f"/v3/grants/{GRANT}/messages", headers=AUTH, params=params)
    assert taken.status_code == 200
    alone = {"thread_id": "t1", "from": MS_EMAIL, "received_after": "0"}
    assert (
        await client.get(f"/v3/grants/{MS_GRANT}/messages", headers=AUTH, params=alone)
    ).status_code == 200


async def test_list_pages_with_next_cursor(timed_client: httpx.AsyncClient, clock: FakeClock) -> None:
    """limit and page_token walk every message once, newest first; the last page has no next_cursor."""
    ids = await fill_mailbox(timed_client, clock)
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2, "fields": "include_headers"}
    while True:
        page = (await timed_client.get(f"/v3/grants/{GRANT}/messages", headers=AUTH, params=params)).json()
        assert all("headers" in m for m in page["data"])
        seen += [m["id"] for m in page["data"]]
        if "next_cursor" not in page:
            break
        params["page_token"] = page["next_cursor"]
    assert seen == ids[::-1]


async def test_list_default_limit_is_50(timed_client: httpx.AsyncClient, clock: FakeClock) -> None:
    """Without limit a page holds 50 messages."""
    for _ in range(51):
        await send(timed_client)
    page = (await timed_client.get(f"/v3/grants/{GRANT}/messages", headers=AUTH)).json()
    assert len(page["data"]) == 50
    assert page["next_cursor"]
    assert clock.sleeps == []


# ---- outbox ----


async def test_write_outbox_writes_json_and_html(
    client: httpx.AsyncClient, fake: FakeNylas, tmp_path: Path
) -> None:
    """Each delivery becomes NNNN-<to>.json (with id and grant_id), plus .html for an HTML body."""
    await send(client)
    await send(client, message(to=[{"email": "bob@example.com"}], body="plain words", is_plaintext=True))
    outbox = tmp_path / "outbox"
    paths = fake.write_outbox(outbox)
    assert [p.name for p in paths] == [
        "0001-ann@example.com.json",
        "0001-ann@example.com.html",
        "0002-bob@example.com.json",
    ]
    first = json.loads(paths[0].read_text(encoding="utf-8"))
    assert (first["id"], first["grant_id"], first["subject"]) == (
        fake.deliveries[0].id,
        GRANT,
        "Spring offer",
    )
    assert paths[1].read_text(encoding="utf-8") == "<p>Hi <b>Ann</b></p>"
    assert sorted(p.name for p in outbox.iterdir()) == sorted(p.name for p in paths)


async def test_write_outbox_numbers_on_from_the_files_already_there(
    client: httpx.AsyncClient, fake: FakeNylas, tmp_path: Path
) -> None:
    """A second write (a later run's) goes on from the highest number in the folder and replaces nothing,
    though it is to the same address."""
    outbox = tmp_path / "outbox"
    assert next_outbox_number(outbox) == 1
    await send(client)
    fake.write_outbox(outbox)
    (outbox / "notes.txt").write_text("mine")  # a file of the user's own: not numbered, not counted
    assert next_outbox_number(outbox) == 2
    later = make_fake()
    transport = httpx.ASGITransport(app=later.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake", headers=AUTH) as other:
        await send(other, message(subject="Re: Spring offer"))
    paths = later.write_outbox(outbox)
    assert [p.name for p in paths] == ["0002-ann@example.com.json", "0002-ann@example.com.html"]
    kept = json.loads((outbox / "0001-ann@example.com.json").read_text(encoding="utf-8"))
    assert kept["subject"] == "Spring offer"
    assert json.loads(paths[0].read_text(encoding="utf-8"))["subject"] == "Re: Spring offer"


def test_replies_join_their_thread_and_the_thread_says_when_mail_last_came_in():
    """A send with `reply_to_message_id` and a received reply (`receive_message(reply_to=…)`) join the
    first message's thread; `?thread_id=` lists all three; `GET /threads/{id}` dates the incoming one;
    `fields=include_headers` shows the received message's own headers (auto-reply detection needs them)."""
    clock = FakeClock()
    fake = FakeNylas(api_key="k", clock=clock)
    fake.add_grant("g", "rep@example.com")
    headers = {"Authorization": "Bearer k"}

    async def go() -> None:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake", headers=headers) as http:
            first = (
                await http.post(
                    "/v3/grants/g/messages/send",
                    json={"to": [{"email": "ann@example.com"}], "subject": "Hi", "body": "x"},
                )
            ).json()["data"]
            clock.advance(60)
            nudge = {
                "to": [{"email": "ann@example.com"}],
                "subject": "Re: Hi",
                "body": "y",
                "reply_to_message_id": first["id"],
            }
            second = (await http.post("/v3/grants/g/messages/send", json=nudge)).json()["data"]
            assert second["thread_id"] == first["thread_id"]
            clock.advance(60)
            raw = (
                b"From: Ann <ann@example.com>\r\nTo: rep@example.com\r\nSubject: Re: Hi\r\n"
                b"Auto-Submitted: auto-replied\r\n\r\nAway"
            )
            reply = fake.receive_message("g", raw, reply_to=second["id"])
            listed = (
                await http.get("/v3/grants/g/messages", params={"thread_id": first["thread_id"]})
            ).json()["data"]
            assert {m["id"] for m in listed} == {first["id"], second["id"], reply}
            with_headers = (
                await http.get(
                    "/v3/grants/g/messages",
                    params={"thread_id": first["thread_id"], "fields": "include_headers"},
                )
            ).json()["data"]
            got = next(m for m in with_headers if m["id"] == reply)
            assert {"name": "Auto-Submitted", "value": "auto-replied"} in got["headers"]
            thread = (await http.get(f"/v3/grants/g/threads/{first['thread_id']}")).json()["data"]
            assert thread["latest_message_received_date"] == int(clock.now().timestamp())
            assert thread["latest_message_sent_date"] == second["date"]
            assert set(thread["message_ids"]) == {first["id"], second["id"], reply}
            missing = await http.get("/v3/grants/g/threads/nope")
            assert missing.status_code == 404

    anyio.run(go)


def test_a_filed_microsoft_message_changes_id_and_a_reply_to_its_old_id_is_answered_404():
    """`move_message` on a Microsoft grant gives the message a new id and keeps its thread and Message-ID
    (a Graph id changes on a move); a reply naming the old id is answered 404 in the very envelope an
    unknown grant gets, cached under its key like any answer, and delivers nothing; a reply naming the
    new id joins the thread. A Gmail message keeps its id when filed (a label)."""
    clock = FakeClock()
    fake = FakeNylas(api_key="k", clock=clock)
    fake.add_grant("ms", "rep@corp.example", provider="microsoft")
    fake.add_grant("gm", "rep@example.com", provider="google")
    headers = {"Authorization": "Bearer k"}

    async def go() -> None:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake", headers=headers) as http:

            async def send(grant: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
                extra = {} if key is None else {"Idempotency-Key": key}
                params = {"fields": "include_headers"}
                return await http.post(
                    f"/v3/grants/{grant}/messages/send", json=body, headers=extra, params=params
                )

            first = (
                await send("ms", {"to": [{"email": "ann@example.com"}], "subject": "Hi", "body": "x"})
            ).json()
            old_id, thread = first["data"]["id"], first["data"]["thread_id"]
            message_id = next(h["value"] for h in first["data"]["headers"] if h["name"] == "Message-ID")
            new_id = fake.move_message("ms", old_id)
            assert new_id != old_id
            listed = (await http.get("/v3/grants/ms/messages", params={"thread_id": thread})).json()["data"]
            assert [m["id"] for m in listed] == [new_id]
            assert listed[0]["folders"] == ["Archive"]
            stored = (
                await http.get(f"/v3/grants/ms/messages/{new_id}", params={"fields": "include_headers"})
            ).json()["data"]
            assert {"name": "Message-ID", "value": message_id} in stored["headers"]
            nudge = {"to": [{"email": "ann@example.com"}], "subject": "Re: Hi", "body": "y"}
            stale = await send("ms", {**nudge, "reply_to_message_id": old_id}, key="k1")
            no_grant = await send("nobody", {**nudge, "reply_to_message_id": old_id})
            assert stale.status_code == no_grant.status_code == 404
            assert (
                stale.json()["error"]
                == no_grant.json()["error"]
                == {
                    "type": "not_found_error",
                    "message": "requested object not found",
                }
            )
            again = await send("ms", {**nudge, "reply_to_message_id": old_id}, key="k1")
            assert (again.status_code, again.headers.get("idempotent-response")) == (404, "true")
            assert len(fake.deliveries) == 1
            threaded = (await send("ms", {**nudge, "reply_to_message_id": new_id})).json()["data"]
            assert threaded["thread_id"] == thread
            gmail = (
                await send("gm", {"to": [{"email": "bo@example.com"}], "subject": "Hi", "body": "x"})
            ).json()
            assert fake.move_message("gm", gmail["data"]["id"]) == gmail["data"]["id"]
            fake.delete_message("gm", gmail["data"]["id"])
            gone = await send("gm", {**nudge, "reply_to_message_id": gmail["data"]["id"]})
            assert gone.status_code == 404
            assert len(fake.deliveries) == 3

    anyio.run(go)


# ---- replies' headers, listing order, transactional `from` ----


def header_of(headers: list[dict[str, str]], name: str) -> str | None:
    return next((h["value"] for h in headers if h["name"].lower() == name.lower()), None)


async def test_a_reply_names_the_originals_message_id_and_chain_not_its_provider_id(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """next-capabilities.md §1.2-1.3: Nylas reads the message `reply_to_message_id` names and writes
    In-Reply-To = its Message-ID, References = its References then its Message-ID, in the answer's
    headers, the stored message's and what the recipient gets (the delivery's)."""
    basic = {"fields": "include_basic_headers"}
    first = (await send(timed_client, params=basic)).json()["data"]
    first_mid = header_of(first["headers"], "Message-ID")
    assert first_mid is not None
    assert re.fullmatch(r"<[^<>@]+@[^<>@]+>", first_mid)
    assert header_of(first["headers"], "In-Reply-To") is None
    assert header_of(first["headers"], "References") is None
    clock.advance(60)
    second = (
        await send(
            timed_client, message(subject="Re: Spring offer", reply_to_message_id=first["id"]), params=basic
        )
    ).json()["data"]
    second_mid = header_of(second["headers"], "Message-ID")
    assert (header_of(second["headers"], "In-Reply-To"), header_of(second["headers"], "References")) == (
        first_mid,
        first_mid,
    )
    clock.advance(60)
    third = (
        await send(
            timed_client, message(subject="Re: Spring offer", reply_to_message_id=second["id"]), params=basic
        )
    ).json()["data"]
    assert header_of(third["headers"], "In-Reply-To") == second_mid
    assert header_of(third["headers"], "References") == f"{first_mid} {second_mid}"
    assert third["thread_id"] == second["thread_id"] == first["thread_id"]
    stored = (
        await timed_client.get(
            f"/v3/grants/{GRANT}/messages/{third['id']}", headers=AUTH, params={"fields": "include_headers"}
        )
    ).json()["data"]
    assert header_of(stored["headers"], "In-Reply-To") == second_mid
    assert header_of(stored["headers"], "References") == f"{first_mid} {second_mid}"
    delivered = timed_fake.deliveries[2].headers
    assert (header_of(list(delivered), "In-Reply-To"), header_of(list(delivered), "References")) == (
        second_mid,
        f"{first_mid} {second_mid}",
    )


async def test_an_imap_reply_and_a_recipients_answer_carry_the_chain(clock: FakeClock) -> None:
    """An IMAP grant's reply names the original by Message-ID and gets the same headers; a recipient's
    answer (`reply_share`) names the message it answers as a mail client does; a reply naming a
    Message-ID the fake does not hold (check_reply_to off) names it alone."""
    fake = FakeNylas(api_key=API_KEY, clock=clock)
    fake.add_grant("imap", "rep@mail.example", provider="imap")
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake.test") as http:
        basic = {"fields": "include_basic_headers"}
        first = (await send(http, grant="imap", params=basic)).json()["data"]
        first_mid = header_of(first["headers"], "Message-ID")
        fake.reply_share = 1.0
        second = (
            await send(http, message(reply_to_message_id=first_mid), grant="imap", params=basic)
        ).json()["data"]
        second_mid = header_of(second["headers"], "Message-ID")
        assert header_of(second["headers"], "In-Reply-To") == first_mid
        clock.advance(fake.reply_lag_s)
        listed = (
            await http.get(
                "/v3/grants/imap/messages",
                headers=AUTH,
                params={"thread_id": first["thread_id"], "fields": "include_headers"},
            )
        ).json()["data"]
        [answer] = [m for m in listed if m["id"] not in (first["id"], second["id"])]
        assert header_of(answer["headers"], "In-Reply-To") == second_mid
        assert header_of(answer["headers"], "References") == f"{first_mid} {second_mid}"
        fake.reply_share = 0.0
        fake.check_reply_to = False
        stranger = "<elsewhere-1@mail.example>"
        lone = (await send(http, message(reply_to_message_id=stranger), grant="imap", params=basic)).json()
        assert header_of(lone["data"]["headers"], "In-Reply-To") == stranger
        assert header_of(lone["data"]["headers"], "References") == stranger


async def test_a_listing_is_newest_first_by_date_not_by_arrival(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """Nylas lists "in reverse chronological order": a message synced late with an earlier date sits
    below one sent after it arrived; the thread's messages go oldest first by date."""
    sent = (await send(timed_client)).json()["data"]
    clock.advance(60)
    raw = b"From: Ann <ann@example.com>\r\nTo: alice@example.com\r\nSubject: Re: Spring offer\r\n\r\nYes"
    late = timed_fake.receive_message(GRANT, raw, received_at=START - timedelta(hours=1), reply_to=sent["id"])
    assert await list_ids(timed_client) == [sent["id"], late]
    thread = (await timed_client.get(f"/v3/grants/{GRANT}/threads/{sent['thread_id']}", headers=AUTH)).json()
    assert thread["data"]["message_ids"] == [late, sent["id"]]
    assert thread["data"]["latest_draft_or_message"]["id"] == sent["id"]


async def test_a_cursor_neither_repeats_nor_skips_a_message_dated_earlier_that_arrives_between_pages(
    timed_client: httpx.AsyncClient, timed_fake: FakeNylas, clock: FakeClock
) -> None:
    """Pages follow the date order: a report dated before the first page's last message, synced while
    the client pages, is on the second page; nothing is listed twice."""
    ids = await fill_mailbox(timed_client, clock)
    first = (await timed_client.get(f"/v3/grants/{GRANT}/messages", headers=AUTH, params={"limit": 3})).json()
    assert [m["id"] for m in first["data"]] == ids[:1:-1]
    raw = b"From: postmaster@example.net\r\nTo: alice@example.com\r\nSubject: Undeliverable\r\n\r\nx"
    report = timed_fake.receive_message(GRANT, raw, received_at=START + timedelta(seconds=90))
    params = {"limit": 3, "page_token": first["next_cursor"]}
    second = (await timed_client.get(f"/v3/grants/{GRANT}/messages", headers=AUTH, params=params)).json()
    assert [m["id"] for m in second["data"]] == [report, ids[1], ids[0]]
    assert "next_cursor" not in second
