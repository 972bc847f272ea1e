"""Where the daemon's CPU goes, by layer: `factoryd bench overhead --profile`.

Two measurements over the same window (READY to the last board):

- per-thread CPU from ``/proc/self/task/<tid>/stat``: the event loop thread against the ledger's
  worker thread and the rest (the OS accounts it, nothing is instrumented);
- cProfile on the event loop thread with the thread's CPU clock, each function's own time
  (``tottime``) summed by layer (by the module it is in; built-ins by what they are: a ``write``
  on a tty is the serial path, the selector's ``poll`` the event loop, OpenSSL the PKI).

cProfile slows Python code down more than C code, so its figures are given as *shares* of the
loop thread's profiled time and scaled to the loop thread's unprofiled CPU per board by the
caller; the split is an estimate, the totals are measured.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import threading
import time
from collections import defaultdict
from typing import Any

# (layer, path fragments): the first match wins, so the more specific fragments come first.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("framing", ("factoryd/transport/framing.py", "cobs")),
    ("serial path", ("factoryd/transport/", "serial_asyncio_fast", "/serial/", "posix.write", "posix.read")),
    ("request engine", ("factoryd/protocol/",)),
    ("ledger", ("factoryd/ledger/", "sqlalchemy", "sqlite3", "psycopg", "queue.py", "concurrent/futures")),
    ("PKI", ("factoryd/pki/", "cryptography", "_rust")),
    ("telemetry", ("factoryd/telemetry/", "prometheus_client", "aiomqtt", "paho", "structlog", "logging")),
    ("pipeline", ("factoryd/jobs/", "factoryd/daemon.py", "tenacity")),
    # The bench's hub is a remote process behind a Unix socket (power on/off, supply polling).
    ("hub", ("factoryd/hub/", "factoryd/sim/remote.py", "_socket.socket")),
    ("event loop", ("asyncio/", "selectors.py", "select.epoll", "_contextvars", "heapq")),
)
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def layer_of(filename: str, function: str) -> str:
    """The layer a profiled function belongs to."""
    where = f"{filename}:{function}"
    for layer, fragments in LAYERS:
        if any(fragment in where for fragment in fragments):
            return layer
    return "other"


def stat_cpu_s(path: str, *, children: bool = False) -> tuple[str, float] | None:
    """A process's or thread's command name and CPU seconds (user + system) from its ``stat`` file.

    With ``children``, the CPU of its children that ended and were waited for is added. None if it
    ended meanwhile.
    """
    try:
        with open(path) as fh:
            head, tail = fh.read().rsplit(")", 1)
    except OSError:
        return None
    fields = tail.split()
    # Fields after the command: state is [0], utime [11], stime [12], cutime [13], cstime [14]
    # (proc(5) fields 14-17).
    own = int(fields[11]) + int(fields[12])
    ended = int(fields[13]) + int(fields[14]) if children else 0
    return head.partition("(")[2], (own + ended) / TICKS_PER_S


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native thread id."""
    result: dict[int, float] = {}
    for tid in os.listdir("/proc/self/task"):
        found = stat_cpu_s(f"/proc/self/task/{tid}/stat")
        if found is not None:
            result[int(tid)] = found[1]
    return result


def processes_cpu_s(command: str) -> dict[int, float]:
    """CPU seconds of every process on this machine whose command name is ``command``, by pid.

    Each process's own and its ended children's: a server's connection processes that exit between two
    readings (a client closing its pool) are then counted in their parent's, not lost.
    """
    result: dict[int, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        found = stat_cpu_s(f"/proc/{pid}/stat", children=True)
        if found is not None and found[0] == command:
            result[int(pid)] = found[1]
    return result


class LayerProfiler:
    """A window probe: cProfile on the loop thread plus per-thread CPU, both over the window."""

    def __init__(self) -> None:
        """Not started."""
        # The thread's CPU clock, not the wall clock: time the loop spends waiting in epoll is idle.
        self._profile = cProfile.Profile(time.thread_time)
        self._threads_at_start: dict[int, float] = {}
        self._threads_at_stop: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._loop_tid = 0

    def start(self) -> None:
        """Called on the loop thread when the window opens."""
        self._loop_tid = threading.get_native_id()
        self._threads_at_start = thread_cpu_s()
        self._profile.enable()

    def stop(self) -> None:
        """Called on the loop thread when the window closes."""
        self._profile.disable()
        self._threads_at_stop = thread_cpu_s()
        self._names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}

    def threads(self) -> dict[str, float]:
        """CPU seconds in the window: the loop thread, the ledger worker, everything else."""
        out: dict[str, float] = defaultdict(float)
        for tid, cpu in self._threads_at_stop.items():
            spent = cpu - self._threads_at_start.get(tid, 0.0)
            name = self._names.get(tid, "")
            if tid == self._loop_tid:
                out["event loop thread"] += spent
            elif "ledger" in name:
                out["ledger thread"] += spent
            else:
                out["other threads"] += spent
        return dict(out)

    def layer_shares(self) -> dict[str, float]:
        """Each layer's share of the loop thread's profiled own time (sums to 1)."""
        stats: Any = pstats.Stats(self._profile)
        totals: dict[str, float] = defaultdict(float)
        for (filename, _line, function), row in stats.stats.items():
            totals[layer_of(filename, function)] += row[2]  # tottime
        whole = sum(totals.values()) or 1.0
        return {layer: spent / whole for layer, spent in sorted(totals.items(), key=lambda kv: -kv[1])}

    def top_functions(self, n: int = 15) -> list[dict[str, Any]]:
        """The loop thread's most expensive functions by own time (for the notes)."""
        stats: Any = pstats.Stats(self._profile)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]
        return [
            {
                "function": f"{os.path.basename(filename)}:{line}({function})",
                "layer": layer_of(filename, function),
                "calls": row[1],
                "tottime_s": round(row[2], 4),
            }
            for (filename, line, function), row in rows
        ]
