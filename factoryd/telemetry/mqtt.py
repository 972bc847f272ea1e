"""MQTT publisher (aiomqtt): station status, port states, job events and lot progress.

The sink methods never touch the network. Retained state (status, ``ports/{n}/state``,
``lots/{lot}/progress``) is kept as "latest value per topic" and republished in full on every
(re)connect; events go into a bounded queue that drops its oldest entry when full. One background
task connects with capped exponential backoff, republishes the retained state, then drains the queue.
So a broker that is down or slow can never slow provisioning (DESIGN rule 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

import aiomqtt
import structlog

from factoryd import __version__
from factoryd.errors import ConfigError
from factoryd.telemetry.events import JobEvent, LinkStats, LotProgressUpdate, PortUpdate, TelemetrySink
from factoryd.telemetry.metrics import Metrics
from factoryd.telemetry.payloads import (
    Topics,
    encode,
    job_event_payload,
    lot_progress_payload,
    port_state_payload,
    status_payload,
)

if TYPE_CHECKING:
    from factoryd.config import Settings

__all__ = ["MqttPublisher", "MqttSettings"]

_log = structlog.get_logger(__name__)

# Time for TCP connect + CONNACK, and for a QoS 1 PUBACK; past it the connection is treated as dead
# and rebuilt (a broker that stalls this long is as good as down for telemetry).
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
# On graceful exit: how long to keep draining the queue, then to wait for the "offline" PUBACK.
SHUTDOWN_FLUSH_TIMEOUT_S = 3.0
SHUTDOWN_PUBLISH_TIMEOUT_S = 2.0
# Upper bound for the whole graceful exit (flush + offline + DISCONNECT) before the task is cancelled.
SHUTDOWN_TIMEOUT_S = 6.0
QOS_AT_LEAST_ONCE = 1


@dataclass(frozen=True, kw_only=True)
class MqttSettings:
    """Where and how to publish telemetry; validated when built (:class:`ConfigError`)."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix_template: str = "factory/{line}/{station}"
    line: str
    station: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    queue_size: int = 1000
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # None: CONNECT_TIMEOUT_S / PUBLISH_TIMEOUT_S (read when used).
    connect_timeout_s: float | None = None
    publish_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("mqtt host must not be empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"mqtt port {self.port} is outside 1..65535")
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt password is set but username is not")
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ConfigError("mqtt ca_file/cert_file/key_file are set but tls is false")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("mqtt key_file is set without cert_file")
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"mqtt {name} {str(path)!r} does not exist or is not a file")
        if self.queue_size < 1:
            raise ConfigError(f"mqtt queue_size must be >= 1, got {self.queue_size}")
        if self.keepalive_s < 1:
            raise ConfigError(f"mqtt keepalive_s must be >= 1, got {self.keepalive_s}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError(
                f"mqtt reconnect delays must satisfy 0 < reconnect_min_s ({self.reconnect_min_s}) "
                f"<= reconnect_max_s ({self.reconnect_max_s})"
            )
        for name in ("connect_timeout_s", "publish_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"mqtt {name} must be > 0, got {value}")
        self.topics()  # validates line, station and the prefix template

    def topics(self) -> Topics:
        """The topic names of this station."""
        return Topics(self.prefix_template, line=self.line, station=self.station)

    @property
    def client_id(self) -> str:
        """The MQTT client identifier: stable per station so the broker replaces a stale session."""
        return f"factoryd-{self.line}-{self.station}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (server verified against ca_file or the system CAs), or None without TLS."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file is not None else None
                )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"mqtt TLS files could not be loaded: {exc}") from exc
        return context


def mqtt_settings(settings: Settings) -> MqttSettings:
    """The publisher's settings from a process's config (the station's or the signer's [mqtt])."""
    from factoryd.pki.passphrase import load_secret  # noqa: PLC0415 - only when MQTT has a user

    cfg, station = settings.mqtt, settings.station
    password = None
    if cfg.username:
        password = load_secret(cfg.password_credential, cfg.password_env, what="MQTT password").decode()
    return MqttSettings(
        host=cfg.host,
        port=cfg.port,
        line=station.line,
        station=station.name,
        username=cfg.username,
        password=password,
        tls=cfg.tls,
        ca_file=cfg.ca_file,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        queue_size=cfg.queue_size,
    )


_Retained = PortUpdate | LotProgressUpdate | bytes


