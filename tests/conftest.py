"""Shared fixtures; PostgreSQL's (databases, ledgers of either backend) are in `postgres.py`."""

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

import campaign.run as run_module
from campaign.cli import app
from campaign.cli.base import options
from campaign.manifest import load_manifest
from campaign.pipeline import run_preflight
from campaign.testing import FakeClock, FakeNylas
from campaign.testing.server import serve_on_loopback

pytest_plugins = ["postgres"]


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


REPO = Path(__file__).resolve().parent.parent
API_KEY = "nyk_v0_test_key_never_printed_0123456789"
SECRET = "test-unsubscribe-secret-0123456789abcdef"


class _Switch:
    """One loopback server for the whole session, passing each request to the current test's fake.

    Starting and stopping uvicorn costs ~0.2 s; a switch in front of the fakes pays it once.
    """

    def __init__(self) -> None:
        self.target: FakeNylas | None = None

    async def app(self, scope, receive, send) -> None:
        assert self.target is not None, "a request reached the loopback server between tests"
        await self.target.app(scope, receive, send)


@pytest.fixture(scope="session", name="_loopback")
def _loopback_server() -> Iterator[tuple[_Switch, str]]:
    switch = _Switch()
    with serve_on_loopback(switch) as url:
        yield switch, url


def serve_fake(loopback, fake: FakeNylas, monkeypatch, *, secret: str = SECRET) -> Iterator[FakeNylas]:
    """Serve `fake` on the session's loopback server, with the CLI's environment pointing at it."""
    switch, url = loopback
    switch.target = fake
    monkeypatch.setenv("NYLAS_API_URI", url)
    monkeypatch.setenv("NYLAS_API_KEY", API_KEY)
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", secret)
    try:
        yield fake
    finally:
        switch.target = None


@pytest.fixture(name="api")
def _api(monkeypatch, _loopback) -> Iterator[FakeNylas]:
    """A fake Nylas served on loopback, with the CLI's environment pointing at it."""
    yield from serve_fake(_loopback, FakeNylas(api_key=API_KEY), monkeypatch)


@pytest.fixture(name="cli_clock")
def _cli_clock(monkeypatch) -> FakeClock:
    """The CLI's clock in a test: virtual time from now, so pacing and waits cost no real time."""
    clock = FakeClock(start=datetime.now(UTC))
    monkeypatch.setattr(options, "clock", clock)
    return clock


@pytest.fixture(name="cli")
def _cli(cli_clock):
    """Run the CLI in-process, on the test's FakeClock; returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)

    return invoke


def copy_sample(name: str, to: Path) -> Path:
    """Copy samples/<name> into `to` and return its manifest path."""
    target = to / name
    shutil.copytree(REPO / "samples" / name, target, ignore=shutil.ignore_patterns("*.sandbox", "*.sqlite*"))
    return target / "campaign.toml"


def copy_newsletter(api: FakeNylas, to: Path, *, ledger: str = "") -> Path:
    """The newsletter sample copied into `to`, its senders' grants at `api`, and with `ledger` (TOML
    lines) as its [ledger] table if given; its manifest path."""
    manifest = copy_sample("newsletter", to)
    for sender in load_manifest(manifest).senders:
        assert sender.grant_id is not None
        api.add_grant(sender.grant_id, sender.email or "")
    if ledger:
        manifest.write_text(manifest.read_text() + f"\n[ledger]\n{ledger}\n")
    return manifest


@pytest.fixture(name="preflights")
def _preflights(monkeypatch) -> list[int]:
    """Counts the full checks runs make (each checks and renders every row of the list that may be sent)."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return run_preflight(*args, **kwargs)

    monkeypatch.setattr(run_module, "run_preflight", counted)
    return calls


# --- the unsubscribe store in PostgreSQL (tests/pgstore.py) -----------------------------------------------


@pytest.fixture(scope="session", name="_store_database")
def _store_database_fixture() -> Iterator[str]:
    """This session's database for unsubscribe stores, created for it and dropped after."""
    from pgstore import fresh_store_database

    with fresh_store_database() as url:
        yield url


@pytest.fixture(name="pg_store_url")
def _pg_store_url(_store_database) -> str:
    """The URL of a PostgreSQL database holding no unsubscribe store yet (whatever earlier tests wrote)."""
    from pgstore import empty_store

    empty_store(_store_database)
    return _store_database


@pytest.fixture(name="store_at", params=["sqlite", "postgresql"])
def _store_at(request, tmp_path) -> Path | str:
    """Where a test's unsubscribe store is: a new SQLite file, then (the same test again) a PostgreSQL
    database by its URL."""
    if request.param == "sqlite":
        return tmp_path / "store.sqlite"
    return request.getfixturevalue("pg_store_url")
