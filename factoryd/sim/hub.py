"""A simulated hub: ports with simulated boards behind real PTYs, and a simulated operator.

Powering a port on makes its board enumerate after the timing model's delay (a fresh PTY path,
like a new ttyACM number); powering it off unplugs it (the host's tty fails). ``release`` is
the operator swapping a finished board for the next one from the supply. ``unplug`` pulls the
hub's own cable (every tty vanishes at once, every control call fails) until ``replug``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from factoryd.errors import EnumerationTimeoutError, HubCommandError, HubDisconnectedError
from factoryd.sim.board import SimBoard
from factoryd.sim.pty import PtyEndpoint, pty_runner


@dataclass
class _Slot:
    port: str
    board: SimBoard | None = None
    powered: bool = False
    pty: PtyEndpoint | None = None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class SimHub:
    """Ports 1..N with simulated boards; ``supply`` boards in all (None = endless)."""

    def __init__(
        self,
        ports: int,
        board_factory: Callable[[], SimBoard],
        *,
        supply: int | None = None,
        name: str = "sim-hub",
    ) -> None:
        self.name = name
        self._factory = board_factory
        self._supply = supply
        self.boards_inserted = 0
        self.finished: list[SimBoard] = []
        self._slots = {str(i): _Slot(str(i)) for i in range(1, ports + 1)}
        self._tg: asyncio.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()
        # True while the hub's cable is pulled (fault injection): boards unpowered, calls fail.
        self.unplugged = False
        for slot in self._slots.values():
            slot.board = self._next_board()

    async def __aenter__(self) -> Self:
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unplugged = False
        for port in self._slots:
            await self.power_off(port)
        await self._stack.aclose()

    async def unplug(self) -> None:
        """Pull the hub's cable: every board loses power and its tty at once, every call then fails."""
        self.unplugged = True
        for slot in self._slots.values():
            await self._cut(slot)
            slot.ready.set()  # a wait for the tty ends now, with the hub's error

    def replug(self) -> None:
        """Plug the hub back in: it comes back with every port off (as a real hub powers up)."""
        self.unplugged = False
        for slot in self._slots.values():
            slot.ready.clear()

    async def check(self) -> None:
        """Fail with HubDisconnectedError while the hub is unplugged."""
        self._connected()

    def _connected(self) -> None:
        if self.unplugged:
            raise HubDisconnectedError(f"{self.name}: hub disconnected (no USB device answers)")

    def ports(self) -> Sequence[str]:
        """Port names."""
        return list(self._slots)

    def board(self, port: str) -> SimBoard | None:
        """The board currently in a port (tests and the demo look at it)."""
        return self._slot(port).board

    def insert(self, port: str, board: SimBoard | None) -> None:
        """Put a board into a port (or empty it); the port must be off."""
        slot = self._slot(port)
        if slot.powered:
            raise HubCommandError(f"port {port}: cannot swap a board on a powered port")
        slot.board = board

    @property
    def exhausted(self) -> bool:
        """True when the supply is used up and every port is empty."""
        return all(s.board is None for s in self._slots.values())

    async def power_on(self, port: str) -> None:
        """Power a port; its board (if any) enumerates after its timing model's delay."""
        slot = self._slot(port)
        self._connected()
        if slot.powered:
            return
        slot.powered = True
        if slot.board is not None:
            if self._tg is None:
                raise HubCommandError("SimHub used outside 'async with'")
            slot.task = self._tg.create_task(self._run(slot, slot.board), name=f"sim-port-{port}")

    async def power_off(self, port: str) -> None:
        """Cut power: the board's tty disappears."""
        slot = self._slot(port)
        self._connected()
        await self._cut(slot)

    async def _cut(self, slot: _Slot) -> None:
        slot.powered = False
        slot.ready.clear()
        task, slot.task = slot.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if slot.pty is not None:
            slot.pty.close()
            slot.pty = None

    async def wait_for_tty(self, port: str, timeout_s: float) -> str:
        """Wait for the board's PTY; an empty or unpowered port fails at once (no udev add will come)."""
        slot = self._slot(port)
        self._connected()
        if not slot.powered:
            raise EnumerationTimeoutError(f"port {port} is not powered")
        if slot.board is None:
            raise EnumerationTimeoutError(f"port {port}: no device enumerated (empty)")
        try:
            async with asyncio.timeout(timeout_s):
                await slot.ready.wait()
        except TimeoutError:
            self._connected()
            raise EnumerationTimeoutError(f"port {port}: no tty after {timeout_s:.1f} s") from None
        self._connected()
        if slot.pty is None:
            raise EnumerationTimeoutError(f"port {port}: device vanished during enumeration")
        return slot.pty.path

    async def device_serial(self, port: str, tty: str) -> str | None:
        """The simulated board's USB serial (Arduino-style boards), else None."""
        self._connected()
        board = self._slot(port).board
        serial = getattr(board, "usb_serial", None)
        return serial if isinstance(serial, str) and serial else None

    async def release(self, port: str) -> None:
        """The simulated operator takes the finished board out and inserts the next one."""
        slot = self._slot(port)
        self._connected()
        if slot.powered:
            await self.power_off(port)
        if slot.board is not None:
            self.finished.append(slot.board)
        slot.board = self._next_board()

    def _next_board(self) -> SimBoard | None:
        if self._supply is not None and self.boards_inserted >= self._supply:
            return None
        self.boards_inserted += 1
        board = self._factory()
        board.sequence = self.boards_inserted
        return board

    async def _run(self, slot: _Slot, board: SimBoard) -> None:
        await board.spend(board.jittered(board.timing.enumerate_s))
        pty = pty_runner(board)
        slot.pty = pty
        slot.ready.set()
        await pty.serve()

    def _slot(self, port: str) -> _Slot:
        try:
            return self._slots[port]
        except KeyError:
            raise HubCommandError(f"{self.name} has no port {port!r}") from None
