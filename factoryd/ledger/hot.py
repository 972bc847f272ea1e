"""The ledger's hot path: Core statements compiled once per engine and run on the driver cursor.

A provisioned board costs the ledger about twenty statements in four transactions. Through the
ORM (or even SQLAlchemy Core's execution machinery) that is milliseconds of CPU per board; the
SQL itself is microseconds. So the per-board statements are written once as SQLAlchemy Core
constructs (the tables stay the single source of truth), compiled once per dialect to the
driver's SQL, and executed straight on the DBAPI cursor with SQLAlchemy's own bind and result
processors for each column type. Each statement is an attribute of :class:`HotStatements`; a
query names the row type it returns, checked against its columns when it is compiled.
Transactions and locking are exactly those of the statements: FOR SHARE on the lot, FOR UPDATE
on device/job rows, the head row of the one audit chain appended to locked by its conditional
UPDATE (or FOR UPDATE when re-read), SKIP LOCKED for the claim on PostgreSQL; SQLite renders none
of these and serialises writers with ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, cast

import psycopg
from sqlalchemy import (
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    null,
    or_,
    true,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ColumnElement, Insert, Select, Update
from sqlalchemy.sql.selectable import CTE

from factoryd.errors import LedgerError
from factoryd.ledger.model import DeviceState, LotState
from factoryd.ledger.tables import (
    AttemptRow,
    AuditEntryRow,
    AuditHeadRow,
    DeviceRow,
    JobRow,
    LotRow,
    SignerIssuanceRow,
    SignerLotRow,
)

LOT = cast(Table, LotRow.__table__)  # type: ignore[attr-defined]
DEVICE = cast(Table, DeviceRow.__table__)  # type: ignore[attr-defined]
JOB = cast(Table, JobRow.__table__)  # type: ignore[attr-defined]
ATTEMPT = cast(Table, AttemptRow.__table__)  # type: ignore[attr-defined]
AUDIT = cast(Table, AuditEntryRow.__table__)  # type: ignore[attr-defined]
HEAD = cast(Table, AuditHeadRow.__table__)  # type: ignore[attr-defined]
SIGNER_LOT = cast(Table, SignerLotRow.__table__)  # type: ignore[attr-defined]
SIGNER_ISSUANCE = cast(Table, SignerIssuanceRow.__table__)  # type: ignore[attr-defined]

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


# -- the rows the queries return -------------------------------------------------------------


class LotIdRow(NamedTuple):
    """A lot's primary key."""

    id: int


class LotStateRow(NamedTuple):
    """A lot's primary key and state."""

    id: int
    state: str


class HeadRow(NamedTuple):
    """An audit chain's head."""

    seq: int
    hash: str


class DeviceRowView(NamedTuple):
    """One ``device`` row, every column of :data:`DEVICE_COLUMNS` in order."""

    id: int
    device_id: str
    state: str
    metadata: dict[str, str]
    hw_serial: str | None
    station: str | None
    port: str | None
    job_id: int | None
    reserved_at: datetime | None
    provisioned_at: datetime | None
    cert_der: bytes | None
    cert_serial: str | None
    cert_fingerprint_sha256: str | None
    void_reason: str | None


class DeviceInLotRow(NamedTuple):
    """A device row and the name of its lot."""

    device: DeviceRowView
    lot_name: str


def _device_in_lot(values: Iterable[Any]) -> DeviceInLotRow:
    """A :class:`DeviceInLotRow` from the device columns followed by the lot name."""
    columns = tuple(values)
    return DeviceInLotRow(DeviceRowView._make(columns[:-1]), columns[-1])


class LotDeviceRow(NamedTuple):
    """A lot's id and state, the transaction's id (PostgreSQL), and the device row looked up with it."""

    lot_id: int
    lot_state: str
    xid: str | None
    device: DeviceRowView | None


_LOT_DEVICE_COLUMNS = ("lot_id", "lot_state", "xid", *DeviceRowView._fields)


def _lot_device(values: Iterable[Any]) -> LotDeviceRow:
    """A :class:`LotDeviceRow` from the lot columns, the xid and the (outer-joined) device columns."""
    columns = tuple(values)
    device = None if columns[3] is None else DeviceRowView._make(columns[3:])
    return LotDeviceRow(columns[0], columns[1], columns[2], device)


class LotReserveRow(NamedTuple):
    """The lot check, the chain's head (locked; None before its first link), the serial's own row if it
    has one, and the ID claimed for it if it had none."""

    lot_id: int
    lot_state: str
    xid: str | None
    head: HeadRow | None
    existing: DeviceRowView | None
    claimed: DeviceRowView | None


_DEVICE_WIDTH = len(DeviceRowView._fields)
# The serial's own row and the row claimed for it, outer-joined side by side (their columns e_*, c_*).
_DEVICE_PAIR_COLUMNS = (
    *(f"e_{name}" for name in DeviceRowView._fields),
    *(f"c_{name}" for name in DeviceRowView._fields),
)
_LOT_RESERVE_COLUMNS = ("lot_id", "lot_state", "xid", "head_seq", "head_hash", *_DEVICE_PAIR_COLUMNS)


