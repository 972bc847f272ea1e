"""Process limits a station needs: open descriptors for every port's tty, and the CPUs it runs on.

A station holds one descriptor per open tty plus a few per port for the hub backend, and a fixed
base (ledger connections, sockets, the event loop's own). Linux's usual soft limit is 1024, which
a 1,024-port hub exceeds; the hard limit (systemd's default: 524 288) is far above. So the daemon
raises its soft limit to what it needs, at most the hard limit, before opening anything. Under the
unit's system-call filter ``setrlimit`` is refused, which is why ``systemd/factoryd.service``
sets ``LimitNOFILE=`` itself; the check then only confirms it.

CPU affinity: the daemon is one event-loop thread plus the ledger's worker thread, and CPython's
GIL lets only one of them run Python at a time. On two cores every hand-over between them (each
SQLite call releases the GIL) is a cross-core wake-up and the objects they share change caches;
kept on one core, the kernel just switches between them. ``bench overhead --affinity all --affinity
auto`` measured 20 % less CPU per board on one core (docs/performance.md), so ``[station]
cpu_affinity = "auto"`` (the default) keeps all the daemon's threads on the CPU the event loop
starts on; other processes move off it under the kernel's load balancing. ``"all"`` leaves the
threads to the scheduler; a list names the CPUs (a core kept free with ``isolcpus``, say).

Helper threads on the loop's CPU (the ledger's worker, the threads that open and close ttys) are
handed work by the loop, and a thread woken on the same CPU preempts the one that woke it: the loop
would stop at once for a thread that cannot run yet (the loop holds the GIL), and the kernel switches
back. Marked ``SCHED_BATCH`` (``yield_helper_threads``, a normal-priority policy that only gives up
wake-up preemption), a helper runs when the loop waits, its work queued meanwhile: 5-9 % less CPU
per board at 8 ports and 12-27 % at 64 and 256 on the machine of #20f (docs/performance.md), and the
ledger's group commits grow (a commit per 5-12 boards at 64 ports and more).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Literal

import structlog

from factoryd.errors import ConfigError

log = structlog.get_logger(__name__)

# Descriptors per port: the tty, and a margin for the hub backend (sysfs attribute files, udev).
FDS_PER_PORT = 3
# Ledger pool, API and metrics sockets, MQTT, the loop's self-pipe and epoll, log files.
FDS_BASE = 256


def fds_needed(ports: int) -> int:
    """Open descriptors a station with ``ports`` ports may hold at once."""
    return FDS_BASE + FDS_PER_PORT * ports


def raise_open_files_limit(ports: int) -> int:
    """Raise the soft RLIMIT_NOFILE to what ``ports`` need (at most the hard limit); the soft limit now.

    Never lowers it. Where the limit cannot be raised (a system-call filter, a low hard limit),
    logs a warning naming the fix and returns the limit as it is: ports beyond it fail to open
    with a clear LinkOpenError instead of the daemon refusing to start.
    """
    needed = fds_needed(ports)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning(
            "open-files limit too low for the hub",
            soft=soft,
            hard=hard,
            needed=needed,
            ports=ports,
            error=str(exc),
            fix="set LimitNOFILE= in the unit (systemd/factoryd.service) or ulimit -n",
        )
        return soft
    if target < needed:
        log.warning("open-files hard limit too low for the hub", hard=hard, needed=needed, ports=ports)
    return target


CpuAffinity = Literal["auto", "all"] | Sequence[int]
# Whether helper threads started from now on take SCHED_BATCH (yield_helper_threads).
_helpers_yield = False


def yield_helper_threads(enabled: bool) -> None:
    """Whether the daemon's helper threads started from now on yield to the loop on wake-up (SCHED_BATCH).

    ``factoryd run`` enables it when its threads share the loop's CPU (``apply_cpu_affinity`` applied a
    set); each helper applies it to itself as it starts (``helper_thread_started``).
    """
    global _helpers_yield  # noqa: PLW0603 - a process-wide policy, like the affinity it goes with
    _helpers_yield = enabled and hasattr(os, "SCHED_BATCH")


def helper_thread_started() -> None:
    """A helper thread's first call (a thread pool's ``initializer``): SCHED_BATCH when enabled.

    Where the system refuses (a system-call filter without ``sched_setscheduler``), logs a warning
    and the thread runs under the normal policy.
    """
    if not _helpers_yield:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        log.warning(
            "helper thread keeps the normal scheduling policy",
            error=str(exc),
            fix="allow sched_setscheduler in the unit's SystemCallFilter=",
        )


def helper_executor() -> ThreadPoolExecutor:
    """The event loop's default executor for the daemon (tty open/close, blocking signers): helper threads."""
    return ThreadPoolExecutor(thread_name_prefix="factoryd-helper", initializer=helper_thread_started)


# /proc/<pid>/task/<tid>/stat, after the command: field 39 ("processor", the CPU it last ran on).
_STAT_PROCESSOR_INDEX = 36


def current_cpu() -> int | None:
    """The CPU the calling thread last ran on (None where /proc does not say)."""
    try:
        with open("/proc/thread-self/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[_STAT_PROCESSOR_INDEX])
    except (OSError, IndexError, ValueError):
        return None


def apply_cpu_affinity(setting: CpuAffinity) -> frozenset[int] | None:
    """Keep every thread of this process on the CPUs ``setting`` names; the set applied (None: unchanged).

    ``"auto"``: the CPU the calling thread is on, when the process may use more than one; ``"all"``:
    nothing changes; a list: exactly those CPUs, which must be among the process's allowed CPUs
    (ConfigError otherwise). Threads started later inherit the set from the thread that starts them.
    Where the system refuses (a system-call filter without ``sched_setaffinity``), logs a warning
    and changes nothing: the station runs, at some CPU cost.
    """
    if setting == "all" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if setting == "auto":
        if len(allowed) < 2:
            return None
        cpu = current_cpu()
        target = frozenset({cpu if cpu in allowed else min(allowed)})
    else:
        target = frozenset(setting)
        outside = sorted(target - allowed)
        if not target or outside:
            raise ConfigError(
                f"[station] cpu_affinity = {sorted(target)}: CPUs {outside} are not among the CPUs this "
                f"process may use ({sorted(allowed)})"
                if outside
                else "[station] cpu_affinity names no CPU"
            )
    try:
        for tid in os.listdir("/proc/self/task"):
            with suppress(ProcessLookupError):  # the thread ended meanwhile
                os.sched_setaffinity(int(tid), target)
    except OSError as exc:
        log.warning(
            "CPU affinity not applied",
            cpus=sorted(target),
            error=str(exc),
            fix="allow sched_setaffinity in the unit's SystemCallFilter=, or set [station] cpu_affinity",
        )
        return None
    log.info("CPU affinity applied", cpus=sorted(target))
    return target
