"""A client nobody here wrote: Nylas's own Python SDK (nylas 6.18) against the fake, over loopback.

Our client and the fake were both written from `nylas-api.md`, so a misunderstanding they share
passes every other test. Here the official SDK (i) talks to the fake on a real socket, so the
fake must answer in a form the SDK parses (send, list, folders, transactional send, errors,
gzip), and (ii) sends the same message as our client, so that our request, captured at the
server, can be compared with the SDK's field by field (JSON) and part by part (multipart).

The SDK is synchronous (`requests`): it is called from the test's thread while uvicorn serves
the fake in its own (conftest's session-wide loopback server). Our client (async) runs in
`anyio.run`. Every request is captured raw by `_Tap`, an ASGI wrapper in front of the fake.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from conftest import API_KEY
from nylas import Client
from nylas.models.errors import NylasApiError

from campaign.models import Address, Attachment, Message, OutcomeKind, SendOutcome, Tracking
from campaign.nylas import MessagePage, NylasClient, build_http_client, build_send_request
from campaign.testing import FakeClock, FakeNylas, Fault

GRANT = "0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11"
MS_GRANT = "5d0f3c1e-7b2a-4e0c-9a4f-2f1e8d6c4b3a"
DOMAIN = "mail.acme.test"
MIB = 1024 * 1024
LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
TERMS = "Conditions générales — v2\n".encode() * 40


# ---- the wire: a fake on conftest's loopback server, every request captured raw ----


@dataclass(frozen=True)
class Seen:
    """One request as it reached the server: method, path, query, headers (lower-cased) and body."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class _Tap:
    """An ASGI app in front of the fake that keeps each request's bytes, then passes it on unchanged."""

    def __init__(self, fake: FakeNylas) -> None:
        self.fake = fake
        self.seen: list[Seen] = []

    async def app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.fake.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append(Seen(scope["method"], scope["path"], scope["query_string"].decode(), headers, body))
        given = False

        async def replay():
            nonlocal given
            if given:
                return await receive()
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.fake.app(scope, replay, send)


@dataclass
class Wire:
    fake: FakeNylas
    tap: _Tap
    url: str
    clock: FakeClock

    @property
    def sdk(self) -> Client:
        return Client(api_key=API_KEY, api_uri=self.url, timeout=10)

    def last(self) -> Seen:
        return self.tap.seen[-1]

    def ours(self, call):
        """Run `call(client)` with our NylasClient (aiohttp transport) against the loopback fake."""

        async def run():
            async with build_http_client(base_url=self.url, timeout_s=10) as http:
                return await call(NylasClient(http, api_key=API_KEY, clock=self.clock))

        return anyio.run(run)

    def send_ours(
        self, message: Message, *, key: str, grant: str = GRANT, domain: str | None = None
    ) -> SendOutcome:
        request = build_send_request(message)
        if domain is not None:
            return self.ours(lambda c: c.send_domain_message(domain, request, idempotency_key=key))
        return self.ours(lambda c: c.send_message(grant, request, idempotency_key=key))


@pytest.fixture(name="wire")
def _wire(_loopback) -> Iterator[Wire]:
    switch, url = _loopback
    clock = FakeClock()
    fake = FakeNylas(api_key=API_KEY, clock=clock)
    fake.add_grant(GRANT, "alice@acme.test", provider="google")
    fake.add_grant(MS_GRANT, "bob@acme.test", provider="microsoft")
    fake.add_domain(DOMAIN)
    tap = _Tap(fake)
    switch.target = tap
    try:
        yield Wire(fake, tap, url, clock)
    finally:
        switch.target = None


# ---- one message, as our client builds it and as an SDK user would write it ----


HEADERS = (
    ("List-Unsubscribe", "<https://u.acme.test/u/tok>, <mailto:u@acme.test?subject=unsubscribe>"),
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ("X-Campaign", "spring"),
)


