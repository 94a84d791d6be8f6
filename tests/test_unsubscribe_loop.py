"""The suppression loop: unsubscribes POSTed to the endpoint stop later campaigns and pending sends."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import httpx
import pytest
from conftest import SECRET, copy_sample
from support import make_jobs, render_plain

from campaign.dispatch import DispatchEvent, EventKind, dispatch
from campaign.ledger import PlannedRow, open_ledger
from campaign.manifest import SenderSettings
from campaign.models import Address, Recipient, RowState, SendOutcome, SkipReason
from campaign.nylas import NylasClient
from campaign.testing import FakeClock, FakeNylas, serve_on_loopback
from campaign.unsubscribe import StoreEntry, UnsubscribeWatch, open_store, parse_secrets
from campaign.web._unsubscribe import UnsubscribeEndpoint

KEY = "loop-test-key"
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = {"content-type": "application/x-www-form-urlencoded"}


def _https_url(delivery) -> str:
    headers = {h["name"]: h["value"] for h in delivery.payload["custom_headers"]}
    return headers["List-Unsubscribe"].split(",")[0].strip()[1:-1]


def _on(base: str, https_url: str) -> str:
    """The header's https URL, pointed at the endpoint on loopback (same path and query)."""
    parts = urlsplit(https_url)
    return f"{base}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def _with_store(manifest: Path, *, name: str | None = None) -> Path:
    """Add `store = "unsubscribes.sqlite"` to the manifest's [unsubscribe] (and rename the campaign)."""
    text = manifest.read_text(encoding="utf-8")
    text = text.replace('secret_env = "CAMPAIGN_UNSUBSCRIBE_SECRET"', 'store = "unsubscribes.sqlite"')
    if name is not None:
        text = text.replace('name = "spring-newsletter"', f'name = "{name}"')
    manifest.write_text(text, encoding="utf-8")
    return manifest.parent / "unsubscribes.sqlite"


def test_full_loop_unsubscribed_recipients_are_skipped_by_the_next_campaign(api, cli, tmp_path):
    """Send; one-click POST for three recipients; a second campaign on the same store skips exactly them."""
    manifest = copy_sample("newsletter", tmp_path)
    store_path = _with_store(manifest)
    api.add_grant("0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11", "maya@example.com")

    first = cli("run", manifest, "--yes")
    assert first.exit_code == 0, first.output
    delivered = {d.payload["to"][0]["email"]: d for d in api.deliveries}
    assert len(delivered) == 5
    leaving = ["ann.lee@example.com", "bob@example.org", "eve@example.org"]

    store = open_store(store_path, clock=FakeClock())
    endpoint = UnsubscribeEndpoint(store, secrets=parse_secrets(SECRET))
    try:
        with serve_on_loopback(endpoint) as base:
            for email in leaving:
                url = _on(base, _https_url(delivered[email]))
                response = httpx.post(url, content=ONE_CLICK, headers=FORM)
                assert response.status_code == 200
    finally:
        store.close()

    # A second campaign (new name, same list, same store): those three are skipped, the rest are mailed.
    second_manifest = manifest.parent / "second.toml"
    second_manifest.write_text(manifest.read_text().replace("spring-newsletter", "summer-newsletter"))
    before = len(api.deliveries)
    second = cli("run", second_manifest, "--yes")
    assert second.exit_code == 0, second.output
    assert "3 unsubscribed" in second.stdout
    mailed = sorted(d.payload["to"][0]["email"] for d in api.deliveries[before:])
    assert mailed == ["chen.wei@example.net", "dora@example.com"]
    status = json.loads(cli("status", second_manifest, "--json").stdout)
    assert status["skipped"]["unsubscribed"] == 3
    preview = json.loads(cli("preview", second_manifest, "--json").stdout)
    assert preview["skipped"]["unsubscribed"] == 3


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/unsubscribe?id={{ unsubscribe_token }}",
        "https://example.com/u/{{ unsubscribe_token }}/confirm",
        "https://example.com/u/{{ unsubscribe_token }}.html",
    ],
)
def test_a_link_holding_the_token_anywhere_the_manifest_allows_unsubscribes(api, cli, tmp_path, url):
    """The manifest takes unsubscribe.url with the token anywhere, not only in ?t= or the last path
    segment: the link a run sends, in each such shape, shows the confirmation page on GET and
    unsubscribes on the one-click POST (counted in the store)."""
    manifest = copy_sample("newsletter", tmp_path)
    store_path = _with_store(manifest)
    text = manifest.read_text(encoding="utf-8")
    shipped = "https://example.com/unsubscribe?t={{ unsubscribe_token }}"
    assert shipped in text
    manifest.write_text(text.replace(shipped, url), encoding="utf-8")
    api.add_grant("0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11", "maya@example.com")
    sent = cli("run", manifest, "--yes")
    assert sent.exit_code == 0, sent.output
    delivered = {d.payload["to"][0]["email"]: d for d in api.deliveries}
    link = _https_url(delivered["ann.lee@example.com"])
    before, _, after = url.partition("{{ unsubscribe_token }}")
    assert link.startswith(before)
    assert link.endswith(after)

    store = open_store(store_path, clock=FakeClock())
    endpoint = UnsubscribeEndpoint(store, secrets=parse_secrets(SECRET))
    try:
        with serve_on_loopback(endpoint) as base:
            page = httpx.get(_on(base, link))
            assert store.entries() == []  # the page itself changes nothing
            posted = httpx.post(_on(base, link), content=ONE_CLICK, headers=FORM)
        entries = store.entries()
    finally:
        store.close()
    assert page.status_code == 200
    assert "Unsubscribe?" in page.text
    assert posted.status_code == 200
    assert [(e.campaign, e.email, e.source) for e in entries] == [
        ("spring-newsletter", "ann.lee@example.com", "one-click")
    ]


