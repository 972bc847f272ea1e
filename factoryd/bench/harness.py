"""Runs the real daemon against simulated boards in a separate `factoryd sim hub` process.

The boards' CPU (key generation, PTY I/O) then lands in another process, so what the
benchmarks measure in this process is the daemon: pipeline, ledger, PKI, telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from factoryd.daemon import Daemon, DaemonHooks
from factoryd.demo import DEMO_LOT, DemoOptions, DemoProfile, demo_settings, prepare_lot
from factoryd.jobs.scheduler import Station
from factoryd.sim.remote import CONNECTION_POOL, RemoteSimHub

# How often the hub's supply is checked while the line runs.
STATUS_POLL_S = 0.1
# The hub process may still be starting (interpreter start-up, then its boards); generous for CI.
HUB_START_TIMEOUT_S = 30.0


class WindowProbe(Protocol):
    """Called on the event loop when the measured window (READY to the last board) opens and closes."""

    def start(self) -> None:
        """The daemon is READY."""

    def stop(self) -> None:
        """The last board is done."""


@dataclass
class RemoteRun:
    """What one run of the daemon against a remote simulated hub measured."""

    ports: int
    devices: int
    outcomes: dict[str, int]
    # Why jobs that did not provision ended (reason -> jobs): a failure in a benchmark is a finding.
    failure_reasons: dict[str, int]
    provisioned: int
    duplicate_ids: int
    window_s: float
    physical_s_mean: float
    cpu_s: float
    peak_rss_bytes: int
    rss_before_bytes: int
    inventory: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly figures (without the inventory)."""
        return {
            "ports": self.ports,
            "devices": self.devices,
            "outcomes": self.outcomes,
            "failure_reasons": self.failure_reasons,
            "provisioned": self.provisioned,
            "duplicate_ids": self.duplicate_ids,
            "window_s": round(self.window_s, 4),
            "physical_s_per_board": round(self.physical_s_mean, 4),
            "daemon_cpu_s": round(self.cpu_s, 4),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize()


async def run_remote_line(
    workdir: Path,
    *,
    ports: int,
    devices: int,
    timing: Literal["zero", "realistic"],
    flash: bool = False,
    lock: bool = True,
    profile: DemoProfile = "factoryd-v1",
    probe: WindowProbe | None = None,
    board_cpus: frozenset[int] | None = None,
) -> RemoteRun:
    """Prepare a lot, start a sim hub process, run the daemon until the supply is used up.

    ``board_cpus``: the CPUs the boards' process runs on (None: this process's, which it inherits).
    A daemon pinned to one CPU (``cpu_affinity = "auto"``) would otherwise share it with every
    simulated board, which real boards never do: each reply would preempt the daemon on its own CPU.
    """
    options = DemoOptions(
        ports=ports, boards=devices, timing=timing, flash=flash, lock=lock, log_level="error", profile=profile
    )
    options = replace(options, state_dir=workdir)
    settings = demo_settings(options, workdir)
    # The bench drives the hub's supply itself; the remote hub needs no power-cycle gap either.
    # Production reply timeouts (the demo shortens them for zero-latency boards; under a 256-port
    # load that would turn a busy event loop into resends), and every port powered at once.
    settings = settings.model_copy(
        update={
            "hub": settings.hub.model_copy(update={"max_powered": max(ports, 1)}),
            "jobs": settings.jobs.model_copy(update={"reply_timeout_scale": 1.0}),
        }
    )
    passphrase = secrets.token_urlsafe(16).encode()
    await asyncio.to_thread(prepare_lot, options, settings, passphrase)
    socket = workdir / "hub.sock"
    args = [
        sys.executable, "-m", "factoryd", "sim", "hub", "--socket", str(socket), "--ports", str(ports),
        "--boards", str(devices), "--timing", timing, "--profile", profile,
        "--firmware-key", str(workdir / "firmware" / DEMO_LOT / "signing-key.pem"),
    ]  # fmt: skip
    if not flash:
        args = args[:-2]
    with (workdir / "sim-hub.log").open("wb") as log:
        # Popen returns at once (no waiting on the loop); the child is reaped off-loop in `finally`.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603, ASYNC220
    if board_cpus:
        # Popen returns after the exec and before the interpreter has started any thread of its own:
        # every thread of the hub process inherits the set.
        os.sched_setaffinity(proc.pid, board_cpus)
    try:
        # The daemon enters the hub, which waits for the hub process to listen.
        hub = RemoteSimHub(socket, pool=CONNECTION_POOL, connect_timeout_s=HUB_START_TIMEOUT_S)
        cpu: dict[str, float] = {}

        async def watch(station: Station) -> None:
            # CPU from READY to the last board: the daemon at work, without start-up and shutdown.
            if probe is not None:
                probe.start()
            cpu["ready"] = time.process_time()
            # The supply lives in the other process: poll it (no event can cross the boundary).
            while not (await hub.status())["exhausted"]:  # noqa: ASYNC110
                await asyncio.sleep(STATUS_POLL_S)
            cpu["done"] = time.process_time()
            if probe is not None:
                probe.stop()
            station.stop()

        rss_before = _rss_now()
        daemon = Daemon(settings, DaemonHooks(hub=hub, passphrase=passphrase, on_ready=watch))
        station = await daemon.run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        inventory = await hub.inventory()
        hub.close()
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, 10)
        if proc.poll() is None:
            proc.kill()
    ids = Counter(b["device_id"] for b in inventory if b["device_id"])
    physical = [b["physical_s"] for b in inventory if b["where"] == "finished"]
    window = (
        station.last_job_at - station.first_job_at
        if station.first_job_at is not None and station.last_job_at is not None
        else 0.0
    )
    return RemoteRun(
        ports=ports,
        devices=devices,
        outcomes=dict(station.outcomes),
        failure_reasons=dict(
            Counter(str(r.reason) for r in station.results if r.outcome not in ("provisioned", "rechecked"))
        ),
        provisioned=station.outcomes.get("provisioned", 0),
        duplicate_ids=sum(1 for n in ids.values() if n > 1),
        window_s=window,
        physical_s_mean=sum(physical) / len(physical) if physical else 0.0,
        cpu_s=cpu["done"] - cpu["ready"],
        peak_rss_bytes=peak,
        rss_before_bytes=rss_before,
        inventory=inventory,
    )
