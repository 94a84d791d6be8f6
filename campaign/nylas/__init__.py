"""The Nylas v3 API adapter: the send call, its answers, listing for reconcile, and the HTTP layer.

`NylasClient` sends a `Message` through a grant or a verified domain (`send_as`) and returns a
`SendOutcome` for every answer or failure: foreign errors (httpx, aiohttp) are translated here,
once. `build_send_request` encodes a send as JSON or multipart (pure); `capture_requests` records
the requests a send would make, for the preview. `build_http_client`
gives the pooled client; its aiohttp transport is imported only when a client without an
injected transport is built, so importing this package never loads aiohttp.
"""

from __future__ import annotations

from campaign.nylas._answers import is_trial_app_refusal
from campaign.nylas._capture import CapturedRequest, capture_requests
from campaign.nylas._client import (
    DEFAULT_API_URI,
    DEFAULT_CONNECTIONS,
    Folder,
    ListedMessage,
    MessagePage,
    NylasClient,
    SendClient,
    build_http_client,
    send_as,
)
from campaign.nylas._payload import (
    JSON_LIMIT_BYTES,
    MULTIPART_LIMIT_BYTES,
    SendRequest,
    build_send_payload,
    build_send_request,
    encode_send_body,
    measure_send_request,
)

__all__ = [
    "DEFAULT_API_URI",
    "DEFAULT_CONNECTIONS",
    "JSON_LIMIT_BYTES",
    "MULTIPART_LIMIT_BYTES",
    "CapturedRequest",
    "Folder",
    "ListedMessage",
    "MessagePage",
    "NylasClient",
    "SendClient",
    "SendRequest",
    "build_http_client",
    "build_send_payload",
    "build_send_request",
    "capture_requests",
    "encode_send_body",
    "is_trial_app_refusal",
    "measure_send_request",
    "send_as",
]
