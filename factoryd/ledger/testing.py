"""Helpers for tests and benchmarks that need a throwaway PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from factoryd.errors import ConfigError

# The admin URL of the server to use (trust auth; its database only issues CREATE/DROP DATABASE). The test
# suite starts its own throwaway cluster and sets this (tests/helpers/postgres.py) unless it is already set.
PG_ADMIN_URL_ENV = "FACTORYD_TEST_PG_URL"


@contextmanager
def throwaway_postgres_database(
    admin_url: str | None = None, *, prefix: str = "factoryd_test"
) -> Iterator[str]:
    """Create a uniquely named database, yield its ``postgresql+psycopg://`` URL, drop it afterwards."""
    if admin_url is None:
        admin_url = os.environ.get(PG_ADMIN_URL_ENV, "")
    if not admin_url:
        raise ConfigError(
            f"no PostgreSQL server to test on: set {PG_ADMIN_URL_ENV} to an admin URL such as "
            "postgresql://postgres@127.0.0.1:5432/postgres, or run the test under pytest (tests/conftest.py "
            "starts a throwaway cluster for @pytest.mark.postgres tests)"
        )
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
