"""Serving a `FakeNylas` over real HTTP: on a loopback port for tests, or in the foreground for the sandbox.

`serve_on_loopback` runs uvicorn in a daemon thread on 127.0.0.1 with a free port
and stops it on exit; `run_sandbox_server` blocks until Ctrl-C. Neither touches the
fake's state; the fake locks its own state against the server thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import uvicorn
from starlette.types import ASGIApp

from campaign.collector import collecting_less, old_objects_frozen
from campaign.testing.records import FakeConnectionReset

__all__ = ["HasApp", "run_sandbox_server", "serve_on_loopback"]

START_POLLS = 1000  # x 10 ms: give up when the server has not started within ~10 s
POLL_S = 0.01
STOP_WAIT_S = 5.0


class HasApp(Protocol):
    """Anything with an ASGI `app`: a `FakeNylas`, or a test's own switch in front of several."""

    @property
    def app(self) -> ASGIApp:
        """The ASGI application to serve."""
        ...


class _HideScriptedResets(logging.Filter):
    """Drop uvicorn's traceback for a connection the fake drops on purpose (Fault.RESET)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], FakeConnectionReset))


@contextmanager
def _reset_log_filter() -> Iterator[None]:
    logger = logging.getLogger("uvicorn.error")
    hide = _HideScriptedResets()
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)


def listen_on_loopback() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1, for uvicorn to listen on.

    Its protocol is named (IPPROTO_TCP), not left 0: asyncio turns Nagle off (TCP_NODELAY) only on
    connections accepted from such a socket. Without it, an answer written in two parts (head, body)
    waits for the client's delayed ACK, 40 ms on Linux, on every request of a kept-alive connection.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve_on_loopback(fake: HasApp) -> Iterator[str]:
    """Serve `fake.app` on 127.0.0.1 (free port) in a daemon thread; yield its base URL."""
    sock = listen_on_loopback()
    port = sock.getsockname()[1]
    config = uvicorn.Config(fake.app, lifespan="off", log_level="warning", interface="asgi3")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-nylas")
    with _reset_log_filter():
        thread.start()
        try:
            for _ in range(START_POLLS):
                if server.started or not thread.is_alive():
                    break
                # join() with a timeout is the wait: it also notices a server that died.
                thread.join(POLL_S)
            if not server.started:
                raise RuntimeError("the fake Nylas server did not start on 127.0.0.1")
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(STOP_WAIT_S)
            sock.close()


def run_sandbox_server(
    fake: HasApp, *, host: str, port: int, every_second: Callable[[], object] | None = None
) -> None:
    """Serve `fake.app` on host:port in the foreground until Ctrl-C; `every_second` runs on a thread
    (the sandbox delivers its queued webhooks with it)."""
    config = uvicorn.Config(
        fake.app, host=host, port=port, lifespan="off", log_level="warning", interface="asgi3"
    )
    server = uvicorn.Server(config)
    if every_second is not None:
        task = every_second

        def tick() -> None:
            while not server.should_exit:
                # deliver_webhooks keeps what a receiver that is down did not take; whatever else
                # goes wrong, the next second tries again.
                with contextlib.suppress(Exception):
                    task()
                threading.Event().wait(1.0)

        threading.Thread(target=tick, daemon=True, name="sandbox-webhooks").start()
    # Every request in flight lives for its latency: with the collector at its default pace each
    # would reach the oldest generation, and full passes would take two fifths of the fake's CPU.
    with _reset_log_filter(), old_objects_frozen(), collecting_less():
        server.run()
