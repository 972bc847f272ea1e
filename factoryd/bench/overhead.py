"""`factoryd bench overhead`: what the daemon itself costs per device and per port, against the floor.

Zero-latency simulated boards run in a separate `factoryd sim hub` process, so their CPU is not
counted. For each port count a fresh child process runs the daemon (so RSS figures do not
carry over between runs) and reports devices per second, daemon CPU seconds per device from
READY to the last board, and peak RSS; RSS per port is the slope between the smallest and the
largest port count. The same child then measures the floor (`bench/floor.py`: the essential
cryptography and as many durable SQLite commits per board as the daemon made in its window) and
the ratio daemon/floor. With ``profile`` the window is also profiled by layer (`bench/layers.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from factoryd.bench.floor import CommitCounter, run_floor
from factoryd.bench.harness import run_remote_line
from factoryd.bench.layers import LayerProfiler
from factoryd.bench.machine import machine_info, python_speed_s
from factoryd.cli.opts import run_event_loop
from factoryd.limits import apply_cpu_affinity, yield_helper_threads

DEFAULT_PORTS = (1, 8, 64, 256)
# Enough boards per port count that start-up transients do not dominate.
MIN_DEVICES = 200
DEVICES_PER_PORT = 2
# Boards the floor is measured over (enough for a stable mean; it is ~1 ms each).
FLOOR_BOARDS = 300
# One port count's child process (1,024 ports: ~1 min); a hung run fails instead of waiting forever.
RUN_TIMEOUT_S = 900
# Targets of issue #20.
TARGET_CPU_MS_PER_DEVICE = 2.0
TARGET_RATIO = 3.0


def devices_for(ports: int) -> int:
    """Boards provisioned in a run with that many ports."""
    return max(MIN_DEVICES, DEVICES_PER_PORT * ports)


class _Window:
    """The window probe of one run: write commits counted, the layer profile when asked."""

    def __init__(self, counter: CommitCounter, profiler: LayerProfiler | None) -> None:
        self._counter = counter
        self.profiler = profiler
        self._at_start = 0
        self.commits = 0

    def start(self) -> None:
        self._at_start = self._counter.commits
        if self.profiler is not None:
            self.profiler.start()

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
        self.commits = self._counter.commits - self._at_start


async def run_single(
    ports: int, devices: int, *, profile: bool = False, board_cpus: frozenset[int] | None = None
) -> dict[str, Any]:
    """One run in this process (called in a child by run_overhead_bench), then the floor.

    ``board_cpus``: where the boards' process runs (see ``run_remote_line``).
    """
    counter = CommitCounter()
    counter.install()
    window = _Window(counter, LayerProfiler() if profile else None)
    with tempfile.TemporaryDirectory(prefix="factoryd-overhead-") as tmp:
        run = await run_remote_line(
            Path(tmp), ports=ports, devices=devices, timing="zero", probe=window, board_cpus=board_cpus
        )
    boards = max(run.provisioned, 1)
    result = run.summary()
    result["devices_per_second"] = round(run.provisioned / run.window_s, 1) if run.window_s else None
    result["cpu_ms_per_device"] = round(run.cpu_s / boards * 1000, 3)
    result["rss_before_bytes"] = run.rss_before_bytes
    # Counted, not assumed: the durable write transactions the daemon committed per board.
    per_board = window.commits / boards
    result["sqlite_commits_per_device"] = round(per_board, 2)
    floor = await asyncio.to_thread(run_floor, FLOOR_BOARDS, max(round(per_board), 1))
    result["floor"] = floor
    result["floor_ms_per_device"] = floor["floor_ms_per_board"]
    result["ratio"] = round(result["cpu_ms_per_device"] / floor["floor_ms_per_board"], 2)
    if window.profiler is not None:
        result["profile"] = _profile_summary(window.profiler, run.cpu_s, boards)
    return result


def _profile_summary(profiler: LayerProfiler, cpu_s: float, boards: int) -> dict[str, Any]:
    """Per-thread CPU per board (measured) and the loop thread's split by layer (cProfile shares)."""
    threads = profiler.threads()
    loop_ms = threads.get("event loop thread", 0.0) / boards * 1000
    shares = profiler.layer_shares()
    return {
        "note": (
            "threads: CPU per board from /proc (with cProfile running, so above cpu_ms_per_device); "
            "layers: cProfile shares of the loop thread, in ms per board of the loop thread"
        ),
        "threads_ms_per_device": {k: round(v / boards * 1000, 3) for k, v in threads.items()},
        "loop_layers_share": {k: round(v, 3) for k, v in shares.items()},
        "loop_layers_ms_per_device": {k: round(v * loop_ms, 3) for k, v in shares.items()},
        "top_functions": profiler.top_functions(),
        "unprofiled_cpu_s": round(cpu_s, 4),
    }


