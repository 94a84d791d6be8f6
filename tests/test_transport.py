"""The default HTTP transport (httpx over aiohttp) on a real loopback server: same outcomes as stock httpx.

Every fault the fake Nylas can inject is sent once through `build_http_client`'s default
transport and once through httpx's own, and must be classified the same way (sent, not
sent, ambiguous; timeout or network; "nothing was sent" or "may have been sent"). Each
aiohttp failure the transport translates is then raised by an aiohttp session made to
fail at the phase where aiohttp raises it, and must come out as the right httpx error.
"""

from __future__ import annotations

import http.cookiejar
import itertools
import re
import ssl
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import aiohttp
import anyio
import httpx
import multidict
import pytest
from support import refusing_url

from campaign.clock import SystemClock
from campaign.models import OutcomeKind, SendOutcome
from campaign.nylas import NylasClient, build_http_client
from campaign.nylas._answers import answer_text
from campaign.nylas._http import ApiHttpClient
from campaign.nylas._transport import ApiTransport, RawAnswer, failure_type
from campaign.testing import FakeNylas, Fault, serve_on_loopback

KEY = "nyk_transport_test_key_0123456789"
PAYLOAD = {"to": [{"email": "ann@example.com"}], "subject": "Hi", "body": "<p>Hi</p>"}
# The client's: a SLOW fault of 1.5 s outlasts it, while a loaded machine (the suite on both cores beside
# a database) may take half a second to answer a plain send on a fresh connection.
TIMEOUT_S = 1.0
_numbers = itertools.count(1)


@pytest.fixture(scope="module", name="served")
def _served() -> Iterator[tuple[FakeNylas, str]]:
    """One fake Nylas on loopback for the module; each test uses grants and keys of its own."""
    fake = FakeNylas(api_key=KEY)
    with serve_on_loopback(fake) as url:
        yield fake, url


def _new_grant(fake: FakeNylas) -> str:
    grant = f"grant-{next(_numbers)}"
    fake.add_grant(grant, f"{grant}@example.com")
    return grant


def _key() -> str:
    return f"key-{next(_numbers)}"


async def _send(
    url: str, grant: str, *, stock: bool, keys: list[str], before_last: Callable[[], None] = lambda: None
) -> SendOutcome:
    """Send once per key through one client (so later sends reuse its kept-alive connection)."""
    transport = httpx.AsyncHTTPTransport() if stock else None
    async with build_http_client(base_url=url, timeout_s=TIMEOUT_S, transport=transport) as http:
        client = NylasClient(http, api_key=KEY, clock=SystemClock())
        for key in keys[:-1]:
            assert (await client.send_message(grant, PAYLOAD, idempotency_key=key)).kind is OutcomeKind.SENT
        before_last()
        return await client.send_message(grant, PAYLOAD, idempotency_key=keys[-1])


def _shape(outcome: SendOutcome) -> tuple[Any, ...]:
    """What classifies an outcome, without the parts that differ between transports (wording, ids)."""
    text = outcome.error_message or ""
    exception = re.search(r"\((\w+(?:Error|Timeout))[:)]", text)
    return (
        outcome.kind,
        outcome.status,
        outcome.error_type,
        outcome.throttle,
        outcome.replayed,
        outcome.message_id is not None,
        outcome.retry_at is not None,
        "nothing was sent" in text,
        "may have been sent" in text,
        exception.group(1) if exception else None,
    )


