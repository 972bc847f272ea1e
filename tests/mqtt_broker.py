"""Throwaway mosquitto brokers on free loopback ports, as pytest fixtures.

Register the fixtures once in ``tests/conftest.py``::

    from mqtt_broker import mqtt_broker, mqtt_broker_factory  # noqa: F401 - pytest fixtures

(``tests/`` has no ``__init__.py`` and pytest's default "prepend" import mode puts it on ``sys.path``;
if a ``tests/__init__.py`` is ever added, write ``from tests.mqtt_broker import ...`` instead.)
Alternatively load it as a plugin: ``pytest -p mqtt_broker`` with ``tests`` on ``PYTHONPATH``.

``mqtt_broker`` is a running anonymous broker; ``mqtt_broker_factory(users=..., tls=..., port=...)``
makes brokers that are not started yet (password file, TLS listener, fixed port for restarts). Every
broker is stopped at the end of the test. Mark tests that use them ``@pytest.mark.mqtt``.
The broker is the Debian ``mosquitto`` package; a missing binary fails the test with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

__all__ = ["BrokerTls", "MosquittoBroker", "mqtt_broker", "mqtt_broker_factory"]

LOOPBACK = "127.0.0.1"
BROKER_START_TIMEOUT_S = 10.0
BROKER_STOP_TIMEOUT_S = 5.0
PORT_PICK_ATTEMPTS = 5  # another process may grab the free port between picking and binding it


def _find_tool(name: str) -> str:
    # Debian installs mosquitto in /usr/sbin, which is not on every user's PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y mosquitto (needed by MQTT tests)")
    return path


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class BrokerTls:
    """Files for a TLS listener; with ``require_client_cert`` clients must present a cert from ``ca_file``."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False


class MosquittoBroker:
    """One mosquitto process; can be stopped, killed and started again on the same port."""

    host = LOOPBACK

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.users = dict(users or {})
        self.tls = tls
        self.log_file = workdir / "mosquitto.log"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        """True while the mosquitto process is alive."""
        return self._proc is not None and self._proc.returncode is None

    def log(self) -> str:
        """Everything mosquitto logged so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    async def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "persistence false",
            # mosquitto started as root drops to user "mosquitto", which cannot read pytest's tmp dirs.
            f"user {getpass.getuser()}",
            "log_type all",
        ]
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.unlink(missing_ok=True)
            tool = _find_tool("mosquitto_passwd")
            for i, (user, password) in enumerate(self.users.items()):
                args = [tool, "-b", *(["-c"] if i == 0 else []), str(passwd), user, password]
                proc = await asyncio.create_subprocess_exec(
                    *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
                )
                out, _ = await proc.communicate()
                if proc.returncode != 0:
                    pytest.fail(f"mosquitto_passwd failed: {out.decode(errors='replace')}")
            os.chmod(passwd, 0o600)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                f"require_certificate {'true' if self.tls.require_client_cert else 'false'}",
            ]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    async def start(self) -> None:
        """Start mosquitto and wait until it accepts TCP connections."""
        if self.running:
            return
        for _ in range(PORT_PICK_ATTEMPTS):
            if await self._start_once():
                return
            if self._fixed_port:
                break
            self.port = free_port()
        pytest.fail(f"mosquitto did not start on {self.host}:{self.port}:\n{self.log()}")

    async def _start_once(self) -> bool:
        conf = await self._write_config()
        with self.log_file.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                _find_tool("mosquitto"), "-c", str(conf), stdout=log, stderr=log
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BROKER_START_TIMEOUT_S
        while loop.time() < deadline:
            if self._proc.returncode is not None:
                await self._proc.wait()
                return False
            with contextlib.suppress(OSError):
                _reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                await writer.wait_closed()
                return True
            await asyncio.sleep(0.02)
        await self.kill()
        return False

    async def stop(self) -> None:
        """Terminate mosquitto (SIGTERM) and wait for it to exit; no-op if not running."""
        await self._signal(signal.SIGTERM)

    async def kill(self) -> None:
        """Kill mosquitto (SIGKILL): clients see the connection drop without a goodbye."""
        await self._signal(signal.SIGKILL)

    async def restart(self) -> None:
        """Stop and start again on the same port."""
        await self.stop()
        self._fixed_port = True
        await self.start()

    async def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(sig)
            try:
                async with asyncio.timeout(BROKER_STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        else:
            await proc.wait()
        self._proc = None

    async def __aenter__(self) -> MosquittoBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


BrokerFactory = Callable[..., MosquittoBroker]


@pytest_asyncio.fixture
async def mqtt_broker_factory(tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    """Make not-yet-started brokers: ``factory(users={...}, tls=BrokerTls(...), port=...)``."""
    brokers: list[MosquittoBroker] = []

    def make(
        *, port: int | None = None, users: Mapping[str, str] | None = None, tls: BrokerTls | None = None
    ) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(brokers)}", port=port, users=users, tls=tls)
        brokers.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            await broker.stop()


@pytest_asyncio.fixture
async def mqtt_broker(mqtt_broker_factory: BrokerFactory) -> MosquittoBroker:
    """A running anonymous mosquitto on a free loopback port."""
    broker = mqtt_broker_factory()
    await broker.start()
    return broker
