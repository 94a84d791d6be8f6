"""A client nobody here wrote: Nylas's own Python SDK against the fake, and against our requests.

Our client and the fake were both written from reference/nylas-api.md, so a shared misreading would
pass both. The SDK (nylas 6.18) is Nylas's reading. Over a real loopback socket: it must parse every
answer the fake gives (sends, listings, folders, errors, replays), and for the same message our
client's request must equal the one the SDK builds from the SDK's own typed request, field by field
and part by part (the SDK's extra `attachments[].size` aside).
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
import pytest
from nylas import Client
from nylas.models.errors import NylasApiError

from campaign.manifest import SenderSettings
from campaign.models import Address, Attachment, Message, OutcomeKind, Tracking
from campaign.nylas import NylasClient, build_http_client, build_send_request, send_as
from campaign.testing import FakeClock, FakeNylas, Fault

KEY = "nyk_v0_sdk_contract_key_0123456789"
GRANT = "grant-sdk"
MAILBOX = "rep@example.com"
DOMAIN = "mail.example.com"


@dataclass(frozen=True)
class _Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class _Recorder:
    """Passes each request to the fake and keeps its method, path, headers and exact body bytes."""

    def __init__(self, fake: FakeNylas) -> None:
        self.fake = fake
        self.seen: list[_Seen] = []

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
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
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        query = scope.get("query_string", b"").decode()
        self.seen.append(_Seen(scope["method"], scope["path"], query, headers, body))
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.fake.app(scope, replay, send)


@pytest.fixture(name="wire")
def _wire(_loopback) -> Iterator[tuple[_Recorder, str]]:
    switch, url = _loopback
    fake = FakeNylas(api_key=KEY, clock=FakeClock())
    fake.add_grant(GRANT, MAILBOX)
    fake.add_domain(DOMAIN)
    recorder = _Recorder(fake)
    switch.target = recorder
    try:
        yield recorder, url
    finally:
        switch.target = None


def _sdk(url: str, *, api_key: str = KEY) -> Client:
    return Client(api_key=api_key, api_uri=url)


def _message(*, attachment: Attachment | None = None) -> Message:
    """A message with every field our client puts on the wire."""
    return Message(
        recipient_key="ann@example.net",
        row=1,
        sender="rep",
        to=(Address("ann@example.net", "Ann Lee"),),
        subject="Spring news for Ann",
        html='<p>Hello Ann</p><img src="cid:logo">',
        from_=Address(MAILBOX, "The Rep"),
        reply_to=(Address("support@example.com", "Support"),),
        headers=(
            ("X-Campaign", "spring"),
            ("List-Unsubscribe", "<https://example.com/u?t=abc>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ),
        metadata=(("key1", "spring"), ("key2", "ann@example.net"), ("campaign", "spring")),
        tracking=Tracking(opens=True, links=True, thread_replies=True, label="spring:ann"),
        attachments=() if attachment is None else (attachment,),
    )


def _sdk_request(message: Message) -> dict[str, Any]:
    """The same message as a developer writes it for the SDK (its typed SendMessageRequest)."""
    assert message.from_ is not None
    assert message.tracking is not None
    request: dict[str, Any] = {
        "to": [{"email": a.email, "name": a.name} for a in message.to],
        "from_": [{"email": message.from_.email, "name": message.from_.name}],
        "reply_to": [{"email": a.email, "name": a.name} for a in message.reply_to],
        "subject": message.subject,
        "body": message.html,
        "is_plaintext": False,
        "tracking_options": {
            "opens": message.tracking.opens,
            "links": message.tracking.links,
            "thread_replies": message.tracking.thread_replies,
            "label": message.tracking.label,
        },
        "custom_headers": [{"name": name, "value": value} for name, value in message.headers],
        "metadata": dict(message.metadata),
    }
    if message.attachments:
        request["attachments"] = [
            {
                "filename": a.filename,
                "content_type": a.content_type,
                "content": io.BytesIO(a.content),  # as the SDK's attach_file_request_builder gives it
                "size": len(a.content),
                **({"content_id": a.content_id, "is_inline": True} if a.content_id is not None else {}),
            }
            for a in message.attachments
        ]
    return request


def _send_ours(url: str, message: Message, key: str, *, sender: SenderSettings | None = None) -> Any:
    sender = sender or SenderSettings(name="rep", grant_id=GRANT, email=MAILBOX)

    async def go() -> Any:
        async with build_http_client(base_url=url, timeout_s=30) as http:
            client = NylasClient(http, api_key=KEY, clock=FakeClock())
            return await send_as(client, sender, build_send_request(message), idempotency_key=key)

    return anyio.run(go)


def _without_sizes(body: dict[str, Any]) -> dict[str, Any]:
    trimmed = dict(body)
    if "attachments" in trimmed:
        trimmed["attachments"] = [{k: v for k, v in a.items() if k != "size"} for a in trimmed["attachments"]]
    return trimmed


def _parts(seen: _Seen) -> list[tuple[str | None, str | None, str, bytes]]:
    """A multipart/form-data body as (field name, file name, content type, bytes), in order."""
    head = f"Content-Type: {seen.headers['content-type']}\r\n\r\n".encode()
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + seen.body)
    assert parsed.is_multipart()
    found = []
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_param("filename", header="content-disposition") or None
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((str(name), filename, part.get_content_type(), payload))
    return found


def test_the_sdk_sends_through_the_fake_and_reads_its_answer(wire):
    """SDK send with every field we use: parsed as a Message; the fake delivered it once, as sent."""
    recorder, url = wire
    message = _message()
    answer = _sdk(url).messages.send(
        GRANT, request_body=_sdk_request(message), overrides={"headers": {"Idempotency-Key": "k-1"}}
    )
    sent = answer.data
    assert sent.id
    assert sent.grant_id == GRANT
    assert sent.thread_id
    assert sent.subject == message.subject
    assert [(p["email"], p["name"]) for p in sent.to] == [("ann@example.net", "Ann Lee")]
    assert answer.request_id
    (delivery,) = recorder.fake.deliveries
    assert delivery.id == sent.id
    assert delivery.idempotency_key == "k-1"
    assert delivery.payload["metadata"]["key2"] == "ann@example.net"
    assert {h["name"] for h in delivery.payload["custom_headers"]} >= {"X-Campaign", "List-Unsubscribe"}


def test_our_json_request_equals_the_sdks_field_by_field(wire):
    """Same message, same key: our JSON body is the SDK's (its `size` per attachment aside)."""
    recorder, url = wire
    logo = Attachment("logo.png", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "logo")
    message = _message(attachment=logo)
    _sdk(url).messages.send(
        GRANT, request_body=_sdk_request(message), overrides={"headers": {"Idempotency-Key": "sdk-key"}}
    )
    # Another key: with attachments the SDK's body has `size` too, so under one key it would be
    # another payload (the fake, as Nylas, refuses a key reused for a different request).
    outcome = _send_ours(url, message, "our-key")
    assert outcome.kind == OutcomeKind.SENT
    theirs, ours = recorder.seen
    assert (
        (ours.method, ours.path)
        == (theirs.method, theirs.path)
        == ("POST", f"/v3/grants/{GRANT}/messages/send")
    )
    assert ours.headers["content-type"].startswith("application/json")
    assert theirs.headers["content-type"].startswith("application/json")
    assert (theirs.headers["idempotency-key"], ours.headers["idempotency-key"]) == ("sdk-key", "our-key")
    assert ours.headers["authorization"] == theirs.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(ours.body) == _without_sizes(json.loads(theirs.body))
    first, second = recorder.fake.deliveries
    assert _without_sizes(first.payload) == second.payload
    assert first.attachments == second.attachments


