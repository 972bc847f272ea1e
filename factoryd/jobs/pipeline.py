"""One provisioning job per board: the pipeline of DESIGN.md, with its three levels of retry.

power on → wait for tty → identify the board (profile) → bind the job to its serial → re-check hook
(profile) → attest the secure element (when the lot requires it) → reserve an ID for the serial →
board steps (profile) → mark provisioned → power off / release to the operator. What is shared
by every board profile lives here (power, enumeration, job retries, the step runner, the in-flight
claim, the ledger binding, recording, telemetry); the board-specific part is the profile's
``BoardSession`` (``jobs/board.py``, ``jobs/profiles.py``).

Retries: the client's request engine resends frames; a step is retried (tenacity) on transient
board errors; a job is power-cycled and restarted on link/hub/timeout errors or when step retries
run out.
Restarting is safe because the ledger binds the ID to the secure-element serial first (rule 1).
Permanent errors (bad CSR, refused firmware, exhausted lot) fail at once with their reason.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from factoryd.errors import (
    BoardResetError,
    BoardStatusError,
    BoardTimeoutError,
    EnumerationTimeoutError,
    FactorydError,
    HubDisconnectedError,
    IdentityMismatchError,
    LedgerError,
    ProtocolViolationError,
    ReadbackMismatchError,
    RefusedBoardError,
    ReservationConflictError,
)
from factoryd.flashing import ExternalFlasher
from factoryd.hub.base import Hub
from factoryd.jobs.board import AttestingSession, BoardSession, ChosenIdSession, RegisteredKeySession
from factoryd.jobs.lots import LotContext
from factoryd.jobs.profiles import board_profile
from factoryd.jobs.steps import Step
from factoryd.ledger import AsyncLedger
from factoryd.ledger.errors import LedgerUnavailableError
from factoryd.ledger.model import DeviceState
from factoryd.pki.attestation import (
    NONCE_BYTES,
    AttestationError,
    AttestationEvidence,
    AttestationResult,
    verify_attestation,
)
from factoryd.pki.issuer import IssuedCertificate
from factoryd.pki.parts import verify_registered_part
from factoryd.protocol.native import Timeouts
from factoryd.telemetry.events import JobEvent, PortState, PortUpdate, TelemetrySink

log = structlog.get_logger(__name__)
T = TypeVar("T")


Outcome = Literal["provisioned", "rechecked", "failed", "refused", "empty", "same_board"]


@dataclass(frozen=True)
class JobResult:
    """How one job on one port ended."""

    port: str
    outcome: Outcome
    hw_serial: str | None = None
    device_id: str | None = None
    reason: str | None = None
    attempts: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class PipelineSettings:
    """Knobs of the pipeline (from config.JobSettings and HubSettings)."""

    station: str
    step_attempts: int = 3
    job_attempts: int = 3
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    enumerate_timeout_s: float = 10.0
    power_cycle_off_s: float = 2.0
    power_on_stagger_s: float = 0.0
    baudrate: int = 115200
    resends: int = 3
    timeouts: Timeouts = field(default_factory=Timeouts)
    flasher: ExternalFlasher | None = None


def retry_in_step(exc: BaseException) -> bool:
    """Errors worth retrying the same step on the same open link."""
    if isinstance(exc, BoardStatusError | BoardResetError | ProtocolViolationError | ReadbackMismatchError):
        return exc.transient
    return False


def restart_job(exc: BaseException) -> bool:
    """Errors worth a power cycle and a fresh start (idempotent through the ledger)."""
    # A ledger outage was already waited out at the safe point (jobs/ledger_hold.py): power-cycling
    # the board cannot bring the database back.
    return isinstance(exc, FactorydError) and exc.transient and not isinstance(exc, LedgerUnavailableError)


@dataclass
class _Run:
    """One run of a port: what it knows across attempts (the job, once the board is identified)."""

    port: str
    lot: LotContext
    skip_serial: str | None
    started: float
    job: _Job | None = None


@dataclass
class _Job:
    """Mutable state of one job across its attempts."""

    port: str
    lot: LotContext
    job_id: int
    hw_serial: str
    attempt: int = 0
    device_id: str | None = None
    # The reserved device's metadata (ID-list columns), for the lot's subject template.
    device_fields: dict[str, str] = field(default_factory=dict)
    step: Step | None = None
    # How the board proved it is a genuine part (the customer's manifest carries it), when it had to.
    genuineness: dict[str, str] | None = None
    # The attestation evidence verified for this attempt (the line's signer checks it again).
    evidence: AttestationEvidence | None = None
    # Seconds spent per step over all attempts (logged at debug level when the job ends).
    step_s: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Runs provisioning jobs on a hub's ports."""

    def __init__(
        self,
        *,
        hub: Hub,
        ledger: AsyncLedger,
        telemetry: TelemetrySink,
        settings: PipelineSettings,
        power_budget: asyncio.Semaphore,
    ) -> None:
        self.hub = hub
        self.ledger = ledger
        self.telemetry = telemetry
        self.settings = settings
        self._budget = power_budget
        # Secure-element serials being provisioned right now, by port: a second board claiming a
        # serial that is in flight is a clone or a liar, never a second holder of the same ID.
        self._in_flight: dict[str, str] = {}
        self._stagger = asyncio.Lock()
        self._last_power_on = float("-inf")
        # Job endings the ledger could not take during an outage (job id -> outcome, reason): written
        # before the next job starts, so no job record stays open once the ledger is back.
        self._unrecorded: dict[int, tuple[Outcome, str]] = {}

    # Public -------------------------------------------------------------------------------

    async def run(self, port: str, lot: LotContext, *, skip_serial: str | None = None) -> JobResult:
        """Provision the board on a port; never raises for board or ledger problems."""
        started = time.monotonic()
        structlog.contextvars.bind_contextvars(port=port, lot=lot.name)
        try:
            return await self._run(port, lot, skip_serial, started)
        finally:
            for serial in [s for s, p in self._in_flight.items() if p == port]:
                del self._in_flight[serial]
            structlog.contextvars.unbind_contextvars("port", "lot", "job_id", "hw_serial", "device_id")

    # Job level ----------------------------------------------------------------------------

    async def _run(self, port: str, lot: LotContext, skip_serial: str | None, started: float) -> JobResult:
        run = _Run(port, lot, skip_serial, started)
        last_error: FactorydError | None = None
        for attempt in range(1, self.settings.job_attempts + 1):
            try:
                async with self._powered(port, lot, run.job):
                    path = await self._enumerate(port)
                    if path is None:
                        return JobResult(port, "empty", duration_s=time.monotonic() - started)
                    return await self._attempt(run, path, attempt)
            except FactorydError as exc:
                last_error = exc
                if not restart_job(exc) or attempt == self.settings.job_attempts:
                    break
                if isinstance(exc, HubDisconnectedError):
                    break  # a power cycle needs the hub: the station pauses intake and retries later
                log.info("job restarts after power cycle", reason=exc.reason, error=str(exc), attempt=attempt)
                job = run.job
                if job is not None:
                    self._event(job, "retry", step=job.step, reason=exc.reason)
                    await self.ledger.record_attempt(
                        job.job_id,
                        step=str(job.step or "job"),
                        outcome="retry",
                        reason=f"{exc.reason}: {exc}"[:500],
                        duration_s=time.monotonic() - started,
                    )
                elif isinstance(exc, BoardTimeoutError):
                    try:
                        if await self._flash_if_configured(port, lot):
                            continue  # the board did not speak the protocol: it does now
                    except FactorydError as flash_error:
                        last_error = flash_error
                        break
                await asyncio.sleep(self.settings.power_cycle_off_s)
        error = last_error or FactorydError("job ended without a result")
        if run.job is None:
            # Nothing identified the board (no tty, no HELLO): the port needs a look, no ID is involved.
            self._port(port, PortState.ATTENTION, lot.name, step=None, reason=error.reason)
            return JobResult(port, "failed", reason=error.reason, duration_s=time.monotonic() - started)
        return await self._fail(run.job, error, started)

    async def _attempt(self, run: _Run, path: str, attempt: int) -> JobResult:
        session = board_profile(run.lot.profile.protocol).session(self.hub, run.port, path, self.settings)
        try:
            async with session:
                return await self._bound_attempt(run, session, attempt)
        finally:
            # Link statistics reach metrics for every profile, whatever ended the attempt.
            stats = session.link_stats()
            if stats is not None:
                self.telemetry.link_stats(stats)

    async def _bound_attempt(self, run: _Run, session: BoardSession, attempt: int) -> JobResult:
        """Identify the board, bind the job to it (once for every profile), then the profile's steps."""
        port, lot, started = run.port, run.lot, run.started
        serial = await self._step(run.job, session.identify_step, session.identify)
        if run.skip_serial is not None and serial == run.skip_serial:
            return JobResult(port, "same_board", hw_serial=run.skip_serial)
        if run.job is None:
            run.job = await self._start_job(port, lot, serial)
        job = run.job
        job.attempt = attempt
        self._claim_serial(job, serial)
        if job.hw_serial != serial:
            raise IdentityMismatchError(
                f"board answered with serial {serial} after starting as {job.hw_serial}"
            )
        self._port(port, PortState.PROVISIONING, lot.name, step=session.identify_step, job=job)
        host = _Host(self, job)

        finished = await session.existing(host)
        if finished is not None:
            job.device_id = finished.device_id
            if finished.issued is None:
                return await self._succeed(job, finished.outcome, started)
            await self._record(job, finished.device_id, finished.issued)
            return await self._succeed(job, "provisioned", started, job_finished=True)

        if lot.profile.attestation == "required":
            await self._attest(job, session, host)

        wanted = self._wanted_device_id(job, session, host)
        try:
            reservation = await self._step(
                job,
                Step.RESERVE,
                lambda: self.ledger.reserve(
                    lot.name, serial, station=self.settings.station, port=port, job_id=job.job_id,
                    actor=self.settings.station, device_id=wanted,
                ),
            )  # fmt: skip
        except ReservationConflictError as exc:
            if wanted is None:
                raise
            # The board's own ID is not on the customer's list, or not free: refused, nothing consumed.
            raise RefusedBoardError(f"this board's device ID {wanted!r} cannot be reserved: {exc}") from exc
        if reservation.state is DeviceState.PROVISIONED:
            raise RefusedBoardError(
                f"the ledger records this board ({serial}) as provisioned with {reservation.device_id}, "
                "but it holds no certificate; void the ID or allow rework before re-provisioning"
            )
        device_id = job.device_id = reservation.device_id
        job.device_fields = reservation.metadata
        structlog.contextvars.bind_contextvars(device_id=device_id)
        issued = await session.provision(host, device_id)
        await self._record(job, device_id, issued)
        return await self._succeed(job, "provisioned", started, job_finished=True)

    def _wanted_device_id(self, job: _Job, session: BoardSession, host: _Host) -> str | None:
        """The exact ID to reserve when the lot derives IDs from the board (None: the next one)."""
        if job.lot.profile.device_id_from != "imei":
            return None
        if not isinstance(session, ChosenIdSession):
            raise RefusedBoardError(
                f"board profile {job.lot.profile.protocol} cannot name its device ID (device_id_from = imei)"
            )
        wanted = session.wanted_device_id(host)
        if wanted is None:
            raise RefusedBoardError("the board named no device ID, and the lot derives them from the board")
        return wanted

    async def _attest(self, job: _Job, session: BoardSession, host: _Host) -> None:
        """Genuine parts only: the board attests its new key (or proves its registered one) before an ID."""
        if job.lot.registered_parts:
            await self._prove_registered(job, session, host)
        else:
            await self._attest_new_key(job, session, host)
        details: dict[str, Any] = {
            **(job.genuineness or {}), "lot": job.lot.name, "port": job.port, "job_id": job.job_id
        }  # fmt: skip
        await self.ledger.audit(
            actor=self.settings.station, action="board.attested", subject=job.hw_serial, details=details
        )

    async def _prove_registered(self, job: _Job, session: BoardSession, host: _Host) -> None:
        if not isinstance(session, RegisteredKeySession):
            raise AttestationError(
                "attestation_missing",
                f"board profile {job.lot.profile.protocol} cannot prove a registered key",
            )
        challenge = secrets.token_bytes(NONCE_BYTES)

        async def prove() -> bytes:
            signature = await session.prove_key(host, challenge)
            part = verify_registered_part(job.lot.registered_parts, job.hw_serial, challenge, signature)
            return part.public_key

        point = await self._step(job, Step.ATTEST, prove)
        session.use_key(point)
        entry = job.lot.registered_parts[job.hw_serial]
        job.genuineness = {"method": "parts_manifest", "parts_entry_id": entry.entry_id}

    async def _attest_new_key(self, job: _Job, session: BoardSession, host: _Host) -> None:
        if not isinstance(session, AttestingSession):
            raise AttestationError(
                "attestation_missing", f"board profile {job.lot.profile.protocol} cannot attest its keys"
            )
        nonce = secrets.token_bytes(NONCE_BYTES)

        async def attest() -> AttestationResult:
            evidence = job.evidence = await session.attest(host, nonce)
            # ~0.3 ms of signature checks: on the loop (`factoryd bench attestation` measures it).
            return verify_attestation(
                evidence, nonce=nonce, serial=job.hw_serial, roots=job.lot.attestation_roots
            )

        result = await self._step(job, Step.ATTEST, attest)
        session.attested(result)
        job.genuineness = result.details()

    @asynccontextmanager
    async def _powered(self, port: str, lot: LotContext, job: _Job | None) -> AsyncIterator[None]:
        async with self._budget:
            self._port(port, PortState.POWERING, lot.name, step=Step.POWER, job=job)
            async with self._stagger:
                loop = asyncio.get_running_loop()
                wait_s = self._last_power_on + self.settings.power_on_stagger_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                self._last_power_on = loop.time()
            await self.hub.power_on(port)
            finished = False
            try:
                yield
                finished = True
            finally:
                try:
                    await self.hub.power_off(port)
                except HubDisconnectedError:
                    if not finished:
                        raise  # the hub going away is why the job stopped
                    # The job ended (and was recorded) before the hub went: its result stands.
                    log.warning("hub gone after the job ended; its result stands", port=port)

    async def _flash_if_configured(self, port: str, lot: LotContext) -> bool:
        """Flash the lot's signed firmware with the external tool; False when none is configured."""
        flasher, firmware = self.settings.flasher, lot.firmware
        if flasher is None or firmware is None:
            return False
        async with self._powered(port, lot, None):
            path = await self._enumerate(port)
            if path is None:
                return False
            self._port(port, PortState.PROVISIONING, lot.name, step=Step.FIRMWARE)
            await flasher.flash(path, firmware, lot.profile.firmware_sha256)
        return True

    async def _enumerate(self, port: str) -> str | None:
        try:
            return await self.hub.wait_for_tty(port, self.settings.enumerate_timeout_s)
        except EnumerationTimeoutError:
            return None

    async def _start_job(self, port: str, lot: LotContext, hw_serial: str) -> _Job:
        await self._record_unrecorded()
        # The board has answered already: its serial goes into the job record in the same transaction.
        job_id = await self.ledger.start_job(
            lot.name, station=self.settings.station, port=port, hw_serial=hw_serial
        )
        structlog.contextvars.bind_contextvars(job_id=job_id)
        job = _Job(port, lot, job_id, hw_serial=hw_serial)
        structlog.contextvars.bind_contextvars(hw_serial=hw_serial)
        self._event(job, "job_started")
        return job

    async def _fail(self, job: _Job, error: FactorydError, started: float) -> JobResult:
        reason = error.reason
        refused = isinstance(error, RefusedBoardError)
        outcome: Outcome = "refused" if refused else "failed"
        log.warning("job failed", reason=reason, error=str(error), step=job.step, attempt=job.attempt)
        # After an outage outlasted the hold, the failure is recorded once the ledger is back.
        ledger = self.ledger.direct if isinstance(error, LedgerUnavailableError) else self.ledger
        try:
            await ledger.record_attempt(
                job.job_id,
                step=str(job.step or "job"),
                outcome="error",
                reason=f"{reason}: {error}"[:500],
                duration_s=time.monotonic() - started,
            )
            if refused:
                # Refusals are first-class: who was refused where and why, whether an ID was involved.
                await ledger.audit(
                    actor=self.settings.station,
                    action="board.refused",
                    subject=job.hw_serial,
                    details={
                        "hw_serial": job.hw_serial, "port": job.port, "reason": reason,
                        "message": str(error)[:300], "job_id": job.job_id, "device_id": job.device_id,
                    },
                )  # fmt: skip
            await ledger.finish_job(job.job_id, outcome=outcome, reason=reason)
        except LedgerUnavailableError as exc:
            log.warning("job failure recorded once the ledger is back", job_id=job.job_id, error=str(exc))
            self._unrecorded[job.job_id] = (outcome, reason)
        except LedgerError as exc:
            log.exception("could not record job failure", error=str(exc))
        duration = time.monotonic() - started
        self._event(job, "job_failed", outcome=outcome, reason=reason, duration_s=duration)
        self._port(job.port, PortState.ATTENTION, job.lot.name, step=job.step, job=job, reason=str(error))
        return JobResult(job.port, outcome, job.hw_serial, job.device_id, reason, job.attempt, duration)

    async def _record_unrecorded(self) -> None:
        """Close the jobs whose failure an outage kept out of the ledger (a retry closes them once)."""
        for job_id in list(self._unrecorded):
            # Taken before the await: another port starting a job at the same time skips this one.
            entry = self._unrecorded.pop(job_id, None)
            if entry is None:
                continue
            outcome, reason = entry
            try:
                await self.ledger.finish_job(job_id, outcome=outcome, reason=reason)
            except LedgerUnavailableError:
                self._unrecorded.setdefault(job_id, entry)
                raise
            except LedgerError as exc:  # closed meanwhile (e.g. the first try reached the ledger after all)
                log.info("unrecorded job failure dropped", job_id=job_id, error=str(exc))

    def _claim_serial(self, job: _Job, serial: str) -> None:
        holder = self._in_flight.get(serial)
        if holder is not None and holder != job.port:
            raise IdentityMismatchError(
                f"board serial {serial} is already being provisioned on port {holder}: "
                "a cloned or lying board"
            )
        self._in_flight[serial] = job.port

    async def _succeed(
        self, job: _Job, outcome: Outcome, started: float, *, job_finished: bool = False
    ) -> JobResult:
        duration = time.monotonic() - started
        if not job_finished:  # _record closes the job in the transaction that records the board
            await self.ledger.finish_job(job.job_id, outcome=outcome, reason=None)
        self._event(job, "job_finished", outcome=outcome, duration_s=duration)
        self._port(job.port, PortState.DONE, job.lot.name, step=None, job=job)
        log.info("job finished", outcome=outcome, duration_s=round(duration, 3), attempt=job.attempt)
        log.debug("job step timings", steps={k: round(v, 4) for k, v in job.step_s.items()})
        return JobResult(job.port, outcome, job.hw_serial, job.device_id, None, job.attempt, duration)

    async def _record(self, job: _Job, device_id: str, issued: IssuedCertificate) -> None:
        await self._step(
            job,
            Step.RECORD,
            lambda: self.ledger.mark_provisioned(
                job.lot.name,
                device_id,
                job.hw_serial,
                cert_der=issued.der,
                cert_serial=issued.serial_hex,
                fingerprint_sha256=issued.fingerprint_sha256,
                station=self.settings.station,
                port=job.port,
                actor=self.settings.station,
                finish_job=job.job_id,
            ),
        )

    async def _audit_issued(self, job: _Job, device_id: str, issued: IssuedCertificate) -> None:
        # Every certificate that ever leaves the station is in the audit trail, before it is written.
        await self.ledger.audit(
            actor=self.settings.station,
            action="cert.issued",
            subject=device_id,
            details={
                "hw_serial": job.hw_serial,
                "cert_serial": issued.serial_hex,
                "fingerprint_sha256": issued.fingerprint_sha256,
                "job_id": job.job_id,
                # Evidence of genuineness for the manifest (pki/attestation.py), when the lot asked.
                **({"genuineness": job.genuineness} if job.genuineness is not None else {}),
            },
        )

    # Steps and telemetry ------------------------------------------------------------------

    async def _step(self, job: _Job | None, step: Step, action: Callable[[], Awaitable[T]]) -> T:
        if job is not None:
            job.step = step
            self._port(job.port, PortState.PROVISIONING, job.lot.name, step=step, job=job)
        started = time.monotonic()
        outcome = "error"
        try:
            try:
                # Most steps succeed at once: the retry machinery is only built when one does not.
                result = await action()
            except FactorydError as exc:
                if not retry_in_step(exc) or self.settings.step_attempts <= 1:
                    raise
                self._step_retry(job, step, exc)
                await asyncio.sleep(self.settings.backoff_initial_s)
                retrying = AsyncRetrying(
                    stop=stop_after_attempt(self.settings.step_attempts - 1),
                    wait=wait_exponential(
                        multiplier=self.settings.backoff_initial_s * 2, max=self.settings.backoff_max_s
                    ),
                    retry=retry_if_exception(retry_in_step),
                    before_sleep=lambda state: self._step_retry(
                        job, step, state.outcome.exception() if state.outcome else None
                    ),
                    reraise=True,
                )
                async for attempt in retrying:
                    with attempt:
                        result = await action()
            outcome = "ok"
            return result
        finally:
            duration = time.monotonic() - started
            if job is not None:
                job.step_s[str(step)] = job.step_s.get(str(step), 0.0) + duration
                self._event(job, "step", step=step, outcome=outcome, duration_s=duration)

    def _step_retry(self, job: _Job | None, step: Step, exc: BaseException | None) -> None:
        reason = exc.reason if isinstance(exc, FactorydError) else "unknown"
        log.info("step retry", step=step, reason=reason, error=str(exc))
        if job is not None:
            self._event(job, "retry", step=step, reason=reason)

    def _event(
        self,
        job: _Job,
        kind: Literal["job_started", "step", "job_finished", "job_failed", "retry"],
        *,
        step: Step | None = None,
        outcome: str | None = None,
        reason: str | None = None,
        duration_s: float | None = None,
    ) -> None:
        self.telemetry.job_event(
            JobEvent(
                kind=kind,
                port=job.port,
                lot=job.lot.name,
                job_id=job.job_id,
                step=str(step) if step else None,
                outcome=outcome,
                reason=reason,
                device_id=job.device_id,
                attempt=job.attempt,
                duration_s=duration_s,
                at=datetime.now(UTC),
            )
        )

    def _port(
        self,
        port: str,
        state: PortState,
        lot: str | None,
        *,
        step: Step | None,
        job: _Job | None = None,
        reason: str | None = None,
    ) -> None:
        self.telemetry.port_update(
            PortUpdate(
                port=port,
                state=state,
                step=str(step) if step else None,
                lot=lot,
                device_id=job.device_id if job else None,
                attempt=job.attempt if job else 0,
                since=datetime.now(UTC),
                reason=reason,
            )
        )


