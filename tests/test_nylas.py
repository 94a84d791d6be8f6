"""The Nylas wire adapter against hand-written responses from reference/nylas-api.md (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import httpx
import pytest

from campaign import __version__
from campaign.errors import ApiAuthError, ApiError, ApiNotFoundError, ApiUnavailableError, ManifestError
from campaign.models import Address, Attachment, Message, OutcomeKind, SendOutcome, ThrottleKind, Tracking
from campaign.nylas import (
    DEFAULT_API_URI,
    Folder,
    NylasClient,
    SendClient,
    build_http_client,
    build_send_payload,
    encode_send_body,
)

API_KEY = "nyk_v0_Sup3rSecretTestKey_0123456789abcdef"
GRANT = "e19f8e1a-eb1c-41c0-b6a6-d2e59daf7f47"
IDEM_KEY = "spring:ann@example.com:1"
REQUEST_ID = "5fa64c92-e840-4357-86b9-2aa364d35b88"
NOW = datetime(2026, 1, 8, 9, 0, 0, tzinfo=UTC)

Handler = Callable[[httpx.Request], httpx.Response]


class FixedClock:
    """A clock stopped at NOW; the adapter must never sleep."""

    def monotonic(self) -> float:
        """Always zero."""
        return 0.0

    def now(self) -> datetime:
        """Always NOW."""
        return NOW

    async def sleep(self, seconds: float) -> None:
        """Fail: the wire adapter has no reason to wait."""
        raise AssertionError(f"unexpected sleep({seconds})")


FULL_MESSAGE = Message(
    recipient_key="ann@example.com",
    row=3,
    sender="alice",
    to=(Address("ann@example.com", "Ann Zoë"),),
    subject="Spring offer for Ann",
    html='<p>Hi Ann — café?</p><img src="cid:logo1">',
    text="Hi Ann — café?",
    from_=Address("sales@acme.test", "Acme Sales"),
    reply_to=(Address("support@acme.test"), Address("help@acme.test", "Help Desk")),
    headers=(
        ("X-Campaign", "spring"),
        ("List-Unsubscribe", "<https://acme.test/u?t=abc>, <mailto:unsub@acme.test?subject=unsubscribe-abc>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ),
    metadata=(("key1", "spring"), ("key2", "ann@example.com"), ("campaign", "spring")),
    tracking=Tracking(opens=True, links=True, thread_replies=False, label="spring"),
    attachments=(
        Attachment("logo.png", "image/png", b"\x89PNG\r\n", content_id="logo1"),
        Attachment("terms.txt", "text/plain", b"terms"),
    ),
)

FULL_PAYLOAD: dict[str, Any] = {
    "to": [{"email": "ann@example.com", "name": "Ann Zoë"}],
    "reply_to": [{"email": "support@acme.test"}, {"email": "help@acme.test", "name": "Help Desk"}],
    "from": [{"email": "sales@acme.test", "name": "Acme Sales"}],
    "subject": "Spring offer for Ann",
    "body": '<p>Hi Ann — café?</p><img src="cid:logo1">',
    "is_plaintext": False,
    "tracking_options": {"opens": True, "links": True, "thread_replies": False, "label": "spring"},
    "custom_headers": [
        {"name": "X-Campaign", "value": "spring"},
        {
            "name": "List-Unsubscribe",
            "value": "<https://acme.test/u?t=abc>, <mailto:unsub@acme.test?subject=unsubscribe-abc>",
        },
        {"name": "List-Unsubscribe-Post", "value": "List-Unsubscribe=One-Click"},
    ],
    "metadata": {"key1": "spring", "key2": "ann@example.com", "campaign": "spring"},
    "attachments": [
        {
            "filename": "logo.png",
            "content_type": "image/png",
            "content": "iVBORw0K",
            "content_id": "logo1",
            "is_inline": True,
        },
        {"filename": "terms.txt", "content_type": "text/plain", "content": "dGVybXM="},
    ],
}

SMALL_PAYLOAD: dict[str, Any] = {"to": [{"email": "ann@example.com"}], "subject": "Hi", "body": "<p>Hi</p>"}

# reference §1.3: the success envelope.
SENT_BODY: dict[str, Any] = {
    "request_id": REQUEST_ID,
    "grant_id": GRANT,
    "data": {
        "id": "5d3qmne77v32r8l4phyuksl2x",
        "grant_id": GRANT,
        "object": "message",
        "thread_id": "t-1",
        "subject": "Hi",
        "to": [{"email": "ann@example.com"}],
        "date": 1735689600,
        "folders": ["SENT"],
        "schedule_id": "",
    },
}

# reference §3.3, FORUM-429, verbatim.
FORUM_429 = (
    '{"error": {"message": "Activity limit reached", "provider_error": {"error": {"code": 429, "message": '
    '"User-rate limit exceeded. Retry after 2026-01-08T09:26:53.594Z (Mail sending)"}}, '
    '"type": "quota_exceeded_error"}, "request_id": "..."}'
)

# reference §3.4 / §11.2: Microsoft Graph's MailboxConcurrency throttle as Nylas passes it on.
MICROSOFT_429: dict[str, Any] = {
    "request_id": REQUEST_ID,
    "error": {
        "type": "rate_limit_error",
        "message": "Too many requests, please try again shortly.",
        "provider_error": {
            "error": {
                "code": "ApplicationThrottled",
                "message": "Application is over its MailboxConcurrency limit.",
            }
        },
    },
}

GATEWAY_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    "</center>\r\n</body>\r\n</html>\r\n"
)


def error_body(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    """The §3.1 error envelope."""
    return {"request_id": REQUEST_ID, "error": {"type": error_type, "message": message, **extra}}


def respond(
    status: int, body: Any = None, *, headers: dict[str, str] | None = None, text: str | None = None
) -> Handler:
    """A handler that answers every request with the same response."""

    def handler(_request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, content=text.encode("utf-8"), headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raising(exc: Exception) -> Handler:
    """A handler that fails the way the network can."""

    def handler(_request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


async def send_with(
    handler: Handler,
    payload: dict[str, Any] | None = None,
    *,
    grant_id: str = GRANT,
    idempotency_key: str = IDEM_KEY,
) -> SendOutcome:
    """Send `payload` through a NylasClient whose transport is `handler`."""
    transport = httpx.MockTransport(handler)
    async with build_http_client(base_url=DEFAULT_API_URI, timeout_s=5, transport=transport) as http:
        client: SendClient = NylasClient(http, api_key=API_KEY, clock=FixedClock())
        return await client.send_message(
            grant_id, SMALL_PAYLOAD if payload is None else payload, idempotency_key=idempotency_key
        )


def recording(seen: list[httpx.Request], reply: Handler) -> Handler:
    """Wrap `reply`, keeping every request it receives."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return reply(request)

    return handler


