"""The daemon as a real process: SIGTERM and SIGKILL mid-run, restart, and the lot still ends exactly once.

Boards live in a separate `factoryd sim hub` process, so they keep their secure-element state
(serial, keys, stored objects) across daemon restarts, as real boards on a real hub do.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

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
from tests.helpers.station import make_line

BOARDS = 40
PORTS = 8


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_interrupted_daemon_restarts_and_finishes_the_lot(tmp_path: Path, sig: signal.Signals) -> None:
    line = await make_line(tmp_path, boards=BOARDS, ports=PORTS)
    url = line.settings.ledger_url
    socket = tmp_path / "hub.sock"
    log = tmp_path / "processes.log"
    hub_proc = spawn_hub(tmp_path, socket, ports=PORTS, boards=BOARDS, fault_rate=0.05, seed=11, log=log)
    env = {"FACTORYD_CA_PASSPHRASE": line.passphrase.decode()}
    config = write_config(tmp_path / "factoryd.toml", line, socket, ports=PORTS)
    hub = RemoteSimHub(socket)
    try:
        await hub.connect(timeout_s=20)
        daemon = spawn(["run", "-c", str(config)], log, env)

        async def some_done() -> bool:
            return await asyncio.to_thread(provisioned_count, url) >= 8

        await wait_for(some_done, 60, "the first boards")
        daemon.send_signal(sig)
        code = await asyncio.to_thread(daemon.wait, 30)
        assert code == (0 if sig is signal.SIGTERM else -signal.SIGKILL), log.read_text()[-3000:]
        assert await asyncio.to_thread(provisioned_count, url) < BOARDS

        daemon = spawn(["run", "-c", str(config)], log, env)

        async def exhausted() -> bool:
            return bool((await hub.status())["exhausted"])

        await wait_for(exhausted, 120, "the hub's supply to be used up")
        assert await stop(daemon) == 0, log.read_text()[-3000:]
        inventory = await hub.inventory()
    finally:
        await stop(hub_proc)
    assert len(inventory) == BOARDS
    check_invariants(url, inventory, min_provisioned=int(BOARDS * 0.6))