@dataclass
class _Host:
    """The pipeline's side of one bound job, handed to the profile's session (``jobs.board.JobHost``)."""

    pipeline: Pipeline
    job: _Job

    @property
    def hw_serial(self) -> str:
        """The serial the job is bound to."""
        return self.job.hw_serial

    @property
    def lot(self) -> LotContext:
        """The lot being provisioned."""
        return self.job.lot

    @property
    def port(self) -> str:
        """The hub port."""
        return self.job.port

    @property
    def job_id(self) -> int:
        """The ledger's job id."""
        return self.job.job_id

    @property
    def ledger(self) -> AsyncLedger:
        """The ledger."""
        return self.pipeline.ledger

    @property
    def device_fields(self) -> Mapping[str, str]:
        """The reserved device's metadata (empty until an ID is reserved)."""
        return self.job.device_fields

    async def step(self, step: Step, action: Callable[[], Awaitable[T]]) -> T:
        """Run one step of the job (retries, telemetry)."""
        return await self.pipeline._step(self.job, step, action)

    async def audit(self, action: str, subject: str, details: dict[str, Any]) -> None:
        """Append an audit entry in the station's name."""
        station = self.pipeline.settings.station
        await self.pipeline.ledger.audit(actor=station, action=action, subject=subject, details=details)

    async def audit_issued(self, device_id: str, issued: IssuedCertificate) -> None:
        """Audit a certificate before it is written to the board."""
        await self.pipeline._audit_issued(self.job, device_id, issued)

    @property
    def attestation_evidence(self) -> AttestationEvidence | None:
        """The evidence verified for this attempt (None unless the board attested a new key)."""
        return self.job.evidence

    def hold(self, reason: str) -> None:
        """The job waits at a safe point (nothing written, reservation kept): the port says why."""
        job, pipeline = self.job, self.pipeline
        pipeline._event(job, "retry", step=job.step, reason="signer_unavailable")
        pipeline._port(job.port, PortState.PROVISIONING, job.lot.name, step=job.step, job=job, reason=reason)
