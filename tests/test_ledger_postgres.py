"""The PostgreSQL ledger's own matters: connecting (and failing to, in one line without the password),
migrations, campaigns side by side in one database, read-only opens, and the writer lock across
processes. What every ledger does is in test_ledger.py, on both backends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from support import tcp_keepalive

from campaign.errors import LedgerError
from campaign.ledger import PlannedRow
from campaign.ledger._pg_schema import _WRITER_LOCK, MIGRATIONS, _lock_key, connect, open_pool
from campaign.ledger._postgres import PostgresSite
from campaign.models import OutcomeKind, RowState, SendOutcome
from campaign.testing.clock import FakeClock

SECRET = "s3cret-Pa55word"
SENT = SendOutcome(OutcomeKind.SENT, status=200, message_id="m-1")
PLAN = [PlannedRow("ann@x.com", 1, "ann@x.com", "alice"), PlannedRow("bob@x.com", 2, "bob@x.com", "alice")]


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


def _one_line_without_the_password(call: Callable[[], object], password: str = SECRET) -> str:
    """The LedgerError `call` raises: one line, no password in it or in what it is chained to."""
    with pytest.raises(LedgerError) as raised:
        call()
    text = str(raised.value)
    assert "\n" not in text
    assert password not in text
    assert raised.value.__cause__ is None or password not in str(raised.value.__cause__)
    return text


def _hold(site: PostgresSite, campaign: str) -> None:
    with site.hold(campaign):
        pass


def _schema_exists(url: str) -> bool:
    with psycopg.connect(url) as db:
        return db.execute("SELECT to_regnamespace('campaign_ledger') IS NOT NULL").fetchone() == (True,)


# --- connecting -------------------------------------------------------------------------------------


def test_an_unreachable_server_is_one_line_within_seconds(clock):
    """Nothing listens at the URL's port: 'cannot reach PostgreSQL', fast, without the password."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    where = f"postgresql://ann@127.0.0.1:{port}/campaigns"
    site = PostgresSite(f"postgresql://ann:{SECRET}@127.0.0.1:{port}/campaigns", where=where)
    started = time.monotonic()
    for call in (
        lambda: site.open(clock=clock, campaign="c"),
        lambda: site.exists("c"),
        lambda: site.check_free("c"),
    ):
        said = _one_line_without_the_password(call)
        assert said == f"{where}: cannot reach PostgreSQL (connection refused); start it or fix [ledger] url"
    assert time.monotonic() - started < 5
    assert SECRET not in repr(site)


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [("password", "password authentication failed"), ("hba", "no pg_hba.conf entry")],
)
def test_refused_credentials_are_one_line_naming_the_user_never_the_password(clock, refusal, reason):
    """A server that refuses the password (or has no pg_hba entry for the client) gives one line that
    names the user and says where the password comes from."""
    with _refusing_server(refusal) as (port, said):
        where = f"postgresql://ann@127.0.0.1:{port}/campaigns"
        site = PostgresSite(f"postgresql://ann:{SECRET}@127.0.0.1:{port}/campaigns", where=where)
        line = _one_line_without_the_password(lambda: site.open(clock=clock, campaign="c"))
    assert reason in said[0]  # the server really refused it so
    assert line == (
        f"{where}: PostgreSQL refused the credentials for user ann; set PGPASSWORD or the manifest's "
        "[ledger] password_env"
    )


def test_a_missing_database_is_one_line_saying_to_create_it(clock):
    """The server is there, the URL's database is not: one line naming it."""
    from postgres import database_url, site_at

    url = urlsplit(database_url("campaign_no_such_database"))
    password = url.password or SECRET  # the server's own, if it asks for one (else it is not checked)
    site = site_at(url._replace(netloc=f"{url.username}:{password}@{url.netloc.rpartition('@')[2]}").geturl())
    line = _one_line_without_the_password(lambda: site.exists("c"), password)
    assert line == (
        f"{site.where}: PostgreSQL has no database campaign_no_such_database; create it "
        "(createdb campaign_no_such_database) or fix [ledger] url"
    )


