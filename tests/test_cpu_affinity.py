"""``[station] cpu_affinity``: the daemon's threads on one CPU (#20d, factoryd/limits.py).

Each case that changes the affinity runs in a child process: a pytest worker pinned to one CPU
would stay pinned for every test after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import structlog

from factoryd.config import Settings
from factoryd.errors import ConfigError
from factoryd.limits import apply_cpu_affinity, current_cpu, helper_executor, yield_helper_threads

ALLOWED = sorted(os.sched_getaffinity(0))
CHILD_TIMEOUT_S = 60

# Starts a thread, applies the setting, starts another: every thread's CPUs, and what was applied.
_CHILD = """
import json, os, sys, threading
from factoryd.limits import apply_cpu_affinity

stop = threading.Event()
before = threading.Thread(target=stop.wait, daemon=True)
before.start()
setting = json.loads(sys.argv[1])
applied = apply_cpu_affinity(setting)
after = threading.Thread(target=stop.wait, daemon=True)
after.start()
threads = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
stop.set()
print(json.dumps({"applied": sorted(applied) if applied is not None else None, "threads": threads}))
"""


def _run_child(script: str, argument: object) -> Any:
    """Run ``script`` in a fresh interpreter with ``argument`` as JSON; the JSON it printed last."""
    out = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", script, json.dumps(argument)],
        capture_output=True,
        text=True,
        check=True,
        timeout=CHILD_TIMEOUT_S,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_child(setting: object) -> dict[str, object]:
    result: dict[str, object] = _run_child(_CHILD, setting)
    return result


def test_auto_puts_every_thread_on_one_cpu_and_new_threads_inherit_it() -> None:
    result = _in_child("auto")
    threads = result["threads"]
    assert isinstance(threads, dict)
    assert len(threads) >= 3  # the main thread, one started before, one after
    if len(ALLOWED) < 2:
        # One CPU allowed: nothing to choose, nothing changed.
        assert result["applied"] is None
        assert all(cpus == ALLOWED for cpus in threads.values())
        return
    applied = result["applied"]
    assert isinstance(applied, list)
    assert len(applied) == 1
    assert applied[0] in ALLOWED
    assert all(cpus == applied for cpus in threads.values()), threads


def test_all_leaves_the_threads_to_the_scheduler() -> None:
    result = _in_child("all")
    assert result["applied"] is None
    threads = result["threads"]
    assert isinstance(threads, dict)
    assert all(cpus == ALLOWED for cpus in threads.values())


def test_a_list_names_the_cpus_exactly() -> None:
    wanted = [ALLOWED[-1]]
    result = _in_child(wanted)
    assert result["applied"] == wanted
    threads = result["threads"]
    assert isinstance(threads, dict)
    assert all(cpus == wanted for cpus in threads.values())


def test_cpus_the_process_may_not_use_are_refused_and_nothing_changes() -> None:
    outside = max(ALLOWED) + 1
    with pytest.raises(ConfigError, match=rf"CPUs \[{outside}\] are not among the CPUs this process may use"):
        apply_cpu_affinity([ALLOWED[0], outside])
    assert sorted(os.sched_getaffinity(0)) == ALLOWED


def test_a_refusing_system_call_filter_costs_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the unit's SystemCallFilter answers without sched_setaffinity (SystemCallErrorNumber=EPERM).
    def refused(_tid: int, _cpus: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refused)
    with structlog.testing.capture_logs() as logs:
        assert apply_cpu_affinity([ALLOWED[0]]) is None
    warning = next(entry for entry in logs if entry["event"] == "CPU affinity not applied")
    assert warning["log_level"] == "warning"
    assert "SystemCallFilter" in warning["fix"]
    assert sorted(os.sched_getaffinity(0)) == ALLOWED


def test_current_cpu_is_one_this_thread_may_run_on() -> None:
    assert current_cpu() in ALLOWED


def test_setting_defaults_to_auto_and_refuses_nonsense() -> None:
    assert Settings().station.cpu_affinity == "auto"
    assert Settings.model_validate({"station": {"cpu_affinity": [0, 1]}}).station.cpu_affinity == [0, 1]
    for bad in ("none", [], [-1], ["x"]):
        with pytest.raises(ValueError, match="cpu_affinity"):
            Settings.model_validate({"station": {"cpu_affinity": bad}})


# Helper threads (the ledger's worker, the loop's default executor) with and without yielding.
_HELPERS_CHILD = """
import asyncio, json, os, sys
from factoryd.limits import helper_executor, yield_helper_threads
from factoryd.ledger.aio import _new_executor

yield_helper_threads(json.loads(sys.argv[1]))

async def main():
    loop = asyncio.get_running_loop()
    loop.set_default_executor(helper_executor())
    tty_thread = await loop.run_in_executor(None, os.sched_getscheduler, 0)
    ledger = _new_executor()
    ledger_thread = ledger.submit(os.sched_getscheduler, 0).result()
    ledger.shutdown()
    return {"loop": os.sched_getscheduler(0), "tty": tty_thread, "ledger": ledger_thread}

print(json.dumps(asyncio.run(main())))
"""


def _helper_policies(enabled: bool) -> dict[str, int]:
    policies: dict[str, int] = _run_child(_HELPERS_CHILD, enabled)
    return policies


def test_helper_threads_yield_to_the_loop_when_enabled_and_the_loop_keeps_its_policy() -> None:
    assert _helper_policies(True) == {"loop": os.SCHED_OTHER, "tty": os.SCHED_BATCH, "ledger": os.SCHED_BATCH}


def test_helper_threads_keep_the_normal_policy_unless_enabled() -> None:
    assert _helper_policies(False) == {
        "loop": os.SCHED_OTHER,
        "tty": os.SCHED_OTHER,
        "ledger": os.SCHED_OTHER,
    }


def test_a_filter_refusing_the_policy_costs_a_warning_and_the_thread_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the unit's SystemCallFilter answers without sched_setscheduler (SystemCallErrorNumber=EPERM).
    def refused(_pid: int, _policy: int, _param: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    yield_helper_threads(True)
    try:
        with structlog.testing.capture_logs() as logs, helper_executor() as pool:
            assert pool.submit(os.sched_getscheduler, 0).result() == os.SCHED_OTHER
    finally:
        yield_helper_threads(False)
    warning = next(e for e in logs if e["event"] == "helper thread keeps the normal scheduling policy")
    assert warning["log_level"] == "warning"
    assert "sched_setscheduler" in warning["fix"]
