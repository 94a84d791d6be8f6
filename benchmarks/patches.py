"""Transport and serialisation experiments, applied by monkeypatching before campaign's CLI is imported.

Campaign's own send path is `campaign.nylas._transport.ApiTransport` (httpx's API over an aiohttp
pool) with orjson; each patch swaps one piece back for an alternative, so the choice can be
measured through the real command without editing `campaign/`:

- `httpcore`: stock httpx's own transport (httpcore), as `httpx.AsyncClient()` has it: at
  most 20 idle keep-alive connections;
- `httpcore-pool`: httpcore with a keep-alive pool as large as the connection limit (with
  more sends in flight than 20, stock httpx closes and reopens connections all the time);
- `stdlib-json`: request bodies by the standard `json` module instead of orjson.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PATCHES", "POOL_CONNECTIONS", "apply_patches", "build_transport"]

POOL_CONNECTIONS = 256  # more than any benchmark keeps in flight (20 senders × 8)


def build_transport(kind: str, *, connections: int = POOL_CONNECTIONS) -> Any:
    """A fresh transport of `kind` ("stock" or "pool"; "campaign": None, the default)."""
    import httpx

    if kind == "campaign":
        return None
    if kind == "stock":
        return httpx.AsyncHTTPTransport()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    if kind == "pool":
        return httpx.AsyncHTTPTransport(limits=limits)
    raise ValueError(f"unknown transport {kind!r}")


def _use_transport(kind: str) -> None:
    nylas = importlib.import_module("campaign.nylas._client")
    original = nylas.build_http_client

    def build_http_client(*, base_url: str, timeout_s: float, transport: Any = None, **options: Any) -> Any:
        chosen = build_transport(kind) if transport is None else transport
        return original(base_url=base_url, timeout_s=timeout_s, transport=chosen, **options)

    nylas.build_http_client = build_http_client


def _use_stdlib_json() -> None:
    import json

    payload = importlib.import_module("campaign.nylas._payload")

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    payload._dumps = dumps


PATCHES: dict[str, Callable[[], None]] = {
    "httpcore": lambda: _use_transport("stock"),
    "httpcore-pool": lambda: _use_transport("pool"),
    "stdlib-json": _use_stdlib_json,
}


def apply_patches(names: Iterable[str]) -> None:
    """Apply the named patches (before `campaign.cli` is imported, so its imports see them)."""
    for name in names:
        PATCHES[name]()
