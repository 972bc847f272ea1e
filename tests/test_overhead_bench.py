"""`factoryd bench overhead`: the floor it measures, the commits it counts, many ports, descriptor limits.

No timing is asserted (speed is the benchmark's to report): the tests check that the figures are
there, consistent, and measured rather than assumed. A line of ``MANY_PORTS`` ports (64 in CI; set
``MANY_PORTS=1024`` by hand) provisions every board through the production daemon against a
separate `factoryd sim hub` process.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from factoryd.bench.floor import CommitCounter, run_floor
from factoryd.bench.harness import run_remote_line
from factoryd.bench.layers import LayerProfiler, layer_of, thread_cpu_s
from factoryd.bench.overhead import run_single
from factoryd.ledger import Ledger
from factoryd.limits import fds_needed, raise_open_files_limit

MANY_PORTS = int(os.environ.get("MANY_PORTS", "64"))


def test_the_floor_does_the_crypto_and_the_commits_it_is_asked_for(tmp_path: Path) -> None:
    result = run_floor(boards=5, transactions_per_board=3)
    assert result["boards"] == 5
    assert result["transactions_per_board"] == 3
    assert result["floor_ms_per_board"] > 0
    assert result["crypto_ms_per_board"] > 0
    assert result["ledger_ms_per_board"] > 0


def test_the_commit_counter_counts_write_transactions_only(tmp_path: Path) -> None:
    counter = CommitCounter()
    counter.install()
    with Ledger.open(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        before = counter.commits
        ledger.audit(actor="t", action="note", subject="a", details={})
        ledger.audit(actor="t", action="note", subject="b", details={})
        ledger.list_lots()  # a read transaction: not a durable write
        assert counter.commits - before == 2


def test_layers_are_named_by_module_and_builtin() -> None:
    assert layer_of("/x/factoryd/transport/framing.py", "feed") == "framing"
    assert layer_of("/x/factoryd/transport/serial_link.py", "send") == "serial path"
    assert layer_of("~", "<built-in method posix.write>") == "serial path"
    assert layer_of("/x/factoryd/protocol/engine.py", "call") == "request engine"
    assert layer_of("/x/factoryd/ledger/aio.py", "_run") == "ledger"
    assert layer_of("/x/factoryd/pki/issuer.py", "issue") == "PKI"
    assert layer_of("/x/factoryd/telemetry/metrics.py", "port_update") == "telemetry"
    assert layer_of("/x/factoryd/jobs/pipeline.py", "_step") == "pipeline"
    assert layer_of("/usr/lib/python3.11/asyncio/base_events.py", "_run_once") == "event loop"
    assert layer_of("/x/elsewhere.py", "f") == "other"
    assert os.getpid() in thread_cpu_s()  # the main thread's id is the process id


def test_the_profiler_splits_the_loop_threads_time_into_shares() -> None:
    profiler = LayerProfiler()
    profiler.start()
    sum(i * i for i in range(20000))
    profiler.stop()
    shares = profiler.layer_shares()
    assert shares
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert "event loop thread" in profiler.threads()


async def test_a_single_run_reports_floor_ratio_and_counted_commits() -> None:
    result = await run_single(ports=2, devices=6)
    assert result["provisioned"] == 6
    assert result["duplicate_ids"] == 0
    # Counted in the run (BEGIN IMMEDIATE … COMMIT on the daemon's connections), not assumed.
    assert result["sqlite_commits_per_device"] >= 2
    assert result["floor"]["transactions_per_board"] == round(result["sqlite_commits_per_device"])
    assert result["ratio"] == round(result["cpu_ms_per_device"] / result["floor_ms_per_device"], 2)


async def test_a_line_of_many_ports_provisions_every_board(tmp_path: Path) -> None:
    devices = 2 * MANY_PORTS
    run = await run_remote_line(tmp_path, ports=MANY_PORTS, devices=devices, timing="zero")
    assert run.outcomes == {"provisioned": devices}
    assert run.duplicate_ids == 0
    finished = [b for b in run.inventory if b["where"] == "finished"]
    assert len(finished) == devices
    assert all(b["locked"] and b["device_id"] for b in finished)
    assert Counter(b["device_id"] for b in finished).most_common(1)[0][1] == 1


class _HubAffinityProbe:
    """Reads, when the window opens, the CPUs every thread of the ``factoryd sim hub`` child may use."""

    def __init__(self) -> None:
        self.cpus: list[frozenset[int]] = []

    def start(self) -> None:
        children = set()
        for tid in os.listdir("/proc/self/task"):
            children.update(Path(f"/proc/self/task/{tid}/children").read_text().split())
        for pid in children:
            if b"sim\0hub" in Path(f"/proc/{pid}/cmdline").read_bytes():
                for tid in os.listdir(f"/proc/{pid}/task"):
                    self.cpus.append(frozenset(os.sched_getaffinity(int(tid))))

    def stop(self) -> None:
        pass


async def test_the_boards_process_runs_on_the_cpus_it_is_given(tmp_path: Path) -> None:
    # bench overhead pins the daemon to one CPU and gives the boards the others (real boards never
    # share the station's CPU); here the boards get one CPU, whatever this process may use.
    board_cpus = frozenset({max(os.sched_getaffinity(0))})
    probe = _HubAffinityProbe()
    run = await run_remote_line(
        tmp_path, ports=2, devices=4, timing="zero", probe=probe, board_cpus=board_cpus
    )
    assert run.outcomes == {"provisioned": 4}
    assert len(probe.cpus) >= 1  # the hub process and its threads were found while the line ran
    assert set(probe.cpus) == {board_cpus}


@pytest.fixture
def low_soft_limit() -> Iterator[tuple[int, int]]:
    """The soft RLIMIT_NOFILE lowered to 512 for the test, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < fds_needed(1024):
        pytest.skip(f"the hard limit {hard} is below what 1,024 ports need")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        yield 512, hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_descriptor_limit_is_raised_for_1024_ports(low_soft_limit: tuple[int, int]) -> None:
    assert raise_open_files_limit(1024) == fds_needed(1024)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == fds_needed(1024)
    # Never lowered: fewer ports leave it as it is.
    assert raise_open_files_limit(8) == fds_needed(1024)
    # The raised limit is usable: descriptors beyond 1024 open.
    handles: list[int] = []
    try:
        handles.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(1100))
        assert max(handles) >= 1024
    finally:
        for fd in handles:
            os.close(fd)


def test_a_limit_that_cannot_be_raised_is_logged_not_fatal(
    low_soft_limit: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_args: object) -> None:
        raise PermissionError("setrlimit refused by the system-call filter")

    monkeypatch.setattr(resource, "setrlimit", refused)
    with structlog.testing.capture_logs() as logs:
        assert raise_open_files_limit(1024) == 512
    assert logs[0]["event"] == "open-files limit too low for the hub"
    assert "LimitNOFILE" in logs[0]["fix"]