# fault (or None), its options, and the outcome kind, error type and phrase both transports must give.
FAULTS: list[tuple[Fault | None, dict[str, float], OutcomeKind, str | None, str]] = [
    (None, {}, OutcomeKind.SENT, None, ""),
    (Fault.RESET, {}, OutcomeKind.AMBIGUOUS, "network", "may have been sent"),
    (Fault.RESET_AFTER_SEND, {}, OutcomeKind.AMBIGUOUS, "network", "may have been sent"),
    (Fault.TIMEOUT_AFTER_SEND, {}, OutcomeKind.AMBIGUOUS, "provider_error", ""),
    (Fault.SLOW, {"delay_s": 1.5}, OutcomeKind.AMBIGUOUS, "timeout", "may have been sent"),
    (Fault.SLOW, {"delay_s": 0.05}, OutcomeKind.SENT, None, ""),
    (Fault.NYLAS_RATE_LIMIT, {}, OutcomeKind.THROTTLED, "nylas_rate_limit_exceeded", ""),
    (Fault.PROVIDER_THROTTLE, {"retry_after_s": 3}, OutcomeKind.THROTTLED, "rate_limit_error", ""),
    (Fault.QUOTA_EXCEEDED, {"retry_after_s": 60}, OutcomeKind.THROTTLED, "quota_exceeded_error", ""),
    (Fault.UNAUTHORIZED, {}, OutcomeKind.AUTH_REFUSED, "unauthorized", ""),
    (Fault.FORBIDDEN, {}, OutcomeKind.AUTH_REFUSED, "insufficient_scopes", ""),
    (Fault.REJECTED, {}, OutcomeKind.REJECTED, "message_rejected", ""),
    (Fault.INTERNAL_ERROR, {}, OutcomeKind.AMBIGUOUS, "api.internal_error", ""),
    (Fault.BAD_GATEWAY, {}, OutcomeKind.AMBIGUOUS, None, ""),
    (Fault.UNAVAILABLE, {}, OutcomeKind.AMBIGUOUS, "api.service_unavailable", ""),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "options", "kind", "error_type", "phrase"),
    FAULTS,
    ids=[f"{fault.value if fault else 'none'}-{i}" for i, (fault, *_rest) in enumerate(FAULTS)],
)
@pytest.mark.parametrize("warm", [False, True], ids=["fresh-connection", "kept-alive"])
async def test_each_fault_of_the_fake_is_classified_as_with_stock_httpx(
    served, fault, options, kind, error_type, phrase, warm
):
    """Over loopback, the default transport and httpx's own give the same outcome; the POST is sent once."""
    fake, url = served
    shapes = []
    for stock in (True, False):
        grant = _new_grant(fake)
        keys = [_key(), _key()] if warm else [_key()]  # warm: a first send opens the connection

        def script(grant: str = grant) -> None:
            if fault is not None:
                fake.script(fault, grant_id=grant, **options)

        outcome = await _send(url, grant, stock=stock, keys=keys, before_last=script)
        assert (outcome.kind, outcome.error_type) == (kind, error_type), outcome
        assert phrase in (outcome.error_message or "")
        # Never sent twice by a transport (a timed-out request is logged once the fake is done with it).
        assert [r.idempotency_key for r in fake.requests].count(keys[-1]) <= 1
        assert [d.idempotency_key for d in fake.deliveries].count(keys[-1]) <= 1
        shapes.append(_shape(outcome))
    assert shapes[0] == shapes[1]


@pytest.mark.anyio
async def test_a_replayed_answer_is_flagged_as_with_stock_httpx(served):
    """The same key twice: the second answer is Nylas's replay, on either transport."""
    fake, url = served
    shapes = []
    for stock in (True, False):
        key = _key()
        outcome = await _send(url, _new_grant(fake), stock=stock, keys=[key, key])
        assert (outcome.kind, outcome.replayed) == (OutcomeKind.SENT, True)
        shapes.append(_shape(outcome))
    assert shapes[0] == shapes[1]


@pytest.mark.anyio
async def test_a_refused_connection_means_nothing_was_sent_as_with_stock_httpx():
    """Nothing listens on the port: ConnectError, unreachable (not ambiguous), and the message says nothing
    was sent."""
    with refusing_url() as url:
        shapes = [_shape(await _send(url, "g", stock=stock, keys=[_key()])) for stock in (True, False)]
    assert shapes[0] == shapes[1]
    assert shapes[1][:3] == (OutcomeKind.UNREACHABLE, None, "network")
    assert shapes[1][-3:] == (True, False, "ConnectError")


