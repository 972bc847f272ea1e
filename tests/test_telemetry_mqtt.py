"""MQTT publisher against real throwaway mosquitto brokers (fixtures from tests/helpers/mqtt_broker.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import factoryd
from factoryd.errors import ConfigError
from factoryd.telemetry import (
    JobEvent,
    LotProgressUpdate,
    Metrics,
    MqttPublisher,
    MqttSettings,
    PortState,
    PortUpdate,
)
from factoryd.telemetry import mqtt as mqtt_module
from factoryd.telemetry.payloads import load_schema
from tests.helpers.mqtt_broker import BrokerTls, MosquittoBroker, MqttRecorder, TcpGate, free_port

pytestmark = pytest.mark.mqtt

BrokerFactory = Callable[..., MosquittoBroker]
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
PREFIX = "factory/l1/s1"

SCHEMA_BY_SUFFIX = {
    "/status": "status",
    "/state": "port_state",
    "/events": "event",
    "/progress": "lot_progress",
}


def settings(host: str, broker_port: int, **overrides: Any) -> MqttSettings:
    """Settings with fast reconnects for tests."""
    values: dict[str, Any] = {
        "host": host,
        "port": broker_port,
        "line": "l1",
        "station": "s1",
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "keepalive_s": 5,
    }
    values.update(overrides)
    return MqttSettings(**values)


def port_update(port: str, state: PortState, attempt: int = 1, **kw: Any) -> PortUpdate:
    """A port update with defaults."""
    return PortUpdate(
        port=port,
        state=state,
        step=kw.get("step"),
        lot=kw.get("lot", "LOT-A"),
        device_id=kw.get("device_id"),
        attempt=attempt,
        since=T0,
        reason=kw.get("reason"),
    )


def job_event(i: int, kind: str = "step") -> JobEvent:
    """A numbered job event (job_id carries the sequence number)."""
    return JobEvent(
        kind=kind,  # type: ignore[arg-type]
        port="1",
        lot="LOT-A",
        job_id=i,
        step="genkey",
        outcome="ok",
        reason=None,
        device_id="DEV-0001",
        attempt=1,
        duration_s=0.5,
        at=T0 + timedelta(seconds=i),
    )


def lot_update(available: int, total: int = 100_000) -> LotProgressUpdate:
    """Lot counts with defaults."""
    return LotProgressUpdate(
        lot="LOT-A",
        total=total,
        available=available,
        reserved=1,
        provisioned=total - available - 1,
        void=0,
        at=T0,
    )


VALIDATORS = {
    name: jsonschema.Draft202012Validator(
        load_schema(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    for name in SCHEMA_BY_SUFFIX.values()
}


def assert_valid(recorder: MqttRecorder) -> None:
    """Every received payload validates against the schema of its topic."""
    assert recorder.messages
    for message in recorder.messages:
        topic = message.topic.value
        name = next(v for k, v in SCHEMA_BY_SUFFIX.items() if topic.endswith(k))
        payload = message.payload
        assert isinstance(payload, bytes | bytearray)
        VALIDATORS[name].validate(json.loads(payload))


async def test_publishes_every_topic_with_valid_payloads(mqtt_broker: MosquittoBroker) -> None:
    metrics = Metrics(station="s1", line="l1", version="9.9.9")
    async with MqttRecorder(mqtt_broker) as rec:
        async with MqttPublisher(settings(mqtt_broker.host, mqtt_broker.port), metrics=metrics) as pub:
            assert await pub.wait_connected(5)
            pub.port_update(port_update("3", PortState.PROVISIONING, step="genkey", device_id="DEV-1"))
            pub.job_event(job_event(1, "job_started"))
            pub.job_event(job_event(2, "step"))
            pub.lot_progress(lot_update(42))
            assert await pub.wait_idle(5)
            await rec.wait_for(lambda: len(rec.on("/events")) == 2 and rec.latest("/progress") is not None)
            assert metrics.registry.get_sample_value("factoryd_mqtt_connected") == 1
        await rec.wait_for(lambda: (rec.latest("/status") or {}).get("state") == "offline")

    assert_valid(rec)
    topics = {m.topic.value for m in rec.messages}
    assert topics == {
        f"{PREFIX}/status",
        f"{PREFIX}/ports/3/state",
        f"{PREFIX}/events",
        f"{PREFIX}/lots/LOT-A/progress",
    }
    assert [s["state"] for s in rec.on("/status")] == ["online", "offline"]
    assert rec.on("/status")[0]["version"] == factoryd.__version__
    state = rec.latest("/ports/3/state")
    assert state == {
        "schema": 1,
        "port": "3",
        "state": "provisioning",
        "step": "genkey",
        "lot": "LOT-A",
        "device_id": "DEV-1",
        "attempt": 1,
        "since": "2025-03-01T08:00:00Z",
        "reason": None,
        "operator_text": None,
    }
    assert [e["kind"] for e in rec.on("/events")] == ["job_started", "step"]
    assert rec.latest("/progress") == {
        "schema": 1, "lot": "LOT-A", "total": 100_000, "available": 42, "reserved": 1,
        "provisioned": 99_957, "void": 0, "at": "2025-03-01T08:00:00Z",
    }  # fmt: skip
    retained_flags = {m.topic.value: m.retain for m in rec.messages}
    assert retained_flags[f"{PREFIX}/events"] is False
    assert metrics.registry.get_sample_value("factoryd_mqtt_connected") == 0


async def test_sink_never_blocks_while_broker_down_then_state_arrives(
    mqtt_broker_factory: BrokerFactory,
) -> None:
    broker = mqtt_broker_factory()  # not started: connection refused
    metrics = Metrics(station="s1", line="l1", version="1")
    queue_size = 100
    calls = 10_000
    async with MqttPublisher(
        settings(broker.host, broker.port, queue_size=queue_size), metrics=metrics
    ) as pub:
        await asyncio.sleep(0.1)  # let it fail a connect attempt or two
        assert not pub.connected
        started = time.perf_counter()
        for i in range(calls):
            pub.port_update(port_update(str(i % 8), PortState.PROVISIONING, attempt=i))
            pub.job_event(job_event(i))
            pub.lot_progress(lot_update(calls - i))
        elapsed_s = time.perf_counter() - started
        # 30k sink calls; each is a dict/deque operation, so even a slow CI box stays far below this.
        assert elapsed_s < 1.0, f"{3 * calls} sink calls took {elapsed_s:.3f} s with the broker down"
        assert pub.dropped == calls - queue_size
        assert pub.queue_depth == queue_size
        assert metrics.registry.get_sample_value("factoryd_mqtt_dropped_total") == calls - queue_size
        assert metrics.registry.get_sample_value("factoryd_mqtt_queue_depth") == queue_size

        await broker.start()
        assert await pub.wait_connected(5)
        assert await pub.wait_idle(5)
        assert pub.queue_depth == 0
        async with MqttRecorder(broker) as rec:
            # Retained: only the latest value per topic survives.
            await rec.wait_for(lambda: len({m.topic.value for m in rec.messages}) == 10)
    assert_valid(rec)
    states = {m.topic.value: m for m in rec.messages}
    for port in range(8):
        last_attempt = max(i for i in range(calls) if i % 8 == port)
        assert states[f"{PREFIX}/ports/{port}/state"].retain
        assert rec.latest(f"/ports/{port}/state")["attempt"] == last_attempt  # type: ignore[index]
    assert rec.latest("/progress")["available"] == 1  # type: ignore[index]
    assert rec.latest("/status")["state"] == "online"  # type: ignore[index]


async def test_queue_overflow_keeps_newest_events_in_order(mqtt_broker: MosquittoBroker) -> None:
    async with (
        TcpGate(mqtt_broker.host, mqtt_broker.port) as gate,
        MqttRecorder(mqtt_broker) as rec,
        MqttPublisher(settings(gate.host, gate.port, queue_size=5)) as pub,
    ):
        for i in range(12):
            pub.job_event(job_event(i))
        assert pub.dropped == 7
        await gate.open()  # the recorder is subscribed already, so no event can slip past it
        assert await pub.wait_idle(5)
        await rec.wait_for(lambda: len(rec.on("/events")) == 5)
    assert [e["job_id"] for e in rec.on("/events")] == [7, 8, 9, 10, 11]


async def test_hung_broker_never_blocks_the_sink_and_recovers(
    mqtt_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short protocol timeouts so the hang is detected within the test's time budget.
    monkeypatch.setattr(mqtt_module, "PUBLISH_TIMEOUT_S", 0.3)
    monkeypatch.setattr(mqtt_module, "CONNECT_TIMEOUT_S", 0.3)
    async with (
        TcpGate(mqtt_broker.host, mqtt_broker.port) as gate,
        MqttRecorder(mqtt_broker) as rec,
    ):
        await gate.open()
        async with MqttPublisher(settings(gate.host, gate.port)) as pub:
            assert await pub.wait_connected(5)
            gate.stall()
            pub.job_event(job_event(0))  # its PUBACK never comes back
            started = time.perf_counter()
            for i in range(1, 1001):
                pub.port_update(port_update("1", PortState.PROVISIONING, attempt=i))
                pub.job_event(job_event(i))
            assert time.perf_counter() - started < 0.5
            async with asyncio.timeout(5):
                while pub.connected:
                    await asyncio.sleep(0.01)
            assert pub.last_error is not None
            await gate.cut()
            gate.resume()
            assert await pub.wait_idle(5)
            await rec.wait_for(lambda: any(e["job_id"] == 1000 for e in rec.on("/events")))
            await rec.wait_for(lambda: (rec.latest("/ports/1/state") or {}).get("attempt") == 1000)
    assert pub.dropped == 1  # queue_size 1000: 1001 events queued while hung, the oldest one dropped
    assert_valid(rec)


async def test_broker_restart_reconnects_and_republishes(mqtt_broker_factory: BrokerFactory) -> None:
    broker = mqtt_broker_factory()
    await broker.start()
    async with MqttPublisher(settings(broker.host, broker.port)) as pub:
        assert await pub.wait_connected(5)
        pub.port_update(port_update("1", PortState.PROVISIONING))
        pub.port_update(port_update("2", PortState.DONE))
        assert await pub.wait_idle(5)

        await broker.stop()  # terminate the mosquitto process; retained state dies with it
        async with asyncio.timeout(5):
            while pub.connected:
                await asyncio.sleep(0.01)
        pub.port_update(port_update("1", PortState.FAILED, reason="csr_rejected"))  # while down
        pub.job_event(job_event(1, "job_failed"))

        await broker.start()  # same port
        assert await pub.wait_connected(5)
        assert await pub.wait_idle(5)
        assert pub.connections == 2
        async with MqttRecorder(broker) as rec:
            await rec.wait_for(lambda: len({m.topic.value for m in rec.messages}) == 3)
    assert rec.latest("/status")["state"] == "online"  # type: ignore[index]
    assert rec.latest("/ports/1/state")["state"] == "failed"  # type: ignore[index]
    assert rec.latest("/ports/1/state")["reason"] == "csr_rejected"  # type: ignore[index]
    assert "certificate request was wrong" in rec.latest("/ports/1/state")["operator_text"]  # type: ignore[index]
    assert rec.latest("/ports/2/state")["state"] == "done"  # type: ignore[index]
    assert_valid(rec)


async def test_lost_connection_publishes_last_will_then_online_again(mqtt_broker: MosquittoBroker) -> None:
    async with TcpGate(mqtt_broker.host, mqtt_broker.port) as gate, MqttRecorder(mqtt_broker) as rec:
        await gate.open()
        async with MqttPublisher(settings(gate.host, gate.port)) as pub:
            assert await pub.wait_connected(5)
            await rec.wait_for(lambda: [s["state"] for s in rec.on("/status")] == ["online"])
            await gate.cut()  # no DISCONNECT reaches the broker: it must publish the will
            await rec.wait_for(lambda: len(rec.on("/status")) >= 3)  # will, then online again
            assert pub.connections == 2
    assert [s["state"] for s in rec.on("/status")] == ["online", "offline", "online", "offline"]
    assert_valid(rec)


async def test_password_authentication(mqtt_broker_factory: BrokerFactory) -> None:
    broker = mqtt_broker_factory(users={"station": "s3cret", "reader": "r3ad"})
    await broker.start()
    good = settings(broker.host, broker.port, username="station", password="s3cret")
    assert "s3cret" not in repr(good)
    async with MqttPublisher(good) as pub:
        assert await pub.wait_connected(5)
        pub.port_update(port_update("1", PortState.IDLE))
        assert await pub.wait_idle(5)
    async with MqttRecorder(broker, username="reader", password="r3ad") as rec:
        await rec.wait_for(lambda: rec.latest("/ports/1/state") is not None)

    bad = settings(broker.host, broker.port, username="station", password="wrong", station="s2")
    async with MqttPublisher(bad) as pub:
        assert not await pub.wait_connected(0.5)
        pub.port_update(port_update("1", PortState.IDLE))  # still accepted, still instant
        assert pub.last_error is not None
        assert "MqttConnectError" in pub.last_error or "authori" in pub.last_error.lower()


def _ca_and_certs(tmp: Path) -> tuple[BrokerTls, Path, Path]:
    """A throwaway CA, a server cert for 127.0.0.1 and a client cert; returns broker TLS and client files."""
    now = datetime.now(UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
        issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, server: bool = False,
    ) -> x509.Certificate:  # fmt: skip
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test broker CA", ca_key, None, ca_key, ca=True)
    files = {}
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(f"{name}.test", key, ca, ca_key, ca=False, server=server)
        (tmp / f"{name}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        write_key(key, tmp / f"{name}.key")
        files[name] = (tmp / f"{name}.pem", tmp / f"{name}.key")
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls = BrokerTls(tmp / "ca.pem", *files["server"], require_client_cert=True)
    return tls, *files["client"]


async def test_tls_with_client_certificate(mqtt_broker_factory: BrokerFactory, tmp_path: Path) -> None:
    tls, client_cert, client_key = _ca_and_certs(tmp_path)
    broker = mqtt_broker_factory(tls=tls)
    await broker.start()
    secure = settings(
        broker.host, broker.port, tls=True, ca_file=tls.ca_file, cert_file=client_cert, key_file=client_key
    )
    async with MqttPublisher(secure) as pub:
        assert await pub.wait_connected(5)
        pub.lot_progress(lot_update(7))
        assert await pub.wait_idle(5)
    recorder_tls = secure.ssl_context()
    async with MqttRecorder(broker, tls_context=recorder_tls) as rec:
        await rec.wait_for(lambda: rec.latest("/progress") is not None)
    assert rec.latest("/progress")["available"] == 7  # type: ignore[index]

    no_client_cert = settings(broker.host, broker.port, tls=True, ca_file=tls.ca_file, station="s9")
    async with MqttPublisher(no_client_cert) as pub:
        assert not await pub.wait_connected(0.5)
    plain = settings(broker.host, broker.port, station="s8")
    async with MqttPublisher(plain) as pub:
        assert not await pub.wait_connected(0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"password": "x"}, "password is set but username is not"),
        ({"ca_file": Path("/nonexistent/ca.pem")}, "tls is false"),
        ({"tls": True, "ca_file": Path("/nonexistent/ca.pem")}, "does not exist"),
        ({"tls": True, "key_file": Path("/etc/hostname")}, "key_file is set without cert_file"),
        ({"station": "a/b"}, "station 'a/b'"),
        ({"line": "l+"}, "line 'l+'"),
        ({"prefix_template": "factory/{site}/{station}"}, "only {line} and {station}"),
        ({"prefix_template": "factory/#/{station}"}, "without wildcards"),
        ({"queue_size": 0}, "queue_size"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect_min_s"),
        ({"port": 0}, "port 0"),
    ],
)
def test_settings_refuse_bad_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings("127.0.0.1", 1883, **overrides)


def test_tls_context_refuses_bad_files(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match="TLS files could not be loaded"):
        MqttPublisher(settings("127.0.0.1", free_port(), tls=True, ca_file=bogus))


async def test_exit_while_never_connected_is_prompt() -> None:
    started = time.perf_counter()
    async with MqttPublisher(settings("127.0.0.1", free_port())) as pub:
        pub.job_event(job_event(1))
        await asyncio.sleep(0.05)
    assert time.perf_counter() - started < 1.0
    assert not pub.connected
    assert pub.queue_depth == 1  # kept, not silently lost, while nothing could be sent
