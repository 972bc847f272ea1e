"""The station: one loop per hub port, all in one TaskGroup, with operator controls.

A port loop runs a job whenever a board is present and a lot is active. After a job it
releases the board to the operator and remembers its serial, so a board left in the port is
not provisioned twice; an operator's retry clears that memory.

Intake can be paused for the whole station with a reason (the hub is gone, the clock is wrong,
the ledger cannot be written): no port starts a new job, jobs in flight end, every idle port shows
the reason, and a probe of the cause runs with bounded backoff until it passes; then intake resumes
by itself. A job that ends for such a station-wide reason keeps its board in the port (same ID on
resume) and does not count towards the port's ATTENTION.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from factoryd.errors import FactorydError, HubDisconnectedError, HubError, StationClockError
from factoryd.hub.base import Hub, probe_hub
from factoryd.jobs.lots import LotContext, active_lot
from factoryd.jobs.pipeline import JobResult, Pipeline
from factoryd.ledger import AsyncLedger
from factoryd.ledger.model import LotInfo
from factoryd.pki.attestation import GENUINENESS_REASONS
from factoryd.telemetry.events import LotProgressUpdate, PortState, PortUpdate, TelemetrySink

if TYPE_CHECKING:
    from factoryd.labels.queue import LabelQueue

log = structlog.get_logger(__name__)
# How long the active lot is trusted before the ledger is asked again: a pause or close reaches
# every port within this time, and a busy line does not query the lot once per board.
LOT_RECHECK_S = 1.0
# How often lot counts are published (retained MQTT, Prometheus gauges).
PROGRESS_INTERVAL_S = 2.0
# First and longest wait between probes of a paused intake's cause: a hub plugged back in is noticed
# within a second, a long outage costs one cheap probe every 10 s.
INTAKE_PROBE_INITIAL_S = 0.25
INTAKE_PROBE_MAX_S = 10.0
# A hub probe is one sysfs stat or one uhubctl call: a hub plugged back in is noticed within 2 s.
HUB_PROBE_MAX_S = 2.0
# Job reasons that say the station, not the board, cannot work: intake pauses (key, probe) instead.
PAUSING_REASONS = {
    "hub_disconnected": "hub",
    "station_clock": "clock",
    # jobs/ledger_hold.py: a ledger outage that outlasted a job's hold (its probe is in Station.probes).
    "ledger_unavailable": "ledger",
    "ledger_storage_full": "ledger",
    # signer/client.py: the line's signer stayed unreachable past a board's hold (probe: its /healthz).
    "signer_unavailable": "signer",
}
# A board failing for such a reason this often in a row while each probe passes is failed as usual.
MAX_PAUSED_RERUNS = 5
# A probe: returns when the cause is gone, raises FactorydError while it is not.
Probe = Callable[[], Awaitable[None]]
PauseListener = Callable[[str, bool], None]
# Told of every provisioned board before its port is released (the label queue: labels/queue.py).
ProvisionedHook = Callable[[LotContext, JobResult], Awaitable[None]]


@dataclass(frozen=True)
class IntakePause:
    """Why the station takes no new boards: who paused it, the reason code, the detail, since when."""

    key: str
    reason: str
    message: str
    since: datetime


@dataclass
class PortControl:
    """Operator state of one port."""

    port: str
    enabled: bool = True
    skip_serial: str | None = None
    busy: bool = False
    # Boards failed in a row; at the station's limit the port stops in ATTENTION until an operator acts.
    failures_in_row: int = 0
    attention: str | None = None
    last: JobResult | None = None
    # A finished board whose release failed (the hub went away): released before the port's next job.
    unreleased: bool = False
    # Jobs of the board in the port that failed in a row for a station-wide reason (PAUSING_REASONS).
    paused_reruns: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class LotSource:
    """Finds the active lot and keeps its opened context (CA key, firmware) cached."""

    def __init__(
        self, ledger: AsyncLedger, wanted: str | None, opener: Callable[[LotInfo], LotContext]
    ) -> None:
        self._ledger = ledger
        self._wanted = wanted
        self._opener = opener
        self._cache: dict[str, LotContext] = {}
        self._lock = asyncio.Lock()
        self._current: LotContext | None = None
        self._checked_at: float | None = None

    def clear(self) -> None:
        """Drop cached lot contexts."""
        self._cache.clear()
        self._checked_at = None

    async def current(self) -> LotContext | None:
        """The active lot's context, or None when no lot is active (re-read at most every second)."""
        async with self._lock:
            now = time.monotonic()
            if self._checked_at is not None and now - self._checked_at < LOT_RECHECK_S:
                return self._current
            self._current = await self._load()
            self._checked_at = time.monotonic()
            return self._current

    async def _load(self) -> LotContext | None:
        info = await active_lot(self._ledger, self._wanted)
        if info is None:
            return None
        context = self._cache.get(info.name)
        if context is None or context.profile != info.profile:
            # Opening decrypts the CA key (a deliberately slow KDF): keep it off the event loop.
            context = await asyncio.to_thread(self._opener, info)
            self._cache[info.name] = context
        return context


