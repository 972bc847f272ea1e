"""In-memory live view of the station for the HTTP API and the operator's page.

Keeps the latest state of every port, the latest counts of every lot and the last events, and
fans every change out to subscribers (server-sent events) through bounded queues: a slow browser
loses old updates (and gets a fresh snapshot), it never slows the line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from factoryd.telemetry.events import JobEvent, LinkStats, LotProgressUpdate, PortUpdate, TelemetrySink
from factoryd.telemetry.figures import RATE_WINDOW_S, Rate, provisioned_rate

# Events kept for the page's "last events" list.
EVENT_HISTORY = 50
# Updates buffered per subscriber before it is marked as lagging and resynchronised.
SUBSCRIBER_QUEUE = 256


@dataclass(frozen=True)
class LiveSnapshot:
    """Everything a fresh subscriber needs: latest port states and lot counts, recent events."""

    ports: Mapping[str, PortUpdate]
    lots: Mapping[str, LotProgressUpdate]
    events: tuple[JobEvent, ...]


# What a subscription yields: a snapshot first (and after lagging), then each change as it happens.
LiveMessage = LiveSnapshot | PortUpdate | JobEvent | LotProgressUpdate


class _Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[LiveMessage] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.lagging = False


class LiveState(TelemetrySink):
    """Latest state per port and lot, recent events, and subscriptions."""

    def __init__(self) -> None:
        self.ports: dict[str, PortUpdate] = {}
        self.lots: dict[str, LotProgressUpdate] = {}
        self.events: deque[JobEvent] = deque(maxlen=EVENT_HISTORY)
        # End times of provisioned jobs within the rate window (older ones are dropped as new ones come).
        self.provisioned_at: deque[datetime] = deque()
        self.started_at = datetime.now(UTC)
        self._subscribers: set[_Subscriber] = set()

    def port_update(self, update: PortUpdate) -> None:
        """Remember and broadcast a port's state."""
        self.ports[update.port] = update
        if self._subscribers:  # frozen events are shared as they are: nothing to copy on the hot path
            self._broadcast(update)

    def job_event(self, event: JobEvent) -> None:
        """Remember and broadcast a job event (step events are broadcast, not kept in the history)."""
        if event.kind != "step":
            self.events.append(event)
        if event.kind == "job_finished" and event.outcome == "provisioned":
            if self.provisioned_at and event.at < self.provisioned_at[-1]:
                # The wall clock stepped back: the window would never drain; the rate starts afresh.
                self.provisioned_at.clear()
            self.provisioned_at.append(event.at)
            while (event.at - self.provisioned_at[0]).total_seconds() > RATE_WINDOW_S:
                self.provisioned_at.popleft()
        if self._subscribers:
            self._broadcast(event)

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Remember and broadcast a lot's counts."""
        self.lots[update.lot] = update
        if self._subscribers:
            self._broadcast(update)

    def link_stats(self, stats: LinkStats) -> None:
        """Not shown on the page (link counters are Prometheus figures)."""

    def rate(self, now: datetime, since: datetime | None = None) -> Rate:
        """The provisioning rate (factoryd.telemetry.figures) of a station started at ``since``."""
        return provisioned_rate(self.provisioned_at, now=now, since=since or self.started_at)

    def snapshot(self) -> LiveSnapshot:
        """Everything a fresh subscriber needs (copies: later updates do not change it)."""
        return LiveSnapshot(dict(sorted(self.ports.items())), dict(self.lots), tuple(self.events))

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[LiveMessage]]:
        """Yield an iterator of updates, starting with a snapshot; unsubscribes on exit."""
        subscriber = _Subscriber()
        self._subscribers.add(subscriber)
        try:
            yield self._updates(subscriber)
        finally:
            self._subscribers.discard(subscriber)

    async def _updates(self, subscriber: _Subscriber) -> AsyncIterator[LiveMessage]:
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

    def _broadcast(self, message: LiveMessage) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber.queue.put_nowait(message)
            except asyncio.QueueFull:
                subscriber.lagging = True