def _device_pair(columns: tuple[Any, ...]) -> tuple[DeviceRowView | None, DeviceRowView | None]:
    """The serial's own row and the claimed row from a row's last columns (None where not joined)."""
    existing, claimed = columns[-2 * _DEVICE_WIDTH : -_DEVICE_WIDTH], columns[-_DEVICE_WIDTH:]
    return (
        None if existing[0] is None else DeviceRowView._make(existing),
        None if claimed[0] is None else DeviceRowView._make(claimed),
    )


def _lot_reserve(values: Iterable[Any]) -> LotReserveRow:
    """A :class:`LotReserveRow` from the lot columns, the xid, the head and the (outer-joined) device rows."""
    columns = tuple(values)
    head = None if columns[3] is None else HeadRow(columns[3], columns[4])
    return LotReserveRow(columns[0], columns[1], columns[2], head, *_device_pair(columns))


class ReserveAppendRow(NamedTuple):
    """What a one-statement reservation did: the lot, whether the head was current, the link it wrote."""

    lot_id: int
    lot_state: str
    head_current: bool
    link_hash: str | None
    existing: DeviceRowView | None
    claimed: DeviceRowView | None


_RESERVE_APPEND_COLUMNS = ("lot_id", "lot_state", "head_current", "link_hash", *_DEVICE_PAIR_COLUMNS)


def _reserve_append(values: Iterable[Any]) -> ReserveAppendRow:
    """A :class:`ReserveAppendRow` from the lot columns, the head's test, the link and the two device rows."""
    columns = tuple(values)
    return ReserveAppendRow(columns[0], columns[1], bool(columns[2]), columns[3], *_device_pair(columns))


class StateCountRow(NamedTuple):
    """How many IDs of a lot are in one state."""

    state: str
    ids: int


class JobIdRow(NamedTuple):
    """A job's primary key."""

    id: int


class JobStateRow(NamedTuple):
    """Whether and how a job ended."""

    id: int
    outcome: str | None
    finished_at: datetime | None


class JobHolderRow(NamedTuple):
    """Where a job runs and whether it still does."""

    id: int
    station: str
    port: str
    finished_at: datetime | None


# -- compiled statements ---------------------------------------------------------------------

_RowT = TypeVar("_RowT")


class DriverCursor(Protocol):
    """The part of a DBAPI cursor (sqlite3, psycopg) the hot path uses: the typing boundary."""

    @property
    def rowcount(self) -> int:
        """Rows the last statement changed."""
        ...

    def execute(self, sql: str, params: Mapping[str, Any], /) -> object:
        """Run one statement."""
        ...

    def fetchone(self) -> Sequence[Any] | None:
        """The next row's raw values, or None."""
        ...

    def fetchall(self) -> Sequence[Sequence[Any]]:
        """Every remaining row's raw values."""
        ...


class Command:
    """One statement compiled for one dialect, with the bind processors SQLAlchemy would apply."""

    __slots__ = ("_binds", "_defaults", "sql")

    def __init__(self, statement: Select[Any] | Insert | Update, dialect: Dialect) -> None:
        """Compile ``statement``; LedgerError if it needs per-execution rendering."""
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        if "POSTCOMPILE" in self.sql:
            raise LedgerError(f"hot statement needs per-execution rendering: {self.sql}")
        self._defaults: dict[str, Any] = {k: v for k, v in compiled.params.items() if v is not None}
        binds: list[tuple[str, Callable[[Any], Any]]] = []
        for key in compiled.params:
            processor = compiled.binds[key].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                binds.append((key, processor))
        self._binds = tuple(binds)

    def params(self, given: Mapping[str, object]) -> dict[str, Any]:
        """The driver parameters for one execution."""
        params = {**self._defaults, **given}
        for key, process in self._binds:
            value = params.get(key)
            if value is not None:
                params[key] = process(value)
        return params


