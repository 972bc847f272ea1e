"""One provisioning job per board: the pipeline of DESIGN.md, with its three levels of retry.

power on → wait for tty → HELLO → (flash signed firmware) → reserve ID for the SE serial →
GENKEY → GET_CSR → verify CSR → issue → WRITE + READ back → SIGN challenge → (LOCK) →
mark provisioned → power off / release to the operator.

Retries: the BoardClient resends frames; a step is retried (tenacity) on transient board errors;
a job is power-cycled and restarted on link/hub/timeout errors or when step retries run out.
Restarting is safe because the ledger binds the ID to the secure-element serial first (rule 1).
Permanent errors (bad CSR, refused firmware, exhausted lot) fail at once with their reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from factoryd.errors import (
    BoardResetError,
    BoardStatusError,
    BoardTimeoutError,
    CsrRejectedError,
    EnumerationTimeoutError,
    FactorydError,
    FirmwareRejectedError,
    IdentityMismatchError,
    LedgerError,
    ProtocolViolationError,
    ReadbackMismatchError,
    RefusedBoardError,
    VerificationError,
)
from factoryd.flashing import ExternalFlasher
from factoryd.hub.base import Hub
from factoryd.jobs.arduino import provision_arduino
from factoryd.jobs.lots import LotContext
from factoryd.jobs.steps import Step
from factoryd.ledger import AsyncLedger
from factoryd.ledger.model import DeviceRecord, DeviceState
from factoryd.pki.challenge import verify_challenge
from factoryd.pki.issuer import IssuedCertificate
from factoryd.pki.signer import SoftwareSigner
from factoryd.protocol.arduino import ArduinoClient
from factoryd.protocol.client import BoardClient, Timeouts
from factoryd.protocol.messages import BoardInfo, ObjectId
from factoryd.telemetry.events import JobEvent, PortState, PortUpdate, TelemetrySink

log = structlog.get_logger(__name__)
T = TypeVar("T")
CHALLENGE_BYTES = 32


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
    return isinstance(exc, FactorydError) and exc.transient


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
    attempt: int = 0
    hw_serial: str | None = None
    device_id: str | None = None
    step: Step | None = None
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
        on_link: Callable[[str, BoardClient], None] | None = None,
    ) -> None:
        self.hub = hub
        self.ledger = ledger
        self.telemetry = telemetry
        self.settings = settings
        self._budget = power_budget
        self._on_link = on_link
        # Secure-element serials being provisioned right now, by port: a second board claiming a
        # serial that is in flight is a clone or a liar, never a second holder of the same ID.
        self._in_flight: dict[str, str] = {}
        self._stagger = asyncio.Lock()
        self._last_power_on = float("-inf")

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
                    if lot.profile.protocol == "arduino-v1":
                        return await self._arduino_attempt(run, path, attempt)
                    return await self._native_attempt(run, path, attempt)
            except FactorydError as exc:
                last_error = exc
                if not restart_job(exc) or attempt == self.settings.job_attempts:
                    break
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

    async def _native_attempt(self, run: _Run, path: str, attempt: int) -> JobResult:
        port, lot, skip_serial, started = run.port, run.lot, run.skip_serial, run.started
        async with await BoardClient.open(
            path,
            baudrate=self.settings.baudrate,
            timeouts=self.settings.timeouts,
            resends=self.settings.resends,
        ) as client:
            try:
                info = await self._step(run.job, Step.HELLO, client.hello)
                if skip_serial is not None and info.serial_hex == skip_serial:
                    return JobResult(port, "same_board", hw_serial=skip_serial)
                if run.job is None:
                    run.job = await self._start_job(port, lot, info.serial_hex)
                run.job.attempt = attempt
                return await self._provision(run.job, client, info, started)
            finally:
                if self._on_link is not None:
                    self._on_link(port, client)

    async def _arduino_attempt(self, run: _Run, path: str, attempt: int) -> JobResult:
        """Arduino's provisioning sketch: identity from the USB serial, then CSR, issue, store, rebuild."""
        port, lot, skip_serial, started = run.port, run.lot, run.skip_serial, run.started
        usb_serial = await self.hub.device_serial(port, path)
        if not usb_serial or set(usb_serial) <= {"0"}:
            raise RefusedBoardError(
                f"board on port {port} reports no USB serial number: without one its ID cannot be bound "
                "to it exactly once (the sketch cannot report its secure-element serial)"
            )
        serial = f"usb:{usb_serial.lower()}"
        if skip_serial is not None and serial == skip_serial:
            return JobResult(port, "same_board", hw_serial=skip_serial)
        if run.job is None:
            run.job = await self._start_job(port, lot, serial)
        job = run.job
        job.attempt = attempt
        self._claim_serial(job, serial)
        if job.hw_serial is None:
            job.hw_serial = serial
            structlog.contextvars.bind_contextvars(hw_serial=serial)
            await self.ledger.set_job_serial(job.job_id, serial)
        existing = await self.ledger.find_by_serial(lot.name, serial)
        if existing is not None and existing.state is DeviceState.PROVISIONED:
            raise RefusedBoardError(
                f"board {serial} is already provisioned with {existing.device_id}; the sketch cannot prove "
                "its key by challenge, so re-checking is impossible: rework is an operator decision"
            )
        self._port(port, PortState.PROVISIONING, lot.name, step=Step.RESERVE, job=job)
        reservation = await self._step(
            job,
            Step.RESERVE,
            lambda: self.ledger.reserve(
                lot.name, serial, station=self.settings.station, port=port, job_id=job.job_id,
                actor=self.settings.station,
            ),
        )  # fmt: skip
        device_id = job.device_id = reservation.device_id
        structlog.contextvars.bind_contextvars(device_id=device_id)

        async def step(name: str, action: Callable[[], Awaitable[T]]) -> T:
            return await self._step(job, Step(name), action)

        async def audit_issued(issued: IssuedCertificate) -> None:
            await self._audit_issued(job, device_id, issued)

        async with await ArduinoClient.open(path, resends=self.settings.resends) as client:
            issued = await provision_arduino(
                client, device_id=device_id, issuer=lot.issuer, step=step, on_issued=audit_issued
            )
        await self._record(job, device_id, issued)
        return await self._succeed(job, "provisioned", started, job_finished=True)

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
            try:
                yield
            finally:
                await self.hub.power_off(port)

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

    async def _start_job(self, port: str, lot: LotContext, hw_serial: str | None = None) -> _Job:
        # The board has answered already: its serial goes into the job record in the same transaction.
        job_id = await self.ledger.start_job(
            lot.name, station=self.settings.station, port=port, hw_serial=hw_serial
        )
        structlog.contextvars.bind_contextvars(job_id=job_id)
        job = _Job(port, lot, job_id, hw_serial=hw_serial)
        if hw_serial is not None:
            structlog.contextvars.bind_contextvars(hw_serial=hw_serial)
        self._event(job, "job_started")
        return job

    async def _fail(self, job: _Job, error: FactorydError, started: float) -> JobResult:
        reason = error.reason
        refused = isinstance(error, RefusedBoardError)
        outcome: Outcome = "refused" if refused else "failed"
        log.warning("job failed", reason=reason, error=str(error), step=job.step, attempt=job.attempt)
        try:
            await self.ledger.record_attempt(
                job.job_id,
                step=str(job.step or "job"),
                outcome="error",
                reason=f"{reason}: {error}"[:500],
                duration_s=time.monotonic() - started,
            )
            await self.ledger.finish_job(job.job_id, outcome=outcome, reason=reason)
        except LedgerError as exc:
            log.exception("could not record job failure", error=str(exc))
        duration = time.monotonic() - started
        self._event(job, "job_failed", outcome=outcome, reason=reason, duration_s=duration)
        self._port(job.port, PortState.ATTENTION, job.lot.name, step=job.step, job=job, reason=str(error))
        return JobResult(job.port, outcome, job.hw_serial, job.device_id, reason, job.attempt, duration)

    # Board level --------------------------------------------------------------------------

    async def _provision(self, job: _Job, client: BoardClient, info: BoardInfo, started: float) -> JobResult:
        lot = job.lot
        serial = info.serial_hex
        self._claim_serial(job, serial)
        if job.hw_serial is None:
            job.hw_serial = serial
            structlog.contextvars.bind_contextvars(hw_serial=serial)
            await self.ledger.set_job_serial(job.job_id, serial)
        elif job.hw_serial != serial:
            raise IdentityMismatchError(
                f"board answered with secure-element serial {serial} after starting as {job.hw_serial}"
            )
        self._port(job.port, PortState.PROVISIONING, lot.name, step=Step.HELLO, job=job)

        info = await self._ensure_firmware(job, client, info)
        if info.locked or info.objects & {ObjectId.DEVICE_ID, ObjectId.DEVICE_CERT}:
            recheck = await self._recheck(job, client, info, started)
            if recheck is not None:
                return recheck

        reservation = await self._step(
            job,
            Step.RESERVE,
            lambda: self.ledger.reserve(
                lot.name,
                serial,
                station=self.settings.station,
                port=job.port,
                job_id=job.job_id,
                actor=self.settings.station,
            ),
        )
        if reservation.state is DeviceState.PROVISIONED:
            raise RefusedBoardError(
                f"the ledger records this board ({serial}) as provisioned with {reservation.device_id}, "
                "but it holds no certificate; void the ID or allow rework before re-provisioning"
            )
        device_id = job.device_id = reservation.device_id
        structlog.contextvars.bind_contextvars(device_id=device_id)

        point = await self._step(job, Step.KEYGEN, client.genkey)
        csr_der = await self._step(job, Step.CSR, lambda: client.get_csr(device_id))
        issued = await self._step(job, Step.ISSUE, lambda: self._issue(job, csr_der, point))

        for obj, data in self._objects(lot, device_id, issued.der):
            await self._step(job, Step.WRITE, lambda o=obj, d=data: self._write_verified(client, o, d))  # type: ignore[misc]

        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        signature = await self._step(job, Step.CHALLENGE, lambda: client.sign(challenge))
        verify_challenge(issued.cert, challenge, signature)

        if lot.profile.lock:
            await self._step(job, Step.LOCK, client.lock)
            if not (await client.hello()).locked:
                raise VerificationError("board acknowledged LOCK but reports itself unlocked")

        await self._record(job, device_id, issued)
        return await self._succeed(job, "provisioned", started, job_finished=True)

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

    async def _ensure_firmware(self, job: _Job, client: BoardClient, info: BoardInfo) -> BoardInfo:
        lot = job.lot
        wanted = lot.profile.firmware_sha256
        if wanted is None or info.fw_sha256.hex() == wanted:
            return info
        firmware = lot.firmware
        if firmware is None or firmware.sha256.hex() != wanted:
            raise FirmwareRejectedError(
                f"lot {lot.name} asks for firmware {wanted[:12]}… but the station has no signed image for it",
                0,
            )
        await self._step(
            job,
            Step.FIRMWARE,
            lambda: client.update_firmware(firmware.image, firmware.version, firmware.signature),
        )
        info = await client.hello()
        if info.fw_sha256.hex() != wanted:
            raise FirmwareRejectedError(f"board runs {info.fw_sha256.hex()[:12]}… after the update", 0)
        return info

    async def _recheck(
        self, job: _Job, client: BoardClient, info: BoardInfo, started: float
    ) -> JobResult | None:
        """A board that already holds an identity: re-check it, resume it, rework it, or refuse it."""
        lot = job.lot
        serial = info.serial_hex
        reserved = await self.ledger.find_by_serial(lot.name, serial)
        if reserved is not None and reserved.state is DeviceState.RESERVED:
            if not info.locked:
                return None  # an interrupted job on this very board: resume with its reservation
            # Interrupted between LOCK and the ledger record: the board can no longer be written, so
            # finish the job from what it holds, after proving it is exactly what we issued.
            return await self._complete_locked(job, client, reserved.device_id, started)
        raw_id = await client.read(ObjectId.DEVICE_ID)
        stored_id = raw_id.decode("utf-8", errors="replace").rstrip("\x00")
        record: DeviceRecord | None = await self.ledger.find_device(stored_id) if stored_id else None
        ours = record is not None and record.lot == lot.name and record.hw_serial == serial
        if ours and record is not None and record.state is DeviceState.PROVISIONED:
            cert_der = await client.read(ObjectId.DEVICE_CERT)
            if hashlib.sha256(cert_der).hexdigest() != record.fingerprint_sha256:
                raise ReadbackMismatchError(
                    f"{stored_id}: certificate on the board differs from the ledger's"
                )
            challenge = secrets.token_bytes(CHALLENGE_BYTES)
            signature = await self._step(job, Step.RECHECK, lambda: client.sign(challenge))
            verify_challenge(x509.load_der_x509_certificate(cert_der), challenge, signature)
            job.device_id = stored_id
            await self.ledger.audit(
                actor=self.settings.station,
                action="device.rechecked",
                subject=stored_id,
                details={"hw_serial": serial, "port": job.port, "job_id": job.job_id},
            )
            return await self._succeed(job, "rechecked", started)
        if lot.profile.allow_rework and not info.locked:
            await self.ledger.audit(
                actor=self.settings.station,
                action="device.rework",
                subject=stored_id or serial,
                details={
                    "hw_serial": serial,
                    "port": job.port,
                    "previous_lot": record.lot if record else None,
                },
            )
            return None
        where = f"ID {stored_id!r}" if stored_id else "a certificate"
        state = "locked, " if info.locked else ""
        raise RefusedBoardError(
            f"board {serial} is {state}already provisioned with {where}; lot does not allow rework"
        )

    async def _complete_locked(
        self, job: _Job, client: BoardClient, device_id: str, started: float
    ) -> JobResult:
        cert_der = await client.read(ObjectId.DEVICE_CERT)
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            cert.verify_directly_issued_by(job.lot.issuer.chain[0])
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise VerificationError(f"{device_id}: certificate on the locked board is not ours") from exc
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not names or names[0].value != device_id:
            raise VerificationError(f"{device_id}: certificate on the locked board names another ID")
        for obj, data in self._objects(job.lot, device_id, cert_der):
            if await client.read(obj) != data:
                raise ReadbackMismatchError(f"{device_id}: {obj.name} on the locked board differs")
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        signature = await self._step(job, Step.CHALLENGE, lambda: client.sign(challenge))
        verify_challenge(cert, challenge, signature)
        issued = IssuedCertificate.from_certificate(cert)
        job.device_id = device_id
        await self._record(job, device_id, issued)
        return await self._succeed(job, "provisioned", started, job_finished=True)

    async def _record(self, job: _Job, device_id: str, issued: IssuedCertificate) -> None:
        serial = job.hw_serial or ""
        await self._step(
            job,
            Step.RECORD,
            lambda: self.ledger.mark_provisioned(
                job.lot.name,
                device_id,
                serial,
                cert_der=issued.der,
                cert_serial=issued.serial_hex,
                fingerprint_sha256=issued.fingerprint_sha256,
                station=self.settings.station,
                port=job.port,
                actor=self.settings.station,
                finish_job=job.job_id,
            ),
        )

    async def _issue(self, job: _Job, csr_der: bytes, point: bytes) -> IssuedCertificate:
        issuer = job.lot.issuer
        device_id = job.device_id or ""
        csr = issuer.verify_csr(csr_der, device_id)
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or (
            public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) != point
        ):
            raise CsrRejectedError("CSR key is not the key the secure element just generated (replayed CSR?)")
        if isinstance(issuer.signer, SoftwareSigner):
            issued = issuer.issue(csr, device_id)  # well under a millisecond: not worth a thread hop
        else:
            # A token (PKCS#11) signs in ms to 100s of ms: never on the event loop.
            issued = await asyncio.to_thread(issuer.issue, csr, device_id)
        await self._audit_issued(job, device_id, issued)
        return issued

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
            },
        )

    @staticmethod
    def _objects(lot: LotContext, device_id: str, cert_der: bytes) -> list[tuple[ObjectId, bytes]]:
        endpoint = json.dumps({"endpoint": lot.profile.endpoint, "device_id": device_id}, sort_keys=True)
        return [
            (ObjectId.DEVICE_ID, device_id.encode()),
            (ObjectId.DEVICE_CERT, cert_der),
            (ObjectId.CA_CHAIN, lot.chain_pem),
            (ObjectId.ENDPOINT, endpoint.encode()),
        ]

    @staticmethod
    async def _write_verified(client: BoardClient, obj: ObjectId, data: bytes) -> None:
        await client.write(obj, data)
        if await client.read(obj) != data:
            raise ReadbackMismatchError(f"{obj.name} read back from the board differs from what was written")

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
