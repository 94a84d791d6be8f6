"""The exact request a send would make, recorded instead of sent: what a preview shows.

`capture_requests` drives the real `NylasClient` against an httpx mock transport that records
each request, so a preview shows the very bytes a run would POST. The API key is never part of
what is kept, and the Idempotency-Key is shown as a placeholder (the ledger sets it per send).
No network and no aiohttp: the transport is injected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import httpx

from campaign.clock import Clock
from campaign.manifest import SenderSettings
from campaign.models import Message
from campaign.nylas._client import NylasClient, build_http_client, send_as
from campaign.nylas._payload import build_send_request, encode_send_body

__all__ = ["IDEMPOTENCY_PLACEHOLDER", "CapturedRequest", "capture_requests"]

IDEMPOTENCY_PLACEHOLDER = "set-per-send-by-the-ledger"
_CAPTURE_KEY = "preview-capture-key-never-sent"  # any visible ASCII: the client refuses an empty key
_SHOWN_HEADERS = ("content-type", "idempotency-key", "user-agent")


@dataclass(frozen=True, slots=True)
class CapturedRequest:
    """What a send would put on the wire: method, URL, headers (never Authorization) and body bytes.

    `json_body` is the JSON of the send: the whole body of a JSON send, or the `message`
    part of a multipart one (whose file parts follow it in `body`).
    """

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    json_body: bytes

    @property
    def content_type(self) -> str:
        """The body's media type, e.g. application/json."""
        return dict(self.headers).get("Content-Type", "").split(";")[0].strip()


def capture_requests(
    messages: Sequence[tuple[Message, SenderSettings]], *, api_uri: str, clock: Clock
) -> list[CapturedRequest]:
    """The request the real client would make for each message (as dispatch builds it), recorded, not sent.

    Messages must have their attachment files read (`attachments.load_message_attachments`).
    """
    captured: list[CapturedRequest] = []
    json_parts: list[bytes] = []

    async def record(request: httpx.Request) -> httpx.Response:
        body = await request.aread()  # a multipart body arrives as a stream of chunks
        captured.append(_describe(request, body, json_parts[-1]))
        return httpx.Response(200, json={"request_id": "preview", "data": {"id": "preview"}})

    async def post_all() -> None:
        transport = httpx.MockTransport(record)
        async with build_http_client(base_url=api_uri, timeout_s=30.0, transport=transport) as http:
            client = NylasClient(http, api_key="preview-no-key", clock=clock)
            for message, sender in messages:
                request = build_send_request(message)
                json_parts.append(encode_send_body(request.payload))
                await send_as(client, sender, request, idempotency_key=_CAPTURE_KEY)

    anyio.run(post_all)
    return captured


def _describe(request: httpx.Request, body: bytes, message_part: bytes) -> CapturedRequest:
    headers = []
    for name in _SHOWN_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        shown = "-".join(part.capitalize() for part in name.split("-"))
        headers.append((shown, IDEMPOTENCY_PLACEHOLDER if value == _CAPTURE_KEY else value))
    is_json = request.headers.get("content-type", "").startswith("application/json")
    return CapturedRequest(
        request.method, str(request.url), tuple(headers), body, body if is_json else message_part
    )
