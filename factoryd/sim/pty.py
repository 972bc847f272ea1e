"""A simulated board behind a real pseudo-terminal.

The host opens the pty's slave path exactly like a ``/dev/ttyACM*``, so the production
pyserial path runs. One ``PtyBoard`` is one power-on period: closing it is unplugging the
board (the host's tty read fails, as with a vanished USB device).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import tty
from collections.abc import AsyncIterator

import structlog

from factoryd.sim.board import BoardHang, BoardReset, Fault, SimBoard
from factoryd.transport.framing import MAX_ENCODED_FRAME, Frame, FrameDecoder

log = structlog.get_logger(__name__)

READ_CHUNK = 65536
# A write the host does not drain within this long is dropped, as a real UART would overrun.
WRITE_STALL_S = 2.0
_NACK = object()
_REBOOT = object()
# What the simulated ROM bootloader of a blank board accepts from an external flashing tool:
# this marker, the image's SHA-256 in hex, a newline (the tool has written the image itself).
FLASH_MAGIC = b"FACTORYD-SIM-FLASH "


class PtyEndpoint:
    """A board's end of a pseudo-terminal for one power-on period: raw, non-blocking, wire-timed.

    Subclasses (one per board protocol) decode what arrives in ``_received`` into inbox items and
    answer them in ``_handle``; this class owns the PTY, the queue, unplugging and timed writes.
    """

    def __init__(self, board: SimBoard) -> None:
        self.board = board
        self._master, self._slave = os.openpty()
        # Raw mode: no echo, no line editing, no CR/LF translation on the board's side.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False
        self.hung = False
        asyncio.get_running_loop().add_reader(self._master, self._readable)

    async def serve(self) -> None:
        """Boot, then answer what arrives until cancelled or closed."""
        try:
            await self._boot()
            while not self._closed:
                item = await self._inbox.get()
                if not self.hung:
                    await self._handle(item)
        finally:
            self.close()

    def close(self) -> None:
        """Unplug: the host's tty goes away."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, RuntimeError):  # loop already closed at interpreter exit
            asyncio.get_running_loop().remove_reader(self._master)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _boot(self) -> None:
        raise NotImplementedError

    async def _handle(self, item: object) -> None:
        raise NotImplementedError

    def _received(self, data: bytes) -> None:
        raise NotImplementedError

    def _readable(self) -> None:
        try:
            data = os.read(self._master, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: no process has the slave open right now
                log.warning("sim pty read failed", error=str(exc))
            return
        self._received(data)

    async def _send(self, data: bytes) -> None:
        await self.board.spend(self.board.wire_s(len(data)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WRITE_STALL_S
        view = memoryview(data)
        while view and not self._closed:
            try:
                written = os.write(self._master, view)
            except BlockingIOError:
                if loop.time() > deadline:
                    log.debug("sim pty write stalled; dropping", pending=len(view))
                    return
                await asyncio.sleep(0.005)
                continue
            except OSError:
                return
            view = view[written:]


class PtyBoard(PtyEndpoint):
    """Serves one SimBoard (native protocol) on a fresh pseudo-terminal until closed."""

    def __init__(self, board: SimBoard) -> None:
        super().__init__(board)
        self._decoder = FrameDecoder()
        self._rom = bytearray()

    async def _handle(self, item: object) -> None:
        if item is _NACK:
            await self._send(self.board.nack_frame().encode())
        elif item is _REBOOT:
            await self._boot()
        elif isinstance(item, Frame):
            await self._answer(item)

    async def _boot(self) -> None:
        self.board.power_on()
        if self.board.blank:
            return  # nothing runs that could announce itself
        await self.board.spend(self.board.jittered(self.board.timing.boot_s))
        if self.board.fault(Fault.BOOT_GARBAGE):
            # Bootloader banner noise, with no frame delimiter in it.
            await self._send(b"\r\nBOOT v1.2 ... " + secrets.token_bytes(40).replace(b"\x00", b"\x01"))
        await self._send(self.board.boot_frame().encode())

    async def _answer(self, frame: Frame) -> None:
        board = self.board
        # The request took its time on the wire from the host too.
        await board.spend(board.wire_s(len(frame.encode())))
        try:
            reply = await board.handle(frame)
        except BoardHang:
            self.hung = True
            log.debug("sim board hangs", serial=board.serial_hex)
            return
        except BoardReset as reset:
            ack = reset.args[0] if reset.args else None
            if isinstance(ack, Frame):
                await self._send(ack.encode())
            self._drain_inbox()
            await self._boot()
            return
        if reply is None:
            return
        if board.fault(Fault.DROP_REPLY):
            return
        if board.flood_bytes:
            # Delimited junk: every piece is a "frame" that fails its CRC on the host.
            junk = secrets.token_bytes(board.flood_bytes).replace(b"\x00", b"\x01")
            await self._send(b"".join(junk[i : i + 50] + b"\x00" for i in range(0, len(junk), 50)))
        if board.fault(Fault.OVERSIZE_FRAME):
            await self._send(b"\x55" * (MAX_ENCODED_FRAME + 16))
        data = reply.encode()
        if board.fault(Fault.CORRUPT_BYTE):
            i = board.rng.randrange(len(data) - 1)  # never the delimiter
            flipped = data[i] ^ 0x5A or 0x01
            data = data[:i] + bytes([flipped]) + data[i + 1 :]
        await self._send(data)

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            self._inbox.get_nowait()

    def _received(self, data: bytes) -> None:
        if self.board.blank:
            self._rom_bootloader(data)
            return
        for frame in self._decoder.feed(data):
            self._inbox.put_nowait(frame)
        # How many requests have waited at once (tests: only revision 3 boards are sent bursts).
        self.board.max_queued_requests = max(self.board.max_queued_requests, self._inbox.qsize())
        for _ in range(self._decoder.take_errors()):
            self._inbox.put_nowait(_NACK)

    def _rom_bootloader(self, data: bytes) -> None:
        """A blank board only listens for an external flashing tool."""
        self._rom += data
        start = self._rom.find(FLASH_MAGIC)
        end = self._rom.find(b"\n", start)
        if start < 0 or end < 0:
            del self._rom[: max(0, len(self._rom) - 256)]
            return
        digest = bytes(self._rom[start + len(FLASH_MAGIC) : end]).decode("ascii", "replace").strip()
        self._rom.clear()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            self.board.blank = False
            self.board.fw_sha256 = bytes.fromhex(digest)
            self.board.fw_version = "flashed-by-tool"
            self._inbox.put_nowait(_REBOOT)


def pty_runner(board: SimBoard) -> PtyEndpoint:
    """The PTY endpoint for a board: its model's own (``open_pty``), else the native protocol's."""
    opener = getattr(board, "open_pty", None)
    runner = opener() if callable(opener) else PtyBoard(board)
    if not isinstance(runner, PtyEndpoint):
        raise TypeError(f"{type(board).__name__}.open_pty() returned no PtyEndpoint")
    return runner


@contextlib.asynccontextmanager
async def serve_pty(board: SimBoard) -> AsyncIterator[PtyEndpoint]:
    """Run a board behind a pty for the duration of the block; yields it (``.path`` is the tty)."""
    pty_board = pty_runner(board)
    task = asyncio.create_task(pty_board.serve(), name=f"sim-board-{board.serial_hex}")
    try:
        yield pty_board
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pty_board.close()