@pytest.mark.parametrize(
    "conninfo",
    [
        f"postgresql://ann:{SECRET}%zz@127.0.0.1/campaigns",  # libpq's own error quotes the password
        f"host=127.0.0.1 password={SECRET} port=not-a-number",
        f"password={SECRET} nonsense",
    ],
)
def test_a_malformed_url_is_one_line_without_the_password(clock, conninfo):
    """libpq cannot parse it: our own line, not libpq's (which may quote what it could not read)."""
    site = PostgresSite(conninfo, where="postgresql://ann@127.0.0.1/campaigns")
    for call in (lambda: site.open(clock=clock, campaign="c"), lambda: _hold(site, "c")):
        line = _one_line_without_the_password(call)
        assert line == "postgresql://ann@127.0.0.1/campaigns: is not a valid PostgreSQL URL; fix [ledger] url"


def test_a_connection_the_server_dropped_is_replaced_before_a_claim(postgres_site, postgres_url, clock):
    """The server ends the ledger's idle connections (a restart, an idle timeout): the next claim gets a
    new one instead of failing."""
    ledger = postgres_site.open(clock=clock, campaign="c")
    try:
        ledger.record_plan(PLAN, [])
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            (ended,) = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert ended >= 1
        assert ledger.claim("ann@x.com").fresh
        assert ledger.row("ann@x.com").state == RowState.INFLIGHT
    finally:
        ledger.close()


def test_ledger_connections_send_tcp_keepalives_unless_the_url_sets_its_own(postgres_url):
    """The writer lock's connection and the pool's: a server that vanished (no FIN, no RST) is noticed
    in about a minute (30 s idle, 3 probes 10 s apart), not the kernel's two hours; a URL's own wins."""
    for conninfo, expected in (
        (postgres_url, (1, 30, 10, 3, 60_000)),
        (f"{postgres_url}?keepalives_count=5&tcp_user_timeout=20000", (1, 30, 10, 5, 20_000)),
    ):
        with contextlib.closing(connect(conninfo, where="the test database")) as connection:
            assert tcp_keepalive(connection) == expected
        with open_pool(conninfo, read_only=True) as pool, pool.connection() as pooled:
            assert tcp_keepalive(pooled) == expected


def test_a_claim_skips_a_row_another_transaction_holds_and_takes_it_once_free(
    postgres_site, postgres_url, clock
):
    """FOR UPDATE SKIP LOCKED: while another worker's transaction holds a row (giving it to another
    grant, settling it), a claim returns None at once, without waiting and without a change; once that
    transaction ends, the row is claimed as usual. In flight rows too (a crash's, re-sent with its key)."""
    ledger = postgres_site.open(clock=clock, campaign="locks")
    try:
        ledger.record_plan(PLAN, [])
        first = ledger.claim("bob@x.com")
        assert first is not None
        for key, state in (("ann@x.com", RowState.PENDING), ("bob@x.com", RowState.INFLIGHT)):
            with psycopg.connect(postgres_url) as other:
                other.execute(
                    "SELECT r.key FROM campaign_ledger.recipients AS r JOIN campaign_ledger.campaigns AS c "
                    "ON c.id = r.campaign_id WHERE c.name = 'locks' AND r.key = %s FOR UPDATE",
                    (key,),
                )
                claimed: list[object] = []
                claiming = threading.Thread(
                    target=lambda key=key, claimed=claimed: claimed.append(ledger.claim(key))
                )
                claiming.start()
                claiming.join(timeout=10)
                waited = claiming.is_alive()
                other.rollback()  # frees a claim left waiting, should SKIP LOCKED be missing
                claiming.join()
                assert not waited, f"the claim of {key} waited for the other transaction's lock"
                assert claimed == [None]
                assert ledger.row(key).state == state
            again = ledger.claim(key)
            assert again is not None
            assert ledger.row(key).state == RowState.INFLIGHT
        assert again.idempotency_key == first.idempotency_key  # bob's key kept across the skip
    finally:
        ledger.close()


# --- the schema ---------------------------------------------------------------------------------


