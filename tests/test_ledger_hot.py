"""The hot path's compiled statements: typed rows checked at compile time, SQLAlchemy's processors applied."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import bindparam
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from factoryd.errors import InputError, LedgerError
from factoryd.ledger.engine import require_serial
from factoryd.ledger.hot import LOT, Command, DeviceRowView, HotStatements, LotIdRow, LotStateRow, Query, Tx

SQLITE = sqlite.dialect(paramstyle="named")
RESERVED_AT = datetime(2026, 3, 7, 14, 0, 1, 500, tzinfo=UTC)


@pytest.mark.parametrize(
    "dialect", [sqlite.dialect(), postgresql.psycopg.dialect()], ids=["sqlite", "postgresql"]
)
def test_every_statement_compiles_for_both_backends(dialect: Dialect) -> None:
    statements = HotStatements.compile(dialect)
    fields = dataclasses.fields(statements)
    assert len(fields) == 32
    for field in fields:
        compiled = getattr(statements, field.name)
        postgres_only = (
            "append_audit",
            "provision_and_append",
            "reserve_next",
            "reserve_and_append",
            "provision_at_once",
            "provision_at_once_finishing",
        )
        if field.name in postgres_only and dialect.name != "postgresql":
            assert compiled is None  # SQLite has no data-modifying CTEs: advance_head + insert_audit
            continue
        assert isinstance(compiled, Command), field.name
        assert compiled.sql.split()[0] in ("SELECT", "INSERT", "UPDATE", "WITH"), field.name
    if dialect.name == "postgresql":
        assert "FOR UPDATE SKIP LOCKED" in statements.claim.sql
        assert "FOR SHARE" in statements.lot_shared.sql
        for merged in (statements.lot_device_by_serial, statements.lot_device_by_id):
            # The lot is share-locked before (materialised CTE) the device row is locked (LATERAL), and
            # the row carries the transaction id for the lost-COMMIT read-back.
            assert merged.sql.startswith("WITH shared_lot AS MATERIALIZED"), merged.sql
            assert merged.sql.index("FOR SHARE") < merged.sql.index("LEFT OUTER JOIN LATERAL")
            assert "FOR UPDATE" in merged.sql.split("LATERAL", 1)[1]
            assert "pg_current_xact_id()" in merged.sql
        assert statements.append_audit is not None
        # One round trip: the head moves only from the link it names, and the link rides on it.
        assert statements.append_audit.sql.startswith("WITH advanced AS")
        assert "audit_head.seq = %(old_seq)s" in statements.append_audit.sql
        # The lot check, the serial's own row and the claim: locks in the order of the separate statements,
        # the claim only if the serial has no row, walking the (lot, state, id) index of the lot.
        folded = statements.reserve_next
        assert folded is not None
        sql = folded.sql
        assert sql.index("FOR SHARE") < sql.index("FOR UPDATE OF device") < sql.index("SKIP LOCKED")
        assert "free.lot_id = (SELECT shared_lot.id" in sql
        assert "NOT (EXISTS (SELECT * \nFROM existing))" in sql
        assert "pg_current_xact_id()" in sql
        # The provision and its link: the head moves only if the provision touched its row.
        combined = statements.provision_and_append
        assert combined is not None
        assert combined.sql.startswith("WITH changed AS \n(UPDATE device SET state")
        advanced = combined.sql.split("advanced AS", 1)[1].split("appended AS", 1)[0]
        assert "audit_head.seq = %(old_seq)s" in advanced
        assert "EXISTS (SELECT * \nFROM changed)" in advanced
        assert "FOR UPDATE" in statements.lot_locked.sql
        assert "ON CONFLICT (chain) DO NOTHING" in statements.insert_head.sql
    else:
        # SQLite renders no row locks, and binds by name so one parameter dict serves both drivers.
        assert "FOR UPDATE" not in statements.claim.sql
        assert ":lot_id" in statements.claim.sql


def test_a_query_whose_row_type_does_not_match_its_columns_is_refused() -> None:
    statement = core_select(LOT.c.id, LOT.c.state).where(LOT.c.name == bindparam("name"))
    with pytest.raises(LedgerError, match=r"returns columns \('id', 'state'\), its row type has \('id',\)"):
        Query(statement, SQLITE, LotIdRow._make, LotIdRow._fields)
    assert Query(statement, SQLITE, LotStateRow._make, LotStateRow._fields).sql.startswith("SELECT")


def test_a_statement_needing_per_execution_rendering_is_refused() -> None:
    expanding = core_select(LOT.c.id).where(LOT.c.name.in_(bindparam("names", expanding=True)))
    with pytest.raises(LedgerError, match="per-execution rendering"):
        Query(expanding, SQLITE, LotIdRow._make, LotIdRow._fields)


def _raw_device(reserved_at: str | None, metadata: str) -> tuple[object, ...]:
    """A device row as the sqlite3 driver returns it (text timestamps, JSON as text)."""
    return (
        7,
        "dev-1",
        "reserved",
        metadata,
        "se-1",
        "st1",
        "3",
        None,
        reserved_at,
        None,
        None,
        None,
        None,
        None,
    )


def test_rows_get_sqlalchemys_result_processing() -> None:
    query = HotStatements.compile(sqlite.dialect()).device_by_serial
    row = query.make_row(_raw_device("2026-03-07 14:00:01.000500", '{"batch": "7"}'))
    assert isinstance(row, DeviceRowView)
    assert row.metadata == {"batch": "7"}
    assert row.reserved_at == RESERVED_AT.replace(tzinfo=None)
    assert (row.id, row.device_id, row.hw_serial, row.provisioned_at) == (7, "dev-1", "se-1", None)
    # NULLs stay None instead of going through a processor.
    assert query.make_row(_raw_device(None, "{}")).reserved_at is None


def test_parameters_get_defaults_and_bind_processing() -> None:
    statements = HotStatements.compile(sqlite.dialect())
    params = statements.reserve.params({"row_id": 7, "b_at": RESERVED_AT, "b_job_id": None})
    # The literal state is a default of the compiled statement; SQLite stores datetimes as text.
    assert "reserved" in params.values()
    assert params["b_at"] == "2026-03-07 14:00:01.000500"
    assert params["row_id"] == 7
    assert params["b_job_id"] is None


class _Cursor:
    """A DBAPI cursor stand-in that returns canned rows."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int = 0) -> None:
        self.rows = rows
        self.rowcount = rowcount
        self.executed: list[tuple[str, Mapping[str, Any]]] = []

    def execute(self, sql: str, params: Mapping[str, Any], /) -> object:
        self.executed.append((sql, params))
        return self

    def fetchone(self) -> Sequence[Any] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> Sequence[Sequence[Any]]:
        return self.rows