class MqttPublisher(TelemetrySink):
    """Publishes telemetry to an MQTT broker without ever blocking the caller.

    Use as ``async with MqttPublisher(settings) as mqtt:``; the sink methods may be called before,
    during and after the connection exists, from the event loop's thread.
    """

    def __init__(self, settings: MqttSettings, *, metrics: Metrics | None = None, version: str = __version__):
        self._settings = settings
        self._topics = settings.topics()
        self._tls_context = settings.ssl_context()  # fail at startup, not in the background task
        self._metrics = metrics
        self._version = version
        self._retained: dict[str, _Retained] = {}
        self._dirty: dict[str, None] = {}  # retained topics not yet published on this connection
        self._events: deque[JobEvent] = deque()
        self._dropped = 0
        self._connected = False
        # True once the broker acknowledged a publish on this connection: a broker that completes
        # CONNECT and then never sends PUBACK is connected but not healthy.
        self._acked = False
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._idle_event = asyncio.Event()
        self._task_group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.connections = 0

    # -- state -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""
        return self._connected

    @property
    def healthy(self) -> bool:
        """True while connected and the broker acknowledges what is published (QoS 1 PUBACK)."""
        return self._connected and self._acked

    @property
    def dropped(self) -> int:
        """Events dropped because the queue was full."""
        return self._dropped

    @property
    def queue_depth(self) -> int:
        """Events waiting to be published (retained state is not counted: it is never dropped)."""
        return len(self._events)

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109 - the daemon contract
        """Wait until connected; False if that did not happen within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected_event.wait()
        except TimeoutError:
            return False
        return True

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 - mirrors wait_connected
        """Wait until connected with everything published; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while not (self._connected and self._idle_event.is_set()):
                    if self._connected:
                        await self._idle_event.wait()
                    else:
                        await self._connected_event.wait()
        except TimeoutError:
            return False
        return True

    # -- TelemetrySink (O(1), never raises, never awaits) --------------------------------------

    def port_update(self, update: PortUpdate) -> None:
        """Keep the port's latest state for publishing (retained)."""
        self._retain(self._topics.port_state(update.port), update)

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Keep the lot's latest counts for publishing (retained)."""
        self._retain(self._topics.lot_progress(update.lot), update)

    def link_stats(self, stats: LinkStats) -> None:
        """Not published: link counters reach supervisors as Prometheus metrics."""

    def job_event(self, event: JobEvent) -> None:
        """Queue an event; when the queue is full the oldest event is dropped and counted."""
        dropped = 0
        if len(self._events) >= self._settings.queue_size:
            self._events.popleft()
            dropped = 1
            self._dropped += 1
        self._events.append(event)
        self._idle_event.clear()
        self._wakeup.set()
        self._report(dropped)

    def _retain(self, topic: str, value: _Retained) -> None:
        self._retained[topic] = value
        self._dirty[topic] = None
        self._idle_event.clear()
        self._wakeup.set()

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        return encode(status_payload(state, version=self._version, at=datetime.now(UTC)))

    def _report(self, dropped: int = 0) -> None:
        if self._metrics is not None:
            self._metrics.mqtt_state(self._connected, len(self._events), dropped, healthy=self.healthy)

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("MqttPublisher is already running")
        self._stopping.clear()
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        self._task = self._task_group.create_task(self._run(), name="mqtt-publisher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, group = self._task, self._task_group
        if task is None or group is None:
            return
        self._stopping.set()
        self._wakeup.set()
        if not self._connected:
            task.cancel()  # nothing to say goodbye to; the broker already holds our last will
        else:
            _done, pending = await asyncio.wait({task}, timeout=SHUTDOWN_TIMEOUT_S)
            if pending:
                _log.warning("mqtt_shutdown_timeout", timeout_s=SHUTDOWN_TIMEOUT_S)
                task.cancel()
        try:
            # Only our own task lives in the group and it handles its errors: the caller's exception
            # (if any) propagates unwrapped because we do not hand it to the group.
            await group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            self._task = None
            self._set_connected(False)

    # -- background task -------------------------------------------------------------------------

    async def _run(self) -> None:
        s = self._settings
        attempt = 0
        while not self._stopping.is_set():
            connections_before = self.connections
            try:
                await self._session()
            except* aiomqtt.MqttError as group:
                self.last_error = _describe(group)
                _log.warning("mqtt_connection_lost", host=s.host, port=s.port, error=self.last_error)
            except* Exception as group:
                # A bug or an unexpected library error must not end telemetry for good: log, back off, retry.
                self.last_error = _describe(group)
                _log.error(
                    "mqtt_session_failed", host=s.host, port=s.port, error=self.last_error, exc_info=group
                )
            finally:
                self._set_connected(False)
            if self._stopping.is_set():
                return
            attempt = 0 if self.connections != connections_before else attempt + 1
            delay_s = min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(attempt, 32))
            # Equal jitter: stations restarting together do not hammer the broker in lockstep.
            delay_s = random.uniform(delay_s / 2, delay_s)  # noqa: S311 - not for security
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._stopping.wait()

    async def _session(self) -> None:
        s = self._settings
        will = aiomqtt.Will(self._topics.status, self._status("offline"), qos=QOS_AT_LEAST_ONCE, retain=True)
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=s.client_id,
            will=will,
            keepalive=s.keepalive_s,
            tls_context=self._tls_context,
            timeout=s.connect_timeout_s or CONNECT_TIMEOUT_S,
            clean_session=True,
        )
        try:
            await self._connected_session(client)
        finally:
            _close_socket(client)

    async def _connected_session(self, client: aiomqtt.Client) -> None:
        s = self._settings
        async with client:
            self.connections += 1
            # Status first, then every retained topic: the broker may have restarted without them.
            self._retained[self._topics.status] = self._status("online")
            self._dirty = dict.fromkeys([self._topics.status, *self._retained])
            self._idle_event.clear()
            self._set_connected(True)
            _log.info("mqtt_connected", host=s.host, port=s.port, tls=s.tls)
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(self._watch_disconnect(client))
                await self._drain(client)
                # Graceful exit: flush what we can, then say goodbye (a clean DISCONNECT sends no will).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SHUTDOWN_FLUSH_TIMEOUT_S):
                        await self._drain(client, finish=True)
                await client.publish(
                    self._topics.status,
                    self._status("offline"),
                    qos=QOS_AT_LEAST_ONCE,
                    retain=True,
                    timeout=SHUTDOWN_PUBLISH_TIMEOUT_S,
                )
                watcher.cancel()
            _log.info("mqtt_disconnected_gracefully", host=s.host, port=s.port)

    @staticmethod
    async def _watch_disconnect(client: aiomqtt.Client) -> None:
        # The message iterator raises MqttError as soon as the connection drops, even while idle.
        async for _ in client.messages:
            pass

    async def _drain(self, client: aiomqtt.Client, *, finish: bool = False) -> None:
        """Publish dirty retained topics, then queued events, until stopping.

        On stop it returns after the publish in flight; with ``finish`` it first empties everything.
        """
        while True:
            while self._dirty or self._events:
                if self._stopping.is_set() and not finish:
                    return
                if self._dirty:
                    await self._publish_retained(client, next(iter(self._dirty)))
                else:
                    await self._publish_event(client)
                self._report()
            self._idle_event.set()
            if self._stopping.is_set():
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _publish_retained(self, client: aiomqtt.Client, topic: str) -> None:
        del self._dirty[topic]
        value = self._retained[topic]
        if isinstance(value, PortUpdate):
            payload = encode(port_state_payload(value))
        elif isinstance(value, LotProgressUpdate):
            payload = encode(lot_progress_payload(value))
        else:
            payload = value
        try:
            await client.publish(
                topic,
                payload,
                qos=QOS_AT_LEAST_ONCE,
                retain=True,
                timeout=self._settings.publish_timeout_s or PUBLISH_TIMEOUT_S,
            )
            self._mark_acked()
        except BaseException:
            # Publish it again on the next connection unless a newer value is already waiting.
            self._dirty.setdefault(topic, None)
            raise

    async def _publish_event(self, client: aiomqtt.Client) -> None:
        event = self._events.popleft()
        try:
            await client.publish(
                self._topics.events,
                encode(job_event_payload(event)),
                qos=QOS_AT_LEAST_ONCE,
                retain=False,
                timeout=self._settings.publish_timeout_s or PUBLISH_TIMEOUT_S,
            )
            self._mark_acked()
        except BaseException:
            # At-least-once: put it back in front; if the queue filled up meanwhile it is the oldest.
            if len(self._events) >= self._settings.queue_size:
                self._dropped += 1
                self._report(1)
            else:
                self._events.appendleft(event)
            raise

    def _mark_acked(self) -> None:
        if not self._acked:
            # Only an acknowledged publish clears the error: a broker that completes CONNECT and then
            # never sends PUBACK keeps its "timed out" for the supervisor to see.
            self._acked = True
            self.last_error = None
            self._report()

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        self._acked = False
        if connected:
            self._connected_event.set()
        else:
            self._connected_event.clear()
        self._report()


def _close_socket(client: aiomqtt.Client) -> None:
    """Close the client's socket if a failed connect or a timed-out DISCONNECT left it open.

    aiomqtt leaves the paho socket (and its housekeeping task) open when CONNACK or the DISCONNECT
    acknowledgement times out; paho would only drop it after ``keepalive_s``. A hung broker must not
    pile up sockets, so close it here. Private API, hence guarded: a no-op if it ever goes away.
    """
    paho_client = getattr(client, "_client", None)
    sock_close = getattr(paho_client, "_sock_close", None)
    if callable(sock_close):
        with contextlib.suppress(Exception):
            sock_close()


def _describe(group: BaseExceptionGroup[BaseException]) -> str:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return f"{type(first).__name__}: {first}"
