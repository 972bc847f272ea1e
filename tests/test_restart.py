"""The daemon as a real process: SIGTERM and SIGKILL mid-run, restart, and the lot still ends exactly once.

Boards live in a separate `factoryd sim hub` process, so they keep their secure-element state
(serial, keys, stored objects) across daemon restarts, as real boards on a real hub do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.hub.remote import RemoteSimHub
from factoryd.ledger import Ledger
from tests.station_harness import LOT, Line, make_line

BOARDS = 40
PORTS = 8


def _config(line: Line, tmp_path: Path, socket: Path) -> Path:
    config = tmp_path / "factoryd.toml"
    config.write_text(
        f"""
[station]
name = "restart-station"
state_dir = "{line.settings.station.state_dir}"

[hub]
backend = "sim-remote"
max_powered = {PORTS}
power_cycle_off_s = 0.05
enumerate_timeout_s = 5.0

[hub.sim]
control_socket = "{socket}"

[jobs]
lot = "{LOT}"
rescan_s = 0.1
backoff_initial_s = 0.01
reply_timeout_scale = 0.3
shutdown_grace_s = 10.0

[metrics]
enabled = false

[api]
enabled = false

[log]
level = "info"
"""
    )
    return config


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "factoryd", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def _provisioned(line: Line) -> int:
    with Ledger.open(line.settings.ledger_url) as ledger:
        return ledger.progress(LOT).provisioned


async def _wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _run_with_interruption(tmp_path: Path, sig: signal.Signals) -> tuple[Line, list[dict[str, Any]]]:
    line = await make_line(tmp_path, boards=BOARDS, ports=PORTS)
    socket = tmp_path / "hub.sock"
    fw_key = tmp_path / "firmware" / LOT / "signing-key.pem"
    log = tmp_path / "processes.log"
    hub_proc = _spawn(
        [
            "sim", "hub", "--socket", str(socket), "--ports", str(PORTS), "--boards", str(BOARDS),
            "--fault-rate", "0.05", "--seed", "11", "--timing", "realistic", "--timing-scale", "0.05",
            "--firmware-key", str(fw_key),
        ],
        log,
    )  # fmt: skip
    env = {"FACTORYD_CA_PASSPHRASE": line.passphrase.decode()}
    config = _config(line, tmp_path, socket)
    hub = RemoteSimHub(socket)
    try:
        await hub.connect(timeout_s=20)
        daemon = _spawn(["run", "-c", str(config)], log, env)

        async def some_done() -> bool:
            return await asyncio.to_thread(_provisioned, line) >= 8

        await _wait_for(some_done, 60, "the first boards")
        daemon.send_signal(sig)
        code = await asyncio.to_thread(daemon.wait, 30)
        expected = 0 if sig is signal.SIGTERM else -signal.SIGKILL
        assert code == expected, log.read_text()[-3000:]
        interrupted_at = await asyncio.to_thread(_provisioned, line)
        assert interrupted_at < BOARDS

        daemon = _spawn(["run", "-c", str(config)], log, env)

        async def exhausted() -> bool:
            return bool((await hub.status())["exhausted"])

        await _wait_for(exhausted, 120, "the hub's supply to be used up")
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 30) == 0, log.read_text()[-3000:]
        inventory = await hub.inventory()
    finally:
        for proc in (hub_proc,):
            proc.terminate()
            await asyncio.to_thread(proc.wait, 10)
    return line, inventory


def _check_invariants(line: Line, inventory: list[dict[str, Any]]) -> None:
    assert len(inventory) == BOARDS
    with Ledger.open(line.settings.ledger_url) as ledger:
        ledger.verify_audit()
        provisioned = {r.device_id: r for r in ledger.provisioned_devices(LOT)}
        # 0 IDs on two boards.
        on_boards = Counter(b["device_id"] for b in inventory if b["device_id"])
        assert all(n == 1 for n in on_boards.values()), on_boards.most_common(3)
        for board in inventory:
            record = ledger.find_by_serial(LOT, board["serial"])
            if board["cert"] is None:
                # Never finished: its ID (if any) is still reserved to it, not lost and not reused.
                assert record is None or record.state in ("reserved", "provisioned")
                continue
            # Every provisioned board: ledger row, certificate on the board = ledger's, key = SE key.
            assert record is not None
            assert record.device_id == board["device_id"]
            assert record.device_id in provisioned
            assert record.cert_der is not None
            assert record.cert_der.hex() == board["cert"]
            cert = x509.load_der_x509_certificate(record.cert_der)
            point = cert.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
            assert point.hex() == board["public_key"]
        # Every ledger "provisioned" row is on exactly the board it names.
        serials = {b["serial"]: b for b in inventory}
        for device_id, record in provisioned.items():
            assert serials[record.hw_serial or ""]["device_id"] == device_id
        assert len(provisioned) >= BOARDS * 0.6


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_interrupted_daemon_restarts_and_finishes_the_lot(tmp_path: Path, sig: signal.Signals) -> None:
    line, inventory = await _run_with_interruption(tmp_path, sig)
    _check_invariants(line, inventory)
