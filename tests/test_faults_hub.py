"""Fault 3: the hub's cable is pulled mid-run (every tty vanishes, every control call fails), then back.

The station must fail or hold its jobs with the reason ``hub_disconnected``, take no new boards,
say so (port states with the reason, the ``factoryd_intake_paused`` gauge, the log), probe the hub
with bounded backoff and resume by itself when it returns: 0 duplicates, 0 lost IDs, every
provisioned board's certificate is the ledger's, no port left in ATTENTION. Simulated with the
in-process and the out-of-process simulated hub, and with the sysfs and uhubctl backends on their
fakes (a fake /sys tree, a fake uhubctl executable).

CI runs one unplug; ``FAULTS_LONG=1`` runs several, longer, on more boards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from factoryd.daemon import Daemon, DaemonHooks
from factoryd.errors import HubCommandError, HubDisconnectedError
from factoryd.hub.base import probe_hub
from factoryd.hub.sysfs import SysfsHub
from factoryd.hub.ttymap import ByPathResolver
from factoryd.hub.uhubctl import UhubctlHub
from factoryd.jobs.scheduler import Station
from factoryd.sim.board import SimBoard, Timing
from factoryd.sim.hub import SimHub
from factoryd.sim.remote import RemoteSimHub, board_inventory
from factoryd.telemetry.events import PortState, RecordingSink
from factoryd.telemetry.payloads import load_schema, port_state_payload
from factoryd.telemetry.reasons import REASON_TEXT
from tests.helpers.line_procs import check_invariants, spawn, spawn_hub, stop, wait_for, write_config
from tests.helpers.station import Line, make_line
from tests.test_hub_sysfs import make_tree
from tests.test_hub_uhubctl import FakeUhubctl
from tests.test_page import _feed, _port, _slot

LONG = os.environ.get("FAULTS_LONG") == "1"
BOARDS = 120 if LONG else 24
PORTS = 8 if LONG else 4
UNPLUGS = 4 if LONG else 1
# How long the hub stays away: longer than a job's step timeouts in the long run.
UNPLUGGED_S = 8.0 if LONG else 1.0
# Boards take a little time, so the cable is pulled while jobs are in flight.
SLOW = Timing(keygen_s=0.03, write_s=0.005, enumerate_s=0.01)


def _slow_board(line: Line) -> Callable[[], SimBoard]:
    return lambda: SimBoard(firmware_key=line.fw_public, timing=SLOW)


async def _until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    async def check() -> bool:
        return predicate()

    await wait_for(check, timeout_s, what)


def _intake_gauge(daemon: Daemon, reason: str) -> float | None:
    return daemon.metrics.registry.get_sample_value("factoryd_intake_paused", {"reason": reason})


@pytest.mark.faults
@pytest.mark.timeout(300 if LONG else 60)
async def test_sim_hub_unplugged_mid_run_pauses_and_resumes(tmp_path: Path) -> None:
    line = await make_line(tmp_path, boards=BOARDS, ports=PORTS)
    hub = SimHub(PORTS, _slow_board(line), supply=BOARDS)
    sink = RecordingSink()
    hooks = DaemonHooks(
        hub=hub, passphrase=line.passphrase, stop_when=lambda s: hub.exhausted, extra_sinks=(sink,)
    )
    daemon = Daemon(line.settings, hooks)
    recoveries: list[float] = []

    async def inject() -> None:
        await _until(lambda: daemon.station is not None, 20, "the station")
        station = daemon.station
        assert station is not None
        for n in range(UNPLUGS):
            goal = (n + 1) * BOARDS // (UNPLUGS + 2)
            await _until(lambda: station.outcomes["provisioned"] >= goal, 60, f"{goal} boards")  # noqa: B023
            await hub.unplug()
            await _until(lambda: station.intake_paused, 20, "intake to pause")
            pause = station.pauses["hub"]
            assert pause.reason == "hub_disconnected"
            assert _intake_gauge(daemon, "hub_disconnected") == 1.0
            # Every port says why it is idle (the page and MQTT carry the reason's sentence).
            await _until(
                lambda: all(
                    u.state is PortState.IDLE and u.reason == "hub_disconnected"
                    for u in daemon.live.ports.values()
                ),
                20,
                "every port to show the pause",
            )
            # MQTT carries the same words as the page: the reason code and its operator sentence.
            payload = port_state_payload(next(iter(daemon.live.ports.values())))
            assert payload["state"] == "idle"
            assert payload["reason"] == "hub_disconnected"
            assert payload["operator_text"] == REASON_TEXT["hub_disconnected"]
            jsonschema.validate(payload, load_schema("port_state"))  # docs/mqtt.md's schema
            started_before = sum(e.kind == "job_started" for e in sink.events)
            await asyncio.sleep(UNPLUGGED_S)
            # No new board was taken while the hub was away.
            assert sum(e.kind == "job_started" for e in sink.events) == started_before
            hub.replug()
            replugged = time.monotonic()
            await _until(lambda: not station.intake_paused, 30, "intake to resume by itself")
            recoveries.append(time.monotonic() - replugged)
            assert _intake_gauge(daemon, "hub_disconnected") == 0.0

    async with asyncio.timeout(240 if LONG else 50):
        async with asyncio.TaskGroup() as tg:
            running = tg.create_task(daemon.run())
            tg.create_task(inject())
    station = running.result()
    assert station.pauses_total == UNPLUGS
    # No port is left in a state the operator cannot clear: none is in ATTENTION, every board left.
    assert all(c.attention is None for c in station.ports.values())
    inventory = [board_inventory(b, "finished") for b in hub.finished]
    assert len(inventory) == BOARDS
    counts = check_invariants(line.settings.ledger_url, inventory, min_provisioned=BOARDS - UNPLUGS * PORTS)
    failed = [r for r in station.results if r.outcome == "failed"]
    assert all(r.reason == "hub_disconnected" for r in failed), failed
    print(f"hub unplugged {UNPLUGS}x: {counts}, resumed after {[round(r, 2) for r in recoveries]} s")


@pytest.mark.faults
@pytest.mark.timeout(300 if LONG else 90)
async def test_remote_hub_unplugged_under_a_station_process(tmp_path: Path) -> None:
    """The daemon as a process on the out-of-process hub: it pauses and resumes without a restart."""
    boards, ports = (80, 8) if LONG else (16, 4)
    line = await make_line(tmp_path, boards=boards, ports=ports)
    url = line.settings.ledger_url
    socket = tmp_path / "hub.sock"
    log = tmp_path / "processes.log"
    hub_proc = spawn_hub(tmp_path, socket, ports=ports, boards=boards, fault_rate=0.0, seed=3, log=log)
    env = {"FACTORYD_CA_PASSPHRASE": line.passphrase.decode()}
    config = write_config(tmp_path / "factoryd.toml", line, socket, ports=ports)
    hub = RemoteSimHub(socket)
    try:
        await hub.connect(timeout_s=20)
        daemon = spawn(["run", "-c", str(config)], log, env)

        async def some_done() -> bool:
            return int((await hub.status())["finished"]) >= boards // 4

        await wait_for(some_done, 60, "the first boards")
        await hub.unplug()
        with pytest.raises(HubDisconnectedError):
            await hub.check()

        async def paused() -> bool:
            return "intake paused" in log.read_text()

        await wait_for(paused, 30, "the station to pause intake")
        await asyncio.sleep(UNPLUGGED_S)
        await hub.replug()

        async def exhausted() -> bool:
            return bool((await hub.status())["exhausted"])

        await wait_for(exhausted, 120, "the hub's supply to be used up after the replug")
        assert daemon.poll() is None, "the station process must not have restarted"
        assert await stop(daemon) == 0, log.read_text()[-3000:]
        inventory = await hub.inventory()
    finally:
        await stop(hub_proc)
    text = log.read_text()
    assert "hub_disconnected" in text
    assert "intake resumed" in text
    assert len(inventory) == boards
    check_invariants(url, inventory, min_provisioned=boards - ports)


# --- the real backends on their fakes ------------------------------------------------------------


def _by_path(tmp_path: Path) -> Path:
    d = tmp_path / "by-path"
    d.mkdir()
    return d


def _each_port_reported_empty(daemon: Daemon, ports: int = 4) -> Callable[[], bool]:
    """A predicate that is true once every one of ``ports`` ports has been seen empty since it was made."""
    seen: set[str] = set()

    def check() -> bool:
        seen.update(name for name, update in daemon.live.ports.items() if update.state is PortState.EMPTY)
        return len(seen) == ports

    return check


async def _backend_station(
    tmp_path: Path,
    hub: Any,
    unplug: Callable[[], Awaitable[None]],
    replug: Callable[[], Awaitable[None]],
) -> Station:
    """A real daemon on a backend with empty ports: unplug, check the pause, replug, check the resume."""
    line = await make_line(tmp_path, boards=4, ports=4)
    settings = line.settings.model_copy(
        update={"hub": line.settings.hub.model_copy(update={"enumerate_timeout_s": 0.1})}
    )
    done = asyncio.Event()
    daemon = Daemon(
        settings, DaemonHooks(hub=hub, passphrase=line.passphrase, stop_when=lambda s: done.is_set())
    )

    async def inject() -> None:
        await _until(lambda: daemon.station is not None, 20, "the station")
        station = daemon.station
        assert station is not None
        # Empty ports are polled: each poll switches the port on and off through the backend. Each port
        # must have reported empty, not all four at one instant: on a loaded machine a port spends most
        # of its time inside a poll (the backend's command is a process), and four at once is luck.
        await _until(_each_port_reported_empty(daemon), 20, "every port to report empty")
        await unplug()
        with pytest.raises(HubDisconnectedError, match="hub disconnected"):
            await probe_hub(hub)
        await _until(lambda: station.intake_paused, 20, "intake to pause")
        assert station.pauses["hub"].reason == "hub_disconnected"
        assert _intake_gauge(daemon, "hub_disconnected") == 1.0
        await replug()
        await _until(lambda: not station.intake_paused, 20, "intake to resume by itself")
        await _until(_each_port_reported_empty(daemon), 20, "the ports to poll again")
        done.set()

    async with asyncio.timeout(50), asyncio.TaskGroup() as tg:
        running = tg.create_task(daemon.run())
        tg.create_task(inject())
    station = running.result()
    assert all(c.attention is None for c in station.ports.values())
    assert station.pauses_total >= 1
    assert not station.pauses
    return station


@pytest.mark.faults
async def test_sysfs_hub_unplugged_and_back(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    make_tree(root, "1-1.4")
    away = tmp_path / "unplugged"
    away.mkdir()
    resolver = ByPathResolver(_by_path(tmp_path), poll_interval_s=0.01)
    hub = SysfsHub("1-1.4", [1, 2, 3, 4], sysfs_root=root, resolver=resolver)

    async def unplug() -> None:
        # The kernel removes the hub's device and interface directories at once.
        for entry in list(root.iterdir()):
            shutil.move(str(entry), str(away / entry.name))

    async def replug() -> None:
        for entry in list(away.iterdir()):
            shutil.move(str(entry), str(root / entry.name))

    await _backend_station(tmp_path, hub, unplug, replug)
    # Switching while unplugged names the cause; after the replug it works again.
    await unplug()
    with pytest.raises(HubDisconnectedError, match=r"hub disconnected: no USB device 1-1\.4"):
        await hub.power_on("1")
    await replug()
    await hub.power_on("1")
    await hub.check()


@pytest.mark.faults
async def test_uhubctl_hub_unplugged_and_back(tmp_path: Path) -> None:
    fake = FakeUhubctl(tmp_path / "bin")
    resolver = ByPathResolver(_by_path(tmp_path), poll_interval_s=0.01)
    hub = UhubctlHub("1-1.4", [1, 2, 3, 4], binary=fake.binary, resolver=resolver)

    async def unplug() -> None:
        fake.configure(hubs={})  # uhubctl: "No compatible devices detected at location 1-1.4"

    async def replug() -> None:
        fake.configure()

    await _backend_station(tmp_path, hub, unplug, replug)
    await unplug()
    with pytest.raises(HubDisconnectedError, match="hub disconnected"):
        await hub.power_off("2")
    # A permission problem is not a disconnected hub: it stays a plain hub command error.
    fake.configure(hubs={}, stderr="... permission problems ...\n")
    with pytest.raises(HubCommandError) as info:
        await hub.power_off("2")
    assert not isinstance(info.value, HubDisconnectedError)
    await replug()
    await hub.check()


@pytest.mark.faults
async def test_station_page_slot_says_why_intake_is_paused(tmp_path: Path) -> None:
    feed, _ = _feed(tmp_path)
    view = await _slot(feed, _port("1", "idle", reason="hub_disconnected"))
    assert view is not None
    assert (view.state, view.title) == ("idle", "Idle")
    assert view.detail == REASON_TEXT["hub_disconnected"]
    plain = await _slot(feed, _port("2", "idle"))
    assert plain is not None
    assert plain.detail == "No active lot."


@pytest.mark.faults
async def test_station_started_while_the_hub_is_unplugged_waits_for_it(tmp_path: Path) -> None:
    line = await make_line(tmp_path, boards=6, ports=2)
    hub = SimHub(2, _slow_board(line), supply=6)
    daemon = Daemon(
        line.settings, DaemonHooks(hub=hub, passphrase=line.passphrase, stop_when=lambda s: hub.exhausted)
    )

    async def inject() -> None:
        await _until(
            lambda: daemon.station is not None and daemon.station.intake_paused, 20, "a paused start"
        )
        assert daemon.station is not None
        assert daemon.station.pauses["hub"].reason == "hub_disconnected"
        hub.replug()

    await hub.unplug()  # before the daemon enters it: the station starts with the hub away
    async with asyncio.timeout(40), asyncio.TaskGroup() as tg:
        running = tg.create_task(daemon.run())
        tg.create_task(inject())
    station = running.result()
    assert station.outcomes["provisioned"] == 6
    inventory = [board_inventory(b, "finished") for b in hub.finished]
    check_invariants(line.settings.ledger_url, inventory, min_provisioned=6)