def test_resume_skips_pending_rows_whose_recipients_unsubscribed_since(api, cli, tmp_path):
    """A run stopped by --limit; two unsubscribe before `resume`: resume mails only the others."""
    manifest = copy_sample("newsletter", tmp_path)
    store_path = _with_store(manifest)
    api.add_grant("0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11", "maya@example.com")
    stopped = cli("run", manifest, "--yes", "--limit", "1")
    assert stopped.exit_code == 75, stopped.output
    first = api.deliveries[0].payload["to"][0]["email"]
    pending = [e for e in ["ann.lee@example.com", "bob@example.org", "chen.wei@example.net"] if e != first][
        :2
    ]
    result = cli("suppress", "add", *pending, "--store", store_path)
    assert result.exit_code == 0, result.output
    resumed = cli("resume", manifest, "--yes")
    assert resumed.exit_code == 0, resumed.output
    mailed = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert not set(pending) & set(mailed)
    assert len(mailed) == 5 - len(pending)
    with sqlite3.connect(manifest.parent / "campaign.ledger.sqlite") as db:
        states = dict(
            db.execute("SELECT email, state FROM recipients WHERE email IN (?, ?)", pending).fetchall()
        )
    assert states == dict.fromkeys(pending, "skipped")


# --- mid-run: dispatch with FakeClock -----------------------------------------------------------------------


class _UnsubscribeAfterFirstSend:
    """The real client, plus: after the first send, r3 clicks one-click on the endpoint (in-process ASGI)."""

    def __init__(self, client: NylasClient, endpoint: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._endpoint = endpoint
        self._url = url
        self.sends = 0

    async def send_message(
        self, grant_id: str, payload: Mapping[str, Any], *, idempotency_key: str
    ) -> SendOutcome:
        outcome = await self._client.send_message(grant_id, payload, idempotency_key=idempotency_key)
        self.sends += 1
        if self.sends == 1:
            response = await self._endpoint.post(self._url, content=ONE_CLICK, headers=FORM)
            assert response.status_code == 200
        return outcome


@pytest.mark.anyio
async def test_unsubscribe_posted_mid_run_stops_that_pending_send(tmp_path, store_at):
    """An unsubscribe POSTed after the first of five sends stops r3's send; it is recorded as skipped
    (the endpoint and the watch on one store: a file, or a PostgreSQL database)."""
    from campaign.unsubscribe import make_token

    clock = FakeClock()
    fake = FakeNylas(api_key=KEY, clock=clock)
    sender = SenderSettings(
        name="a", grant_id="grant-a", email="a@corp.example.com", per_second=1, concurrency=1
    )
    fake.add_grant(sender.grant_id, "a@corp.example.com")
    jobs = make_jobs(5)
    ledger = open_ledger(tmp_path / "l.sqlite", clock=clock, campaign="spring")
    ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, "a") for j in jobs], []
    )
    secrets = parse_secrets(SECRET)
    store_path = store_at
    endpoint = UnsubscribeEndpoint(open_store(store_path, clock=clock), secrets=secrets)
    token = make_token(secrets=secrets, campaign="spring", recipient_key="r3@example.com")
    watch = UnsubscribeWatch([store_path], clock=clock, refresh_s=1.0)
    events: list[DispatchEvent] = []

    async def unsubscribed(
        recipient: Recipient,
    ) -> SkipReason | None:  # as a run checks, re-read off the loop
        await watch.reread_when_due()
        return watch.opt_out(recipient)

    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="http://fake.test") as http,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=endpoint.app), base_url="https://example.com"
        ) as web,
    ):
        client = _UnsubscribeAfterFirstSend(NylasClient(http, api_key=KEY, clock=clock), web, f"/u?t={token}")
        result = await dispatch(
            jobs,
            senders=[sender],
            render=render_plain,
            client=client,
            ledger=ledger,
            clock=clock,
            on_event=events.append,
            unsubscribed=unsubscribed,
        )
    watch.close()
    endpoint.store.close()
    assert [d.payload["to"][0]["email"] for d in fake.deliveries] == [
        "r1@example.com",
        "r2@example.com",
        "r4@example.com",
        "r5@example.com",
    ]
    assert (result.sent, result.remaining) == (4, 0)
    rows = {row.key: row for row in ledger.rows()}
    assert rows["r3@example.com"].state == RowState.SKIPPED
    assert (rows["r3@example.com"].reason or "").startswith("unsubscribed:")
    skipped = [event for event in events if event.kind == EventKind.SKIPPED]
    assert [(e.key, e.sender) for e in skipped] == [("r3@example.com", "a")]
    # Honoured within the re-read interval: r2 (sent at t=1 s) still went; r3's turn (t>=2 s) did not.
    assert clock.monotonic() <= 5.0
    ledger.close()