@pytest.mark.anyio
async def test_the_default_transport_is_aiohttp_with_a_pool_of_the_size_asked_for(served):
    """build_http_client's default transport is campaign's own, its aiohttp pool sized by `connections`."""
    fake, url = served
    grant = _new_grant(fake)
    async with build_http_client(base_url=url, timeout_s=5, connections=3) as http:
        transport = http._transport
        assert isinstance(transport, ApiTransport)
        client = NylasClient(http, api_key=KEY, clock=SystemClock())
        async with anyio.create_task_group() as group:
            for _ in range(9):
                group.start_soon(partial(client.send_message, grant, PAYLOAD, idempotency_key=_key()))
        session = transport.client
        assert isinstance(session, aiohttp.ClientSession)
        assert session.connector is not None
        assert session.connector.limit == 3
    assert len([d for d in fake.deliveries if d.grant_id == grant]) == 9


def test_an_environment_proxy_keeps_httpx_own_transport(monkeypatch):
    """With HTTPS_PROXY set (the host not in NO_PROXY) the client keeps httpx's transport, which uses it."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert isinstance(
        build_http_client(base_url="https://api.us.nylas.com", timeout_s=5)._transport, ApiTransport
    )
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    proxied = build_http_client(base_url="https://api.us.nylas.com", timeout_s=5)
    assert not isinstance(proxied._transport, ApiTransport)
    assert any(isinstance(t, httpx.AsyncHTTPTransport) for t in proxied._mounts.values())
    monkeypatch.setenv("NO_PROXY", "api.us.nylas.com")
    assert isinstance(
        build_http_client(base_url="https://api.us.nylas.com", timeout_s=5)._transport, ApiTransport
    )


# ---------------------------------------------------------------------------------------------- aiohttp


Make = Callable[[Any], BaseException]  # given aiohttp's ClientRequest, the failure to raise


def _refused(req: Any) -> BaseException:
    return aiohttp.ClientConnectorError(req.connection_key, ConnectionRefusedError(111, "Connection refused"))


def _dns(req: Any) -> BaseException:
    return aiohttp.ClientConnectorDNSError(req.connection_key, OSError(-2, "Name or service not known"))


def _certificate(req: Any) -> BaseException:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    return aiohttp.ClientConnectorCertificateError(req.connection_key, error)


def _bad_answer(req: Any) -> BaseException:
    return aiohttp.ClientResponseError(req.request_info, (), status=400, message="Invalid response status")


def _proxy_refused(req: Any) -> BaseException:
    return aiohttp.ClientHttpProxyError(req.request_info, (), status=407, message="Proxy Authentication")


# name, where aiohttp raises it (connect: getting a connection; send: writing the request;
# answer: reading the status line and headers; body: reading the body), the failure, and
# the httpx error, outcome error type and phrase it must become.
AIOHTTP_FAILURES: list[tuple[str, str, Make, type[httpx.TransportError], str, str]] = [
    (
        "connection-timeout",
        "connect",
        lambda _: aiohttp.ConnectionTimeoutError("Connection timeout to host"),
        httpx.ConnectTimeout,
        "timeout",
        "nothing was sent",
    ),
    ("connection-refused", "connect", _refused, httpx.ConnectError, "network", "nothing was sent"),
    ("dns", "connect", _dns, httpx.ConnectError, "network", "nothing was sent"),
    ("certificate", "connect", _certificate, httpx.ConnectError, "network", "nothing was sent"),
    (
        "reset-while-writing",
        "send",
        lambda _: aiohttp.ClientConnectionResetError("Connection lost"),
        httpx.WriteError,
        "network",
        "may have been sent",
    ),
    (
        "os-error",
        "answer",
        lambda _: aiohttp.ClientOSError(104, "Connection reset by peer"),
        httpx.ReadError,
        "network",
        "may have been sent",
    ),
    (
        "server-disconnected",
        "answer",
        lambda _: aiohttp.ServerDisconnectedError(),
        httpx.RemoteProtocolError,
        "network",
        "may have been sent",
    ),
    (
        "socket-timeout",
        "answer",
        lambda _: aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
        httpx.ReadTimeout,
        "timeout",
        "may have been sent",
    ),
    (
        "server-timeout",
        "answer",
        lambda _: aiohttp.ServerTimeoutError("Timeout"),
        httpx.ReadTimeout,
        "timeout",
        "may have been sent",
    ),
    ("invalid-answer", "answer", _bad_answer, httpx.RemoteProtocolError, "network", "may have been sent"),
    ("proxy-refused", "answer", _proxy_refused, httpx.ProxyError, "network", "may have been sent"),
    (
        "payload",
        "body",
        lambda _: aiohttp.ClientPayloadError("Response payload is not completed"),
        httpx.RemoteProtocolError,
        "network",
        "may have been sent",
    ),
    (
        "other-client-error",
        "answer",
        lambda _: aiohttp.ClientError("something else"),
        httpx.TransportError,
        "network",
        "may have been sent",
    ),
    ("plain-timeout", "body", lambda _: TimeoutError(), httpx.ReadTimeout, "timeout", "may have been sent"),
    (
        "plain-os-error",
        "body",
        lambda _: ConnectionResetError(104, "Connection reset by peer"),
        httpx.ReadError,
        "network",
        "may have been sent",
    ),
]


def _failing_session(phase: str, make: Make, raised: list[BaseException]) -> aiohttp.ClientSession:
    """A real aiohttp session that raises `make(request)` at `phase` of every request (kept in `raised`)."""
    options: dict[str, Any] = {}

    def failure(source: Any) -> BaseException:
        raised.append(make(source))
        return raised[-1]

    if phase == "connect":

        async def connect(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
            raise failure(req)

        connector: aiohttp.BaseConnector = type(
            "FailingConnector", (aiohttp.TCPConnector,), {"connect": connect}
        )()
    else:
        connector = aiohttp.TCPConnector()
    if phase == "send":

        async def send(self: Any, conn: Any) -> Any:
            raise failure(self)

        options["request_class"] = type("FailingRequest", (aiohttp.ClientRequest,), {"send": send})
    if phase in ("answer", "body"):
        method = "start" if phase == "answer" else "read"

        async def fail(self: Any, *args: Any) -> Any:
            raise failure(self)

        options["response_class"] = type("FailingResponse", (aiohttp.ClientResponse,), {method: fail})
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), **options)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("phase", "make", "expected", "error_type", "phrase"),
    [case[1:] for case in AIOHTTP_FAILURES],
    ids=[case[0] for case in AIOHTTP_FAILURES],
)
async def test_each_aiohttp_failure_becomes_the_right_httpx_error_and_outcome(
    served, phase, make, expected, error_type, phrase
):
    """Raised by the aiohttp session, a failure reaches httpx as its httpx error, never as aiohttp's own."""
    fake, url = served
    grant = _new_grant(fake)
    raised: list[BaseException] = []
    transport = ApiTransport(
        limits=httpx.Limits(max_connections=4), client=_failing_session(phase, make, raised)
    )
    async with build_http_client(base_url=url, timeout_s=5, transport=transport) as http:
        with pytest.raises(httpx.TransportError) as info:
            await http.post(f"/v3/grants/{grant}/messages/send", content=b"{}")
        assert type(info.value) is expected
        assert raised[0] in _causes(info.value)
        outcome = await NylasClient(http, api_key=KEY, clock=SystemClock()).send_message(
            grant, PAYLOAD, idempotency_key=_key()
        )
    # No connection: the request never left (its key is unused). Anything later: it may have been sent.
    kind = OutcomeKind.UNREACHABLE if phrase == "nothing was sent" else OutcomeKind.AMBIGUOUS
    assert (outcome.kind, outcome.status, outcome.error_type) == (kind, None, error_type)
    assert phrase in (outcome.error_message or "")
    assert expected.__name__ in (outcome.error_message or "")


