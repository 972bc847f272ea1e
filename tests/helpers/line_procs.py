"""Daemons and simulated hubs as real processes, for restart, soak and multi-station tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.ledger import Ledger
from factoryd.sim.remote import RemoteSimHub
from tests.helpers.station import LOT, Line


def write_config(
    path: Path,
    line: Line,
    socket: Path,
    *,
    station: str = "test-station",
    ports: int = 8,
    ledger_url: str | None = None,
    mqtt_port: int | None = None,
) -> Path:
    """A station config for `factoryd run` on a remote simulated hub."""
    ledger = f'\n[ledger]\nurl = "{ledger_url}"\n' if ledger_url else ""
    mqtt = f'\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mqtt_port}\n' if mqtt_port else ""
    path.write_text(
        f"""
[station]
name = "{station}"
line = "test-line"
state_dir = "{line.settings.station.state_dir}"
{ledger}{mqtt}
[hub]
backend = "sim-remote"
max_powered = {ports}
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
attention_after_failures = 1000

[metrics]
enabled = false

[api]
enabled = false

[log]
level = "info"
"""
    )
    return path


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m factoryd <args>` with output appended to log."""
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "factoryd", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def spawn_hub(
    tmp_path: Path, socket: Path, *, ports: int, boards: int, fault_rate: float, seed: int, log: Path
) -> subprocess.Popen[bytes]:
    """A `factoryd sim hub` process whose bootloaders trust the lot's firmware key."""
    fw_key = tmp_path / "firmware" / LOT / "signing-key.pem"
    args = ["sim", "hub", "--socket", str(socket), "--ports", str(ports), "--boards", str(boards)]
    args += ["--fault-rate", str(fault_rate), "--seed", str(seed), "--timing", "realistic"]
    args += ["--timing-scale", "0.05", "--firmware-key", str(fw_key)]
    return spawn(args, log)


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll an async predicate until true."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def provisioned_count(url: str) -> int:
    """Provisioned devices of the test lot."""
    with Ledger.open(url) as ledger:
        return ledger.progress(LOT).provisioned


async def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """SIGTERM a process and wait for its exit code."""
    if proc.poll() is None:
        proc.terminate()
    return await asyncio.to_thread(proc.wait, timeout_s)


def check_invariants(url: str, inventory: list[dict[str, Any]], *, min_provisioned: int) -> dict[str, int]:
    """The exactly-once promises, checked against the boards themselves; returns counts."""
    with Ledger.open(url) as ledger:
        ledger.verify_audit()
        provisioned = {r.device_id: r for r in ledger.provisioned_devices(LOT)}
        on_boards = Counter(b["device_id"] for b in inventory if b["device_id"])
        # 0 IDs on two boards.
        assert all(n == 1 for n in on_boards.values()), on_boards.most_common(3)
        unfinished = 0
        for board in inventory:
            record = ledger.find_by_serial(LOT, board["serial"])
            if board["cert"] is None:
                # Never finished: its ID (if any) is still reserved to it, not lost and not reused.
                unfinished += 1
                assert record is None or str(record.state) == "reserved", (board, record)
                continue
            assert record is not None, board
            assert record.device_id == board["device_id"]
            if str(record.state) == "reserved":
                # A board that failed after its certificate was written (e.g. killed, then a fault on
                # the retry): it keeps its reservation and is not in the manifest; a re-insert
                # resumes it with the same ID. Not lost, not duplicated.
                unfinished += 1
                continue
            # Every provisioned board: ledger row, the board's certificate = the ledger's, key = SE key.
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
        progress = ledger.progress(LOT)
        # No ID lost: every ID is available, reserved to a board, provisioned, or void with a reason.
        assert progress.total == progress.available + progress.reserved + progress.provisioned + progress.void
        assert len(provisioned) >= min_provisioned, (len(provisioned), min_provisioned)
        return {"provisioned": len(provisioned), "unfinished": unfinished, "reserved": progress.reserved}


async def inventory_of(socket: Path) -> list[dict[str, Any]]:
    """Every board a remote hub has seen."""
    return await RemoteSimHub(socket).inventory()
