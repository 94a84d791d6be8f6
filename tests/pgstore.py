"""A real PostgreSQL for the unsubscribe store's tests.

One fresh database per test session (per xdist worker: each is its own session), made and dropped
WITH (FORCE) at the end by `postgres.fresh_database`. Each test that
asks for it starts with no store in it (`empty_store` drops the schema), so no test sees another's
rows. The server is CAMPAIGN_TEST_DATABASE_URL (default: the local one, trust auth). A password in
that URL is moved to PGPASSWORD: the store refuses a URL holding one, as users are told to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg
from psycopg import sql


@contextmanager
def fresh_store_database() -> Iterator[str]:
    """A new, empty database on the test server for this session (`postgres.fresh_database`); its URL
    without the password, which goes to PGPASSWORD meanwhile (the store refuses a URL holding one)."""
    from postgres import fresh_database, without_password  # a plugin module: imported once registered

    with fresh_database() as url:
        password = urlsplit(url).password
        saved = os.environ.get("PGPASSWORD")
        if password:
            os.environ["PGPASSWORD"] = password
        try:
            yield without_password(url)
        finally:
            if password and saved is None:
                os.environ.pop("PGPASSWORD", None)
            elif password and saved is not None:
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