def test_migrations_are_numbered_and_recorded_once_even_when_two_commands_start_together(
    fresh_postgres_url, fresh_postgres_site
):
    """Two commands opening a new database at once: the schema is made once, each migration recorded
    once with its name, and both get the one campaign row."""
    site = fresh_postgres_site
    start = threading.Barrier(2)
    opened: list[Any] = []
    failed: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(site.open(clock=FakeClock(), campaign="c"))
        except BaseException as exc:  # reported below, not lost in the thread
            failed.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (failed, len(opened)) == ([], 2)
    opened[0].record_plan(PLAN, [])
    assert opened[1].counts()[RowState.PENDING] == 2  # the same campaign's rows
    for ledger in opened:
        ledger.close()
    site.open(clock=FakeClock(), campaign="c").close()
    with psycopg.connect(fresh_postgres_url) as db:
        recorded = db.execute("SELECT version, name FROM campaign_ledger.schema_migrations ORDER BY version")
        assert recorded.fetchall() == [(n, name) for n, (name, _) in enumerate(MIGRATIONS, start=1)]
        assert db.execute("SELECT name FROM campaign_ledger.campaigns").fetchall() == [("c",)]


def test_a_database_written_by_a_newer_version_is_refused(fresh_postgres_url, fresh_postgres_site, clock):
    """A schema version this code does not know: one line saying to upgrade, for writers and readers."""
    site = fresh_postgres_site
    site.open(clock=clock, campaign="c").close()
    with psycopg.connect(fresh_postgres_url) as db:
        db.execute("INSERT INTO campaign_ledger.schema_migrations VALUES (99, 'future', 'later')")
    newer = f"{site.where}: the ledger was written by a newer version of campaign; upgrade campaign"
    for read_only in (False, True):
        opening = lambda read_only=read_only: site.open(clock=clock, campaign="c", read_only=read_only)  # noqa: E731
        assert _one_line_without_the_password(opening) == newer


def test_a_read_only_open_reads_a_database_that_lacks_only_an_index(
    fresh_postgres_url, fresh_postgres_site, clock
):
    """The migrations after READABLE_FROM add indexes only: status and report read without them (and
    add nothing); a writer's open adds them."""
    from campaign.ledger._pg_schema import MIGRATIONS, READABLE_FROM

    site = fresh_postgres_site
    site.open(clock=clock, campaign="c").close()
    with psycopg.connect(fresh_postgres_url) as db:
        db.execute("DELETE FROM campaign_ledger.schema_migrations WHERE version > %s", (READABLE_FROM,))
        db.execute("DROP INDEX campaign_ledger.recipients_erred")
    reading = site.open(clock=clock, campaign="c", read_only=True)
    try:
        assert reading.error_groups(waiting=True) == []
    finally:
        reading.close()
    versions = "SELECT max(version) FROM campaign_ledger.schema_migrations"
    with psycopg.connect(fresh_postgres_url) as db:
        assert db.execute(versions).fetchone() == (READABLE_FROM,)
    site.open(clock=clock, campaign="c").close()
    with psycopg.connect(fresh_postgres_url) as db:
        assert db.execute(versions).fetchone() == (len(MIGRATIONS),)
        assert db.execute(
            "SELECT to_regclass('campaign_ledger.recipients_erred') IS NOT NULL"
        ).fetchone() == (True,)


def test_a_read_only_open_never_migrates_and_asks_for_an_upgrade(
    fresh_postgres_url, fresh_postgres_site, clock
):
    """status and report on a database that lacks a migration: refused in one line, nothing changed."""
    site = fresh_postgres_site
    site.open(clock=clock, campaign="c").close()
    with psycopg.connect(fresh_postgres_url) as db:
        db.execute("DELETE FROM campaign_ledger.schema_migrations")
    line = _one_line_without_the_password(lambda: site.open(clock=clock, campaign="c", read_only=True))
    assert line.endswith(": the ledger was written by an older campaign; `campaign resume` upgrades it")
    assert line.startswith(f"{site.where}: ")
    with psycopg.connect(fresh_postgres_url) as db:
        assert db.execute("SELECT count(*) FROM campaign_ledger.schema_migrations").fetchone() == (0,)


