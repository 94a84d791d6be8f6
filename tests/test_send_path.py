"""The send path's lean parts: cached send URLs, sleeps without a task per wait, orjson, and the whole loop
over the real default transport on loopback, faults included.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from support import make_jobs, render_plain, run_inline

from campaign.clock import SystemClock
from campaign.dispatch import DispatchSettings, dispatch
from campaign.dispatch._tasks import Stopper
from campaign.ledger import PlannedRow, open_ledger
from campaign.manifest import SenderSettings
from campaign.models import RowState
from campaign.nylas import NylasClient, build_http_client, encode_send_body
from campaign.nylas._answers import answer_text, parse_json_object
from campaign.reconcile import reconcile_unknown
from campaign.testing import FakeClock, FakeNylas, Fault, serve_on_loopback

KEY = "nyk_send_path_key_0123456789"
PAYLOAD = {"to": [{"email": "ann@example.com"}], "subject": "Hi", "body": "<p>Hi</p>"}
REPO = Path(__file__).resolve().parent.parent

# The in-process fake lists a message as soon as it is sent: no settle time is needed here.
NO_SETTLE_TIME = timedelta(0)


# ---------------------------------------------------------------------------------------------- URLs


@pytest.mark.anyio
async def test_sends_post_to_one_cached_absolute_url_per_grant_or_domain():
    """httpx is handed the same absolute URL object each time, so it never parses or merges a path again."""
    seen: list[httpx.Request] = []
    transport = httpx.MockTransport(
        lambda r: seen.append(r) or httpx.Response(200, json={"data": {"id": "m"}})
    )
    async with build_http_client(base_url="https://api.test/base", timeout_s=5, transport=transport) as http:
        urls: list[object] = []
        build = http.build_request

        def recording_build(method: str, url: object, **options: object) -> httpx.Request:
            urls.append(url)
            return build(method, url, **options)  # type: ignore[arg-type]

        http.build_request = recording_build  # type: ignore[method-assign]
        client = NylasClient(http, api_key=KEY, clock=SystemClock())
        for key in ("k1", "k2"):
            await client.send_message("g/1", PAYLOAD, idempotency_key=key)
        await client.send_message("g2", PAYLOAD, idempotency_key="k3")
        await client.send_domain_message("mail.example.com", PAYLOAD, idempotency_key="k4")
    assert all(isinstance(url, httpx.URL) and url.is_absolute_url for url in urls)
    assert urls[0] is urls[1]
    assert urls[2] is not urls[0]
    assert [r.url.raw_path for r in seen] == [
        b"/base/v3/grants/g%2F1/messages/send?fields=include_basic_headers",
        b"/base/v3/grants/g%2F1/messages/send?fields=include_basic_headers",
        b"/base/v3/grants/g2/messages/send?fields=include_basic_headers",
        b"/base/v3/domains/mail.example.com/messages/send",
    ]
    assert {str(r.url.copy_with(raw_path=b"/")) for r in seen} == {"https://api.test/"}


# ---------------------------------------------------------------------------------------------- sleeps


@pytest.mark.anyio
async def test_a_wait_of_nothing_returns_at_once_without_the_clock():
    """The pacing wait before a send is usually zero or less: no sleep, no yield, nothing recorded."""
    clock = FakeClock()
    for event in (None, anyio.Event()):
        stopper = Stopper(event, clock=clock)
        await stopper.sleep(0)
        await stopper.sleep(-0.25)
    assert clock.sleeps == []
    assert clock.monotonic() == 0


@pytest.mark.anyio
async def test_a_sleep_waits_on_the_clock_and_a_stop_ends_it_early_without_a_task_per_sleep():
    """A stop request wakes the sleeper at once (virtual time unmoved); a sleep starts no task of its own."""
    clock = FakeClock()
    stop = anyio.Event()
    stopper = Stopper(stop, clock=clock)
    await stopper.sleep(2.5)
    assert (clock.monotonic(), clock.sleeps) == (2.5, [2.5])
    tasks_while_sleeping: list[int] = []

    async def request_stop() -> None:
        await anyio.lowlevel.checkpoint()
        tasks_while_sleeping.append(len(asyncio.all_tasks()))
        stop.set()

    async with anyio.create_task_group() as group:
        group.start_soon(request_stop)
        before = len(asyncio.all_tasks())
        await stopper.sleep(1000)
    assert clock.monotonic() == 2.5  # woken by the stop, not by the deadline
    assert tasks_while_sleeping == [before]  # the sleeper and the stopper: no watcher task
    await stopper.sleep(1000)  # once a stop is requested, sleeps end at once
    assert clock.monotonic() == 2.5
    assert stopper.requested


@pytest.mark.anyio
async def test_the_clocks_wait_for_an_event_with_a_deadline():
    """Clock.wait_for: True as soon as the event is set, False at the deadline (virtual and real time)."""
    fake = FakeClock()
    event = anyio.Event()
    assert await fake.wait_for(event, 30) is False
    assert fake.monotonic() == 30
    event.set()
    assert await fake.wait_for(event, 30) is True
    assert fake.monotonic() == 30
    real = SystemClock()
    assert await real.wait_for(event, 5) is True  # set: no waiting
    with anyio.fail_after(5):
        assert await real.wait_for(anyio.Event(), 0) is False


# ---------------------------------------------------------------------------------------------- JSON


def test_the_send_path_libraries_are_required_dependencies_not_optional_extras():
    """The speed of the send path relies on aiohttp and orjson: they are plain dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=\[ ;]", spec, maxsplit=1)[0] for spec in project["dependencies"]}
    assert {"aiohttp", "orjson"} <= names


