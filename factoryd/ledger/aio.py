"""Async facade of the ledger: every call runs on one private worker thread.

The event loop never blocks on the database. A call that is cancelled while it
runs still completes (and commits) on the worker; that is safe because every
ledger operation is idempotent for the same board (reservations are keyed by
the secure-element serial). On SQLite the per-board writes that are queued for the
worker together share one COMMIT and are settled only after it (``_GroupCommits``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from types import TracebackType
from typing import ParamSpec, Self, TypeVar, cast

import structlog

from factoryd.errors import LedgerError
from factoryd.ledger.certificates import IssuedCertificateEntry, RevokedCertificate
from factoryd.ledger.core import Ledger
from factoryd.ledger.errors import LedgerUnavailableError
from factoryd.ledger.idlist import DEFAULT_MAX_BYTES
from factoryd.ledger.labels import LabelJob, LabelKind, LabelOutcome, LabelState, LabelTemplateInfo
from factoryd.ledger.matter import OnboardingRecord
from factoryd.ledger.model import DeviceRecord, LotInfo, LotProgress, LotState, ProvisionedDevice, Reservation
from factoryd.ledger.profile import LotProfile
from factoryd.ledger.registrations import CloudRegistration, RegistrationStep
from factoryd.limits import helper_thread_started
from factoryd.matter.payload import OnboardingCodes

log = structlog.get_logger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")
_THREAD_NAME = "factoryd-ledger"
# Told a call found the ledger unavailable (and how long that call has waited so far, in seconds):
# True retries the call, False lets the error through. Retrying is safe because such a call changed
# nothing: its transaction failed before COMMIT, or its COMMIT was read back as aborted (engine.py);
# a COMMIT whose outcome stayed unknown is LedgerCommitUnknownError, which is never retried here. The
# exception: PostgreSQL's one-statement reservation and provision, whose outcome may be unknown when
# they report the outage; both are idempotent (the retry resumes the serial's ID, or finds the
# provision recorded), so the retry is what reads it back.
UnavailableHandler = Callable[[LedgerUnavailableError, float], Awaitable[bool]]
# Told of a group commit that landed: how many writes it held, and the seconds its transaction took.
GroupObserver = Callable[[int, float], None]


def _new_executor() -> ThreadPoolExecutor:
    # A helper thread of the loop: with the daemon on one CPU it yields to the loop (factoryd/limits.py).
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=_THREAD_NAME, initializer=helper_thread_started
    )


class _GroupCommits:
    """Per-board writes queued for the worker together share one SQLite COMMIT (``Ledger._group_commit``).

    The first write queued schedules a drain on the worker; writes queued until it starts join it.
    The drain runs them in order, each in its own savepoint, commits once, and only then settles
    their futures (in one hand-over to the loop): no caller acts on a write before it is durable. A
    write that fails alone gets its own error and the others stand; a failed COMMIT fails them all,
    none having happened, so the outage handler's retry is as safe as ever. On a quiet line a drain
    holds one write: exactly the transaction it had before. PostgreSQL never groups (its hot writes
    are one autocommit statement each).
    """

    def __init__(self, ledger: Ledger, executor: ThreadPoolExecutor) -> None:
        self._ledger = ledger
        self._executor = executor
        self._lock = threading.Lock()
        self._queued: list[tuple[Callable[[], object], asyncio.Future[object]]] = []
        self._drain_scheduled = False
        # Told of every group that committed (its writes, its seconds), on the worker thread.
        self.observer: GroupObserver | None = None

    def submit(self, call: Callable[[], _T]) -> asyncio.Future[_T]:
        """Queue ``call`` for the next drain; its future is settled after that drain's COMMIT."""
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queued.append((call, cast("asyncio.Future[object]", future)))
            if self._drain_scheduled:
                return future
            self._drain_scheduled = True
        self._executor.submit(self._drain)
        return future

    def _drain(self) -> None:
        with self._lock:
            batch, self._queued = self._queued, []
            self._drain_scheduled = False
        outcomes: list[tuple[asyncio.Future[object], object, BaseException | None]] = []
        started = time.monotonic()
        try:
            with self._ledger._group_commit():
                for call, future in batch:
                    try:
                        outcomes.append((future, call(), None))
                    except BaseException as exc:  # handed to its caller, as an executor hands it
                        outcomes.append((future, None, exc))
        except BaseException as exc:
            # The COMMIT (or the BEGIN) failed: none of them happened.
            own = {id(future): error for future, _, error in outcomes if error is not None}
            outcomes = [(future, None, own.get(id(future), exc)) for _, future in batch]
        else:
            committed = sum(1 for _, _, error in outcomes if error is None)
            if committed and self.observer is not None:
                try:
                    self.observer(committed, time.monotonic() - started)
                except Exception:  # an observer's failure never keeps the writes' callers waiting
                    log.exception("group commit observer failed", writes=committed)
        if outcomes:
            with suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                outcomes[0][0].get_loop().call_soon_threadsafe(_settle, outcomes)


