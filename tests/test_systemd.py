"""Deployment: the hardened unit, its offline checks, install.sh, and the daemon run the way the unit runs it.

systemd is not PID 1 in CI, so the service manager's side is played by the test: a notify socket
($NOTIFY_SOCKET), a credentials directory ($CREDENTIALS_DIRECTORY), a watchdog ($WATCHDOG_USEC),
the unit's UMask= and SIGTERM/SIGHUP as `systemctl stop/reload` send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from factoryd.config import JobSettings, MqttConfig, PkiSettings
from factoryd.ledger import Ledger
from tests.helpers.station import LOT, make_line

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "factoryd.service"
DROP_INS = ROOT / "systemd" / "drop-ins"
INSTALL = ROOT / "deploy" / "install.sh"
SYSTEMD_CHECK = ROOT / ".ci" / "systemd-check"
# The limit for `systemd-analyze security` (0 = locked down … 10 = exposed).
MAX_EXPOSURE = 2.0
SIM_BOARDS = 4
# $WATCHDOG_USEC for the daemon under test: 0.4 s, so it pings every 0.2 s.
WATCHDOG_USEC = 400_000
NOTIFY_TIMEOUT_S = 30.0
BASH = shutil.which("bash") or "/bin/bash"
SHELLCHECK = shutil.which("shellcheck")


def _unit(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    number = float(match.group(1))
    return number * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[match.group(2)]


# The unit file --------------------------------------------------------------------------------


def test_unit_is_a_notify_service_with_watchdog_and_restart() -> None:
    service = _unit()["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert _seconds(service["WatchdogSec"][0]) >= 10
    assert service["Restart"] == ["on-failure"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ExecStart"] == [
        "/opt/factoryd/venv/bin/factoryd run --config /etc/factoryd/factoryd.toml"
    ]


def test_unit_stop_timeout_exceeds_the_shutdown_grace() -> None:
    service = _unit()["Service"]
    grace_s = JobSettings().shutdown_grace_s
    # Jobs get the grace period, then ports are switched off and progress is published.
    assert _seconds(service["TimeoutStopSec"][0]) >= grace_s + 10


def test_unit_identity_and_credentials() -> None:
    service = _unit()["Service"]
    assert service["User"] == ["factoryd"]
    assert service["SupplementaryGroups"] == ["dialout"]
    assert service["StateDirectory"] == ["factoryd"]
    assert service["StateDirectoryMode"] == ["0700"]
    assert service["UMask"] == ["0077"]
    # The credential name is the one factoryd looks for.
    cred = PkiSettings().passphrase_credential
    assert service["LoadCredential"] == [f"{cred}:/etc/factoryd/ca-passphrase"]
    assert not any("PASSPHRASE" in env for env in service.get("Environment", []))
    mqtt = _unit(DROP_INS / "mqtt-password.conf")["Service"]
    assert mqtt["LoadCredential"] == [f"{MqttConfig().password_credential}:/etc/factoryd/mqtt-password"]


def test_unit_sandbox() -> None:
    service = _unit()["Service"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["DevicePolicy"] == ["closed"]
    assert sorted(service["DeviceAllow"]) == ["char-ttyACM rw", "char-ttyUSB rw"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert service["SystemCallArchitectures"] == ["native"]
    assert "@system-service" in service["SystemCallFilter"]
    # @resources is denied but for the two calls the daemon uses to keep its threads on one CPU
    # ([station] cpu_affinity) and its helper threads yielding there; the allow line must come after
    # the deny line to win.
    filters = service["SystemCallFilter"]
    assert filters.index("sched_setaffinity sched_setscheduler") > filters.index("~@privileged @resources")
    for key in (
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert service[key] == ["yes"], key
    # Write access to sysfs only with the sysfs hub backend's drop-in.
    assert "ReadWritePaths" not in service
    assert _unit(DROP_INS / "hub-sysfs.conf")["Service"]["ReadWritePaths"] == ["/sys/devices/"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_ci_systemd_check_verifies_and_reports_exposure(tmp_path: Path) -> None:
    figure_file = tmp_path / "exposure"
    proc = subprocess.run(  # noqa: S603 - our own script
        [BASH, str(SYSTEMD_CHECK)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EXPOSURE_FILE": str(figure_file)},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify ok (factoryd.service)" in proc.stdout
    assert "verify ok (factoryd.service + hub-sysfs.conf)" in proc.stdout
    exposure = float(figure_file.read_text())
    assert 0.0 < exposure <= MAX_EXPOSURE, proc.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_one_call_allowed_back_is_in_the_denied_set_by_that_name() -> None:
    # systemd's own list: the unit's re-allowed call is a member of @resources (else the line is moot).
    proc = subprocess.run(  # noqa: S603 - fixed arguments
        [str(shutil.which("systemd-analyze")), "syscall-filter", "@resources"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    members = {line.strip() for line in proc.stdout.splitlines() if line.startswith("    ")}
    assert {"sched_setaffinity", "sched_setscheduler"} <= members
    assert "setrlimit" in members  # still denied: LimitNOFILE= is the unit's job


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_ci_systemd_check_fails_on_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "factoryd.service"
    broken.write_text(UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    proc = subprocess.run(  # noqa: S603 - our own script
        [BASH, str(SYSTEMD_CHECK), str(broken)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    assert "Unknown key 'ProtectSytem'" in proc.stderr


# install.sh -----------------------------------------------------------------------------------


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed")
def test_shell_scripts_are_shellcheck_clean() -> None:
    proc = subprocess.run(  # noqa: S603 - fixed arguments
        [str(SHELLCHECK), str(INSTALL), str(SYSTEMD_CHECK)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own script
        [BASH, str(INSTALL), "--skip-venv", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_into_a_prefix_is_complete_and_idempotent(tmp_path: Path) -> None:
    first = _install("--prefix", str(tmp_path))
    assert first.returncode == 0, first.stderr
    etc = tmp_path / "etc" / "factoryd"
    assert (etc / "factoryd.toml").read_text() == (ROOT / "config" / "factoryd.toml").read_text()
    assert _mode(etc) == 0o755
    assert _mode(etc / "factoryd.toml") == 0o644
    assert _mode(etc / "ca-passphrase") == 0o600
    assert len((etc / "ca-passphrase").read_text()) >= 40
    assert "BACK IT UP OFFLINE" in first.stdout
    assert _mode(tmp_path / "var" / "lib" / "factoryd") == 0o700
    units = tmp_path / "etc" / "systemd" / "system"
    assert (units / "factoryd.service").read_text() == UNIT.read_text()
    # The example config uses the sysfs backend: its drop-in only.
    assert sorted(p.name for p in (units / "factoryd.service.d").iterdir()) == ["hub-sysfs.conf"]
    assert (tmp_path / "etc" / "udev" / "rules.d" / "90-factoryd.rules").is_file()
    assert os.access(tmp_path / "usr" / "local" / "sbin" / "factoryd-admin", os.X_OK)
    assert os.readlink(tmp_path / "usr" / "local" / "bin" / "factoryd") == "/opt/factoryd/venv/bin/factoryd"
    # Privileged steps are printed, not run.
    for command in ("useradd --system", "systemctl enable factoryd.service", "chown root:root"):
        assert f"(skipped: prefix mode) {command}" in first.stdout

    passphrase = (etc / "ca-passphrase").read_text()
    (etc / "factoryd.toml").write_text('[hub]\nbackend = "uhubctl"\n')
    (etc / "mqtt-password").write_text("secret\n")
    second = _install("--prefix", str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert (etc / "ca-passphrase").read_text() == passphrase, "never regenerated"
    assert (etc / "factoryd.toml").read_text() == '[hub]\nbackend = "uhubctl"\n', "never overwritten"
    assert "BACK IT UP OFFLINE" not in second.stdout
    # Drop-ins follow the config: uhubctl's replaces sysfs', the MQTT password is picked up.
    assert sorted(p.name for p in (units / "factoryd.service.d").iterdir()) == [
        "hub-uhubctl.conf",
        "mqtt-password.conf",
    ]


def test_install_refuses_a_new_passphrase_over_existing_bundles(tmp_path: Path) -> None:
    (tmp_path / "var" / "lib" / "factoryd" / "bundles" / "lot-1").mkdir(parents=True)
    proc = _install("--prefix", str(tmp_path))
    assert proc.returncode == 1
    assert "restore the passphrase from its backup" in proc.stderr
    assert not (tmp_path / "etc" / "factoryd" / "ca-passphrase").exists()


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    proc = _install("--dry-run", "--prefix", str(tmp_path / "root"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "root").exists()
    assert "install -m 0644" in proc.stdout
    assert "(dry run) write 32 random bytes" in proc.stdout


def test_install_rejects_unknown_options() -> None:
    proc = _install("--frobnicate")
    assert proc.returncode == 2
    assert "unknown option --frobnicate" in proc.stderr


# The daemon as the unit runs it -------------------------------------------------------------------


@contextlib.contextmanager
def _notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An abstract AF_UNIX datagram socket, as systemd's notify socket."""
    name = f"@factoryd-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + name[1:])
        sock.setblocking(False)
        yield sock, name
    finally:
        sock.close()


