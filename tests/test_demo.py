"""`factoryd demo`: reproducible, stoppable from the terminal, usable on its own and afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from factoryd.cli.main import app
from factoryd.daemon import Daemon
from factoryd.demo import DemoOptions, DemoResult, run_demo
from tests.helpers.mqtt_broker import free_port

runner = CliRunner()
FACTORYD = [sys.executable, "-m", "factoryd"]
PTY_DEMO_START_TIMEOUT_S = 60.0
PTY_DEMO_EXIT_TIMEOUT_S = 30.0


def _ok(*args: str) -> tuple[str, str]:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_demo_json_is_the_last_line_with_one_key_per_figure(tmp_path: Path) -> None:
    stdout, _ = _ok("demo", "--devices", "6", "--ports", "3", "--state-dir", str(tmp_path / "demo"), "--json")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["devices"] == 6
    assert summary["provisioned"] + summary["failed"] == 6
    assert summary["duplicate_ids"] == 0
    assert summary["certificates_verified"] == summary["provisioned"]
    assert summary["elapsed_s"] > 0
    assert "certs_verified" not in summary
    assert "devices_per_hour" not in summary
    assert summary["provisioned_per_hour"] > 0


async def test_same_seed_gives_the_same_boards_outcomes_and_reasons(tmp_path: Path) -> None:
    def options(run: int) -> DemoOptions:
        return DemoOptions(ports=4, boards=20, fault_rate=0.2, seed=1, state_dir=tmp_path / f"run-{run}")

    first = await run_demo(options(1))
    second = await run_demo(options(2))
    assert first.boards_failed > 0
    assert [(b.position, b.serial) for b in first.boards] == [(b.position, b.serial) for b in second.boards]
    assert first.boards == second.boards
    assert first.failures == second.failures
    assert first.outcomes == second.outcomes


async def test_another_seed_gives_other_boards(tmp_path: Path) -> None:
    one = await run_demo(DemoOptions(ports=2, boards=3, seed=1, state_dir=tmp_path / "a"))
    two = await run_demo(DemoOptions(ports=2, boards=3, seed=2, state_dir=tmp_path / "b"))
    assert {b.serial for b in one.boards}.isdisjoint({b.serial for b in two.boards})


def test_closing_the_terminal_stops_the_demo_and_frees_its_ports(tmp_path: Path) -> None:
    api_port, metrics_port = free_port(), free_port()
    master, slave = pty.openpty()
    # The child becomes a session leader with the pty as its controlling terminal, like a shell's job:
    # closing the terminal's master side makes the kernel send it SIGHUP.
    take_tty = (
        "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    args = [*FACTORYD, "demo", "--devices", "100000", "--ports", "2", "--timing", "realistic"]
    args += ["--api-port", str(api_port), "--metrics-port", str(metrics_port), "--state-dir", str(tmp_path)]
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(  # noqa: S603 - our own argument list
            [sys.executable, "-c", take_tty, *args],
            stdin=slave,
            stdout=slave,
            stderr=err,
            start_new_session=True,
        )
    os.close(slave)
    try:
        deadline = time.monotonic() + PTY_DEMO_START_TIMEOUT_S
        while "/station" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            # Keep the terminal drained, as a terminal window would.
            if select.select([master], [], [], 0.2)[0]:
                os.read(master, 65536)
        assert "/station" in log.read_text(), log.read_text()
        assert not _port_free(api_port)
        assert not _port_free(metrics_port)
    finally:
        os.close(master)  # the terminal window closes
    try:
        code = proc.wait(timeout=PTY_DEMO_EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGHUP, log.read_text()[-3000:]
    assert _port_free(api_port)
    assert _port_free(metrics_port)


def _read_until(master: int, proc: subprocess.Popen[bytes], marker: bytes, timeout_s: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout_s
    while marker not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:  # EIO: the child closed its side of the terminal
                break
        elif proc.poll() is not None:
            break
    return seen


def test_on_a_terminal_the_page_keeps_serving_after_the_last_board_until_ctrl_c(tmp_path: Path) -> None:
    api_port = free_port()
    master, slave = pty.openpty()
    args = [*FACTORYD, "demo", "--devices", "2", "--ports", "1", "--api-port", str(api_port)]
    proc = subprocess.Popen(  # noqa: S603 - our own argument list
        [*args, "--state-dir", str(tmp_path)], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    try:
        seen = _read_until(master, proc, b"Ctrl-C ends the demo", PTY_DEMO_START_TIMEOUT_S)
        assert b"keeps serving" in seen, seen.decode(errors="replace")
        time.sleep(0.5)
        assert proc.poll() is None
        assert not _port_free(api_port)
        proc.send_signal(signal.SIGINT)
        seen += _read_until(master, proc, b"audit verify -c", PTY_DEMO_EXIT_TIMEOUT_S)
        code = proc.wait(timeout=PTY_DEMO_EXIT_TIMEOUT_S)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, seen.decode(errors="replace")
    assert b"Try next:" in seen
    assert b"stopped early" not in seen
    assert _port_free(api_port)


def test_demo_with_the_api_says_where_its_page_and_tokens_are(tmp_path: Path) -> None:
    api_port = free_port()
    state = tmp_path / "demo"
    stdout, stderr = _ok(
        "demo", "--devices", "2", "--ports", "1", "--api-port", str(api_port), "--state-dir", str(state)
    )
    assert f"http://127.0.0.1:{api_port}/station" in stderr
    token = re.search(r"operator token (\S+)\)", stderr)
    assert token is not None
    assert (state / "operator.token").read_text().strip() == token.group(1)
    supervisor_file = state / "supervisor.token"
    assert supervisor_file.stat().st_mode & 0o777 == 0o600
    assert f"factoryd status -c {state / 'factoryd.toml'} --token-file {supervisor_file}" in stderr
    assert f"state directory {state}" in stderr
    assert "http://" not in stdout  # the summary stays on stdout, the notices on stderr


async def test_summary_status_and_metrics_show_the_same_figures(tmp_path: Path) -> None:
    api_port, metrics_port = free_port(), free_port()
    seen: dict[str, object] = {}

    async def look(daemon: Daemon) -> None:
        # /metrics has a lot's counts as of the station's last progress publication (periodic).
        assert daemon.station is not None
        await daemon.station.publish_progress()
        token = (tmp_path / "supervisor.token").read_text().strip()
        async with httpx.AsyncClient() as client:
            status = await client.get(
                f"http://127.0.0.1:{api_port}/status", headers={"Authorization": f"Bearer {token}"}
            )
            metrics = await client.get(f"http://127.0.0.1:{metrics_port}/metrics")
        seen["status"] = status.json()
        seen["metrics"] = metrics.text
        cli = [
            "status",
            "-c",
            str(tmp_path / "factoryd.toml"),
            "--token-file",
            str(tmp_path / "supervisor.token"),
        ]
        seen["cli"] = (await asyncio.to_thread(runner.invoke, app, cli)).output

    result: DemoResult = await run_demo(
        DemoOptions(
            ports=3,
            boards=12,
            fault_rate=0.1,
            seed=4,
            state_dir=tmp_path,
            api_port=api_port,
            metrics_port=metrics_port,
            on_finished=look,
        )
    )
    status = seen["status"]
    assert isinstance(status, dict)
    assert status["outcomes"].get("provisioned", 0) == result.provisioned
    (lot,) = [lot for lot in status["lots"] if lot["lot"] == result.lot]
    assert lot["provisioned"] == result.lot_provisioned == result.provisioned
    metrics = str(seen["metrics"])
    provisioned_metric = re.search(r"^factoryd_provisioned_total (\S+)$", metrics, re.MULTILINE)
    assert provisioned_metric is not None
    assert float(provisioned_metric.group(1)) == result.provisioned
    lot_metric = re.search(
        rf'^factoryd_lot_ids\{{lot="{result.lot}",state="provisioned"\}} (\S+)$', metrics, re.MULTILINE
    )
    assert lot_metric is not None
    assert float(lot_metric.group(1)) == result.lot_provisioned
    cli = str(seen["cli"])
    assert f"provisioned {result.provisioned}" in cli
    assert f"lot {result.lot}: {result.lot_provisioned} provisioned" in cli
    assert "provisioned/h (last " in cli
    # The rate moves with the clock (the status was read a moment before the summary's end, and a
    # faster station makes the window shorter), but the count behind it does not: every board of the
    # run ended inside the status's window, which began when the station started.
    assert status["rate_window_s"] > 0
    assert round(status["units_per_hour"] * status["rate_window_s"] / 3600) == result.provisioned
    assert round(result.rate.per_hour * result.rate.window_s / 3600) == result.provisioned


def test_rerun_in_the_same_state_dir_says_what_to_do(tmp_path: Path) -> None:
    state = str(tmp_path / "demo")
    _ok("demo", "--devices", "2", "--ports", "1", "--state-dir", state)
    again = runner.invoke(app, ["demo", "--devices", "2", "--ports", "1", "--state-dir", state])
    assert again.exit_code == 2
    assert "already exists" in again.stderr
    assert "--lot" in again.stderr
    assert "--resume" in again.stderr
    assert "Traceback" not in again.output
    stdout, _ = _ok(
        "demo", "--devices", "2", "--ports", "1", "--state-dir", state, "--lot", "lot-2", "--json"
    )
    assert json.loads(stdout.strip().splitlines()[-1])["provisioned"] == 2


def test_warnings_go_to_stderr_and_the_summary_counts_faults(tmp_path: Path) -> None:
    stdout, stderr = _ok(
        "demo",
        "--devices",
        "10",
        "--ports",
        "2",
        "--faults",
        "0.3",
        "--seed",
        "2",
        "--state-dir",
        str(tmp_path),
    )
    assert "[warning" in stderr
    assert "[warning" not in stdout
    assert re.search(r"faults injected +\d+: \d+ recovered by retries, \d+ boards failed", stdout)


def test_a_demo_without_state_dir_removes_its_temp_dir() -> None:
    stdout, _ = _ok("demo", "--devices", "2", "--ports", "1", "--json")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["state_dir_kept"] is False
    assert not Path(summary["state_dir"]).exists()


def test_the_suggested_next_commands_work_as_printed(tmp_path: Path) -> None:
    state = tmp_path / "demo line"  # a space: the commands must quote paths
    stdout, _ = _ok("demo", "--devices", "3", "--ports", "2", "--state-dir", str(state))
    commands = stdout.split("Try next:\n", 1)[1].strip().splitlines()
    assert len(commands) == 3
    env = {k: v for k, v in os.environ.items() if k != "FACTORYD_CA_PASSPHRASE"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    for command in commands:
        done = subprocess.run(  # noqa: S602 - the commands the demo prints, run as a user would
            command.strip(), shell=True, env=env, capture_output=True, text=True, check=False, timeout=60
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)


def test_the_demo_takes_its_passphrase_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACTORYD_CA_PASSPHRASE", "a passphrase of the station's own")
    _ok("demo", "--devices", "2", "--ports", "1", "--state-dir", str(tmp_path))
    assert not (tmp_path / "ca-passphrase").exists()
    _ok("manifest", "export", "demo-lot", "-c", str(tmp_path / "factoryd.toml"))


def test_a_demo_state_dir_is_a_station_without_extra_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FACTORYD_CA_PASSPHRASE", raising=False)
    _ok("demo", "--devices", "3", "--ports", "2", "--state-dir", str(tmp_path))
    config = str(tmp_path / "factoryd.toml")
    shown = json.loads(_ok("lots", "show", "demo-lot", "-c", config)[0])
    assert shown["ids"]["provisioned"] == 3
    _ok("audit", "verify", "-c", config)
    _ok("manifest", "export", "demo-lot", "-c", config)  # signs with the lot's CA key
    _ok("lots", "ca-verification", "demo-lot", "--code", "0123abcd", "-c", config)


async def test_resume_feeds_new_boards_into_the_same_lot(tmp_path: Path) -> None:
    first = await run_demo(DemoOptions(ports=2, boards=3, state_dir=tmp_path))
    again = await run_demo(DemoOptions(ports=2, boards=3, state_dir=tmp_path, resume=True))
    assert again.provisioned == 3
    assert again.lot_provisioned == first.lot_provisioned + 3 == 6
    assert again.certificates_verified == 6
    assert [b.position for b in again.boards] == [4, 5, 6]
    assert {b.serial for b in first.boards}.isdisjoint({b.serial for b in again.boards})
