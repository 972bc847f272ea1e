"""The ledger's database: the engine, its transactions, error translation and the audit append.

Every public ledger call is one transaction committed before it returns, and the audit entry
describing a change is written in the same transaction as the change. Two kinds of transaction
exist: ORM sessions for the calls off the hot path (lots, imports, audit verification) and
driver-cursor transactions running :mod:`factoryd.ledger.hot`'s compiled statements for the
per-board calls. Both translate database errors into ledger errors.
"""

from __future__ import annotations

import itertools
import select as io_select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import psycopg
import structlog
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlmodel import Session, col, create_engine, select

from factoryd.errors import (
    ConfigError,
    InputError,
    LedgerCommitUnknownError,
    LedgerError,
    ReservationConflictError,
)
from factoryd.ledger.audit import (
    AuditLink,
    ChainHead,
    VerifiedChain,
    as_utc,
    canonical_json,
    chain_genesis,
    link_hash,
    verify_anchors,
    verify_chain,
)
from factoryd.ledger.errors import LedgerStorageFullError, LedgerUnavailableError
from factoryd.ledger.hot import (
    DRIVER_ERRORS,
    DRIVER_INTEGRITY_ERRORS,
    DRIVER_UNAVAILABLE_ERRORS,
    ChangeAppendRow,
    Command,
    HeadRow,
    HotStatements,
    Query,
    Tx,
    driver_transaction,
)
from factoryd.ledger.tables import (
    AUDIT_SUBJECT_MAX_CHARS,
    LABEL_MAX_CHARS,
    SERIAL_MAX_CHARS,
    AuditEntryRow,
    AuditHeadRow,
)

log = structlog.get_logger(__name__)

# A timestamp this much before the previous entry's is recorded as the clock stepping back; less is
# the order in which concurrent writers reached the ledger (well under a second, even under load).
CLOCK_STEP_TOLERANCE_S = 2.0
# How long a SQLite writer waits for another one before giving up (several stations' worth of commits).
SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_POOL_SIZE = 10
# psycopg prepares a statement automatically after this many executions: never, in practice.
PG_AUTO_PREPARE_NEVER = 2**31 - 1
PG_MAX_OVERFLOW = 20
# A server that does not answer a connect within this is treated as down (libpq's default is forever).
PG_CONNECT_TIMEOUT_S = 5
# Connections older than this are replaced on checkout: a NAT or firewall between station and server may
# drop idle flows silently, and pre-ping alone would then wait for TCP to give up.
PG_POOL_RECYCLE_S = 1800
# TCP keepalive and user timeout (libpq options): a silently dropped network (no RST) is noticed in
# about 10 s on an idle or a busy connection, instead of the kernel's ~2 h keepalive / ~15 min retransmits.
PG_KEEPALIVES_IDLE_S = 5
PG_KEEPALIVES_INTERVAL_S = 2
PG_KEEPALIVES_COUNT = 3
PG_TCP_USER_TIMEOUT_MS = 10_000
# When the connection dies during COMMIT, the outcome is read back (pg_xact_status) on a new connection
# for up to this long before the caller is told it is unknown; a server restart takes about a second.
COMMIT_RESOLVE_TIMEOUT_S = 30.0
COMMIT_RESOLVE_INITIAL_S = 0.1
COMMIT_RESOLVE_MAX_S = 2.0
# A pooled PostgreSQL connection idle this long is pinged before use (NAT and firewall idle timeouts
# are tens of seconds at the least; keepalive, PG_KEEPALIVES_*, marks a dead peer's socket in error).
PG_PING_IDLE_S = 5.0
_CHECKED_IN_AT_KEY = "factoryd_checked_in_at"
# A one-statement write (autocommit) whose connection is lost is read back for this long; past it the
# caller is told the ledger is unavailable (and pauses), since such a write is idempotent to retry.
STATEMENT_RESOLVE_TIMEOUT_S = 2.0
# A pooled PostgreSQL connection's server process: (pid, backend_start), read once per connection.
_BACKEND_KEY = "factoryd_backend"
# How long the read-back of a lost one-statement write waits for its server process to be gone, per try.
_TERMINATE_WAIT_MS = 1_000
# The execution option that makes a SQLite transaction a writer from its BEGIN.
WRITE_OPTION = "factoryd_ledger_write"
_INTEGRITY_ERRORS: tuple[type[Exception], ...] = (IntegrityError, *DRIVER_INTEGRITY_ERRORS)
_OTHER_DB_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, *DRIVER_ERRORS)
# What asking a restarting server about a transaction may raise (the pool's connect is SQLAlchemy's).
_RESOLVE_ERRORS: tuple[type[Exception], ...] = (*DRIVER_UNAVAILABLE_ERRORS, OperationalError, InterfaceError)
_RowT = TypeVar("_RowT")
_T = TypeVar("_T")