def _message(
    *attachments: Attachment,
    html: str | None = '<p>Hi Ann</p><img src="cid:logo">',
    headers: tuple[tuple[str, str], ...] = HEADERS,
) -> Message:
    """A message with every field our payload builder (campaign.payload) writes."""
    return Message(
        recipient_key="ann@example.com",
        row=1,
        sender="alice",
        to=(Address("ann@example.com", "Ann Zoë"),),
        subject="Frühling: 20 % off",
        html=html,
        text=None if html is not None else "Hi Ann,\nplain text only.",
        from_=Address("alice@acme.test", "Alice at Acme"),
        reply_to=(Address("replies@acme.test", "Acme replies"),),
        headers=headers,
        metadata=(("key1", "spring"), ("key2", "ann@example.com")),
        tracking=Tracking(opens=True, links=True, thread_replies=False, label="spring"),
        attachments=attachments,
    )


def _sdk_body(message: Message) -> dict[str, Any]:
    """`message` as the SDK's `SendMessageRequest` (its TypedDicts); file contents as streams.

    The SDK itself then base64-encodes the streams (JSON) or sends them raw (multipart), renames
    `from_` to `from`, and adds nothing but the `size` of each attachment.
    """

    def people(addresses: tuple[Address, ...]) -> list[dict[str, str]]:
        return [{"email": a.email, "name": a.name} if a.name else {"email": a.email} for a in addresses]

    body: dict[str, Any] = {"to": people(message.to)}
    if message.reply_to:
        body["reply_to"] = people(message.reply_to)
    if message.from_ is not None:
        body["from_"] = people((message.from_,))
    body["subject"] = message.subject
    body["body"] = message.html if message.html is not None else message.text
    body["is_plaintext"] = message.html is None
    if message.tracking is not None:
        tracking = message.tracking
        body["tracking_options"] = {
            "opens": tracking.opens,
            "links": tracking.links,
            "thread_replies": tracking.thread_replies,
            "label": tracking.label,
        }
    body["custom_headers"] = [{"name": n, "value": v} for n, v in message.headers]
    body["metadata"] = dict(message.metadata)
    if message.attachments:
        body["attachments"] = []
        for item in message.attachments:
            attachment = {
                "filename": item.filename,
                "content_type": item.content_type,
                "content": io.BytesIO(item.content),
                "size": item.size,
            }
            if item.content_id is not None:
                attachment |= {"content_id": item.content_id, "is_inline": True}
            body["attachments"].append(attachment)
    return body


def _sdk_domain_body(message: Message) -> dict[str, Any]:
    """The SDK's `TransactionalSendMessageRequest`: the same, with `from_` one object (§6)."""
    body = _sdk_body(message)
    body["from_"] = body["from_"][0]
    return body


# ---- reading requests ----


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: no filename parameter (a plain form field)
    content_type: str | None
    content: bytes = field(repr=False)


_PARAM = re.compile(r';\s*(name|filename)="([^"]*)"')


def _parts(seen: Seen) -> list[Part]:
    """The parts of a multipart/form-data body, in order, read byte-exactly."""
    content_type = seen.headers["content-type"]
    assert content_type.startswith("multipart/form-data"), content_type
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    segments = seen.body.split(b"--" + boundary)
    assert segments[0] == b"", "no preamble"
    assert segments[-1] == b"--\r\n", "closing boundary, no epilogue"
    parts = []
    for segment in segments[1:-1]:
        assert segment.startswith(b"\r\n")
        assert segment.endswith(b"\r\n")
        head, content = segment[2:-2].split(b"\r\n\r\n", 1)
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        headers = {k.lower(): v for k, v in headers.items()}
        assert set(headers) <= {"content-disposition", "content-type"}, headers
        params = dict(_PARAM.findall(headers["content-disposition"]))
        assert headers["content-disposition"].startswith("form-data;")
        parts.append(Part(params["name"], params.get("filename"), headers.get("content-type"), content))
    return parts