class _Notifications:
    """Collects sd_notify datagrams."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fields: list[str] = []

    async def wait_for(self, field: str, *, after: int = 0, timeout_s: float = NOTIFY_TIMEOUT_S) -> int:
        """Index of the first `field` received at or after position `after`."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            while True:
                for i in range(after, len(self.fields)):
                    if self.fields[i] == field:
                        return i
                data = await loop.sock_recv(self.sock, 4096)
                self.fields.extend(data.decode().split("\n"))


def _daemon_config(tmp_path: Path, state_dir: Path, ledger_url: str) -> Path:
    config = tmp_path / "factoryd.toml"
    config.write_text(
        f"""
[station]
name = "unit-test"
state_dir = "{state_dir}"

[ledger]
url = "{ledger_url}"

[hub]
backend = "sim"
power_cycle_off_s = 0.0

[hub.sim]
ports = 2
boards = {SIM_BOARDS}

[jobs]
lot = "{LOT}"
rescan_s = 0.2
backoff_initial_s = 0.01
reply_timeout_scale = 0.2
shutdown_grace_s = 5.0

[metrics]
enabled = false

[api]
enabled = false

[log]
level = "info"
format = "json"
"""
    )
    return config


def _provisioned(ledger_url: str) -> int:
    with Ledger.open(ledger_url) as ledger:
        return ledger.progress(LOT).provisioned