def _unavailable(error: BaseException) -> LedgerUnavailableError:
    """The ledger error for a database that cannot be used right now (a full disk named as such)."""
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return LedgerStorageFullError(f"the ledger database's disk is full: {error}")
    return LedgerUnavailableError(f"ledger database unavailable: {error}")


def utc_now() -> datetime:
    """The current time, timezone-aware (every ledger timestamp is UTC)."""
    return datetime.now(UTC)


def require_label(value: str, what: str, max_chars: int = LABEL_MAX_CHARS) -> str:
    """``value`` if it is 1..``max_chars`` printable characters; InputError naming ``what`` otherwise."""
    # str.isprintable() is the per-character check in C (a generator over the string was ~10 µs a call).
    if not value or len(value) > max_chars or not value.isprintable():
        raise InputError(f"{what} must be 1..{max_chars} printable characters, got {value!r}")
    return value


def require_serial(hw_serial: str) -> str:
    """``hw_serial`` if it is a printable label without whitespace; InputError otherwise."""
    require_label(hw_serial, "hw_serial", SERIAL_MAX_CHARS)
    # A printable string's only whitespace can be the ASCII space: str.isprintable() is False for every
    # other character str.isspace() accepts (controls and separators). One C search, not a generator.
    if " " in hw_serial:
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
    write = connection.get_execution_options().get(WRITE_OPTION, False)
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
        engine = create_engine(
            sa_url,
            pool_size=PG_POOL_SIZE,
            max_overflow=PG_MAX_OVERFLOW,
            # No automatic server-side prepared statements: after psycopg's default five executions
            # the server switches to a generic plan, and for the import's ID lookups that plan is a
            # sequential scan per chunk (minutes for a 400k-ID list instead of seconds). The hot
            # path prepares its fixed statements explicitly (hot.py ``Tx``): psycopg ignores
            # ``prepare=True`` on a connection whose threshold is None, so the threshold is a count
            # no other statement reaches instead.
            connect_args={
                "prepare_threshold": PG_AUTO_PREPARE_NEVER,
                "connect_timeout": PG_CONNECT_TIMEOUT_S,
                "keepalives": 1,
                "keepalives_idle": PG_KEEPALIVES_IDLE_S,
                "keepalives_interval": PG_KEEPALIVES_INTERVAL_S,
                "keepalives_count": PG_KEEPALIVES_COUNT,
                "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS,
            },
            pool_recycle=PG_POOL_RECYCLE_S,
        )
        _ping_when_in_doubt(engine)
        return engine
    raise ConfigError(f"unsupported ledger database {backend!r}: use sqlite:/// or postgresql+psycopg://")


def _socket_in_doubt(dbapi_connection: Any) -> bool:
    """Whether an idle connection's socket has something to read or an error: the server closed it
    (a restart sends its FATAL and a FIN), keepalive gave up on it, or it sent a notice; else False."""
    try:
        fd = dbapi_connection.pgconn.socket
    except (AttributeError, psycopg.Error):
        return True
    poller = io_select.poll()  # not select(): descriptors above 1 023 (1 024-port stations)
    poller.register(fd, io_select.POLLIN | io_select.POLLPRI)
    return bool(poller.poll(0))


