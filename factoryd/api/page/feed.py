"""The station page's live feed: typed telemetry in, typed views out, JSON only on the SSE wire.

``GET /station/events`` subscribes to :class:`LiveState` (typed :class:`PortUpdate`,
:class:`JobEvent` and :class:`LotProgressUpdate` messages after a :class:`LiveSnapshot`) and
:class:`StationFeed` turns them into render-ready :class:`SlotView`, :class:`LotView` and
:class:`EventView` objects: one snapshot first, then only what changed, a keepalive comment every
15 s, and the stream ends when the station stops so the daemon never waits on an open browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, assert_never

import structlog
from fastapi import Request

from factoryd.api.context import ApiContext
from factoryd.api.page.labels import grid_shape, slot_order, step_progress, step_text
from factoryd.api.page.sessions import cookie_session
from factoryd.errors import FactorydError
from factoryd.ledger import LotState
from factoryd.ledger.model import LotInfo, LotProgress
from factoryd.telemetry.events import JobEvent, JobEventKind, LotProgressUpdate, PortState, PortUpdate
from factoryd.telemetry.figures import JobCounts
from factoryd.telemetry.live import LiveMessage, LiveSnapshot
from factoryd.telemetry.reasons import reason_text

log = structlog.get_logger(__name__)

# Comment lines keep proxies and the browser from timing the stream out (the brief: ~15 s).
KEEPALIVE_S = 15.0
# How soon a stream notices the station stopping, so shutdown never waits for a browser.
STOP_POLL_S = 0.5
# EventSource reconnect delay the stream asks for.
SSE_RETRY_MS = 2000
# Lot states are re-read from the ledger at most this often per stream, so a burst of finished
# boards costs one query; the scheduler publishes progress every 2 s anyway.
LOT_STATE_CACHE_S = 0.5
# Events shown in the "last events" list.
EVENTS_SHOWN = 15

_STATE_TITLE = {
    "empty": "Empty",
    "disabled": "Disabled",
    "powering": "Powering",
    "enumerating": "USB…",
    "provisioning": "Working",
    "done": "Done",
    "failed": "Failed",
    "attention": "Attention",
    "idle": "Idle",
    "unknown": "—",
}
_STATE_DETAIL = {
    "empty": "Insert a board.",
    "disabled": "Switched off by an operator.",
    "powering": "Switching the port on.",
    "enumerating": "Waiting for the board on USB.",
    "idle": "No active lot.",
    "unknown": "Waiting for the station.",
    "done": "Provisioned. Take the board out.",
}
# Live states during which a slot keeps showing its last board's result (see _Result).
_RESTING = frozenset(
    {PortState.POWERING, PortState.ENUMERATING, PortState.DONE, PortState.ATTENTION, PortState.EMPTY}
)

# Views (what the browser gets, field for field) ----------------------------------------------------

EventTone = Literal["info", "ok", "warn", "bad"]


@dataclass(frozen=True)
class SlotView:
    """What one slot tile shows. ``state`` is a PortState value, "attention"/"failed" or "unknown"."""

    port: str
    label: str
    enabled: bool
    busy: bool
    device_id: str | None
    attempt: int
    step: str | None  # the step string as the pipeline sent it, while provisioning
    step_index: int | None  # 1-based place in the lot profile's step sequence
    step_total: int | None
    state: str
    title: str
    detail: str


@dataclass(frozen=True)
class EventView:
    """One line of the "last events" list."""

    at: datetime
    port: str
    label: str
    text: str
    tone: EventTone


@dataclass(frozen=True)
class LotView:
    """The active (or paused) lot with its counts and the station's throughput."""

    name: str
    customer: str
    state: LotState
    target: int | None
    total: int
    done: int
    remaining: int
    void: int
    failed: int | None  # None without a station in this process
    units_per_hour: float


@dataclass(frozen=True)
class LotUnavailable:
    """The lot panel when the ledger cannot be read (``name`` stays null for the page)."""

    name: None
    error: str


@dataclass(frozen=True)
class SnapshotView:
    """Everything the page needs to draw itself from scratch."""

    station: str
    line: str | None
    rows: int
    columns: int
    slots: tuple[SlotView, ...]
    lot: LotView | LotUnavailable | None
    events: tuple[EventView, ...]


@dataclass(frozen=True)
class LogoutView:
    """Tells the page its session ended (no fields)."""