async def test_daemon_runs_as_the_unit_runs_it(tmp_path: Path) -> None:
    line = await make_line(tmp_path / "state", flash=False)
    state_dir = line.settings.station.state_dir
    ledger_url = line.settings.ledger_url
    config = _daemon_config(tmp_path, state_dir, ledger_url)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    # systemd writes credentials without a trailing newline; an `echo`-made file has one: accept it.
    (credentials / PkiSettings().passphrase_credential).write_bytes(line.passphrase + b"\n")
    log = tmp_path / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACTORYD_", "NOTIFY_", "WATCHDOG_"))}

    with _notify_socket() as (sock, address), log.open("wb") as out:
        env |= {
            "NOTIFY_SOCKET": address,
            "CREDENTIALS_DIRECTORY": str(credentials),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "PYTHONUNBUFFERED": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "factoryd",
            "run",
            "--config",
            str(config),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=state_dir,
            umask=0o077,
        )
        notes = _Notifications(sock)
        try:
            ready = await notes.wait_for("READY=1")
            first_ping = await notes.wait_for("WATCHDOG=1", after=ready)
            # The watchdog keeps coming at WATCHDOG_USEC / 2, not just once.
            await notes.wait_for("WATCHDOG=1", after=first_ping + 1)

            deadline = time.monotonic() + NOTIFY_TIMEOUT_S
            while await asyncio.to_thread(_provisioned, ledger_url) < SIM_BOARDS:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.2)

            # systemctl reload: RELOADING=1, then READY=1 again.
            reload_at = len(notes.fields)
            proc.send_signal(signal.SIGHUP)
            reloading = await notes.wait_for("RELOADING=1", after=reload_at)
            await notes.wait_for("READY=1", after=reloading)

            # systemctl stop: STOPPING=1 and a clean exit (Restart=on-failure does not fire).
            stop_at = len(notes.fields)
            proc.send_signal(signal.SIGTERM)
            await notes.wait_for("STOPPING=1", after=stop_at)
            async with asyncio.timeout(NOTIFY_TIMEOUT_S):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    output = log.read_text()
    assert code == 0, output[-3000:]
    assert any(f.startswith("STATUS=provisioning on 2 ports") for f in notes.fields)
    assert line.passphrase.decode() not in output, "the passphrase must never reach the journal"
    assert '"event": "stopping on signal"' in output


