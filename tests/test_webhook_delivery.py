"""Webhook delivery end to end: the fake Nylas delivering (and retrying) to a real `campaign serve` app.

Nylas delivers at least once (reference/next-capabilities.md §2.4): a notification comes again after an
answer of 408, 429, 502, 503, 504 or 507, or none within 10 s (3 tries in all, the last 15 min after the
first in the fake), and duplicates come besides; any other status is final. So the receiver must keep
each notification once per envelope id, answer 503 (never 200, never 500) when the store cannot take it,
and refuse a delivery it cannot verify with a status that is not retried. What came is counted where it
is kept: the store on disk (SQLite, then PostgreSQL: `store_at`), and what the fake was answered (a retry
pending or not). Time is the fake's clock; a store "down" is another writer really holding its lock.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, SECRET, copy_sample, serve_fake
from support import serve_events, short_store_waits, store_held

import campaign.testing.webhooks as webhooks_module
from campaign.clock import Clock
from campaign.events import sign_body
from campaign.manifest import load_manifest
from campaign.testing import FakeNylas
from campaign.testing.bounces import build_dsn
from campaign.unsubscribe import BounceRules, StoreError, SuppressionStore

WEBHOOK_SECRET = b"nylas-webhook-secret-for-delivery-tests"
BOUNCE = "message.bounce_detected"
BOB = "bob@example.com"
DAY_S = 86_400


@pytest.fixture(name="nylas")
def _nylas(_loopback, cli_clock, monkeypatch) -> Iterator[FakeNylas]:
    """The fake Nylas on the CLI's clock (retries come due as it advances), served for the CLI too."""
    yield from serve_fake(_loopback, FakeNylas(api_key=API_KEY, clock=cli_clock), monkeypatch)


def soft_bounce(clock: Clock, address: str, *, message_id: str = "msg-1") -> dict[str, Any]:
    """A `message.bounce_detected` object for a mailbox full now (4xx: soft)."""
    return {
        "bounce_reason": "Mailbox full",
        "bounce_date": format_datetime(clock.now()),
        "bounced_addresses": address,
        "type": "mailbox_full",
        "code": "452",
        "origin": {"id": message_id, "to": [{"email": address}], "subject": "Hi"},
        "message_id": message_id,
    }


def kept_attempts(store: SuppressionStore, kind: str) -> list[int]:
    """The `webhook_delivery_attempt` of each notification of `kind` the store kept, as it kept it."""
    return [
        int(json.loads(body)["webhook_delivery_attempt"]) for _, body, _ in store._sql.events_since(kind, 0)
    ]


def events_served(where: Path | str, clock: Clock) -> Any:
    return serve_events(where, clock, webhook_secret=WEBHOOK_SECRET, unsubscribe_secret=SECRET)


def suppressed(store: SuppressionStore) -> list[tuple[str, str]]:
    return [(entry.recipient_key, entry.source) for entry in store.entries()]


def test_a_soft_bounce_the_store_could_not_take_is_answered_503_and_kept_once_from_the_retry(
    nylas, cli_clock, store_at, monkeypatch
):
    """Another writer holds the store: both copies of the first try and of the second are answered 503
    (the fake keeps a retry pending, as it would not after a 500), nothing is kept; once the store is
    free, the third try (and its duplicate) is kept once. With a rule of 2 soft bounces, that one bounce
    delivered six times suppresses nobody; a second bounce of the address does."""
    short_store_waits(monkeypatch)
    with events_served(store_at, cli_clock) as (store, url):
        store.set_bounce_rules(BounceRules(limit=2, days=30))
        nylas.add_webhook(url, WEBHOOK_SECRET, [BOUNCE])
        nylas.duplicate_webhooks = True
        with store_held(store_at):
            nylas.queue_notification(BOUNCE, "grant-1", soft_bounce(cli_clock, BOB))
            assert nylas.deliver_webhooks() == 2
            assert (nylas.pending_webhooks, store.event_count()) == (1, 0)
            cli_clock.advance(300)
            assert nylas.deliver_webhooks() == 2
            assert (nylas.pending_webhooks, store.event_count()) == (1, 0)
        cli_clock.advance(600)
        assert nylas.deliver_webhooks() == 2
        assert nylas.pending_webhooks == 0  # answered 200: nothing more to retry
        assert kept_attempts(store, BOUNCE) == [3]
        assert [b.email for b in store.bounces(BOB)] == [BOB]
        assert suppressed(store) == []
        cli_clock.advance(DAY_S)
        nylas.queue_notification(BOUNCE, "grant-1", soft_bounce(cli_clock, BOB, message_id="msg-2"))
        assert nylas.deliver_webhooks() == 2
        assert len(store.bounces(BOB)) == 2
        assert suppressed(store) == [(BOB, "bounce")]


