"""Importing a customer's ID list into a lot: whole or not at all, in one transaction."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import psycopg
from sqlalchemy import ARRAY, String, any_, literal
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from factoryd.errors import IdListError, IssuanceError, LedgerError, LotStateError
from factoryd.ledger.engine import utc_now
from factoryd.ledger.errors import LedgerUnavailableError
from factoryd.ledger.idlist import (
    DEFAULT_MAX_BYTES,
    LineProblems,
    ParsedList,
    check_size,
    list_source,
    parse_id_list,
)
from factoryd.ledger.lots import LotBook
from factoryd.ledger.model import DeviceState, LotInfo, LotState
from factoryd.ledger.signature import verify_list_signature
from factoryd.ledger.tables import DeviceRow, LotRow

# IN (...) lists stay well below every backend's bound-parameter limit.
ID_QUERY_CHUNK = 500
# PostgreSQL takes a chunk as one array parameter, so its chunks can be far larger.
PG_ID_QUERY_CHUNK = 10_000


def _refuse_unissuable(info: LotInfo, parsed: ParsedList, source: str) -> None:
    """Refuse a list with an ID the lot's subject template cannot put into a certificate.

    A missing ``{meta.COLUMN}``, a column value with a comma, an ID longer than a CN may be: found
    here, whole list refused, instead of at issue time after the ID was reserved to a board.
    """
    template = info.profile.subject_template()
    problems = LineProblems(source)
    for item in parsed.ids:
        try:
            template.render(item.device_id, item.metadata)
        except IssuanceError as exc:
            problems.add(item.line, f"{exc} (the lot's subject template)")
    if problems:
        raise problems.error()


class IdImport(LotBook):
    """Customer ID lists into lots."""

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
        _refuse_unissuable(info, parsed, source)

        def clash(exc: Exception) -> Exception:
            orig = exc.orig if isinstance(exc, IntegrityError) else exc
            return IdListError(
                f"{source}: an ID was imported concurrently elsewhere ({orig}); nothing was imported"
            )

        now = utc_now()
        with self._transaction(write=True, on_integrity=clash) as session:
            row = self._lot_row(session, lot, for_update=True)
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
        self._refresh_statistics(str(DeviceRow.__tablename__))
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
        """IdListError naming the first line whose ID any lot already holds."""
        lines = {item.device_id: item.line for item in parsed.ids}
        ids = list(lines)
        clashes: list[tuple[int, str, str]] = []
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