def test_a_campaign_without_a_ledger_is_refused_and_nothing_is_created(
    fresh_postgres_url, fresh_postgres_site, clock
):
    """exists, check_free, hold, and opens that may not create: no schema is made in the database, and
    an open that needs a ledger says the campaign has none; create=True makes it."""
    site = fresh_postgres_site
    assert site.exists("c") is False
    site.check_free("c")
    with site.hold("c"):
        pass
    for options in ({"create": False}, {"read_only": True}, {"read_only": True, "create": False}):
        line = _one_line_without_the_password(
            lambda options=options: site.open(clock=clock, campaign="c", **options)
        )
        assert line == f"{site.where}: no ledger for campaign 'c'"
    assert not _schema_exists(fresh_postgres_url)
    site.open(clock=clock, campaign="c").close()
    assert site.exists("c") is True
    assert site.exists("other") is False
    line = _one_line_without_the_password(lambda: site.open(clock=clock, campaign="other", create=False))
    assert line == f"{site.where}: no ledger for campaign 'other'"


def test_a_read_only_ledger_reads_and_cannot_write(postgres_site, clock):
    """read_only: the server refuses every write (a LedgerError naming the database); nothing changes."""
    writer = postgres_site.open(clock=clock, campaign="c")
    writer.record_plan(PLAN, [])
    writer.close()
    reader = postgres_site.open(clock=clock, campaign="c", read_only=True)
    try:
        assert reader.counts()[RowState.PENDING] == 2
        for write in (lambda: reader.claim("ann@x.com"), lambda: reader.record_event("retry", "x")):
            line = _one_line_without_the_password(write)
            assert line.startswith(f"{postgres_site.where}: cannot write the ledger (")
        assert reader.row("ann@x.com").state == RowState.PENDING
        assert reader.journal() == []
    finally:
        reader.close()


# --- campaigns side by side -----------------------------------------------------------------------


def test_another_campaigns_rows_are_invisible(postgres_site, clock):
    """Two campaigns with the same recipients in one database: each sees and changes only its own rows,
    sends, facts and journal; their keys differ."""
    one = postgres_site.open(clock=clock, campaign="one")
    two = postgres_site.open(clock=clock, campaign="two")
    try:
        one.record_plan(PLAN, [], stamp="plan-one")
        assert sum(two.counts().values()) == 0
        assert list(two.rows()) == []
        two.record_plan(PLAN[:1], [], stamp="plan-two")
        claim = one.claim("ann@x.com")
        one.record_outcome("ann@x.com", SENT, sender="alice")
        one.record_retry_all([RowState.FAILED], note="none")  # one's journal only (nothing to retry)
        one.record_event("note", "one's")
        assert two.row("ann@x.com").state == RowState.PENDING
        assert two.claim("ann@x.com").idempotency_key != claim.idempotency_key
        assert (one.plan_stamp(), two.plan_stamp()) == ("plan-one", "plan-two")
        assert two.sent_recipients_total("alice", 0.0) == 0
        assert one.sent_recipients_total("alice", 0.0) == 1
        assert two.sent_message_ids(["m-1"]) == set()
        assert [entry.kind for entry in two.journal()] == []
        assert two.counts() == {**dict.fromkeys(RowState, 0), RowState.INFLIGHT: 1}
        assert one.key_states([RowState.PENDING]) == {"bob@x.com": "pending"}
        assert two.assigned_counts() == {"alice": 1}
        _one_line_without_the_password(lambda: two.row("bob@x.com"))
    finally:
        one.close()
        two.close()


# --- the writer lock ------------------------------------------------------------------------------


def test_the_writer_lock_refuses_a_second_sender_and_is_freed_on_close(postgres_site, clock):
    """Two exclusive opens of one campaign: the second is refused naming this process and host; readers
    need no lock; another campaign is not blocked; after close it is free."""
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    first = postgres_site.open(clock=clock, campaign="c", exclusive=True)
    try:
        for call in (
            lambda: postgres_site.open(clock=clock, campaign="c", exclusive=True),
            lambda: postgres_site.check_free("c"),
            lambda: _hold(postgres_site, "c"),
        ):
            assert _one_line_without_the_password(call) == (
                f"{postgres_site.where}: another campaign command ({holder}) is using this campaign's "
                "ledger; wait for it to finish or stop it, then try again"
            )
        postgres_site.open(clock=clock, campaign="c").close()
        postgres_site.check_free("other")
        with postgres_site.hold("other"):
            pass
    finally:
        first.close()
    postgres_site.check_free("c")
    postgres_site.open(clock=clock, campaign="c", exclusive=True).close()


