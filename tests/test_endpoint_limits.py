"""`campaign unsubscribe serve` under slow clients (slowloris): deadlines, a connection cap, quiet logs.

The server runs as the real command in a subprocess on loopback, with the common default limit of
1,024 open files, so a flood of half-sent requests meets the limits it would meet in production.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support import wait_until_listening

from campaign.testing import FakeClock
from campaign.unsubscribe import make_token, open_store

SECRET = "endpoint-limits-secret-0123456789"
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = {"content-type": "application/x-www-form-urlencoded"}
SERVER_FILES = 1024  # a common default soft limit (ulimit -n)
SLOW_CLIENTS = 1100


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_FILES, SERVER_FILES))


@contextlib.contextmanager
def _serve(
    store: Path, log: Path, *options: str, service: tuple[str, ...] = ("unsubscribe", "serve")
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CAMPAIGN_UNSUBSCRIBE_SECRET": SECRET, "NYLAS_WEBHOOK_SECRET": "webhook-secret"}
    command = [sys.executable, "-m", "campaign", *service, "--store", str(store)]
    with (
        log.open("wb") as stderr,
        subprocess.Popen(
            [*command, "--port", str(port), *options],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_limit_files,
        ) as process,
    ):
        try:
            wait_until_listening(port, process)
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()


def _open_slow(base: str, count: int, first_bytes: bytes) -> list[socket.socket]:
    """`count` connections that send `first_bytes` of a request and then nothing more.

    Opened from several threads: a connect whose SYN met a full accept queue waits the kernel's
    1 s retransmit, and in parallel those waits overlap instead of adding up.
    """
    host, port = base.removeprefix("http://").split(":")

    def open_one(_: int) -> socket.socket:
        slow = socket.socket()
        slow.settimeout(5)
        # The server may already have closed an older one to make room: that is the point.
        with contextlib.suppress(OSError):
            slow.connect((host, int(port)))
            slow.sendall(first_bytes)
        return slow

    with ThreadPoolExecutor(max_workers=min(count, 32)) as pool:
        return list(pool.map(open_one, range(count)))


def _entries(path: Path) -> list[tuple[str, str, str | None, str]]:
    store = open_store(path, clock=FakeClock(), create=False)
    try:
        return [(e.campaign, e.recipient_key, e.email, e.source) for e in store.entries()]
    finally:
        store.close()


@pytest.fixture(name="enough_files")
def _enough_files() -> None:
    """This process holds 1,100 client sockets: raise its own soft limit as far as the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SLOW_CLIENTS + 200
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the open-file limit ({hard}) is below the {wanted} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.parametrize("service", [("unsubscribe", "serve"), ("serve",)], ids=" ".join)
def test_a_one_click_post_is_recorded_within_a_second_under_1100_half_sent_requests(
    enough_files, tmp_path, service
):
    """1,100 connections stuck in their headers: a real one-click POST still answers 200 within a second,
    the store records it, and the server's log stays a few lines without a traceback (the one-click
    endpoint alone, and `campaign serve`, which adds the webhook receiver)."""
    store, log = tmp_path / "u.sqlite", tmp_path / "server.log"
    token = make_token(
        secrets=[SECRET.encode()], campaign="spring", recipient_key="cust-7", email="ann@example.com"
    )
    with _serve(store, log, service=service) as (base, process):
        slow = _open_slow(base, SLOW_CLIENTS, b"POST /unsubscribe?t=x HTTP/1.1\r\nHost: example.com\r\n")
        try:
            response = httpx.post(
                f"{base}/unsubscribe", params={"t": token}, content=ONE_CLICK, headers=FORM, timeout=1.0
            )
            assert response.status_code == 200
            assert process.poll() is None
        finally:
            for connection in slow:
                connection.close()
    assert _entries(store) == [("spring", "cust-7", "ann@example.com", "one-click")]
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    assert len(text.splitlines()) <= 20, text[:2000]


@pytest.mark.parametrize("service", [("unsubscribe", "serve"), ("serve",)], ids=" ".join)
def test_headers_and_bodies_that_never_finish_are_cut_off(tmp_path, service):
    """With 0.3 s deadlines, a client stuck in its headers and one stuck in its body are disconnected,
    and the server goes on answering."""
    store, log = tmp_path / "u.sqlite", tmp_path / "server.log"
    token = make_token(secrets=[SECRET.encode()], campaign="spring", recipient_key="ann@example.com")
    options = ("--header-timeout", "0.3", "--body-timeout", "0.3")
    with _serve(store, log, *options, service=service) as (base, _):
        (in_headers,) = _open_slow(base, 1, b"POST /u HTTP/1.1\r\nHost: example.com\r\n")
        body_start = (
            f"POST /u?t={token} HTTP/1.1\r\nHost: example.com\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(ONE_CLICK)}\r\n\r\nList-"
        )
        (in_body,) = _open_slow(base, 1, body_start.encode())
        for connection in (in_headers, in_body):
            with connection:
                try:
                    closed = connection.recv(1024) == b""
                except ConnectionResetError:
                    closed = True
                assert closed  # a socket.timeout (5 s) here means the server kept waiting
        response = httpx.post(f"{base}/u", params={"t": token}, content=ONE_CLICK, headers=FORM, timeout=5)
        assert response.status_code == 200
    assert _entries(store) == [("spring", "ann@example.com", "ann@example.com", "one-click")]


@pytest.mark.parametrize("service", [("unsubscribe", "serve"), ("serve",)], ids=" ".join)
def test_a_library_that_words_each_log_message_anew_keeps_to_the_log_limit(tmp_path, service):
    """300 multipart bodies with a bad boundary, each byte different: python_multipart logs a warning
    for each, worded with the byte, through no handler of its own, and Python's last resort wrote all
    300 to stderr. The root logger now has the server's handler and its limit: one logger's lines are
    few a minute (twice that if a minute turns during the flood), and they say the rest were dropped."""
    store, log = tmp_path / "u.sqlite", tmp_path / "server.log"
    token = make_token(secrets=[SECRET.encode()], campaign="spring", recipient_key="ann@example.com")
    with _serve(store, log, service=service) as (base, _), httpx.Client() as client:
        for n in range(300):
            response = client.post(
                f"{base}/unsubscribe/{token}",
                content=bytes([n % 200 + 40]) * 8,
                headers={"content-type": "multipart/form-data; boundary=zz"},
            )
            assert response.status_code == 400
    lines = log.read_text(errors="replace").splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert any("boundary" in line for line in lines)  # logged, through the limit
    assert len(lines) <= 2 * 20, lines[:50]
    assert any("are not logged" in line for line in lines)
    assert _entries(store) == []