async def test_daemon_without_the_credential_fails_before_ready(tmp_path: Path) -> None:
    line = await make_line(tmp_path / "state", flash=False)
    config = _daemon_config(tmp_path, line.settings.station.state_dir, line.settings.ledger_url)
    empty = tmp_path / "credentials"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACTORYD_", "NOTIFY_", "WATCHDOG_"))}
    with _notify_socket() as (sock, address):
        env |= {"NOTIFY_SOCKET": address, "CREDENTIALS_DIRECTORY": str(empty)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "factoryd",
            "run",
            "-c",
            str(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        async with asyncio.timeout(NOTIFY_TIMEOUT_S):
            _, stderr = await proc.communicate()
        notes = _Notifications(sock)
        with contextlib.suppress(TimeoutError):
            await notes.wait_for("READY=1", timeout_s=0.2)
    # A non-zero exit: systemd's Restart=on-failure retries, StartLimitBurst= stops a loop.
    assert proc.returncode == 2
    assert "credential 'factoryd-ca-passphrase'" in stderr.decode()
    assert "READY=1" not in notes.fields


# MemoryDenyWriteExecute= ----------------------------------------------------------------------

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1
# Sets the kernel's MDWE (Linux >= 6.3: no mapping may become writable and executable, inherited
# over exec) — the same rule MemoryDenyWriteExecute= enforces with seccomp — then runs argv.
_MDWE_LAUNCHER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""
_IMPORTS = (
    "import ctypes, sys\n"
    f"assert ctypes.CDLL(None).prctl({PR_GET_MDWE}, 0, 0, 0, 0) == {PR_MDWE_REFUSE_EXEC_GAIN}\n"
    "import cffi, cryptography.hazmat.bindings._rust, psycopg, pydantic_core, aiomqtt, uvicorn, fastapi\n"
    "import serial_asyncio_fast, cobs.cobs, sqlalchemy, alembic, prometheus_client, structlog\n"
    "import factoryd.daemon, factoryd.cli.main\n"
    "print('imports ok')\n"
)


def _under_mdwe(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", _MDWE_LAUNCHER, sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=cwd,
        check=False,
    )
    if proc.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    return proc


def test_dependencies_load_without_writable_executable_memory(tmp_path: Path) -> None:
    proc = _under_mdwe("-c", _IMPORTS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "imports ok" in proc.stdout


def test_demo_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    proc = _under_mdwe(
        "-m", "factoryd", "demo", "--ports", "2", "--boards", "3", "--state-dir", str(tmp_path / "line"),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "audit chain         verified" in proc.stdout