def _assert_same_fields(ours: dict[str, Any], sdks: dict[str, Any]) -> None:
    """Equal JSON objects, compared field by field so that a failure names the field."""
    assert sorted(set(ours) - set(sdks)) == [], "fields only we send"
    assert sorted(set(sdks) - set(ours)) == [], "fields only the SDK sends"
    for name in ours:
        assert ours[name] == sdks[name], name


def _without_size(body: dict[str, Any]) -> dict[str, Any]:
    """The SDK's JSON body without `attachments[].size` (it uses the size to pick JSON or multipart)."""
    if "attachments" not in body:
        return body
    for item in body["attachments"]:
        assert item.pop("size") == len(base64.b64decode(item["content"]))
    return body


# ---- the SDK parses what the fake answers ----


def test_the_sdk_sends_every_field_and_parses_the_fakes_answer(wire):
    """A send with every field (cc and bcc too, which we never send) parses into the SDK's Message;
    the fake delivered exactly what the SDK sent."""
    body = _sdk_body(
        _message(
            Attachment("logo.png", "image/png", LOGO, content_id="logo"),
            Attachment("Conditions générales.txt", "text/plain", TERMS),
        )
    )
    body["cc"] = [{"email": "carl@example.com", "name": "Carl"}]
    body["bcc"] = [{"email": "audit@acme.test"}]
    response = wire.sdk.messages.send(GRANT, body)
    sent = response.data
    assert sent.id
    assert sent.thread_id
    assert sent.grant_id == GRANT
    assert sent.object == "message"
    assert response.request_id == response.headers["x-request-id"]
    assert sent.to == [{"email": "ann@example.com", "name": "Ann Zoë"}]
    assert sent.cc == [{"email": "carl@example.com", "name": "Carl"}]
    assert sent.bcc == [{"email": "audit@acme.test"}]
    assert sent.reply_to == [{"email": "replies@acme.test", "name": "Acme replies"}]
    assert sent.from_ == [{"email": "alice@acme.test", "name": "Alice at Acme"}]
    assert sent.subject == "Frühling: 20 % off"
    assert sent.metadata == {"key1": "spring", "key2": "ann@example.com"}
    assert (sent.tracking_options.opens, sent.tracking_options.links) == (True, True)
    assert sent.tracking_options.label == "spring"
    assert sent.date == int(wire.clock.now().timestamp())
    assert sent.folders == [wire.fake.sent_folder_id(GRANT)]
    logo, terms = sent.attachments
    assert (logo.filename, logo.content_id, logo.is_inline, logo.size) == (
        "logo.png",
        "logo",
        True,
        len(LOGO),
    )
    assert (terms.filename, terms.is_inline, terms.size) == ("Conditions générales.txt", False, len(TERMS))
    (delivery,) = wire.fake.deliveries
    assert delivery.id == sent.id
    assert not delivery.multipart
    assert [a.content for a in delivery.attachments] == [LOGO, TERMS]
    assert delivery.payload["custom_headers"] == [{"name": n, "value": v} for n, v in HEADERS]


