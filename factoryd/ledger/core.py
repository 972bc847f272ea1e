"""The allocation ledger (sync core): lots, device IDs, jobs and the audit trail.

Every public method is one database transaction that is committed before it
returns, and the audit entry describing a change is written in the same
transaction as the change. Writers are serialised per claim with
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL and ``BEGIN IMMEDIATE`` on
SQLite; the audit chain itself is serialised by locking its single head row.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import psycopg
from sqlalchemy import ARRAY, String, any_, event, func, literal
from sqlalchemy import select as core_select
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlmodel import Session, col, create_engine, select

from factoryd.errors import (
    ConfigError,
    IdListError,
    IdsExhaustedError,
    InputError,
    LedgerError,
    LotNotFoundError,
    LotStateError,
    ReservationConflictError,
)
from factoryd.ledger.audit import AuditLink, as_utc, canonical_json, link_hash, verify_chain
from factoryd.ledger.errors import (
    DeviceNotFoundError,
    DeviceStateError,
    JobNotFoundError,
    LedgerUnavailableError,
    LotExistsError,
)
from factoryd.ledger.hot import (
    DEVICE,
    DEVICE_COLUMNS,
    DRIVER_ERRORS,
    DRIVER_INTEGRITY_ERRORS,
    DRIVER_UNAVAILABLE_ERRORS,
    HotStatements,
    Tx,
    driver_transaction,
)
from factoryd.ledger.idlist import DEFAULT_MAX_BYTES, ParsedList, check_size, list_source, parse_id_list
from factoryd.ledger.migrate import upgrade_to_head
from factoryd.ledger.model import (
    LOT_TRANSITIONS,
    DeviceRecord,
    DeviceState,
    LotInfo,
    LotProgress,
    LotState,
    Reservation,
)
from factoryd.ledger.profile import LotProfile
from factoryd.ledger.signature import verify_list_signature
from factoryd.ledger.tables import (
    AUDIT_HEAD_ROW_ID,
    AUDIT_SUBJECT_MAX_CHARS,
    LABEL_MAX_CHARS,
    SERIAL_MAX_CHARS,
    AuditEntryRow,
    AuditHeadRow,
    DeviceRow,
    LotRow,
)

# How long a SQLite writer waits for another one before giving up (several stations' worth of commits).
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Concurrent reservations of the same serial on PostgreSQL lose a unique-index race at most once
# per competitor; a few rounds always settle it.
RESERVE_RACE_RETRIES = 5
# IN (...) lists stay well below every backend's bound-parameter limit.
ID_QUERY_CHUNK = 500
PG_ID_QUERY_CHUNK = 10_000
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 20
_WRITE_OPTION = "factoryd_ledger_write"
_LOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"[0-9a-f]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# What a job that ends in mark_provisioned(..., finish_job=...) is closed with.
PROVISIONED_JOB_OUTCOME = "provisioned"
_INTEGRITY_ERRORS: tuple[type[Exception], ...] = (IntegrityError, *DRIVER_INTEGRITY_ERRORS)
_OTHER_DB_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, *DRIVER_ERRORS)


def _now() -> datetime:
    return datetime.now(UTC)


def _opt_utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)


def _require_label(value: str, what: str, max_chars: int = LABEL_MAX_CHARS) -> str:
    if not value or len(value) > max_chars or any(not ch.isprintable() for ch in value):
        raise InputError(f"{what} must be 1..{max_chars} printable characters, got {value!r}")
    return value


def _require_serial(hw_serial: str) -> str:
    _require_label(hw_serial, "hw_serial", SERIAL_MAX_CHARS)
    if any(ch.isspace() for ch in hw_serial):
        raise InputError(f"hw_serial must not contain whitespace, got {hw_serial!r}")
    return hw_serial


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # Take transaction control away from the sqlite3 module so BEGIN IMMEDIATE is ours to emit.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit survives power loss in WAL mode too (NORMAL may lose the last commits).
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    # Writers take the write lock up front: a deferred transaction that later upgrades
    # to a writer fails with SQLITE_BUSY immediately instead of waiting in busy_timeout.
    write = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def create_ledger_engine(url: str | URL) -> Engine:
    """Create the engine for a ``sqlite:///`` or ``postgresql+psycopg://`` ledger URL."""
    try:
        sa_url = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"not a database URL: {exc}") from exc
    backend = sa_url.get_backend_name()
    if backend == "sqlite":
        memory = sa_url.database in (None, "", ":memory:")
        engine = (
            # One shared connection: only for tests and demos, never for several stations.
            create_engine(sa_url, poolclass=StaticPool, connect_args={"check_same_thread": False})
            if memory
            else create_engine(sa_url)
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername="postgresql+psycopg")
        if sa_url.drivername != "postgresql+psycopg":
            raise ConfigError(
                f"PostgreSQL ledgers use psycopg 3 (postgresql+psycopg://), not {sa_url.drivername}"
            )
        return create_engine(
            sa_url,
            pool_pre_ping=True,
            pool_size=PG_POOL_SIZE,
            max_overflow=PG_MAX_OVERFLOW,
            # No server-side prepared statements: after psycopg's default five executions the
            # server switches to a generic plan, and for the import's ID lookups that plan is
            # a sequential scan per chunk (minutes for a 400k-ID list instead of seconds).
            connect_args={"prepare_threshold": None},
        )
    raise ConfigError(f"unsupported ledger database {backend!r}: use sqlite:/// or postgresql+psycopg://")