class Station:
    """Runs every port of a hub until stopped."""

    def __init__(
        self,
        *,
        hub: Hub,
        pipeline: Pipeline,
        ledger: AsyncLedger,
        lots: LotSource,
        telemetry: TelemetrySink,
        rescan_s: float,
        attention_after: int = 3,
        impostors_need_attention: bool = False,
        pause_listener: PauseListener | None = None,
        on_provisioned: ProvisionedHook | None = None,
    ) -> None:
        self.hub = hub
        self.pipeline = pipeline
        self.ledger = ledger
        self.lots = lots
        self.telemetry = telemetry
        self.rescan_s = rescan_s
        self.attention_after = attention_after
        # A board refused as not genuine (pki/attestation.py) says nothing about the fixture: a stream
        # of fakes does not stop the port unless the operator asks for that.
        self.impostors_need_attention = impostors_need_attention
        self.ports = {p: PortControl(p) for p in hub.ports()}
        self.outcomes: Counter[str] = Counter()
        self.results: list[JobResult] = []
        self._stop = asyncio.Event()
        self.started_at = datetime.now(UTC)
        # Monotonic start of the first and end of the last finished job (throughput window).
        self.first_job_at: float | None = None
        self.last_job_at: float | None = None
        # Station-wide pauses of intake by key, the probes that end them, and who hears of them (metrics).
        self.pauses: dict[str, IntakePause] = {}
        self.pauses_total = 0
        self._probes: dict[str, asyncio.Task[None]] = {}
        # Monotonic start of each pause: its duration survives a wall-clock step.
        self._paused_at: dict[str, float] = {}
        self._pause_listener = pause_listener
        self._on_provisioned = on_provisioned
        # The label queue (labels/queue.py) when labels are enabled; the station page reads it.
        self.labels: LabelQueue | None = None
        self._tg: asyncio.TaskGroup | None = None
        # Probes of pause keys whose cause lives outside the station (the ledger: jobs/ledger_hold.py).
        self.probes: dict[str, Probe] = {}

    def stop(self) -> None:
        """Ask every port loop to finish its current job and end."""
        self._stop.set()
        for control in self.ports.values():
            control.wake.set()

    def reload_lots(self) -> None:
        """Forget opened lots (SIGHUP): the next job reads lot, bundle and firmware again."""
        self.lots.clear()

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.is_set()

    @property
    def busy_ports(self) -> int:
        """Ports in the middle of a job."""
        return sum(c.busy for c in self.ports.values())

    # Operator controls --------------------------------------------------------------------

    def enable(self, port: str, enabled: bool) -> None:
        """Enable or disable a port (a disabled port finishes its current job first)."""
        control = self._control(port)
        control.enabled = enabled
        control.wake.set()

    def retry(self, port: str) -> None:
        """Run the port again now, even if the same board is still in it; clears ATTENTION."""
        control = self._control(port)
        control.skip_serial = None
        control.attention = None
        control.failures_in_row = 0
        control.wake.set()

    def acknowledge(self, port: str) -> None:
        """The operator has seen the ATTENTION state: the port goes back to work with the next board."""
        control = self._control(port)
        control.attention = None
        control.failures_in_row = 0
        control.wake.set()

    # Intake ---------------------------------------------------------------------------------

    @property
    def intake_paused(self) -> bool:
        """True while any pause holds intake."""
        return bool(self.pauses)

    def pause(
        self,
        key: str,
        reason: str,
        message: str,
        *,
        probe: Probe | None = None,
        probe_max_s: float = INTAKE_PROBE_MAX_S,
    ) -> None:
        """Take no new boards until resume(key), or until ``probe`` passes (backoff up to ``probe_max_s``)."""
        if key not in self.pauses:
            self.pauses[key] = IntakePause(key, reason, message, datetime.now(UTC))
            self._paused_at[key] = time.monotonic()
            self.pauses_total += 1
            log.warning("intake paused", key=key, reason=reason, error=message)
            if self._pause_listener is not None:
                self._pause_listener(reason, True)
        if probe is not None and key not in self._probes and self._tg is not None:
            self._probes[key] = self._tg.create_task(
                self._probe_until_ok(key, probe, probe_max_s), name=f"probe-{key}"
            )
        self._wake_all()

    def resume(self, key: str) -> None:
        """End one pause; intake runs again once no pause is left."""
        pause = self.pauses.pop(key, None)
        if pause is None:
            return
        paused_s = time.monotonic() - self._paused_at.pop(key, time.monotonic())
        log.info("intake resumed", key=key, reason=pause.reason, paused_s=round(paused_s, 3))
        if self._pause_listener is not None and all(p.reason != pause.reason for p in self.pauses.values()):
            self._pause_listener(pause.reason, False)
        self._wake_all()

    async def _probe_until_ok(self, key: str, probe: Probe, max_s: float) -> None:
        delay_s = INTAKE_PROBE_INITIAL_S
        try:
            while key in self.pauses:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_s):
                        await self._stop.wait()
                if self._stop.is_set():
                    return
                try:
                    await probe()
                except FactorydError as exc:
                    log.debug("intake probe still failing", key=key, error=str(exc))
                    delay_s = min(delay_s * 2, max_s)
                    continue
                self.resume(key)
        finally:
            self._probes.pop(key, None)

    def _pause_for(self, reason: str, message: str, lot: LotContext | None) -> None:
        """Pause intake for a station-wide job reason, probing its cause."""
        key = PAUSING_REASONS[reason]
        if key in self.probes:
            self.pause(key, reason, message, probe=self.probes[key])
        elif key == "hub":
            self.pause(key, reason, message, probe=lambda: probe_hub(self.hub), probe_max_s=HUB_PROBE_MAX_S)
        elif key == "clock" and lot is not None:
            issuer = lot.issuer

            async def clock_ok() -> None:
                issuer.check_clock()

            try:
                issuer.check_clock()
            except StationClockError as exc:
                message = str(exc)  # what is wrong with the clock, not which job noticed
            self.pause(key, reason, message, probe=clock_ok)

    async def _hub_gone(self) -> HubDisconnectedError | None:
        """The error of a hub that is gone, or None (present, or it cannot tell)."""
        try:
            await probe_hub(self.hub)
        except HubDisconnectedError as exc:
            return exc
        except HubError:
            return None
        return None

    def _wake_all(self) -> None:
        for control in self.ports.values():
            control.wake.set()

    def _control(self, port: str) -> PortControl:
        try:
            return self.ports[port]
        except KeyError:
            raise KeyError(f"no port {port!r} on {self.hub.name}") from None

    # Loops --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Switch every port off, then run all port loops and the progress publisher until stop()."""
        # HUBS.md: start from a known state; a port left powered by a crash is switched off first.
        hub_gone: HubDisconnectedError | None = None
        for port in self.ports:
            try:
                await self.hub.power_off(port)
            except HubDisconnectedError as exc:
                hub_gone = exc  # the hub is switched off when it comes back (its ports start off)
                break
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if hub_gone is not None:
                self._pause_for(hub_gone.reason, str(hub_gone), None)
            for port in self.ports:
                tg.create_task(self._port_loop(self.ports[port]), name=f"port-{port}")
            tg.create_task(self._progress_loop(), name="lot-progress")

    async def _port_loop(self, control: PortControl) -> None:
        port = control.port
        while not self.stopping:
            if not control.enabled:
                self._publish(port, PortState.DISABLED)
                await self._idle(control, None)
                continue
            if control.attention is not None:
                self._publish(port, PortState.ATTENTION, reason=control.attention)
                await self._idle(control, None)
                continue
            if self.pauses:
                pause = next(iter(self.pauses.values()))
                self._publish(port, PortState.IDLE, reason=pause.reason)
                await self._idle(control, None)  # resume() wakes every port
                continue
            if control.unreleased and not await self._release(control, None):
                continue
            try:
                lot = await self.lots.current()
            except FactorydError as exc:
                if exc.reason in PAUSING_REASONS:  # e.g. the ledger is unreachable: not this port's fault
                    self._pause_for(exc.reason, str(exc), None)
                    continue
                log.error("no lot available", reason=exc.reason, error=str(exc), port=port)
                self._publish(port, PortState.ATTENTION, reason=str(exc))
                await self._idle(control, self.rescan_s)
                continue
            if lot is None:
                self._publish(port, PortState.IDLE)
                await self._idle(control, self.rescan_s)
                continue
            try:
                # Before any ID is reserved: a wrong clock pauses the station, it fails no board.
                lot.issuer.check_clock()
            except StationClockError as exc:
                self._pause_for(exc.reason, str(exc), lot)
                continue
            control.busy = True
            try:
                result = await self.pipeline.run(port, lot, skip_serial=control.skip_serial)
            except Exception as exc:  # a bug must cost one port one board, never the whole line
                log.exception("port loop crashed", port=port)
                control.attention = f"internal error on port {port}: {type(exc).__name__}: {exc}"
                continue
            finally:
                control.busy = False
            await self._after(control, lot, result)

    async def _after(self, control: PortControl, lot: LotContext, result: JobResult) -> None:
        port = control.port
        if result.outcome == "empty":
            self._publish(port, PortState.EMPTY, lot=lot.name)
            await self._idle(control, self.rescan_s)
            return
        if result.outcome == "same_board":
            # The finished board is still in the slot: show its result again, not the rescan's power-on.
            last = control.last
            if last is not None and last.outcome in ("failed", "refused"):
                self._publish(port, PortState.ATTENTION, lot=lot.name, reason=last.reason)
            else:
                self._publish(port, PortState.DONE, lot=lot.name)
            await self._idle(control, self.rescan_s)
            return
        self.outcomes[result.outcome] += 1
        self.results.append(result)
        gone = await self._hub_gone() if result.outcome == "failed" else None
        if gone is not None and result.reason != gone.reason:
            # The board lost its link because the whole hub went away: that is the reason, not the board.
            result = replace(result, reason=gone.reason)
            self.results[-1] = result
        pausing = result.outcome == "failed" and result.reason in PAUSING_REASONS
        again = control.last is not None and control.last.hw_serial == result.hw_serial
        control.paused_reruns = (control.paused_reruns + 1 if again else 1) if pausing else 0
        if pausing and result.reason is not None:
            if control.paused_reruns <= MAX_PAUSED_RERUNS:
                # Not the board's fault: it stays in its port (no skip, no release, no ATTENTION count)
                # and resumes with the same ID once the station can work again.
                control.last = result
                self._pause_for(result.reason, str(gone) if gone else f"a job on port {port} ended", lot)
                return
            # The cause's probe keeps saying it is gone, yet this board keeps failing for it: stop
            # re-running it (its reservation stays), fail it like any board so the operator sees it.
            log.error("board keeps failing for a station-wide reason", port=port, reason=result.reason)
            control.paused_reruns = 0
        finished = time.monotonic()
        self.first_job_at = min(self.first_job_at or finished, finished - result.duration_s)
        self.last_job_at = finished
        control.last = result
        control.skip_serial = result.hw_serial
        impostor = result.reason in GENUINENESS_REASONS and not self.impostors_need_attention
        if result.outcome in ("failed", "refused") and impostor:
            log.info("board refused as not genuine", port=port, reason=result.reason)
        elif result.outcome in ("failed", "refused"):
            control.failures_in_row += 1
            if control.failures_in_row >= self.attention_after:
                control.attention = (
                    f"{control.failures_in_row} boards failed in a row on port {port} "
                    f"(last: {result.reason}); check the fixture, then retry or acknowledge"
                )
                log.warning("port needs attention", port=port, reason=result.reason)
        else:
            control.failures_in_row = 0
        if result.outcome == "provisioned" and self._on_provisioned is not None:
            await self._on_provisioned(lot, result)  # one ledger write (the label job); never raises
        await self._release(control, lot)

    async def _release(self, control: PortControl, lot: LotContext | None) -> bool:
        """Hand the finished board to the operator; a hub that went away pauses intake (retried later)."""
        try:
            await self.hub.release(control.port)
        except HubError as exc:
            control.unreleased = True
            log.warning("could not release the board", port=control.port, error=str(exc))
            if isinstance(exc, HubDisconnectedError):
                self._pause_for(exc.reason, str(exc), lot)
            else:
                await self._idle(control, self.rescan_s)
            return False
        control.unreleased = False
        return True

    async def _idle(self, control: PortControl, timeout_s: float | None) -> None:
        control.wake.clear()
        if self.stopping:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await control.wake.wait()

    async def _progress_loop(self) -> None:
        while not self.stopping:
            await self.publish_progress()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROGRESS_INTERVAL_S):
                    await self._stop.wait()

    async def publish_progress(self) -> None:
        """Publish the counts of every lot that is not closed."""
        try:
            lots = await self.ledger.list_lots()
            for info in lots:
                if info.state == "closed":
                    continue
                p = await self.ledger.progress(info.name)
                self.telemetry.lot_progress(
                    LotProgressUpdate(
                        lot=info.name,
                        total=p.total,
                        available=p.available,
                        reserved=p.reserved,
                        provisioned=p.provisioned,
                        void=p.void,
                        at=datetime.now(UTC),
                    )
                )
        except FactorydError as exc:
            log.warning("lot progress unavailable", error=str(exc))

    def _publish(
        self, port: str, state: PortState, *, lot: str | None = None, reason: str | None = None
    ) -> None:
        self.telemetry.port_update(
            PortUpdate(
                port=port,
                state=state,
                step=None,
                lot=lot,
                device_id=None,
                attempt=0,
                since=datetime.now(UTC),
                reason=reason,
            )
        )
