"""A real PostgreSQL for the unsubscribe store's tests.

One fresh database per test session (per xdist worker: each is its own session), named
campaign_store_test_<random hex>, created here and dropped WITH (FORCE) at the end. Each test that
asks for it starts with no store in it (`empty_store` drops the schema), so no test sees another's
rows. The server is CAMPAIGN_TEST_DATABASE_URL (default: the local one, trust auth). A password in
that URL is moved to PGPASSWORD: the store refuses a URL holding one, as users are told to.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

SERVER = os.environ.get("CAMPAIGN_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def fresh_store_database() -> Iterator[str]:
    """A new, empty database on the test server for this session; its URL (no password in it)."""
    name = f"campaign_store_test_{secrets.token_hex(6)}"
    parts = urlsplit(SERVER)
    password = parts.password
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    url = urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))
    saved = os.environ.get("PGPASSWORD")
    if password:
        os.environ["PGPASSWORD"] = password
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield url
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if password:
            if saved is None:
                os.environ.pop("PGPASSWORD", None)
            else:
                os.environ["PGPASSWORD"] = saved


def empty_store(url: str) -> None:
    """Drop the store's schema (and anything a test left in the database's other schemas)."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SET lock_timeout = '20s'")
        schemas = db.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
            "AND nspname NOT IN ('information_schema', 'public')"
        ).fetchall()
        for (schema,) in schemas:
            db.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def execute(url: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple]:
    """Run one statement on the database at `url` (for a test to look behind the store's back)."""
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []
