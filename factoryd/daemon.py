"""The composition root: builds the station from settings and runs it until stopped.

Every long-lived resource is an async context manager entered here, and every task lives in
one TaskGroup. READY=1 goes to systemd only after the ledger is open, the lot can be read and
the telemetry endpoints listen.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from factoryd import __version__
from factoryd.api import ApiContext, create_app, serve_api
from factoryd.api.limits import LoadLimits
from factoryd.backends import build_hub
from factoryd.config import Settings
from factoryd.errors import SchemaVersionError
from factoryd.flashing import ExternalFlasher
from factoryd.hub.base import Hub
from factoryd.jobs.ledger_hold import LEDGER_PAUSE_KEY, LedgerHold
from factoryd.jobs.lots import LotContext, load_lot_context
from factoryd.jobs.pipeline import Pipeline, PipelineSettings
from factoryd.jobs.scheduler import LotSource, Station
from factoryd.labels.queue import LabelQueue, build_label_queue
from factoryd.ledger import AsyncLedger
from factoryd.ledger.aio import held_ledger, observe_group_commits
from factoryd.ledger.model import LotInfo
from factoryd.limits import raise_open_files_limit
from factoryd.pki.store import BundleStore
from factoryd.protocol.native import Timeouts
from factoryd.sdnotify import Notifier
from factoryd.service import StationPaths, prepare_state_dir, station_passphrase
from factoryd.signer.client import SIGNER_PAUSE_KEY, SignerClient, endpoint_from_settings
from factoryd.signer.errors import SignerUnavailableError
from factoryd.telemetry.events import FanOut, TelemetrySink
from factoryd.telemetry.live import LiveState
from factoryd.telemetry.metrics import Metrics
from factoryd.telemetry.mqtt import MqttPublisher, mqtt_settings

log = structlog.get_logger(__name__)

StopWhen = Callable[[Station], bool]
# How often the optional stop condition is evaluated.
STOP_POLL_S = 0.05


@dataclass
class DaemonHooks:
    """Extension points for the demo, benchmarks and tests."""

    hub: Hub | None = None
    passphrase: bytes | None = None
    stop_when: StopWhen | None = None
    on_ready: Callable[[Station], Awaitable[None]] | None = None
    extra_sinks: tuple[TelemetrySink, ...] = ()
    # An interactive program (the demo) ends on SIGHUP like any terminal program; the service reloads lots.
    hangup_stops: bool = False
    # How long a job waits at its safe point for an unreachable ledger (None: [ledger] hold_s).
    ledger_hold_s: float | None = None


def pipeline_settings(settings: Settings) -> PipelineSettings:
    """Pipeline knobs from the config."""
    jobs, hub = settings.jobs, settings.hub
    base = Timeouts()
    scale = jobs.reply_timeout_scale
    timeouts = Timeouts(**{k: v * scale for k, v in base.__dict__.items()})
    return PipelineSettings(
        station=settings.station.name,
        step_attempts=jobs.step_attempts,
        job_attempts=jobs.job_attempts,
        backoff_initial_s=jobs.backoff_initial_s,
        backoff_max_s=jobs.backoff_max_s,
        enumerate_timeout_s=hub.enumerate_timeout_s,
        power_cycle_off_s=hub.power_cycle_off_s,
        power_on_stagger_s=hub.power_on_stagger_s,
        baudrate=jobs.baudrate,
        resends=jobs.resends,
        timeouts=timeouts,
        flasher=ExternalFlasher(jobs.flash_command, jobs.flash_timeout_s) if jobs.flash_command else None,
    )


def _ready_line(hub: str, ports: int, lot: str | None) -> str:
    """What the station will do, in one line (the first thing an operator reads in the journal)."""
    if lot is None:
        return (
            f"station ready on {ports} ports of hub {hub}; no active lot: waiting for one to be "
            "activated (factoryd lots activate NAME)"
        )
    return f"station ready: provisioning lot {lot} on {ports} ports of hub {hub}"


class Daemon:
    """One station: ledger, hub, pipeline, telemetry."""

    def __init__(self, settings: Settings, hooks: DaemonHooks | None = None) -> None:
        self.settings = settings
        self.hooks = hooks or DaemonHooks()
        self.paths = StationPaths(settings.station.state_dir)
        self.metrics = Metrics(station=settings.station.name, line=settings.station.line, version=__version__)
        self.live = LiveState()
        self.api_port: int | None = None
        self.metrics_port: int | None = None
        self.station: Station | None = None
        self.ledger_hold: LedgerHold | None = None
        self.notifier = Notifier()
        # The signal that stopped the station (None: the stop condition or no stop yet), and its event.
        self.stopped_by: signal.Signals | None = None
        self.signalled = asyncio.Event()

    async def run(self) -> Station:
        """Run until SIGTERM/SIGINT or the stop condition; return the station (results, counts)."""
        settings = self.settings
        prepare_state_dir(self.paths)
        passphrase = self.hooks.passphrase or station_passphrase(settings)
        bundles = BundleStore(self.paths.bundles, passphrase)
        hub = self.hooks.hub or build_hub(settings)

        # The line's signer (docs/signer.md): lots open with their chain only, certificates are signed there.
        signer = (
            SignerClient(endpoint_from_settings(settings.pki), settings.station.name)
            if settings.pki.signer is not None
            else None
        )

        def open_lot(info: LotInfo) -> LotContext:
            return load_lot_context(info, bundles, self.paths.firmware, self.paths.attestation, remote=signer)

        async with contextlib.AsyncExitStack() as stack:
            # The CA passphrase also seals Matter onboarding codes in the ledger (ledger/matter.py).
            try:
                ledger = await stack.enter_async_context(
                    AsyncLedger.open(settings.ledger_url, onboarding_secret=passphrase)
                )
            except SchemaVersionError as exc:
                # Restarting cannot help (a newer factoryd wrote the ledger): say so where systemctl shows it.
                log.error("refusing to start: the ledger has a newer schema", error=str(exc))
                self.notifier.notify(f"STATUS=refusing to start: {exc}")
                raise
            observe_group_commits(ledger, self.metrics.ledger_group_committed)
            abandoned = await ledger.abandon_open_jobs(settings.station.name, reason="station restarted")
            if abandoned:
                log.warning("closed jobs left open by the previous run", jobs=abandoned)
            if signer is not None:
                await stack.enter_async_context(signer)
            sinks: list[TelemetrySink] = [self.metrics, self.live, *self.hooks.extra_sinks]
            if settings.mqtt.enabled:
                sinks.append(
                    await stack.enter_async_context(
                        MqttPublisher(mqtt_settings(settings), metrics=self.metrics)
                    )
                )
            if settings.metrics.enabled:
                self.metrics_port = await stack.enter_async_context(
                    self.metrics.serve(settings.metrics.host, settings.metrics.port)
                )
                log.info(
                    "metrics listening", address=f"http://{settings.metrics.host}:{self.metrics_port}/metrics"
                )
            telemetry = FanOut(sinks)
            # Labels (docs/labels.md): a bad default template or printer address fails before READY.
            labels = build_label_queue(settings, ledger, telemetry, self.metrics.registry)
            await stack.enter_async_context(hub)
            # One tty per port (1,024 ports pass Linux's usual soft limit of 1024 descriptors).
            raise_open_files_limit(len(hub.ports()))
            # Jobs wait out ledger outages at their safe point; the API and the lot lookup fail at once.
            self.ledger_hold = hold = LedgerHold(
                ledger,
                actor=settings.station.name,
                hold_s=self.hooks.ledger_hold_s or settings.ledger.hold_s,
                telemetry=telemetry,
            )
            pipeline = Pipeline(
                hub=hub,
                ledger=held_ledger(ledger, hold),
                telemetry=telemetry,
                settings=pipeline_settings(settings),
                power_budget=asyncio.Semaphore(settings.hub.max_powered),
            )
            station = self.station = Station(
                hub=hub,
                pipeline=pipeline,
                ledger=ledger,
                lots=LotSource(ledger, settings.jobs.lot, open_lot),
                telemetry=telemetry,
                rescan_s=settings.jobs.rescan_s,
                attention_after=settings.jobs.attention_after_failures,
                impostors_need_attention=settings.jobs.impostors_need_attention,
                pause_listener=self.metrics.intake_pause,
                on_provisioned=labels.provisioned if labels is not None else None,
            )
            station.probes[LEDGER_PAUSE_KEY] = hold.probe
            station.labels = labels
            if signer is not None:
                station.probes[SIGNER_PAUSE_KEY] = signer.probe
            hold.bind(station)
            if settings.api.enabled:
                api_ctx = ApiContext(
                    settings=settings,
                    ledger=ledger,
                    paths=self.paths,
                    passphrase=passphrase,
                    live=self.live,
                    station=station,
                    load=LoadLimits(
                        client_rate_per_s=settings.api.client_rate_per_s,
                        client_burst=settings.api.client_burst,
                        address_rate_per_s=settings.api.address_rate_per_s,
                        address_burst=settings.api.address_burst,
                        max_event_streams=settings.api.max_event_streams,
                    ),
                    on_reject=self.metrics.http_rejected_request,
                )
                self.api_port = await stack.enter_async_context(
                    serve_api(
                        create_app(api_ctx),
                        settings.api.host,
                        settings.api.port,
                        tls_cert=settings.api.tls_cert,
                        tls_key=settings.api.tls_key,
                    )
                )
            # Fail before READY if the lot cannot be opened (wrong passphrase, missing bundle).
            try:
                lot = await station.lots.current()
            except SignerUnavailableError as exc:
                # Not this station's fault: it starts, and its ports pause intake until the signer answers.
                log.warning("the line's signer is unreachable; intake waits for it", error=str(exc))
                lot = None
            log.info(
                _ready_line(hub.name, len(station.ports), lot.name if lot else None),
                station=settings.station.name,
                lot=lot.name if lot else None,
                ports=len(station.ports),
                hub=hub.name,
                version=__version__,
            )
            self._install_signal_handlers(station)
            async with asyncio.TaskGroup() as tg:
                running = tg.create_task(self._run_station(station, labels), name="station")
                if labels is not None:
                    tg.create_task(labels.run(), name="labels")
                tg.create_task(self._supervise(station, running), name="supervise")
                self.notifier.notify("READY=1", f"STATUS=provisioning on {len(station.ports)} ports")
                if self.hooks.on_ready is not None:
                    await self.hooks.on_ready(station)
            self.notifier.stopping()
            await station.publish_progress()
        return station

    @staticmethod
    async def _run_station(station: Station, labels: LabelQueue | None) -> None:
        try:
            await station.run()
        finally:
            if labels is not None:
                labels.stop()  # queued labels stay in the ledger for the next start

    async def _supervise(self, station: Station, running: asyncio.Task[None]) -> None:
        watchdog = asyncio.ensure_future(self.notifier.watchdog())
        try:
            stop_when = self.hooks.stop_when
            while not station.stopping:
                if stop_when is not None and stop_when(station):
                    log.info("stop condition reached")
                    station.stop()
                    break
                await asyncio.sleep(STOP_POLL_S)
            grace_s = self.settings.jobs.shutdown_grace_s
            _, pending = await asyncio.wait({running}, timeout=grace_s)
            if pending:
                # Cancelling mid-job is safe: the ledger keeps each reservation bound to its board.
                log.warning(
                    "jobs did not finish within the shutdown grace period; cancelling", grace_s=grace_s
                )
                running.cancel()
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    def _install_signal_handlers(self, station: Station) -> None:
        loop = asyncio.get_running_loop()
        stop_signals = [signal.SIGTERM, signal.SIGINT]
        if self.hooks.hangup_stops:
            stop_signals.append(signal.SIGHUP)
        for sig in stop_signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, station, sig)
        if not self.hooks.hangup_stops:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self._on_reload, station)

    def _on_signal(self, station: Station, sig: signal.Signals) -> None:
        log.info("stopping on signal", signal=sig.name)
        self.stopped_by = sig
        self.signalled.set()
        self.notifier.stopping()
        station.stop()

    def _on_reload(self, station: Station) -> None:
        log.info("reloading lots on SIGHUP")
        self.notifier.notify("RELOADING=1")
        station.reload_lots()
        self.notifier.notify("READY=1")