def test_the_sdk_lists_by_metadata_pair_and_pages_with_next_cursor(wire):
    """metadata_pair finds one campaign's messages; page_token/next_cursor pages through them,
    and our client, asked the same, gets the same pages."""
    sdk = wire.sdk
    for n in range(5):
        body = {"to": [{"email": f"r{n}@example.com"}], "subject": f"S{n}", "body": "x"}
        body["metadata"] = {"key1": "spring" if n != 2 else "autumn", "key2": f"r{n}@example.com"}
        sdk.messages.send(GRANT, body)
    pages, token = [], None
    while True:
        query: dict[str, Any] = {"metadata_pair": "key1:spring", "limit": 3}
        if token is not None:
            query["page_token"] = token
        page = sdk.messages.list(GRANT, query_params=query)
        pages.append([m.to[0]["email"] for m in page.data])
        token = page.next_cursor
        if token is None:
            break
    assert pages == [["r4@example.com", "r3@example.com", "r1@example.com"], ["r0@example.com"]]
    assert "metadata_pair=key1%3Aspring" in wire.last().query  # as the SDK quotes it

    async def ours(client: NylasClient) -> list[list[str]]:
        found, cursor = [], None
        while True:
            result: MessagePage = await client.list_messages(
                GRANT, metadata_pair=("key1", "spring"), limit=3, page_token=cursor
            )
            found.append([m.to[0] for m in result.messages])
            cursor = result.next_cursor
            if cursor is None:
                return found

    assert wire.ours(ours) == pages
    # The SDK's list filters (`to` repeats its key) and the headers a send carried.
    only = sdk.messages.list(GRANT, query_params={"to": ["r2@example.com"], "fields": "include_headers"})
    (message,) = only.data
    assert message.metadata["key1"] == "autumn"
    assert {"name": "Subject", "value": "S2"} in [{"name": h.name, "value": h.value} for h in message.headers]


def test_the_sdk_lists_folders_and_finds_the_sent_folder(wire):
    """folders.list parses; the Sent folder is the one our client finds, by its \\Sent attribute.

    The SDK types `attributes` as a string (its docstring and Nylas's docs say an array, which
    the fake sends): dataclasses_json keeps the list's text, so test membership, as a user would.
    """
    wire.sdk.messages.send(GRANT, {"to": [{"email": "ann@example.com"}], "subject": "s", "body": "b"})
    for grant in (GRANT, MS_GRANT):
        folders = wire.sdk.folders.list(grant).data
        (sent,) = [f for f in folders if "\\Sent" in (f.attributes or "")]
        assert sent.id == wire.fake.sent_folder_id(grant)
        assert sent.grant_id == grant
        ours = wire.ours(lambda c, grant=grant: c.list_folders(grant))
        assert [f.id for f in ours] == [f.id for f in folders]
    listed = wire.sdk.messages.list(GRANT, query_params={"in": wire.fake.sent_folder_id(GRANT)}).data
    assert [m.subject for m in listed] == ["s"]


@pytest.mark.parametrize(
    ("setup", "grant", "status", "error_type", "message", "provider_code", "retry_after"),
    [
        pytest.param("bad-key", GRANT, 401, "unauthorized", "Unauthorized", None, None, id="401"),
        pytest.param(
            None, "no-such-grant", 404, "not_found_error", "requested object not found", None, None, id="404"
        ),
        pytest.param(
            Fault.NYLAS_RATE_LIMIT,
            GRANT,
            429,
            "nylas_rate_limit_exceeded",
            "Too many requests, please try again shortly.",
            None,
            None,
            id="429-nylas",
        ),
        pytest.param(
            Fault.QUOTA_EXCEEDED,
            GRANT,
            429,
            "quota_exceeded_error",
            "Activity limit reached",
            429,
            "2",
            id="429-gmail",
        ),
        pytest.param(
            Fault.PROVIDER_THROTTLE,
            MS_GRANT,
            429,
            "rate_limit_error",
            None,
            "ApplicationThrottled",
            "2",
            id="429-graph",
        ),
    ],
)
def test_the_sdk_parses_the_fakes_error_envelopes(
    wire, setup, grant, status, error_type, message, provider_code, retry_after
):
    """401, 404 and the 429 variants become NylasApiError with the envelope's type, request id and
    provider_error, and Retry-After readable from its headers; our client reads the same status and type."""
    sdk = Client(api_key="nyk_v0_wrong", api_uri=wire.url) if setup == "bad-key" else wire.sdk
    if isinstance(setup, Fault):
        wire.fake.script(setup, times=2)
    body = {"to": [{"email": "ann@example.com"}], "subject": "s", "body": "b"}
    with pytest.raises(NylasApiError) as raised:
        sdk.messages.send(grant, body)
    error = raised.value
    assert (error.status_code, error.type) == (status, error_type)
    assert error.request_id
    assert error.request_id == error.headers["x-request-id"]
    if message is not None:  # the Graph-style 429's own words are the fake's
        assert str(error) == message
    if provider_code is None:
        assert error.provider_error is None
    else:
        assert error.provider_error["error"]["code"] == provider_code
    assert error.headers.get("retry-after") == retry_after
    if setup == "bad-key":
        return  # our client sends with the right key; the 401 of a wrong one is tested in test_nylas.py
    plain = _message(html="<p>x</p>", headers=(("X-Campaign", "spring"),))  # Graph refuses the others
    outcome = wire.send_ours(plain, key="k-error", grant=grant)
    assert (outcome.status, outcome.error_type) == (status, error_type)
    assert wire.fake.deliveries == []