def run_overhead_bench(
    ports_list: tuple[int, ...] = DEFAULT_PORTS,
    *,
    profile: bool = False,
    repeat: int = 1,
    loops: tuple[str, ...] = ("asyncio",),
    affinities: tuple[str, ...] = ("auto",),
) -> dict[str, Any]:
    """Run each port count (``repeat`` times, loops and affinities alternating) in its own child process."""
    speed = python_speed_s()
    runs = []
    for _ in range(repeat):
        for ports in ports_list:
            for loop, affinity in itertools.product(loops, affinities):
                args = [sys.executable, "-m", "factoryd", "bench", "overhead", "--single"]
                args += ["--ports", str(ports), "--loop", loop, "--affinity", affinity]
                args += ["--profile"] if profile else []
                out = subprocess.run(  # noqa: S603 - our own interpreter and module
                    args, capture_output=True, check=True, text=True, timeout=RUN_TIMEOUT_S
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rss_per_port = None
    if len(ports_list) > 1:
        low = min(runs, key=lambda r: (r["ports"], r["peak_rss_bytes"]))
        high = max(runs, key=lambda r: (r["ports"], -r["peak_rss_bytes"]))
        rss_per_port = (high["peak_rss_bytes"] - low["peak_rss_bytes"]) / (high["ports"] - low["ports"])
    return {
        "bench": "overhead",
        "boards": "zero-latency, separate process (factoryd sim hub), real PTYs",
        "runs": runs,
        "rss_per_port_bytes": round(rss_per_port) if rss_per_port is not None else None,
        "rss_per_port_mib": round(rss_per_port / 2**20, 4) if rss_per_port is not None else None,
        "max_cpu_ms_per_device": max(r["cpu_ms_per_device"] for r in runs),
        "max_ratio": max(r["ratio"] for r in runs),
        "targets": {"cpu_ms_per_device": TARGET_CPU_MS_PER_DEVICE, "ratio": TARGET_RATIO},
        **machine_info(speed),
    }


def single_main(
    ports: int, *, profile: bool = False, loop: str = "asyncio", affinity: str = "auto"
) -> dict[str, Any]:
    """Entry for the child process: asyncio's loop or uvloop, the CPUs set as ``factoryd run`` sets them.

    ``affinity`` is ``[station] cpu_affinity``: "auto" (the daemon's default: all its threads on one
    CPU, applied before the loop and the ledger's worker exist, its helper threads yielding to the
    loop, as ``factoryd run`` does) or "all".
    The boards' ``factoryd sim hub`` process runs on the CPUs the daemon is not pinned to (when there
    are any): on a line the boards are hardware of their own, not the daemon's CPU.
    """
    allowed = frozenset(os.sched_getaffinity(0))
    cpus = apply_cpu_affinity("auto" if affinity == "auto" else "all")
    yield_helper_threads(cpus is not None)
    board_cpus = ((allowed - cpus) or None) if cpus is not None else None
    result = run_event_loop(
        lambda: run_single(ports, devices_for(ports), profile=profile, board_cpus=board_cpus), loop
    )
    result["loop"] = loop
    result["affinity"] = affinity
    result["cpus"] = sorted(cpus) if cpus is not None else None
    result["board_cpus"] = sorted(board_cpus) if board_cpus is not None else None
    return result