def texts_of(outcome: SendOutcome) -> str:
    """Every piece of text in an outcome, joined."""
    parts = (outcome.message_id, outcome.request_id, outcome.error_type, outcome.error_message)
    return " ".join(part for part in parts if part is not None)


# ---------------------------------------------------------------------------------------------- payload


def test_full_message_payload_matches_the_reference_exactly() -> None:
    """Every §1.2 field is built, with names, lists of {name, value}, base64 and inline flags."""
    payload = build_send_payload(FULL_MESSAGE)
    assert payload == FULL_PAYLOAD
    assert list(payload) == list(FULL_PAYLOAD)


def test_minimal_text_message_omits_optional_fields() -> None:
    """A text-only message without extras sends only to, subject, body and is_plaintext=true."""
    message = Message("bob@example.com", 1, "alice", (Address("bob@example.com"),), "Hi", text="Hello Bob")
    assert build_send_payload(message) == {
        "to": [{"email": "bob@example.com"}],
        "subject": "Hi",
        "body": "Hello Bob",
        "is_plaintext": True,
    }


def test_tracking_without_label_has_no_label_key() -> None:
    """tracking_options.label appears only when set."""
    message = Message(
        "b", 1, "s", (Address("b@example.com"),), "Hi", html="<p>x</p>", tracking=Tracking(opens=True)
    )
    assert build_send_payload(message)["tracking_options"] == {
        "opens": True,
        "links": False,
        "thread_replies": False,
    }


def test_equal_messages_encode_to_identical_bytes() -> None:
    """Two separately built equal messages give byte-identical bodies (a resend must match its key)."""
    again = Message(**FULL_MESSAGE._asdict())
    assert again is not FULL_MESSAGE
    assert encode_send_body(build_send_payload(again)) == encode_send_body(build_send_payload(FULL_MESSAGE))


def test_encoding_is_compact_raw_utf8_json_whichever_backend() -> None:
    """The body is compact JSON with raw UTF-8, byte-equal to json.dumps' compact form."""
    body = encode_send_body(FULL_PAYLOAD)
    expected = json.dumps(FULL_PAYLOAD, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert body == expected
    assert "Ann Zoë".encode() in body
    assert b'", "' not in body
    assert encode_send_body(MappingProxyType(FULL_PAYLOAD)) == body


# ---------------------------------------------------------------------------------------------- request


@pytest.mark.anyio
async def test_send_puts_the_exact_request_on_the_wire() -> None:
    """POST to the grant's send path (asking for the sent message's basic headers: its Message-ID) with
    bearer auth, JSON headers, Idempotency-Key, UA and the payload."""
    seen: list[httpx.Request] = []
    payload = build_send_payload(FULL_MESSAGE)
    await send_with(recording(seen, respond(200, SENT_BODY)), payload)
    (request,) = seen
    assert request.method == "POST"
    assert request.url.raw_path == f"/v3/grants/{GRANT}/messages/send?fields=include_basic_headers".encode()
    assert str(request.url).startswith(DEFAULT_API_URI + "/v3/")
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Idempotency-Key"] == IDEM_KEY
    assert request.headers["User-Agent"] == f"campaign/{__version__}"
    assert request.content == encode_send_body(payload)
    assert json.loads(request.content) == FULL_PAYLOAD


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("grant_id", "raw_path"),
    [
        ("email:ann@example.com", b"/v3/grants/email:ann@example.com/messages/send"),
        ("a/b c?#", b"/v3/grants/a%2Fb%20c%3F%23/messages/send"),
    ],
)
async def test_grant_id_is_quoted_as_one_path_segment(grant_id: str, raw_path: bytes) -> None:
    """A grant id with '/', space, '?' or '#' cannot escape its path segment."""
    seen: list[httpx.Request] = []
    await send_with(recording(seen, respond(200, SENT_BODY)), grant_id=grant_id)
    assert seen[0].url.raw_path == raw_path + b"?fields=include_basic_headers"


