"""The ledger's hot path: Core statements compiled once per dialect and run on the driver cursor.

A provisioned board costs the ledger about twenty statements in four transactions. Through the
ORM (or even SQLAlchemy Core's execution machinery) that is milliseconds of CPU per board; the
SQL itself is microseconds. So the per-board statements are written once as SQLAlchemy Core
constructs (the tables stay the single source of truth), compiled once per dialect to the
driver's SQL, and executed straight on the DBAPI cursor with SQLAlchemy's own bind and result
processors for each column type. Transactions and locking are exactly those of the statements:
FOR SHARE on the lot, FOR UPDATE on device/job/head rows, SKIP LOCKED for the claim on
PostgreSQL; SQLite renders none of these and serialises writers with ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, cast

import psycopg
from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import Delete, Insert, Select, Update

from factoryd.errors import LedgerError
from factoryd.ledger.model import DeviceState
from factoryd.ledger.tables import (
    AUDIT_HEAD_ROW_ID,
    AttemptRow,
    AuditEntryRow,
    AuditHeadRow,
    DeviceRow,
    JobRow,
    LotRow,
)

LOT = cast(Table, LotRow.__table__)  # type: ignore[attr-defined]
DEVICE = cast(Table, DeviceRow.__table__)  # type: ignore[attr-defined]
JOB = cast(Table, JobRow.__table__)  # type: ignore[attr-defined]
ATTEMPT = cast(Table, AttemptRow.__table__)  # type: ignore[attr-defined]
AUDIT = cast(Table, AuditEntryRow.__table__)  # type: ignore[attr-defined]
HEAD = cast(Table, AuditHeadRow.__table__)  # type: ignore[attr-defined]

DEVICE_COLUMNS = (
    DEVICE.c.id,
    DEVICE.c.device_id,
    DEVICE.c.state,
    DEVICE.c["metadata"],
    DEVICE.c.hw_serial,
    DEVICE.c.station,
    DEVICE.c.port,
    DEVICE.c.job_id,
    DEVICE.c.reserved_at,
    DEVICE.c.provisioned_at,
    DEVICE.c.cert_der,
    DEVICE.c.cert_serial,
    DEVICE.c.cert_fingerprint_sha256,
    DEVICE.c.void_reason,
)

# Driver errors the hot path translates (SQLAlchemy does not see these calls).
DRIVER_INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError, psycopg.IntegrityError)
DRIVER_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.OperationalError,
    sqlite3.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
DRIVER_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)

_Statement = Select[Any] | Insert | Update | Delete


def _statements() -> dict[str, _Statement]:
    """Every hot-path statement by name; parameters are bindparams, literals become defaults."""
    return {
        "lot_id": core_select(LOT.c.id).where(LOT.c.name == bindparam("name")),
        "lot_shared": core_select(LOT.c.id, LOT.c.state)
        .where(LOT.c.name == bindparam("name"))
        .with_for_update(read=True),
        "head_locked": core_select(HEAD.c.seq, HEAD.c.hash)
        .where(HEAD.c.id == AUDIT_HEAD_ROW_ID)
        .with_for_update(),
        "insert_audit": insert(AUDIT).values(
            seq=bindparam("b_seq"),
            at=bindparam("b_at"),
            actor=bindparam("b_actor"),
            action=bindparam("b_action"),
            subject=bindparam("b_subject"),
            details=bindparam("b_details"),
            prev_hash=bindparam("b_prev_hash"),
            hash=bindparam("b_hash"),
        ),
        "update_head": update(HEAD)
        .where(HEAD.c.id == AUDIT_HEAD_ROW_ID)
        .values(seq=bindparam("b_seq"), hash=bindparam("b_hash")),
        "device_by_serial_locked": core_select(*DEVICE_COLUMNS)
        .where(DEVICE.c.lot_id == bindparam("lot_id"), DEVICE.c.hw_serial == bindparam("hw_serial"))
        .with_for_update(),
        "device_by_serial": core_select(*DEVICE_COLUMNS).where(
            DEVICE.c.lot_id == bindparam("lot_id"), DEVICE.c.hw_serial == bindparam("hw_serial")
        ),
        "device_by_id_locked": core_select(*DEVICE_COLUMNS)
        .where(DEVICE.c.lot_id == bindparam("lot_id"), DEVICE.c.device_id == bindparam("device_id"))
        .with_for_update(),
        "device_any_lot": core_select(*DEVICE_COLUMNS, LOT.c.name.label("lot_name"))
        .join(LOT, LOT.c.id == DEVICE.c.lot_id)
        .where(DEVICE.c.device_id == bindparam("device_id")),
        # The claim: first available ID of the lot in import order, skipping rows other
        # stations hold locked right now (PostgreSQL).
        "claim": core_select(*DEVICE_COLUMNS)
        .where(DEVICE.c.lot_id == bindparam("lot_id"), DEVICE.c.state == DeviceState.AVAILABLE.value)
        .order_by(DEVICE.c.id)
        .limit(1)
        .with_for_update(skip_locked=True),
        "reserve": update(DEVICE)
        .where(DEVICE.c.id == bindparam("row_id"))
        .values(
            state=DeviceState.RESERVED.value,
            hw_serial=bindparam("b_hw_serial"),
            station=bindparam("b_station"),
            port=bindparam("b_port"),
            job_id=bindparam("b_job_id"),
            reserved_at=bindparam("b_at"),
        ),
        "move_reservation": update(DEVICE)
        .where(DEVICE.c.id == bindparam("row_id"))
        .values(station=bindparam("b_station"), port=bindparam("b_port"), job_id=bindparam("b_job_id")),
        "provision": update(DEVICE)
        .where(DEVICE.c.id == bindparam("row_id"))
        .values(
            state=DeviceState.PROVISIONED.value,
            cert_der=bindparam("b_cert_der"),
            cert_serial=bindparam("b_cert_serial"),
            cert_fingerprint_sha256=bindparam("b_fingerprint"),
            provisioned_at=bindparam("b_at"),
            station=bindparam("b_station"),
            port=bindparam("b_port"),
        ),
        "void": update(DEVICE)
        .where(DEVICE.c.id == bindparam("row_id"))
        .values(state=DeviceState.VOID.value, void_reason=bindparam("b_reason")),
        "insert_job": insert(JOB)
        .values(
            lot_id=bindparam("b_lot_id"),
            station=bindparam("b_station"),
            port=bindparam("b_port"),
            hw_serial=bindparam("b_hw_serial"),
            started_at=bindparam("b_at"),
        )
        .returning(JOB.c.id),
        "job_locked": core_select(JOB.c.id, JOB.c.outcome, JOB.c.finished_at)
        .where(JOB.c.id == bindparam("job_id"))
        .with_for_update(),
        "job_open": core_select(JOB.c.id, JOB.c.station, JOB.c.port, JOB.c.finished_at).where(
            JOB.c.id == bindparam("job_id")
        ),
        # A station starting up closes what it left open when it died (its boards resume by serial).
        "abandon_jobs": update(JOB)
        .where(JOB.c.station == bindparam("station"), JOB.c.finished_at.is_(None))
        .values(finished_at=bindparam("b_at"), outcome="abandoned", reason=bindparam("b_reason")),
        "set_job_serial": update(JOB)
        .where(JOB.c.id == bindparam("job_id"))
        .values(hw_serial=bindparam("b_hw_serial")),
        # Only an open job is finished: "already finished" is a 0-row update, atomically.
        "finish_job": update(JOB)
        .where(JOB.c.id == bindparam("job_id"), JOB.c.finished_at.is_(None))
        .values(finished_at=bindparam("b_at"), outcome=bindparam("b_outcome"), reason=bindparam("b_reason")),
        "insert_attempt": insert(ATTEMPT).values(
            job_id=bindparam("b_job_id"),
            step=bindparam("b_step"),
            outcome=bindparam("b_outcome"),
            reason=bindparam("b_reason"),
            duration_s=bindparam("b_duration_s"),
            at=bindparam("b_at"),
        ),
    }


class Prepared:
    """One statement compiled for one dialect, with the type processors SQLAlchemy would apply."""

    __slots__ = ("binds", "defaults", "name", "results", "row", "sql")

    def __init__(self, name: str, statement: _Statement, dialect: Dialect) -> None:
        """Compile ``statement`` for ``dialect``; LedgerError if it needs per-execution rendering."""
        compiled = statement.compile(dialect=dialect)
        self.name = name
        self.sql = str(compiled)
        if "POSTCOMPILE" in self.sql:
            raise LedgerError(f"hot statement {name} needs per-execution rendering: {self.sql}")
        self.defaults: dict[str, Any] = {k: v for k, v in compiled.params.items() if v is not None}
        binds: dict[str, Callable[[Any], Any]] = {}
        for key in compiled.params:
            processor = compiled.binds[key].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                binds[key] = processor
        self.binds = binds
        # SELECT columns, or an INSERT's RETURNING columns (none for plain DML).
        returned = tuple(statement.exported_columns)
        self.results: tuple[Callable[[Any], Any] | None, ...] = tuple(
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in returned
        )
        self.row: Any = namedtuple(f"{name}_row", [c.key or f"c{i}" for i, c in enumerate(returned)])  # type: ignore[misc]

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The driver parameters for one execution."""
        params = {**self.defaults, **given}
        for key, process in self.binds.items():
            value = params.get(key)
            if value is not None:
                params[key] = process(value)
        return params

    def make_row(self, raw: tuple[Any, ...]) -> Any:
        """A named row with SQLAlchemy's result processing applied."""
        return self.row._make(
            value if process is None or value is None else process(value)
            for process, value in zip(self.results, raw, strict=True)
        )


