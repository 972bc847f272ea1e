"""Labels in the ledger: each lot's template and the durable print queue.

A provisioned board gets one label job (its device ID is the job's dedupe key, so a retried hook
never queues a second one); a reprint is a job of its own, audited with who asked for it. A job
holds where and why to print, never the label's bytes: a Matter label carries the onboarding codes
(the passcode), which stay sealed in ``matter_device`` and are opened again at print or preview time.
Jobs move ``queued → printed`` or ``queued → failed`` (a label that cannot be made: the template
needs codes the device has not got); printer trouble keeps a job queued with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlmodel import Session, col, select

from factoryd.errors import InputError, LedgerError
from factoryd.labels.errors import LabelTemplateError
from factoryd.labels.template import LabelTemplate, template_sha256
from factoryd.ledger.audit import as_utc
from factoryd.ledger.engine import require_label, utc_now
from factoryd.ledger.errors import DeviceNotFoundError, DeviceStateError, JobNotFoundError
from factoryd.ledger.lots import LotBook
from factoryd.ledger.model import DeviceState
from factoryd.ledger.tables import ID_MAX_CHARS, DeviceRow, LabelJobRow, LabelTemplateRow, LotRow

# How many jobs one listing returns at most (the page and the CLI show the newest).
MAX_LABEL_LIST = 1000
LAST_ERROR_MAX_CHARS = 500


class LabelKind(StrEnum):
    """Why a label is printed."""

    BOARD = "board"  # the board's own label, queued when it was provisioned
    REPRINT = "reprint"  # asked for by an operator (station page or CLI), audited


class LabelState(StrEnum):
    """Where a label job is."""

    QUEUED = "queued"
    PRINTED = "printed"
    FAILED = "failed"  # the label cannot be made; a reprint after the cause is fixed is a new job


class LabelOutcome(StrEnum):
    """What one print attempt came to."""

    PRINTED = "printed"
    RETRY = "retry"  # printer offline or not ready: stays queued
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LabelTemplateInfo:
    """A lot's stored template."""

    lot: str
    text: str
    sha256: str
    set_by: str
    set_at: datetime


@dataclass(frozen=True, slots=True)
class LabelJob:
    """One label job as the queue, the page and the CLI see it."""

    id: int
    lot: str
    device_id: str
    station: str
    port: str
    kind: LabelKind
    state: LabelState
    attempts: int
    last_error: str | None
    condition: str | None
    printer: str | None
    requested_by: str
    created_at: datetime
    updated_at: datetime
    printed_at: datetime | None


def _job(row: LabelJobRow, lot: str) -> LabelJob:
    if row.id is None:
        raise LedgerError("a label job row has no id")
    return LabelJob(
        id=row.id,
        lot=lot,
        device_id=row.device_id,
        station=row.station,
        port=row.port,
        kind=LabelKind(row.kind),
        state=LabelState(row.state),
        attempts=row.attempts,
        last_error=row.last_error,
        condition=row.condition,
        printer=row.printer,
        requested_by=row.requested_by,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        printed_at=as_utc(row.printed_at) if row.printed_at is not None else None,
    )


class _DuplicateBoardLabelError(Exception):
    """The board's own label job exists already (a concurrent or repeated hook)."""


