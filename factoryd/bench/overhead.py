"""`factoryd bench overhead`: what the daemon itself costs per device and per port.

Zero-latency simulated boards run in a separate `factoryd sim hub` process, so their CPU is not
counted. For each port count a fresh child process runs the daemon (so RSS figures do not
carry over between runs) and reports devices per second, daemon CPU seconds per device from
READY to the last board, and peak RSS; RSS per port is the slope between the smallest and the
largest port count.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from factoryd.bench.harness import run_remote_line

DEFAULT_PORTS = (1, 8, 64, 256)
# Enough boards per port count that start-up transients do not dominate.
MIN_DEVICES = 200
DEVICES_PER_PORT = 2


def devices_for(ports: int) -> int:
    """Boards provisioned in a run with that many ports."""
    return max(MIN_DEVICES, DEVICES_PER_PORT * ports)


async def run_single(ports: int, devices: int) -> dict[str, Any]:
    """One run in this process (called in a child by run_overhead_bench)."""
    with tempfile.TemporaryDirectory(prefix="factoryd-overhead-") as tmp:
        run = await run_remote_line(Path(tmp), ports=ports, devices=devices, timing="zero")
    result = run.summary()
    result["devices_per_second"] = round(run.provisioned / run.window_s, 1) if run.window_s else None
    result["cpu_ms_per_device"] = round(run.cpu_s / max(run.provisioned, 1) * 1000, 3)
    result["rss_before_bytes"] = run.rss_before_bytes
    return result


def run_overhead_bench(ports_list: tuple[int, ...] = DEFAULT_PORTS) -> dict[str, Any]:
    """Run each port count in its own child process and aggregate."""
    runs = []
    for ports in ports_list:
        out = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "factoryd", "bench", "overhead", "--single", "--ports", str(ports)],
            capture_output=True,
            check=True,
            text=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rss_per_port = None
    if len(runs) > 1:
        low, high = runs[0], runs[-1]
        rss_per_port = (high["peak_rss_bytes"] - low["peak_rss_bytes"]) / (high["ports"] - low["ports"])
    return {
        "bench": "overhead",
        "boards": "zero-latency, separate process (factoryd sim hub), real PTYs",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "runs": runs,
        "rss_per_port_bytes": round(rss_per_port) if rss_per_port is not None else None,
        "rss_per_port_mib": round(rss_per_port / 2**20, 4) if rss_per_port is not None else None,
        "max_cpu_ms_per_device": max(r["cpu_ms_per_device"] for r in runs),
    }


def single_main(ports: int) -> dict[str, Any]:
    """Entry for the child process."""
    return asyncio.run(run_single(ports, devices_for(ports)))
