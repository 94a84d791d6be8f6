"""The `httpx.AsyncClient` campaign sends with, and when the environment's proxy settings apply.

`ApiHttpClient` is httpx's client without its cookie bookkeeping for answers that set no
cookie (httpx builds urllib shims for every answer; the API sets none). It knows nothing
of aiohttp (`campaign.nylas._transport`), so `campaign preview`, which captures the requests it
would send over a mock transport, never loads it.
"""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:  # aiohttp is loaded only by a client that sends through it
    from campaign.nylas._transport import ApiTransport

__all__ = ["ApiHttpClient", "env_proxy_applies"]


class _AnswerCookies(httpx.Cookies):
    """A client's cookies that skip answers setting none: httpx builds urllib shims for every answer."""

    def extract_cookies(self, response: httpx.Response) -> None:
        """Keep the cookies `response` sets, if it sets any."""
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


class ApiHttpClient(httpx.AsyncClient):
    """An `httpx.AsyncClient` whose cookie jar only looks at answers that carry Set-Cookie.

    `direct`: its transport when that is `ApiTransport`, which `NylasClient` posts sends through
    itself (`ApiTransport.post`, without httpx's models); None: every request goes through httpx.
    """

    def __init__(self, *, cookies: Any = None, direct: ApiTransport | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._answer_cookies = _AnswerCookies(cookies)
        self.direct = direct

    @property
    def cookies(self) -> httpx.Cookies:
        """The cookies sent with each request (as httpx keeps them)."""
        return self._answer_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._answer_cookies = _AnswerCookies(cookies)


def env_proxy_applies(url: httpx.URL) -> bool:
    """True when the environment names a proxy for `url` (HTTPS_PROXY, ALL_PROXY… less NO_PROXY)."""
    proxies = urllib.request.getproxies()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.host)