class Query(Command, Generic[_RowT]):
    """A statement that returns rows (a SELECT, or DML with RETURNING), made into ``_RowT``."""

    __slots__ = ("_make", "_results")

    def __init__(
        self,
        statement: Select[Any] | Insert | Update,
        dialect: Dialect,
        make: Callable[[Iterable[Any]], _RowT],
        columns: tuple[str, ...],
    ) -> None:
        """Compile ``statement`` whose rows ``make`` types; LedgerError unless it returns ``columns``."""
        super().__init__(statement, dialect)
        returned = tuple(statement.exported_columns)
        keys = tuple(c.key or "" for c in returned)
        if keys != columns:
            raise LedgerError(f"hot statement returns columns {keys}, its row type has {columns}: {self.sql}")
        self._make = make
        # Only the columns that need one: most rows skip processing entirely on PostgreSQL.
        self._results = tuple(
            (index, process)
            for index, column in enumerate(returned)
            if (process := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
        )

    def make_row(self, raw: Sequence[Any]) -> _RowT:
        """The typed row with SQLAlchemy's result processing applied."""
        if not self._results:
            return self._make(raw)
        values = list(raw)
        for index, process in self._results:
            value = values[index]
            if value is not None:
                values[index] = process(value)
        return self._make(values)


@dataclass(frozen=True, slots=True)
class HotStatements:
    """Every hot-path statement compiled for one dialect; parameters are bindparams."""

    lot_id: Query[LotIdRow]
    lot_shared: Query[LotStateRow]
    lot_locked: Query[LotIdRow]
    lot_device_by_serial: Query[LotDeviceRow]
    lot_device_by_id: Query[LotDeviceRow]
    head_locked: Query[HeadRow]
    insert_head: Command
    insert_audit: Command
    advance_head: Command
    append_audit: Command | None
    provision_and_append: Query[ChangeAppendRow] | None
    provision_at_once: Query[ProvisionAtOnceRow] | None
    provision_at_once_finishing: Query[ProvisionAtOnceRow] | None
    device_by_serial: Query[DeviceRowView]
    device_by_id_locked: Query[DeviceRowView]
    device_any_lot: Query[DeviceInLotRow]
    claim: Query[DeviceRowView]
    reserve_next: Query[LotReserveRow] | None
    reserve_and_append: Query[ReserveAppendRow] | None
    reserve: Command
    move_reservation: Command
    provision: Command
    void: Command
    provisioned_in_lot: Query[DeviceRowView]
    count_by_state: Query[StateCountRow]
    insert_job: Query[JobIdRow]
    job_locked: Query[JobStateRow]
    job_open: Query[JobHolderRow]
    abandon_jobs: Command
    set_job_serial: Command
    finish_job: Command
    insert_attempt: Command

    @classmethod
    def compile(cls, dialect: Dialect) -> HotStatements:
        """Compile for ``dialect`` (SQLite with named parameters, so a dict binds on both drivers)."""
        d = sqlite_dialect.dialect(paramstyle="named") if dialect.name == "sqlite" else dialect
        devices = core_select(*DEVICE_COLUMNS)
        in_lot = DEVICE.c.lot_id == bindparam("lot_id")
        return cls(
            lot_id=Query(
                core_select(LOT.c.id).where(LOT.c.name == bindparam("name")),
                d,
                LotIdRow._make,
                LotIdRow._fields,
            ),
            lot_shared=Query(
                core_select(LOT.c.id, LOT.c.state)
                .where(LOT.c.name == bindparam("name"))
                .with_for_update(read=True),
                d,
                LotStateRow._make,
                LotStateRow._fields,
            ),
            # Exclusive: CRL numbers of a lot are taken one at a time (shared holders are claims).
            lot_locked=Query(
                core_select(LOT.c.id).where(LOT.c.name == bindparam("name")).with_for_update(),
                d,
                LotIdRow._make,
                LotIdRow._fields,
            ),
            # The lot check and the device lookup of reserve / mark_provisioned / void in one round trip,
            # with the transaction id the lost-COMMIT read-back needs (engine.py ``_hot``).
            lot_device_by_serial=Query(
                _lot_device_statement(DEVICE.c.hw_serial == bindparam("hw_serial"), dialect.name),
                d,
                _lot_device,
                _LOT_DEVICE_COLUMNS,
            ),
            lot_device_by_id=Query(
                _lot_device_statement(DEVICE.c.device_id == bindparam("device_id"), dialect.name),
                d,
                _lot_device,
                _LOT_DEVICE_COLUMNS,
            ),
            # One chain's head: appends to other chains (other stations) do not wait for it.
            head_locked=Query(
                core_select(HEAD.c.seq, HEAD.c.hash)
                .where(HEAD.c.chain == bindparam("chain"))
                .with_for_update(),
                d,
                HeadRow._make,
                HeadRow._fields,
            ),
            # A chain's first append creates its head; two writers racing for it both go on.
            insert_head=Command(
                (postgresql_dialect.insert if dialect.name == "postgresql" else sqlite_dialect.insert)(HEAD)
                .values(chain=bindparam("b_chain"), seq=0, hash=bindparam("b_hash"))
                .on_conflict_do_nothing(index_elements=[HEAD.c.chain]),
                d,
            ),
            insert_audit=Command(
                insert(AUDIT).values(
                    chain=bindparam("b_chain"),
                    chain_seq=bindparam("b_seq"),
                    at=bindparam("b_at"),
                    actor=bindparam("b_actor"),
                    action=bindparam("b_action"),
                    subject=bindparam("b_subject"),
                    details=bindparam("b_details"),
                    prev_hash=bindparam("b_prev_hash"),
                    hash=bindparam("b_hash"),
                ),
                d,
            ),
            # Optimistic append: moves the head only if it is still the link the writer chained onto
            # (1 row: it is now locked by this transaction; 0 rows: re-read it FOR UPDATE).
            advance_head=Command(_advance_head(), d),
            # PostgreSQL: advance the head and insert the link in one round trip (the INSERT takes the
            # RETURNING row, so no head moved means no link inserted).
            append_audit=Command(_append_audit_statement(), d) if dialect.name == "postgresql" else None,
            device_by_serial=Query(
                devices.where(in_lot, DEVICE.c.hw_serial == bindparam("hw_serial")),
                d,
                DeviceRowView._make,
                DeviceRowView._fields,
            ),
            device_by_id_locked=Query(
                devices.where(in_lot, DEVICE.c.device_id == bindparam("device_id")).with_for_update(),
                d,
                DeviceRowView._make,
                DeviceRowView._fields,
            ),
            device_any_lot=Query(
                core_select(*DEVICE_COLUMNS, LOT.c.name.label("lot_name"))
                .join(LOT, LOT.c.id == DEVICE.c.lot_id)
                .where(DEVICE.c.device_id == bindparam("device_id")),
                d,
                _device_in_lot,
                (*DeviceRowView._fields, "lot_name"),
            ),
            # The claim and the reservation in one statement: the first available ID of the lot in
            # import order, skipping rows other stations hold locked right now (PostgreSQL), bound to
            # the board; the row comes back as it now is. The state and the limit are SQL literals,
            # not parameters: as parameters, the server's generic plan for the prepared statement
            # looks costlier than one made for the values, and PostgreSQL planned it on every claim.
            claim=Query(
                update(DEVICE)
                .where(
                    DEVICE.c.id
                    == core_select(DEVICE.c.id)
                    .where(in_lot, DEVICE.c.state == literal_column(f"'{DeviceState.AVAILABLE.value}'"))
                    .order_by(DEVICE.c.id)
                    .limit(literal_column("1", Integer))
                    .with_for_update(skip_locked=True)
                    .scalar_subquery()
                )
                .values(_reserved_values())
                .returning(*DEVICE_COLUMNS),
                d,
                DeviceRowView._make,
                DeviceRowView._fields,
            ),
            # PostgreSQL: the lot check, the serial's own row and, if it has none, the claim, in one
            # round trip (``_reserve_next_statement``).
            reserve_next=(
                Query(_reserve_next_statement(), d, _lot_reserve, _LOT_RESERVE_COLUMNS)
                if dialect.name == "postgresql"
                else None
            ),
            # PostgreSQL: the whole reservation, its audit link included, in one autocommit statement
            # (``_reserve_and_append_statement``; engine.py ``_hot_statement``).
            reserve_and_append=(
                Query(_reserve_and_append_statement(), d, _reserve_append, _RESERVE_APPEND_COLUMNS)
                if dialect.name == "postgresql"
                else None
            ),
            reserve=Command(
                update(DEVICE).where(DEVICE.c.id == bindparam("row_id")).values(_reserved_values()), d
            ),
            move_reservation=Command(
                update(DEVICE)
                .where(DEVICE.c.id == bindparam("row_id"))
                .values(
                    station=bindparam("b_station"), port=bindparam("b_port"), job_id=bindparam("b_job_id")
                ),
                d,
            ),
            provision=Command(_provision(), d),
            # PostgreSQL: the provision and its audit link in one round trip (engine.py
            # ``_change_with_audit``).
            provision_and_append=(
                Query(
                    _change_and_append_statement(_provision()),
                    d,
                    ChangeAppendRow._make,
                    ChangeAppendRow._fields,
                )
                if dialect.name == "postgresql"
                else None
            ),
            # PostgreSQL: the whole provision (and the job's close) in one autocommit statement
            # (``_provision_at_once_statement``; engine.py ``_hot_statement``).
            provision_at_once=_provision_at_once(d, finishing=False),
            provision_at_once_finishing=_provision_at_once(d, finishing=True),
            void=Command(
                update(DEVICE)
                .where(DEVICE.c.id == bindparam("row_id"))
                .values(state=DeviceState.VOID.value, void_reason=bindparam("b_reason")),
                d,
            ),
            # The manifest's devices, in the order they were made.
            provisioned_in_lot=Query(
                devices.where(in_lot, DEVICE.c.state == DeviceState.PROVISIONED.value).order_by(
                    DEVICE.c.provisioned_at, DEVICE.c.id
                ),
                d,
                DeviceRowView._make,
                DeviceRowView._fields,
            ),
            count_by_state=Query(
                core_select(DEVICE.c.state, func.count().label("ids")).where(in_lot).group_by(DEVICE.c.state),
                d,
                StateCountRow._make,
                StateCountRow._fields,
            ),
            insert_job=Query(
                insert(JOB)
                .values(
                    lot_id=bindparam("b_lot_id"),
                    station=bindparam("b_station"),
                    port=bindparam("b_port"),
                    hw_serial=bindparam("b_hw_serial"),
                    started_at=bindparam("b_at"),
                )
                .returning(JOB.c.id),
                d,
                JobIdRow._make,
                JobIdRow._fields,
            ),
            job_locked=Query(
                core_select(JOB.c.id, JOB.c.outcome, JOB.c.finished_at)
                .where(JOB.c.id == bindparam("job_id"))
                .with_for_update(),
                d,
                JobStateRow._make,
                JobStateRow._fields,
            ),
            job_open=Query(
                core_select(JOB.c.id, JOB.c.station, JOB.c.port, JOB.c.finished_at).where(
                    JOB.c.id == bindparam("job_id")
                ),
                d,
                JobHolderRow._make,
                JobHolderRow._fields,
            ),
            # A station starting up closes what it left open when it died (its boards resume by serial).
            abandon_jobs=Command(
                update(JOB)
                .where(JOB.c.station == bindparam("station"), JOB.c.finished_at.is_(None))
                .values(finished_at=bindparam("b_at"), outcome="abandoned", reason=bindparam("b_reason")),
                d,
            ),
            set_job_serial=Command(
                update(JOB).where(JOB.c.id == bindparam("job_id")).values(hw_serial=bindparam("b_hw_serial")),
                d,
            ),
            # Only an open job is finished: "already finished" is a 0-row update, atomically.
            finish_job=Command(
                update(JOB)
                .where(JOB.c.id == bindparam("job_id"), JOB.c.finished_at.is_(None))
                .values(
                    finished_at=bindparam("b_at"),
                    outcome=bindparam("b_outcome"),
                    reason=bindparam("b_reason"),
                ),
                d,
            ),
            insert_attempt=Command(
                insert(ATTEMPT).values(
                    job_id=bindparam("b_job_id"),
                    step=bindparam("b_step"),
                    outcome=bindparam("b_outcome"),
                    reason=bindparam("b_reason"),
                    duration_s=bindparam("b_duration_s"),
                    at=bindparam("b_at"),
                ),
                d,
            ),
        )


def _provision_at_once(dialect: Dialect, *, finishing: bool) -> Query[ProvisionAtOnceRow] | None:
    """The one-statement provision compiled for PostgreSQL (None elsewhere: no data-modifying CTEs)."""
    if dialect.name != "postgresql":
        return None
    statement = _provision_at_once_statement(finishing=finishing)
    return Query(statement, dialect, ProvisionAtOnceRow._make, ProvisionAtOnceRow._fields)


def _shared_lot() -> CTE:
    """The lot by name, share-locked first (a materialised CTE ``FOR SHARE``): PostgreSQL."""
    return (
        core_select(LOT.c.id, LOT.c.state)
        .where(LOT.c.name == bindparam("name"))
        .with_for_update(read=True)
        .cte("shared_lot")
        .prefix_with("MATERIALIZED")
    )


def _lot_device_statement(match: ColumnElement[bool], dialect_name: str) -> Select[Any]:
    """The lot by name (share-locked) with its device matching ``match`` (locked), or no device.

    PostgreSQL locks in the order the separate statements did: the lot row first (a materialised
    CTE ``FOR SHARE``), then, per lot row, the device row in a ``LATERAL`` subquery ``FOR UPDATE``;
    the select list carries ``pg_current_xact_id()``. SQLite (writers serialised by ``BEGIN
    IMMEDIATE``) outer-joins the two tables and returns NULL for the id.
    """
    if dialect_name != "postgresql":
        joined = LOT.outerjoin(DEVICE, and_(DEVICE.c.lot_id == LOT.c.id, match))
        return (
            core_select(
                LOT.c.id.label("lot_id"),
                LOT.c.state.label("lot_state"),
                literal_column("NULL", Text).label("xid"),
                *DEVICE_COLUMNS,
            )
            .select_from(joined)
            .where(LOT.c.name == bindparam("name"))
        )
    lot = _shared_lot()
    device = (
        core_select(*DEVICE_COLUMNS)
        .where(DEVICE.c.lot_id == lot.c.id, match)
        .with_for_update()
        .lateral("dev")
    )
    return core_select(
        lot.c.id.label("lot_id"),
        lot.c.state.label("lot_state"),
        sql_cast(func.pg_current_xact_id(), Text).label("xid"),
        *device.c,
    ).select_from(lot.outerjoin(device, true()))


def _serials_row(lot: CTE) -> CTE:
    """The row the board's serial already holds in the lot, if any, locked (a materialised CTE)."""
    return (
        core_select(*DEVICE_COLUMNS)
        .where(DEVICE.c.lot_id == lot.c.id, DEVICE.c.hw_serial == bindparam("hw_serial"))
        .with_for_update(of=DEVICE)
        .cte("existing")
        .prefix_with("MATERIALIZED")
    )


def _next_free_id(lot: CTE) -> ColumnElement[Any]:
    """The id of the lot's first available row in import order, if the lot is active (locked, SKIP LOCKED)."""
    free = DEVICE.alias("free")  # not the UPDATE's own row: the subquery must not correlate to it
    return (
        core_select(free.c.id)
        .where(
            # Scalar subqueries (one-time InitPlans), not a join: the planner then walks the (lot, state,
            # id) index in id order, as the plain claim does; joined, it scanned the table by id (17 ms).
            free.c.lot_id == core_select(lot.c.id).scalar_subquery(),
            core_select(lot.c.state).scalar_subquery() == literal_column(f"'{LotState.ACTIVE.value}'"),
            free.c.state == literal_column(f"'{DeviceState.AVAILABLE.value}'"),
        )
        .order_by(free.c.id)
        .limit(literal_column("1", Integer))
        .with_for_update(of=free, skip_locked=True)
        .scalar_subquery()
    )


def _reserve_next_statement() -> Select[Any]:
    """The lot share-locked, the serial's own device row locked, and the next free ID claimed if it has none.

    ``WITH shared_lot AS MATERIALIZED (lot FOR SHARE), existing AS MATERIALIZED (the serial's row FOR
    UPDATE), claimed AS (UPDATE device SET <reserved> WHERE id = (next available, SKIP LOCKED) AND the
    lot is active AND NOT EXISTS existing RETURNING …) SELECT lot, xid, existing, claimed``: what
    ``lot_device_by_serial`` and then ``claim`` did, locks taken in the same order (the lot, then the
    serial's row; the claimed row is skipped by others, never waited for). The candidate row may be
    locked even when the serial has its own row; it is released at COMMIT and others skip it meanwhile.

    The chain's head is locked too, after the serial's row and before the claim binds the serial
    (``head AS MATERIALIZED (… FOR UPDATE)``, returned for the append): the order the one-statement
    reservation (``_reserve_and_append_statement``) takes them in. Binding a serial makes a second
    binder of it wait on the unique index; had this path bound it before locking the head, it and a
    one-statement reservation of the same serial on the same chain could each wait for the other.
    """
    lot = _shared_lot()
    existing = _serials_row(lot)
    head = (
        core_select(HEAD.c.seq, HEAD.c.hash)
        .where(HEAD.c.chain == bindparam("chain"), _evaluated(existing))
        .with_for_update(of=HEAD)
        .cte("head")
        .prefix_with("MATERIALIZED")
    )
    claimed = (
        update(DEVICE)
        .where(DEVICE.c.id == _next_free_id(lot), ~exists().select_from(existing), _evaluated(head))
        .values(_reserved_values())
        .returning(*DEVICE_COLUMNS)
        .cte("claimed")
    )
    return core_select(
        lot.c.id.label("lot_id"),
        lot.c.state.label("lot_state"),
        sql_cast(func.pg_current_xact_id(), Text).label("xid"),
        head.c.seq.label("head_seq"),
        head.c.hash.label("head_hash"),
        *(column.label(f"e_{column.key}") for column in existing.c),
        *(column.label(f"c_{column.key}") for column in claimed.c),
    ).select_from(lot.outerjoin(head, true()).outerjoin(existing, true()).outerjoin(claimed, true()))


def _evaluated(cte: CTE) -> ColumnElement[bool]:
    """A condition that is always true but makes PostgreSQL run ``cte`` (and take its locks) first."""
    return core_select(func.count()).select_from(cte).scalar_subquery() >= 0


def _head_if_current(after: CTE, *, unless: bool = False) -> CTE:
    """The chain's head row if it is still the remembered one, locked (a materialised CTE ``FOR UPDATE``).

    It is taken only if ``after`` (a locked device row) has a row, or with ``unless`` has none: so
    that row's lock (and the lot's before it) comes first, in the order of the transactional path,
    which locks the head last but for the job. (Taken first, a reservation holding the head would
    wait for a serial's row that another, holding it, wants the head for: a deadlock.)
    """
    found = exists().select_from(after)
    return (
        core_select(HEAD.c.chain, HEAD.c.seq)
        .where(
            HEAD.c.chain == bindparam("chain"),
            HEAD.c.seq == bindparam("old_seq"),
            HEAD.c.hash == bindparam("old_hash"),
            ~found if unless else found,
        )
        .with_for_update(of=HEAD)
        .cte("head")
        .prefix_with("MATERIALIZED")
    )


def _reserve_and_append_statement() -> Select[Any]:
    """A whole reservation in one autocommit statement (PostgreSQL): the claim and its audit link.

    ``_reserve_next_statement`` with two conditions more and the link: the claim happens only if the
    chain's head is still the one the station remembers (``_head_if_current``, locked after the lot and
    the serial's row, and only if the serial has none), and then the
    head advances and the link is inserted with the hash completed on the server, since the ID it
    covers is the one the claim picks: ``sha256(b_prefix || to_json(device_id) || '}')`` (audit.py
    ``link_hash_prefix``; the station checks the hash it gets back). Anything else (the serial holds
    an ID, the lot is not active, the head moved, no ID left) writes nothing and is told by the row.
    """
    lot = _shared_lot()
    existing = _serials_row(lot)
    head = _head_if_current(existing, unless=True)
    claimed = (
        update(DEVICE)
        .where(DEVICE.c.id == _next_free_id(lot), ~exists().select_from(existing), exists().select_from(head))
        .values(_reserved_values())
        .returning(*DEVICE_COLUMNS)
        .cte("claimed")
    )
    text = (
        bindparam("b_prefix", type_=Text)
        + sql_cast(func.to_json(claimed.c.device_id), Text)
        + literal_column("'}'", Text)
    )
    utf8: ColumnElement[str] = literal_column("'UTF8'")
    digest = func.encode(func.sha256(func.convert_to(text, utf8)), literal_column("'hex'"))
    advanced = (
        update(HEAD)
        .where(
            HEAD.c.chain == bindparam("chain"),
            HEAD.c.seq == bindparam("old_seq"),
            exists().select_from(claimed),
        )
        .values(seq=bindparam("b_seq"), hash=core_select(digest).scalar_subquery())
        .returning(HEAD.c.chain, HEAD.c.seq, HEAD.c.hash)
        .cte("advanced")
    )
    values = core_select(
        advanced.c.chain,
        advanced.c.seq,
        bindparam("b_at", type_=AUDIT.c.at.type),
        bindparam("b_actor", type_=AUDIT.c.actor.type),
        literal_column("'id.reserved'", Text),
        claimed.c.device_id,
        bindparam("b_details", type_=AUDIT.c.details.type),
        bindparam("old_hash", type_=AUDIT.c.prev_hash.type),
        advanced.c.hash,
    ).select_from(advanced.join(claimed, true()))
    columns = ["chain", "chain_seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash"]
    appended = insert(AUDIT).from_select(columns, values).returning(AUDIT.c.hash).cte("appended")
    return core_select(
        lot.c.id.label("lot_id"),
        lot.c.state.label("lot_state"),
        exists().select_from(head).label("head_current"),
        appended.c.hash.label("link_hash"),
        *(column.label(f"e_{column.key}") for column in existing.c),
        *(column.label(f"c_{column.key}") for column in claimed.c),
    ).select_from(lot.outerjoin(existing, true()).outerjoin(claimed, true()).outerjoin(appended, true()))


def _reserved_values() -> dict[str, Any]:
    """The columns a reservation sets (the board's serial, where it is, its job, when)."""
    return {
        "state": DeviceState.RESERVED.value,
        "hw_serial": bindparam("b_hw_serial"),
        "station": bindparam("b_station"),
        "port": bindparam("b_port"),
        "job_id": bindparam("b_job_id"),
        "reserved_at": bindparam("b_at"),
    }


def _provision() -> Update:
    """``UPDATE device`` to provisioned with its certificate, if the line's signer (if any) allows it."""
    return (
        update(DEVICE)
        .where(DEVICE.c.id == bindparam("row_id"), _signer_allows())
        .values(_provisioned_values())
    )


def _provisioned_values() -> dict[str, Any]:
    """The columns a provision sets (the certificate, when, where)."""
    return {
        "state": DeviceState.PROVISIONED.value,
        "cert_der": bindparam("b_cert_der"),
        "cert_serial": bindparam("b_cert_serial"),
        "cert_fingerprint_sha256": bindparam("b_fingerprint"),
        "provisioned_at": bindparam("b_provisioned_at"),
        "station": bindparam("b_station"),
        "port": bindparam("b_port"),
    }


class ProvisionAtOnceRow(NamedTuple):
    """What a one-statement provision did (the lot, the head's test, rows changed, links, jobs closed)."""

    lot_id: int
    lot_state: str
    head_current: bool
    changed: int
    appended: int
    finished: int


def _provision_at_once_statement(*, finishing: bool) -> Select[Any]:
    """A whole provision in one autocommit statement (PostgreSQL), and with ``finishing`` its job's close.

    The lot share-locked, the ID's row locked, the chain's head if it is still the remembered one
    (locked), and the job if it is open (locked): the locks of the transactional path, in its order.
    The row is provisioned only if it is reserved to the board's serial, the lot records devices
    (active or paused), the line's signer allows the certificate, the head is current and the job is
    open; then the link is appended (hashed by the station: every field is known) and the job closed.
    Anything else writes nothing, and the transactional path decides what it is.
    """
    lot = _shared_lot()
    target = (
        core_select(DEVICE.c.id, DEVICE.c.state, DEVICE.c.hw_serial)
        .where(DEVICE.c.lot_id == lot.c.id, DEVICE.c.device_id == bindparam("device_id"))
        .with_for_update(of=DEVICE)
        .cte("target")
        .prefix_with("MATERIALIZED")
    )
    head = _head_if_current(target)
    conditions = [
        DEVICE.c.id
        == core_select(target.c.id)
        .where(
            target.c.state == literal_column(f"'{DeviceState.RESERVED.value}'"),
            target.c.hw_serial == bindparam("hw_serial"),
        )
        .scalar_subquery(),
        core_select(lot.c.state)
        .scalar_subquery()
        .in_([literal_column(f"'{LotState.ACTIVE.value}'"), literal_column(f"'{LotState.PAUSED.value}'")]),
        _signer_allows(),
        exists().select_from(head),
    ]
    job = None
    if finishing:
        job = (
            core_select(JOB.c.id)
            .where(
                JOB.c.id == bindparam("job_id"),
                JOB.c.finished_at.is_(None),
                exists().select_from(head),
            )
            .with_for_update(of=JOB)
            .cte("open_job")
            .prefix_with("MATERIALIZED")
        )
        conditions.append(exists().select_from(job))
    changed = (
        update(DEVICE).where(*conditions).values(_provisioned_values()).returning(DEVICE.c.id).cte("changed")
    )
    appended = _append_audit_statement(after=changed).returning(AUDIT.c.seq).cte("appended")
    finished: ColumnElement[Any] = literal_column("0", Integer)
    if finishing:
        closed = (
            update(JOB)
            .where(JOB.c.id == bindparam("job_id"), exists().select_from(changed))
            .values(finished_at=bindparam("b_at"), outcome=bindparam("b_outcome"), reason=null())
            .returning(JOB.c.id)
            .cte("closed")
        )
        finished = core_select(func.count()).select_from(closed).scalar_subquery()
    return core_select(
        lot.c.id.label("lot_id"),
        lot.c.state.label("lot_state"),
        exists().select_from(head).label("head_current"),
        core_select(func.count()).select_from(changed).scalar_subquery().label("changed"),
        core_select(func.count()).select_from(appended).scalar_subquery().label("appended"),
        finished.label("finished"),
    ).select_from(lot)


def _signer_allows() -> ColumnElement[bool]:
    """A lot the line's signer manages records only the certificate it signed and stands for the ID.

    Part of the provision UPDATE (no statement more, no round trip more: a lot without a
    ``signer_lot`` row costs one primary-key probe); 0 rows updated means refused (ledger/states.py).
    """
    managed = exists().where(SIGNER_LOT.c.lot_id == DEVICE.c.lot_id)
    signed = exists().where(
        SIGNER_ISSUANCE.c.lot_id == DEVICE.c.lot_id,
        SIGNER_ISSUANCE.c.device_id == DEVICE.c.device_id,
        SIGNER_ISSUANCE.c.cert_fingerprint_sha256 == bindparam("b_fingerprint"),
        SIGNER_ISSUANCE.c.current == 1,
    )
    return or_(~managed, signed)


def _advance_head() -> Update:
    """``UPDATE audit_head`` to the new link, conditional on the head being the link it follows."""
    return (
        update(HEAD)
        .where(
            HEAD.c.chain == bindparam("chain"),
            HEAD.c.seq == bindparam("old_seq"),
            HEAD.c.hash == bindparam("old_hash"),
        )
        .values(seq=bindparam("b_seq"), hash=bindparam("b_hash"))
    )


def _append_audit_statement(after: CTE | None = None) -> Insert:
    """``WITH advanced AS (<advance the head> RETURNING …) INSERT INTO audit_entry SELECT … FROM it``.

    With ``after`` (a data-changing CTE), the head advances only if that change touched a row.
    """
    advance = _advance_head()
    if after is not None:
        advance = advance.where(exists().select_from(after))
    advanced = advance.returning(HEAD.c.chain, HEAD.c.seq, HEAD.c.hash).cte("advanced")
    values = core_select(
        advanced.c.chain,
        advanced.c.seq,
        bindparam("b_at", type_=AUDIT.c.at.type),
        bindparam("b_actor", type_=AUDIT.c.actor.type),
        bindparam("b_action", type_=AUDIT.c.action.type),
        bindparam("b_subject", type_=AUDIT.c.subject.type),
        bindparam("b_details", type_=AUDIT.c.details.type),
        bindparam("b_prev_hash", type_=AUDIT.c.prev_hash.type),
        advanced.c.hash,
    )
    columns = ["chain", "chain_seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash"]
    return insert(AUDIT).from_select(columns, values)


class ChangeAppendRow(NamedTuple):
    """What a change-and-append statement did: rows the change touched, audit links it inserted."""

    changed: int
    appended: int


def _change_and_append_statement(change: Update) -> Select[Any]:
    """A device change and its audit link in one statement (PostgreSQL's data-changing CTEs).

    ``WITH changed AS (<change> RETURNING id), advanced AS (<advance the head, if changed>), appended
    AS (INSERT … FROM advanced) SELECT <rows changed>, <links appended>``. The link is appended only
    if the change touched its row and the head is still the one the link was hashed onto: a change
    refused by its WHERE appends nothing, and a stale head (another writer, a rolled-back append)
    leaves the change made and the link to be chained by the caller after locking the head.
    """
    changed = change.returning(DEVICE.c.id).cte("changed")
    appended = _append_audit_statement(after=changed).returning(AUDIT.c.seq).cte("appended")
    return core_select(
        core_select(func.count()).select_from(changed).scalar_subquery().label("changed"),
        core_select(func.count()).select_from(appended).scalar_subquery().label("appended"),
    )


class Tx:
    """One transaction on a driver cursor (the caller owns begin/commit).

    On PostgreSQL the statements are prepared on the server on first use and reused per
    connection (psycopg ``prepare=True``): the hot path's fixed statements then skip parsing and
    planning on every execution, which is most of the server's CPU per statement. The engine keeps
    psycopg's automatic preparation off for everything else with a threshold no statement reaches
    (``PG_AUTO_PREPARE_NEVER``; a threshold of None would make psycopg ignore ``prepare=True`` too).
    """

    __slots__ = ("_cursor", "_prepare", "xid")

    def __init__(self, cursor: DriverCursor) -> None:
        """Run statements on ``cursor``."""
        self._cursor = cursor
        self._prepare = isinstance(cursor, psycopg.Cursor)
        # The PostgreSQL transaction id if a statement returned it (saves engine.py a round trip).
        self.xid: str | None = None

    def _run(self, command: Command, params: Mapping[str, object] | None) -> None:
        driver_params = command.params(params or {})
        if self._prepare:
            cast(psycopg.Cursor[Any], self._cursor).execute(command.sql, driver_params, prepare=True)
        else:
            self._cursor.execute(command.sql, driver_params)

    def execute(self, command: Command, params: Mapping[str, object] | None = None) -> int:
        """Execute a statement; return the affected row count."""
        self._run(command, params)
        return int(self._cursor.rowcount)

    def first(self, query: Query[_RowT], params: Mapping[str, object] | None = None) -> _RowT | None:
        """Execute a query; return its first row or None."""
        self._run(query, params)
        raw = self._cursor.fetchone()
        return None if raw is None else query.make_row(raw)

    def all(self, query: Query[_RowT], params: Mapping[str, object] | None = None) -> list[_RowT]:
        """Execute a query; return every row."""
        self._run(query, params)
        return [query.make_row(raw) for raw in self._cursor.fetchall()]


@contextmanager
def driver_transaction(driver: Any, *, sqlite: bool, write: bool) -> Iterator[DriverCursor]:
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
