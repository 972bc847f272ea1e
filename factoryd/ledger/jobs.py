"""Jobs: one record per board on a port, its step attempts, and how it ended."""

from __future__ import annotations

from datetime import datetime

from factoryd.errors import InputError, LedgerError
from factoryd.ledger.engine import require_label, require_serial, utc_now
from factoryd.ledger.errors import JobNotFoundError
from factoryd.ledger.hot import Tx
from factoryd.ledger.lots import LotBook

# Reasons are free text from the pipeline; a station's abandon reason is cut to this.
ABANDON_REASON_MAX_CHARS = 500


class JobBook(LotBook):
    """The ledger's job records."""

    def start_job(self, lot: str, *, station: str, port: str, hw_serial: str | None = None) -> int:
        """Open a job record for one board on one port (and its serial, if known); return its id."""
        require_label(station, "station")
        require_label(port, "port")
        if hw_serial is not None:
            require_serial(hw_serial)
        with self._hot(write=True) as tx:
            lot_id = self._lot_id(tx, lot)
            inserted = tx.first(
                self._sql.insert_job,
                {
                    "b_lot_id": lot_id,
                    "b_station": station,
                    "b_port": port,
                    "b_hw_serial": hw_serial,
                    "b_at": utc_now(),
                },
            )
            if inserted is None:
                raise LedgerError("the database assigned no job id")
            return inserted.id

    def set_job_serial(self, job_id: int, hw_serial: str) -> None:
        """Record which board (secure-element serial) a job is working on."""
        require_serial(hw_serial)
        with self._hot(write=True) as tx:
            if tx.execute(self._sql.set_job_serial, {"job_id": job_id, "b_hw_serial": hw_serial}) == 0:
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
            self._sql.finish_job, {"job_id": job_id, "b_at": at, "b_outcome": outcome, "b_reason": reason}
        )
        if finished == 1:
            return
        job = tx.first(self._sql.job_locked, {"job_id": job_id})
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        if not retry:
            raise LedgerError(f"job {job_id} already finished ({job.outcome})")

    def finish_job(self, job_id: int, *, outcome: str, reason: str | None) -> None:
        """Close a job with its outcome (e.g. ``ok``, ``failed``, ``aborted``) and reason."""
        require_label(outcome, "outcome", 32)
        with self._hot(write=True) as tx:
            self._finish_job(tx, job_id, outcome=outcome, reason=reason, at=utc_now())

    def abandon_open_jobs(self, station: str, *, reason: str) -> int:
        """Close every job a station left open (it died mid-job); returns how many were closed."""
        require_label(station, "station")
        with self._hot(write=True) as tx:
            return tx.execute(
                self._sql.abandon_jobs,
                {"station": station, "b_at": utc_now(), "b_reason": reason[:ABANDON_REASON_MAX_CHARS]},
            )

    def record_attempt(
        self, job_id: int, *, step: str, outcome: str, reason: str | None, duration_s: float
    ) -> None:
        """Record one attempt of a pipeline step within a job."""
        require_label(step, "step", 64)
        require_label(outcome, "outcome", 32)
        if not duration_s >= 0:
            raise InputError(f"duration_s must be >= 0, got {duration_s}")
        with self._hot(write=True) as tx:
            if tx.first(self._sql.job_locked, {"job_id": job_id}) is None:
                raise JobNotFoundError(f"no job {job_id}")
            tx.execute(
                self._sql.insert_attempt,
                {
                    "b_job_id": job_id,
                    "b_step": step,
                    "b_outcome": outcome,
                    "b_reason": reason,
                    "b_duration_s": duration_s,
                    "b_at": utc_now(),
                },
            )
