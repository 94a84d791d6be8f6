"""Transport and serialisation experiments, applied by monkeypatching before campaign's CLI is imported.

Each patch stands for a code change the benchmarks recommend (see README.md), so it can
be measured through the real command without editing `campaign/`:

- `pool`: stock httpx, but a keep-alive pool as large as the connection limit
  (httpx keeps only 20 idle connections by default, so with more sends in flight
  than that, connections are closed and reopened all the time);
- `aiohttp`: the same `httpx.AsyncClient` API over the bare `httpx_aiohttp.AiohttpTransport`,
  its aiohttp connector sized the same way (campaign's default transport is now
  `campaign.transport.ApiTransport`, built on it);
- `stdlib-json`: request bodies by the standard `json` module instead of orjson (a
  dependency now), to measure what orjson buys;
- `orjson-loads`, `url-cache`, `lean-sleep`, `no-cookies`: now part of campaign itself
  (answers parsed by orjson; NylasClient posts to a cached absolute URL per grant;
  `Stopper.sleep` returns at once when there is nothing to wait for and otherwise waits
  on the stop event through `Clock.wait_for`; `campaign.transport.ApiHttpClient` skips
  the cookie parsing of answers that set none), so these patches change nothing more;
- `domain-cache`: email_validator checks each distinct domain once (an LRU cache
  around its domain-name check), not once per address.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PATCHES", "POOL_CONNECTIONS", "apply_patches", "build_transport"]

POOL_CONNECTIONS = 256  # more than any benchmark keeps in flight (20 senders × 8)


def build_transport(kind: str, *, connections: int = POOL_CONNECTIONS) -> Any:
    """A fresh transport of `kind` ("stock", "pool" or "aiohttp") for `httpx.AsyncClient`."""
    import httpx

    if kind == "stock":
        return httpx.AsyncHTTPTransport()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    if kind == "pool":
        return httpx.AsyncHTTPTransport(limits=limits)
    if kind == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return AiohttpTransport(limits=limits)
    raise ValueError(f"unknown transport {kind!r}")


def _use_transport(kind: str) -> None:
    nylas = importlib.import_module("campaign.nylas")
    original = nylas.build_http_client

    def build_http_client(*, base_url: str, timeout_s: float, transport: Any = None, **options: Any) -> Any:
        chosen = build_transport(kind) if transport is None else transport
        return original(base_url=base_url, timeout_s=timeout_s, transport=chosen, **options)

    nylas.build_http_client = build_http_client


def _use_stdlib_json() -> None:
    import json

    payload = importlib.import_module("campaign.payload")

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    payload._dumps = dumps


class _OrjsonLoads:
    """Stands in for the `json` module where campaign parses answers: orjson's loads, the stdlib's dumps."""

    def __init__(self) -> None:
        import json

        import orjson

        self.loads = orjson.loads
        self.dumps = json.dumps

    def __getattr__(self, name: str) -> Any:
        import json

        return getattr(json, name)


def _use_orjson_loads() -> None:
    # Responses are parsed in campaign.nylas_answers (campaign.nylas before the module split).
    for name in ("campaign.nylas_answers", "campaign.nylas"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "json"):
            module.json = _OrjsonLoads()


def _cache_merged_urls() -> None:
    import httpx

    original = httpx.AsyncClient._merge_url
    cache: dict[tuple[int, str], httpx.URL] = {}

    def merge_url(self: httpx.AsyncClient, url: httpx.URL | str) -> httpx.URL:
        if not isinstance(url, str):
            return original(self, url)
        key = (id(self), url)
        found = cache.get(key)
        if found is None:
            found = cache[key] = original(self, url)
        return found

    httpx.AsyncClient._merge_url = merge_url  # type: ignore[method-assign]


def _lean_sleeps() -> None:
    import anyio

    tasks = importlib.import_module("campaign.tasks")

    async def sleep(self: Any, seconds: float) -> None:
        # No task group and no watcher task per sleep: wait on the stop event with a deadline.
        # (Real time, as SystemClock; the product version would keep the Clock seam.)
        event = self._event
        if event is None:
            await self._clock.sleep(seconds)
        elif event.is_set():
            return
        elif seconds <= 0:
            await anyio.lowlevel.checkpoint()
        else:
            with anyio.move_on_after(seconds):
                await event.wait()

    tasks.Stopper.sleep = sleep


def _skip_cookie_parsing() -> None:
    import httpx

    original = httpx.Cookies.extract_cookies

    def extract_cookies(self: httpx.Cookies, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:  # the API sets none: skip building urllib shims per response
            original(self, response)

    httpx.Cookies.extract_cookies = extract_cookies  # type: ignore[method-assign]


def _cache_domain_checks() -> None:
    import functools

    module = importlib.import_module("email_validator.validate_email")
    module.validate_email_domain_name = functools.lru_cache(maxsize=4096)(module.validate_email_domain_name)


PATCHES: dict[str, Callable[[], None]] = {
    "pool": lambda: _use_transport("pool"),
    "aiohttp": lambda: _use_transport("aiohttp"),
    "stdlib-json": _use_stdlib_json,
    "orjson-loads": _use_orjson_loads,
    "url-cache": _cache_merged_urls,
    "lean-sleep": _lean_sleeps,
    "no-cookies": _skip_cookie_parsing,
    "domain-cache": _cache_domain_checks,
}


def apply_patches(names: Iterable[str]) -> None:
    """Apply the named patches (before `campaign.cli` is imported, so its imports see them)."""
    for name in names:
        PATCHES[name]()