def test_our_multipart_request_has_the_sdks_layout_part_by_part(wire):
    """Above 3 MB both switch to multipart: a `message` JSON part, then one file part per attachment
    named by its content id (else file<N>), with its file name, type and bytes."""
    recorder, url = wire
    big = Attachment("report.pdf", "application/pdf", bytes(range(256)) * 14_000, None)  # 3.58 MB
    logo = Attachment("logo.png", "image/png", b"\x89PNG\r\n\x1a\n", "logo")
    message = _message(attachment=big)
    message = replace(message, attachments=(big, logo))
    _sdk(url).messages.send(
        GRANT, request_body=_sdk_request(message), overrides={"headers": {"Idempotency-Key": "mp-key"}}
    )
    outcome = _send_ours(url, message, "mp-key")
    assert outcome.kind == OutcomeKind.SENT
    assert outcome.replayed
    theirs, ours = recorder.seen
    assert ours.headers["content-type"].startswith("multipart/form-data")
    assert theirs.headers["content-type"].startswith("multipart/form-data")
    our_parts, their_parts = _parts(ours), _parts(theirs)
    assert [(name, filename, kind) for name, filename, kind, _ in our_parts] == [
        (name, filename, kind) for name, filename, kind, _ in their_parts
    ]
    assert [name for name, *_ in our_parts] == ["message", "file0", "logo"]
    assert [content for *_, content in our_parts[1:]] == [big.content, logo.content]
    assert [content for *_, content in their_parts[1:]] == [big.content, logo.content]
    assert json.loads(our_parts[0][3]) == json.loads(their_parts[0][3])
    (delivery,) = recorder.fake.deliveries
    assert delivery.multipart
    assert [a.filename for a in delivery.attachments] == ["report.pdf", "logo.png"]