def test_the_sdk_reads_gzip_encoded_answers(wire):
    """With gzip_answers on, the fake compresses for clients that accept gzip, as the SDK (requests) does."""
    wire.fake.gzip_answers = True
    sent = wire.sdk.messages.send(GRANT, {"to": [{"email": "ann@example.com"}], "subject": "s", "body": "b"})
    assert wire.last().headers["accept-encoding"].startswith("gzip")
    assert sent.data.id == wire.fake.deliveries[0].id
    assert wire.sdk.folders.list(GRANT).data
    assert wire.fake.gzip_answered == 2


# ---- our requests equal the SDK's ----


@pytest.mark.parametrize("html", ['<p>Hi Ann</p><img src="cid:logo">', None], ids=["html", "plain-text"])
def test_our_json_request_equals_the_sdks_field_by_field(wire, html):
    """Under 3 MB both send one JSON body; parsed, the two are equal field by field, the SDK's
    `attachments[].size` excepted. Both are delivered (two keys), byte-identical files."""
    message = _message(
        Attachment("logo.png", "image/png", LOGO, content_id="logo"),
        Attachment("Conditions générales.txt", "text/plain", TERMS),
        html=html,
    )
    assert wire.send_ours(message, key="ours-1").kind is OutcomeKind.SENT
    ours = wire.last()
    wire.sdk.messages.send(GRANT, _sdk_body(message), overrides={"headers": {"Idempotency-Key": "sdk-1"}})
    sdks = wire.last()
    for seen in (ours, sdks):
        assert (seen.method, seen.path) == ("POST", f"/v3/grants/{GRANT}/messages/send")
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    assert (ours.headers["idempotency-key"], sdks.headers["idempotency-key"]) == ("ours-1", "sdk-1")
    _assert_same_fields(json.loads(ours.body), _without_size(json.loads(sdks.body)))
    first, second = wire.fake.deliveries
    assert [a.content for a in first.attachments] == [a.content for a in second.attachments] == [LOGO, TERMS]


