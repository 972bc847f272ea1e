"""A simulated hub in another process, driven over a Unix socket.

``factoryd sim hub`` runs a SimHub (boards behind PTYs) in its own process; the daemon talks to
it through ``RemoteSimHub``. The boards then outlive a daemon that is killed or restarted, as real
boards do, and their CPU time is not the daemon's (benchmarks). The control protocol is one JSON
object per line each way: ``{"op": ..., ...}`` → ``{"ok": true, ...}`` or
``{"ok": false, "error": "enumeration_timeout" | "hub_command" | "hub_disconnected", "message": ...}``.
``unplug`` / ``replug`` pull and restore the hub's own cable (fault injection for tests and soaks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from factoryd.errors import EnumerationTimeoutError, HubCommandError, HubDisconnectedError
from factoryd.protocol.messages import ObjectId
from factoryd.sim.board import SimBoard
from factoryd.sim.hub import SimHub

log = structlog.get_logger(__name__)
# A control request is a short JSON line; anything longer is a protocol error.
MAX_LINE_BYTES = 64 * 1024
# Idle control connections the daemon keeps open to the hub process.
CONNECTION_POOL = 32
_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Extra time over a wait_for_tty timeout before the client gives up on the hub process itself.
CONTROL_SLACK_S = 5.0
# How long entering a RemoteSimHub waits for its hub process to answer (it may still be starting).
CONNECT_TIMEOUT_S = 10.0


def board_inventory(board: SimBoard, where: str) -> dict[str, Any]:
    """What a test or benchmark may know about a simulated board (never its private key)."""
    objects = board.se.objects
    return {
        "serial": board.serial_hex,
        "where": where,
        "public_key": board.se.public_point(0).hex() if board.se.has_key(0) else None,
        "device_id": objects.get(ObjectId.DEVICE_ID, b"").decode("utf-8", "replace") or None,
        "cert": objects[ObjectId.DEVICE_CERT].hex() if ObjectId.DEVICE_CERT in objects else None,
        "locked": board.se.locked,
        "fw_version": board.fw_version,
        "commands": board.commands_handled,
        "physical_s": board.physical_s,
        "sequence": board.sequence,
        "injected": {str(k): v for k, v in board.injected.items()},
    }


class SimHubServer:
    """Serves a SimHub's operations on a Unix socket."""

    def __init__(self, hub: SimHub, socket_path: Path) -> None:
        self.hub = hub
        self.socket_path = socket_path

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = await asyncio.start_unix_server(
            self._client, path=str(self.socket_path), limit=MAX_LINE_BYTES
        )
        try:
            async with server:
                if ready is not None:
                    ready.set()
                await server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await self._handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = request["op"]
            port = str(request.get("port", ""))
            match op:
                case "ports":
                    return {"ok": True, "ports": list(self.hub.ports())}
                case "power_on":
                    await self.hub.power_on(port)
                case "power_off":
                    await self.hub.power_off(port)
                case "release":
                    await self.hub.release(port)
                case "device_serial":
                    return {"ok": True, "serial": await self.hub.device_serial(port, str(request["tty"]))}
                case "wait_for_tty":
                    path = await self.hub.wait_for_tty(port, float(request["timeout_s"]))
                    return {"ok": True, "path": path}
                case "status":
                    return {
                        "ok": True,
                        "exhausted": self.hub.exhausted,
                        "inserted": self.hub.boards_inserted,
                        "finished": len(self.hub.finished),
                    }
                case "inventory":
                    return {"ok": True, "boards": self._inventory()}
                case "check":
                    await self.hub.check()
                case "unplug":
                    await self.hub.unplug()
                case "replug":
                    self.hub.replug()
                case _:
                    return {"ok": False, "error": "hub_command", "message": f"unknown op {op!r}"}
        except EnumerationTimeoutError as exc:
            return {"ok": False, "error": "enumeration_timeout", "message": str(exc)}
        except HubDisconnectedError as exc:
            return {"ok": False, "error": "hub_disconnected", "message": str(exc)}
        except (HubCommandError, KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": "hub_command", "message": str(exc)}
        return {"ok": True}

    def _inventory(self) -> list[dict[str, Any]]:
        boards = [board_inventory(b, "finished") for b in self.hub.finished]
        for port in self.hub.ports():
            board = self.hub.board(port)
            if board is not None:
                boards.append(board_inventory(board, f"port {port}"))
        return boards


class RemoteSimHub:
    """The Hub interface over a SimHubServer's socket (one connection per call: survives restarts).

    Entering it waits for the hub process and learns its ports; leaving it closes pooled connections.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        name: str = "sim-hub-remote",
        pool: int = 0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.name = name
        self._pool = pool
        self.socket_path = socket_path
        self.connect_timeout_s = connect_timeout_s
        self._ports: list[str] | None = None
        self._idle: list[_Connection] = []

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Wait for the hub process and learn its ports."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                reply = await self.call({"op": "ports"}, timeout_s=2.0)
            except HubCommandError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            self._ports = [str(p) for p in reply["ports"]]
            return

    def ports(self) -> Sequence[str]:
        """Port names (after connect())."""
        if self._ports is None:
            raise HubCommandError(f"{self.name}: not connected to {self.socket_path}")
        return self._ports

    async def power_on(self, port: str) -> None:
        """Switch a port on."""
        await self.call({"op": "power_on", "port": port})

    async def power_off(self, port: str) -> None:
        """Switch a port off."""
        await self.call({"op": "power_off", "port": port})

    async def release(self, port: str) -> None:
        """The simulated operator swaps the board."""
        await self.call({"op": "release", "port": port})

    async def wait_for_tty(self, port: str, timeout_s: float) -> str:
        """Wait for the port's PTY."""
        reply = await self.call(
            {"op": "wait_for_tty", "port": port, "timeout_s": timeout_s},
            timeout_s=timeout_s + CONTROL_SLACK_S,
        )
        return str(reply["path"])

    async def device_serial(self, port: str, tty: str) -> str | None:
        """The board's USB serial as the hub process knows it."""
        reply = await self.call({"op": "device_serial", "port": port, "tty": tty})
        serial = reply.get("serial")
        return str(serial) if serial else None

    async def check(self) -> None:
        """Fail with HubDisconnectedError while the simulated hub is unplugged."""
        await self.call({"op": "check"})

    async def unplug(self) -> None:
        """Pull the simulated hub's cable (fault injection)."""
        await self.call({"op": "unplug"})

    async def replug(self) -> None:
        """Plug the simulated hub back in."""
        await self.call({"op": "replug"})

    async def status(self) -> dict[str, Any]:
        """Supply and progress of the simulated operator."""
        return await self.call({"op": "status"})

    async def inventory(self) -> list[dict[str, Any]]:
        """Every board the hub has seen, with its secure element's public state."""
        reply = await self.call({"op": "inventory"}, timeout_s=30.0)
        boards: list[dict[str, Any]] = reply["boards"]
        return boards

    async def call(self, request: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        """Send one request and return the reply; errors become typed hub errors.

        With a pool, connections are reused (the server answers many requests per connection),
        so a busy line does not pay a connect and a close per port operation; a pooled connection
        that went stale (hub process restarted) is replaced once.
        """
        pooled = self._idle.pop() if self._idle else None
        try:
            line, connection = await self._exchange(request, pooled, timeout_s)
        except (OSError, TimeoutError, EOFError) as exc:
            if pooled is None:
                raise HubCommandError(f"{self.name}: {request['op']} failed: {exc}") from exc
            try:
                line, connection = await self._exchange(request, None, timeout_s)
            except (OSError, TimeoutError, EOFError) as again:
                raise HubCommandError(f"{self.name}: {request['op']} failed: {again}") from again
        if len(self._idle) < self._pool:
            self._idle.append(connection)
        else:
            connection[1].close()
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise HubCommandError(f"{self.name}: malformed reply to {request['op']}") from exc
        if not reply.get("ok"):
            message = str(reply.get("message", "hub error"))
            if reply.get("error") == "enumeration_timeout":
                raise EnumerationTimeoutError(message)
            if reply.get("error") == "hub_disconnected":
                raise HubDisconnectedError(f"{self.name}: {message}")
            raise HubCommandError(f"{self.name}: {message}")
        return reply

    async def _exchange(
        self, request: dict[str, Any], connection: _Connection | None, timeout_s: float
    ) -> tuple[bytes, _Connection]:
        try:
            async with asyncio.timeout(timeout_s):
                if connection is None:
                    connection = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 24)
                reader, writer = connection
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
        except BaseException:
            if connection is not None:
                connection[1].close()
            raise
        if not line:
            connection[1].close()
            raise EOFError("the hub process closed the connection")
        return line, connection

    async def __aenter__(self) -> Self:
        await self.connect(self.connect_timeout_s)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections."""
        while self._idle:
            self._idle.pop()[1].close()
