"""External tools run from the event loop without copying the daemon: ``run_tool``.

uvloop starts a child with libuv's ``fork()``, which copies the page tables of the whole daemon
(~150 MiB and up): 7-14 ms of the daemon's CPU and 16-31 ms with its event loop stopped, per command,
on the machine of docs/performance.md (#20g, ``factoryd bench tools``). A station switching its ports
with ``uhubctl`` runs two commands a board. ``subprocess.Popen`` uses ``vfork()`` (no copy: ~1 ms), so
tools start through it whatever the loop, and the blocking wait for the tool's output runs in a thread
of the tools' own pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from factoryd.limits import helper_thread_started

# How long to wait for a killed tool's output to close (it is SIGKILLed, process group and all).
KILL_GRACE_S = 5.0
# Threads that wait for tools: their own pool, one per tool running at once (a flasher takes minutes
# on every port of a 1 024-port line; the loop's default executor, which opens the ttys, stays free).
TOOL_THREADS_MAX = 1024

_waiters: ThreadPoolExecutor | None = None


def _tool_waiters() -> ThreadPoolExecutor:
    """The pool of threads waiting for tools (created on first use; threads start as needed)."""
    global _waiters  # noqa: PLW0603 - one pool per process, made lazily
    if _waiters is None:
        _waiters = ThreadPoolExecutor(
            max_workers=TOOL_THREADS_MAX,
            thread_name_prefix="factoryd-tool",
            initializer=helper_thread_started,
        )
    return _waiters


@dataclass(frozen=True)
class ToolResult:
    """What a finished tool returned and printed (``stderr`` is empty when merged into ``stdout``)."""

    returncode: int
    stdout: bytes
    stderr: bytes


async def run_tool(argv: Sequence[str], timeout_s: float, *, merge_stderr: bool = False) -> ToolResult:
    """Run ``argv`` in its own process group with no input; its output once it exits.

    OSError when it cannot start (FileNotFoundError, PermissionError); TimeoutError after
    ``timeout_s``. On a timeout or a cancellation the whole process group is killed and reaped
    before this returns: no zombie and no orphan is left behind.
    """
    # Popen on the loop on purpose: vfork + exec returns in ~1 ms (see above); the wait is threaded.
    proc = subprocess.Popen(  # noqa: S603, ASYNC220 - the caller's configured tool, no shell
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        # Its own process group, so a kill reaches anything it started.
        start_new_session=True,
    )
    output = asyncio.get_running_loop().run_in_executor(_tool_waiters(), proc.communicate)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await asyncio.shield(output)
    finally:
        if not output.done():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # The thread's communicate() returns once the group is gone (and reaps the child).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_GRACE_S):
                    await asyncio.shield(output)
    return ToolResult(proc.returncode if proc.returncode is not None else -1, out, err or b"")