@pytest.mark.anyio
@pytest.mark.parametrize("bad_key", ["k" * 257, "", "two words", "line\nbreak", "clé"])
async def test_bad_idempotency_key_is_a_programming_error(bad_key: str) -> None:
    """A key Nylas would refuse (>256) or HTTP cannot carry raises ValueError before any request."""
    seen: list[httpx.Request] = []
    with pytest.raises(ValueError, match="Idempotency-Key"):
        await send_with(recording(seen, respond(200, SENT_BODY)), idempotency_key=bad_key)
    assert seen == []


@pytest.mark.anyio
async def test_idempotency_key_of_256_characters_is_sent() -> None:
    """256 characters is the documented maximum and goes through unchanged."""
    seen: list[httpx.Request] = []
    outcome = await send_with(recording(seen, respond(200, SENT_BODY)), idempotency_key="k" * 256)
    assert outcome.kind is OutcomeKind.SENT
    assert seen[0].headers["Idempotency-Key"] == "k" * 256


@pytest.mark.anyio
@pytest.mark.parametrize("bad", ["", "   ", "nyk_v0 abc", "nyk_v0\x00abc", "nyk_v0_clé"])
async def test_api_key_that_http_cannot_carry_is_refused(bad: str) -> None:
    """An empty or space/control/non-ASCII key is a configuration error whose message omits the key."""
    async with httpx.AsyncClient() as http:
        with pytest.raises(ManifestError, match=r"api\.key_env") as info:
            NylasClient(http, api_key=bad, clock=FixedClock())
    assert "nyk_v0" not in str(info.value)


