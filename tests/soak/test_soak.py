"""Soak: many boards, every fault kind, a broker that dies, a daemon killed with SIGKILL again and again.

CI runs a small size; set SOAK_PORTS=32 SOAK_DEVICES=2000 SOAK_KILLS=5 for the full run by hand.
Afterwards the exactly-once promises are checked against the boards themselves: 0 IDs on two
boards, 0 IDs lost, every provisioned board's certificate is the ledger's and matches its secure
element's key, the audit chain verifies, and the manifest lists exactly the provisioned devices.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from pathlib import Path

import pytest

from factoryd.ledger import Ledger
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.service import StationPaths, export_manifest
from factoryd.sim.remote import RemoteSimHub
from tests.helpers.line_procs import (
    check_invariants,
    provisioned_count,
    spawn,
    spawn_hub,
    stop,
    wait_for,
    write_config,
)
from tests.helpers.mqtt_broker import BrokerFactory
from tests.helpers.station import LOT, make_line

PORTS = int(os.environ.get("SOAK_PORTS", "8"))
DEVICES = int(os.environ.get("SOAK_DEVICES", "80"))
KILLS = int(os.environ.get("SOAK_KILLS", "2"))
FAULT_RATE = 0.1


def _manifest_ids(url: str, state_dir: Path, passphrase: bytes) -> set[str]:
    with Ledger.open(url) as ledger:
        manifest = export_manifest(ledger, StationPaths(state_dir), passphrase, LOT)
    document = json.loads(manifest.json_bytes)
    return {d["device_id"] for d in document["devices"]}


@pytest.mark.soak
@pytest.mark.mqtt
@pytest.mark.timeout(900)
async def test_soak_faults_broker_churn_and_sigkills(
    tmp_path: Path, mqtt_broker_factory: BrokerFactory
) -> None:
    rng = random.Random(2026)  # noqa: S311 - reproducible kill points, not cryptography
    line = await make_line(tmp_path, boards=DEVICES, ports=PORTS)
    url = line.settings.ledger_url
    broker = mqtt_broker_factory()
    await broker.start()
    socket = tmp_path / "hub.sock"
    log = tmp_path / "processes.log"
    hub_proc = spawn_hub(
        tmp_path, socket, ports=PORTS, boards=DEVICES, fault_rate=FAULT_RATE, seed=7, log=log
    )
    env = {"FACTORYD_CA_PASSPHRASE": line.passphrase.decode()}
    config = write_config(tmp_path / "factoryd.toml", line, socket, ports=PORTS, mqtt_port=broker.port)
    hub = RemoteSimHub(socket)
    kills = 0
    try:
        await hub.connect(timeout_s=20)

        async def exhausted() -> bool:
            return bool((await hub.status())["exhausted"])

        for kill in range(KILLS):
            daemon = spawn(["run", "-c", str(config)], log, env)
            target = min(DEVICES - 1, (kill + 1) * DEVICES // (KILLS + 2))

            async def progressed(goal: int = target) -> bool:
                return await asyncio.to_thread(provisioned_count, url) >= goal

            await wait_for(progressed, 240, f"{target} provisioned before kill {kill + 1}")
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # land somewhere inside a job
            if kill == 0:
                await broker.kill()  # the broker dies too; provisioning must not notice
            daemon.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(daemon.wait, 30) == -signal.SIGKILL
            kills += 1
            if kill == 0:
                await broker.restart()
        daemon = spawn(["run", "-c", str(config)], log, env)
        await wait_for(exhausted, 600, "the hub's supply to be used up")
        assert await stop(daemon) == 0, log.read_text()[-3000:]
        inventory = await hub.inventory()
    finally:
        await stop(hub_proc)
    assert kills == KILLS
    assert len(inventory) == DEVICES
    counts = check_invariants(url, inventory, min_provisioned=int(DEVICES * 0.5))
    with Ledger.open(url) as ledger:
        provisioned = {r.device_id for r in ledger.provisioned_devices(LOT)}
    assert _manifest_ids(url, line.settings.station.state_dir, line.passphrase) == provisioned
    assert counts["provisioned"] == len(provisioned)
    print(f"soak: {PORTS} ports, {DEVICES} boards, {KILLS} SIGKILLs, faults {FAULT_RATE:.0%}: {counts}")


@pytest.mark.postgres
@pytest.mark.timeout(600)
async def test_four_stations_share_one_postgres_lot_and_one_dies(tmp_path: Path) -> None:
    stations, ports, boards = 4, 4, 24
    with throwaway_postgres_database() as url:
        line = await make_line(tmp_path, boards=stations * boards, ports=ports, ledger_url=url)
        log = tmp_path / "processes.log"
        env = {"FACTORYD_CA_PASSPHRASE": line.passphrase.decode()}
        hubs, hub_procs, daemons = [], [], []
        try:
            for n in range(stations):
                socket = tmp_path / f"hub-{n}.sock"
                hub_procs.append(
                    spawn_hub(tmp_path, socket, ports=ports, boards=boards, fault_rate=0.05, seed=n, log=log)
                )
                hubs.append(RemoteSimHub(socket))
                await hubs[-1].connect(timeout_s=20)
                config = write_config(
                    tmp_path / f"station-{n}.toml",
                    line,
                    socket,
                    station=f"station-{n}",
                    ports=ports,
                    ledger_url=url,
                )
                daemons.append(spawn(["run", "-c", str(config)], log, env))

            async def some_done() -> bool:
                return await asyncio.to_thread(provisioned_count, url) >= 12

            await wait_for(some_done, 120, "the first boards")
            daemons[0].send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(daemons[0].wait, 30) == -signal.SIGKILL
            # The killed station comes back (same hub, same boards) and finishes its share.
            daemons[0] = spawn(["run", "-c", str(tmp_path / "station-0.toml")], log, env)

            async def all_exhausted() -> bool:
                return all([(await h.status())["exhausted"] for h in hubs])

            await wait_for(all_exhausted, 300, "every hub's supply to be used up")
            for daemon in daemons:
                assert await stop(daemon) == 0, log.read_text()[-3000:]
            inventory = [board for hub in hubs for board in await hub.inventory()]
        finally:
            for proc in daemons + hub_procs:
                if proc.poll() is None:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, 10)
        assert len(inventory) == stations * boards
        counts = check_invariants(url, inventory, min_provisioned=int(stations * boards * 0.6))
        with Ledger.open(url) as ledger:
            stations_used = {r.station for r in ledger.provisioned_devices(LOT)}
        assert stations_used == {f"station-{n}" for n in range(stations)}
        assert counts["provisioned"] > 0
