"""Domain telemetry events and the sink interface (no I/O here).

The pipeline and the daemon describe what happens as frozen dataclasses and hand them to a
:class:`TelemetrySink`. Sinks (Prometheus metrics, the MQTT publisher) must return at once and never
raise: telemetry never slows or breaks provisioning (DESIGN rule 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal, Protocol, runtime_checkable

import structlog

__all__ = [
    "FanOut",
    "JobEvent",
    "JobEventKind",
    "LinkStats",
    "LotProgressUpdate",
    "NullSink",
    "PortState",
    "PortUpdate",
    "RecordingSink",
    "TelemetrySink",
]

_log = structlog.get_logger(__name__)


class PortState(StrEnum):
    """What a hub port is doing, as shown to operators and supervisors."""

    EMPTY = "empty"
    DISABLED = "disabled"
    POWERING = "powering"
    ENUMERATING = "enumerating"
    PROVISIONING = "provisioning"
    DONE = "done"
    FAILED = "failed"
    ATTENTION = "attention"
    IDLE = "idle"


JobEventKind = Literal["job_started", "step", "job_finished", "job_failed", "retry"]


def _require_aware(name: str, value: datetime) -> None:
    # A naive timestamp would be published as local time without an offset: ambiguous on the wire.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value.isoformat()}")


@dataclass(frozen=True)
class PortUpdate:
    """The new state of one hub port (published retained: the latest one wins)."""

    port: str
    state: PortState
    step: str | None
    lot: str | None
    device_id: str | None
    attempt: int
    since: datetime
    reason: str | None = None

    def __post_init__(self) -> None:
        if not self.port:
            raise ValueError("PortUpdate.port must not be empty")
        if self.attempt < 0:
            raise ValueError(f"PortUpdate.attempt must be >= 0, got {self.attempt}")
        _require_aware("PortUpdate.since", self.since)


@dataclass(frozen=True)
class JobEvent:
    """Something that happened in a provisioning job.

    ``job_finished`` and ``job_failed`` are terminal: one per board and job, after all retries;
    ``attempt`` is then the job-level attempt that ended it (1 = first pass).
    """

    kind: JobEventKind
    port: str
    lot: str | None
    job_id: int | None
    step: str | None
    outcome: str | None
    reason: str | None
    device_id: str | None
    attempt: int
    duration_s: float | None
    at: datetime

    def __post_init__(self) -> None:
        if self.kind not in ("job_started", "step", "job_finished", "job_failed", "retry"):
            raise ValueError(f"JobEvent.kind {self.kind!r} is not a known event kind")
        if not self.port:
            raise ValueError("JobEvent.port must not be empty")
        if self.attempt < 0:
            raise ValueError(f"JobEvent.attempt must be >= 0, got {self.attempt}")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s >= 0):
            raise ValueError(f"JobEvent.duration_s must be a finite number >= 0, got {self.duration_s}")
        _require_aware("JobEvent.at", self.at)


@dataclass(frozen=True)
class LotProgressUpdate:
    """Ledger counts of one lot (published retained)."""

    lot: str
    total: int
    available: int
    reserved: int
    provisioned: int
    void: int
    at: datetime

    def __post_init__(self) -> None:
        if not self.lot:
            raise ValueError("LotProgressUpdate.lot must not be empty")
        for name in ("total", "available", "reserved", "provisioned", "void"):
            if getattr(self, name) < 0:
                raise ValueError(f"LotProgressUpdate.{name} must be >= 0, got {getattr(self, name)}")
        _require_aware("LotProgressUpdate.at", self.at)


@dataclass(frozen=True)
class LinkStats:
    """The traffic of one board link, reported when it closes (every board profile)."""

    port: str
    frames_sent: int
    frames_received: int
    resends: int
    crc_errors: int
    at: datetime

    def __post_init__(self) -> None:
        if not self.port:
            raise ValueError("LinkStats.port must not be empty")
        for name in ("frames_sent", "frames_received", "resends", "crc_errors"):
            if getattr(self, name) < 0:
                raise ValueError(f"LinkStats.{name} must be >= 0, got {getattr(self, name)}")
        _require_aware("LinkStats.at", self.at)


@runtime_checkable
class TelemetrySink(Protocol):
    """Receives telemetry. Every method MUST return at once (O(1)) and MUST NOT raise."""

    def port_update(self, update: PortUpdate) -> None:
        """Record the new state of a port."""

    def job_event(self, event: JobEvent) -> None:
        """Record a job event."""

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Record the ledger counts of a lot."""

    def link_stats(self, stats: LinkStats) -> None:
        """Record the traffic of a closed board link."""


class FanOut(TelemetrySink):
    """Hands every call to each sink in turn; one failing sink never stops the others."""

    def __init__(self, sinks: Sequence[TelemetrySink]) -> None:
        self._sinks = tuple(sinks)

    def port_update(self, update: PortUpdate) -> None:
        """Forward a port update to every sink."""
        for sink in self._sinks:
            try:
                sink.port_update(update)
            except Exception:
                # The contract says sinks never raise; if one does, provisioning still goes on.
                _log.exception("telemetry_sink_failed", sink=type(sink).__name__, method="port_update")

    def job_event(self, event: JobEvent) -> None:
        """Forward a job event to every sink."""
        for sink in self._sinks:
            try:
                sink.job_event(event)
            except Exception:
                _log.exception("telemetry_sink_failed", sink=type(sink).__name__, method="job_event")

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Forward a lot progress update to every sink."""
        for sink in self._sinks:
            try:
                sink.lot_progress(update)
            except Exception:
                _log.exception("telemetry_sink_failed", sink=type(sink).__name__, method="lot_progress")

    def link_stats(self, stats: LinkStats) -> None:
        """Forward link statistics to every sink."""
        for sink in self._sinks:
            try:
                sink.link_stats(stats)
            except Exception:
                _log.exception("telemetry_sink_failed", sink=type(sink).__name__, method="link_stats")


class NullSink(TelemetrySink):
    """Discards everything (telemetry switched off)."""

    def port_update(self, update: PortUpdate) -> None:
        """Discard."""

    def job_event(self, event: JobEvent) -> None:
        """Discard."""

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Discard."""

    def link_stats(self, stats: LinkStats) -> None:
        """Discard."""


@dataclass
class RecordingSink(TelemetrySink):
    """Keeps every call in lists, for tests of the code that emits telemetry."""

    ports: list[PortUpdate] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)
    lots: list[LotProgressUpdate] = field(default_factory=list)
    links: list[LinkStats] = field(default_factory=list)

    def port_update(self, update: PortUpdate) -> None:
        """Keep the update."""
        self.ports.append(update)

    def job_event(self, event: JobEvent) -> None:
        """Keep the event."""
        self.events.append(event)

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Keep the update."""
        self.lots.append(update)

    def link_stats(self, stats: LinkStats) -> None:
        """Keep the statistics."""
        self.links.append(stats)
