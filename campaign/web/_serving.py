"""Serving an ASGI app to the internet with uvicorn, bounded against slow and numerous clients.

`build_server_config` gives the uvicorn.Config every public service of campaign runs with (the
unsubscribe endpoint; later services reuse it): a request must send its headers within
`header_timeout_s` and its body within `body_timeout_s` of them, or its connection is closed;
at most `max_connections` are open (and never so many that the process runs out of file
descriptors), and a connection arriving at the cap closes the oldest one still waiting on its
client, so half-sent requests (slowloris) cannot starve real ones. Logging keeps no tracebacks,
at most a few copies of one message a minute, and a few dozen lines a minute from any one logger (a
library that words each message anew, as python_multipart does, still keeps to a bound), whichever
logger it is: the root logger has the same handler. A face-level module: the core never imports it.
Its timers are the event loop's, as uvicorn's own keep-alive timer is.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["BoundedLogFilter", "ServerLimits", "build_server_config", "connection_cap"]

# The listen backlog, which is also how many connections asyncio accepts in one go, before any of
# them reaches the cap check: several such batches can be open before evicted sockets are closed.
_BACKLOG = 64
# Descriptors kept free when capping connections: the store, the log, the listening socket, and
# a few accept batches in flight.
_RESERVED_FDS = 64 + 4 * _BACKLOG
_MIN_CAP = 16
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """How long a client may take and how many may be connected at once."""

    max_connections: int = 500
    header_timeout_s: float = 10.0  # from connecting (or the first byte of a keep-alive request)
    body_timeout_s: float = 10.0  # from the end of the headers to the end of the body
    keep_alive_s: float = 5.0  # idle time between requests on one connection
    max_header_bytes: int = 16 * 1024
    log_repeats_per_minute: int = 5
    log_lines_per_logger_per_minute: int = 20  # one logger's lines, however its messages differ


def connection_cap(limits: ServerLimits) -> int:
    """`limits.max_connections`, lowered to what the process's open-file limit leaves room for."""
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - Windows has no descriptor limit to respect
        return limits.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(_MIN_CAP, min(limits.max_connections, soft - _RESERVED_FDS))


def build_server_config(app: Any, *, host: str, port: int, limits: ServerLimits) -> uvicorn.Config:
    """The uvicorn.Config for a public service: bounded reads and connections, no access log (URLs
    hold tokens), no Server header, and logging without tracebacks or floods."""
    protocol = type(
        "GuardedH11Protocol",
        (_GuardedH11Protocol,),
        {"limits": limits, "cap": connection_cap(limits), "opened": {}},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        lifespan="off",
        log_level="warning",
        log_config=_log_config(limits),
        access_log=False,
        server_header=False,
        interface="asgi3",
        backlog=_BACKLOG,
        timeout_keep_alive=max(1, round(limits.keep_alive_s)),
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )


class BoundedLogFilter(logging.Filter):
    """Drops tracebacks, and passes at most `per_minute` records of one message each minute, and at
    most `per_logger` records of one logger: a message worded anew each time (a byte of the request
    in it) is a new message, and a client could otherwise fill the log with them."""

    def __init__(self, per_minute: int = 5, per_logger: int = 20) -> None:
        super().__init__()
        self._per_minute = per_minute
        self._per_logger = per_logger
        self._minute = -1
        self._counts: dict[tuple[str, str], int] = {}
        self._passed: dict[str, int] = {}  # by logger: loggers are named in code, so they are few

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep or drop `record` (minutes counted from the record's own time stamp)."""
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        minute = int(record.created // 60)
        if minute != self._minute:
            self._minute = minute
            self._counts.clear()
            self._passed.clear()
        elif len(self._counts) > 1000:  # many messages: each logger's count still holds them back
            self._counts.clear()
        key = (record.name, str(record.msg))
        count = self._counts[key] = self._counts.get(key, 0) + 1
        passed = self._passed.get(record.name, 0)
        if count > self._per_minute or passed >= self._per_logger:
            return False
        self._passed[record.name] = passed + 1
        if passed + 1 == self._per_logger:
            record.msg = (
                f"{record.getMessage()} (further lines from {record.name} this minute are not logged)"
            )
            record.args = ()
        elif count == self._per_minute:
            record.msg = f"{record.getMessage()} (further copies this minute are not logged)"
            record.args = ()
        return True


def _log_config(limits: ServerLimits) -> dict[str, Any]:
    """uvicorn's logging set-up with the bounded filter on every handler, and the root logger on that
    handler too, so that every library's log (asyncio, python_multipart, psycopg's pool, ours) keeps
    to the same limit."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {
        "bounded": {
            "()": BoundedLogFilter,
            "per_minute": limits.log_repeats_per_minute,
            "per_logger": limits.log_lines_per_logger_per_minute,
        },
    }
    for handler in config["handlers"].values():
        handler["filters"] = ["bounded"]
    # asyncio reports failed accepts (out of descriptors) with a traceback, every time it retries.
    config["loggers"]["asyncio"] = {"handlers": ["default"], "level": "WARNING", "propagate": False}
    # A logger without a handler of its own reaches the root's; with none there, Python's last resort
    # writes every warning to stderr, unbounded (python_multipart logs each bad multipart body).
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a connection cap (set per config by a subclass)."""

    limits: ClassVar[ServerLimits]
    cap: ClassVar[int]
    opened: ClassVar[dict[_GuardedH11Protocol, None]]  # insertion-ordered: oldest first

    _deadline: asyncio.TimerHandle | None = None
    _phase: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        opened = type(self).opened
        opened[self] = None
        if len(opened) > self.cap and not self._make_room():
            opened.pop(self, None)
            transport.write(_BUSY)
            transport.close()
            return
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        type(self).opened.pop(self, None)
        self._set_deadline(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _waiting_on(self) -> str | None:
        """What the connection waits for from its client: "headers", "body", or None (it is answered)."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return "headers"
        return "body" if cycle.more_body else None

    def _watch(self) -> None:
        phase = None if self.transport.is_closing() else self._waiting_on()
        if phase != self._phase:
            self._set_deadline(phase)

    def _set_deadline(self, phase: str | None) -> None:
        """Start the deadline of `phase` (a new phase gets a new deadline; trickling bytes do not)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            delay = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s
            self._deadline = self.loop.call_later(delay, self._drop)

    def _make_room(self) -> bool:
        """Close the oldest other connection still waiting on its client; False if every one is busy."""
        for other in type(self).opened:
            if other is not self and other._phase is not None:
                other._drop()
                return True
        return False

    def _drop(self) -> None:
        type(self).opened.pop(self, None)
        self._set_deadline(None)
        if not self.transport.is_closing():
            self.transport.abort()