View = SnapshotView | SlotView | LotView | LotUnavailable | EventView | LogoutView
# One server-sent event to send: its name and its data (None is sent as JSON null: no lot).
Outgoing = tuple[str, View | None]


def _wire_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} has no JSON form on the station page")


def view_json(view: View | None) -> str:
    """A view as the compact JSON the page's script reads."""
    data = dataclasses.asdict(view) if view is not None else None
    return json.dumps(data, separators=(",", ":"), default=_wire_default)


def sse(event: str, view: View | None) -> str:
    """One server-sent event (JSON on a single data line)."""
    return f"event: {event}\ndata: {view_json(view)}\n\n"


# The feed ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    """A slot's resting state, shown until the next board's job starts.

    After a board the port loop keeps powering the port to look for the next one: an empty slot
    or a finished board left in it must not flicker through "powering" on every rescan.
    """

    state: Literal["done", "failed", "empty"]
    reason: str | None = None
    device_id: str | None = None


class StationFeed:
    """Turns LiveState messages into what the page renders; one per event stream."""

    def __init__(self, ctx: ApiContext) -> None:
        """A feed over ``ctx``'s live state and station."""
        self.ctx = ctx
        self.ports: dict[str, PortUpdate] = {}
        self.results: dict[str, _Result] = {}
        self.lots: dict[str, LotProgress | LotProgressUpdate] = {}
        self.events: list[JobEvent] = []
        self._sent: dict[str, SlotView] = {}
        self._lot_infos: list[LotInfo] = []
        self._lots_read_at: float | None = None
        # Lot name -> its profile's protocol, for each slot's step sequence.
        self._protocols: dict[str, str] = {}

    # Layout -----------------------------------------------------------------------------------

    def port_names(self) -> list[str]:
        """Every port in fixture order (the station's, plus any only seen in updates)."""
        station = self.ctx.station
        hub = list(station.ports) if station is not None else []
        hub += sorted(p for p in self.ports if p not in set(hub))
        return slot_order(hub, self.ctx.settings.page)

    def label(self, port: str) -> str:
        """The label printed on the fixture for ``port`` (the port name when none is configured)."""
        return self.ctx.settings.page.slots.get(port, port)

    # Messages ---------------------------------------------------------------------------------

    async def apply(self, message: LiveMessage) -> list[Outgoing]:
        """The (SSE event name, view) pairs to send for one LiveState message."""
        if isinstance(message, LiveSnapshot):
            self._load_snapshot(message)
            snapshot = await self.snapshot()
            self._sent = {view.port: view for view in snapshot.slots}
            return [("snapshot", snapshot)]
        if isinstance(message, PortUpdate):
            if message.lot is not None and message.lot not in self._protocols:
                await self._learn_lots()  # a lot made after the snapshot: its profile sets the bar
            self._on_port(message)
            return self._changed(message.port)
        if isinstance(message, JobEvent):
            if message.kind == "step":
                return []  # steps reach the page through port updates
            self._on_event(message)
            self.events = [*self.events, message][-EVENTS_SHOWN:]
            sent: list[Outgoing] = [("event", self.event_view(message)), *self._changed(message.port)]
            if message.kind in ("job_finished", "job_failed"):
                # Counts move with every finished board, not only with the 2-second progress tick.
                sent.append(("lot", await self.lot_panel(fresh_counts=True)))
            return sent
        if isinstance(message, LotProgressUpdate):
            self.lots[message.lot] = message
            return [("lot", await self.lot_panel())]
        assert_never(message)

    def _changed(self, port: str) -> list[Outgoing]:
        """The slot's view if it differs from what this page last got (rescans change nothing)."""
        view = self.slot(port)
        if self._sent.get(port) == view:
            return []
        self._sent[port] = view
        return [("slot", view)]

    def _load_snapshot(self, snapshot: LiveSnapshot) -> None:
        self.ports = dict(snapshot.ports)
        self.lots = dict(snapshot.lots)
        self.results = {}
        for event in snapshot.events:
            self._on_event(event)
        for update in self.ports.values():
            self._on_port(update)
        self.events = [e for e in snapshot.events if e.kind != "step"][-EVENTS_SHOWN:]

    def _attention(self, port: str) -> str | None:
        station = self.ctx.station
        control = station.ports.get(port) if station is not None else None
        return control.attention if control is not None else None

    def _on_port(self, update: PortUpdate) -> None:
        port, state = update.port, update.state
        self.ports[port] = update
        if state is PortState.DONE:
            self.results[port] = _Result("done", device_id=update.device_id)
        elif state is PortState.ATTENTION and self._attention(port) is None:
            # The pipeline's own report of a failed board: keep the job_failed event's code if any.
            known = self.results.get(port)
            code = known.reason if known is not None and known.state == "failed" else update.reason
            self.results[port] = _Result("failed", reason=code, device_id=update.device_id)
        elif state is PortState.EMPTY:
            self.results[port] = _Result("empty")
        elif state in (PortState.DISABLED, PortState.IDLE):
            self.results.pop(port, None)

    def _on_event(self, event: JobEvent) -> None:
        if event.kind == "job_started":
            self.results.pop(event.port, None)
        elif event.kind == "job_failed":
            self.results[event.port] = _Result("failed", reason=event.reason, device_id=event.device_id)

    # Views ------------------------------------------------------------------------------------

    def slot(self, port: str) -> SlotView:
        """What one slot tile shows."""
        update = self.ports.get(port)
        station = self.ctx.station
        control = station.ports.get(port) if station is not None else None
        result = self.results.get(port)
        device_id = update.device_id if update is not None else None
        step: str | None = None
        progress: tuple[int, int] | None = None
        if control is not None and control.attention is not None:
            state = "attention"
            last = control.last.reason if control.last is not None else None
            if last is None and result is not None and result.state == "failed":
                last = result.reason
            if control.failures_in_row == 1:
                detail = f"The board failed: {reason_text(last)}"
            elif control.failures_in_row:
                detail = f"{control.failures_in_row} boards failed in a row. Last: {reason_text(last)}"
            else:
                detail = reason_text(control.attention)
            detail += " Check the fixture, then Retry or Acknowledge."
        elif result is not None and update is not None and update.state in _RESTING:
            # The resting state stays on show until the next board's job starts (a board left in
            # the slot, or an empty slot, is only looked at on each rescan).
            state = result.state
            detail = {
                "failed": reason_text(result.reason),
                "done": "Provisioned. Take the board out.",
            }.get(state, "Insert a board.")
            device_id = result.device_id
        elif update is not None and update.state is PortState.PROVISIONING:
            state = "provisioning"
            step = update.step
            detail = step_text(step)
            progress = step_progress(step, self._protocols.get(update.lot) if update.lot else None)
        elif update is not None and update.state is PortState.ATTENTION:
            # Not the station's attention (e.g. no lot can be opened): the page shows a failure.
            state, detail = "failed", reason_text(update.reason)
        elif update is not None and update.state is PortState.IDLE and update.reason:
            # Intake paused for the whole station (hub gone, clock wrong): the slot says why.
            state, detail = "idle", reason_text(update.reason)
        else:
            state = update.state.value if update is not None else "unknown"
            detail = _STATE_DETAIL.get(state, "")
        if progress is not None:
            title = f"Step {progress[0]} of {progress[1]}"
        else:
            title = _STATE_TITLE.get(state, state.title())
        return SlotView(
            port=port,
            label=self.label(port),
            enabled=control.enabled if control is not None else True,
            busy=control.busy if control is not None else False,
            device_id=device_id,
            attempt=update.attempt if update is not None else 0,
            step=step,
            step_index=progress[0] if progress is not None else None,
            step_total=progress[1] if progress is not None else None,
            state=state,
            title=title,
            detail=detail,
        )

    def event_view(self, event: JobEvent) -> EventView:
        """One line of the "last events" list."""
        kind: JobEventKind = event.kind
        tone: EventTone
        if kind == "job_started":
            text, tone = "Started a board", "info"
        elif kind == "job_finished":
            verb = "Re-checked" if event.outcome == "rechecked" else "Provisioned"
            took = f" in {event.duration_s:.1f} s" if event.duration_s is not None else ""
            text, tone = f"{verb} {event.device_id or 'a board'}{took}", "ok"
        elif kind == "job_failed":
            verb = "Refused" if event.outcome == "refused" else "Failed"
            text, tone = f"{verb}: {reason_text(event.reason)}", "bad"
        elif kind == "retry":
            text, tone = f"Retrying ({event.reason or 'unknown'})", "warn"
        else:
            text, tone = str(kind), "info"
        return EventView(at=event.at, port=event.port, label=self.label(event.port), text=text, tone=tone)

    async def _lot_infos_now(self) -> list[LotInfo]:
        now = time.monotonic()
        if self._lots_read_at is None or now - self._lots_read_at >= LOT_STATE_CACHE_S:
            self._lot_infos = await self.ctx.ledger.list_lots()
            self._lots_read_at = now
            self._protocols = {i.name: i.profile.protocol for i in self._lot_infos}
        return self._lot_infos

    async def _learn_lots(self) -> None:
        """Re-read the lot list (at most every LOT_STATE_CACHE_S); a failure only costs the bar."""
        try:
            await self._lot_infos_now()
        except FactorydError as exc:
            log.warning("station page cannot read lots", error=str(exc))

    async def lot_panel(self, *, fresh_counts: bool = False) -> LotView | LotUnavailable | None:
        """The active (or paused) lot with its counts and the station's throughput."""
        try:
            infos = await self._lot_infos_now()
            wanted = self.ctx.settings.jobs.lot
            candidates = [i for i in infos if i.state in (LotState.ACTIVE, LotState.PAUSED)]
            candidates.sort(key=lambda i: (i.name != wanted, i.state is not LotState.ACTIVE, i.name))
            if not candidates:
                return None
            info = candidates[0]
            if fresh_counts or info.name not in self.lots:
                self.lots[info.name] = await self.ctx.ledger.progress(info.name)
        except FactorydError as exc:
            log.warning("station page cannot read lots", error=str(exc))
            return LotUnavailable(None, "Lot information is unavailable (database).")
        counts = self.lots[info.name]
        station = self.ctx.station
        failed = JobCounts.from_outcomes(station.outcomes).failed if station else None
        rate = self.ctx.live.rate(datetime.now(UTC), station.started_at if station else None)
        return LotView(
            name=info.name,
            customer=info.customer,
            state=info.state,
            target=info.target_quantity,
            total=counts.total,
            done=counts.provisioned,
            remaining=counts.total - counts.provisioned - counts.void,
            void=counts.void,
            failed=failed,
            units_per_hour=round(rate.per_hour, 1),
        )

    async def snapshot(self) -> SnapshotView:
        """Everything the page needs to draw itself from scratch."""
        lot = await self.lot_panel()  # first: it reads the lots whose profiles scale the slots' bars
        names = self.port_names()
        rows, columns = grid_shape(len(names), self.ctx.settings.page.rows, self.ctx.settings.page.columns)
        return SnapshotView(
            station=self.ctx.settings.station.name,
            line=self.ctx.settings.station.line,
            rows=rows,
            columns=columns,
            slots=tuple(self.slot(p) for p in names),
            lot=lot,
            events=tuple(self.event_view(e) for e in self.events),
        )


