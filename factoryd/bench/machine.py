"""What a benchmark ran on, so that figures from different machines can be put side by side.

The daemon's CPU per board is mostly the interpreter's work; the floor it is compared with is mostly
C (OpenSSL, SQLite) and the kernel's. Their ratio therefore moves with the machine: a machine whose
pure-Python loop is three times slower makes the daemon about three times dearer and the floor
hardly so. ``python_10m_adds_s`` records that speed with every result (docs/performance.md).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

# The calibration loop: the best of CALIBRATION_REPEATS runs of CALIBRATION_ADDS additions, reported
# as seconds per 10 million (the figure the notes in docs/performance.md use). ~1.5 s on a slow VM.
CALIBRATION_ADDS = 3_000_000
CALIBRATION_REPEATS = 3
REPORTED_ADDS = 10_000_000


def python_speed_s(adds: int = CALIBRATION_ADDS, repeats: int = CALIBRATION_REPEATS) -> float:
    """Seconds a pure-Python loop of 10 million additions takes here (best of ``repeats``, scaled)."""
    if adds <= 0 or repeats <= 0:
        raise ValueError("the calibration needs at least one addition and one run")
    # At module level (names in a dict, as in ``python -c``), the loop the notes have always timed:
    # in a function (fast locals) the same loop runs about four times faster.
    loop = compile(f"total = 0\nfor i in range({adds}):\n    total += i\n", "<calibration>", "exec")
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        exec(loop, {})  # noqa: S102 - our own constant loop
        best = min(best, time.perf_counter() - started)
    return round(best * REPORTED_ADDS / adds, 3)


def machine_info(python_speed: float) -> dict[str, Any]:
    """The interpreter, CPU count, calibrated Python speed and current load, for a benchmark's JSON."""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "python_10m_adds_s": python_speed,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