def test_the_writer_lock_is_free_at_once_after_a_check_a_hold_or_a_close(postgres_site, postgres_url, clock):
    """A run checks the lock, then takes it: free at once each time, as seen from a session already
    open (the server ends a closed session a moment later, so the lock is released before its
    connection is closed); so after a hold, or an exclusive ledger's close."""
    keys = (_WRITER_LOCK, _lock_key("c"))
    with psycopg.connect(postgres_url, autocommit=True) as observer:

        def free() -> bool:
            (taken,) = observer.execute("SELECT pg_try_advisory_lock(%s, %s)", keys).fetchone()
            if taken:
                observer.execute("SELECT pg_advisory_unlock(%s, %s)", keys)
            return bool(taken)

        for _ in range(20):
            postgres_site.check_free("c")
            assert free()
            with postgres_site.hold("c"):
                assert not free()
            assert free()
            postgres_site.open(clock=clock, campaign="c", exclusive=True).close()
            assert free()


def test_a_held_campaign_is_opened_and_written_by_its_holder(postgres_site, clock):
    """hold, then open (creating it) in the same process, as a first run does: the lock stays held by
    its own connection while the ledger writes through its pool, and is freed when the block ends."""
    with postgres_site.hold("c"):
        ledger = postgres_site.open(clock=clock, campaign="c")
        try:
            ledger.record_plan(PLAN, [])
            ledger.claim("ann@x.com")
        finally:
            ledger.close()
        with pytest.raises(LedgerError, match="another campaign command"):
            postgres_site.check_free("c")
    postgres_site.check_free("c")
    assert postgres_site.exists("c")


