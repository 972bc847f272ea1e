"""In-memory live view of the station for the HTTP API and the operator's page.

Keeps the latest state of every port, the latest counts of every lot and the last events, and
fans every change out to subscribers (server-sent events) through bounded queues: a slow browser
loses old updates (and gets a fresh snapshot), it never slows the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime
from enum import Enum
from typing import Any

from factoryd.telemetry.events import JobEvent, LotProgressUpdate, PortUpdate, TelemetrySink

# Events kept for the page's "last events" list.
EVENT_HISTORY = 50
# Updates buffered per subscriber before it is marked as lagging and resynchronised.
SUBSCRIBER_QUEUE = 256


def to_json(obj: Any) -> dict[str, Any]:
    """A flat dataclass event as a JSON-friendly dict (shallow: events hold only scalars)."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Enum):
            value = value.value
        data[f.name] = value
    return data


class _Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.lagging = False


class LiveState(TelemetrySink):
    """Latest state per port and lot, recent events, and subscriptions."""

    def __init__(self) -> None:
        self.ports: dict[str, PortUpdate] = {}
        self.lots: dict[str, LotProgressUpdate] = {}
        self.events: deque[JobEvent] = deque(maxlen=EVENT_HISTORY)
        self.finished: deque[datetime] = deque(maxlen=10_000)
        self._subscribers: set[_Subscriber] = set()

    def port_update(self, update: PortUpdate) -> None:
        """Remember and broadcast a port's state."""
        self.ports[update.port] = update
        if self._subscribers:  # serialise only when someone is watching: this is on the hot path
            self._broadcast({"type": "port", **to_json(update)})

    def job_event(self, event: JobEvent) -> None:
        """Remember and broadcast a job event (step events are broadcast, not kept in the history)."""
        if event.kind != "step":
            self.events.append(event)
        if event.kind == "job_finished":
            self.finished.append(event.at)
        if self._subscribers:
            self._broadcast({"type": "event", **to_json(event)})

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Remember and broadcast a lot's counts."""
        self.lots[update.lot] = update
        if self._subscribers:
            self._broadcast({"type": "lot", **to_json(update)})

    def units_per_hour(self, now: datetime, window_s: float = 600.0) -> float:
        """Boards finished per hour over the last window."""
        recent = [t for t in self.finished if (now - t).total_seconds() <= window_s]
        return len(recent) * 3600.0 / window_s

    def snapshot(self) -> dict[str, Any]:
        """Everything a fresh subscriber needs."""
        return {
            "type": "snapshot",
            "ports": {p: to_json(u) for p, u in sorted(self.ports.items())},
            "lots": {name: to_json(u) for name, u in self.lots.items()},
            "events": [to_json(e) for e in self.events],
        }

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Yield an iterator of updates, starting with a snapshot; unsubscribes on exit."""
        subscriber = _Subscriber()
        self._subscribers.add(subscriber)
        try:
            yield self._updates(subscriber)
        finally:
            self._subscribers.discard(subscriber)

    async def _updates(self, subscriber: _Subscriber) -> AsyncIterator[dict[str, Any]]:
        yield self.snapshot()
        while True:
            update = await subscriber.queue.get()
            if subscriber.lagging:
                # The queue overflowed: drop what is left and start over from a snapshot.
                while not subscriber.queue.empty():
                    subscriber.queue.get_nowait()
                subscriber.lagging = False
                yield self.snapshot()
                continue
            yield update

    def _broadcast(self, message: dict[str, Any]) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber.queue.put_nowait(message)
            except asyncio.QueueFull:
                subscriber.lagging = True
