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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import psycopg
from sqlalchemy import ARRAY, String, any_, event, func, literal
from sqlalchemy.engine import URL, Engine, make_url
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
    AttemptRow,
    AuditEntryRow,
    AuditHeadRow,
    DeviceRow,
    JobRow,
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
    def _transaction(
        self,
        *,
        write: bool,
        on_integrity: Callable[[IntegrityError], Exception] | None = None,
        snapshot: bool = False,
    ) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error, DB errors translated."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        bind = self._write_engine if write else self._snapshot_engine if snapshot else self._engine
        try:
            with Session(bind, expire_on_commit=False) as session, session.begin():
                yield session
        except IntegrityError as exc:
            if on_integrity is None:
                raise ReservationConflictError(
                    f"the ledger refused a change that breaks a rule: {exc.orig}"
                ) from exc
            raise on_integrity(exc) from exc
        except (OperationalError, InterfaceError) as exc:
            raise LedgerUnavailableError(f"ledger database unavailable: {exc.orig or exc}") from exc
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc

    # -- audit ------------------------------------------------------------------------------

    def _append_audit(
        self,
        session: Session,
        *,
        actor: str,
        action: str,
        subject: str,
        details: dict[str, object],
        at: datetime,
    ) -> None:
        """Append one link; the head row lock serialises every writer of the chain."""
        _require_label(actor, "actor")
        _require_label(action, "action", 64)
        _require_label(subject, "subject", AUDIT_SUBJECT_MAX_CHARS)
        details_json = canonical_json(details)
        head = session.exec(
            select(AuditHeadRow).where(AuditHeadRow.id == AUDIT_HEAD_ROW_ID).with_for_update()
        ).one()
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
        session.add(
            AuditEntryRow(
                seq=seq,
                at=at,
                actor=actor,
                action=action,
                subject=subject,
                details=details_json,
                prev_hash=head.hash,
                hash=digest,
            )
        )
        head.seq = seq
        head.hash = digest
        session.add(head)

    def audit(self, *, actor: str, action: str, subject: str, details: dict[str, object]) -> None:
        """Append an entry to the audit trail (for events outside the ledger's own transitions)."""
        with self._transaction(write=True) as session:
            self._append_audit(
                session, actor=actor, action=action, subject=subject, details=details, at=_now()
            )

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
            self._append_audit(
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
            self._append_audit(
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

        def clash(exc: IntegrityError) -> Exception:
            return IdListError(
                f"{source}: an ID was imported concurrently elsewhere ({exc.orig}); nothing was imported"
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
            self._append_audit(
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
    def _reservation(row: DeviceRow, *, resumed: bool) -> Reservation:
        return Reservation(
            device_id=row.device_id,
            hw_serial=row.hw_serial or "",
            resumed=resumed,
            state=DeviceState(row.state),
            metadata=dict(row.metadata_),
        )

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
        def race(_exc: IntegrityError) -> Exception:
            return _SerialRaceError()

        now = _now()
        with self._transaction(write=True, on_integrity=race) as session:
            lot_row = self._lot_row(session, lot, lock="share")
            if lot_row.state != LotState.ACTIVE:
                raise LotStateError(f"lot {lot!r} is {lot_row.state}; reservations need an active lot")
            existing = session.exec(
                select(DeviceRow)
                .where(DeviceRow.lot_id == lot_row.id, DeviceRow.hw_serial == hw_serial)
                .with_for_update()
            ).first()
            if existing is not None:
                return self._resume(
                    session, existing, lot, station=station, port=port, job_id=job_id, actor=actor
                )
            row = session.exec(
                select(DeviceRow)
                .where(DeviceRow.lot_id == lot_row.id, DeviceRow.state == DeviceState.AVAILABLE.value)
                .order_by(col(DeviceRow.id))
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                raise IdsExhaustedError(f"lot {lot!r} has no available IDs left")
            row.state = DeviceState.RESERVED.value
            row.hw_serial = hw_serial
            row.station = station
            row.port = port
            row.job_id = job_id
            row.reserved_at = now
            session.add(row)
            # Surface a concurrent reservation of the same serial (unique index) before auditing.
            session.flush()
            self._append_audit(
                session,
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
            return self._reservation(row, resumed=False)

    def _resume(
        self,
        session: Session,
        row: DeviceRow,
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
            moved = {"station": row.station, "port": row.port, "job_id": row.job_id}
            row.station = station
            row.port = port
            row.job_id = job_id
            session.add(row)
            self._append_audit(
                session,
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

    def _device_row(self, session: Session, lot_row: LotRow, device_id: str) -> DeviceRow:
        row = session.exec(
            select(DeviceRow)
            .where(DeviceRow.lot_id == lot_row.id, DeviceRow.device_id == device_id)
            .with_for_update()
        ).first()
        if row is None:
            raise DeviceNotFoundError(f"no ID {device_id!r} in lot {lot_row.name!r}")
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
    ) -> None:
        """Record that the board holding this reservation now carries its verified certificate."""
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
        with self._transaction(write=True) as session:
            lot_row = self._lot_row(session, lot, lock="share")
            if lot_row.state not in (LotState.ACTIVE, LotState.PAUSED):
                raise LotStateError(f"lot {lot!r} is {lot_row.state}; it records no more devices")
            row = self._device_row(session, lot_row, device_id)
            if (
                row.state == DeviceState.PROVISIONED
                and row.hw_serial == hw_serial
                and row.cert_fingerprint_sha256 == fingerprint
            ):
                return  # a retry after a commit whose reply was lost: already recorded
            if row.state != DeviceState.RESERVED or row.hw_serial != hw_serial:
                raise ReservationConflictError(
                    f"ID {device_id!r} in lot {lot!r} is {row.state}"
                    f"{f' for serial {row.hw_serial!r}' if row.hw_serial else ''}, "
                    f"not reserved to serial {hw_serial!r}"
                )
            row.state = DeviceState.PROVISIONED.value
            row.cert_der = cert_der
            row.cert_serial = serial_hex
            row.cert_fingerprint_sha256 = fingerprint
            row.provisioned_at = now
            row.station = station
            row.port = port
            session.add(row)
            self._append_audit(
                session,
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

    def void(self, lot: str, device_id: str, reason: str, *, actor: str) -> None:
        """Take an ID out of use for good, keeping its serial binding and certificate on record."""
        if not reason.strip():
            raise InputError("voiding an ID needs a reason")
        now = _now()
        with self._transaction(write=True) as session:
            lot_row = self._lot_row(session, lot, lock="share")
            if lot_row.state == LotState.CLOSED:
                raise LotStateError(f"lot {lot!r} is closed; its IDs can no longer change")
            row = self._device_row(session, lot_row, device_id)
            previous = DeviceState(row.state)
            if previous is DeviceState.VOID:
                raise DeviceStateError(f"ID {device_id!r} in lot {lot!r} is already void ({row.void_reason})")
            row.state = DeviceState.VOID.value
            row.void_reason = reason
            session.add(row)
            self._append_audit(
                session,
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
    def _record(row: DeviceRow, lot: str) -> DeviceRecord:
        return DeviceRecord(
            device_id=row.device_id,
            lot=lot,
            state=DeviceState(row.state),
            metadata=dict(row.metadata_),
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
        with self._transaction(write=False) as session:
            lot_row = self._lot_row(session, lot)
            row = session.exec(
                select(DeviceRow).where(DeviceRow.lot_id == lot_row.id, DeviceRow.hw_serial == hw_serial)
            ).first()
            return None if row is None else self._record(row, lot)

    def find_device(self, device_id: str) -> DeviceRecord | None:
        """An ID in any lot (IDs are unique across lots), or None."""
        with self._transaction(write=False) as session:
            found = session.exec(
                select(DeviceRow, LotRow.name)
                .join(LotRow, col(LotRow.id) == col(DeviceRow.lot_id))
                .where(DeviceRow.device_id == device_id)
            ).first()
            return None if found is None else self._record(found[0], found[1])

    def progress(self, lot: str) -> LotProgress:
        """How many IDs of the lot are available, reserved, provisioned and void."""
        with self._transaction(write=False) as session:
            lot_row = self._lot_row(session, lot)
            counts: dict[str, int] = dict.fromkeys(DeviceState, 0)
            grouped = session.exec(
                select(DeviceRow.state, func.count())
                .where(DeviceRow.lot_id == lot_row.id)
                .group_by(col(DeviceRow.state))
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
        with self._transaction(write=False) as session:
            lot_row = self._lot_row(session, lot)
            rows: Sequence[DeviceRow] = session.exec(
                select(DeviceRow)
                .where(DeviceRow.lot_id == lot_row.id, DeviceRow.state == DeviceState.PROVISIONED.value)
                .order_by(col(DeviceRow.provisioned_at), col(DeviceRow.id))
            ).all()
            return [self._record(row, lot) for row in rows]

    # -- jobs -------------------------------------------------------------------------------

    def start_job(self, lot: str, *, station: str, port: str) -> int:
        """Open a job record for one board on one port; return its id."""
        _require_label(station, "station")
        _require_label(port, "port")
        with self._transaction(write=True) as session:
            lot_row = self._lot_row(session, lot)
            if lot_row.id is None:
                raise LedgerError(f"lot {lot!r} has no id")
            job = JobRow(lot_id=lot_row.id, station=station, port=port, started_at=_now())
            session.add(job)
            session.flush()
            if job.id is None:
                raise LedgerError("the database assigned no job id")
            return job.id

    def _job_row(self, session: Session, job_id: int) -> JobRow:
        job = session.exec(select(JobRow).where(JobRow.id == job_id).with_for_update()).first()
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        return job

    def set_job_serial(self, job_id: int, hw_serial: str) -> None:
        """Record which board (secure-element serial) a job is working on."""
        _require_serial(hw_serial)
        with self._transaction(write=True) as session:
            job = self._job_row(session, job_id)
            job.hw_serial = hw_serial
            session.add(job)

    def finish_job(self, job_id: int, *, outcome: str, reason: str | None) -> None:
        """Close a job with its outcome (e.g. ``ok``, ``failed``, ``aborted``) and reason."""
        _require_label(outcome, "outcome", 32)
        with self._transaction(write=True) as session:
            job = self._job_row(session, job_id)
            if job.finished_at is not None:
                raise LedgerError(f"job {job_id} already finished ({job.outcome})")
            job.finished_at = _now()
            job.outcome = outcome
            job.reason = reason
            session.add(job)

    def record_attempt(
        self, job_id: int, *, step: str, outcome: str, reason: str | None, duration_s: float
    ) -> None:
        """Record one attempt of a pipeline step within a job."""
        _require_label(step, "step", 64)
        _require_label(outcome, "outcome", 32)
        if not duration_s >= 0:
            raise InputError(f"duration_s must be >= 0, got {duration_s}")
        with self._transaction(write=True) as session:
            self._job_row(session, job_id)
            session.add(
                AttemptRow(
                    job_id=job_id, step=step, outcome=outcome, reason=reason, duration_s=duration_s, at=_now()
                )
            )


def verify_audit(url: str) -> int:
    """Verify the audit chain of the ledger at ``url``; return the entry count (``factoryd audit verify``)."""
    with Ledger.open(url) as ledger:
        return ledger.verify_audit()