@pytest.mark.anyio
async def test_api_key_surrounding_whitespace_is_stripped() -> None:
    """A key read from a file with a trailing newline still authenticates."""
    seen: list[httpx.Request] = []
    async with build_http_client(
        base_url=DEFAULT_API_URI,
        timeout_s=5,
        transport=httpx.MockTransport(recording(seen, respond(200, SENT_BODY))),
    ) as http:
        client = NylasClient(http, api_key=f" {API_KEY}\n", clock=FixedClock())
        await client.send_message(GRANT, SMALL_PAYLOAD, idempotency_key=IDEM_KEY)
    assert seen[0].headers["Authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize("uri", ["api.us.nylas.com", "ftp://api.us.nylas.com", "https://"])
def test_build_http_client_refuses_a_uri_that_is_not_http(uri: str) -> None:
    """A mistyped api.uri stops before the first send instead of turning every send ambiguous."""
    with pytest.raises(ManifestError, match=r"api\.uri"):
        build_http_client(base_url=uri, timeout_s=90)


def test_build_http_client_applies_the_timeout_and_refuses_nonsense() -> None:
    """The one timeout covers connect, read, write and pool; zero is refused."""
    client = build_http_client(base_url=DEFAULT_API_URI, timeout_s=90)
    assert client.timeout == httpx.Timeout(90)
    assert client.base_url == httpx.URL(DEFAULT_API_URI)
    with pytest.raises(ManifestError, match="timeout_s"):
        build_http_client(base_url=DEFAULT_API_URI, timeout_s=0)


# ---------------------------------------------------------------------------------------------- success


@pytest.mark.anyio
async def test_200_is_sent_with_message_id_and_request_id() -> None:
    """A 2xx carries data.id, data.thread_id and the body's request_id; a first answer is not a replay."""
    outcome = await send_with(respond(200, SENT_BODY, headers={"x-request-id": "from-header"}))
    assert outcome == SendOutcome(
        OutcomeKind.SENT,
        status=200,
        message_id="5d3qmne77v32r8l4phyuksl2x",
        thread_id="t-1",
        request_id=REQUEST_ID,
    )


@pytest.mark.anyio
async def test_request_id_falls_back_to_the_header() -> None:
    """Without request_id in the body, x-request-id is used."""
    body = {"data": SENT_BODY["data"]}
    outcome = await send_with(respond(202, body, headers={"x-request-id": "hdr-1"}))
    assert (outcome.kind, outcome.status, outcome.request_id) == (OutcomeKind.SENT, 202, "hdr-1")


@pytest.mark.anyio
async def test_idempotent_replay_is_flagged() -> None:
    """`Idempotent-Response: true` marks a replayed answer, for successes and errors alike."""
    sent = await send_with(respond(200, SENT_BODY, headers={"Idempotent-Response": "true"}))
    failed = await send_with(
        respond(504, error_body("provider_error", "x"), headers={"Idempotent-Response": "TRUE"})
    )
    assert sent.kind is OutcomeKind.SENT
    assert sent.replayed
    assert failed.kind is OutcomeKind.AMBIGUOUS
    assert failed.replayed


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply", [respond(200, {"request_id": "r", "data": {}}), respond(200, text="<html>OK</html>")]
)
async def test_2xx_without_a_message_id_is_ambiguous(reply: Handler) -> None:
    """A 2xx we cannot read is not proof of sending; a same-key retry settles it."""
    outcome = await send_with(reply)
    assert outcome.kind is OutcomeKind.AMBIGUOUS
    assert outcome.error_type == "bad_response"


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error_type", "message", "kind"),
    [
        (400, "invalid_request_error", "error parsing request body", OutcomeKind.REJECTED),
        (
            400,
            "api.invalid_idempotency_key",
            "Idempotency-Key must be 256 characters or fewer.",
            OutcomeKind.REJECTED,
        ),
        (401, "unauthorized", "Unauthorized", OutcomeKind.AUTH_REFUSED),
        (402, "api.provider_error", "Sending to at least one recipient failed.", OutcomeKind.REJECTED),
        (
            403,
            "insufficient_scopes",
            "missing provider scopes required to send email",
            OutcomeKind.AUTH_REFUSED,
        ),
        (404, "not_found_error", "requested object not found", OutcomeKind.AUTH_REFUSED),
        (
            400,
            "invalid_request_error",
            "Tracking options are not allowed for trial accounts",
            OutcomeKind.AUTH_REFUSED,
        ),
        (413, "invalid_request_error", "request too large", OutcomeKind.REJECTED),
        (422, "api.provider_error", "Mail provider error", OutcomeKind.REJECTED),
        (423, "api.resource_blocked", "resource blocked", OutcomeKind.REJECTED),
        (
            409,
            "api.concurrent_idempotent_request",
            "A request with the same Idempotency-Key is currently in progress.",
            OutcomeKind.IN_PROGRESS,
        ),
        (
            409,
            "api.invalid_idempotent_request",
            "The Idempotency-Key was reused with a different request payload.",
            OutcomeKind.REJECTED,
        ),
        (500, "api.internal_error", "internal error", OutcomeKind.AMBIGUOUS),
        (502, "api.internal_error", "bad gateway", OutcomeKind.AMBIGUOUS),
        (503, "api.provider_error", "error while connected to the provider", OutcomeKind.AMBIGUOUS),
        (504, "provider_error", "Provider request timed out.", OutcomeKind.AMBIGUOUS),
        (507, "unknown", "insufficient storage", OutcomeKind.AMBIGUOUS),
    ],
)
async def test_status_maps_to_outcome(status: int, error_type: str, message: str, kind: OutcomeKind) -> None:
    """Each documented status (and any other 4xx/5xx) becomes the right outcome, type and message."""
    outcome = await send_with(respond(status, error_body(error_type, message)))
    assert (outcome.kind, outcome.status, outcome.error_type) == (kind, status, error_type)
    assert outcome.error_message == message
    assert outcome.request_id == REQUEST_ID
    assert outcome.throttle is None
    assert outcome.message_id is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error_type", "message", "throttle"),
    [
        # Gmail's SMTP words for its daily limit, relayed as a refused message (email-standards §3.3)
        (402, "api.provider_error", "550 5.4.5 Daily user sending limit exceeded.", ThrottleKind.QUOTA),
        # the Gmail API's reasons (§3.4), relayed with its 403
        (403, "api.provider_error", "dailyLimitExceeded: Daily Limit Exceeded", ThrottleKind.QUOTA),
        (403, "api.provider_error", "userRateLimitExceeded: User Rate Limit Exceeded", ThrottleKind.PROVIDER),
        # Exchange's submission quota (§3.5) and iCloud's words (§3.8), whatever the status
        (
            422,
            "api.provider_error",
            "The message can't be submitted because the sender's submission quota was exceeded.",
            ThrottleKind.QUOTA,
        ),
        (
            503,
            "api.provider_error",
            "Sending the message failed because you exceeded your sending limit",
            ThrottleKind.QUOTA,
        ),
        (
            429,
            "rate_limit_error",
            "Error encountered while sending using Gmail API due to Rate Limit Exceeded",
            ThrottleKind.QUOTA,
        ),
    ],
)
async def test_a_mailbox_limit_is_a_throttle_whatever_status_relays_it(
    status: int, error_type: str, message: str, throttle: ThrottleKind
) -> None:
    """A quota or rate refusal of the mailbox, sent with another status than 429, holds the sender (no row
    fails, no credentials are blamed, no ambiguous retries)."""
    outcome = await send_with(respond(status, error_body(error_type, message)))
    assert (outcome.kind, outcome.throttle, outcome.status) == (OutcomeKind.THROTTLED, throttle, status)