def _causes(exc: BaseException) -> list[BaseException]:
    found = []
    while exc.__cause__ is not None:
        exc = exc.__cause__
        found.append(exc)
    return found


def test_every_failure_aiohttp_exports_is_translated_and_only_connect_failures_mean_not_sent():
    """No aiohttp error class is left untranslated; only those raised before the request left say so."""
    exported = [
        value
        for name in aiohttp.__all__
        if isinstance(value := getattr(aiohttp, name), type)
        and issubclass(value, aiohttp.ClientError)
        and not name.startswith("WS")
    ]
    assert len(exported) > 20
    before_sending = (httpx.ConnectError, httpx.ConnectTimeout)
    for kind in exported:
        target = failure_type(kind)
        assert target is not None, kind
        assert issubclass(target, httpx.TransportError), kind
        connects = issubclass(kind, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
        assert issubclass(target, before_sending) == connects, kind
    assert failure_type(ValueError) is None  # a programming error is not hidden as a network failure


@pytest.mark.anyio
async def test_a_programming_error_is_not_disguised_as_a_network_failure(served):
    """Only transport failures are translated; anything else propagates as it is."""
    fake, url = served
    session = _failing_session("answer", _oops, [])
    transport = ApiTransport(limits=httpx.Limits(max_connections=1), client=session)
    async with build_http_client(base_url=url, timeout_s=5, transport=transport) as http:
        with pytest.raises(ValueError, match="oops"):
            await http.post(f"/v3/grants/{_new_grant(fake)}/messages/send", content=b"{}")


def _oops(_req: Any) -> BaseException:
    return ValueError("oops")


@pytest.mark.anyio
async def test_the_client_timeout_reaches_aiohttp_phase_by_phase(served):
    """httpx's pool, connect and read timeouts become aiohttp's connect, sock_connect and sock_read."""
    fake, url = served
    seen: list[aiohttp.ClientTimeout] = []

    class Recording(aiohttp.TCPConnector):
        async def connect(self, req: Any, traces: Any, timeout: aiohttp.ClientTimeout) -> Any:
            seen.append(timeout)
            return await super().connect(req, traces, timeout)

    session = aiohttp.ClientSession(connector=Recording(), cookie_jar=aiohttp.DummyCookieJar())
    transport = ApiTransport(limits=httpx.Limits(max_connections=1), client=session)
    async with build_http_client(base_url=url, timeout_s=5, transport=transport) as http:
        timeout = httpx.Timeout(connect=1.0, read=2.0, write=3.0, pool=4.0)
        path, auth = f"/v3/grants/{_new_grant(fake)}/messages/send", {"Authorization": f"Bearer {KEY}"}
        response = await http.post(path, json=PAYLOAD, headers=auth, timeout=timeout)
        await http.post(path, json=PAYLOAD, headers=auth)
    assert response.status_code == 200
    assert (seen[0].connect, seen[0].sock_connect, seen[0].sock_read, seen[0].total) == (4.0, 1.0, 2.0, None)
    assert (seen[1].connect, seen[1].sock_connect, seen[1].sock_read) == (5, 5, 5)


# ---------------------------------------------------------------------------------------------- cookies


class _CountingJar(http.cookiejar.CookieJar):
    """A cookie jar that counts how often httpx asks it to read an answer."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def extract_cookies(self, response: Any, request: Any) -> None:
        self.reads += 1
        super().extract_cookies(response, request)


@pytest.mark.anyio
async def test_answers_without_set_cookie_skip_the_cookie_jar_and_cookies_still_work():
    """httpx parses every answer for cookies; ours only those with Set-Cookie, whose cookies it keeps."""
    sent_cookies: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent_cookies.append(request.headers.get("cookie"))
        if request.url.path == "/login":
            return httpx.Response(200, headers={"Set-Cookie": "lb=node7; Path=/"}, json={})
        return httpx.Response(200, json={})

    transport = httpx.MockTransport(answer)
    async with build_http_client(base_url="https://api.test", timeout_s=5, transport=transport) as http:
        jar = _CountingJar()
        http.cookies.jar = jar
        for _ in range(3):
            await http.get("/v3/x")
        assert jar.reads == 0
        await http.get("/login")
        await http.get("/v3/x")
        assert jar.reads == 1
        assert http.cookies.get("lb") == "node7"
        http.cookies = {"set": "by-hand"}  # replacing the cookies keeps the same behaviour
        jar = _CountingJar()
        for cookie in http.cookies.jar:
            jar.set_cookie(cookie)
        http.cookies.jar = jar
        await http.get("/v3/x")
        assert jar.reads == 0
    assert sent_cookies == [None, None, None, None, "lb=node7", "set=by-hand"]


@pytest.mark.anyio
async def test_the_certificate_store_is_read_before_the_first_request_not_during_it(served, monkeypatch):
    """Reading the CA bundle (~20 ms) on the first request would hold it past its paced slot."""
    fake, url = served
    async with build_http_client(base_url=url, timeout_s=5) as http:
        made: list[str] = []

        def count(*_args: Any, **_kwargs: Any) -> ssl.SSLContext:
            made.append("a context")
            return ssl.create_default_context()

        monkeypatch.setattr(httpx, "create_ssl_context", count)
        path, auth = f"/v3/grants/{_new_grant(fake)}/messages/send", {"Authorization": f"Bearer {KEY}"}
        response = await http.post(path, json=PAYLOAD, headers=auth)
    assert response.status_code == 200
    assert made == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        'text/html; charset="ISO-8859-1"',
        "text/plain; charset=no-such-charset",
    ],
)
def test_a_sends_answer_reads_as_the_text_httpx_would_read(content_type):
    """The send path reads answers without httpx's response (`RawAnswer`); their text is what httpx's
    `response.text` gives for the same bytes and Content-Type: its charset, else UTF-8, bad bytes replaced."""
    content = "café – ok".encode() + b" \xe9\xff"
    stock = httpx.Response(200, headers={"Content-Type": content_type}, content=content)
    raw = RawAnswer(200, multidict.CIMultiDict({"Content-Type": content_type}), content)
    assert answer_text(raw) == answer_text(stock) == stock.text


async def _recorded(post: Callable[..., Any], posted: list[str], url: str, *args: Any, **kwargs: Any) -> Any:
    posted.append(url)
    return await post(url, *args, **kwargs)


@pytest.mark.anyio
async def test_the_client_sends_through_the_transports_own_post_and_the_fake_gets_the_same(served):
    """A client from `build_http_client` posts sends through `ApiTransport.post`, not httpx's models, and
    the fake receives what it receives through httpx's own transport: the same answer and payload."""
    fake, url = served
    posted: list[str] = []
    received = []
    for stock in (True, False):
        transport = httpx.AsyncHTTPTransport() if stock else None
        async with build_http_client(base_url=url, timeout_s=5, transport=transport) as http:
            assert isinstance(http, ApiHttpClient)
            assert (http.direct is None) == stock
            if http.direct is not None:
                http.direct.post = partial(_recorded, http.direct.post, posted)  # type: ignore[method-assign]
            grant, key = _new_grant(fake), _key()
            client = NylasClient(http, api_key=KEY, clock=SystemClock())
            outcome = await client.send_message(grant, PAYLOAD, idempotency_key=key)
        assert outcome.kind == OutcomeKind.SENT
        (request,) = [r for r in fake.requests if r.idempotency_key == key]
        (delivery,) = [d for d in fake.deliveries if d.grant_id == grant]
        received.append((request.status, request.replayed, delivery.payload))
    assert posted == [f"{url}/v3/grants/{grant}/messages/send?fields=include_basic_headers"]
    assert received[0] == received[1]
