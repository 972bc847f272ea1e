"""The station: one loop per hub port, all in one TaskGroup, with operator controls.

A port loop runs a job whenever a board is present and a lot is active. After a job it
releases the board to the operator and remembers its serial, so a board left in the port is
not provisioned twice; an operator's retry clears that memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from factoryd.errors import FactorydError
from factoryd.hub.base import Hub
from factoryd.jobs.lots import LotContext, active_lot
from factoryd.jobs.pipeline import JobResult, Pipeline
from factoryd.ledger import AsyncLedger
from factoryd.ledger.model import LotInfo
from factoryd.pki.attestation import GENUINENESS_REASONS
from factoryd.telemetry.events import LotProgressUpdate, PortState, PortUpdate, TelemetrySink

log = structlog.get_logger(__name__)
# How long the active lot is trusted before the ledger is asked again: a pause or close reaches
# every port within this time, and a busy line does not query the lot once per board.
LOT_RECHECK_S = 1.0
# How often lot counts are published (retained MQTT, Prometheus gauges).
PROGRESS_INTERVAL_S = 2.0


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

    def _control(self, port: str) -> PortControl:
        try:
            return self.ports[port]
        except KeyError:
            raise KeyError(f"no port {port!r} on {self.hub.name}") from None

    # Loops --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Switch every port off, then run all port loops and the progress publisher until stop()."""
        # HUBS.md: start from a known state; a port left powered by a crash is switched off first.
        for port in self.ports:
            await self.hub.power_off(port)
        async with asyncio.TaskGroup() as tg:
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
            try:
                lot = await self.lots.current()
            except FactorydError as exc:
                log.error("no lot available", reason=exc.reason, error=str(exc), port=port)
                self._publish(port, PortState.ATTENTION, reason=str(exc))
                await self._idle(control, self.rescan_s)
                continue
            if lot is None:
                self._publish(port, PortState.IDLE)
                await self._idle(control, self.rescan_s)
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
        await self.hub.release(port)

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
