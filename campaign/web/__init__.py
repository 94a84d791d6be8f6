"""What campaign serves to the internet: the one-click unsubscribe endpoint and the Nylas webhook
receiver (`campaign serve`: `EventService`), under bounded uvicorn.

`load_endpoint` builds the endpoint (an `UnsubscribeEndpoint`, a starlette app: RFC 8058 POST,
a confirmation page for GET) from its store and secrets; `serve_endpoint` serves it with the
limits every public service runs under (`ServerLimits`: header and body deadlines, a
connection cap that sheds half-sent requests first). Only the CLI imports this package: the
core never loads starlette or uvicorn.
"""

from __future__ import annotations

from campaign.web._service import (
    DEFAULT_WEBHOOK_SECRET_ENV,
    MAX_WEBHOOK_BYTES,
    EventService,
    read_webhook_secrets,
    serve_service,
)
from campaign.web._serving import ServerLimits, build_server_config
from campaign.web._unsubscribe import DEFAULT_SECRET_ENV, UnsubscribeEndpoint, load_endpoint, serve_endpoint

__all__ = [
    "DEFAULT_SECRET_ENV",
    "DEFAULT_WEBHOOK_SECRET_ENV",
    "MAX_WEBHOOK_BYTES",
    "EventService",
    "ServerLimits",
    "UnsubscribeEndpoint",
    "build_server_config",
    "load_endpoint",
    "read_webhook_secrets",
    "serve_endpoint",
    "serve_service",
]
