"""The server's log line when the store fails: an operator learns that every click or notification is
answered 503, without a line for each request.

A store that cannot be read or written (a StoreError: locked by another writer past its wait, out of
space, a database down) is answered 503, and Nylas and mail providers retry; nothing else would show
that deliveries are failing. `StoreFailureLog` logs the first failure on a route at once, then at most
one line every `every_s` seconds on that route, counting the failures it did not log; once the store
answers again, one line says so with the count still untold. A success on its own logs nothing. The
line names the route and the store's error (its place, and SQLite's or the database's words), with
the secrets the server knows masked and anything like an address or a token hidden: a driver's words
may quote a value. Times are the injected clock's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from campaign.clock import Clock
from campaign.redaction import HIDDEN, looks_like_secret, scrub_secrets, secret_values
from campaign.unsubscribe import StoreError

__all__ = ["FAILURE_LOG_EVERY_S", "StoreFailureLog"]

FAILURE_LOG_EVERY_S = 60.0
_log = logging.getLogger(__name__)
_ADDRESS = re.compile(r"[^\s@<>()\[\]\"',;:]+@[^\s@<>()\[\]\"',;:]+")
_AN_ADDRESS = "(an address)"
# A run of the characters a token, key or secret is written in (base64 and base32 included).
_RUN = re.compile(r"[A-Za-z0-9_+/=.-]{16,}")


@dataclass(slots=True)
class _Route:
    """What was logged of one route's failures: when its last line was, and the failures since."""

    logged_at: float
    untold: int = 0


class StoreFailureLog:
    """Logs a route's store failures, at most one line every `every_s` seconds a route (see the module).
    Used from the event loop's thread only, as a route's handler runs."""

    def __init__(
        self, clock: Clock, *, known: Iterable[str] = (), every_s: float = FAILURE_LOG_EVERY_S
    ) -> None:
        self._clock = clock
        self._known = (*secret_values(), *known)
        self._every_s = every_s
        self._routes: dict[str, _Route] = {}

    def log_failure(self, route: str, error: StoreError, *, where: str) -> None:
        """A request on `route` was answered 503: `error` is the store's (at `where`, its file or URL)."""
        now = self._clock.monotonic()
        state = self._routes.get(route)
        if state is not None and now - state.logged_at < self._every_s:
            state.untold += 1
            return
        untold = 0 if state is None else state.untold
        self._routes[route] = _Route(logged_at=now)
        more = f" ({untold} more since the last line)" if untold else ""
        _log.error(
            "%s: the unsubscribe store failed (%s); answered 503%s",
            route,
            describe_store_error(error, where=where, known=self._known),
            more,
        )

    def log_success(self, route: str) -> None:
        """A request on `route` was kept: one line when failures since the last line were not told yet."""
        state = self._routes.get(route)
        if state is None or not state.untold:
            return
        now = self._clock.monotonic()
        if now - state.logged_at < self._every_s:
            return
        self._routes[route] = _Route(logged_at=now)
        _log.warning(
            "%s: the unsubscribe store answers again (%d more failures, answered 503, since the last line)",
            route,
            state.untold,
        )


def describe_store_error(error: StoreError, *, where: str, known: Iterable[str]) -> str:
    """`error`'s text for the log, on one line: its place (`where`, the operator's own, with no password)
    as it is, and in the rest the `known` secrets masked, and addresses and what looks like a token
    hidden."""
    text = " ".join(str(error).split())
    place, rest = "", text
    if where and text.startswith(f"{where}: "):
        place, rest = f"{where}: ", text[len(where) + 2 :]
    known = tuple(known)
    rest = _ADDRESS.sub(_AN_ADDRESS, scrub_secrets(rest, known))
    return place + _RUN.sub(lambda run: HIDDEN if looks_like_secret(run[0], known) else run[0], rest)