def test_the_writer_lock_of_a_process_killed_with_sigkill_is_freed(postgres_site, postgres_url):
    """Another process holds the lock: refused, naming that process; kill -9 it, and the server ends
    its session, so the lock is free within seconds."""
    code = (
        "import sys, time\n"
        "from campaign.ledger._postgres import PostgresSite\n"
        "site = PostgresSite(sys.argv[1], where=sys.argv[1])\n"
        "with site.hold('c'):\n"
        "    print('holding', flush=True)\n"
        "    time.sleep(120)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code, postgres_url], stdout=subprocess.PIPE) as other:
        try:
            assert other.stdout is not None
            assert other.stdout.readline() == b"holding\n"
            line = _one_line_without_the_password(lambda: postgres_site.check_free("c"))
            assert f"another campaign command (pid {other.pid} on host {socket.gethostname()})" in line
            with pytest.raises(LedgerError, match=rf"\(pid {other.pid} "):
                _hold(postgres_site, "c")
        finally:
            other.send_signal(signal.SIGKILL)
            other.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with postgres_site.hold("c"):
                break
        except LedgerError:
            assert time.monotonic() < deadline, "the killed process's lock was never freed"
            time.sleep(0.05)


# --- a server that refuses ------------------------------------------------------------------------


@contextlib.contextmanager
def _refusing_server(refusal: str) -> Iterator[tuple[int, list[str]]]:
    """A loopback server speaking just enough of PostgreSQL's protocol to refuse a client: "password"
    asks for a password and refuses it; "hba" refuses the connection at once. Yields its port and the
    refusals it sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    said: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            with client:
                client.settimeout(5)
                said.append(_refuse(client, refusal))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield listener.getsockname()[1], said
    finally:
        stop.set()
        thread.join()
        listener.close()


def _refuse(client: socket.socket, refusal: str) -> str:
    while True:
        length, code = struct.unpack("!ii", _read(client, 8))
        body = _read(client, length - 8)
        if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: neither is offered
            client.sendall(b"N")
            continue
        break
    fields = body.split(b"\0")
    user = dict(zip(fields[0::2], fields[1::2], strict=False)).get(b"user", b"").decode()
    if refusal == "password":
        client.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind, size = struct.unpack("!ci", _read(client, 5))
        assert kind == b"p"
        _read(client, size - 4)
        code, message = "28P01", f'password authentication failed for user "{user}"'
    else:
        code, message = "28000", f'no pg_hba.conf entry for host "127.0.0.1", user "{user}", database "x"'
    payload = b"".join(
        tag + text.encode() + b"\0" for tag, text in ((b"S", "FATAL"), (b"C", code), (b"M", message))
    )
    client.sendall(b"E" + struct.pack("!i", len(payload) + 5) + payload + b"\0")
    return message


def _read(client: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client went away")
        data += chunk
    return data


def test_a_worker_whose_row_another_settled_is_told_it_lost_its_lease(postgres_site, clock):
    """A worker paused past its lease finds, when it records its send, that the grant's next owner settled
    the row (with the same key): the line says so, not only that the row is not in flight."""
    paused = postgres_site.open(clock=clock, campaign="lapsed")
    taker = postgres_site.open(clock=clock, campaign="lapsed")
    try:
        paused.record_plan(PLAN, [])
        paused.claim("ann@x.com", sender="alice")
        paused.bind_worker("worker-paused")
        taker.record_outcome("ann@x.com", SENT, sender="alice")  # the next owner's replayed send
        with pytest.raises(LedgerError, match="lost its lease on 'alice'") as raised:
            paused.record_outcome("ann@x.com", SENT, sender="alice")
        assert "not inflight" in str(raised.value)
        assert taker.row("ann@x.com").state == RowState.SENT
    finally:
        paused.close()
        taker.close()


# --- query plans ----------------------------------------------------------------------------------


def _scans_of(plan: dict[str, Any], alias: str) -> list[dict[str, Any]]:
    """The nodes of an EXPLAIN (FORMAT JSON) plan that read the table named `alias` in its query."""
    found = [plan] if plan.get("Alias") == alias else []
    for child in plan.get("Plans", ()):
        found += _scans_of(child, alias)
    return found


def test_scheduling_a_step_looks_each_later_steps_row_up_by_its_key(postgres_site, clock):
    """`unscheduled_steps(…, later=…)` (run every round of a campaign with follow-ups, a batch at a time)
    finds a later step's row through the primary key: written `l.key = ANY (SELECT … unnest …)`, it was
    a scan of all the campaign's rows for each row of the previous step (minutes for a batch of a
    million-row ledger), whatever the planner was allowed."""
    from campaign.ledger import ScheduledStep

    ledger = postgres_site.open(clock=clock, campaign="c")
    try:
        ledger.record_plan(PLAN, [])
        for key in ("ann@x.com", "bob@x.com"):
            ledger.claim(key, subject="Hi", sender="alice", via="grant-1")
            ledger.record_outcome(key, SENT, sender="alice")
        ledger.record_followups(
            [ScheduledStep("bob@x.com", "nudge", 2, "bob@x.com", "alice", "bob@x.com", clock.now())]
        )
        # A campaign of some size, its statistics known, as the planner sees a real one.
        with ledger._pool.connection() as connection:
            connection.execute(
                "INSERT INTO recipients (campaign_id, key, row, email, sender, state, listed, created_at, "
                "updated_at, step, sent_at) SELECT %s, 'r' || n || '@x.com', n + 2, 'r' || n || '@x.com', "
                "'alice', 'sent', true, 'x', 'x', 'message', %s FROM generate_series(1, 5000) AS n",
                (ledger._id, ledger.row("ann@x.com").sent_at),
            )
            connection.execute("ANALYZE recipients")
        asked: list[tuple[str, Any]] = []
        read = ledger._read

        def recording(query: str, params: Any = ()) -> Any:
            asked.append((query, params))
            return read(query, params)

        ledger._read = recording  # type: ignore[method-assign]
        found = ledger.unscheduled_steps("message", "extra", later=["nudge"])
        ledger._read = read  # type: ignore[method-assign]
        # bob got the nudge: not him; the rest in ledger order, a batch (1,000) of them.
        assert [step.recipient for step in found] == ["ann@x.com", *(f"r{n}@x.com" for n in range(1, 1000))]
        ((query, params),) = asked
        with ledger._pool.connection() as connection, connection.transaction():
            # Sequential scans allowed, a small table may be read whole for a reason of cost alone.
            connection.execute("SET LOCAL enable_seqscan = off")
            ((plan,),) = connection.execute(f"EXPLAIN (FORMAT JSON) {query}", params).fetchall()
        later = _scans_of(plan[0]["Plan"], "l")
        assert [scan["Relation Name"] for scan in later] == ["recipients"]
        assert "key = " in later[0].get("Index Cond", ""), later
    finally:
        ledger.close()
