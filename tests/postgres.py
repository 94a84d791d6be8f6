"""PostgreSQL for the tests: a fresh database per test session, and ledgers of either backend.

A plugin of every test module (`conftest.py`'s `pytest_plugins`); a test module imports it, if at all,
only for type hints or inside a test, so that pytest registers it first.

- `postgres_url`: a database of its own (`campaign_test_<hex>`, one per xdist worker) on the server
  that CAMPAIGN_TEST_DATABASE_URL names, dropped at the end of the session. PostgreSQL tests are
  never skipped: a server that cannot be reached fails them.
- `backend`: "sqlite" or "postgres", for the contract tests (each test runs on both); session-scoped,
  so that Hypothesis tests may use it and make their own `Ledgers` per example.
- `ledgers`: opens ledgers of the test's backend and closes them all when the test ends; on
  PostgreSQL every test starts from an empty database (the campaigns of the test before are gone),
  so tests never see each other's rows.
- `sqlite_ledgers`: the same, of SQLite alone, for tests of its file.
- `postgres_site`: that empty database as a `PostgresSite`; `fresh_postgres_url` (and
  `fresh_postgres_site`): a database of the test's own, for tests that change the schema itself.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from campaign.clock import Clock
from campaign.ledger import Ledger, open_ledger
from campaign.ledger._postgres import PostgresSite

SERVER_URL = os.environ.get("CAMPAIGN_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgres"]


def database_url(name: str) -> str:
    """The URL of database `name` on the test server (with the server URL's password, if it has one)."""
    return urlsplit(SERVER_URL)._replace(path=f"/{name}").geturl()


def without_password(url: str) -> str:
    """`url` as messages show it: without its password."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=user + parts.netloc.rpartition("@")[2]).geturl()


def site_at(url: str) -> PostgresSite:
    """The database at `url` as a site, named in messages without its password."""
    return PostgresSite(url, where=without_password(url))


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the test server (its URL), dropped afterwards even if still in use."""
    name = f"campaign_test_{secrets.token_hex(6)}"
    with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(name)
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session", name="postgres_url")
def _postgres_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def empty_database(url: str) -> None:
    """Remove every campaign's rows (and with them everything that refers to a campaign)."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SET lock_timeout = '5s'")  # a ledger left open in a transaction fails, not hangs
        if db.execute("SELECT to_regclass('campaign_ledger.campaigns')").fetchone() != (None,):
            db.execute("TRUNCATE campaign_ledger.campaigns RESTART IDENTITY CASCADE")
        # The grants' addresses are the database's, not a campaign's: they go too.
        if db.execute("SELECT to_regclass('campaign_ledger.mailboxes')").fetchone() != (None,):
            db.execute("TRUNCATE campaign_ledger.mailboxes")


class Ledgers:
    """Opens ledgers of one backend for a test (a SQLite file per campaign in `folder`, or campaigns in
    the database at `url`), and closes them all at the end."""

    def __init__(self, backend: str, folder: Path, url: str | None = None) -> None:
        self.backend = backend
        self._folder = folder
        self._url = url
        self._opened: list[Ledger] = []
        self._reader: Any = None
        if url is not None:
            empty_database(url)

    @property
    def site(self) -> PostgresSite:
        """The database as a site (PostgreSQL only)."""
        assert self._url is not None, "a SQLite ledger has no PostgreSQL site"
        return site_at(self._url)

    def path(self, campaign: str) -> Path:
        """Where a SQLite ledger of `campaign` is."""
        return self._folder / f"{campaign}.ledger.sqlite"

    def open(self, campaign: str = "c", *, clock: Clock, **options: Any) -> Ledger:
        """Open `campaign`'s ledger (`open_ledger`'s options); it is closed when the test ends."""
        if self._url is None:
            ledger: Ledger = open_ledger(self.path(campaign), clock=clock, campaign=campaign, **options)
        else:
            ledger = self.site.open(clock=clock, campaign=campaign, **options)
        self._opened.append(ledger)
        return ledger

    def rows_elsewhere(self, campaign: str, column: str, value: object) -> list[tuple[str, str | None]]:
        """(state, idempotency key) of `campaign`'s rows whose `column` is `value`, read on a connection
        of its own: what another process sees."""
        if self._url is None:
            with sqlite3.connect(self.path(campaign)) as db:
                query = f"SELECT state, idempotency_key FROM recipients WHERE {column} = ? ORDER BY key"
                return db.execute(query, (value,)).fetchall()
        query = (
            "SELECT r.state, r.idempotency_key FROM campaign_ledger.recipients AS r "
            "JOIN campaign_ledger.campaigns AS c ON c.id = r.campaign_id "
            f"WHERE c.name = %s AND r.{column} = %s ORDER BY r.key"
        )
        return self._elsewhere().execute(query, (campaign, value)).fetchall()

    def set_column(self, campaign: str, column: str, value: object, *, where: str, equals: object) -> None:
        """Write a value into `campaign`'s rows behind the ledger's back (one the transitions never
        write, but a column may hold), on a connection of its own."""
        if self._url is None:
            with sqlite3.connect(self.path(campaign)) as db:
                db.execute(f"UPDATE recipients SET {column} = ? WHERE {where} = ?", (value, equals))
            return
        self._elsewhere().execute(
            f"UPDATE campaign_ledger.recipients SET {column} = %s WHERE {where} = %s "
            "AND campaign_id = (SELECT id FROM campaign_ledger.campaigns WHERE name = %s)",
            (value, equals, campaign),
        )

    def _elsewhere(self) -> psycopg.Connection[Any]:
        if self._reader is None:
            self._reader = psycopg.connect(self._url or "", autocommit=True)
        return self._reader

    def close(self) -> None:
        for ledger in self._opened:
            ledger.close()
        self._opened.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Ledgers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class Backend:
    """A ledger backend of the tests: its name, and the database (PostgreSQL only)."""

    name: str
    url: str | None

    def ledgers(self, folder: Path) -> Ledgers:
        """A new set of ledgers of this backend (on PostgreSQL: the database emptied first)."""
        return Ledgers(self.name, folder, self.url)


@pytest.fixture(scope="session", name="backend", params=BACKENDS)
def _backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(
        request.param, request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    )


@pytest.fixture(name="ledgers")
def _ledgers(backend: Backend, tmp_path: Path) -> Iterator[Ledgers]:
    with backend.ledgers(tmp_path) as ledgers:
        yield ledgers


@pytest.fixture(name="sqlite_ledgers")
def _sqlite_ledgers(tmp_path: Path) -> Iterator[Ledgers]:
    """Ledgers of SQLite alone, for tests of its file (same helpers as `ledgers`)."""
    with Ledgers("sqlite", tmp_path) as ledgers:
        yield ledgers


@pytest.fixture(name="postgres_site")
def _postgres_site(postgres_url: str) -> PostgresSite:
    empty_database(postgres_url)
    return site_at(postgres_url)


@pytest.fixture(name="fresh_postgres_url")
def _fresh_postgres_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(name="fresh_postgres_site")
def _fresh_postgres_site(fresh_postgres_url: str) -> PostgresSite:
    return site_at(fresh_postgres_url)