@pytest.mark.anyio
async def test_a_full_recipient_mailbox_is_a_refused_message_not_a_quota() -> None:
    """ "Over quota" is the recipient's mailbox (4.2.2): that message fails, the sender goes on."""
    text = "452 4.2.2 The email account that you tried to reach is over quota."
    outcome = await send_with(respond(402, error_body("api.provider_error", text)))
    assert (outcome.kind, outcome.throttle) == (OutcomeKind.REJECTED, None)


@pytest.mark.anyio
async def test_unprefixed_concurrent_idempotency_type_is_still_in_progress() -> None:
    """Type strings are inconsistently prefixed (§3.3); the unprefixed form counts too."""
    outcome = await send_with(respond(409, error_body("concurrent_idempotent_request", "in progress")))
    assert outcome.kind is OutcomeKind.IN_PROGRESS


@pytest.mark.anyio
async def test_html_502_from_a_gateway_is_ambiguous_with_a_short_excerpt() -> None:
    """A non-JSON error page does not crash; the message is its text without tags."""
    outcome = await send_with(respond(502, text=GATEWAY_502, headers={"Content-Type": "text/html"}))
    assert outcome.kind is OutcomeKind.AMBIGUOUS
    assert outcome.error_type is None
    assert outcome.error_message == "HTTP 502, not a JSON answer: 502 Bad Gateway 502 Bad Gateway"


@pytest.mark.anyio
async def test_huge_error_body_is_cut_to_an_excerpt() -> None:
    """A long non-JSON body gives a one-line message of bounded length."""
    outcome = await send_with(respond(500, text="oops\n" * 10_000))
    assert outcome.error_message is not None
    assert len(outcome.error_message) <= 340
    assert "\n" not in outcome.error_message


@pytest.mark.anyio
async def test_json_error_without_error_object_is_described() -> None:
    """A JSON body lacking `error` still yields a readable message."""
    outcome = await send_with(respond(400, {"message": "nope"}))
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.error_message is not None
    assert outcome.error_message.startswith("HTTP 400: {")
    assert "nope" in outcome.error_message


@pytest.mark.anyio
async def test_redirect_is_not_followed_and_points_at_api_uri() -> None:
    """A 3xx means nothing at Nylas handled the send; the user is told to check api.uri."""
    seen: list[httpx.Request] = []
    outcome = await send_with(recording(seen, respond(301, text="", headers={"Location": "https://x.test/"})))
    assert len(seen) == 1
    assert outcome.kind is OutcomeKind.REJECTED
    assert outcome.error_message is not None
    assert "api.uri" in outcome.error_message


# ---------------------------------------------------------------------------------------------- 429


@pytest.mark.anyio
async def test_gmail_quota_429_from_the_forum_is_quota_with_its_retry_time() -> None:
    """FORUM-429 verbatim: QUOTA, retry_at from "Retry after <ISO>" inside provider_error."""
    outcome = await send_with(respond(429, text=FORUM_429))
    assert outcome.kind is OutcomeKind.THROTTLED
    assert outcome.throttle is ThrottleKind.QUOTA
    assert outcome.retry_at == datetime(2026, 1, 8, 9, 26, 53, 594000, tzinfo=UTC)
    assert outcome.error_type == "quota_exceeded_error"
    assert outcome.request_id == "..."
    assert outcome.error_message == (
        "Activity limit reached (provider: User-rate limit exceeded. "
        "Retry after 2026-01-08T09:26:53.594Z (Mail sending))"
    )


