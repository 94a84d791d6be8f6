"""The unsubscribe store in PostgreSQL: opt-outs shared by several machines.

Against a real PostgreSQL (tests/pgstore.py: a fresh database for the session, an empty store for
each test). The behaviour both backends share is tested over both where the SQLite tests are
(`store_at` in test_suppression, test_events, test_endpoint, test_unsubscribe_loop); here is what
only a shared database has: two processes and two store objects on their own connections, readers
paging by id while writers commit, the schema kept beside others in one database and versioned,
the URL in the manifest and on the command line (never with a password), its errors, and a
campaign run end to end against the fake Nylas.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from conftest import SECRET, copy_sample
from pgstore import execute
from support import tcp_keepalive, wait_until_listening
from test_endpoint import SECRET as ENDPOINT_SECRET
from test_endpoint import _token
from test_events import WEBHOOK_SECRET, _bounce, _signed
from test_unsubscribe_loop import FORM, ONE_CLICK, _https_url, _on

from campaign.errors import InputFileError, ManifestError
from campaign.manifest._load import parse_manifest
from campaign.models import Address, Recipient, SkipReason
from campaign.testing import FakeClock, serve_on_loopback
from campaign.unsubscribe import (
    BounceRecord,
    StoreError,
    UnsubscribeWatch,
    list_store_paths,
    open_store,
    store_exists,
)
from campaign.unsubscribe import _pgstore as pgstore_module
from campaign.web import EventService, UnsubscribeEndpoint, load_endpoint

GRANT = "0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11"
PASSWORD = "pg-Secret-never-shown-4711"


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _elsewhere(url: str, *, user: str | None = None, port: int | None = None) -> str:
    """`url` with another user or port (the same database name)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user or parts.username}@{host}:{port or parts.port or 5432}"
    return parts._replace(netloc=netloc).geturl()


def _mailed(api) -> list[str]:
    return sorted(d.payload["to"][0]["email"] for d in api.deliveries)


# --- several machines: one database, many connections ------------------------------------------------------


def test_two_stores_on_their_own_connections_see_each_others_opt_outs(pg_store_url):
    """The endpoint on one machine and a campaign on another: what either records, the other finds."""
    clock = FakeClock()
    endpoint_side = open_store(pg_store_url, clock=clock)
    campaign_side = open_store(pg_store_url, clock=clock)
    watch = UnsubscribeWatch([pg_store_url], clock=clock, refresh_s=1.0)
    try:
        ann = Recipient("ann@example.com", 1, Address("ann@example.com"), {})
        assert watch.opt_out(ann) is None
        assert endpoint_side.record("spring", "ann@example.com", source="one-click") is True
        assert campaign_side.record("spring", "ann@example.com", source="page") is False  # already there
        assert [e.recipient_key for e in campaign_side.entries_for(["ann@example.com"], [])] == [
            "ann@example.com"
        ]
        clock.advance(1.0)
        assert watch.opt_out(ann) == SkipReason.UNSUBSCRIBED  # a running campaign's re-read
        campaign_side.record("", "cus-7", email="Bob@Example.com", source="manual")
        found = endpoint_side.find("", "cus-7")
        assert found is not None
        assert found.email == "bob@example.com"
        sessions = execute(
            pg_store_url,
            "SELECT COUNT(DISTINCT pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'campaign unsubscribe store'",
        )
        assert sessions[0][0] >= 2  # each store on connections of its own
    finally:
        watch.close()
        endpoint_side.close()
        campaign_side.close()


