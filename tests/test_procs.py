"""``procs.run_tool``: external tools (uhubctl, flashers) from the event loop, on both loops the daemon runs.

The tool's whole process group is killed and reaped on a timeout or a cancellation; its output and
exit status come back whole otherwise.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import uvloop

from factoryd.procs import run_tool
from tests.helpers.processes import pid_alive

LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def _spawner(tmp_path: Path) -> list[str]:
    """A tool that starts a grandchild in its process group, writes both pids, then hangs."""
    script = tmp_path / "tool.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(tmp_path / 'pids')!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    return [sys.executable, str(script)]


async def _pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    for _ in range(500):
        if path.exists() and path.read_text():
            return [int(p) for p in path.read_text().split()]
        await asyncio.sleep(0.01)
    raise AssertionError("the tool never started")


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_output_and_exit_status_come_back(loop: str) -> None:
    argv = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]
    result = LOOPS[loop](run_tool(argv, 30.0))
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    merged = LOOPS[loop](run_tool(argv, 30.0, merge_stderr=True))
    assert sorted(merged.stdout.splitlines()) == [b"err", b"out"]
    assert merged.stderr == b""


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_tool_that_hangs_is_killed_with_its_children(loop: str, tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        started = time.monotonic()
        task = asyncio.ensure_future(run_tool(_spawner(tmp_path), 1.0))
        pids = await _pids(tmp_path)
        with pytest.raises(TimeoutError):
            await task
        assert time.monotonic() - started < 10.0
        return pids

    tool, grandchild = LOOPS[loop](scenario())
    assert not pid_alive(tool)  # killed and reaped: no zombie either
    for _ in range(200):  # the grandchild is the init process's to reap once killed
        if not pid_alive(grandchild):
            break
        time.sleep(0.01)
    assert not pid_alive(grandchild)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_cancelling_the_caller_kills_the_tool(loop: str, tmp_path: Path) -> None:
    async def scenario() -> int:
        task = asyncio.ensure_future(run_tool(_spawner(tmp_path), 60.0))
        tool, _ = await _pids(tmp_path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return tool

    assert not pid_alive(LOOPS[loop](scenario()))


def test_a_missing_or_unexecutable_tool_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        asyncio.run(run_tool([str(tmp_path / "no-such-tool")], 5.0))
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        asyncio.run(run_tool([str(plain)], 5.0))


def test_tools_wait_in_their_own_threads_not_the_loops_default_executor() -> None:
    # A line flashing on every port keeps many tools waiting for minutes; the loop's default executor
    # (which opens and closes the ttys) must stay free, and the tools must not queue behind it.
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        release = threading.Event()
        busy = loop.run_in_executor(None, release.wait, 30.0)  # the default executor's only thread
        argv = [sys.executable, "-c", "import time; time.sleep(0.3)"]
        try:
            async with asyncio.timeout(20.0):
                results = await asyncio.gather(*(run_tool(argv, 20.0) for _ in range(4)))
        finally:
            release.set()
            await busy
        return [r.returncode for r in results]

    assert asyncio.run(scenario()) == [0, 0, 0, 0]