@pytest.mark.anyio
async def test_microsoft_mailbox_concurrency_429_is_provider_with_retry_after() -> None:
    """Graph's MailboxConcurrency throttle: PROVIDER, retry_at = now + Retry-After seconds."""
    headers = {"Retry-After": "30", "RateLimit-Exceeded": "MailboxConcurrency"}
    outcome = await send_with(respond(429, MICROSOFT_429, headers=headers))
    assert (outcome.kind, outcome.throttle) == (OutcomeKind.THROTTLED, ThrottleKind.PROVIDER)
    assert outcome.retry_at == NOW + timedelta(seconds=30)
    assert outcome.error_message is not None
    assert "MailboxConcurrency" in outcome.error_message


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "throttle"),
    [
        (
            error_body("nylas_rate_limit_exceeded", "Too many requests, please try again shortly."),
            ThrottleKind.NYLAS,
        ),
        (error_body("rate_limit_error", "Too many requests, please try again shortly."), ThrottleKind.NYLAS),
        (error_body("api.rate_limit_error", "Too many requests"), ThrottleKind.NYLAS),
        (
            error_body("rate_limit_error", "Application is over its MailboxConcurrency limit."),
            ThrottleKind.PROVIDER,
        ),
        (error_body("rate_limit_error", "Account throttled"), ThrottleKind.PROVIDER),
        (
            error_body(
                "rate_limit_error", "x", provider_error={"error": {"code": 429, "message": "Rate Limit"}}
            ),
            ThrottleKind.PROVIDER,
        ),
        (
            error_body(
                "rate_limit_error", "550 5.4.5 Daily user sending limit exceeded", provider_error={"e": 1}
            ),
            ThrottleKind.QUOTA,
        ),
        (error_body("api.rate_limit_error", "Sending quota exceeded"), ThrottleKind.QUOTA),
        (error_body("quota_exceeded_error", "x"), ThrottleKind.QUOTA),
        (None, ThrottleKind.NYLAS),
    ],
)
async def test_429_flavours_are_told_apart(body: dict[str, Any] | None, throttle: ThrottleKind) -> None:
    """Nylas's own limit, a provider throttle and a daily quota each get their throttle kind."""
    reply = respond(429, text="Too Many Requests") if body is None else respond(429, body)
    outcome = await send_with(reply)
    assert (outcome.kind, outcome.throttle) == (OutcomeKind.THROTTLED, throttle)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        ("1.5", NOW + timedelta(seconds=1.5)),
        ("0", NOW),
        ("-5", NOW),
        ("Thu, 08 Jan 2026 10:00:00 GMT", datetime(2026, 1, 8, 10, 0, tzinfo=UTC)),
        ("soon", None),
        ("inf", None),
        ("1e30", None),
    ],
)
async def test_retry_after_seconds_or_http_date(retry_after: str, expected: datetime | None) -> None:
    """Retry-After as int/float seconds (relative to the clock) or an HTTP-date; junk is ignored."""
    body = error_body("nylas_rate_limit_exceeded", "Too many requests")
    outcome = await send_with(respond(429, body, headers={"Retry-After": retry_after}))
    assert outcome.retry_at == expected


@pytest.mark.anyio
@pytest.mark.parametrize(("seconds", "expected"), [("60", "iso"), ("7200", "header")])
async def test_retry_at_is_the_latest_of_header_and_provider_time(seconds: str, expected: str) -> None:
    """When both Retry-After and a Gmail "Retry after <ISO>" are given, the later one wins."""
    iso_time = datetime(2026, 1, 8, 9, 26, 53, 594000, tzinfo=UTC)
    outcome = await send_with(respond(429, text=FORUM_429, headers={"Retry-After": seconds}))
    header_time = NOW + timedelta(seconds=int(seconds))
    assert outcome.retry_at == (iso_time if expected == "iso" else header_time)


@pytest.mark.anyio
async def test_retry_after_on_a_503_is_kept() -> None:
    """A Retry-After on a 5xx is passed on too, for pacing the same-key retry."""
    outcome = await send_with(
        respond(503, error_body("api.internal_error", "busy"), headers={"Retry-After": "12"})
    )
    assert (outcome.kind, outcome.retry_at) == (OutcomeKind.AMBIGUOUS, NOW + timedelta(seconds=12))


# ---------------------------------------------------------------------------------------------- network


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "kind", "error_type", "phrase"),
    [
        (httpx.ReadTimeout("timed out"), OutcomeKind.AMBIGUOUS, "timeout", "may have been sent"),
        (httpx.WriteTimeout("timed out"), OutcomeKind.AMBIGUOUS, "timeout", "may have been sent"),
        (httpx.ConnectTimeout("timed out"), OutcomeKind.UNREACHABLE, "timeout", "nothing was sent"),
        (httpx.PoolTimeout("no connection"), OutcomeKind.UNREACHABLE, "timeout", "nothing was sent"),
        (
            httpx.ConnectError("[Errno 111] Connection refused"),
            OutcomeKind.UNREACHABLE,
            "network",
            "nothing was sent",
        ),
        (httpx.ReadError("Connection reset by peer"), OutcomeKind.AMBIGUOUS, "network", "may have been sent"),
        (
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            OutcomeKind.AMBIGUOUS,
            "network",
            "may have",
        ),
    ],
)
async def test_transport_failures_are_unreachable_or_ambiguous(
    exc: Exception, kind: OutcomeKind, error_type: str, phrase: str
) -> None:
    """No response: UNREACHABLE when no connection was made (the key is unused), else AMBIGUOUS (it may have
    been sent: same key again); the message says which."""
    outcome = await send_with(raising(exc))
    assert outcome.kind is kind
    assert (outcome.status, outcome.error_type) == (None, error_type)
    assert outcome.error_message is not None
    assert phrase in outcome.error_message
    assert type(exc).__name__ in outcome.error_message


# ---------------------------------------------------------------------------------------------- the key


