"""The one-click unsubscribe endpoint (RFC 8058): a starlette app that records unsubscribes in the store.

`POST` with `List-Unsubscribe=One-Click` (urlencoded or multipart) records the
unsubscribe and answers 200: no redirect, no cookie, no login, and a repeat is
harmless. `GET` shows a confirmation page whose button POSTs; it changes nothing by
itself (link scanners fetch URLs). A token that does not verify gets the same bare
400 whatever is wrong with it. The token is the `t` (or `token`) query parameter, else
the last path segment, else any other query value or path segment (a `.html`-style
extension dropped) that verifies, so any URL shape the manifest's `unsubscribe.url`
accepts works, mounted anywhere. A store that cannot be read or written, for whatever
reason, answers 503 with Retry-After, never a bare 500, and the server's log says so
(`StoreFailureLog`). A face-level module: it imports starlette, and the core never imports it.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from campaign.clock import Clock, SystemClock
from campaign.errors import ManifestError
from campaign.unsubscribe import (
    StoreError,
    SuppressionStore,
    TokenClaims,
    open_store,
    parse_secrets,
    token_candidates,
    verify_token,
)
from campaign.web._failures import StoreFailureLog
from campaign.web._serving import ServerLimits, build_server_config

__all__ = [
    "DEFAULT_SECRET_ENV",
    "MAX_BODY_BYTES",
    "UnsubscribeEndpoint",
    "load_endpoint",
    "serve_endpoint",
]

DEFAULT_SECRET_ENV = "CAMPAIGN_UNSUBSCRIBE_SECRET"
MAX_BODY_BYTES = 16 * 1024  # the one-click body is 26 bytes urlencoded, a few hundred as multipart
_ONE_CLICK = ("List-Unsubscribe", "One-Click")
_log = logging.getLogger(__name__)
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'",
}
_STYLE = (
    "body{font-family:system-ui,-apple-system,Segoe UI,Arial,sans-serif;max-width:32rem;"
    "margin:4rem auto;padding:0 1rem;color:#1f2937;line-height:1.5}"
    "button{font:inherit;padding:.6rem 1.4rem;border:0;border-radius:.4rem;background:#1f2937;"
    "color:#fff;cursor:pointer}"
)


class _BodyTooLarge(Exception):
    """The request body passed the size limit."""


class UnsubscribeEndpoint:
    """The endpoint over one store: serve `.app` (uvicorn, or mount it in your own ASGI service)."""

    def __init__(
        self,
        store: SuppressionStore,
        *,
        secrets: Sequence[bytes],
        max_body_bytes: int = MAX_BODY_BYTES,
        clock: Clock | None = None,
    ) -> None:
        if not secrets:
            raise ValueError("the unsubscribe endpoint needs at least one secret to verify links")
        self.store = store
        self._secrets = tuple(secrets)
        self._max_body_bytes = max_body_bytes
        known = [secret.decode("utf-8", "replace") for secret in self._secrets]
        self._failures = StoreFailureLog(clock or SystemClock(), known=known)
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])

    async def _handle(self, request: Request) -> Response:
        claims = self._claims(request)
        if request.method == "POST":
            return await self._unsubscribe(request, claims)
        if claims is None:
            return _invalid_link()
        try:
            found = await anyio.to_thread.run_sync(
                partial(self.store.find, claims.campaign, claims.recipient_key)
            )
        except Exception as exc:  # a StoreError, or anything else: never a bare 500
            return self._store_failed("GET /unsubscribe", exc)
        self._failures.log_success("GET /unsubscribe")
        if found is not None:
            return _page(200, "You are unsubscribed", "<p>You will not get these emails any more.</p>")
        return _page(
            200,
            "Unsubscribe?",
            "<p>Stop getting emails from this list?</p>"
            # An empty action posts back to this very URL, token included.
            '<form method="post" action="">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<input type="hidden" name="via" value="page">'
            '<button type="submit">Unsubscribe</button></form>',
        )

    async def _unsubscribe(self, request: Request, claims: TokenClaims | None) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            return _page(413, "Request too large", "<p>The request body is too large.</p>")
        if claims is None:
            return _invalid_link()
        try:
            body = await self._read_body(request)
            form = await _parse_form(request.headers, body)
        except _BodyTooLarge:
            return _page(413, "Request too large", "<p>The request body is too large.</p>")
        except (ClientDisconnect, MultiPartException, ValueError):
            return _page(400, "Bad request", "<p>The request could not be read.</p>")
        if form is None:
            return _page(415, "Unsupported form", "<p>Send a form (urlencoded or multipart).</p>")
        if _ONE_CLICK not in form:
            return _page(400, "Bad request", "<p>Expected List-Unsubscribe=One-Click.</p>")
        source = "page" if ("via", "page") in form else "one-click"
        try:
            await anyio.to_thread.run_sync(
                partial(
                    self.store.record,
                    claims.campaign,
                    claims.recipient_key,
                    email=claims.email,
                    source=source,
                )
            )
        except Exception as exc:  # a StoreError, or anything else: never a bare 500
            return self._store_failed("POST /unsubscribe", exc)
        self._failures.log_success("POST /unsubscribe")
        return _page(200, "You are unsubscribed", "<p>You will not get these emails any more.</p>")

    def _store_failed(self, route: str, exc: Exception) -> HTMLResponse:
        """503 for a store that failed: a StoreError is expected (locked, out of reach), and told in the
        log (`StoreFailureLog`: the route, the store's error, never the token); anything else is a bug,
        logged by its type alone (its text may quote the request or the database), and the click is
        still asked again, not lost to a 500. `route` names the route, never the URL: it holds the token."""
        if isinstance(exc, StoreError):
            self._failures.log_failure(route, exc, where=self.store.where)
        else:
            _log.error("an unsubscribe could not be read or recorded (%s); answered 503", type(exc).__name__)
        return _try_again_later()

    def _claims(self, request: Request) -> TokenClaims | None:
        query = request.query_params.multi_items()
        for token in token_candidates(query, request.path_params.get("path", "")):
            claims = verify_token(token, secrets=self._secrets)
            if claims is not None:
                return claims
        return None

    async def _read_body(self, request: Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)


async def _parse_form(headers: Headers, body: bytes) -> set[tuple[str, str]] | None:
    """The (name, value) pairs of an urlencoded or multipart body; None for any other content type."""
    kind = headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind in {"", "application/x-www-form-urlencoded"}:
        text = body.decode("utf-8")  # a UnicodeDecodeError is a ValueError: a bad request
        return set(parse_qsl(text, keep_blank_values=True))
    if kind != "multipart/form-data":
        return None

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    form = await MultiPartParser(headers, chunks(), max_files=0, max_fields=16).parse()
    return {(name, value) for name, value in form.multi_items() if isinstance(value, str)}


def _page(status: int, title: str, content: str) -> HTMLResponse:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{content}</body></html>\n"
    )
    return HTMLResponse(document, status_code=status, headers=_SECURITY_HEADERS)


def _invalid_link() -> HTMLResponse:
    # The same answer for every kind of bad token: it must not tell a forger what was wrong.
    return _page(400, "This link is not valid", "<p>This unsubscribe link is not valid.</p>")


def _try_again_later() -> HTMLResponse:
    # A store out of reach for a moment (locked, a database restarting): 503 and Retry-After, so a
    # mail provider retries the one-click POST and a person the page, instead of a bare 500.
    response = _page(503, "Try again later", "<p>Please try again in a minute.</p>")
    response.headers["Retry-After"] = "60"
    return response


def load_endpoint(
    store_path: Path | str, *, secret_env: str = DEFAULT_SECRET_ENV, clock: Clock | None = None
) -> UnsubscribeEndpoint:
    """An endpoint over the store at `store_path` (a file or a `postgresql://` URL; created if missing),
    checking links with `secret_env`.

    Raises ManifestError when the variable is unset or a secret is too short (never showing it).
    """
    value = os.environ.get(secret_env, "")
    if not value.strip():
        message = (
            f"the environment variable {secret_env} is not set; set it to the same secret(s) the "
            "campaign signs its unsubscribe links with (or name another with --secret-env)"
        )
        raise ManifestError(message)
    try:
        secrets = parse_secrets(value)
    except ManifestError as exc:
        raise ManifestError(f"{secret_env}: {exc}") from exc
    clock = clock or SystemClock()
    store = open_store(store_path, clock=clock)
    return UnsubscribeEndpoint(store, secrets=secrets, clock=clock)


def serve_endpoint(
    endpoint: UnsubscribeEndpoint, *, host: str, port: int, limits: ServerLimits | None = None
) -> None:
    """Serve the endpoint with uvicorn in the foreground until Ctrl-C, bounded by `limits`
    (campaign.web._serving: read deadlines, a connection cap, no access log since URLs hold tokens)."""
    config = build_server_config(endpoint.app, host=host, port=port, limits=limits or ServerLimits())
    uvicorn.Server(config).run()
