"""Telemetry during a real station run: MQTT payloads against their schemas through a broker
outage, and /metrics counters against the ledger."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from factoryd.daemon import Daemon, DaemonHooks
from factoryd.jobs.scheduler import Station
from factoryd.sim.board import SimBoard, Timing
from factoryd.telemetry.payloads import load_schema
from tests.helpers.mqtt_broker import BrokerFactory, MqttRecorder
from tests.helpers.station import LOT, make_line

SCHEMA_BY_SUFFIX = {
    "/status": "status",
    "/state": "port_state",
    "/events": "event",
    "/progress": "lot_progress",
}


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series = line.rsplit(" ", 1)[0]
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.mqtt
async def test_mqtt_payloads_survive_a_broker_outage_and_metrics_match_the_ledger(
    tmp_path: Path, mqtt_broker_factory: BrokerFactory
) -> None:
    broker = mqtt_broker_factory()
    await broker.start()
    line = await make_line(tmp_path, boards=30, ports=4)
    settings = line.settings.model_copy(
        update={
            "mqtt": line.settings.mqtt.model_copy(update={"enabled": True, "port": broker.port}),
            "metrics": line.settings.metrics.model_copy(update={"enabled": True, "port": 0}),
        }
    )

    def slow_board() -> SimBoard:
        # Slow enough that the outage falls in the middle of the run.
        board = line.board()
        board.timing = Timing(keygen_s=0.02, enumerate_s=0.02)
        return board

    hub = line.hub(ports=4, supply=30, factory=slow_board)
    scraped: dict[str, str] = {}
    outage = {"down_at": -1, "up_at": -1}

    async def scenario(station: Station) -> None:
        while station.outcomes["provisioned"] < 8:
            await asyncio.sleep(0.02)
        await broker.kill()
        outage["down_at"] = station.outcomes["provisioned"]
        while station.outcomes["provisioned"] < 16:  # provisioning goes on without a broker
            await asyncio.sleep(0.02)
        await broker.restart()
        outage["up_at"] = station.outcomes["provisioned"]
        while not hub.exhausted or station.busy_ports:
            await asyncio.sleep(0.02)
        await station.publish_progress()
        async with httpx.AsyncClient() as client:
            scraped["text"] = (await client.get(f"http://127.0.0.1:{daemon.metrics_port}/metrics")).text

    hooks = DaemonHooks(
        hub=hub, passphrase=line.passphrase, on_ready=scenario, stop_when=lambda _s: bool(scraped)
    )
    daemon = Daemon(settings, hooks)
    station = await daemon.run()
    assert outage["down_at"] >= 8
    assert outage["up_at"] >= 16
    assert station.outcomes["provisioned"] == 30

    # After the broker came back, a fresh subscriber gets the retained state: every port and the lot.
    async with MqttRecorder(broker) as recorder:
        await recorder.wait_for(lambda: len({m.topic.value for m in recorder.messages}) >= 6, timeout_s=10)
    topics = {m.topic.value for m in recorder.messages}
    assert any(t.endswith(f"/lots/{LOT}/progress") for t in topics)
    assert sum(1 for t in topics if "/ports/" in t) == 4
    assert any(t.endswith("/status") for t in topics)
    for message in recorder.messages:
        suffix = next(s for s in SCHEMA_BY_SUFFIX if message.topic.value.endswith(s))
        payload = json.loads(bytes(message.payload))  # type: ignore[arg-type]
        jsonschema.validate(payload, load_schema(SCHEMA_BY_SUFFIX[suffix]))

    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
    text = scraped["text"]
    assert progress.provisioned == 30
    assert _sample(text, "factoryd_jobs_total", outcome="ok") == progress.provisioned
    assert _sample(text, "factoryd_lot_ids", lot=LOT, state="provisioned") == progress.provisioned
    assert _sample(text, "factoryd_lot_ids", lot=LOT, state="available") == progress.available
    assert _sample(text, "factoryd_frames_sent_total", port="1") > 0
