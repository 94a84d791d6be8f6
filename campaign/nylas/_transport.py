"""The HTTP layer under the API client: httpx's API over an aiohttp connection pool.

`ApiTransport` is an `httpx.AsyncBaseTransport` (httpx's public transport interface) that
sends each request through an aiohttp session (several times faster than httpcore for many
small requests) and reads each answer whole. Its `post` is the send path's shortcut: the same
exchange without httpx's request and response objects, which cost a fifth of a send's CPU.
Every failure becomes the httpx exception the stock transport raises for the same event,
so `campaign.nylas._client` sees one exception family and classifies it as before: connect
failures and connect timeouts (the request never left) are `ConnectError` /
`ConnectTimeout`; anything after the request may have left is a `ReadTimeout`,
`WriteError`, `ReadError` or `RemoteProtocolError`. Nothing here retries a request.
aiohttp is not asked to read proxy settings (it would per request): when one is set,
`campaign.nylas._http` keeps httpx's own transport, which honours them.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

__all__ = ["ApiTransport", "RawAnswer", "failure_type", "translate_failure"]

# The first class an aiohttp failure is an instance of decides (subclasses come before their bases).
_FAILURES: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    # Before the request left: no connection (pool wait, connect, TLS handshake, DNS, proxy connect).
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    # From here on the request may have reached the server.
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),  # no data from the server within the read timeout
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),  # closed without (a whole) answer
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # the answer's body was cut short
    (aiohttp.ClientHttpProxyError, httpx.ProxyError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # not a valid HTTP answer
    (aiohttp.ClientConnectionResetError, httpx.WriteError),  # lost while the request was written
    (aiohttp.ClientConnectionError, httpx.ReadError),  # e.g. ClientOSError: connection reset by peer
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.TransportError),
    (TimeoutError, httpx.ReadTimeout),
    (OSError, httpx.ReadError),
)


def failure_type(kind: type[BaseException]) -> type[httpx.TransportError] | None:
    """The httpx exception class an aiohttp (or socket) failure of class `kind` becomes; None: not one."""
    return next((target for source, target in _FAILURES if issubclass(kind, source)), None)


def translate_failure(exc: Exception) -> httpx.TransportError | None:
    """The httpx exception for an aiohttp (or socket) failure, with its message; None for anything else."""
    target = failure_type(type(exc))
    return None if target is None else target(str(exc) or type(exc).__name__)


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """An answer as `ApiTransport.post` reads it: what `campaign.nylas._answers` reads of one."""

    status_code: int
    headers: Mapping[str, str]  # aiohttp's: names case-insensitive
    content: bytes


class ApiTransport(httpx.AsyncBaseTransport):
    """httpx over aiohttp: complete error translation, whole-body reads and no cookies of its own.

    Give `client` (an `aiohttp.ClientSession`) to use a session of your own; otherwise one is
    opened on first use with a pool of `limits.max_connections` kept-alive connections. Either
    way `aclose` closes it.
    """

    def __init__(self, *, limits: httpx.Limits, client: aiohttp.ClientSession | None = None) -> None:
        self.limits = limits
        self.client = client
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}
        # Made now, not with the session: reading the CA bundle takes ~20 ms, which on the first request
        # would hold it past its paced slot, to land in the same second as the ones after it.
        self._ssl = httpx.create_ssl_context()

    def get_client(self) -> aiohttp.ClientSession:
        """A session over a pool sized by `limits`; httpx, not aiohttp, keeps any cookies."""
        if isinstance(self.client, aiohttp.ClientSession):
            return self.client
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            # httpx's own verification (certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR).
            ssl=self._ssl,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def aclose(self) -> None:
        """Close the session (and its pool)."""
        if isinstance(self.client, aiohttp.ClientSession):
            await self.client.close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` and read its whole answer; every failure raises an `httpx.TransportError`."""
        data: bytes | httpx.AsyncByteStream | None
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # type: ignore[assignment]  # an async stream: aiohttp sends it as it comes
        response, body = await self._exchange(
            request.method,
            str(request.url),
            headers=_header_items(request.headers, streamed=data is request.stream),
            data=data,
            decompress=False,  # httpx decodes Content-Encoding itself
            timeout=request.extensions.get("timeout"),
            server_hostname=request.extensions.get("sni_hostname"),
        )
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        # The body is already here: given as content, httpx reads it at once (and decodes any
        # Content-Encoding) instead of through a chain of async iterators.
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            content=body,
            request=request,
            extensions=extensions,
        )

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes | AsyncIterable[bytes],
        *,
        timeout: Mapping[str, float | None],
    ) -> RawAnswer:
        """POST `body` to the absolute `url` and read its whole answer, as `handle_async_request` does but
        without httpx's request and response objects (a fifth of a send's CPU); the same failures.

        `headers` are sent as given (plus aiohttp's Host, Accept-Encoding); `timeout` is
        `httpx.Timeout.as_dict()`. The answer's content is decoded of any Content-Encoding.
        """
        response, content = await self._exchange(
            "POST", url, headers=headers, data=body, decompress=True, timeout=timeout
        )
        return RawAnswer(response.status, response.headers, content)

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | list[tuple[str, str]],
        data: Any,
        decompress: bool,
        timeout: Mapping[str, float | None] | None,
        server_hostname: str | None = None,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """One request and its whole answer through the session; every failure an `httpx.TransportError`."""
        session = self.client
        if not isinstance(session, aiohttp.ClientSession):
            session = self.client = self.get_client()
        try:
            response = await session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                auto_decompress=decompress,
                timeout=self._timeout(timeout),
                server_hostname=server_hostname,
            )
            try:
                body = await response.read()
            except BaseException:
                response.close()  # a half-read connection must not go back to the pool
                raise
        except Exception as exc:
            failure = translate_failure(exc)
            if failure is None:
                raise
            raise failure from exc
        return response, body

    def _timeout(self, phases: Mapping[str, float | None] | None) -> aiohttp.ClientTimeout:
        """httpx's per-phase timeouts as aiohttp's: pool + connect, connect, and read (between reads).

        aiohttp has no write timeout; the read timer also runs while the request is written.
        """
        phases = phases or {}
        key = (phases.get("pool"), phases.get("connect"), phases.get("read"))
        found = self._timeouts.get(key)
        if found is None:
            pool, connect, read = key
            found = aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)
            self._timeouts[key] = found
        return found


def _header_items(headers: httpx.Headers, *, streamed: bool) -> list[tuple[str, str]]:
    """The request's headers as aiohttp takes them; a streamed body's framing is left to aiohttp."""
    try:  # the usual case, ASCII only, without httpx's per-call guess of the encoding
        items = [(key.decode("ascii"), value.decode("ascii")) for key, value in headers.raw]
    except UnicodeDecodeError:
        items = headers.multi_items()
    if streamed:
        items = [(key, value) for key, value in items if key.lower() != "transfer-encoding"]
    return items
