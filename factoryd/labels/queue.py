"""The station's durable label queue: a printer that is offline or out of paper never stops a board.

When a board's job ends ``provisioned`` the station writes one label job to the ledger before the
port moves on (:meth:`LabelQueue.board_done`), and nothing else: printing happens in this queue's
own tasks, one per printer. A worker takes its printer's queued jobs oldest first, makes each label
again from the ledger (device, lot template, sealed Matter codes), asks ``~HS``, sends the ZPL, and
records the outcome. Printer trouble keeps the job queued, visible (station page, an MQTT
``step`` event with ``step = "label"``, ``factoryd_labels_queued``) and retried with capped
exponential backoff; the label prints when the printer is back. A label that cannot be made (the
template prints codes the device has not got) fails at once with the reason; it can be reprinted.

The label's bytes are never stored or logged: they may carry the setup passcode.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from factoryd.errors import FactorydError
from factoryd.labels.errors import LabelRenderError, LabelTemplateError, PrinterError, PrinterNotReadyError
from factoryd.labels.printer import PrinterAddress, PrinterTimeouts, ZplPrinter
from factoryd.labels.template import (
    DEFAULT_TEMPLATE_TOML,
    MATTER_TEMPLATE_TOML,
    LabelTemplate,
    LabelValues,
)
from factoryd.labels.zpl import render_zpl
from factoryd.ledger import AsyncLedger, Ledger
from factoryd.ledger.labels import LabelJob, LabelKind, LabelOutcome, LabelState
from factoryd.ledger.model import DeviceState
from factoryd.telemetry.events import JobEvent, TelemetrySink

if TYPE_CHECKING:
    from factoryd.config import Settings
    from factoryd.jobs.lots import LotContext
    from factoryd.jobs.pipeline import JobResult

log = structlog.get_logger(__name__)

# Capped exponential backoff between tries at a printer that is offline or not ready: a reloaded
# printer is noticed within seconds, an unplugged one costs one connection attempt every 30 s.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 30.0
# How often the ledger is looked at for jobs queued by another process (the CLI's reprints).
POLL_S = 2.0
# Queued jobs one worker reads per pass (the station's, all printers; it prints its own in order).
BATCH_JOBS = 1000
# The step name label events carry on MQTT (docs/mqtt.md).
LABEL_STEP = "label"
NO_PRINTER = "no_printer"
# Parsed lot templates kept (a station runs one or two lots at a time).
TEMPLATE_CACHE_SIZE = 16


@dataclass(frozen=True)
class QueueSettings:
    """The knobs of the queue (config ``[labels]``)."""

    station: str
    printers: Mapping[str, ZplPrinter]  # hub port -> its printer
    default_template: LabelTemplate | None = None  # None: built-in (plain, or Matter for Matter lots)
    retry_initial_s: float = RETRY_INITIAL_S
    retry_max_s: float = RETRY_MAX_S
    poll_s: float = POLL_S


class LabelMetrics:
    """The queue's Prometheus figures (docs/metrics.md), in the station's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queued = Gauge(
            "factoryd_labels_queued", "Label jobs of this station waiting to print", registry=registry
        )
        self.attempts = Counter(
            "factoryd_labels_printed",
            "Label print attempts by outcome (printed, failed, offline, not_ready, no_printer)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("printed", "failed", "offline", "not_ready", NO_PRINTER):
            self.attempts.labels(outcome=outcome)
        self.printer_up = Gauge(
            "factoryd_label_printer_ready",
            "1 while the port's label printer answered ready at the last try, 0 after trouble",
            ["port"],
            registry=registry,
        )


@functools.cache
def builtin_template(matter: bool) -> LabelTemplate:
    """The built-in template: the device ID as DataMatrix, or the Matter QR code and manual code."""
    return LabelTemplate.parse(
        MATTER_TEMPLATE_TOML if matter else DEFAULT_TEMPLATE_TOML, source="built-in template"
    )


def load_template_file(path: Path) -> LabelTemplate:
    """A template from a file (config ``labels.template``); LabelTemplateError names the problem."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise LabelTemplateError(f"cannot read label template {path}: {exc.strerror or exc}") from exc
    return LabelTemplate.parse(text, source=f"label template {path}")


@functools.lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def _stored_template(text: str, lot: str) -> LabelTemplate:
    """A lot's stored template, parsed (and trial-rendered) once per text, not once per label."""
    return LabelTemplate.parse(text, source=f"label template of lot {lot!r}")


def make_label(ledger: Ledger, lot: str, device_id: str, default: LabelTemplate | None = None) -> bytes:
    """The ZPL of a provisioned device's label, made again from the ledger (blocking: run off the loop)."""
    device = ledger.find_device(device_id)
    if device is None or device.lot != lot:
        raise LabelRenderError(f"no device {device_id!r} in lot {lot!r}")
    if device.state is not DeviceState.PROVISIONED:
        raise LabelRenderError(f"device {device_id!r} is {device.state}, not provisioned: it gets no label")
    info = ledger.get_lot(lot)
    matter = info.profile.matter is not None
    stored = ledger.label_template(lot)
    if stored is not None:
        template = _stored_template(stored.text, lot)
    else:
        template = default or builtin_template(matter)
    codes = ledger.onboarding_codes(lot, device_id) if matter and template.needs_onboarding_codes else None
    values = LabelValues(
        device_id=device_id,
        serial=device.hw_serial or "",
        lot=lot,
        qr_payload=codes.qr_payload if codes is not None else None,
        manual_code=codes.manual_code if codes is not None else None,
    )
    return render_zpl(template, values)


@dataclass
class PrinterView:
    """What the operator sees of one printer (station page)."""

    address: str
    ports: list[str]
    ready: bool | None = None  # None: not tried yet
    condition: str | None = None
    message: str | None = None
    since: datetime | None = None
    retry_in_s: float | None = None
    printed: int = 0


@dataclass
class _Worker:
    printer: ZplPrinter
    ports: set[str]
    view: PrinterView
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class LabelQueue:
    """The station's label printing: queue on provisioning, print in the background, show the state."""

    def __init__(
        self,
        *,
        ledger: AsyncLedger,
        settings: QueueSettings,
        telemetry: TelemetrySink,
        metrics: LabelMetrics | None = None,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.telemetry = telemetry
        self.metrics = metrics
        self.queued = 0
        # Labels that will never print (their template cannot render them) since the station started.
        self.failed = 0
        self._stop = asyncio.Event()
        self._workers: dict[PrinterAddress, _Worker] = {}
        for port, printer in settings.printers.items():
            worker = self._workers.get(printer.address)
            if worker is None:
                view = PrinterView(address=str(printer.address), ports=[])
                worker = self._workers[printer.address] = _Worker(printer, set(), view)
            worker.ports.add(port)
            worker.view.ports.append(port)
        self._poll_wake = asyncio.Event()

    @property
    def printers(self) -> list[PrinterView]:
        """Every configured printer as the operator sees it."""
        return [w.view for w in self._workers.values()]

    def stop(self) -> None:
        """End the workers (queued jobs stay in the ledger for the next start)."""
        self._stop.set()
        self._poll_wake.set()
        for worker in self._workers.values():
            worker.wake.set()

    async def board_done(self, lot: str, device_id: str, port: str) -> LabelJob | None:
        """Queue a provisioned board's own label (one per board); never raises (logs instead)."""
        try:
            job = await self.ledger.queue_label(
                lot, device_id, station=self.settings.station, port=port, kind=LabelKind.BOARD,
                actor=self.settings.station,
            )  # fmt: skip
        except FactorydError as exc:
            # The board is provisioned either way; the operator can reprint its label.
            log.error("label not queued", device_id=device_id, port=port, error=str(exc), reason=exc.reason)
            return None
        self._event(job, "queued", None)
        self.wake(port)
        return job

    async def provisioned(self, lot: LotContext, result: JobResult) -> None:
        """The station's hook (jobs/scheduler.py): a board ended provisioned, queue its label."""
        if result.device_id is None:
            log.error("provisioned board without a device ID: no label", port=result.port)
            return
        try:
            await self.board_done(lot.name, result.device_id, result.port)
        except Exception:  # a bug here must cost one board its label (reprint it), never the port loop
            log.exception("label not queued", device_id=result.device_id, port=result.port)

    async def reprint(self, lot: str, device_id: str, port: str, *, actor: str) -> LabelJob:
        """Queue a reprint (audited in the ledger with ``actor``)."""
        job = await self.ledger.queue_label(
            lot, device_id, station=self.settings.station, port=port, kind=LabelKind.REPRINT, actor=actor
        )
        self._event(job, "queued", None)
        self.wake(port)
        return job

    def wake(self, port: str | None = None) -> None:
        """Look at the queue now (a new job); a printer in backoff is tried again when its wait ends."""
        self._poll_wake.set()
        for worker in self._workers.values():
            if port is None or port in worker.ports:
                worker.wake.set()

    async def run(self) -> None:
        """Run every printer's worker and the ledger poller until stop()."""
        async with asyncio.TaskGroup() as tg:
            for address, worker in self._workers.items():
                tg.create_task(self._work(worker), name=f"labels-{address}")
            tg.create_task(self._poll(), name="labels-poll")

    async def _sleep(self, event: asyncio.Event, timeout_s: float) -> None:
        """Until ``event`` (cleared by the caller before it looked), stop(), or the timeout."""
        if self._stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()

    async def _poll(self) -> None:
        """Count the queue, mark jobs for ports without a printer, wake workers for outside jobs."""
        while not self._stop.is_set():
            self._poll_wake.clear()
            try:
                queued = await self.ledger.label_jobs(
                    station=self.settings.station,
                    state=LabelState.QUEUED,
                    oldest_first=True,
                    limit=BATCH_JOBS,
                )
            except FactorydError as exc:
                log.warning("label queue unavailable", error=str(exc))
                queued = None
            if queued is not None:
                self._count(len(queued))
                for job in queued:
                    # Jobs for a printer are its worker's; the worker also finds the CLI's within poll_s.
                    if job.port not in self.settings.printers and job.condition != NO_PRINTER:
                        message = f"no label printer for port {job.port} ([labels.printers])"
                        await self._record(job, LabelOutcome.RETRY, message, NO_PRINTER, None)
                        self._tally(NO_PRINTER)
            await self._sleep(self._poll_wake, self.settings.poll_s)

    def _count(self, queued: int) -> None:
        self.queued = queued
        if self.metrics is not None:
            self.metrics.queued.set(queued)

    async def _work(self, worker: _Worker) -> None:
        delay_s = self.settings.retry_initial_s
        while not self._stop.is_set():
            worker.wake.clear()  # before looking: a job queued from now on wakes the next sleep
            try:
                jobs = await self.ledger.label_jobs(
                    station=self.settings.station,
                    state=LabelState.QUEUED,
                    oldest_first=True,
                    limit=BATCH_JOBS,
                )
            except FactorydError as exc:
                log.warning("label queue unavailable", error=str(exc))
                await self._sleep(worker.wake, self.settings.poll_s)
                continue
            mine = [job for job in jobs if job.port in worker.ports]
            if not mine:
                await self._sleep(worker.wake, self.settings.poll_s)
                continue
            trouble = False
            for job in mine:
                if self._stop.is_set():
                    return
                if not await self._print(worker, job):
                    trouble = True
                    break
            if trouble:
                # Backoff: new boards' labels do not cut it short (they would hammer a dead printer).
                worker.view.retry_in_s = delay_s
                await self._sleep(self._stop, delay_s)
                delay_s = min(delay_s * 2, self.settings.retry_max_s)
            else:
                worker.view.retry_in_s = None
                delay_s = self.settings.retry_initial_s

    async def _print(self, worker: _Worker, job: LabelJob) -> bool:
        """Try one job; False when the printer is in trouble (the job stays queued)."""
        address = str(worker.printer.address)
        try:
            zpl = await asyncio.to_thread(
                make_label, self.ledger.sync, job.lot, job.device_id, self.settings.default_template
            )
        except (LabelRenderError, LabelTemplateError) as exc:
            await self._record(job, LabelOutcome.FAILED, str(exc), "render", address)
            self._tally("failed")
            return True
        except FactorydError as exc:  # the ledger or the codes cannot be read now: try again later
            log.warning("label cannot be made now", label_job=job.id, error=str(exc))
            return False
        try:
            receipt = await worker.printer.print_label(zpl)
        except PrinterError as exc:
            condition = exc.condition if isinstance(exc, PrinterNotReadyError) else "offline"
            self._printer_state(worker, ready=False, condition=condition, message=str(exc), port=job.port)
            if job.condition != condition or job.attempts == 0:
                log.warning("label printer in trouble; labels queue", printer=address, condition=condition)
            await self._record(job, LabelOutcome.RETRY, str(exc), condition, address)
            self._tally("offline" if condition == "offline" else "not_ready")
            return False
        after = receipt.after
        message = None
        if after is None or not after.ready:
            # The label is in the printer's buffer and prints once the condition clears (LABELS.md).
            problems = ", ".join(after.problems) if after is not None else "no status after the job"
            message = f"printer {address} took the label but reports {problems}"
            log.warning("label printer reports trouble after a job", printer=address, problems=problems)
        self._printer_state(worker, ready=after is not None and after.ready, condition=None, message=message,
                            port=job.port)  # fmt: skip
        worker.view.printed += 1
        await self._record(job, LabelOutcome.PRINTED, message, None, address)
        self._tally("printed")
        return True

    def _printer_state(
        self, worker: _Worker, *, ready: bool, condition: str | None, message: str | None, port: str
    ) -> None:
        view = worker.view
        if view.ready != ready or view.condition != condition:
            view.since = datetime.now(UTC)
        view.ready, view.condition, view.message = ready, condition, message
        if self.metrics is not None:
            for each in worker.ports:
                self.metrics.printer_up.labels(port=each).set(1 if ready else 0)

    def _tally(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.attempts.labels(outcome=outcome).inc()

    async def _record(
        self,
        job: LabelJob,
        outcome: LabelOutcome,
        error: str | None,
        condition: str | None,
        printer: str | None,
    ) -> None:
        try:
            updated = await self.ledger.record_label_attempt(
                job.id, outcome=outcome, error=error, condition=condition, printer=printer
            )
        except FactorydError as exc:
            log.warning("label attempt not recorded", label_job=job.id, error=str(exc))
            return
        if outcome is LabelOutcome.FAILED:
            self.failed += 1
        if outcome is LabelOutcome.RETRY and job.condition == condition and job.attempts > 0:
            return  # the same trouble again: already told
        self._event(updated, outcome.value if outcome is not LabelOutcome.RETRY else "queued", condition)
        if outcome is not LabelOutcome.RETRY:
            self._poll_wake.set()  # recount

    def _event(self, job: LabelJob, outcome: str, condition: str | None) -> None:
        """An MQTT/page event for a label (device ID, lot, outcome, condition; never its content)."""
        self.telemetry.job_event(
            JobEvent(
                kind="step",
                port=job.port,
                lot=job.lot,
                job_id=None,
                step=LABEL_STEP,
                outcome=outcome,
                reason=f"label_{condition}" if condition else None,
                device_id=job.device_id,
                attempt=job.attempts,
                duration_s=None,
                at=datetime.now(UTC),
            )
        )


def build_label_queue(
    settings: Settings, ledger: AsyncLedger, telemetry: TelemetrySink, registry: CollectorRegistry | None
) -> LabelQueue | None:
    """The station's label queue from config ``[labels]``; None when labels are off."""
    cfg = settings.labels
    if not cfg.enabled:
        return None
    timeouts = PrinterTimeouts(
        connect_s=cfg.connect_timeout_s, status_s=cfg.status_timeout_s, write_s=cfg.write_timeout_s
    )
    by_address: dict[PrinterAddress, ZplPrinter] = {}
    printers: dict[str, ZplPrinter] = {}
    for port, text in cfg.printers.items():
        address = PrinterAddress.parse(text)
        printers[port] = by_address.setdefault(address, ZplPrinter(address, timeouts))
    queue_settings = QueueSettings(
        station=settings.station.name,
        printers=printers,
        default_template=load_template_file(cfg.template) if cfg.template is not None else None,
        retry_initial_s=cfg.retry_initial_s,
        retry_max_s=cfg.retry_max_s,
        poll_s=cfg.poll_s,
    )
    metrics = LabelMetrics(registry) if registry is not None else None
    return LabelQueue(ledger=ledger, settings=queue_settings, telemetry=telemetry, metrics=metrics)
