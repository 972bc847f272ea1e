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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from factoryd.bench.harness import RemoteRun, run_remote_line
from factoryd.demo import DemoProfile

# Boards for the one-at-a-time baseline: enough for a stable mean, short enough to be cheap.
BASELINE_BOARDS = 6
# The SMP upload figure's image: the demo lot's size (16 KiB of payload).
SMP_PROBE_IMAGE_BYTES = 16 * 1024


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
    profile: DemoProfile = "factoryd-v1",
) -> dict[str, Any]:
    """Run the baseline and the line; return both with efficiency and speed-up."""
    with tempfile.TemporaryDirectory(prefix="factoryd-bench-") as tmp:
        one_dir, line_dir = Path(tmp) / "one", Path(tmp) / "line"
        one_dir.mkdir()
        line_dir.mkdir()
        baseline = await run_remote_line(
            one_dir, ports=1, devices=BASELINE_BOARDS, timing=timing, flash=flash, lock=lock, profile=profile
        )
        line = await run_remote_line(
            line_dir, ports=ports, devices=devices, timing=timing, flash=flash, lock=lock, profile=profile
        )
    one = _summary(baseline)
    many = _summary(line)
    if profile == "mcumgr" and flash and timing == "realistic":
        many["smp_upload"] = await smp_upload_figures()
        # A board built for throughput (CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE=2048): fewer, larger chunks.
        many["smp_upload_netbuf_2048"] = await smp_upload_figures(buf_size=2048)
    one_rate = one["achieved_devices_per_hour"]
    speedup = many["achieved_devices_per_hour"] / one_rate if one_rate else None
    return {
        "bench": "line",
        "timing": timing,
        "firmware_update": flash,
        "profile": profile,
        "boards": "separate process (factoryd sim hub), real PTYs",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "one_board_at_a_time": one,
        "line": many,
        "efficiency": many["efficiency"],
        "speedup_vs_one_at_a_time": round(speedup, 2) if speedup else None,
    }


async def smp_upload_figures(image_bytes: int = SMP_PROBE_IMAGE_BYTES, buf_size: int = 384) -> dict[str, Any]:
    """One SMP image upload to a realistic simulated board over a PTY: bytes/s against the link's limit.

    The link's byte limit is baud / 10 (8N1); SMP over a console spends base64 (4/3), line markers,
    the length and CRC, the CBOR keys and the board's replies on top, and the board writes flash.
    """
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - only this figure needs them

    from factoryd.protocol.mcumgr import McumgrClient  # noqa: PLC0415
    from factoryd.sim.mcuboot_signer import sign_image  # noqa: PLC0415
    from factoryd.sim.mcumgr import McumgrTiming, SimMcumgrBoard  # noqa: PLC0415
    from factoryd.sim.pty import serve_pty  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    image = sign_image(bytes(range(256)) * (image_bytes // 256), key, "2.0.0")
    timing = replace(McumgrTiming.realistic(), jitter=0.0)
    board = SimMcumgrBoard(firmware_key=key.public_key(), timing=timing, buf_size=buf_size)
    async with serve_pty(board) as pty, await McumgrClient.open(pty.path) as client:
        params = await client.read_params()
        sent_before = client.link.stats.bytes_sent
        started = time.perf_counter()
        await client.upload(image)
        upload_s = time.perf_counter() - started
        wire = client.link.stats.bytes_sent - sent_before
    limit = (timing.baudrate or 0) / 10
    achieved = len(image) / upload_s
    return {
        "image_bytes": len(image),
        "buf_size": params.buf_size,
        "upload_s": round(upload_s, 3),
        "achieved_bytes_per_s": round(achieved),
        "link_byte_limit_per_s": round(limit),
        "fraction_of_link_limit": round(achieved / limit, 3) if limit else None,
        "host_wire_bytes_per_image_byte": round(wire / len(image), 3),
        # What the framing alone allows (base64, markers, CBOR keys): the link limit over that ratio.
        "framing_ceiling_bytes_per_s": round(limit * len(image) / wire) if wire else None,
    }