def test_a_notification_kept_after_nylas_stopped_waiting_is_kept_once_when_it_comes_again(
    nylas, cli_clock, store_at, monkeypatch
):
    """The store is slow (another writer holds it for longer than Nylas waits): the fake gives up on the
    first try and will retry, while the write goes on and is kept once the store is free. The retry (and
    its duplicate) then finds it kept: answered 200, nothing kept twice, the soft bounce counted once."""
    monkeypatch.setattr(webhooks_module, "DELIVERY_TIMEOUT_S", 0.5)  # Nylas's 10 s, shortened
    with events_served(store_at, cli_clock) as (store, url):
        store.set_bounce_rules(BounceRules(limit=2, days=30))
        nylas.add_webhook(url, WEBHOOK_SECRET, [BOUNCE])
        settled = threading.Event()
        keep = store.record_event

        def record_event(*args: Any, **kwargs: Any) -> bool:
            try:
                return keep(*args, **kwargs)
            finally:
                settled.set()

        monkeypatch.setattr(store, "record_event", record_event)
        with store_held(store_at):
            nylas.queue_notification(BOUNCE, "grant-1", soft_bounce(cli_clock, BOB))
            assert nylas.deliver_webhooks() == 1
            assert nylas.pending_webhooks == 1  # no answer within the timeout: to be tried again
        assert settled.wait(10)
        assert kept_attempts(store, BOUNCE) == [1]  # the first try was kept after all
        cli_clock.advance(300)
        nylas.duplicate_webhooks = True
        assert nylas.deliver_webhooks() == 2
        assert nylas.pending_webhooks == 0
        assert kept_attempts(store, BOUNCE) == [1]
        assert len(store.bounces(BOB)) == 1
        assert suppressed(store) == []


def test_a_delivery_signed_with_another_secret_is_refused_keeps_nothing_and_is_not_retried(
    nylas, cli_clock, store_at
):
    """A webhook whose secret is not the one `campaign serve` holds (rotated, or a forger): 401, nothing
    kept, and no retry: Nylas retries only 408, 429 and 502-507, so a refusal is not asked again (a
    503 would have Nylas try twice more, as for a store that is down). Unsigned, likewise."""
    with events_served(store_at, cli_clock) as (store, url):
        nylas.add_webhook(url, b"a-secret-campaign-serve-does-not-hold", [BOUNCE])
        nylas.queue_notification(BOUNCE, "grant-1", soft_bounce(cli_clock, BOB))
        assert nylas.deliver_webhooks() == 1
        assert nylas.pending_webhooks == 0
        cli_clock.advance(3600)
        assert nylas.deliver_webhooks() == 0
        body = json.dumps({"id": "forged", "type": BOUNCE, "data": {"object": {}}}).encode()
        unsigned = httpx.post(url, content=body, headers={"content-type": "application/json"})
        forged = httpx.post(url, content=body, headers={"x-nylas-signature": sign_body(body, b"guess")})
        assert (unsigned.status_code, forged.status_code) == (401, 401)
        assert (store.event_count(), store.bounces(BOB), store.entries()) == (0, [], [])


def _campaign_reading(store: Path | str, tmp_path: Path, nylas: FakeNylas) -> tuple[Path, str, str]:
    """The newsletter sample recording into `store` (its suppression list), its sender a grant of the
    fake: (manifest, grant id, mailbox)."""
    manifest = copy_sample("newsletter", tmp_path)
    lists = 'suppress = ["unsubscribed.txt"'
    manifest.write_text(manifest.read_text().replace(lists, f'{lists}, "{store}"'))
    (sender,) = load_manifest(manifest).senders
    assert sender.grant_id is not None
    assert sender.email is not None
    nylas.add_grant(sender.grant_id, sender.email)
    return manifest, sender.grant_id, sender.email


