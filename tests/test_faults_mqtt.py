"""Fault: an MQTT broker that accepts the connection and then never acknowledges (hostile or broken).

A fake broker on loopback speaks just enough MQTT 3.1.1: in ``no_connack`` mode it reads CONNECT and
never answers; in ``no_puback`` mode it sends CONNACK, then swallows every PUBLISH without a PUBACK
(and answers PINGREQ, so keepalive alone does not save the client); in ``pass`` mode it forwards to a
real mosquitto. Telemetry must never block provisioning (DESIGN rule 6), the event buffer stays
bounded, the supervisor-facing state (``MqttPublisher.healthy``, ``factoryd_mqtt_healthy``,
``last_error``) says the broker is unhealthy, and when the broker behaves again everything retained
reaches it with no restart. A whole line also provisions every board while the broker never acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest

from factoryd.telemetry.events import JobEvent, PortState, PortUpdate
from factoryd.telemetry.metrics import Metrics
from factoryd.telemetry.mqtt import MqttPublisher, MqttSettings
from tests.helpers.mqtt_broker import MosquittoBroker, MqttRecorder, free_port
from tests.helpers.station import make_line

pytestmark = [pytest.mark.faults, pytest.mark.mqtt]

LONG = os.environ.get("FAULTS_LONG") == "1"
EVENTS = 20_000 if LONG else 2_000
QUEUE_SIZE = 100
LINE_BOARDS = 60 if LONG else 12
# Fast timeouts for the publisher under test (the daemon's defaults are 10 s each).
TIMEOUT_S = 0.5
WAIT_S = 20.0

Mode = Literal["no_connack", "no_puback", "pass"]
CONNECT, CONNACK, PUBLISH, PINGREQ, PINGRESP = 1, 2, 3, 12, 13


class FakeBroker:
    """A loopback MQTT server that misbehaves on purpose (see the module docstring)."""

    def __init__(self, mode: Mode, upstream: MosquittoBroker | None = None) -> None:
        self.mode: Mode = mode
        self.upstream = upstream
        self.port = free_port()
        self.packets: Counter[int] = Counter()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    def drop_connections(self) -> None:
        """Abort every open connection (the client notices and reconnects, to the new mode)."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            kind, raw = await _read_packet(reader)
            self.packets[kind] += 1
            if self.mode == "pass" and self.upstream is not None:
                await self._forward(raw, reader, writer, self.upstream)
                return
            if kind != CONNECT or self.mode == "no_connack":
                await reader.read()  # say nothing until the client gives up
                return
            writer.write(bytes([CONNACK << 4, 2, 0, 0]))  # session present 0, return code 0: accepted
            while True:
                kind, _ = await _read_packet(reader)
                self.packets[kind] += 1
                if kind == PINGREQ:
                    writer.write(bytes([PINGRESP << 4, 0]))
                # PUBLISH (QoS 1) is swallowed: no PUBACK, ever.
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _forward(
        self,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: MosquittoBroker,
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(upstream.host, upstream.port)
        up_writer.write(first)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            up_writer.transport.abort()


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT control packet: its type and its raw bytes (fixed header included)."""
    header = await reader.readexactly(1)
    length, multiplier, length_bytes = 0, 1, b""
    while True:
        byte = await reader.readexactly(1)
        length_bytes += byte
        length += (byte[0] & 0x7F) * multiplier
        if not byte[0] & 0x80:
            break
        multiplier *= 128
        if multiplier > 128**3:
            raise ConnectionError("malformed remaining length")
    body = await reader.readexactly(length)
    return header[0] >> 4, header + length_bytes + body


def _settings(port: int) -> MqttSettings:
    return MqttSettings(
        host="127.0.0.1",
        port=port,
        line="faults",
        station="mqtt-station",
        queue_size=QUEUE_SIZE,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
        connect_timeout_s=TIMEOUT_S,
        publish_timeout_s=TIMEOUT_S,
    )


def _event(n: int) -> JobEvent:
    return JobEvent(
        kind="retry", port=str(n % 8 + 1), lot="LOT-A", job_id=n, step="keygen", outcome=None,
        reason="board_busy", device_id=None, attempt=1, duration_s=None, at=datetime.now(UTC),
    )  # fmt: skip


def _port(n: int) -> PortUpdate:
    return PortUpdate(
        port=str(n % 8 + 1), state=PortState.PROVISIONING, step="keygen", lot="LOT-A", device_id=None,
        attempt=1, since=datetime.now(UTC),
    )  # fmt: skip


async def _until(predicate: object, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)
    assert predicate(), what  # type: ignore[operator]


def _gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


@pytest.mark.timeout(120)
async def test_a_broker_that_never_acks_is_unhealthy_bounded_and_recovered_from(
    mqtt_broker: MosquittoBroker,
) -> None:
    metrics = Metrics(station="mqtt-station", line="faults", version="test")
    fake = FakeBroker("no_puback", upstream=mqtt_broker)
    async with fake, MqttPublisher(_settings(fake.port), metrics=metrics) as mqtt:
        await _until(lambda: fake.packets[PUBLISH] >= 1, "the publisher to connect and publish")
        # Thousands of events while the broker swallows them: every call returns at once (no await),
        # the queue stays at its bound, the oldest events are dropped and counted.
        for n in range(EVENTS):
            mqtt.job_event(_event(n))
            mqtt.port_update(_port(n))
            assert mqtt.queue_depth <= QUEUE_SIZE
        assert mqtt.dropped >= EVENTS - QUEUE_SIZE
        # Reconnects keep happening (publish timeouts), and none of them is called healthy.
        # (A connection is counted on accept, its CONNECT once read: wait for both.)
        await _until(
            lambda: fake.connections >= 3 and fake.packets[CONNECT] >= 3,
            "reconnects after unacknowledged publishes",
        )
        assert not mqtt.healthy
        assert _gauge(metrics, "factoryd_mqtt_healthy") == 0.0
        assert mqtt.last_error is not None
        assert "timed out" in mqtt.last_error
        assert mqtt.queue_depth <= QUEUE_SIZE

        # The broker behaves again: the publisher recovers by itself, everything retained arrives.
        async with MqttRecorder(mqtt_broker) as recorder:
            fake.mode = "pass"
            fake.drop_connections()
            await _until(lambda: mqtt.healthy, "the publisher to be healthy again")
            assert _gauge(metrics, "factoryd_mqtt_healthy") == 1.0
            assert await mqtt.wait_idle(WAIT_S)
            await recorder.wait_for(lambda: len(recorder.on("/state")) >= 8, WAIT_S)
            assert (recorder.latest("/status") or {}).get("state") == "online"
            events = recorder.on("/events")
            assert 1 <= len(events) <= QUEUE_SIZE
            assert events[-1]["job_id"] == EVENTS - 1  # the newest were kept, the oldest dropped
    assert _gauge(metrics, "factoryd_mqtt_connected") == 0.0


@pytest.mark.timeout(60)
async def test_a_broker_that_never_sends_connack_is_never_called_connected() -> None:
    metrics = Metrics(station="mqtt-station", line="faults", version="test")
    async with FakeBroker("no_connack") as fake, MqttPublisher(_settings(fake.port), metrics=metrics) as mqtt:
        for n in range(EVENTS):
            mqtt.job_event(_event(n))
        await _until(lambda: fake.connections >= 3, "connect attempts")
        assert not mqtt.connected
        assert not mqtt.healthy
        assert mqtt.queue_depth == QUEUE_SIZE
        assert mqtt.dropped == EVENTS - QUEUE_SIZE
        assert _gauge(metrics, "factoryd_mqtt_connected") == 0.0
        assert fake.packets[PUBLISH] == 0


@pytest.mark.timeout(180)
async def test_a_line_provisions_every_board_while_the_broker_never_acks(tmp_path: Path) -> None:
    line = await make_line(tmp_path, boards=LINE_BOARDS, ports=4, mqtt=True)
    async with FakeBroker("no_puback") as fake:
        settings = line.settings.model_copy(
            update={"mqtt": line.settings.mqtt.model_copy(update={"host": "127.0.0.1", "port": fake.port})}
        )
        hub = line.hub(4, supply=LINE_BOARDS)
        station = await line.run(hub, settings=settings, timeout_s=120)
        # Every board was provisioned; the broker saw the station connect and publish, and acked nothing.
        assert hub.exhausted
        assert station.outcomes["provisioned"] == LINE_BOARDS
        assert fake.packets[CONNECT] >= 1
        assert fake.packets[PUBLISH] >= 1
    with line.ledger() as ledger:
        assert ledger.progress("demo-lot").provisioned == LINE_BOARDS
        ledger.verify_audit()