class _SerialRaceError(Exception):
    """Another transaction bound the same serial first (PostgreSQL); retry the reservation."""


class Ledger:
    """The allocation ledger; thread-safe, each call is its own committed transaction."""

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine whose database is already at head; use :meth:`open` instead."""
        self._engine = engine
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._is_postgres = engine.dialect.name == "postgresql"
        # verify_audit reads the head and every entry from one snapshot while writers go on.
        self._snapshot_engine = (
            engine.execution_options(isolation_level="REPEATABLE READ") if self._is_postgres else engine
        )
        # Lot name -> id. Lots are never deleted or renamed, so an entry never goes stale; a
        # lot's *state* is never cached: the calls that depend on it read it in their transaction.
        self._lot_ids: dict[str, int] = {}
        self._statements = HotStatements(engine.dialect)
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> Ledger:
        """Open (and migrate to head) the ledger at ``url``; SchemaVersionError on unknown revisions."""
        engine = create_ledger_engine(url)
        try:
            upgrade_to_head(engine.execution_options(**{_WRITE_OPTION: True}))
        except LedgerError:
            engine.dispose()
            raise
        except SQLAlchemyError as exc:
            engine.dispose()
            where = engine.url.render_as_string(hide_password=True)
            raise LedgerUnavailableError(f"cannot open the ledger database {where}: {exc}") from exc
        return cls(engine)

    def close(self) -> None:
        """Close every pooled connection; the ledger cannot be used afterwards."""
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    @contextmanager
    def _translated(self, on_integrity: Callable[[Exception], Exception] | None) -> Iterator[None]:
        """Translate database errors (SQLAlchemy's or the driver's) raised in the block into ledger errors."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        try:
            yield
        except _INTEGRITY_ERRORS as exc:
            orig = exc.orig if isinstance(exc, IntegrityError) else exc
            if on_integrity is None:
                raise ReservationConflictError(
                    f"the ledger refused a change that breaks a rule: {orig}"
                ) from exc
            raise on_integrity(exc) from exc
        except (OperationalError, InterfaceError) as exc:
            raise LedgerUnavailableError(f"ledger database unavailable: {exc.orig or exc}") from exc
        except DRIVER_UNAVAILABLE_ERRORS as exc:
            raise LedgerUnavailableError(f"ledger database unavailable: {exc}") from exc
        except _OTHER_DB_ERRORS as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc

    @contextmanager
    def _transaction(
        self,
        *,
        write: bool,
        on_integrity: Callable[[Exception], Exception] | None = None,
        snapshot: bool = False,
    ) -> Iterator[Session]:
        """One ORM transaction: committed on success, rolled back on any error, DB errors translated."""
        bind = self._write_engine if write else self._snapshot_engine if snapshot else self._engine
        with (
            self._translated(on_integrity),
            Session(bind, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    @contextmanager
    def _hot(
        self, *, write: bool, on_integrity: Callable[[Exception], Exception] | None = None
    ) -> Iterator[Tx]:
        """One hot-path transaction on a pooled connection's driver: committed before it returns."""
        with self._translated(on_integrity):
            fairy = self._engine.raw_connection()
            checked_in = False
            try:
                with driver_transaction(
                    fairy.driver_connection, sqlite=not self._is_postgres, write=write
                ) as cursor:
                    yield Tx(cursor, self._statements)
            except DRIVER_UNAVAILABLE_ERRORS:
                if self._is_postgres:
                    # A lost server connection must not go back to the pool (invalidate checks it in).
                    fairy.invalidate()
                    checked_in = True
                raise
            finally:
                if not checked_in:
                    fairy.close()

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """One read-only SQLAlchemy Core transaction (for queries off the hot path)."""
        with self._translated(None), self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _session_tx(self, session: Session) -> Iterator[Tx]:
        """The hot-path statements inside an ORM session's transaction."""
        cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            yield Tx(cursor, self._statements)
        finally:
            cursor.close()

    # -- audit ------------------------------------------------------------------------------

    def _append_audit(
        self,
        tx: Tx,
        *,
        actor: str,
        action: str,
        subject: str,
        details: dict[str, object],
        at: datetime,
    ) -> None:
        """Append one link in the caller's transaction; the head row lock serialises every writer."""
        _require_label(actor, "actor")
        _require_label(action, "action", 64)
        _require_label(subject, "subject", AUDIT_SUBJECT_MAX_CHARS)
        details_json = canonical_json(details)
        head = tx.first("head_locked")
        if head is None:
            raise LedgerError("the audit chain head row is missing")
        seq = head.seq + 1
        digest = link_hash(
            seq=seq,
            at=at,
            actor=actor,
            action=action,
            subject=subject,
            details_json=details_json,
            prev_hash=head.hash,
        )
        tx.execute(
            "insert_audit",
            {
                "b_seq": seq,
                "b_at": at,
                "b_actor": actor,
                "b_action": action,
                "b_subject": subject,
                "b_details": details_json,
                "b_prev_hash": head.hash,
                "b_hash": digest,
            },
        )
        tx.execute("update_head", {"b_seq": seq, "b_hash": digest})

    def _audit_in_session(self, session: Session, **entry: Any) -> None:
        with self._session_tx(session) as tx:
            self._append_audit(tx, **entry)

    def audit(self, *, actor: str, action: str, subject: str, details: dict[str, object]) -> None:
        """Append an entry to the audit trail (for events outside the ledger's own transitions)."""
        with self._hot(write=True) as tx:
            self._append_audit(tx, actor=actor, action=action, subject=subject, details=details, at=_now())

    def verify_audit(self) -> int:
        """Recompute the whole hash chain; return the entry count or raise AuditChainError."""
        with self._transaction(write=False, snapshot=True) as session:
            head = session.exec(select(AuditHeadRow).where(AuditHeadRow.id == AUDIT_HEAD_ROW_ID)).one()
            rows = session.exec(
                select(AuditEntryRow).order_by(col(AuditEntryRow.seq)).execution_options(yield_per=1000)
            )
            links = (
                AuditLink(
                    seq=row.seq,
                    at=row.at,
                    actor=row.actor,
                    action=row.action,
                    subject=row.subject,
                    details_json=row.details,
                    prev_hash=row.prev_hash,
                    hash=row.hash,
                )
                for row in rows
            )
            try:
                return verify_chain(links, head_seq=head.seq, head_hash=head.hash)
            finally:
                # A server-side cursor (PostgreSQL) must be closed even when verification stops early.
                rows.close()

    # -- lots -------------------------------------------------------------------------------

    def _lot_row(self, session: Session, name: str, lock: Literal["update", "share"] | None = None) -> LotRow:
        statement = select(LotRow).where(LotRow.name == name)
        if lock == "update":
            statement = statement.with_for_update()
        elif lock == "share":
            statement = statement.with_for_update(read=True)
        row = session.exec(statement).first()
        if row is None:
            raise LotNotFoundError(f"no lot named {name!r}")
        return row

    @staticmethod
    def _lot_info(row: LotRow) -> LotInfo:
        return LotInfo(
            name=row.name,
            customer=row.customer,
            state=LotState(row.state),
            profile=LotProfile.model_validate(row.profile),
            target_quantity=row.target_quantity,
            created_at=as_utc(row.created_at),
        )

    def create_lot(
        self, name: str, *, customer: str, profile: LotProfile, target_quantity: int | None, actor: str
    ) -> LotInfo:
        """Create a lot in state ``draft``; LotExistsError if the name is taken."""
        if not _LOT_NAME.fullmatch(name):
            raise InputError(
                f"lot name {name!r} must be 1..64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        _require_label(customer, "customer")
        if target_quantity is not None and target_quantity < 1:
            raise InputError(f"target_quantity must be positive or None, got {target_quantity}")

        taken = f"a lot named {name!r} already exists"
        now = _now()
        with self._transaction(write=True, on_integrity=lambda _exc: LotExistsError(taken)) as session:
            if session.exec(select(LotRow.id).where(LotRow.name == name)).first() is not None:
                raise LotExistsError(taken)
            row = LotRow(
                name=name,
                customer=customer,
                state=LotState.DRAFT.value,
                profile=profile.model_dump(mode="json"),
                target_quantity=target_quantity,
                created_at=now,
            )
            session.add(row)
            session.flush()
            self._audit_in_session(
                session,
                actor=actor,
                action="lot.created",
                subject=name,
                details={"customer": customer, "target_quantity": target_quantity, "profile": row.profile},
                at=now,
            )
            return self._lot_info(row)

    def set_lot_state(self, lot: str, state: LotState, *, actor: str) -> LotInfo:
        """Move a lot along draft → active ⇄ paused → closed; LotStateError otherwise."""
        try:
            target = LotState(state)
        except ValueError as exc:
            raise InputError(f"unknown lot state {state!r} (use {', '.join(LotState)})") from exc
        now = _now()
        with self._transaction(write=True) as session:
            row = self._lot_row(session, lot, lock="update")
            current = LotState(row.state)
            if target not in LOT_TRANSITIONS[current]:
                allowed = ", ".join(sorted(LOT_TRANSITIONS[current])) or "none, it is final"
                raise LotStateError(f"lot {lot!r} cannot go from {current} to {target} (allowed: {allowed})")
            row.state = target.value
            session.add(row)
            self._audit_in_session(
                session,
                actor=actor,
                action="lot.state_changed",
                subject=lot,
                details={"from": current.value, "to": target.value},
                at=now,
            )
            return self._lot_info(row)

    def get_lot(self, lot: str) -> LotInfo:
        """The lot named ``lot``; LotNotFoundError if there is none."""
        with self._transaction(write=False) as session:
            return self._lot_info(self._lot_row(session, lot))

    def list_lots(self) -> list[LotInfo]:
        """Every lot, oldest first."""
        with self._transaction(write=False) as session:
            rows = session.exec(select(LotRow).order_by(col(LotRow.created_at), col(LotRow.id))).all()
            return [self._lot_info(row) for row in rows]

    # -- import -----------------------------------------------------------------------------

    def import_ids(
        self,
        lot: str,
        data: bytes,
        *,
        filename: str | None = None,
        fmt: str | None = None,
        actor: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        signature: bytes | None = None,
        signer_public_key_pem: bytes | None = None,
    ) -> int:
        """Import a customer ID list whole or not at all; return how many IDs were added."""
        if (signature is None) != (signer_public_key_pem is None):
            raise IdListError("a signed import needs both the detached signature and the customer public key")
        info = self.get_lot(lot)
        if info.state is LotState.CLOSED:
            raise LotStateError(f"lot {lot!r} is closed; it takes no more IDs")
        source = list_source(filename)
        # Checked before the signature so an oversized upload costs no hashing.
        check_size(data, max_bytes, source)
        if signature is not None and signer_public_key_pem is not None:
            verify_list_signature(data, signature, signer_public_key_pem)
        parsed = parse_id_list(
            data, id_format=info.profile.id_format, filename=filename, fmt=fmt, max_bytes=max_bytes
        )

        def clash(exc: Exception) -> Exception:
            orig = exc.orig if isinstance(exc, IntegrityError) else exc
            return IdListError(
                f"{source}: an ID was imported concurrently elsewhere ({orig}); nothing was imported"
            )

        now = _now()
        with self._transaction(write=True, on_integrity=clash) as session:
            row = self._lot_row(session, lot, lock="update")
            if row.state == LotState.CLOSED:
                raise LotStateError(f"lot {lot!r} is closed; it takes no more IDs")
            self._refuse_known_ids(session, parsed, source)
            if row.id is None:
                raise LedgerError(f"lot {lot!r} has no id")
            self._insert_ids(session, row.id, parsed, source)
            self._audit_in_session(
                session,
                actor=actor,
                action="ids.imported",
                subject=lot,
                details={
                    "count": len(parsed.ids),
                    "format": parsed.fmt,
                    "filename": filename,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "signed": signature is not None,
                },
                at=now,
            )
        return len(parsed.ids)

    def _insert_ids(self, session: Session, lot_id: int, parsed: ParsedList, source: str) -> None:
        """Insert every parsed ID as available, in list order, inside the caller's transaction."""
        raw = session.connection().connection.driver_connection
        state = DeviceState.AVAILABLE.value
        rows = ((lot_id, item.device_id, state, json.dumps(item.metadata)) for item in parsed.ids)
        # Straight to the driver: COPY on PostgreSQL, executemany on SQLite. A 400k-ID list
        # loads in seconds; SQLAlchemy's per-row parameter processing alone would double that.
        # Driver errors are not wrapped by SQLAlchemy here, so they are translated here.
        try:
            if isinstance(raw, psycopg.Connection):
                copy_sql = "COPY device (lot_id, device_id, state, metadata) FROM STDIN"
                with raw.cursor() as cursor, cursor.copy(copy_sql) as copy:
                    for values in rows:
                        copy.write_row(values)
            elif isinstance(raw, sqlite3.Connection):
                raw.executemany(
                    "INSERT INTO device (lot_id, device_id, state, metadata) VALUES (?, ?, ?, ?)", rows
                )
            else:
                raise LedgerError(f"unsupported database driver {type(raw).__name__}")
        except (psycopg.IntegrityError, sqlite3.IntegrityError) as exc:
            raise IdListError(
                f"{source}: an ID was imported concurrently elsewhere ({exc}); nothing was imported"
            ) from exc
        except (psycopg.OperationalError, sqlite3.OperationalError) as exc:
            raise LedgerUnavailableError(f"ledger database unavailable: {exc}") from exc
        except (psycopg.Error, sqlite3.Error) as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc

    def _refuse_known_ids(self, session: Session, parsed: ParsedList, source: str) -> None:
        lines = {item.device_id: item.line for item in parsed.ids}
        ids = list(lines)
        clashes: list[tuple[int, str, str]] = []
        # PostgreSQL takes the chunk as one array parameter instead of thousands of binds.
        chunk_size = PG_ID_QUERY_CHUNK if self._is_postgres else ID_QUERY_CHUNK
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            condition = (
                col(DeviceRow.device_id) == any_(literal(chunk, ARRAY(String)))
                if self._is_postgres
                else col(DeviceRow.device_id).in_(chunk)
            )
            found = session.exec(
                select(DeviceRow.device_id, LotRow.name)
                .join(LotRow, col(LotRow.id) == col(DeviceRow.lot_id))
                .where(condition)
            ).all()
            clashes.extend((lines[device_id], device_id, lot_name) for device_id, lot_name in found)
        if clashes:
            clashes.sort()
            line, device_id, lot_name = clashes[0]
            more = f" (and {len(clashes) - 1} more IDs already known)" if len(clashes) > 1 else ""
            raise IdListError(
                f"{source}: line {line}: ID {device_id!r} already exists in lot {lot_name!r}{more}; "
                "nothing was imported"
            )

    # -- reservations -----------------------------------------------------------------------

    @staticmethod
    def _reservation(row: Any, *, resumed: bool) -> Reservation:
        return Reservation(
            device_id=row.device_id,
            hw_serial=row.hw_serial or "",
            resumed=resumed,
            state=DeviceState(row.state),
            metadata=dict(row.metadata),
        )

    def _lot_shared(self, tx: Tx, lot: str) -> tuple[int, LotState]:
        """The lot's id and state, share-locked for the transaction (a state change waits for it)."""
        found = tx.first("lot_shared", {"name": lot})
        if found is None:
            raise LotNotFoundError(f"no lot named {lot!r}")
        return found.id, LotState(found.state)

    def _lot_id(self, tx: Tx, lot: str) -> int:
        """The lot's id; cached, since a lot keeps its name and id for good (lots are never deleted)."""
        lot_id = self._lot_ids.get(lot)
        if lot_id is None:
            found = tx.first("lot_id", {"name": lot})
            if found is None:
                raise LotNotFoundError(f"no lot named {lot!r}")
            lot_id = self._lot_ids[lot] = found.id
        return lot_id

    def reserve(
        self, lot: str, hw_serial: str, *, station: str, port: str, job_id: int | None, actor: str
    ) -> Reservation:
        """Bind an ID to a board's serial, or return the ID that serial already holds (``resumed``)."""
        _require_serial(hw_serial)
        _require_label(station, "station")
        _require_label(port, "port")
        for _ in range(RESERVE_RACE_RETRIES):
            try:
                return self._reserve_once(
                    lot, hw_serial, station=station, port=port, job_id=job_id, actor=actor
                )
            except _SerialRaceError:
                continue
        raise ReservationConflictError(
            f"serial {hw_serial!r} kept colliding with concurrent reservations in lot {lot!r}"
        )

    def _reserve_once(
        self, lot: str, hw_serial: str, *, station: str, port: str, job_id: int | None, actor: str
    ) -> Reservation:
        def race(_exc: Exception) -> Exception:
            return _SerialRaceError()

        now = _now()
        with self._hot(write=True, on_integrity=race) as tx:
            lot_id, lot_state = self._lot_shared(tx, lot)
            if lot_state is not LotState.ACTIVE:
                raise LotStateError(f"lot {lot!r} is {lot_state}; reservations need an active lot")
            existing = tx.first("device_by_serial_locked", {"lot_id": lot_id, "hw_serial": hw_serial})
            if existing is not None:
                return self._resume(tx, existing, lot, station=station, port=port, job_id=job_id, actor=actor)
            row = tx.first("claim", {"lot_id": lot_id})
            if row is None:
                raise IdsExhaustedError(f"lot {lot!r} has no available IDs left")
            # A concurrent reservation of the same serial fails here (unique index), before auditing.
            tx.execute(
                "reserve",
                {
                    "row_id": row.id,
                    "b_hw_serial": hw_serial,
                    "b_station": station,
                    "b_port": port,
                    "b_job_id": job_id,
                    "b_at": now,
                },
            )
            self._append_audit(
                tx,
                actor=actor,
                action="id.reserved",
                subject=row.device_id,
                details={
                    "lot": lot,
                    "hw_serial": hw_serial,
                    "station": station,
                    "port": port,
                    "job_id": job_id,
                },
                at=now,
            )
            return Reservation(
                device_id=row.device_id,
                hw_serial=hw_serial,
                resumed=False,
                state=DeviceState.RESERVED,
                metadata=dict(row.metadata),
            )

    def _resume(
        self,
        tx: Tx,
        row: Any,
        lot: str,
        *,
        station: str,
        port: str,
        job_id: int | None,
        actor: str,
    ) -> Reservation:
        state = DeviceState(row.state)
        if state is DeviceState.VOID:
            raise ReservationConflictError(
                f"serial {row.hw_serial!r} held ID {row.device_id!r} in lot {lot!r}, which was voided "
                f"({row.void_reason}); this board gets no other ID"
            )
        if state is DeviceState.RESERVED:
            if row.job_id is not None and row.job_id != job_id and (row.station, row.port) != (station, port):
                holder = tx.first("job_open", {"job_id": row.job_id})
                if holder is not None and holder.finished_at is None:
                    # Two boards with one serial at once (a clone), or a board moved while its job
                    # still runs elsewhere: never hand the same ID to a second live job.
                    raise ReservationConflictError(
                        f"serial {row.hw_serial!r} is being provisioned right now by job {row.job_id} on "
                        f"station {holder.station!r} port {holder.port!r}; a cloned board, or one moved "
                        "while its job runs (finish or abandon that job first)"
                    )
            moved = {"station": row.station, "port": row.port, "job_id": row.job_id}
            tx.execute(
                "move_reservation",
                {"row_id": row.id, "b_station": station, "b_port": port, "b_job_id": job_id},
            )
            self._append_audit(
                tx,
                actor=actor,
                action="id.resumed",
                subject=row.device_id,
                details={
                    "lot": lot,
                    "hw_serial": row.hw_serial,
                    "station": station,
                    "port": port,
                    "job_id": job_id,
                    "previous": moved,
                },
                at=_now(),
            )
        return self._reservation(row, resumed=True)

    @staticmethod
    def _device_row(tx: Tx, lot_id: int, lot: str, device_id: str) -> Any:
        row = tx.first("device_by_id_locked", {"lot_id": lot_id, "device_id": device_id})
        if row is None:
            raise DeviceNotFoundError(f"no ID {device_id!r} in lot {lot!r}")
        return row

    def mark_provisioned(
        self,
        lot: str,
        device_id: str,
        hw_serial: str,
        *,
        cert_der: bytes,
        cert_serial: str,
        fingerprint_sha256: str,
        station: str,
        port: str,
        actor: str,
        finish_job: int | None = None,
    ) -> None:
        """Record that the board holding this reservation now carries its verified certificate.

        With ``finish_job``, that job is closed as ``provisioned`` in the same transaction.
        """
        _require_serial(hw_serial)
        fingerprint = fingerprint_sha256.lower()
        serial_hex = cert_serial.lower().replace(":", "")
        if not cert_der:
            raise InputError("cert_der is empty")
        if not _SHA256_HEX.fullmatch(fingerprint) or hashlib.sha256(cert_der).hexdigest() != fingerprint:
            raise InputError("fingerprint_sha256 is not the SHA-256 of cert_der")
        if not _HEX.fullmatch(serial_hex) or len(serial_hex) > 64:
            raise InputError(f"cert_serial must be hex, got {cert_serial!r}")
        now = _now()
        with self._hot(write=True) as tx:
            lot_id, lot_state = self._lot_shared(tx, lot)
            if lot_state not in (LotState.ACTIVE, LotState.PAUSED):
                raise LotStateError(f"lot {lot!r} is {lot_state}; it records no more devices")
            row = self._device_row(tx, lot_id, lot, device_id)
            if (
                row.state == DeviceState.PROVISIONED
                and row.hw_serial == hw_serial
                and row.cert_fingerprint_sha256 == fingerprint
            ):
                # A retry after a commit whose reply was lost: already recorded (and the job
                # closed with it, if it was asked to be).
                if finish_job is not None:
                    self._finish_job(
                        tx,
                        finish_job,
                        outcome=PROVISIONED_JOB_OUTCOME,
                        reason=None,
                        at=now,
                        retry=True,
                    )
                return
            if row.state != DeviceState.RESERVED or row.hw_serial != hw_serial:
                raise ReservationConflictError(
                    f"ID {device_id!r} in lot {lot!r} is {row.state}"
                    f"{f' for serial {row.hw_serial!r}' if row.hw_serial else ''}, "
                    f"not reserved to serial {hw_serial!r}"
                )
            tx.execute(
                "provision",
                {
                    "row_id": row.id,
                    "b_cert_der": cert_der,
                    "b_cert_serial": serial_hex,
                    "b_fingerprint": fingerprint,
                    "b_at": now,
                    "b_station": station,
                    "b_port": port,
                },
            )
            self._append_audit(
                tx,
                actor=actor,
                action="id.provisioned",
                subject=device_id,
                details={
                    "lot": lot,
                    "hw_serial": hw_serial,
                    "station": station,
                    "port": port,
                    "cert_serial": serial_hex,
                    "fingerprint_sha256": fingerprint,
                },
                at=now,
            )
            if finish_job is not None:
                self._finish_job(tx, finish_job, outcome=PROVISIONED_JOB_OUTCOME, reason=None, at=now)

    def void(self, lot: str, device_id: str, reason: str, *, actor: str) -> None:
        """Take an ID out of use for good, keeping its serial binding and certificate on record."""
        if not reason.strip():
            raise InputError("voiding an ID needs a reason")
        now = _now()
        with self._hot(write=True) as tx:
            lot_id, lot_state = self._lot_shared(tx, lot)
            if lot_state is LotState.CLOSED:
                raise LotStateError(f"lot {lot!r} is closed; its IDs can no longer change")
            row = self._device_row(tx, lot_id, lot, device_id)
            previous = DeviceState(row.state)
            if previous is DeviceState.VOID:
                raise DeviceStateError(f"ID {device_id!r} in lot {lot!r} is already void ({row.void_reason})")
            tx.execute("void", {"row_id": row.id, "b_reason": reason})
            self._append_audit(
                tx,
                actor=actor,
                action="id.voided",
                subject=device_id,
                details={
                    "lot": lot,
                    "previous_state": previous.value,
                    "hw_serial": row.hw_serial,
                    "reason": reason,
                },
                at=now,
            )

    # -- queries ----------------------------------------------------------------------------

    @staticmethod
    def _record(row: Any, lot: str) -> DeviceRecord:
        return DeviceRecord(
            device_id=row.device_id,
            lot=lot,
            state=DeviceState(row.state),
            metadata=dict(row.metadata),
            hw_serial=row.hw_serial,
            station=row.station,
            port=row.port,
            job_id=row.job_id,
            reserved_at=_opt_utc(row.reserved_at),
            provisioned_at=_opt_utc(row.provisioned_at),
            cert_der=row.cert_der,
            cert_serial=row.cert_serial,
            fingerprint_sha256=row.cert_fingerprint_sha256,
            void_reason=row.void_reason,
        )

    def find_by_serial(self, lot: str, hw_serial: str) -> DeviceRecord | None:
        """The ID a serial holds in a lot, whatever its state, or None."""
        with self._hot(write=False) as tx:
            lot_id = self._lot_id(tx, lot)
            row = tx.first("device_by_serial", {"lot_id": lot_id, "hw_serial": hw_serial})
            return None if row is None else self._record(row, lot)

    def find_device(self, device_id: str) -> DeviceRecord | None:
        """An ID in any lot (IDs are unique across lots), or None."""
        with self._hot(write=False) as tx:
            row = tx.first("device_any_lot", {"device_id": device_id})
            return None if row is None else self._record(row, row.lot_name)

    def progress(self, lot: str) -> LotProgress:
        """How many IDs of the lot are available, reserved, provisioned and void."""
        with self._hot(write=False) as tx:
            lot_id = self._lot_id(tx, lot)
        with self._connection() as connection:
            counts: dict[str, int] = dict.fromkeys(DeviceState, 0)
            grouped = connection.execute(
                core_select(DEVICE.c.state, func.count())
                .where(DEVICE.c.lot_id == lot_id)
                .group_by(DEVICE.c.state)
            ).all()
            for state, count in grouped:
                counts[DeviceState(state)] = count
            return LotProgress(
                total=sum(counts.values()),
                available=counts[DeviceState.AVAILABLE],
                reserved=counts[DeviceState.RESERVED],
                provisioned=counts[DeviceState.PROVISIONED],
                void=counts[DeviceState.VOID],
            )

    def provisioned_devices(self, lot: str) -> list[DeviceRecord]:
        """Every provisioned device of the lot in the order they were made (for the manifest)."""
        with self._hot(write=False) as tx:
            lot_id = self._lot_id(tx, lot)
        with self._connection() as connection:
            rows = connection.execute(
                core_select(*DEVICE_COLUMNS)
                .where(DEVICE.c.lot_id == lot_id, DEVICE.c.state == DeviceState.PROVISIONED.value)
                .order_by(DEVICE.c.provisioned_at, DEVICE.c.id)
            ).all()
            return [self._record(row, lot) for row in rows]

    # -- jobs -------------------------------------------------------------------------------

    def start_job(self, lot: str, *, station: str, port: str, hw_serial: str | None = None) -> int:
        """Open a job record for one board on one port (and its serial, if known); return its id."""
        _require_label(station, "station")
        _require_label(port, "port")
        if hw_serial is not None:
            _require_serial(hw_serial)
        with self._hot(write=True) as tx:
            lot_id = self._lot_id(tx, lot)
            inserted = tx.first(
                "insert_job",
                {
                    "b_lot_id": lot_id,
                    "b_station": station,
                    "b_port": port,
                    "b_hw_serial": hw_serial,
                    "b_at": _now(),
                },
            )
            if inserted is None:
                raise LedgerError("the database assigned no job id")
            return int(inserted.id)

    def set_job_serial(self, job_id: int, hw_serial: str) -> None:
        """Record which board (secure-element serial) a job is working on."""
        _require_serial(hw_serial)
        with self._hot(write=True) as tx:
            if tx.execute("set_job_serial", {"job_id": job_id, "b_hw_serial": hw_serial}) == 0:
                raise JobNotFoundError(f"no job {job_id}")

    def _finish_job(
        self,
        tx: Tx,
        job_id: int,
        *,
        outcome: str,
        reason: str | None,
        at: datetime,
        retry: bool = False,
    ) -> None:
        """Close an open job in the caller's transaction; with ``retry``, a job closed already is fine."""
        finished = tx.execute(
            "finish_job", {"job_id": job_id, "b_at": at, "b_outcome": outcome, "b_reason": reason}
        )
        if finished == 1:
            return
        job = tx.first("job_locked", {"job_id": job_id})
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        if not retry:
            raise LedgerError(f"job {job_id} already finished ({job.outcome})")

    def finish_job(self, job_id: int, *, outcome: str, reason: str | None) -> None:
        """Close a job with its outcome (e.g. ``ok``, ``failed``, ``aborted``) and reason."""
        _require_label(outcome, "outcome", 32)
        with self._hot(write=True) as tx:
            self._finish_job(tx, job_id, outcome=outcome, reason=reason, at=_now())

    def abandon_open_jobs(self, station: str, *, reason: str) -> int:
        """Close every job a station left open (it died mid-job); returns how many were closed."""
        _require_label(station, "station")
        with self._hot(write=True) as tx:
            return tx.execute("abandon_jobs", {"station": station, "b_at": _now(), "b_reason": reason[:500]})

    def record_attempt(
        self, job_id: int, *, step: str, outcome: str, reason: str | None, duration_s: float
    ) -> None:
        """Record one attempt of a pipeline step within a job."""
        _require_label(step, "step", 64)
        _require_label(outcome, "outcome", 32)
        if not duration_s >= 0:
            raise InputError(f"duration_s must be >= 0, got {duration_s}")
        with self._hot(write=True) as tx:
            if tx.first("job_locked", {"job_id": job_id}) is None:
                raise JobNotFoundError(f"no job {job_id}")
            tx.execute(
                "insert_attempt",
                {
                    "b_job_id": job_id,
                    "b_step": step,
                    "b_outcome": outcome,
                    "b_reason": reason,
                    "b_duration_s": duration_s,
                    "b_at": _now(),
                },
            )


def verify_audit(url: str) -> int:
    """Verify the audit chain of the ledger at ``url``; return the entry count (``factoryd audit verify``)."""
    with Ledger.open(url) as ledger:
        return ledger.verify_audit()
