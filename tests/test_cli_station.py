"""A station engineer's first day (issue 24): the README's station commands, activation, status, help.

The README walk runs every command of its "Running a station" section as written, in subprocesses,
against a copy of config/factoryd.toml whose state directory does not exist yet.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from factoryd.cli.main import app
from factoryd.firmware import FirmwareStore
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.mcuboot import verify_image
from factoryd.pki.testca import make_test_pki
from factoryd.sim.mcuboot_signer import sign_image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE_CONFIG = ROOT / "config" / "factoryd.toml"
STATION_PASSPHRASE = "station-passphrase-for-the-readme-walk"
BUNDLE_PASSPHRASE = "customer-bundle-passphrase"
WALK_BOARDS = 3
WALK_IDS = 10
# A subprocess imports factoryd (about a second) and opens the ledger; a run provisions 3 boards.
COMMAND_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 60.0
POLL_S = 0.1
TERMINAL_COLUMNS = 80


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without the developer's FACTORYD_* settings or terminal width."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORYD_") and k != "COLUMNS"}
    env.update(extra)
    return env


def _station_config(tmp_path: Path, state_dir: Path) -> Path:
    """config/factoryd.toml with the state in ``state_dir``, a simulated hub and free ports."""
    text = EXAMPLE_CONFIG.read_text()
    replacements = [
        ('state_dir = "/var/lib/factoryd"', f'state_dir = "{state_dir}"'),
        ('backend = "sysfs"', 'backend = "sim"'),
        ("# boards = 24", f"boards = {WALK_BOARDS}"),
        ("port = 9464", f"port = {_free_port()}"),
        ("port = 8080", f"port = {_free_port()}"),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "factoryd.toml"
    path.write_text(text)
    return path


def _readme_station_commands() -> list[str]:
    """The shell lines of README's "Running a station" code block."""
    section = README.read_text().split("## Running a station", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _argv(line: str, config: Path) -> tuple[list[str], dict[str, str]]:
    """A README line as (argv, environment additions); `…` placeholders get the test's secrets."""
    words = shlex.split(line.replace("-c config/factoryd.toml", f"-c {config}"))
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, _ = words.pop(0).partition("=")
        env[name] = BUNDLE_PASSPHRASE if name == "FACTORYD_BUNDLE_PASSPHRASE" else STATION_PASSPHRASE
    assert words[0] == "factoryd", line
    return [sys.executable, "-m", "factoryd", *words[1:]], env


def _customer_files(directory: Path) -> None:
    """What the customer hands over: a lot profile, an ID list and a PKCS#12 CA bundle."""
    (directory / "profile.json").write_text(json.dumps({"protocol": "factoryd-v1"}))
    ids = [str(uuid.uuid4()) for _ in range(WALK_IDS)]
    (directory / "ids.csv").write_text("id\n" + "".join(f"{i}\n" for i in ids))
    pki = make_test_pki(passphrase=BUNDLE_PASSPHRASE.encode())
    (directory / "acme-ca.p12").write_bytes(pki.pkcs12)


def _provisioned(state_dir: Path, lot: str) -> int:
    with Ledger.open(f"sqlite:///{state_dir / 'ledger.db'}") as ledger:
        return ledger.progress(lot).provisioned


def _run_until(
    argv: list[str], env: dict[str, str], cwd: Path, done: Callable[[], bool]
) -> subprocess.CompletedProcess[str]:
    """Start `factoryd run`, wait for ``done()``, stop it as systemd does (SIGTERM)."""
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not done() and proc.poll() is None:
            assert time.monotonic() < deadline, "factoryd run did not get there in time"
            time.sleep(POLL_S)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_readme_running_a_station_works_as_written_on_a_fresh_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "var" / "lib" / "factoryd"  # does not exist: a fresh machine
    config = _station_config(tmp_path, state_dir)
    _customer_files(tmp_path)
    lines = _readme_station_commands()
    assert lines[0].startswith("export FACTORYD_CA_PASSPHRASE="), lines[0]
    env = _env(FACTORYD_CA_PASSPHRASE=STATION_PASSPHRASE)
    ran = []
    for line in lines[1:]:
        argv, extra = _argv(line, config)
        command_env = {**env, **extra}
        if argv[3] == "run":
            result = _run_until(
                argv, command_env, tmp_path, lambda: _provisioned(state_dir, "acme-2026-11") == WALK_BOARDS
            )
        else:
            result = subprocess.run(  # noqa: S603 - our own interpreter
                argv,
                cwd=tmp_path,
                env=command_env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        ran.append((argv[3:5], result))
        if argv[3:5] == ["lots", "create"]:
            # The state directory now exists with the mode systemd's StateDirectoryMode= gives it.
            assert state_dir.stat().st_mode & 0o777 == 0o700
    commands = [" ".join(w for w in words if not w.startswith("-")) for words, _ in ran]
    assert commands == [
        "lots create",
        "lots import",
        "lots bundle",
        "lots activate",
        "run",
        "manifest export",
        "tokens create",
    ]
    manifest = json.loads((state_dir / "manifests" / "acme-2026-11.manifest.json").read_text())
    assert len(manifest["devices"]) == WALK_BOARDS
    assert (state_dir / "manifests" / "acme-2026-11.manifest.p7s").stat().st_size > 0
    assert ran[-1][1].stdout.startswith("fdt_")


def test_a_state_dir_that_cannot_be_made_is_named_with_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory's parent should be\n")
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{blocker / "factoryd"}"\n')
    result = CliRunner().invoke(
        app, ["lots", "create", "acme-1", "--customer", "acme", "-c", str(config)], env=_env()
    )
    assert result.exit_code == 2
    assert f"the state directory {blocker / 'factoryd'} does not exist" in result.stderr
    assert "sudo install -d -m 0700" in result.stderr
    assert "[station] state_dir" in result.stderr
    assert "unable to open database file" not in result.output
    assert "Traceback" not in result.output


def test_a_state_dir_this_user_cannot_write_points_at_factoryd_admin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{state_dir}"\n')
    # Root may write anywhere: play an operator without write access to the service's directory.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == state_dir else real_access(p, m))
    result = CliRunner().invoke(app, ["lots", "list", "-c", str(config)], env=_env())
    assert result.exit_code == 2
    assert f"the state directory {state_dir} (owner " in result.stderr
    assert "mode 0700) is not writable by user" in result.stderr
    assert "sudo factoryd-admin" in result.stderr
    assert not (state_dir / "ledger.db").exists()


# Activation checks the lot can be provisioned ---------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=_env(FACTORYD_CA_PASSPHRASE=STATION_PASSPHRASE))
    return result.exit_code, result.stdout, result.stderr


def test_activate_lists_everything_a_lot_lacks_and_refuses(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{state_dir}"\n')
    key = ec.generate_private_key(ec.SECP256R1())
    image = sign_image(b"signed firmware image for the lot" * 64, key, "1.2.3")
    wanted = verify_image(image, key.public_key()).hash
    (tmp_path / "profile.json").write_text(json.dumps({"firmware_sha256": wanted}))
    c = ("-c", str(config))
    assert (
        _cli(
            "lots",
            "create",
            "acme-1",
            "--customer",
            "acme",
            "--profile-file",
            str(tmp_path / "profile.json"),
            *c,
        )[0]
        == 0
    )

    code, out, err = _cli("lots", "activate", "acme-1", *c)
    assert code == 2
    assert out == ""
    assert "lot 'acme-1' cannot be activated: " in err
    assert "no device IDs" in err
    assert "no CA bundle" in err
    assert f"no firmware image in {state_dir / 'firmware' / 'acme-1'}" in err
    assert wanted in err

    (tmp_path / "ids.txt").write_text(f"{uuid.uuid4()}\n{uuid.uuid4()}\n")
    assert _cli("lots", "import", "acme-1", str(tmp_path / "ids.txt"), *c)[0] == 0
    pki = make_test_pki(passphrase=BUNDLE_PASSPHRASE.encode())
    (tmp_path / "ca.p12").write_bytes(pki.pkcs12)
    result = CliRunner().invoke(
        app,
        ["lots", "bundle", "acme-1", str(tmp_path / "ca.p12"), *c],
        env=_env(FACTORYD_CA_PASSPHRASE=STATION_PASSPHRASE, FACTORYD_BUNDLE_PASSPHRASE=BUNDLE_PASSPHRASE),
    )
    assert result.exit_code == 0, result.output
    # A stored image the profile does not name is not the lot's.
    other = sign_image(b"some other image", key, "9.9.9")
    FirmwareStore(state_dir / "firmware").save("acme-1", other, key.public_key())

    code, _, err = _cli("lots", "activate", "acme-1", *c)
    assert code == 2
    assert "no device IDs" not in err
    assert "no CA bundle" not in err
    assert f"no firmware image in {state_dir / 'firmware' / 'acme-1'}" in err
    with Ledger.open(f"sqlite:///{state_dir / 'ledger.db'}") as ledger:
        assert ledger.get_lot("acme-1").state is LotState.DRAFT

    FirmwareStore(state_dir / "firmware").save("acme-1", image, key.public_key())
    assert _cli("lots", "activate", "acme-1", *c) == (0, "lot acme-1 is active\n", "")


def test_a_lot_whose_ids_are_all_used_cannot_be_resumed(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{state_dir}"\n')
    device = str(uuid.uuid4())
    state_dir.mkdir()
    with Ledger.open(f"sqlite:///{state_dir / 'ledger.db'}") as ledger:
        ledger.create_lot("acme-1", customer="acme", profile=LotProfile(), target_quantity=None, actor="t")
        ledger.import_ids("acme-1", f"{device}\n".encode(), filename="ids.txt", actor="t")
        ledger.void("acme-1", device, "board lost", actor="t")
    (state_dir / "bundles" / "acme-1").mkdir(parents=True)
    code, _, err = _cli("lots", "activate", "acme-1", "-c", str(config))
    assert code == 2
    assert "no device ID left to provision (0 provisioned, 1 void of 1" in err
    assert "no CA bundle" not in err


# `factoryd run` says what it will do, once ---------------------------------------------------------


def test_run_without_an_active_lot_says_it_waits_and_logs_each_thing_once(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    config = _station_config(tmp_path, state_dir)
    argv = [sys.executable, "-m", "factoryd", "run", "-c", str(config)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        # Played systemd: READY=1 means the daemon handles SIGTERM (tests/test_systemd.py does the same).
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(RUN_TIMEOUT_S)
        env = _env(
            FACTORYD_CA_PASSPHRASE=STATION_PASSPHRASE,
            FACTORYD_LOG__FORMAT="json",
            NOTIFY_SOCKET=str(tmp_path / "notify"),
        )
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter
            argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            # [station] cpu_affinity = "auto" (the example config's): every thread of the daemon on one CPU.
            cpus = {_cpus_allowed(task) for task in Path(f"/proc/{proc.pid}/task").iterdir()}
            policies = {
                int(task.name): os.sched_getscheduler(int(task.name))
                for task in Path(f"/proc/{proc.pid}/task").iterdir()
            }
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, output
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    starts = [e for e in events if e.startswith("station ready")]
    assert starts == [
        "station ready on 8 ports of hub sim-hub; no active lot: waiting for one to be activated "
        "(factoryd lots activate NAME)"
    ]
    assert events.count("api listening") == 1
    assert events.count("metrics listening") == 1
    if len(os.sched_getaffinity(0)) > 1:
        assert len(cpus) == 1, cpus
        assert next(iter(cpus)).isdigit(), cpus  # one CPU, not a list or range
        assert events.count("CPU affinity applied") == 1
        # Sharing the loop's CPU, the helper threads (the ledger's worker among them) yield to it.
        assert policies.pop(proc.pid) == os.SCHED_OTHER
        assert os.SCHED_BATCH in policies.values(), policies
    else:  # nothing to choose between
        assert "CPU affinity applied" not in events
        assert set(policies.values()) == {os.SCHED_OTHER}
    assert "Started server process" not in output
    assert "Application startup complete" not in output


def _cpus_allowed(task: Path) -> str:
    """A thread's Cpus_allowed_list from /proc (e.g. "1" or "0-1")."""
    for line in (task / "status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list in {task}/status")


# `factoryd status` with nothing running --------------------------------------------------------------


def test_status_with_no_daemon_says_so_even_without_a_token(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{tmp_path}"\n[api]\nport = {port}\n')
    result = CliRunner().invoke(app, ["status", "-c", str(config)], env=_env())
    assert result.exit_code == 2
    assert f"no daemon is running at http://127.0.0.1:{port}" in result.stderr
    assert f"start it with `factoryd run -c {config}`" in result.stderr
    assert "no API token" not in result.stderr


# `lots list` and `--help` read like the other commands ------------------------------------------------


def test_lots_list_prints_a_table_and_json_on_request(tmp_path: Path) -> None:
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{tmp_path}"\n')
    c = ("-c", str(config))
    assert (
        _cli("lots", "list", *c)[1]
        == "no lots yet (create one: factoryd lots create NAME --customer CUSTOMER)\n"
    )
    assert _cli("lots", "create", "acme-2026-11", "--customer", "acme", *c)[0] == 0
    (tmp_path / "ids.txt").write_text(f"{uuid.uuid4()}\n{uuid.uuid4()}\n")
    assert _cli("lots", "import", "acme-2026-11", str(tmp_path / "ids.txt"), *c)[0] == 0
    code, out, _ = _cli("lots", "list", *c)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == [
        "LOT",
        "CUSTOMER",
        "STATE",
        "TOTAL",
        "AVAILABLE",
        "RESERVED",
        "PROVISIONED",
        "VOID",
    ]
    assert row.split() == ["acme-2026-11", "acme", "draft", "2", "2", "0", "0", "0"]
    # Numbers sit right-aligned under their heading.
    end = header.index("TOTAL") + len("TOTAL")
    assert row[end - 2 : end] == " 2"
    listed = json.loads(_cli("lots", "list", "--json", *c)[1])
    assert listed == [
        {
            "lot": "acme-2026-11",
            "customer": "acme",
            "state": "draft",
            "total": 2,
            "available": 2,
            "reserved": 0,
            "provisioned": 0,
            "void": 0,
        }
    ]


def _options(command: Any) -> list[str]:
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    return [name for param in params for name in (*param.opts, *param.secondary_opts)]


def _commands() -> Iterator[tuple[list[str], Any]]:
    """Every command and group of the CLI, with its path."""

    def walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        if hasattr(command, "list_commands"):
            for name in command.list_commands(None):
                yield from walk(command.get_command(None, name), [*path, name])

    yield from walk(typer.main.get_command(app), [])


def _check_help(text: str, options: list[str]) -> None:
    assert "<bool>" not in text
    assert "…" not in text
    assert all(len(line) <= TERMINAL_COLUMNS for line in text.splitlines()), text
    words = set(re.split(r"[\s,/\[\]]+", text))
    missing = [name for name in options if name not in words]
    assert missing == [], text


def test_demo_help_reads_whole_in_a_plain_80_column_pipe() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "factoryd", "demo", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    demo = {" ".join(path): command for path, command in _commands()}["demo"]
    options = _options(demo)
    assert {"--fault-rate", "--faults", "--boards", "--devices", "--no-lock", "--json"} <= set(options)
    _check_help(result.stdout, options)


def test_every_help_page_reads_whole_at_80_columns() -> None:
    for path, command in _commands():
        result = CliRunner().invoke(app, [*path, "--help"], env=_env(), terminal_width=TERMINAL_COLUMNS)
        assert result.exit_code == 0, path
        _check_help(result.stdout, _options(command))
        # A command's summary in its group's listing is its whole first sentence, wrapped, never cut.
        assert "..." not in result.stdout.replace("[ARGS]...", ""), path


def test_config_example_state_dir_is_the_units() -> None:
    """The state directory the commands create is the one the unit's StateDirectory= manages."""
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    unit = (ROOT / "systemd" / "factoryd.service").read_text()
    assert example["station"]["state_dir"] == "/var/lib/factoryd"
    assert "StateDirectory=factoryd\n" in unit
    assert "StateDirectoryMode=0700\n" in unit
