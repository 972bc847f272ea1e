"""Throwaway mosquitto brokers on free loopback ports, as pytest fixtures.

Register the fixtures once in ``tests/conftest.py``::

    from tests.helpers.mqtt_broker import mqtt_broker, mqtt_broker_factory  # noqa: F401 - pytest fixtures

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
import json
import os
import shutil
import signal
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio

__all__ = [
    "BrokerTls",
    "MosquittoBroker",
    "MqttRecorder",
    "TcpGate",
    "free_port",
    "mqtt_broker",
    "mqtt_broker_factory",
]

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


class TcpGate:
    """A TCP forwarder in front of a broker: closed (connection refused), open, or cut (drop links).

    Cutting drops every live connection without an MQTT DISCONNECT, as a pulled cable would, so the
    broker publishes the client's last will while the broker itself stays up.
    """

    host = LOOPBACK

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._flowing = asyncio.Event()
        self._flowing.set()

    def stall(self) -> None:
        """Keep connections open but forward nothing (a hung broker or a congested link)."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again, including what was held back."""
        self._flowing.set()

    async def open(self) -> None:
        """Start accepting and forwarding connections."""
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def cut(self) -> None:
        """Drop every live connection at once (the listener stays as it is)."""
        for writers in self._links.values():
            for writer in writers:
                writer.transport.abort()
        if self._links:
            await asyncio.wait(list(self._links))

    async def close(self) -> None:
        """Stop listening (new connections are refused) and drop live ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:
            return
        writers = [writer]
        self._links[task] = writers
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            writers.append(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            for w in writers:
                w.transport.abort()
            del self._links[task]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                # Poll rather than wait on the event so that a cut link ends even while stalled.
                while not self._flowing.is_set() and not writer.transport.is_closing():
                    await asyncio.sleep(0.01)
                if writer.transport.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        # End of one direction ends the link: the other pump then sees EOF on the same socket.
        writer.transport.abort()

    async def __aenter__(self) -> TcpGate:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class MqttRecorder:
    """Subscribes to a topic filter and keeps every message, for asserting what was published."""

    def __init__(
        self,
        broker: MosquittoBroker,
        topic_filter: str = "factory/#",
        *,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._client = aiomqtt.Client(
            broker.host,
            broker.port,
            username=username,
            password=password,
            tls_context=tls_context,
            identifier=f"recorder-{uuid.uuid4().hex[:8]}",
        )
        self._filter = topic_filter
        self.messages: list[aiomqtt.Message] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MqttRecorder:
        await self._client.__aenter__()
        await self._client.subscribe(self._filter, qos=1)
        self._task = asyncio.create_task(self._read(), name="mqtt-recorder")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self._client.messages:
            self.messages.append(message)
            self._changed.set()

    def on(self, suffix: str) -> list[dict[str, Any]]:
        """Decoded payloads of every message whose topic ends with ``suffix``, oldest first."""
        return [_decode(m.payload) for m in self.messages if m.topic.value.endswith(suffix)]

    def latest(self, suffix: str) -> dict[str, Any] | None:
        """The newest decoded payload on a topic ending with ``suffix``."""
        found = self.on(suffix)
        return found[-1] if found else None

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; fail the test with what was received otherwise."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            got = [(m.topic.value, m.payload) for m in self.messages]
            pytest.fail(f"condition not met within {timeout_s} s; received: {got}")


def _decode(payload: object) -> dict[str, Any]:
    if not isinstance(payload, bytes | bytearray):
        pytest.fail(f"expected a bytes payload from the broker, got {payload!r}")
    decoded: dict[str, Any] = json.loads(payload)
    return decoded


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