@pytest.mark.parametrize("first", ["webhook", "pull"])
def test_a_soft_bounce_seen_by_webhook_and_by_events_pull_counts_once(
    nylas, cli, cli_clock, tmp_path, store_at, monkeypatch, first
):
    """One soft bounce: its report lands in the sender's inbox and Nylas notifies it. The webhook comes
    (503 first, the store held, then the retry and a duplicate) and `events pull` reads the report (twice),
    in either order: one bounce per channel is kept, and with a rule of 2 nobody is suppressed; a second
    bounce of the address, found by a pull only, reaches the rule."""
    short_store_waits(monkeypatch)
    manifest, grant, mailbox = _campaign_reading(store_at, tmp_path, nylas)
    assert cli("run", manifest, "--yes").exit_code == 0
    sent = nylas.deliveries[0]
    address = str(sent.payload["to"][0]["email"])
    subject = str(sent.payload["subject"])

    def report() -> bytes:
        return build_dsn(address, mailbox=mailbox, subject=subject, at=cli_clock.now(), permanent=False)

    def pull() -> None:
        for _ in range(2):
            pulled = cli("events", "pull", manifest)
            assert pulled.exit_code == 0, pulled.output

    with events_served(store_at, cli_clock) as (store, url):
        store.set_bounce_rules(BounceRules(limit=2, days=30))
        nylas.add_webhook(url, WEBHOOK_SECRET, [BOUNCE])
        cli_clock.advance(60)
        nylas.receive_message(grant, report())
        nylas.queue_notification(BOUNCE, grant, soft_bounce(cli_clock, address, message_id=sent.id))
        if first == "pull":
            pull()
        with store_held(store_at):
            assert nylas.deliver_webhooks() == 1
        cli_clock.advance(300)
        nylas.duplicate_webhooks = True
        assert nylas.deliver_webhooks() == 2
        assert nylas.pending_webhooks == 0
        if first == "webhook":
            pull()
        assert [b.hard for b in store.bounces(address)] == [False, False]  # the webhook's, the report's
        assert store.event_count() == 2
        assert suppressed(store) == []
        cli_clock.advance(DAY_S)
        nylas.receive_message(grant, report())
        pull()
        assert len(store.bounces(address)) == 3
        assert suppressed(store) == [(address, "bounce")]


def on_disk(where: Path) -> int:
    """How many notifications the store file holds, committed, read by a connection of its own."""
    with contextlib.closing(sqlite3.connect(where)) as reader:
        (count,) = reader.execute("SELECT COUNT(*) FROM events").fetchone()
    return int(count)


def test_a_full_disk_is_the_store_error_it_is_and_the_retry_is_kept_once_there_is_room(
    nylas, cli_clock, tmp_path
):
    """SQLite answers "database or disk is full" and rolls the transaction back itself: the store's own
    rollback then failed ("no transaction is active"), and that raw error, naming another cause, left the
    store instead of its StoreError. The webhook is answered 503 (retried); once there is room, the retry
    is kept. The file is kept from growing (max_page_count) as a full disk keeps it."""
    where = tmp_path / "store.sqlite"
    with events_served(where, cli_clock) as (store, url):
        nylas.add_webhook(url, WEBHOOK_SECRET, [BOUNCE])
        connection = store._sql._db
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        connection.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(
            StoreError, match=r"cannot write the unsubscribe store \(database or disk is full\)"
        ):
            store.record_event("direct", BOUNCE, grant_id="g", body="x" * 50_000)
        big = {**soft_bounce(cli_clock, BOB), "snippet": "x" * 50_000}
        nylas.queue_notification(BOUNCE, "grant-1", big)
        assert nylas.deliver_webhooks() == 1
        assert (nylas.pending_webhooks, on_disk(where)) == (1, 0)
        connection.execute("PRAGMA max_page_count = 1073741823")
        cli_clock.advance(300)
        assert nylas.deliver_webhooks() == 1
        assert (nylas.pending_webhooks, on_disk(where)) == (0, 1)
        assert len(store.bounces(BOB)) == 1


def test_a_commit_that_failed_leaves_no_transaction_open_and_the_retry_is_kept(
    nylas, cli_clock, tmp_path, monkeypatch
):
    """A commit can fail (busy, disk full, I/O) and leave the transaction open: the store's connection then
    kept it, holding the file's write lock and showing its own reads a notification never committed, and
    every later write failed ("cannot start a transaction within a transaction"): Nylas's retries were all
    answered 503 and the notification lost. Now the failed transaction is rolled back and the retry kept.
    A commit fails here as in a store without WAL (a network file system): with a rollback journal it
    waits for a reader to finish, and gives up after the busy timeout."""
    short_store_waits(monkeypatch)
    where = tmp_path / "store.sqlite"
    with events_served(where, cli_clock) as (store, url):
        nylas.add_webhook(url, WEBHOOK_SECRET, [BOUNCE])
        assert store._sql._db.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
        with contextlib.closing(sqlite3.connect(where, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM events").fetchone()
            nylas.queue_notification(BOUNCE, "grant-1", soft_bounce(cli_clock, BOB))
            assert nylas.deliver_webhooks() == 1
            assert nylas.pending_webhooks == 1
            reader.execute("COMMIT")
        assert (on_disk(where), store.event_count()) == (0, 0)
        cli_clock.advance(300)
        assert nylas.deliver_webhooks() == 1
        assert nylas.pending_webhooks == 0
        assert (on_disk(where), store.event_count()) == (1, 1)
        assert kept_attempts(store, BOUNCE) == [2]