def _ping_when_in_doubt(engine: Engine) -> None:
    """Ping a PostgreSQL connection on checkout only when it may be dead, instead of every checkout.

    SQLAlchemy's ``pool_pre_ping`` costs a round trip per transaction (2 of a claim's 17). A
    connection is pinged if it sat idle in the pool for PG_PING_IDLE_S or more (a NAT or firewall
    may have dropped it silently) or its socket is readable or in error (a restarted server, a
    keepalive timeout). A dead one is replaced by the pool (DisconnectionError), as with pre-ping.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_CHECKED_IN_AT_KEY] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        checked_in = record.info.get(_CHECKED_IN_AT_KEY)
        if checked_in is None:
            return  # a connection made just now for this checkout
        if time.monotonic() - checked_in < PG_PING_IDLE_S and not _socket_in_doubt(dbapi_connection):
            return
        try:
            dialect.do_ping(dbapi_connection)
        except DRIVER_ERRORS as exc:
            raise DisconnectionError(f"pooled ledger connection is dead: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _PendingLink:
    """An audit entry about to be chained (everything the link hash covers but its place)."""

    at: datetime
    actor: str
    action: str
    subject: str
    details_json: str


class _Group:
    """One group commit's SQLite transaction (``LedgerBase._group_commit``), begun by its first call."""

    __slots__ = ("began", "cursor")

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor
        self.began = False

    @contextmanager
    def savepoint(self) -> Iterator[Tx]:
        """One call's transaction as a savepoint: released on success, rolled back alone on any error."""
        cursor = self.cursor
        if not self.began:
            cursor.execute("BEGIN IMMEDIATE")
            self.began = True
        cursor.execute("SAVEPOINT hot_call")
        try:
            yield Tx(cursor)
        except BaseException:
            # The original error is the one to report; if even this fails, the group's COMMIT will.
            with suppress(*DRIVER_ERRORS):
                cursor.execute("ROLLBACK TO hot_call")
                cursor.execute("RELEASE hot_call")
            raise
        cursor.execute("RELEASE hot_call")