def test_request_bodies_are_compact_utf8_json_and_only_json_objects_are_answers():
    """Bodies are compact UTF-8 JSON (the stdlib's compact form, byte for byte); answers are JSON objects."""
    payload = {"to": [{"email": "zoë@example.com"}], "subject": "Café \u2028", "body": "<p>x</p>", "n": 1}
    assert encode_send_body(payload) == orjson.dumps(payload)
    assert parse_json_object('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert parse_json_object("[1, 2]") is None
    assert parse_json_object("<html>502</html>") is None
    assert parse_json_object("") is None
    assert parse_json_object("NaN") is None  # orjson: strict JSON only


@pytest.mark.parametrize(
    ("content_type", "body", "text"),
    [
        ("application/json", '{"a": "zoë"}'.encode(), '{"a": "zoë"}'),
        (None, b"\xff{}", "\ufffd{}"),
        ("text/html; charset=iso-8859-1", "<p>café</p>".encode("latin-1"), "<p>café</p>"),
        ("text/html; Charset=UTF-8", "<p>café</p>".encode(), "<p>café</p>"),
    ],
)
def test_answer_text_decodes_as_httpx_would(content_type, body, text):
    """UTF-8 (bad bytes replaced) unless Content-Type names a charset, exactly as `Response.text`."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.Response(200, headers=headers, content=body)
    assert answer_text(response) == text == response.text


# ---------------------------------------------------------------------------------------------- the loop


@pytest.mark.anyio
@pytest.mark.parametrize("stock", [False, True], ids=["default-transport", "stock-httpx"])
async def test_the_send_loop_over_loopback_mails_everyone_once_through_every_fault(tmp_path, stock):
    """dispatch + reconcile over a real socket: resets, timeouts, 5xx and 429s; each recipient mailed once."""
    fake = FakeNylas(api_key=KEY)
    senders = [
        SenderSettings(
            name=name,
            grant_id=f"grant-{name}",
            email=f"{name}@corp.example.com",
            per_second=50,
            concurrency=3,
        )
        for name in ("a", "b")
    ]
    for sender in senders:
        fake.add_grant(sender.grant_id or "", sender.email or "")
    for fault, times in [
        (Fault.RESET, 2),
        (Fault.RESET_AFTER_SEND, 2),
        (Fault.TIMEOUT_AFTER_SEND, 2),
        (Fault.INTERNAL_ERROR, 1),
        (Fault.BAD_GATEWAY, 1),
        (Fault.UNAVAILABLE, 1),
        (Fault.NYLAS_RATE_LIMIT, 2),
        (Fault.PROVIDER_THROTTLE, 1),
    ]:
        fake.script(fault, times=times, retry_after_s=1)
    # The loop's waits (backoff, holds) pass in virtual time. (So no SLOW fault here: its 409 "in
    # progress" waits would end in virtual time while the fake still works on the first request
    # in real time; timeouts are covered in test_transport.)
    clock = FakeClock()
    ledger = open_ledger(tmp_path / "ledger.sqlite", clock=clock, campaign="test")
    jobs = make_jobs(12, "a") + make_jobs(12, "b", start=100)
    ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.key, j.sender) for j in jobs], []
    )
    settings = DispatchSettings(retry_base_s=0.5)
    transport = httpx.AsyncHTTPTransport() if stock else None
    with serve_on_loopback(fake) as url:
        async with build_http_client(base_url=url, timeout_s=0.5, transport=transport) as http:
            client = NylasClient(http, api_key=KEY, clock=clock)
            for _ in range(3):  # run, reconcile what is unknown, run again
                open_rows = {r.key for r in ledger.rows(states=(RowState.PENDING, RowState.INFLIGHT))}
                await dispatch(
                    [j for j in jobs if j.recipient.key in open_rows],
                    senders=senders,
                    render=render_plain,
                    client=client,
                    ledger=ledger,
                    clock=clock,
                    settings=settings,
                    offload=run_inline,
                )
                await reconcile_unknown(
                    ledger,
                    campaign="test",
                    senders=senders,
                    client=client,
                    clock=clock,
                    min_age=NO_SETTLE_TIME,
                )
    delivered = Counter(d.payload["to"][0]["email"] for d in fake.deliveries)
    assert sorted(delivered) == sorted(j.recipient.key for j in jobs)
    assert set(delivered.values()) == {1}
    assert {row.state for row in ledger.rows()} == {RowState.SENT}
    assert any(r.status == 0 for r in fake.requests)  # the resets did happen