def test_watch_rereads_at_most_once_per_interval(store_at):
    """A new row is seen once `refresh_s` of clock time has passed, not before; a later store is found."""
    clock = FakeClock()
    path = store_at
    watch = UnsubscribeWatch([path], clock=clock, refresh_s=1.0)
    ann = Recipient("ann@example.com", 1, Address("ann@example.com"), {})
    assert watch.is_unsubscribed(ann) is False  # the store does not exist yet
    store = open_store(path, clock=clock)
    store.record("spring", "ann@example.com", source="one-click")
    clock.advance(0.5)
    assert watch.is_unsubscribed(ann) is False  # not re-read yet
    clock.advance(0.5)
    assert watch.is_unsubscribed(ann) is True
    by_address = Recipient("cus-7", 2, Address("Bob@Example.com"), {})
    store.record("", "bob@example.com", source="manual")
    clock.advance(1.0)
    assert watch.is_unsubscribed(by_address) is True  # matched on the address when the key is a customer id
    store.close()
    watch.close()


@pytest.mark.anyio
async def test_a_reread_asked_for_while_one_is_under_way_is_made_after_it(tmp_path, monkeypatch):
    """`reread_next` (the run pulled bounces into the store) while a re-read is in its worker thread, after
    that read's query: the next check re-reads, however recent the last, and finds the new opt-out."""
    clock = FakeClock()
    path = tmp_path / "u.sqlite"
    store = open_store(path, clock=clock)
    watch = UnsubscribeWatch([path], clock=clock, refresh_s=1.0)
    ann = Recipient("ann@example.com", 1, Address("ann@example.com"), {})
    read, reads = UnsubscribeWatch._read_new, []
    has_read, may_return = threading.Event(), threading.Event()

    def read_then_wait(self: UnsubscribeWatch) -> list[StoreEntry]:
        found = read(self)
        reads.append(len(found))
        if len(reads) == 1:
            has_read.set()
            assert may_return.wait(timeout=5)
        return found

    async def record_and_ask_for_a_reread() -> None:
        while not has_read.is_set():
            await anyio.lowlevel.checkpoint()
        store.record("spring", "ann@example.com", source="one-click")
        watch.reread_next()
        may_return.set()

    monkeypatch.setattr(UnsubscribeWatch, "_read_new", read_then_wait)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(record_and_ask_for_a_reread)
            await watch.reread_when_due()
        await watch.reread_when_due()  # no time passed: due only because it was asked for
        assert watch.opt_out(ann) == SkipReason.UNSUBSCRIBED
        assert reads == [0, 1]
        await watch.reread_when_due()
        assert reads == [0, 1]  # asked for once: then once a second again
    finally:
        store.close()
        watch.close()