class LabelBook(LotBook):
    """The ledger's label templates and print queue (mixed into ``Ledger``)."""

    def set_label_template(self, lot: str, template: str, *, actor: str) -> LabelTemplateInfo:
        """Validate and store the lot's label template (audited); LabelTemplateError names a problem.

        A template that prints Matter onboarding codes is refused for a lot without them.
        """
        parsed = LabelTemplate.parse(template, source=f"label template of lot {lot!r}")
        digest = template_sha256(template)
        now = utc_now()
        with self._transaction(write=True) as session:
            lot_row = self._lot_row(session, lot, for_update=True)
            if parsed.needs_onboarding_codes and not lot_row.profile.get("matter"):
                raise LabelTemplateError(
                    f"the template prints Matter onboarding codes, but lot {lot!r} is not a Matter lot"
                )
            row = session.exec(select(LabelTemplateRow).where(LabelTemplateRow.lot_id == lot_row.id)).first()
            if row is None:
                if lot_row.id is None:
                    raise LedgerError(f"lot {lot!r} has no id")
                row = LabelTemplateRow(
                    lot_id=lot_row.id, template=template, sha256=digest, set_by=actor, set_at=now
                )
            else:
                row.template, row.sha256, row.set_by, row.set_at = template, digest, actor, now
            session.add(row)
            session.flush()
            self._audit_in_session(
                session,
                actor=actor,
                action="label.template",
                subject=lot,
                details={"lot": lot, "sha256": digest},
                at=now,
            )
        return LabelTemplateInfo(lot=lot, text=template, sha256=digest, set_by=actor, set_at=now)

    def label_template(self, lot: str) -> LabelTemplateInfo | None:
        """The lot's own template, or None (the station's default template applies)."""
        with self._transaction(write=False) as session:
            lot_row = self._lot_row(session, lot)
            row = session.exec(select(LabelTemplateRow).where(LabelTemplateRow.lot_id == lot_row.id)).first()
            if row is None:
                return None
            return LabelTemplateInfo(
                lot=lot, text=row.template, sha256=row.sha256, set_by=row.set_by, set_at=as_utc(row.set_at)
            )

    def queue_label(
        self, lot: str, device_id: str, *, station: str, port: str, kind: LabelKind, actor: str
    ) -> LabelJob:
        """Queue a label for a provisioned device; a board's own label is queued once (the first job returns).

        A reprint is audited in the same transaction. DeviceStateError unless the device is provisioned.
        """
        require_label(device_id, "device_id", ID_MAX_CHARS)
        require_label(station, "station")
        require_label(port, "port")
        wanted = LabelKind(kind)
        try:
            return self._insert_label(lot, device_id, station=station, port=port, kind=wanted, actor=actor)
        except _DuplicateBoardLabelError:
            with self._transaction(write=False) as session:
                row = session.exec(select(LabelJobRow).where(LabelJobRow.dedupe_key == device_id)).one()
                return _job(row, lot)

    def _insert_label(
        self, lot: str, device_id: str, *, station: str, port: str, kind: LabelKind, actor: str
    ) -> LabelJob:
        now = utc_now()
        board = kind is LabelKind.BOARD
        # Only a board's own label has a unique key to collide on: a concurrent hook lost the race.
        on_integrity = (lambda _exc: _DuplicateBoardLabelError()) if board else None
        with self._transaction(write=True, on_integrity=on_integrity) as session:
            lot_row = self._lot_row(session, lot)
            device = session.exec(
                select(DeviceRow).where(DeviceRow.device_id == device_id, DeviceRow.lot_id == lot_row.id)
            ).first()
            if device is None:
                raise DeviceNotFoundError(f"no device {device_id!r} in lot {lot!r}")
            if device.state != DeviceState.PROVISIONED:
                raise DeviceStateError(
                    f"device {device_id!r} is {device.state}, not provisioned: it gets no label"
                )
            if board:
                existing = session.exec(
                    select(LabelJobRow).where(LabelJobRow.dedupe_key == device_id)
                ).first()
                if existing is not None:
                    return _job(existing, lot)
            if lot_row.id is None:
                raise LedgerError(f"lot {lot!r} has no id")
            row = LabelJobRow(
                lot_id=lot_row.id,
                device_id=device_id,
                station=station,
                port=port,
                kind=kind.value,
                state=LabelState.QUEUED.value,
                attempts=0,
                dedupe_key=device_id if board else None,
                requested_by=actor,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            if not board:
                self._audit_in_session(
                    session,
                    actor=actor,
                    action="label.reprint",
                    subject=device_id,
                    details={"lot": lot, "station": station, "port": port, "label_job": row.id},
                    at=now,
                )
            return _job(row, lot)

    def label_jobs(
        self,
        *,
        station: str | None = None,
        device_id: str | None = None,
        state: LabelState | None = None,
        oldest_first: bool = False,
        limit: int = 100,
    ) -> list[LabelJob]:
        """Label jobs, newest first (or oldest first: the queue's order), filtered."""
        if not 1 <= limit <= MAX_LABEL_LIST:
            raise InputError(f"limit must be 1..{MAX_LABEL_LIST}, got {limit}")
        with self._transaction(write=False) as session:
            statement = select(LabelJobRow, LotRow.name).join(
                LotRow, col(LotRow.id) == col(LabelJobRow.lot_id)
            )
            if station is not None:
                statement = statement.where(LabelJobRow.station == station)
            if device_id is not None:
                statement = statement.where(LabelJobRow.device_id == device_id)
            if state is not None:
                statement = statement.where(LabelJobRow.state == LabelState(state).value)
            order = col(LabelJobRow.id) if oldest_first else col(LabelJobRow.id).desc()
            rows = session.exec(statement.order_by(order).limit(limit)).all()
            return [_job(row, lot) for row, lot in rows]

    def label_job(self, job_id: int) -> LabelJob:
        """One label job; JobNotFoundError if there is none."""
        with self._transaction(write=False) as session:
            return self._label_job(session, job_id)

    @staticmethod
    def _label_job(session: Session, job_id: int) -> LabelJob:
        found = session.exec(
            select(LabelJobRow, LotRow.name)
            .join(LotRow, col(LotRow.id) == col(LabelJobRow.lot_id))
            .where(LabelJobRow.id == job_id)
        ).first()
        if found is None:
            raise JobNotFoundError(f"no label job {job_id}")
        return _job(found[0], found[1])

    def record_label_attempt(
        self,
        job_id: int,
        *,
        outcome: LabelOutcome,
        error: str | None,
        condition: str | None,
        printer: str | None,
    ) -> LabelJob:
        """Record one print attempt of a queued job; a job that left the queue is not changed."""
        wanted = LabelOutcome(outcome)
        now = utc_now()
        with self._transaction(write=True) as session:
            row = session.exec(select(LabelJobRow).where(LabelJobRow.id == job_id).with_for_update()).first()
            if row is None:
                raise JobNotFoundError(f"no label job {job_id}")
            if row.state == LabelState.QUEUED:
                row.attempts += 1
                row.updated_at = now
                row.printer = printer
                row.condition = condition
                row.last_error = error[:LAST_ERROR_MAX_CHARS] if error else None
                if wanted is LabelOutcome.PRINTED:
                    row.state = LabelState.PRINTED.value
                    row.printed_at = now
                elif wanted is LabelOutcome.FAILED:
                    row.state = LabelState.FAILED.value
                session.add(row)
                session.flush()
            return self._label_job(session, job_id)
