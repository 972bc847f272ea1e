"""Hostile input: a ledger whose schema a newer factoryd wrote. The daemon refuses to start, and says why.

`factoryd run` is started the way the systemd unit starts it (a notify socket as $NOTIFY_SOCKET) on a
ledger whose recorded Alembic revision this build does not know. It must exit non-zero before READY=1
(Restart=on-failure then stops at StartLimitBurst=), print one plain line naming both revisions and the
fix, tell systemd the same as STATUS= (what `systemctl status` shows), and leave the database as it was.
Also for PostgreSQL, where several stations share one ledger and one of them may be upgraded first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from factoryd.cli.main import SCHEMA_TOO_NEW_EXIT
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.errors import SchemaVersionError
from factoryd.ledger.migrate import head_revision
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.sim.hub import SimHub
from tests.helpers.line_procs import write_config
from tests.helpers.station import make_line

pytestmark = pytest.mark.faults

FUTURE_REVISION = "0999_from_a_newer_factoryd"
EXIT_TIMEOUT_S = 60.0
# `factoryd run` refusing a ledger written by a newer factoryd (cli/main.py).
EXIT_REFUSED = SCHEMA_TOO_NEW_EXIT  # EX_CONFIG: the unit does not restart on it


@contextlib.contextmanager
def _notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An abstract AF_UNIX datagram socket, as systemd's notify socket."""
    name = f"@factoryd-schema-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + name[1:])
        sock.setblocking(False)
        yield sock, name
    finally:
        sock.close()


def _fields(sock: socket.socket) -> list[str]:
    fields: list[str] = []
    with contextlib.suppress(BlockingIOError):
        while True:
            fields += sock.recv(65536).decode().splitlines()
    return fields


def _set_revision(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


def _revisions(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        engine.dispose()


async def _run_station(tmp_path: Path, url: str | None) -> tuple[int, str, list[str]]:
    """Prepare a lot, mark its ledger as written by a newer build, run `factoryd run`; exit, stderr, notes."""
    line = await make_line(tmp_path / "state", flash=False, ledger_url=url)
    ledger_url = line.settings.ledger_url
    await asyncio.to_thread(_set_revision, ledger_url, FUTURE_REVISION)
    config = write_config(tmp_path / "factoryd.toml", line, tmp_path / "hub.sock", ledger_url=url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env["FACTORYD_CA_PASSPHRASE"] = line.passphrase.decode()
    with _notify_socket() as (sock, address):
        env["NOTIFY_SOCKET"] = address
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
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            _, stderr = await proc.communicate()
        notes = _fields(sock)
    assert proc.returncode is not None
    return proc.returncode, stderr.decode(), notes


def _check_refusal(code: int, stderr: str, notes: list[str]) -> None:
    # 78 before READY: systemd marks the unit failed and, by RestartPreventExitStatus=78, does not retry.
    assert code == EXIT_REFUSED, stderr
    assert "READY=1" not in notes
    # One plain line naming the database's revision, this build's newest, and the fix.
    error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, stderr
    assert repr(FUTURE_REVISION) in error_lines[0]
    assert repr(head_revision()) in error_lines[0]
    assert "upgrade factoryd" in error_lines[0]
    # The same words reach `systemctl status` (sd_notify STATUS=).
    status = [n for n in notes if n.startswith("STATUS=refusing to start: ")]
    assert status, notes
    assert FUTURE_REVISION in status[-1]


async def test_a_newer_sqlite_schema_stops_the_daemon_before_ready(tmp_path: Path) -> None:
    code, stderr, notes = await _run_station(tmp_path, None)
    _check_refusal(code, stderr, notes)
    url = f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
    assert _revisions(url) == [FUTURE_REVISION]  # left exactly as it was: no downgrade, no upgrade


@pytest.mark.postgres
async def test_a_newer_postgres_schema_stops_the_daemon_before_ready(tmp_path: Path) -> None:
    with throwaway_postgres_database() as url:
        code, stderr, notes = await _run_station(tmp_path, url)
        _check_refusal(code, stderr, notes)
        assert _revisions(url) == [FUTURE_REVISION]


async def test_the_daemon_in_process_raises_the_schema_error(tmp_path: Path) -> None:
    line = await make_line(tmp_path, flash=False)
    await asyncio.to_thread(_set_revision, line.settings.ledger_url, FUTURE_REVISION)
    hub = SimHub(2, line.board, supply=2)
    daemon = Daemon(line.settings, DaemonHooks(hub=hub, passphrase=line.passphrase))
    with pytest.raises(SchemaVersionError, match="a newer factoryd wrote it"):
        await daemon.run()
    assert daemon.station is None  # no port was touched, nothing was built on the unknown schema


def test_the_unit_does_not_restart_on_a_newer_schema() -> None:
    unit = (Path(__file__).parent.parent / "systemd" / "factoryd.service").read_text()
    prevented = [
        line.split("=", 1)[1].split()
        for line in unit.splitlines()
        if line.startswith("RestartPreventExitStatus=")
    ]
    assert [str(SCHEMA_TOO_NEW_EXIT)] in prevented