def test_our_multipart_request_has_the_sdks_part_layout(wire):
    """From 3 MiB of files both send multipart/form-data: the same parts in the same order (names:
    the content id, else file<index>; filenames; content types; raw bytes) and the same `message`
    JSON. One difference, allowed by nylas-api.md §2: the SDK's `message` part is a file part with
    filename="", ours a plain field (as Nylas's Node, Java and Ruby SDKs and its curl example send it)."""
    big = bytes(range(256)) * (3 * MIB // 256)
    message = _message(
        Attachment("report 2026.pdf", "application/pdf", big),
        Attachment("logo.png", "image/png", LOGO, content_id="logo"),
        Attachment("Conditions générales.txt", "text/plain", TERMS),
    )
    assert build_send_request(message).multipart
    assert wire.send_ours(message, key="ours-1").kind is OutcomeKind.SENT
    ours = _parts(wire.last())
    wire.sdk.messages.send(GRANT, _sdk_body(message), overrides={"headers": {"Idempotency-Key": "sdk-1"}})
    sdks = _parts(wire.last())
    assert [p.name for p in ours] == [p.name for p in sdks] == ["message", "file0", "logo", "file2"]
    assert (ours[0].filename, sdks[0].filename) == (None, "")
    assert ours[0].content_type == sdks[0].content_type == "application/json"
    _assert_same_fields(json.loads(ours[0].content), json.loads(sdks[0].content))
    assert "attachments" not in json.loads(ours[0].content)
    assert ours[1:] == sdks[1:]
    assert [(p.filename, p.content_type) for p in ours[1:]] == [
        ("report 2026.pdf", "application/pdf"),
        ("logo.png", "image/png"),
        ("Conditions générales.txt", "text/plain"),
    ]
    first, second = wire.fake.deliveries
    assert first.multipart
    assert second.multipart
    assert first.payload == second.payload
    assert first.attachments == second.attachments


def test_between_2_25_and_3_mib_the_sdk_sends_json_over_the_limit_and_we_do_not(wire):
    """The SDK picks multipart by the files' raw size (>= 3 MiB); base64 makes 2.5 MB of files a
    3.3 MB JSON body, over Nylas's 3 MB limit for a whole JSON request (§2). We pick by the encoded
    size, so the same message goes as multipart. Counted at the fake: ours delivered, the SDK's refused."""
    message = _message(Attachment("slides.pdf", "application/pdf", b"%PDF" * 625_000))
    assert wire.send_ours(message, key="ours-1").kind is OutcomeKind.SENT
    assert wire.last().headers["content-type"].startswith("multipart/form-data")
    with pytest.raises(NylasApiError) as refused:
        wire.sdk.messages.send(GRANT, _sdk_body(message))
    assert wire.last().headers["content-type"] == "application/json"
    assert len(wire.last().body) > 3_000_000
    assert refused.value.status_code == 413  # the fake's choice; v3's answer is undocumented (§12.1)
    assert len(wire.fake.deliveries) == 1


@pytest.mark.parametrize("files", ["none", "multipart"])
def test_the_sdk_resending_our_request_under_our_key_is_a_replay(wire, files):
    """Same key, same message: the fake takes the SDK's request for a retry of ours (same parsed
    payload, same parts) and replays our answer: one delivery, and the SDK sees our message id."""
    attachments = (
        () if files == "none" else (Attachment("big.bin", "application/octet-stream", b"\0" * 3 * MIB),)
    )
    message = _message(*attachments)
    outcome = wire.send_ours(message, key="campaign:spring:ann")
    assert outcome.kind is OutcomeKind.SENT
    assert not outcome.replayed
    again = wire.sdk.messages.send(
        GRANT, _sdk_body(message), overrides={"headers": {"Idempotency-Key": "campaign:spring:ann"}}
    )
    assert again.headers["idempotent-response"] == "true"
    assert again.data.id == outcome.message_id
    assert again.request_id == outcome.request_id
    assert len(wire.fake.deliveries) == 1
    assert [(r.status, r.replayed) for r in wire.fake.requests] == [(200, False), (200, True)]


def test_idempotency_key_through_the_sdks_overrides(wire):
    """overrides={"headers": {"Idempotency-Key": k}}: the second call gets the first answer again
    (Idempotent-Response: true), the fake delivers once; another payload under the key is 409, a
    key over 256 characters 400."""
    sdk = wire.sdk

    def body(subject: str = "s") -> dict[str, Any]:
        return {"to": [{"email": "ann@example.com", "name": "Ann"}], "subject": subject, "body": "b"}

    first = sdk.messages.send(GRANT, body(), overrides={"headers": {"Idempotency-Key": "k-1"}})
    second = sdk.messages.send(GRANT, body(), overrides={"headers": {"Idempotency-Key": "k-1"}})
    assert "idempotent-response" not in first.headers
    assert second.headers["idempotent-response"] == "true"
    assert second.data == first.data
    assert second.request_id == first.request_id
    assert len(wire.fake.deliveries) == 1
    assert wire.fake.deliveries[0].idempotency_key == "k-1"
    with pytest.raises(NylasApiError) as conflict:
        sdk.messages.send(GRANT, body("other"), overrides={"headers": {"Idempotency-Key": "k-1"}})
    assert (conflict.value.status_code, conflict.value.type) == (409, "api.invalid_idempotent_request")
    with pytest.raises(NylasApiError) as too_long:
        sdk.messages.send(GRANT, body(), overrides={"headers": {"Idempotency-Key": "k" * 257}})
    assert (too_long.value.status_code, too_long.value.type) == (400, "api.invalid_idempotency_key")
    assert len(wire.fake.deliveries) == 1
    assert [(r.status, r.replayed) for r in wire.fake.requests] == [
        (200, False),
        (200, True),
        (409, False),
        (400, False),
    ]


def test_transactional_send_through_the_sdk_equals_ours(wire):
    """nylas 6.18 has `transactional_send.send(domain, ...)`: `from` one object (§6). The fake's
    answer parses (the message id under `data.id`, as the OpenAPI spec and this SDK say), and our
    domain send's body equals the SDK's field by field."""
    message = _message(Attachment("logo.png", "image/png", LOGO, content_id="logo"))
    outcome = wire.send_ours(message, key="ours-1", domain=DOMAIN)
    assert outcome.kind is OutcomeKind.SENT
    ours = wire.last()
    sent = wire.sdk.transactional_send.send(
        DOMAIN, _sdk_domain_body(message), overrides={"headers": {"Idempotency-Key": "sdk-1"}}
    )
    sdks = wire.last()
    assert ours.path == sdks.path == f"/v3/domains/{DOMAIN}/messages/send"
    assert json.loads(sdks.body)["from"] == {"email": "alice@acme.test", "name": "Alice at Acme"}
    _assert_same_fields(json.loads(ours.body), _without_size(json.loads(sdks.body)))
    assert sent.data.id == wire.fake.deliveries[1].id
    assert sent.data.subject == message.subject
    assert [d.grant_id for d in wire.fake.deliveries] == [f"domain:{DOMAIN}"] * 2
    # The Node SDK's {messageId} shape: this SDK finds no id in it (ours reads either; see
    # test_provider_realism.py), which is why the fake can answer both ways.
    wire.fake.domain_answer_id = "messageId"
    node_style = wire.sdk.transactional_send.send(DOMAIN, _sdk_domain_body(message))
    assert node_style.data.id is None
    assert len(wire.fake.deliveries) == 3


def test_the_sdk_reads_the_fakes_scheduled_sends(wire):
    """We never send `send_at`, but the fake serves scheduled sends (§8): the SDK parses the 202
    answer, the schedule list, one schedule, a cancellation, and a 404 for an unknown schedule."""
    sdk = wire.sdk
    at = int(wire.clock.now().timestamp()) + 3600
    body = {"to": [{"email": "ann@example.com"}], "subject": "later", "body": "b", "send_at": at}
    scheduled = sdk.messages.send(GRANT, body).data
    assert scheduled.schedule_id
    assert scheduled.send_at == at
    (listed,) = sdk.messages.list_scheduled_messages(GRANT).data
    assert (listed.schedule_id, listed.status.code) == (scheduled.schedule_id, "pending")
    stopped = sdk.messages.stop_scheduled_message(GRANT, scheduled.schedule_id).data
    assert stopped.message == "requested cancelation for workflow"
    assert sdk.messages.find_scheduled_message(GRANT, scheduled.schedule_id).data.status.code == "cancelled"
    with pytest.raises(NylasApiError) as unknown:
        sdk.messages.find_scheduled_message(GRANT, "no-such-schedule")
    assert (unknown.value.status_code, unknown.value.type) == (404, "not_found_error")
    assert wire.fake.deliveries == []


def test_the_sdk_replies_in_a_thread_and_finds_the_answer_as_our_lookups_do(wire):
    """A reply sent with `reply_to_message_id` joins the thread (the SDK's send and threads.find say so);
    an answer placed in it is what the SDK lists by `thread_id` and by `from` and what our client
    lists the same way, with the headers `fields=include_headers` gives both."""
    from campaign.testing.answers import build_answer

    sdk = wire.sdk
    first = sdk.messages.send(
        GRANT, {"to": [{"email": "ann@example.com"}], "subject": "Renewal", "body": "x"}
    )
    nudge = sdk.messages.send(
        GRANT,
        {
            "to": [{"email": "ann@example.com"}],
            "subject": "Re: Renewal",
            "body": "y",
            "reply_to_message_id": first.data.id,
        },
    ).data
    assert nudge.thread_id == first.data.thread_id
    wire.clock.advance(60)
    raw = build_answer(
        "ann@example.com", mailbox="alice@acme.test", subject="Re: Renewal", at=wire.clock.now(), auto=True
    )
    answer_id = wire.fake.receive_message(GRANT, raw, reply_to=nudge.id)
    thread = sdk.threads.find(GRANT, nudge.thread_id).data
    assert set(thread.message_ids) == {first.data.id, nudge.id, answer_id}
    since = int(wire.clock.now().timestamp()) - 30
    by_thread = sdk.messages.list(GRANT, query_params={"thread_id": nudge.thread_id, "received_after": since})
    assert [m.id for m in by_thread.data] == [answer_id]
    by_sender = sdk.messages.list(GRANT, query_params={"from": ["ann@example.com"]})
    assert [m.id for m in by_sender.data] == [answer_id]
    found = sdk.messages.find(GRANT, answer_id, query_params={"fields": "include_headers"}).data
    sdk_headers = {h.name.lower(): h.value for h in found.headers}
    assert sdk_headers["auto-submitted"] == "auto-replied"

    async def ours(client: NylasClient) -> tuple[list[str], list[str], dict[str, str]]:
        thread_page = await client.list_messages(GRANT, thread_id=nudge.thread_id, received_after=since)
        sender_page = await client.list_messages(GRANT, from_="ann@example.com")
        headers = await client.fetch_headers(GRANT, answer_id)
        return (
            [m.id for m in thread_page.messages],
            [m.id for m in sender_page.messages],
            {name.lower(): value for name, value in headers},
        )

    thread_ids, sender_ids, headers = wire.ours(ours)
    assert thread_ids == sender_ids == [answer_id]
    assert headers == sdk_headers


def test_the_sdk_meets_a_filed_microsoft_message_as_a_404_it_cannot_tell_from_a_missing_grant(wire):
    """Nylas's SDK sends a reply to a message its Microsoft owner filed since (a new Graph id): the fake's
    404 parses as the SDK's NylasApiError, of the same type and message as for a grant that does not
    exist; listing the thread finds the message under its new id, and the reply to that goes out."""
    sdk = wire.sdk
    first = sdk.messages.send(
        MS_GRANT, {"to": [{"email": "ann@example.com"}], "subject": "Hi", "body": "x"}
    ).data
    moved = wire.fake.move_message(MS_GRANT, first.id)
    nudge = {"to": [{"email": "ann@example.com"}], "subject": "Re: Hi", "body": "y"}
    with pytest.raises(NylasApiError) as stale:
        sdk.messages.send(MS_GRANT, {**nudge, "reply_to_message_id": first.id})
    with pytest.raises(NylasApiError) as no_grant:
        sdk.messages.send("no-such-grant", {**nudge, "reply_to_message_id": first.id})
    seen = [(e.value.status_code, e.value.type, str(e.value)) for e in (stale, no_grant)]
    assert seen[0] == seen[1] == (404, "not_found_error", "requested object not found")
    listed = sdk.messages.list(MS_GRANT, query_params={"thread_id": first.thread_id}).data
    assert [m.id for m in listed] == [moved]
    reply = sdk.messages.send(MS_GRANT, {**nudge, "reply_to_message_id": moved}).data
    assert reply.thread_id == first.thread_id
    assert len(wire.fake.deliveries) == 2