def echo_key_page() -> str:
    """A long page where the key sits right across the excerpt's cut."""
    return "x" * 290 + API_KEY + "y" * 500


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply",
    [
        respond(401, error_body("unauthorized", f"Invalid API key {API_KEY}")),
        respond(401, error_body("unauthorized", f"bad header Bearer%20{API_KEY}")),
        respond(500, text=f"<html><p>Authorization: Bearer {API_KEY}</p></html>"),
        respond(500, text=echo_key_page()),
        respond(200, {"request_id": "r", "echo": API_KEY}),
        respond(429, error_body("rate_limit_error", "slow", provider_error={"error": {"message": API_KEY}})),
        respond(404, error_body(f"type-{API_KEY}", "x"), headers={"x-request-id": f"req-{API_KEY}"}),
        raising(httpx.ConnectError(f"cannot connect with key {API_KEY}")),
        raising(httpx.ReadTimeout(f"timeout {API_KEY}")),
    ],
)
async def test_api_key_never_appears_in_an_outcome(reply: Handler) -> None:
    """Even when a server or an exception echoes the key, no outcome text holds it (or a long part of it)."""
    outcome = await send_with(reply)
    text = texts_of(outcome)
    assert API_KEY not in text
    assert API_KEY[:12] not in text
    assert API_KEY[-12:] not in text
    assert "***" in text


# ---------------------------------------------------------------------------------------------- listing


def listed(id_: str, to: str, date: int, **metadata: str) -> dict[str, Any]:
    """A message object as `GET /messages` returns it (§1.3 fields)."""
    return {
        "id": id_,
        "grant_id": GRANT,
        "object": "message",
        "subject": "Spring offer",
        "to": [{"email": to, "name": "X"}],
        "date": date,
        "folders": ["SENT"],
        "metadata": metadata,
    }


async def list_with(handler: Handler, **filters: Any) -> Any:
    """Call list_messages through a NylasClient whose transport is `handler`."""
    async with build_http_client(
        base_url=DEFAULT_API_URI, timeout_s=5, transport=httpx.MockTransport(handler)
    ) as http:
        return await NylasClient(http, api_key=API_KEY, clock=FixedClock()).list_messages(GRANT, **filters)


@pytest.mark.anyio
async def test_list_messages_by_metadata_pair() -> None:
    """metadata_pair=key1:value, limit; the page parses ids, recipients, dates, metadata and the cursor."""
    seen: list[httpx.Request] = []
    body = {
        "request_id": REQUEST_ID,
        "data": [listed("m1", "ann@example.com", 1735689600, key1="spring", key2="ann@example.com")],
        "next_cursor": "CURSOR-2",
    }
    page = await list_with(recording(seen, respond(200, body)), metadata_pair=("key1", "spring"), limit=50)
    (request,) = seen
    assert request.method == "GET"
    assert request.url.path == f"/v3/grants/{GRANT}/messages"
    assert request.url.params.multi_items() == [("metadata_pair", "key1:spring"), ("limit", "50")]
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert page.next_cursor == "CURSOR-2"
    (message,) = page.messages
    assert (message.id, message.subject, message.to) == ("m1", "Spring offer", ("ann@example.com",))
    assert message.date == datetime(2025, 1, 1, tzinfo=UTC)
    assert dict(message.metadata) == {"key1": "spring", "key2": "ann@example.com"}


@pytest.mark.anyio
async def test_list_messages_sent_folder_filters_and_page_token() -> None:
    """in, to, subject, received_after (unix seconds) and page_token go out as §5 names them."""
    seen: list[httpx.Request] = []
    body: dict[str, Any] = {"request_id": REQUEST_ID, "data": [], "next_cursor": None}
    page = await list_with(
        recording(seen, respond(200, body)),
        in_folder="SENT",
        to="ann@example.com",
        subject="Spring offer",
        received_after=datetime(2026, 1, 1, tzinfo=UTC),
        limit=200,
        page_token="CURSOR-2",
    )
    assert dict(seen[0].url.params) == {
        "in": "SENT",
        "to": "ann@example.com",
        "subject": "Spring offer",
        "received_after": "1767225600",
        "limit": "200",
        "page_token": "CURSOR-2",
    }
    assert page.messages == ()
    assert page.next_cursor is None