class LedgerBase:
    """Connections, transactions and the audit trail that every part of the ledger runs on."""

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine whose database is already at head; use ``Ledger.open`` instead."""
        self._engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        self._is_postgres = engine.dialect.name == "postgresql"
        # verify_audit reads the head and every entry from one snapshot while writers go on.
        self._snapshot_engine = (
            engine.execution_options(isolation_level="REPEATABLE READ") if self._is_postgres else engine
        )
        # Lot name -> id. Lots are never deleted or renamed, so an entry never goes stale; a
        # lot's *state* is never cached: the calls that depend on it read it in their transaction.
        self._lot_ids: dict[str, int] = {}
        # Chain -> the head this process last appended (a hint: _chain_onto lets the database confirm it).
        self._head_hints: dict[str, HeadRow] = {}
        self._sql = HotStatements.compile(engine.dialect)
        self._closed = False
        # This process's last audit timestamp: an entry earlier than it means the clock stepped back.
        self._last_audit_at: datetime | None = None
        # The group commit running on this thread, if any (_group_commit; SQLite only).
        self._group_state = threading.local()

    def _current_group(self) -> _Group | None:
        """The group commit running on this thread, if any."""
        group: _Group | None = getattr(self._group_state, "group", None)
        return group

    @contextmanager
    def _group_commit(self) -> Iterator[None]:
        """Hot-path calls made in the block share one SQLite transaction, committed when it ends.

        Each call's transaction becomes a savepoint in it: a call that fails is rolled back to its
        savepoint alone, with its error as ever, and the others stand; every call sees the ones
        before it. Nothing is durable until the block's COMMIT, which raises (translated, like any
        COMMIT) if it fails: then none of the calls happened. So a caller must not act on a call's
        result before the block has ended (``AsyncLedger`` settles them after it). Only hot-path
        calls may run in the block (an ORM transaction would wait on the group's write lock: it
        raises instead). On PostgreSQL, or inside a group already, the calls run as they always do.
        """
        if self._is_postgres or self._current_group() is not None:
            yield
            return
        with self._translated(None):
            fairy = self._engine.raw_connection()
        driver = cast(sqlite3.Connection, fairy.driver_connection)
        group = _Group(driver.cursor())
        self._group_state.group = group
        try:
            try:
                yield
            finally:
                self._group_state.group = None
            if group.began:
                with self._translated(None):
                    driver.commit()
        except BaseException:
            if group.began:
                with suppress(*DRIVER_ERRORS):
                    driver.rollback()
            raise
        finally:
            group.cursor.close()
            fairy.close()

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
            raise _unavailable(exc.orig or exc) from exc
        except DRIVER_UNAVAILABLE_ERRORS as exc:
            raise _unavailable(exc) from exc
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
        if self._current_group() is not None:
            raise RuntimeError("an ORM transaction inside a group commit (only hot-path calls may group)")
        bind = self._write_engine if write else self._snapshot_engine if snapshot else self._engine
        with (
            self._translated(on_integrity),
            Session(bind, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    def _refresh_statistics(self, *tables: str) -> None:
        """PostgreSQL: ANALYZE tables a bulk insert just grew (an ID import), before claims plan on them.

        The hot path's prepared statements switch to a generic plan after five executions and keep it
        for the connection's life; planned on the statistics of a table that was empty (a fresh lot
        before autovacuum's first ANALYZE), that plan scanned the whole table per claim: 734 against
        1,192 claims/s in ``bench ledger --stations 8``. ANALYZE also invalidates plans made on stale
        statistics. Best effort: a role that does not own the table only gets the server's warning.
        """
        if not self._is_postgres:
            return
        try:
            with self._engine.connect() as connection:
                connection.exec_driver_sql(f"ANALYZE {', '.join(tables)}")  # our table names, not input
                connection.commit()
        except SQLAlchemyError as exc:
            log.warning("ledger statistics not refreshed", tables=list(tables), error=str(exc))

    @contextmanager
    def _hot(
        self, *, write: bool, on_integrity: Callable[[Exception], Exception] | None = None
    ) -> Iterator[Tx]:
        """One hot-path transaction on a pooled connection's driver: committed before it returns.

        Inside ``_group_commit`` it is a savepoint of the group's transaction instead.
        """
        group = self._current_group()
        if group is not None:
            with self._translated(on_integrity), group.savepoint() as tx:
                yield tx
            return
        with self._translated(on_integrity):
            fairy = self._engine.raw_connection()
            checked_in = False
            # PostgreSQL writers note their transaction id, so that a COMMIT whose reply was lost can be
            # resolved by asking the server afterwards instead of guessing (SQLite commits locally).
            xid: str | None = None
            committing = False
            try:
                with driver_transaction(
                    fairy.driver_connection, sqlite=not self._is_postgres, write=write
                ) as cursor:
                    tx = Tx(cursor)
                    yield tx
                    if write and self._is_postgres:
                        # Known before COMMIT is sent, or the read-back could not ask about it: a hot
                        # statement (the lot + device lookup) may have returned it already; else ask.
                        xid = tx.xid
                        if xid is None:
                            cursor.execute("SELECT pg_current_xact_id()::text", {})
                            row = cursor.fetchone()
                            xid = None if row is None else str(row[0])
                    committing = True
            except DRIVER_UNAVAILABLE_ERRORS as exc:
                if self._is_postgres:
                    # A lost server connection must not go back to the pool (invalidate checks it in).
                    fairy.invalidate()
                    checked_in = True
                if not (committing and xid is not None and self._committed_after_all(xid, exc)):
                    raise
            finally:
                if not checked_in:
                    fairy.close()

    def _committed_after_all(self, xid: str, lost: Exception) -> bool:
        """Whether a transaction whose COMMIT lost its connection committed (True) or not (False)."""

        def ask() -> bool | None:
            # "in progress": the server has not yet finished the COMMIT it received.
            return {"committed": True, "aborted": False}.get(self._xact_status(xid) or "")

        return self._resolved(ask, lost, f"COMMIT of transaction {xid}")

    def _resolved(
        self, ask: Callable[[], _T | None], lost: Exception, during: str, *, timeout_s: float | None = None
    ) -> _T:
        """Ask the server what became of a write whose connection was lost, until it can tell.

        ``ask`` returns None while the server cannot tell yet (or raises: unreachable). Asked on fresh
        connections with capped backoff; if the server stays out of reach past ``timeout_s``
        (COMMIT_RESOLVE_TIMEOUT_S), LedgerCommitUnknownError: the caller must not assume either way.
        """
        timeout_s = COMMIT_RESOLVE_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        delay_s = COMMIT_RESOLVE_INITIAL_S
        last: Exception = lost
        while True:
            try:
                answer = ask()
            except _RESOLVE_ERRORS as exc:
                answer, last = None, exc
            if answer is not None:
                return answer
            if time.monotonic() + delay_s > deadline:
                raise LedgerCommitUnknownError(
                    f"the ledger connection was lost during {during} and the server could not be asked "
                    f"within {timeout_s:.0f} s whether it committed: {last}"
                ) from lost
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, COMMIT_RESOLVE_MAX_S)

    def _hot_statement(
        self,
        query: Query[_RowT],
        params: Mapping[str, object],
        *,
        landed: Callable[[Tx], _T | None],
        chain: str,
        at: datetime,
        on_integrity: Callable[[Exception], Exception] | None = None,
    ) -> tuple[_RowT | None, _T | None]:
        """PostgreSQL: one statement that is its own transaction (autocommit: no BEGIN or COMMIT round trip).

        Returns ``(row, None)``: the statement's first row (or None), committed by the time it is
        here (it appends to the audit chain ``chain`` at ``at``). If the connection is lost on the
        way, the outcome is read back instead of guessed: the statement's server process is ended and
        waited for (``pg_terminate_backend``; only then can nothing of it still commit), then
        ``landed`` looks for what the statement writes, in a transaction on a fresh connection.
        Found: ``(None, what landed returned)``. Not found: the statement did not commit and
        LedgerUnavailableError says so (a retry is safe). Not answered
        within STATEMENT_RESOLVE_TIMEOUT_S: LedgerUnavailableError too, so that the station notices the
        outage at once; only idempotent writes use this (a retry finds what the lost one did).
        """
        with self._translated(on_integrity):
            fairy = self._engine.raw_connection()
            driver: psycopg.Connection[Any] = fairy.driver_connection  # type: ignore[assignment]
            backend: tuple[int, datetime] | None = None
            try:
                backend = self._backend_of(fairy, driver)
                driver.autocommit = True
                with driver.cursor() as cursor:
                    row = Tx(cursor).first(query, params)
                driver.autocommit = False
            except DRIVER_UNAVAILABLE_ERRORS as exc:
                fairy.invalidate()  # checks it in: a lost server connection must not go back to the pool
                if backend is None:
                    raise
                lost_in = backend
                try:
                    outcome = self._resolved(
                        lambda: self._landed(lost_in, landed),
                        exc,
                        "a one-statement write",
                        timeout_s=STATEMENT_RESOLVE_TIMEOUT_S,
                    )
                except LedgerCommitUnknownError:
                    # Not answered soon: an outage. The station pauses on it and retries later, which is
                    # safe here though the write may have landed: these writes are idempotent (a
                    # reservation resumes the serial's ID, a recorded provision is recognised).
                    raise LedgerUnavailableError(
                        f"ledger database unavailable: {exc}; whether the write landed is read when it is "
                        "retried"
                    ) from exc
                if outcome[0]:
                    # It landed, appending to ``chain`` a link whose hash the server may have made:
                    # the next append re-reads the head under lock.
                    self._head_hints.pop(chain, None)
                    self._last_audit_at = at
                    return None, outcome[1]
                raise
            except BaseException:
                with suppress(*DRIVER_ERRORS):
                    driver.autocommit = False
                fairy.close()
                raise
            fairy.close()
            return row, None

    @staticmethod
    def _backend_of(fairy: Any, driver: psycopg.Connection[Any]) -> tuple[int, datetime] | None:
        """The connection's server process (pid, start time), read on its first use and kept with it."""
        backend: tuple[int, datetime] | None = fairy.info.get(_BACKEND_KEY)
        if backend is None:
            with driver.cursor() as cursor:
                cursor.execute("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                row = cursor.fetchone()
            driver.rollback()
            if row is not None:
                backend = (int(row[0]), row[1])
                fairy.info[_BACKEND_KEY] = backend
        return backend

    def _landed(
        self, backend: tuple[int, datetime], landed: Callable[[Tx], _T | None]
    ) -> tuple[bool, _T | None] | None:
        """A lost statement's outcome once its server process is gone; None while it is not gone yet.

        The pid is matched with its start time, so a later process that reuses the pid is never signalled.
        """
        fairy = self._engine.raw_connection()
        driver: Any = fairy.driver_connection
        try:
            with driver.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid, %(wait)s) FROM pg_stat_activity "
                    "WHERE pid = %(pid)s AND backend_start = %(started)s",
                    {"pid": backend[0], "started": backend[1], "wait": _TERMINATE_WAIT_MS},
                )
                signalled = cursor.fetchone()
                # Still running after the wait: ask again. Else gone, and what it wrote is all there is.
                value = None if signalled is not None and not signalled[0] else landed(Tx(cursor))
                gone = signalled is None or bool(signalled[0])
            driver.rollback()
        except DRIVER_UNAVAILABLE_ERRORS:
            fairy.invalidate()
            raise
        except psycopg.errors.InsufficientPrivilege as exc:
            fairy.invalidate()
            raise LedgerCommitUnknownError(
                f"the ledger connection was lost during a one-statement write and its server process "
                f"{backend[0]} could not be ended to read the outcome back: {exc}"
            ) from exc
        except BaseException:
            fairy.invalidate()
            raise
        fairy.close()
        return (value is not None, value) if gone else None

    def _xact_status(self, xid: str) -> str | None:
        """pg_xact_status of a transaction id, on a new pooled connection."""
        fairy = self._engine.raw_connection()
        driver: Any = fairy.driver_connection
        try:
            cursor = driver.cursor()
            try:
                cursor.execute("SELECT pg_xact_status(%(xid)s::xid8)", {"xid": xid})
                row = cursor.fetchone()
            finally:
                cursor.close()
                with suppress(*DRIVER_ERRORS):
                    driver.rollback()
        except DRIVER_UNAVAILABLE_ERRORS:
            fairy.invalidate()
            raise
        fairy.close()
        return None if row is None else str(row[0]) if row[0] is not None else None

    @contextmanager
    def _session_tx(self, session: Session) -> Iterator[Tx]:
        """The hot-path statements inside an ORM session's transaction."""
        cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            yield Tx(cursor)
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
        """Append one link to the actor's chain in the caller's transaction (its head row lock serialises
        that chain's writers only: other stations append to their own chains meanwhile)."""
        link = self._pending_link(tx, actor=actor, action=action, subject=subject, details=details, at=at)
        self._append_link(tx, link)

    def _change_with_audit(
        self,
        tx: Tx,
        change: Command,
        combined: Query[ChangeAppendRow] | None,
        change_params: Mapping[str, object],
        *,
        actor: str,
        action: str,
        subject: str,
        details: dict[str, object],
        at: datetime,
    ) -> int:
        """Run ``change`` and, if it touched a row, append its audit link; the rows it touched.

        On PostgreSQL, with the chain's head remembered, both go in one round trip (``combined``, hot.py
        ``_change_and_append_statement``); if that head was stale the change stands and the link is
        chained after locking the head, in the same transaction as ever. A change that touches no row
        appends nothing.
        """
        link = self._pending_link(tx, actor=actor, action=action, subject=subject, details=details, at=at)
        cached = self._head_hints.get(link.actor)
        if combined is not None and cached is not None:
            params, new_head = self._link_params(link, cached)
            done = tx.first(combined, {**params, **change_params})
            if done is None or done.changed == 0:
                return 0
            if done.appended == 1:
                self._head_hints[link.actor] = new_head
                return done.changed
            self._head_hints.pop(link.actor, None)
            self._append_link(tx, link)
            return done.changed
        changed = tx.execute(change, change_params)
        if changed:
            self._append_link(tx, link)
        return changed

    def _pending_link(
        self, tx: Tx, *, actor: str, action: str, subject: str, details: dict[str, object], at: datetime
    ) -> _PendingLink:
        """The link an append will chain, checked; a clock step back since the last one is recorded first."""
        require_label(actor, "actor")
        require_label(action, "action", 64)
        require_label(subject, "subject", AUDIT_SUBJECT_MAX_CHARS)
        last = self._last_audit_at
        stepped = self._clock_stepped(at)
        self._last_audit_at = at
        if stepped and last is not None:
            # The station clock stepped back (NTP step, RTC reset): the chain keeps its order by seq and
            # records the step once, so a reader knows why the timestamps go backwards here.
            self._last_audit_at = None
            step = {
                "last_at": as_utc(last).isoformat(), "now": as_utc(at).isoformat(),
                "stepped_back_s": round((last - at).total_seconds(), 3),
            }  # fmt: skip
            self._append_audit(
                tx, actor=actor, action="clock.stepped_back", subject=actor, details=step, at=at
            )
        return _PendingLink(at, actor, action, subject, canonical_json(details))

    def _lock_head(self, tx: Tx, chain: str) -> None:
        """Lock ``chain``'s head row now (if it has one), remembered as the next append's head."""
        head = tx.first(self._sql.head_locked, {"chain": chain})
        if head is not None:
            self._head_hints[chain] = head

    def _clock_stepped(self, at: datetime) -> bool:
        """Whether ``at`` is earlier than this process's last audit timestamp by more than concurrency allows.

        Threads of one process take their timestamps before they queue for a head lock, so entries a
        few milliseconds out of order are concurrency, not a clock step.
        """
        last = self._last_audit_at
        return last is not None and (last - at).total_seconds() > CLOCK_STEP_TOLERANCE_S

    def _append_link(self, tx: Tx, link: _PendingLink) -> None:
        """Chain ``link`` onto its actor's chain: onto the remembered head, or else the locked one."""
        chain = link.actor
        cached = self._head_hints.get(chain)
        if cached is not None and self._chain_onto(tx, chain, cached, link):
            return
        # First append of this process to the chain, or another writer moved its head: lock it.
        head = tx.first(self._sql.head_locked, {"chain": chain})
        if head is None:
            # The chain's first link: create its head (a racing writer's insert is a no-op), then lock it.
            tx.execute(self._sql.insert_head, {"b_chain": chain, "b_hash": chain_genesis(chain)})
            head = tx.first(self._sql.head_locked, {"chain": chain})
            if head is None:
                raise LedgerError(f"the head row of audit chain {chain!r} is missing")
        if not self._chain_onto(tx, chain, head, link):
            raise LedgerError(f"the head of audit chain {chain!r} moved while this transaction held its lock")

    @staticmethod
    def _link_params(link: _PendingLink, head: HeadRow) -> tuple[dict[str, object], HeadRow]:
        """The statement parameters that chain ``link`` onto ``head``, and the head it makes."""
        seq = head.seq + 1
        digest = link_hash(
            seq=seq,
            at=link.at,
            actor=link.actor,
            action=link.action,
            subject=link.subject,
            details_json=link.details_json,
            prev_hash=head.hash,
        )
        params: dict[str, object] = {
            "chain": link.actor,
            "old_seq": head.seq,
            "old_hash": head.hash,
            "b_chain": link.actor,
            "b_seq": seq,
            "b_hash": digest,
            "b_at": link.at,
            "b_actor": link.actor,
            "b_action": link.action,
            "b_subject": link.subject,
            "b_details": link.details_json,
            "b_prev_hash": head.hash,
        }
        return params, HeadRow(seq, digest)

    def _chain_onto(self, tx: Tx, chain: str, head: HeadRow, link: _PendingLink) -> bool:
        """Append ``link`` after ``head`` if that is still the chain's head (then locked by us); False if not.

        The head is remembered per chain, so a station appending to its own chain skips reading the
        head row. The database decides: the conditional UPDATE matches only the head it names, and a
        remembered head that a rolled-back transaction or another writer made stale matches nothing.
        """
        params, new_head = self._link_params(link, head)
        statement = self._sql.append_audit
        if statement is not None:  # PostgreSQL: one round trip
            appended = tx.execute(statement, params) == 1
        elif tx.execute(self._sql.advance_head, params) == 1:
            tx.execute(self._sql.insert_audit, params)
            appended = True
        else:
            appended = False
        if appended:
            self._head_hints[chain] = new_head
        else:
            self._head_hints.pop(chain, None)
        return appended

    def _audit_in_session(
        self,
        session: Session,
        *,
        actor: str,
        action: str,
        subject: str,
        details: dict[str, object],
        at: datetime,
    ) -> None:
        """Append one link inside an ORM session's transaction."""
        with self._session_tx(session) as tx:
            self._append_audit(tx, actor=actor, action=action, subject=subject, details=details, at=at)

    def audit(self, *, actor: str, action: str, subject: str, details: dict[str, object]) -> None:
        """Append an entry to the audit trail (for events outside the ledger's own transitions)."""
        with self._hot(write=True) as tx:
            self._append_audit(tx, actor=actor, action=action, subject=subject, details=details, at=utc_now())

    def verify_audit(self) -> int:
        """Recompute every hash chain; return the entry count or raise AuditChainError."""
        return sum(chain.count for chain in self._verify_audit_chains(()).values())

    def _verify_audit_chains(
        self, anchors: Sequence[ChainHead], *, source: str = "the manifest"
    ) -> dict[str, VerifiedChain]:
        """Verify each chain against its head, then the anchored heads (a signed manifest's) against them.

        Public as ``ledger.core.verify_audit_chains`` (the async facade mirrors only the methods).
        """
        wanted: dict[str, set[int]] = {}
        for anchor in anchors:
            wanted.setdefault(anchor.chain, set()).add(anchor.seq)
        with self._transaction(write=False, snapshot=True) as session:
            heads = {row.chain: row for row in session.exec(select(AuditHeadRow)).all()}
            rows = session.exec(
                select(AuditEntryRow)
                .order_by(col(AuditEntryRow.chain), col(AuditEntryRow.chain_seq))
                .execution_options(yield_per=1000)
            )
            verified: dict[str, VerifiedChain] = {}
            try:
                for chain, chain_rows in itertools.groupby(rows, key=lambda row: row.chain):
                    head = heads.get(chain)
                    links = (
                        AuditLink(
                            seq=row.chain_seq,
                            at=row.at,
                            actor=row.actor,
                            action=row.action,
                            subject=row.subject,
                            details_json=row.details,
                            prev_hash=row.prev_hash,
                            hash=row.hash,
                        )
                        for row in chain_rows
                    )
                    verified[chain] = verify_chain(
                        links,
                        head_seq=head.seq if head is not None else 0,
                        head_hash=head.hash if head is not None else chain_genesis(chain),
                        chain=chain,
                        keep=wanted.get(chain, ()),
                    )
            finally:
                # A server-side cursor (PostgreSQL) must be closed even when verification stops early.
                rows.close()
        for chain, head in heads.items():
            if chain not in verified:  # a head whose every entry is gone
                verified[chain] = verify_chain((), head_seq=head.seq, head_hash=head.hash, chain=chain)
        verify_anchors(verified, anchors, source=source)
        return verified

    def _audit_heads(self) -> list[ChainHead]:
        """Every audit chain's head now, by chain name (public as ``core.audit_chain_heads``)."""
        with self._transaction(write=False) as session:
            rows = session.exec(select(AuditHeadRow).order_by(col(AuditHeadRow.chain))).all()
            return [ChainHead(row.chain, row.seq, row.hash) for row in rows]
