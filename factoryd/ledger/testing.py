"""Helpers for tests and benchmarks that need a throwaway PostgreSQL database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

# The CI server (trust auth); `test` is only used to issue CREATE/DROP DATABASE.
DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@contextmanager
def throwaway_postgres_database(
    admin_url: str = DEFAULT_PG_ADMIN_URL, *, prefix: str = "factoryd_test"
) -> Iterator[str]:
    """Create a uniquely named database, yield its ``postgresql+psycopg://`` URL, drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
