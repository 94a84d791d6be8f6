"""`campaign serve`: one service for everything that comes back: one-click unsubscribes and Nylas webhooks.

Routes (a contract): `/unsubscribe` and `/unsubscribe/<token>` are the one-click endpoint,
unchanged; `GET /nylas/webhook?challenge=X` answers X as text (Nylas checks the URL so when the
webhook is created); `POST /nylas/webhook` verifies `x-nylas-signature` on the raw bytes (the
compressed bytes when `Content-Encoding: gzip`) before anything parses them, then keeps the
notification in the store once per envelope id and answers at once (Nylas gives 10 s);
`GET /healthz` for the proxy. Every answer of these routes is text that a browser must not take for
a page (nosniff, a Content-Security-Policy allowing nothing, no-store): the challenge's is anyone's. A
bad or missing signature is 401 and records nothing; a body over 1 MB is 413; a signed body that is not
a notification in UTF-8 JSON is 400. A notification that cannot be recorded, whatever the reason (the
store locked or down, a bug), is 503 with Retry-After: Nylas retries a notification only on 408, 429
and 502-507, and a 500 would lose it for good. A store that fails is told in the server's log
(`StoreFailureLog`: the route and the store's error, at most a line a minute with a count).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import zlib
from collections.abc import Sequence
from functools import partial

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from campaign.clock import Clock, SystemClock
from campaign.errors import DataError, ManifestError
from campaign.events import record_notification, verify_signature
from campaign.unsubscribe import StoreError, SuppressionStore
from campaign.web._failures import StoreFailureLog
from campaign.web._serving import ServerLimits, build_server_config
from campaign.web._unsubscribe import UnsubscribeEndpoint

__all__ = [
    "DEFAULT_WEBHOOK_SECRET_ENV",
    "MAX_WEBHOOK_BYTES",
    "EventService",
    "read_webhook_secrets",
    "serve_service",
]

DEFAULT_WEBHOOK_SECRET_ENV = "NYLAS_WEBHOOK_SECRET"
MAX_WEBHOOK_BYTES = 1024 * 1024  # Nylas truncates notifications above 1 MB, so nothing real is larger
_ROUTE = "POST /nylas/webhook"  # how the log names the receiver
_log = logging.getLogger(__name__)
# Every answer is text, and the challenge's is whatever the query asked: a browser sent to
# /nylas/webhook?challenge=<html>… must show it as text on the site's domain, never sniff it for a page
# to render or a script to run, nor keep it.
_TEXT_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


class EventService:
    """The one-click endpoint and the webhook receiver over one store: serve `.app`."""

    def __init__(
        self, endpoint: UnsubscribeEndpoint, *, webhook_secrets: Sequence[bytes], clock: Clock | None = None
    ) -> None:
        if not webhook_secrets:
            raise ValueError("the webhook receiver needs the webhook's secret to verify deliveries")
        self.store: SuppressionStore = endpoint.store
        self._secrets = tuple(webhook_secrets)
        self._clock = clock or SystemClock()
        known = [secret.decode("utf-8", "replace") for secret in self._secrets]
        self._failures = StoreFailureLog(self._clock, known=known)
        self.app = Starlette(
            routes=[
                Route("/nylas/webhook", self._challenge, methods=["GET"]),
                Route("/nylas/webhook", self._receive, methods=["POST"]),
                Route("/healthz", _healthy, methods=["GET"]),
                Mount("/", app=endpoint.app),
            ]
        )

    async def _challenge(self, request: Request) -> Response:
        challenge = request.query_params.get("challenge")
        if challenge is None:
            return _plain("no challenge", status_code=400)
        return _plain(challenge)

    async def _receive(self, request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_WEBHOOK_BYTES:
            return _plain("too large", status_code=413)
        body = b""
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_WEBHOOK_BYTES:
                    return _plain("too large", status_code=413)
        except ClientDisconnect:
            return _plain("", status_code=400)
        if not verify_signature(body, request.headers.get("x-nylas-signature"), self._secrets):
            return _plain("bad signature", status_code=401)
        if request.headers.get("content-encoding", "").strip().lower() == "gzip":
            try:
                body = _gunzip(body)
            except (OSError, EOFError, zlib.error):
                return _plain("not gzip", status_code=400)
        return await self._record(body)

    async def _record(self, body: bytes) -> Response:
        """Keep a verified notification: 200; 400 for a body that is not one; 503 when it cannot be kept."""
        try:
            await anyio.to_thread.run_sync(partial(record_notification, self.store, body, clock=self._clock))
        except DataError as exc:
            return _plain(str(exc), status_code=400)
        except StoreError as exc:
            self._failures.log_failure(_ROUTE, exc, where=self.store.where)
            return _retry_later()
        except Exception as exc:
            # Whatever else went wrong, Nylas must deliver it again: 503, never a 500, which it does not
            # retry. The log names the error's type only: its text may quote the body or the database.
            _log.error("a notification could not be recorded (%s); answered 503", type(exc).__name__)
            return _retry_later()
        self._failures.log_success(_ROUTE)
        return _plain("ok")


async def _healthy(_request: Request) -> Response:
    return _plain("ok")


def _retry_later() -> Response:
    # Nylas retries a notification only on 408, 429 and 502-507: a 500 would lose it for good.
    return _plain("store unavailable; retry", status_code=503, headers={"Retry-After": "60"})


def _gunzip(body: bytes) -> bytes:
    """Inflate a gzip body, refusing one that inflates past the size limit (a zip bomb)."""
    with gzip.GzipFile(fileobj=io.BytesIO(body)) as stream:
        inflated = stream.read(MAX_WEBHOOK_BYTES + 1)
    if len(inflated) > MAX_WEBHOOK_BYTES:
        raise OSError("inflates past the size limit")
    return inflated


def read_webhook_secrets(secret_env: str) -> tuple[bytes, ...]:
    """The webhook secret(s) from `secret_env` (comma-separated during a rotation); never shown."""
    value = os.environ.get(secret_env, "")
    secrets = tuple(part.strip().encode() for part in value.split(",") if part.strip())
    if not secrets:
        message = (
            f"the environment variable {secret_env} is not set; set it to the webhook_secret Nylas "
            "returned when the webhook was created (or name another with --webhook-secret-env)"
        )
        raise ManifestError(message)
    return secrets


def serve_service(service: EventService, *, host: str, port: int, limits: ServerLimits | None = None) -> None:
    """Serve with uvicorn in the foreground until Ctrl-C, bounded by `limits` like the one-click endpoint."""
    config = build_server_config(service.app, host=host, port=port, limits=limits or ServerLimits())
    uvicorn.Server(config).run()


def _plain(content: str, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A text answer, with the headers that keep a browser from taking it for anything else."""
    return PlainTextResponse(content, status_code=status_code, headers={**_TEXT_HEADERS, **(headers or {})})
