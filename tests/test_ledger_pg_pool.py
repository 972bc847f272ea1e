"""The PostgreSQL pool pings only connections in doubt, and still replaces the dead ones (#20b)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from factoryd.ledger.bench import _claim_one, _prepare_lot
from factoryd.ledger.core import Ledger
from factoryd.ledger.model import DeviceState
from factoryd.ledger.testing import throwaway_postgres_database

pytestmark = pytest.mark.postgres
STATION = "station-pool"
TERMINATE_WAIT_S = 10.0


@pytest.fixture
def pg_url() -> Iterator[str]:
    with throwaway_postgres_database() as url:
        yield url


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _terminate_ledger_backends(url: str) -> int:
    """Kill every other backend of the ledger's database, as a server restart does; how many."""
    database = make_url(url).database
    with psycopg.connect(_libpq(url), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()) AS t",
            (database,),
        ).fetchone()
        deadline = time.monotonic() + TERMINATE_WAIT_S
        while time.monotonic() < deadline:
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
            if left is not None and left[0] == 0:
                break
            time.sleep(0.05)
    return 0 if killed is None else int(killed[0])


def test_claims_go_on_after_the_servers_backends_are_killed(pg_url: str) -> None:
    with Ledger.open(pg_url) as ledger:
        lot = _prepare_lot(ledger, 4)
        first = _claim_one(ledger, lot, STATION, "SN-POOL-1", "p1")
        # The pool holds connections the server has just closed (well under PG_PING_IDLE_S ago): the
        # socket check must notice and replace them, or this claim fails with LedgerUnavailableError.
        assert _terminate_ledger_backends(pg_url) >= 1
        second = _claim_one(ledger, lot, STATION, "SN-POOL-2", "p2")
        assert second != first
        record = ledger.find_device(second)
        assert record is not None
        assert record.state is DeviceState.PROVISIONED
        assert record.hw_serial == "SN-POOL-2"
        assert ledger.verify_audit() >= 4


def _server_form(sql: str) -> str:
    """A statement as the server shows it: psycopg numbers the named parameters in order of appearance."""
    numbers: dict[str, int] = {}
    return re.sub(r"%\((\w+)\)s", lambda m: f"${numbers.setdefault(m[1], len(numbers) + 1)}", sql)


def test_the_hot_statements_are_prepared_on_the_server_and_nothing_else_is(pg_url: str) -> None:
    """psycopg ignores ``prepare=True`` on a connection whose prepare threshold is None: that once cost
    every claim a parse and plan per statement on the server (twice the server's CPU per claim)."""
    with Ledger.open(pg_url) as ledger:
        lot = _prepare_lot(ledger, 10)
        for index in range(6):
            _claim_one(ledger, lot, STATION, f"serial-{index}", "1")
        fairy = ledger._engine.raw_connection()
        try:
            cursor = fairy.driver_connection.cursor()  # type: ignore[union-attr]
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            prepared = [row[0] for row in cursor.fetchall()]
            cursor.close()
        finally:
            fairy.close()
    hot = ledger._sql
    assert hot.reserve_and_append is not None
    assert hot.provision_at_once is not None
    # With the chain's head remembered (the lot's set-up appended to it), each reservation and each
    # provision is one autocommit statement.
    for command in (hot.reserve_and_append, hot.provision_at_once):
        assert _server_form(command.sql) in prepared
    # The import and the lot set-up ran on the same connection and stayed unprepared.
    assert all(statement.startswith(("SELECT", "WITH", "UPDATE", "INSERT")) for statement in prepared)
    assert not any("lot_id, device_id, state, metadata" in statement for statement in prepared)


def test_an_id_import_leaves_the_device_table_analysed(pg_url: str) -> None:
    """A fresh lot's claims plan on real statistics, not on those of the empty table (#20c)."""
    with Ledger.open(pg_url) as ledger:
        _prepare_lot(ledger, 500)
    with psycopg.connect(_libpq(pg_url), autocommit=True) as admin:
        row = admin.execute(
            "SELECT c.reltuples, s.last_analyze FROM pg_class c JOIN pg_stat_user_tables s "
            "ON s.relid = c.oid WHERE c.relname = 'device'"
        ).fetchone()
    assert row is not None
    reltuples, last_analyze = row
    assert reltuples >= 500
    assert last_analyze is not None
