"""`factoryd bench link`: request/response round trips per second over a real PTY."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from factoryd.protocol.messages import ObjectId
from factoryd.protocol.native import BoardClient
from factoryd.sim.board import SimBoard
from factoryd.sim.pty import serve_pty


async def run_link_bench(seconds: float = 3.0) -> dict[str, Any]:
    """Measure HELLO and 1 KiB WRITE round trips per second to a zero-latency simulated board."""
    board = SimBoard()
    results: dict[str, Any] = {
        "bench": "link",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "transport": "pty + pyserial-asyncio-fast, board in the same process",
    }
    async with serve_pty(board) as pty, await BoardClient.open(pty.path) as client:
        await client.hello()
        for name, call in (
            ("hello", client.hello),
            ("write_1k", lambda: client.write(ObjectId.DEVICE_CERT, b"\x30" * 1024)),
        ):
            count = 0
            started = time.perf_counter()
            cpu_started = time.process_time()
            deadline = started + seconds
            while time.perf_counter() < deadline:
                await call()
                count += 1
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            results[name] = {
                "round_trips": count,
                "per_second": round(count / elapsed, 1),
                "mean_us": round(elapsed / count * 1e6, 1),
                "cpu_us_per_round_trip_host_and_board": round(cpu / count * 1e6, 1),
            }
        results["resends"] = client.stats.resends
    return results