class HotStatements:
    """Every hot-path statement compiled for one engine's dialect."""

    def __init__(self, dialect: Dialect) -> None:
        """Compile for ``dialect`` (SQLite with named parameters, so a dict binds on both drivers)."""
        if dialect.name == "sqlite":
            dialect = sqlite_dialect.dialect(paramstyle="named")
        self.by_name = {name: Prepared(name, stmt, dialect) for name, stmt in _statements().items()}

    def __getitem__(self, name: str) -> Prepared:
        return self.by_name[name]


class Tx:
    """One transaction on a driver cursor (the caller owns begin/commit)."""

    __slots__ = ("_cursor", "_statements")

    def __init__(self, cursor: Any, statements: HotStatements) -> None:
        """Run ``statements`` on ``cursor``."""
        self._cursor = cursor
        self._statements = statements

    def execute(self, name: str, params: Mapping[str, Any] | None = None) -> int:
        """Execute a statement; return the affected row count."""
        prepared = self._statements[name]
        self._cursor.execute(prepared.sql, prepared.params(params or {}))
        return int(self._cursor.rowcount)

    def first(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """Execute a statement; return its first row (named tuple) or None."""
        prepared = self._statements[name]
        self._cursor.execute(prepared.sql, prepared.params(params or {}))
        raw = self._cursor.fetchone()
        return None if raw is None else prepared.make_row(tuple(raw))


@contextmanager
def driver_transaction(driver: Any, *, sqlite: bool, write: bool) -> Iterator[Any]:
    """BEGIN (IMMEDIATE for writers on SQLite), yield a cursor, COMMIT; ROLLBACK on any error."""
    cursor = driver.cursor()
    try:
        if sqlite:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        yield cursor
        driver.commit()
    except BaseException:
        # The original error is the one to report; a failed rollback leaves the reset to the pool.
        with suppress(*DRIVER_ERRORS):
            driver.rollback()
        raise
    finally:
        cursor.close()