@pytest.mark.anyio
async def test_a_reread_slower_than_its_interval_is_not_made_again_on_the_event_loop(tmp_path, monkeypatch):
    """A store that takes 3 s to answer (far away, or busy): the check re-reads it once, in a worker
    thread; the answer that follows does not re-read it at once on the loop's thread because a second
    passed meanwhile. The next re-read is a second after this one ended."""
    clock = FakeClock()
    path = tmp_path / "u.sqlite"
    open_store(path, clock=clock).close()
    watch = UnsubscribeWatch([path], clock=clock, refresh_s=1.0)
    ann = Recipient("ann@example.com", 1, Address("ann@example.com"), {})
    read, threads = UnsubscribeWatch._read_new, []

    def slow_read(self: UnsubscribeWatch) -> list[StoreEntry]:
        threads.append(threading.current_thread())
        clock.advance(3.0)
        return read(self)

    monkeypatch.setattr(UnsubscribeWatch, "_read_new", slow_read)
    try:
        await watch.reread_when_due()
        assert watch.opt_out(ann) is None
        assert len(threads) == 1
        assert threads[0] is not threading.current_thread()
        clock.advance(0.9)
        await watch.reread_when_due()
        assert len(threads) == 1
        clock.advance(0.1)
        await watch.reread_when_due()
        assert len(threads) == 2
    finally:
        watch.close()


def test_a_watch_holds_only_what_its_pages_and_the_run_added_not_the_whole_store(store_at):
    """A store of 20,000 opt-outs: the watch reads none of them up front. A page looked up brings in
    only its own recipients' entries; an opt-out recorded while the run goes on is seen at the re-read."""
    clock = FakeClock()
    path = store_at
    store = open_store(path, clock=clock)
    entries = [
        StoreEntry("older", f"p{n}@example.com", f"p{n}@example.com", "2026-01-01T00:00:00Z", "manual")
        for n in range(20_000)
    ]
    store.record_many(entries)
    watch = UnsubscribeWatch([path], clock=clock, refresh_s=1.0)
    page = [Recipient(f"p{n}@example.com", n, Address(f"p{n}@example.com"), {}) for n in (5, 7, 20_005)]
    assert watch.is_unsubscribed(page[0]) is False  # not looked up yet: nothing of the store is held
    assert len(watch._known) == 0
    watch.look_up(page)
    assert len(watch._known) == 2
    assert [watch.is_unsubscribed(recipient) for recipient in page] == [True, True, False]
    store.record("now", "p20005@example.com", source="one-click")
    clock.advance(1.0)
    assert watch.is_unsubscribed(page[2]) is True
    assert len(watch._known) == 3
    store.close()
    watch.close()


@pytest.mark.anyio
async def test_an_opt_out_while_a_claim_waits_for_its_pace_slot_stops_that_send(tmp_path):
    """At 1 a minute, r2 is claimed right after r1 and waits a minute for its slot; r2 unsubscribes 30 s
    into that wait. The check before the claim found nothing, so the one after the wait must: r2's
    unused key goes back and the row is skipped, nothing sent (counted at the fake)."""
    clock = FakeClock()
    fake = FakeNylas(api_key=KEY, clock=clock)
    sender = SenderSettings(
        name="a", grant_id="grant-a", email="a@corp.example.com", per_minute=1, concurrency=1
    )
    fake.add_grant(sender.grant_id, "a@corp.example.com")
    jobs = make_jobs(2)
    ledger = open_ledger(tmp_path / "l.sqlite", clock=clock, campaign="spring")
    ledger.record_plan(
        [PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, "a") for j in jobs], []
    )
    checked_at: list[float] = []

    async def unsubscribed(recipient: Recipient) -> SkipReason | None:
        checked_at.append(clock.monotonic())
        opted_out = recipient.key == "r2@example.com" and clock.monotonic() >= 30
        return SkipReason.UNSUBSCRIBED if opted_out else None

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fake.app), base_url="http://f.test"
    ) as http:
        result = await dispatch(
            jobs,
            senders=[sender],
            render=render_plain,
            client=NylasClient(http, api_key=KEY, clock=clock),
            ledger=ledger,
            clock=clock,
            unsubscribed=unsubscribed,
        )
    assert [d.payload["to"][0]["email"] for d in fake.deliveries] == ["r1@example.com"]
    assert min(at for at in checked_at if at > 0) >= 59  # r2 was checked again after its minute's wait
    row = {row.key: row for row in ledger.rows()}["r2@example.com"]
    assert row.state == RowState.SKIPPED
    assert (row.reason or "").startswith("unsubscribed:")
    assert (result.sent, result.remaining) == (1, 0)
    ledger.close()