@pytest.mark.anyio
async def test_list_messages_follows_pages_until_the_cursor_ends() -> None:
    """A caller walks next_cursor; the last page has none (absent or null)."""
    pages = {
        None: {"data": [listed("m1", "a@example.com", 1)], "next_cursor": "p2"},
        "p2": {"data": [listed("m2", "b@example.com", 2)]},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("page_token")])

    first = await list_with(handler, in_folder="SENT")
    second = await list_with(handler, in_folder="SENT", page_token=first.next_cursor)
    assert [m.id for m in first.messages + second.messages] == ["m1", "m2"]
    assert second.next_cursor is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    "filters",
    [
        {"metadata_pair": ("key1", "spring"), "to": "ann@example.com"},
        {"metadata_pair": ("campaign", "spring")},
        {"limit": 201},
        {"limit": 0},
        {"received_after": datetime(2026, 1, 1)},
    ],
)
async def test_list_messages_refuses_filters_nylas_would_reject(filters: dict[str, Any]) -> None:
    """metadata_pair plus filters, unfilterable keys, limit outside 1..200, naive times: ValueError."""
    seen: list[httpx.Request] = []
    with pytest.raises(ValueError, match=r"metadata_pair|limit|timezone"):
        await list_with(recording(seen, respond(200, {"data": []})), **filters)
    assert seen == []


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "error_type"), [(401, "unauthorized"), (403, "insufficient_scopes")])
async def test_list_auth_refusal_raises_api_auth_error(status: int, error_type: str) -> None:
    """401/403 on a listing raise ApiAuthError naming status, type and request id, never the key."""
    reply = respond(status, error_body(error_type, f"key {API_KEY} refused"))
    with pytest.raises(ApiAuthError) as info:
        await list_with(reply, in_folder="SENT")
    message = str(info.value)
    assert str(status) in message
    assert error_type in message
    assert REQUEST_ID in message
    assert API_KEY not in message
    assert "\n" not in message


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "needles", "kind"),
    [
        (
            respond(404, error_body("not_found_error", "requested object not found")),
            ["404", "not_found_error"],
            ApiNotFoundError,
        ),
        (
            respond(429, error_body("nylas_rate_limit_exceeded", "Too many requests")),
            ["429", "nylas_rate_limit", "try again later"],
            ApiUnavailableError,
        ),
        (respond(502, text=GATEWAY_502), ["502", "Bad Gateway", "try again later"], ApiUnavailableError),
        (respond(200, text="<html>captive portal</html>"), ["not a JSON object"], ApiError),
        (respond(200, {"data": {"not": "a list"}}), ["'data' array"], ApiError),
        (respond(200, {"data": [{"subject": "no id"}]}), ["without an id"], ApiError),
        (
            raising(httpx.ConnectError(f"refused {API_KEY}")),
            ["ConnectError", "check the network"],
            ApiUnavailableError,
        ),
    ],
)
async def test_list_failures_raise_api_error(
    reply: Handler, needles: list[str], kind: type[ApiError]
) -> None:
    """Anything else going wrong while listing is an ApiError (not auth) with a useful one-line message:
    ApiUnavailableError (exit 75, try again later) when no connection was made or the API asked to wait."""
    with pytest.raises(ApiError) as info:
        await list_with(reply, in_folder="SENT")
    assert type(info.value) is kind
    message = str(info.value)
    assert all(needle in message for needle in needles), message
    assert API_KEY not in message
    assert "\n" not in message


@pytest.mark.anyio
async def test_list_folders_walks_every_page_and_reads_attributes() -> None:
    """Folders come from every page; attributes may be an array or (SDK-typed) a single string."""
    seen: list[httpx.Request] = []
    pages = {
        None: {
            "request_id": REQUEST_ID,
            "data": [
                {
                    "id": "INBOX",
                    "grant_id": GRANT,
                    "name": "Inbox",
                    "object": "folder",
                    "attributes": ["\\Inbox"],
                },
                {
                    "id": "SENT",
                    "grant_id": GRANT,
                    "name": "Sent",
                    "object": "folder",
                    "attributes": ["\\Sent"],
                },
            ],
            "next_cursor": "f2",
        },
        "f2": {
            "data": [{"id": "L1", "name": "Label", "attributes": "\\Archive"}, {"id": "L2"}],
            "next_cursor": None,
        },
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=pages[request.url.params.get("page_token")])

    async with build_http_client(
        base_url=DEFAULT_API_URI, timeout_s=5, transport=httpx.MockTransport(handler)
    ) as http:
        folders = await NylasClient(http, api_key=API_KEY, clock=FixedClock()).list_folders(GRANT)
    assert folders == [
        Folder("INBOX", "Inbox", ("\\Inbox",)),
        Folder("SENT", "Sent", ("\\Sent",)),
        Folder("L1", "Label", ("\\Archive",)),
        Folder("L2", "", ()),
    ]
    assert [r.url.path for r in seen] == [f"/v3/grants/{GRANT}/folders"] * 2


@pytest.mark.anyio
async def test_list_folders_stops_on_a_repeated_cursor() -> None:
    """A server that keeps returning the same cursor cannot trap the client in a loop."""
    calls: list[httpx.Request] = []
    body = {"data": [{"id": "SENT", "name": "Sent", "attributes": ["\\Sent"]}], "next_cursor": "same"}
    async with build_http_client(
        base_url=DEFAULT_API_URI,
        timeout_s=5,
        transport=httpx.MockTransport(recording(calls, respond(200, body))),
    ) as http:
        folders = await NylasClient(http, api_key=API_KEY, clock=FixedClock()).list_folders(GRANT)
    assert len(calls) == 2
    assert [f.id for f in folders] == ["SENT", "SENT"]