# The stream -------------------------------------------------------------------------------------------


def _stopping(ctx: ApiContext) -> bool:
    return ctx.station is not None and ctx.station.stopping


async def _next(updates: AsyncIterator[LiveMessage]) -> LiveMessage:
    return await anext(updates)


async def event_stream(request: Request, ctx: ApiContext) -> AsyncIterator[str]:
    """The page's SSE stream: a snapshot, then views of every change, keepalives, end on stop."""
    feed = StationFeed(ctx)
    yield f"retry: {SSE_RETRY_MS}\n\n"
    async with ctx.live.subscribe() as updates:
        pending: asyncio.Task[LiveMessage] | None = None
        quiet_since = checked_at = time.monotonic()
        try:
            while not _stopping(ctx):
                if time.monotonic() - checked_at >= KEEPALIVE_S:
                    # A revoked token or an expired session ends the stream, busy or not.
                    if "authorization" not in request.headers and await cookie_session(request) is None:
                        yield sse("logout", LogoutView())
                        return
                    checked_at = time.monotonic()
                if pending is None:
                    pending = asyncio.create_task(_next(updates), name="station-page-next")
                done, _ = await asyncio.wait({pending}, timeout=STOP_POLL_S)
                if pending in done:
                    message, pending = pending.result(), None
                    for name, view in await feed.apply(message):
                        yield sse(name, view)
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
            closer = getattr(updates, "aclose", None)
            if closer is not None:
                await closer()
