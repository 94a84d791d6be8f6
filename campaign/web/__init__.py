"""What campaign serves to the internet: the one-click unsubscribe endpoint, under bounded uvicorn.

`build_unsubscribe_app` is the starlette app (RFC 8058 POST, a confirmation page for GET);
`build_server_config` bounds every public service against slow and numerous clients. Only the
CLI imports this package: the core never loads starlette or uvicorn.
"""

from __future__ import annotations

from campaign.web._serving import ServerLimits
from campaign.web._unsubscribe import DEFAULT_SECRET_ENV, load_endpoint, serve_endpoint

__all__ = ["DEFAULT_SECRET_ENV", "ServerLimits", "load_endpoint", "serve_endpoint"]
