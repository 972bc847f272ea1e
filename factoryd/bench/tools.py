"""``factoryd bench tools``: what one external tool run (uhubctl, a flasher) costs the daemon.

A station with a uhubctl hub runs two commands a board. The figure that matters is the CPU and the
stopped event loop in the daemon's process, which grows with the process's size when the child is
started by ``fork()`` (uvloop's way: the page tables are copied) and does not with ``vfork()``
(``subprocess.Popen``, which ``procs.run_tool`` uses). Both are measured, alternating, in this process
grown to the size of a daemon (``rss_mib``), on the loop the daemon runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from factoryd.bench.machine import machine_info, python_speed_s
from factoryd.cli.opts import event_loop_for, run_event_loop
from factoryd.procs import run_tool

# The tool: a real executable that does nothing, so what is measured is the start and the wait.
TOOL = ("/bin/true",)
ROUNDS = 5
# The size of a station daemon at 256 ports (docs/performance.md: ~150 MiB).
DEFAULT_RSS_MIB = 150
BALLAST_CHUNK = 1 << 16


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def _grow_to(rss_mib: int) -> list[bytearray]:
    """Touched memory until this process holds ``rss_mib`` MiB (as much as a running daemon)."""
    ballast: list[bytearray] = []
    while _rss_mib() < rss_mib:
        ballast.append(bytearray(b"\1" * BALLAST_CHUNK))
    return ballast


async def _loop_spawn() -> None:
    proc = await asyncio.create_subprocess_exec(
        *TOOL,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    await proc.communicate()


async def _run_tool() -> None:
    await run_tool(TOOL, 30.0)


async def _measure(runs: int) -> dict[str, dict[str, float]]:
    ways = {"run_tool": _run_tool, "loop.subprocess_exec": _loop_spawn}
    cpu = dict.fromkeys(ways, 0.0)
    wall = dict.fromkeys(ways, 0.0)
    for way in ways.values():  # warm-up: the executor's thread, the loop's child watcher
        await way()
    per_round = max(runs // ROUNDS, 1)
    for _ in range(ROUNDS):
        for name, way in ways.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(per_round):
                await way()
            cpu[name] += time.process_time() - c0
            wall[name] += time.perf_counter() - w0
    total = per_round * ROUNDS
    return {
        name: {
            "cpu_ms_per_run": round(cpu[name] / total * 1000, 3),
            "wall_ms_per_run": round(wall[name] / total * 1000, 3),
        }
        for name in ways
    }


def run_tools_bench(runs: int = 100, *, rss_mib: int = DEFAULT_RSS_MIB, loop: str = "auto") -> dict[str, Any]:
    """Start ``runs`` tool runs each way in a process of ``rss_mib`` MiB on ``loop``; CPU and wall per run."""
    speed = python_speed_s()
    ballast = _grow_to(rss_mib)
    chosen = event_loop_for(loop)
    figures = run_event_loop(lambda: _measure(runs), chosen)
    result: dict[str, Any] = {
        "bench": "tools",
        "tool": " ".join(TOOL),
        "loop": chosen,
        "rss_mib": round(_rss_mib()),
        "runs_each": max(runs // ROUNDS, 1) * ROUNDS,
        "ways": figures,
        "daemon_uses": "run_tool",
        **machine_info(speed),
    }
    del ballast
    return result