def test_a_replay_through_the_sdks_overrides_returns_the_first_answer(wire):
    """The Idempotency-Key through `overrides`: the second call gets the first answer; one delivery."""
    recorder, url = wire
    sdk = _sdk(url)
    body = _sdk_request(_message())
    first = sdk.messages.send(GRANT, request_body=dict(body), overrides={"headers": {"Idempotency-Key": "r"}})
    second = sdk.messages.send(
        GRANT, request_body=dict(body), overrides={"headers": {"Idempotency-Key": "r"}}
    )
    assert second.data.id == first.data.id
    assert len(recorder.fake.deliveries) == 1
    assert [r.replayed for r in recorder.fake.requests] == [False, True]


def test_the_sdk_lists_by_metadata_with_paging_and_reads_the_folders(wire):
    """`metadata_pair` and `page_token`/`next_cursor` as the SDK speaks them; folders with attributes."""
    recorder, url = wire
    for n in range(3):
        message = _message()
        message = replace(message, metadata=(("key1", "spring"), ("key2", f"k{n}")))
        assert _send_ours(url, message, f"list-{n}").kind == OutcomeKind.SENT
    sdk = _sdk(url)
    wanted = {"metadata_pair": "key1:spring", "limit": 2}
    page = sdk.messages.list(GRANT, query_params=wanted)
    assert len(page.data) == 2
    assert page.next_cursor
    rest = sdk.messages.list(GRANT, query_params={**wanted, "page_token": page.next_cursor})
    ids = {m.id for m in page.data} | {m.id for m in rest.data}
    assert ids == {d.id for d in recorder.fake.deliveries}
    assert rest.next_cursor is None
    assert {m.metadata["key2"] for m in page.data + rest.data} == {"k0", "k1", "k2"}
    folders = sdk.folders.list(GRANT).data
    sent = [f for f in folders if "\\Sent" in (f.attributes or [])]
    assert len(sent) == 1
    assert sent[0].id == recorder.fake.sent_folder_id(GRANT)


def test_the_sdk_parses_the_fakes_errors(wire):
    """401 (a wrong key), 404 (an unknown grant) and 429 (a provider's throttle) as NylasApiError."""
    recorder, url = wire
    body = _sdk_request(_message())
    with pytest.raises(NylasApiError) as refused:
        _sdk(url, api_key="nyk_wrong").messages.send(GRANT, request_body=dict(body))
    assert refused.value.status_code == 401
    assert refused.value.type
    with pytest.raises(NylasApiError) as unknown:
        _sdk(url).messages.send("no-such-grant", request_body=dict(body))
    assert unknown.value.status_code == 404
    recorder.fake.script(Fault.PROVIDER_THROTTLE, grant_id=GRANT)
    with pytest.raises(NylasApiError) as throttled:
        _sdk(url).messages.send(GRANT, request_body=dict(body))
    assert throttled.value.status_code == 429
    assert throttled.value.type == "rate_limit_error"
    assert throttled.value.headers is not None
    assert throttled.value.headers.get("Retry-After")
    assert recorder.fake.deliveries == []


def test_a_transactional_send_equals_the_sdks(wire):
    """Through a verified domain (`/v3/domains/{domain}/messages/send`): the SDK reads our fake's answer,
    and our body is the SDK's, `from` a single object."""
    recorder, url = wire
    message = _message()
    request = _sdk_request(message)
    request["from_"] = {"email": f"news@{DOMAIN}", "name": "News"}
    answer = _sdk(url).transactional_send.send(
        DOMAIN, request_body=request, overrides={"headers": {"Idempotency-Key": "tx"}}
    )
    assert answer.data.id
    sender = SenderSettings(name="news", domain=DOMAIN, email=f"news@{DOMAIN}")
    message = replace(message, from_=Address(f"news@{DOMAIN}", "News"))
    outcome = _send_ours(url, message, "tx", sender=sender)
    assert outcome.kind == OutcomeKind.SENT
    assert outcome.message_id == answer.data.id
    theirs, ours = recorder.seen
    assert ours.path == theirs.path == f"/v3/domains/{DOMAIN}/messages/send"
    assert json.loads(ours.body) == json.loads(theirs.body)
    assert len(recorder.fake.deliveries) == 1
