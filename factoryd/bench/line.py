"""`factoryd bench line`: line throughput against the physical limit, and against one board at a time.

The limit model: a board takes a fixed amount of physical time — USB enumeration after power-on,
firmware boot, key generation and signing in the secure element, storage writes, and every byte
of the conversation at the line's baud rate — which the simulator accounts per board as
``physical_s``. In steady state N ports can at best finish N boards per ``physical_s``
(``N * 3600 / mean(physical_s)`` devices per hour). For a finite batch the best case is the
makespan of feeding the same boards, in the same order, to the first free port with zero
overhead (``ideal_window_s``). Efficiency = ideal window / the window the real daemon code took
from the first job's start to the last job's end.
The one-board-at-a-time baseline (connect, provision, swap; swap time not counted) is the same
code with one port, measured in the same run.
"""

from __future__ import annotations

import heapq
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Literal

from factoryd.bench.harness import RemoteRun, run_remote_line

# Boards for the one-at-a-time baseline: enough for a stable mean, short enough to be cheap.
BASELINE_BOARDS = 6


def ideal_makespan_s(physical_s: list[float], ports: int) -> float:
    """The best possible time for these boards on ``ports`` ports with zero overhead.

    Boards are fed in order, each to the first port that becomes free (what the simulated
    operator does), so the tail where fewer boards than ports are left counts as physics too.
    """
    free_at = [0.0] * ports
    heapq.heapify(free_at)
    for seconds in physical_s:
        heapq.heappush(free_at, heapq.heappop(free_at) + seconds)
    return max(free_at)


def _summary(run: RemoteRun) -> dict[str, Any]:
    window = run.window_s
    achieved = run.provisioned / window * 3600 if window > 0 else 0.0
    steady_limit = run.ports * 3600 / run.physical_s_mean if run.physical_s_mean > 0 else 0.0
    boards = sorted((b for b in run.inventory if b["where"] == "finished"), key=lambda b: b["sequence"])
    ideal = ideal_makespan_s([b["physical_s"] for b in boards], run.ports)
    limit = len(boards) / ideal * 3600 if ideal > 0 else 0.0
    return {
        **run.summary(),
        "ideal_window_s": round(ideal, 4),
        "limit_devices_per_hour": round(limit, 1),
        "steady_state_limit_devices_per_hour": round(steady_limit, 1),
        "achieved_devices_per_hour": round(achieved, 1),
        "efficiency": round(ideal / window, 4) if window > 0 else None,
    }


async def run_line_bench(
    ports: int,
    devices: int,
    *,
    timing: Literal["zero", "realistic"] = "realistic",
    flash: bool = False,
    lock: bool = True,
) -> dict[str, Any]:
    """Run the baseline and the line; return both with efficiency and speed-up."""
    with tempfile.TemporaryDirectory(prefix="factoryd-bench-") as tmp:
        one_dir, line_dir = Path(tmp) / "one", Path(tmp) / "line"
        one_dir.mkdir()
        line_dir.mkdir()
        baseline = await run_remote_line(
            one_dir, ports=1, devices=BASELINE_BOARDS, timing=timing, flash=flash, lock=lock
        )
        line = await run_remote_line(
            line_dir, ports=ports, devices=devices, timing=timing, flash=flash, lock=lock
        )
    one = _summary(baseline)
    many = _summary(line)
    one_rate = one["achieved_devices_per_hour"]
    speedup = many["achieved_devices_per_hour"] / one_rate if one_rate else None
    return {
        "bench": "line",
        "timing": timing,
        "firmware_update": flash,
        "boards": "separate process (factoryd sim hub), real PTYs",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "one_board_at_a_time": one,
        "line": many,
        "efficiency": many["efficiency"],
        "speedup_vs_one_at_a_time": round(speedup, 2) if speedup else None,
    }