def test_tx_runs_the_compiled_sql_and_types_the_rows() -> None:
    statements = HotStatements.compile(sqlite.dialect())
    empty = _Cursor([])
    assert Tx(empty).first(statements.lot_id, {"name": "lot-a"}) is None
    assert empty.executed == [(statements.lot_id.sql, {"name": "lot-a"})]
    found = Tx(_Cursor([(4, "active")])).first(statements.lot_shared, {"name": "lot-a"})
    assert found == LotStateRow(id=4, state="active")
    counts = Tx(_Cursor([("available", 3), ("void", 1)])).all(statements.count_by_state, {"lot_id": 4})
    assert [(c.state, c.ids) for c in counts] == [("available", 3), ("void", 1)]
    assert Tx(_Cursor([], rowcount=2)).execute(statements.abandon_jobs, {"station": "st1"}) == 2


def test_a_serial_with_any_unicode_whitespace_is_refused() -> None:
    """The serial check searches for the space only (hot path): every other whitespace is unprintable."""
    spaces = [chr(code) for code in range(sys.maxunicode + 1) if chr(code).isspace()]
    assert len(spaces) > 20  # tab, newline, NBSP, the Unicode separators, ...
    for space in spaces:
        with pytest.raises(InputError):
            require_serial(f"se{space}01")
    assert require_serial("se-01:ab") == "se-01:ab"