def test_an_opt_out_recorded_by_another_process_reaches_a_running_watch(pg_store_url):
    """`campaign suppress add --store URL` in a process of its own; this process's watch (begun before)
    sees it at its next re-read, and `suppress list` in a third process lists it."""
    clock = FakeClock()
    open_store(pg_store_url, clock=clock).close()  # the store exists: the watch reads only what comes
    watch = UnsubscribeWatch([pg_store_url], clock=clock, refresh_s=1.0)
    eve = Recipient("eve@example.org", 4, Address("eve@example.org"), {})
    try:
        assert watch.opt_out(eve) is None
        command = [sys.executable, "-m", "campaign", "suppress", "add", "Eve@Example.org", "--store"]
        added = subprocess.run([*command, pg_store_url], capture_output=True, text=True, check=False)
        assert added.returncode == 0, added.stderr
        assert "1 added" in added.stdout
        clock.advance(1.0)
        assert watch.opt_out(eve) == SkipReason.UNSUBSCRIBED
    finally:
        watch.close()
    listed = subprocess.run(
        [sys.executable, "-m", "campaign", "suppress", "list", "--json", "--store", pg_store_url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [(r["email"], r["source"]) for r in json.loads(listed.stdout)] == [("eve@example.org", "manual")]


def test_a_reader_paging_by_id_never_misses_a_write_that_commits_late(pg_store_url):
    """Writer A holds its transaction open; writer B waits for it (as SQLite's writers do), so B's id
    never becomes visible before A's: a reader that read past B would never see A."""
    first = open_store(pg_store_url, clock=FakeClock())
    second = open_store(pg_store_url, clock=FakeClock())
    reader = open_store(pg_store_url, clock=FakeClock())
    done = threading.Event()

    def record_b() -> None:
        second.record("spring", "b@example.com", source="one-click")
        done.set()

    try:
        with first._sql.write() as writes:  # A: written, not committed yet
            writes.add_entries(
                [("spring", "a@example.com", "a@example.com", "2026-01-05T09:00:00", "one-click")]
            )
            thread = threading.Thread(target=record_b)
            thread.start()
            assert not done.wait(0.5)  # B waits for A
            last, seen = reader.read_since(0)
            assert seen == []
        thread.join(10)
        assert done.is_set()
        newest, later = reader.read_since(last)
        assert [e.recipient_key for e in seen + later] == ["a@example.com", "b@example.com"]
        assert reader.newest_id() == newest
    finally:
        first.close()
        second.close()
        reader.close()


def test_many_processes_opening_a_new_store_at_once_set_it_up_once(pg_store_url):
    """Eight opens racing on an empty database: all succeed, the schema is made once (one migration)."""
    errors: list[BaseException] = []
    stores = []

    def open_one() -> None:
        try:
            stores.append(open_store(pg_store_url, clock=FakeClock()))
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []
    assert execute(pg_store_url, "SELECT version FROM campaign_store.schema_migrations") == [(1,)]


# --- the schema: versioned, beside others in one database --------------------------------------------------


def test_the_store_keeps_to_its_schema_beside_a_ledgers(pg_store_url):
    """One database holds the store (schema campaign_store) and other things (campaign_ledger): the
    store's tables are all in its schema, the version is recorded, and nothing else is touched."""
    execute(pg_store_url, "CREATE SCHEMA campaign_ledger")
    execute(pg_store_url, "CREATE TABLE campaign_ledger.rows (id integer)")
    execute(pg_store_url, "INSERT INTO campaign_ledger.rows VALUES (1)")
    assert not store_exists(pg_store_url)
    store = open_store(pg_store_url, clock=FakeClock())
    store.record("spring", "ann@example.com", source="one-click")
    store.close()
    assert store_exists(pg_store_url)
    tables = execute(
        pg_store_url,
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
        "'information_schema') ORDER BY 1, 2",
    )
    assert tables == [
        ("campaign_ledger", "rows"),
        ("campaign_store", "bounces"),
        ("campaign_store", "events"),
        ("campaign_store", "schema_migrations"),
        ("campaign_store", "settings"),
        ("campaign_store", "unsubscribes"),
    ]
    assert execute(pg_store_url, "SELECT * FROM campaign_ledger.rows") == [(1,)]
    assert execute(pg_store_url, "SELECT version, name FROM campaign_store.schema_migrations") == [
        (1, "entries, events, bounces, settings")
    ]


def test_a_store_from_a_newer_version_is_refused(pg_store_url):
    """A schema version above ours is not written to: StoreError (exit 74), one line naming the URL."""
    open_store(pg_store_url, clock=FakeClock()).close()
    execute(
        pg_store_url, "INSERT INTO campaign_store.schema_migrations (version, name) VALUES (99, 'future')"
    )
    with pytest.raises(StoreError, match="newer version of campaign") as caught:
        open_store(pg_store_url, clock=FakeClock())
    assert caught.value.exit_code == 74
    assert _one_line(str(caught.value)).startswith(f"{pg_store_url}: ")


def test_a_schema_holding_something_else_is_refused_and_left_alone(pg_store_url):
    """campaign_store with tables that are not a store's: InputFileError, and nothing is created in it.
    An empty schema (an administrator made it for us) is taken."""
    execute(pg_store_url, "CREATE SCHEMA campaign_store")
    execute(pg_store_url, "CREATE TABLE campaign_store.other (id integer)")
    with pytest.raises(InputFileError, match="not an unsubscribe store"):
        open_store(pg_store_url, clock=FakeClock())
    assert execute(pg_store_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'campaign_store'") == [
        ("other",)
    ]
    execute(pg_store_url, "DROP TABLE campaign_store.other")
    store = open_store(pg_store_url, clock=FakeClock())
    assert store.count() == 0
    store.close()


def test_bounces_and_a_nul_are_kept_as_sqlite_keeps_them(pg_store_url):
    """Times compare as text (a soft bounce older than the rule's days does not count) and a NUL, which
    PostgreSQL text cannot hold, does not stop a notification from being kept."""
    store = open_store(pg_store_url, clock=FakeClock())
    try:
        for n, day in enumerate(("2027-01-01", "2027-02-15", "2027-02-20")):
            bounce = BounceRecord("Bob@Example.com", False, f"{day}T10:00:00+00:00", code="452")
            assert store.record_event(
                f"s{n}", "message.bounce_detected", grant_id=None, body="{}", bounces=[bounce]
            )
        assert store.entries() == []  # two within 30 days
        odd = BounceRecord("nul\x00@example.com", True, "2027-02-21T10:00:00+00:00", reason="a\x00b")
        assert store.record_event("e\x00", "message.bounce_detected", grant_id=None, body="{}", bounces=[odd])
        assert [e.source for e in store.entries()] == ["bounce"]
        assert [b.hard for b in store.bounces("bob@example.com")] == [False, False, False]
        assert store.event_count() == 4
    finally:
        store.close()


def test_a_store_file_never_loads_psycopg(tmp_path):
    """psycopg is imported for a database only: a campaign on SQLite stores does not load it."""
    code = (
        "import sys; from pathlib import Path; from campaign.clock import SystemClock; "
        "from campaign.unsubscribe import load_unsubscribed, open_store; "
        f"store = open_store(Path({str(tmp_path / 'u.sqlite')!r}), clock=SystemClock()); "
        "store.record('c', 'ann@example.com', source='manual'); store.close(); "
        f"assert len(load_unsubscribed([Path({str(tmp_path / 'u.sqlite')!r})])) == 1; "
        "print(sorted(m for m in ('psycopg', 'psycopg_pool') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.replace("'", '"')) == []


# --- errors: one line naming the store by its URL, never a password ----------------------------------------


def test_an_unreachable_server_or_a_refused_user_is_one_line_naming_the_store(pg_store_url, monkeypatch):
    """Nothing listening, a user the server does not know: StoreError (74), one line with the URL and
    the server's reason; the password (PGPASSWORD) is never in it."""
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    down = _elsewhere(pg_store_url, port=_closed_port())
    with pytest.raises(StoreError) as caught:
        open_store(down, clock=FakeClock())
    line = _one_line(str(caught.value))
    assert line.startswith(f"{down}: cannot open the unsubscribe store (")
    assert "refused" in line.lower()
    stranger = _elsewhere(pg_store_url, user="nobody_here")
    with pytest.raises(StoreError) as caught:
        store_exists(stranger)
    line = _one_line(str(caught.value))
    assert line.startswith(f"{stranger}: ")
    assert 'role "nobody_here" does not exist' in line
    for message in (str(caught.value), repr(caught.value)):
        assert PASSWORD not in message


def test_the_commands_name_a_store_they_cannot_reach_in_one_line(cli, pg_store_url, monkeypatch):
    """`suppress list` and `serve` on a database that refuses the user: exit 74, one line, no secret."""
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", SECRET)
    stranger = _elsewhere(pg_store_url, user="nobody_here")
    for args in (("suppress", "list", "--store", stranger), ("unsubscribe", "serve", "--store", stranger)):
        result = cli(*args)
        assert result.exit_code == 74, result.output
        line = _one_line(result.stderr)
        assert stranger in line
        assert PASSWORD not in result.output
    missing = cli("suppress", "list", "--store", pg_store_url)  # reachable, but no store there yet
    assert missing.exit_code == 66
    assert "no unsubscribe store in this database" in _one_line(missing.stderr)


def test_connections_the_server_dropped_are_replaced(pg_store_url):
    """The server ends the store's idle connections (a restart, an idle timeout): the next read works."""
    store = open_store(pg_store_url, clock=FakeClock())
    try:
        store.record("spring", "ann@example.com", source="one-click")
        ended = execute(
            pg_store_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'campaign unsubscribe store'",
        )
        assert ended
        time.sleep(0.2)
        assert store.count() == 1
        assert store.record("spring", "bob@example.com", source="one-click") is True
    finally:
        store.close()


def test_a_write_behind_a_stalled_writer_fails_within_seconds_and_the_endpoint_answers_503(
    pg_store_url, monkeypatch
):
    """Another session holds the store's write lock and stalls (its machine gone, its network cut): a
    write waited for it forever, and `campaign serve`'s deliveries with it. Now a write gives up after
    the lock timeout (5 s; 0.5 s here) with a StoreError, and the webhook and the one-click POST answer
    503 with Retry-After, so Nylas and the mail provider retry; once the lock is free, writes go on."""
    monkeypatch.setattr(pgstore_module, "_LOCK_TIMEOUT_S", 0.5)
    store = open_store(pg_store_url, clock=FakeClock())
    holder = psycopg.connect(pg_store_url)  # its transaction stays open, the lock held
    lock = (pgstore_module._LOCK_CLASS, pgstore_module._WRITING)
    holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", lock)
    # Before the fix a write waited for the holder: released after 10 s, the test fails, never hangs.
    release = threading.Timer(10, holder.rollback)
    release.start()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"another writer has held it for 0\.5 s") as raised:
            store.record("spring", "ann@example.com", source="one-click")
        assert time.monotonic() - started < 15  # a bound, not a benchmark: 0.5 s and a round trip
        assert "\n" not in str(raised.value)
        endpoint = UnsubscribeEndpoint(store, secrets=[ENDPOINT_SECRET])
        with serve_on_loopback(EventService(endpoint, webhook_secrets=[WEBHOOK_SECRET])) as base:
            body = _bounce("stalled-1", "bob@example.com")
            delivered = httpx.post(f"{base}/nylas/webhook", content=body, headers=_signed(body), timeout=15)
            click = httpx.post(
                f"{base}/unsubscribe", params={"t": _token()}, content=ONE_CLICK, headers=FORM, timeout=15
            )
        assert (delivered.status_code, delivered.headers["retry-after"]) == (503, "60")
        assert (click.status_code, click.headers["retry-after"]) == (503, "60")
        assert (store.count(), store.event_count()) == (0, 0)
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
    try:
        assert store.record("spring", "ann@example.com", source="one-click") is True
    finally:
        store.close()


def test_store_connections_send_tcp_keepalives_unless_the_url_sets_its_own(pg_store_url):
    """A server that vanished (no FIN, no RST) is noticed after 30 s of silence and 3 probes 10 s apart,
    not after the kernel's two hours; a URL's own keepalive parameters win."""
    for url, expected in (
        (pg_store_url, (1, 30, 10, 3, 60_000)),
        (f"{pg_store_url}?keepalives_idle=45", (1, 45, 10, 3, 60_000)),
    ):
        store = open_store(url, clock=FakeClock())
        try:
            with store._sql._pool.connection() as connection:
                assert tcp_keepalive(connection) == expected
        finally:
            store.close()


def test_a_url_with_a_password_is_refused_wherever_it_is_given(cli, tmp_path, monkeypatch):
    """In the URL or its query, to open_store, --store or `suppress import`: refused before anything
    connects, saying to export PGPASSWORD, never repeating the password."""
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", SECRET)
    monkeypatch.setenv("NYLAS_WEBHOOK_SECRET", WEBHOOK_SECRET.decode())
    with_password = f"postgresql://campaign:{PASSWORD}@127.0.0.1:5432/campaigns"
    in_query = f"postgresql://campaign@127.0.0.1:5432/campaigns?sslmode=require&password={PASSWORD}"
    for url in (with_password, in_query):
        with pytest.raises(InputFileError, match="PGPASSWORD") as caught:
            open_store(url, clock=FakeClock())
        assert PASSWORD not in str(caught.value)
        for args in (
            ("suppress", "list", "--store", url),
            ("serve", "--store", url),
            ("suppress", "import", url, "--store", tmp_path / "u.sqlite"),
        ):
            result = cli(*args)
            assert result.exit_code == 2, result.output
            assert "PGPASSWORD" in _one_line(result.stderr)
            assert PASSWORD not in result.output
    assert not (tmp_path / "u.sqlite").exists()
    other = cli("suppress", "list", "--store", "mysql://campaign@db.example.com/campaigns")
    assert other.exit_code == 2
    assert "not a PostgreSQL one" in other.stderr


# --- the manifest -------------------------------------------------------------------------------------------

_MANIFEST = """
[campaign]
name = "c"
[recipients]
source = "r.csv"
suppress = %s
[message]
subject = "s"
text = "t.txt"
[unsubscribe]
url = "https://example.com/u?t={{ unsubscribe_token }}"
%s
[[senders]]
name = "a"
grant_id = "g"
"""


def test_the_manifest_takes_a_store_url_as_it_is_and_refuses_a_password_or_another_scheme(tmp_path):
    """`store = "postgresql://…"` (and in recipients.suppress) stays a URL, never a path under the
    manifest's folder; a password in it, or a URL of another kind, is exit 78 naming the key."""
    url = "postgresql://campaign@db.example.com:5432/campaigns?sslmode=require"
    manifest = parse_manifest(
        _MANIFEST
        % (f'["old.csv", "{url}", "more.sqlite"]', 'store = "postgres://campaign@db.example.com/c"'),
        path=tmp_path / "campaign.toml",
    )
    assert manifest.unsubscribe is not None
    assert manifest.recipients.suppress == (tmp_path / "old.csv", url, tmp_path / "more.sqlite")
    assert manifest.unsubscribe.store == "postgres://campaign@db.example.com/c"
    assert list_store_paths(manifest) == (
        url,
        tmp_path / "more.sqlite",
        "postgres://campaign@db.example.com/c",
    )
    refusals = [
        (('"old.csv"', f'store = "postgresql://campaign:{PASSWORD}@db.example.com/c"'), "unsubscribe.store"),
        ((f'["postgresql://campaign@db/c?password={PASSWORD}"]', ""), "recipients.suppress[1]"),
    ]
    for values, key in refusals:
        with pytest.raises(ManifestError) as caught:
            parse_manifest(_MANIFEST % values, path=tmp_path / "campaign.toml")
        message = str(caught.value)
        assert f"{key}: holds a password" in message
        assert "export it as PGPASSWORD" in message
        assert PASSWORD not in message
        assert caught.value.exit_code == 78
    with pytest.raises(ManifestError, match=r"unsubscribe\.store: is a URL but not a PostgreSQL one"):
        parse_manifest(_MANIFEST % ('"old.csv"', 'store = "mysql://campaign@db/c"'), path=tmp_path / "c.toml")


def test_a_manifest_with_a_password_in_its_store_url_stops_the_run_with_exit_78(api, cli, tmp_path):
    """Through the CLI: one line naming the key, nothing sent, the password never printed."""
    manifest = copy_sample("newsletter", tmp_path)
    url = f"postgresql://campaign:{PASSWORD}@127.0.0.1:5432/campaigns"
    manifest.write_text(
        manifest.read_text().replace('secret_env = "CAMPAIGN_UNSUBSCRIBE_SECRET"', f'store = "{url}"')
    )
    api.add_grant(GRANT, "maya@example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78, result.output
    assert "unsubscribe.store: holds a password" in _one_line(result.stderr)
    assert PASSWORD not in result.output
    assert api.deliveries == []


# --- end to end ---------------------------------------------------------------------------------------------


def test_a_campaign_on_a_postgresql_store_skips_who_it_holds_and_the_endpoint_feeds_it(
    api, cli, tmp_path, pg_store_url
):
    """`[unsubscribe] store = "postgresql://…"`: a recipient added by hand and one who bounced are not
    mailed; a one-click on the endpoint (another machine's `campaign serve`) lands in the database, and
    the next campaign on the same store skips that recipient too. No store file is made."""
    store = open_store(pg_store_url, clock=FakeClock())
    store.record("", "bob@example.org", source="manual")
    bounced = BounceRecord("dora@example.com", True, "2027-01-05T10:00:00+00:00", code="550")
    store.record_event("b1", "message.bounce_detected", grant_id=None, body="{}", bounces=[bounced])
    store.close()
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(
        manifest.read_text().replace(
            'secret_env = "CAMPAIGN_UNSUBSCRIBE_SECRET"', f'store = "{pg_store_url}"'
        )
    )
    api.add_grant(GRANT, "maya@example.com")
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 0, first.output
    assert _mailed(api) == ["ann.lee@example.com", "chen.wei@example.net", "eve@example.org"]
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert (status["skipped"]["unsubscribed"], status["skipped"]["bounced"]) == (1, 1)

    endpoint = load_endpoint(pg_store_url, clock=FakeClock())
    try:
        with serve_on_loopback(endpoint) as base:
            delivered = {d.payload["to"][0]["email"]: d for d in api.deliveries}
            answer = httpx.post(
                _on(base, _https_url(delivered["eve@example.org"])), content=ONE_CLICK, headers=FORM
            )
            assert answer.status_code == 200
    finally:
        endpoint.store.close()

    second = manifest.parent / "summer.toml"
    second.write_text(manifest.read_text().replace("spring-newsletter", "summer-newsletter"))
    before = len(api.deliveries)
    result = cli("run", second, "--yes")
    assert result.exit_code == 0, result.output
    assert sorted(d.payload["to"][0]["email"] for d in api.deliveries[before:]) == [
        "ann.lee@example.com",
        "chen.wei@example.net",
    ]
    listed = cli("suppress", "list", "--store", pg_store_url, "--json")
    assert [(r["email"], r["source"], r["campaign"]) for r in json.loads(listed.stdout)] == [
        ("bob@example.org", "manual", ""),
        ("dora@example.com", "bounce", ""),
        ("eve@example.org", "one-click", "spring-newsletter"),
    ]
    assert [p.name for p in tmp_path.rglob("*.sqlite") if "ledger" not in p.name] == []


def test_campaign_serve_records_webhooks_and_clicks_in_a_postgresql_store(pg_store_url):
    """`campaign serve --store postgresql://…` as a process: a click and a signed bounce notification
    are recorded in the database, where a reader elsewhere finds them; the soft-bounce rule given on
    its command line is kept with the store."""
    port = _closed_port()
    env = {
        **os.environ,
        "CAMPAIGN_UNSUBSCRIBE_SECRET": "endpoint-test-secret-0123456789",  # test_endpoint's SECRET
        "NYLAS_WEBHOOK_SECRET": WEBHOOK_SECRET.decode(),
    }
    command = [sys.executable, "-m", "campaign", "serve", "--store", pg_store_url, "--port", str(port)]
    command += ["--soft-bounce-limit", "5"]
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:
        try:
            wait_until_listening(port, process)
            base = f"http://127.0.0.1:{port}"
            click = httpx.post(f"{base}/unsubscribe", params={"t": _token()}, content=ONE_CLICK, headers=FORM)
            assert click.status_code == 200
            body = _bounce("served-1", "bob@example.com")
            assert httpx.post(f"{base}/nylas/webhook", content=body, headers=_signed(body)).status_code == 200
        finally:
            process.terminate()
    reader = open_store(pg_store_url, clock=FakeClock(), create=False)
    try:
        assert [(e.campaign, e.recipient_key, e.source) for e in reader.entries()] == [
            ("spring", "ann@example.com", "one-click"),
            ("", "bob@example.com", "bounce"),
        ]
        assert reader.event_count() == 1
        assert reader.bounce_rules().limit == 5
    finally:
        reader.close()