def _settle(outcomes: list[tuple[asyncio.Future[object], object, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue  # cancelled while it ran: it ran and committed all the same (module docstring)
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def observe_group_commits(ledger: AsyncLedger, observer: GroupObserver) -> None:
    """Have ``observer(writes, seconds)`` told of every group commit (SQLite; nothing on PostgreSQL).

    It is called on the ledger's worker thread and must return at once and never raise.
    (A function, not a method: AsyncLedger offers exactly Ledger's methods.)
    """
    if ledger._groups is not None:
        ledger._groups.observer = observer


def held_ledger(ledger: AsyncLedger, handler: UnavailableHandler) -> AsyncLedger:
    """A view on the same ledger and worker whose calls wait out outages through ``handler``.

    (A function, not a method: AsyncLedger offers exactly Ledger's methods.)
    """
    view = AsyncLedger(ledger.sync, ledger._executor)
    view._groups = ledger._groups
    view._on_unavailable = handler
    view._direct = ledger.direct
    return view


class AsyncLedger:
    """The :class:`Ledger` API with ``async def`` methods, run on a dedicated worker thread."""

    def __init__(self, ledger: Ledger, executor: ThreadPoolExecutor) -> None:
        """Wrap an open ledger and the executor that owns it; use :meth:`open` instead."""
        self._ledger = ledger
        self._executor = executor
        self._closed = False
        self._on_unavailable: UnavailableHandler | None = None
        self._direct = self
        self._groups = _GroupCommits(ledger, executor) if ledger.backend == "sqlite" else None

    @property
    def direct(self) -> AsyncLedger:
        """This ledger without an outage handler (calls fail at once while the database is unavailable)."""
        return self._direct

    @classmethod
    def open(cls, url: str, *, onboarding_secret: bytes | None = None) -> _Opening:
        """Open and migrate the ledger; ``await`` it or use it as ``async with``."""
        return _Opening(url, onboarding_secret)

    @property
    def sync(self) -> Ledger:
        """The underlying sync ledger (for code that already runs off the event loop)."""
        return self._ledger

    async def _run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._call(functools.partial(fn, *args, **kwargs), grouped=False)

    async def _run_grouped(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """A per-board hot-path write: it may share a COMMIT with the writes queued beside it (SQLite)."""
        return await self._call(functools.partial(fn, *args, **kwargs), grouped=True)

    async def _call(self, fn: Callable[[], _T], *, grouped: bool) -> _T:
        if self._closed or self._direct._closed:  # a held view is closed with the ledger it shows
            raise LedgerError("the ledger is closed")
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # keeps structlog's bound job context in the worker
        call = functools.partial(context.run, fn)
        groups = self._groups if grouped else None
        failed_at: float | None = None
        while True:
            try:
                if groups is not None:
                    return await groups.submit(call)
                return await loop.run_in_executor(self._executor, call)
            except LedgerUnavailableError as exc:
                handler = self._on_unavailable
                if handler is None or self._direct._closed:
                    raise
                failed_at = time.monotonic() if failed_at is None else failed_at
                if not await handler(exc, time.monotonic() - failed_at):
                    raise

    async def close(self) -> None:
        """Close the ledger and stop its worker thread."""
        if self._closed:
            return
        await self._run(self._ledger.close)
        self._closed = True
        # Every queued call ran before close (one FIFO worker), so this returns at once.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def create_lot(
        self, name: str, *, customer: str, profile: LotProfile, target_quantity: int | None, actor: str
    ) -> LotInfo:
        """See :meth:`Ledger.create_lot`."""
        return await self._run(
            self._ledger.create_lot,
            name,
            customer=customer,
            profile=profile,
            target_quantity=target_quantity,
            actor=actor,
        )

    async def set_lot_state(self, lot: str, state: LotState, *, actor: str) -> LotInfo:
        """See :meth:`Ledger.set_lot_state`."""
        return await self._run(self._ledger.set_lot_state, lot, state, actor=actor)

    async def record_lot_firmware(
        self,
        lot: str,
        *,
        sha256: str,
        version: str,
        security_counter: int | None,
        key_hash: str,
        actor: str,
        replace_signing_key: bool = False,
    ) -> LotInfo:
        """See :meth:`Ledger.record_lot_firmware`."""
        return await self._run(
            self._ledger.record_lot_firmware,
            lot,
            sha256=sha256,
            version=version,
            security_counter=security_counter,
            key_hash=key_hash,
            actor=actor,
            replace_signing_key=replace_signing_key,
        )

    async def get_lot(self, lot: str) -> LotInfo:
        """See :meth:`Ledger.get_lot`."""
        return await self._run(self._ledger.get_lot, lot)

    async def list_lots(self) -> list[LotInfo]:
        """See :meth:`Ledger.list_lots`."""
        return await self._run(self._ledger.list_lots)

    async def import_ids(
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
        """See :meth:`Ledger.import_ids`."""
        return await self._run(
            self._ledger.import_ids,
            lot,
            data,
            filename=filename,
            fmt=fmt,
            actor=actor,
            max_bytes=max_bytes,
            signature=signature,
            signer_public_key_pem=signer_public_key_pem,
        )

    async def reserve(
        self,
        lot: str,
        hw_serial: str,
        *,
        station: str,
        port: str,
        job_id: int | None,
        actor: str,
        device_id: str | None = None,
    ) -> Reservation:
        """See :meth:`Ledger.reserve`."""
        return await self._run_grouped(
            self._ledger.reserve,
            lot,
            hw_serial,
            station=station,
            port=port,
            job_id=job_id,
            actor=actor,
            device_id=device_id,
        )

    async def mark_provisioned(
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
        """See :meth:`Ledger.mark_provisioned`."""
        await self._run_grouped(
            self._ledger.mark_provisioned,
            lot,
            device_id,
            hw_serial,
            cert_der=cert_der,
            cert_serial=cert_serial,
            fingerprint_sha256=fingerprint_sha256,
            station=station,
            port=port,
            actor=actor,
            finish_job=finish_job,
        )

    async def void(self, lot: str, device_id: str, reason: str, *, actor: str) -> None:
        """See :meth:`Ledger.void`."""
        await self._run(self._ledger.void, lot, device_id, reason, actor=actor)

    async def find_by_serial(self, lot: str, hw_serial: str) -> DeviceRecord | None:
        """See :meth:`Ledger.find_by_serial`."""
        return await self._run(self._ledger.find_by_serial, lot, hw_serial)

    async def find_device(self, device_id: str) -> DeviceRecord | None:
        """See :meth:`Ledger.find_device`."""
        return await self._run(self._ledger.find_device, device_id)

    async def progress(self, lot: str) -> LotProgress:
        """See :meth:`Ledger.progress`."""
        return await self._run(self._ledger.progress, lot)

    async def provisioned_devices(self, lot: str) -> list[ProvisionedDevice]:
        """See :meth:`Ledger.provisioned_devices`."""
        return await self._run(self._ledger.provisioned_devices, lot)

    async def cloud_registrations(self, lot: str, *, cloud: str, target: str) -> list[CloudRegistration]:
        """See :meth:`Ledger.cloud_registrations`."""
        return await self._run(self._ledger.cloud_registrations, lot, cloud=cloud, target=target)

    async def record_cloud_step(
        self,
        lot: str,
        *,
        cloud: str,
        target: str,
        cert_sha256: str,
        device_id: str | None,
        step: RegistrationStep,
        cloud_cert_id: str | None,
        cloud_cert_arn: str | None,
        actor: str,
    ) -> CloudRegistration:
        """See :meth:`Ledger.record_cloud_step`."""
        return await self._run(
            self._ledger.record_cloud_step,
            lot,
            cloud=cloud,
            target=target,
            cert_sha256=cert_sha256,
            device_id=device_id,
            step=step,
            cloud_cert_id=cloud_cert_id,
            cloud_cert_arn=cloud_cert_arn,
            actor=actor,
        )

    async def issued_certificates(self, lot: str) -> list[IssuedCertificateEntry]:
        """See :meth:`Ledger.issued_certificates`."""
        return await self._run(self._ledger.issued_certificates, lot)

    async def revoked_certificates(self, lot: str) -> list[RevokedCertificate]:
        """See :meth:`Ledger.revoked_certificates`."""
        return await self._run(self._ledger.revoked_certificates, lot)

    async def crl_numbers(self, lot: str) -> list[int]:
        """See :meth:`Ledger.crl_numbers`."""
        return await self._run(self._ledger.crl_numbers, lot)

    async def published_revoked_serials(self, lot: str) -> set[str]:
        """See :meth:`Ledger.published_revoked_serials`."""
        return await self._run(self._ledger.published_revoked_serials, lot)

    async def record_crl(self, lot: str, *, actor: str, details: dict[str, object]) -> int:
        """See :meth:`Ledger.record_crl`."""
        return await self._run(self._ledger.record_crl, lot, actor=actor, details=details)

    async def start_job(self, lot: str, *, station: str, port: str, hw_serial: str | None = None) -> int:
        """See :meth:`Ledger.start_job`."""
        return await self._run_grouped(
            self._ledger.start_job, lot, station=station, port=port, hw_serial=hw_serial
        )

    async def set_job_serial(self, job_id: int, hw_serial: str) -> None:
        """See :meth:`Ledger.set_job_serial`."""
        await self._run(self._ledger.set_job_serial, job_id, hw_serial)

    async def finish_job(self, job_id: int, *, outcome: str, reason: str | None) -> None:
        """See :meth:`Ledger.finish_job`."""
        await self._run_grouped(self._ledger.finish_job, job_id, outcome=outcome, reason=reason)

    async def abandon_open_jobs(self, station: str, *, reason: str) -> int:
        """See :meth:`Ledger.abandon_open_jobs`."""
        return await self._run(self._ledger.abandon_open_jobs, station, reason=reason)

    async def record_attempt(
        self, job_id: int, *, step: str, outcome: str, reason: str | None, duration_s: float
    ) -> None:
        """See :meth:`Ledger.record_attempt`."""
        await self._run_grouped(
            self._ledger.record_attempt,
            job_id,
            step=step,
            outcome=outcome,
            reason=reason,
            duration_s=duration_s,
        )

    async def audit(self, *, actor: str, action: str, subject: str, details: dict[str, object]) -> None:
        """See :meth:`Ledger.audit`."""
        await self._run_grouped(
            self._ledger.audit, actor=actor, action=action, subject=subject, details=details
        )

    async def verify_audit(self) -> int:
        """See :meth:`Ledger.verify_audit`."""
        return await self._run(self._ledger.verify_audit)

    async def set_label_template(self, lot: str, template: str, *, actor: str) -> LabelTemplateInfo:
        """See :meth:`Ledger.set_label_template`."""
        return await self._run(self._ledger.set_label_template, lot, template, actor=actor)

    async def label_template(self, lot: str) -> LabelTemplateInfo | None:
        """See :meth:`Ledger.label_template`."""
        return await self._run(self._ledger.label_template, lot)

    async def queue_label(
        self, lot: str, device_id: str, *, station: str, port: str, kind: LabelKind, actor: str
    ) -> LabelJob:
        """See :meth:`Ledger.queue_label`."""
        return await self._run(
            self._ledger.queue_label, lot, device_id, station=station, port=port, kind=kind, actor=actor
        )

    async def label_jobs(
        self,
        *,
        station: str | None = None,
        device_id: str | None = None,
        state: LabelState | None = None,
        oldest_first: bool = False,
        limit: int = 100,
    ) -> list[LabelJob]:
        """See :meth:`Ledger.label_jobs`."""
        return await self._run(
            self._ledger.label_jobs,
            station=station,
            device_id=device_id,
            state=state,
            oldest_first=oldest_first,
            limit=limit,
        )

    async def label_job(self, job_id: int) -> LabelJob:
        """See :meth:`Ledger.label_job`."""
        return await self._run(self._ledger.label_job, job_id)

    async def record_label_attempt(
        self,
        job_id: int,
        *,
        outcome: LabelOutcome,
        error: str | None,
        condition: str | None,
        printer: str | None,
    ) -> LabelJob:
        """See :meth:`Ledger.record_label_attempt`."""
        return await self._run(
            self._ledger.record_label_attempt,
            job_id,
            outcome=outcome,
            error=error,
            condition=condition,
            printer=printer,
        )

    async def use_onboarding_secret(self, secret: bytes) -> None:
        """See :meth:`Ledger.use_onboarding_secret`."""
        await self._run(self._ledger.use_onboarding_secret, secret)

    async def record_onboarding_codes(
        self, lot: str, device_id: str, codes: OnboardingCodes, *, discriminator: int, product_id: int
    ) -> None:
        """See :meth:`Ledger.record_onboarding_codes`."""
        await self._run(
            self._ledger.record_onboarding_codes,
            lot,
            device_id,
            codes,
            discriminator=discriminator,
            product_id=product_id,
        )

    async def onboarding_codes(self, lot: str, device_id: str) -> OnboardingCodes | None:
        """See :meth:`Ledger.onboarding_codes`."""
        return await self._run(self._ledger.onboarding_codes, lot, device_id)

    async def onboarding_records(self, lot: str) -> list[OnboardingRecord]:
        """See :meth:`Ledger.onboarding_records`."""
        return await self._run(self._ledger.onboarding_records, lot)

    async def is_matter_lot(self, lot: str) -> bool:
        """See :meth:`Ledger.is_matter_lot`."""
        return await self._run(self._ledger.is_matter_lot, lot)


class _Opening:
    """What :meth:`AsyncLedger.open` returns: awaitable, and an async context manager that closes."""

    def __init__(self, url: str, onboarding_secret: bytes | None = None) -> None:
        self._url = url
        self._onboarding_secret = onboarding_secret
        self._ledger: AsyncLedger | None = None

    async def _open(self) -> AsyncLedger:
        executor = _new_executor()
        opening = functools.partial(Ledger.open, self._url, onboarding_secret=self._onboarding_secret)
        try:
            ledger = await asyncio.get_running_loop().run_in_executor(executor, opening)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return AsyncLedger(ledger, executor)

    def __await__(self) -> Generator[object, None, AsyncLedger]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncLedger:
        self._ledger = await self._open()
        return self._ledger

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ledger is not None:
            await self._ledger.close()
