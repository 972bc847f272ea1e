"""The serial link: a tty opened through pyserial-asyncio-fast, carrying one protocol's frames.

The link only moves bytes in and frames out: it feeds what arrives to its decoder (the native
COBS ``FrameDecoder`` or Arduino's v1 decoder), hands every frame and every decode error to one
``LinkListener`` (the client) and tells it once when the tty goes away.

pyserial's own ``read()`` calls ``select()``, which fails for descriptors >= 1024 — a station with
a few hundred ports gets there. The event loop has already said the tty is readable, so the
link reads it with one non-blocking ``os.read`` instead (``_LoopSerial``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import serial
import serial_asyncio_fast

from factoryd.errors import LinkClosedError, LinkOpenError
from factoryd.transport.decoding import Decoder

DEFAULT_BAUDRATE = 115200
# Bits per byte on an 8N1 line: start + 8 data + stop.
BITS_PER_BYTE = 10


class LinkState(Enum):
    """Connection state of a link."""

    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


D = TypeVar("D", bound=Decoder)


class LinkListener(Protocol):
    """What the link reports upward."""

    def frame_received(self, frame: Any) -> None:
        """A frame arrived."""

    def frame_errors(self, count: int) -> None:
        """Undecodable frames arrived (bad CRC, COBS, size)."""

    def link_lost(self, exc: BaseException | None) -> None:
        """The tty closed or vanished; no more frames will arrive."""


@dataclass
class LinkCounters:
    """Traffic counters of one link."""

    frames_sent: int = 0
    bytes_sent: int = 0
    # Writes handed to the transport: one per request, or one for a burst of pipelined requests.
    writes: int = 0
    bytes_received: int = 0


class _LoopSerial(serial.Serial):  # type: ignore[misc]  # pyserial is untyped
    """pyserial's Serial, reading without ``select()`` (the loop has seen the fd readable)."""

    def read(self, size: int = 1) -> bytes:
        """One non-blocking read; an empty read on a readable tty means the device is gone."""
        try:
            data = os.read(self.fd, size)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise serial.SerialException(f"read failed: {exc}") from exc
        if not data:
            raise serial.SerialException("device disconnected (read returned no data)")
        return data


@dataclass
class _NullListener:
    """Listener used before the client attaches."""

    frames: list[Any] = field(default_factory=list)

    def frame_received(self, frame: Any) -> None:
        self.frames.append(frame)

    def frame_errors(self, count: int) -> None:
        pass

    def link_lost(self, exc: BaseException | None) -> None:
        pass


class _SerialProtocol(asyncio.Protocol):
    def __init__(self, link: SerialLink[Any]) -> None:
        self._link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._link._connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._link._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._connection_lost(exc)


class SerialLink(Generic[D]):
    """One open serial device; ``decoder`` turns its bytes into the protocol's frames."""

    def __init__(self, path: str, decoder: D, *, baudrate: int = DEFAULT_BAUDRATE) -> None:
        self.path = path
        self.baudrate = baudrate
        self.state = LinkState.OPENING
        self.decoder = decoder
        self.stats = LinkCounters()
        self._listener: LinkListener = _NullListener()
        self._transport: asyncio.BaseTransport | None = None
        self._closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, path: str, decoder: D, *, baudrate: int = DEFAULT_BAUDRATE) -> SerialLink[D]:
        """Open the tty; raise LinkOpenError naming the path when it cannot be opened."""
        link = cls(path, decoder, baudrate=baudrate)
        loop = asyncio.get_running_loop()
        try:
            # Opening a tty can block briefly (modem lines, USB): do it off the loop.
            device = await loop.run_in_executor(None, lambda: _LoopSerial(path, baudrate=baudrate))
        except (serial.SerialException, OSError, ValueError) as exc:
            link.state = LinkState.CLOSED
            raise LinkOpenError(f"cannot open serial device {path}: {exc}") from exc
        transport, _ = await serial_asyncio_fast.connection_for_serial(
            loop, lambda: _SerialProtocol(link), device
        )
        # connection_made() runs on the next loop iteration; the link is usable now.
        link._connection_made(transport)
        return link

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def attach(self, listener: LinkListener) -> None:
        """Route frames to a listener; frames that arrived before are replayed to it."""
        early = self._listener
        self._listener = listener
        if isinstance(early, _NullListener):
            for frame in early.frames:
                listener.frame_received(frame)
        if self.state is LinkState.CLOSED:
            listener.link_lost(None)

    def send(self, data: bytes, *, frames: int = 1) -> None:
        """Queue encoded frames (``frames`` of them, back to back) in one write; LinkClosedError when gone."""
        transport = self._transport
        if self.state is not LinkState.OPEN or not isinstance(transport, asyncio.WriteTransport):
            raise LinkClosedError(f"serial link {self.path} is closed")
        self.stats.writes += 1
        self.stats.frames_sent += frames
        self.stats.bytes_sent += len(data)
        transport.write(data)

    def wire_time_s(self, nbytes: int) -> float:
        """Seconds that nbytes take on the line at the link's baud rate."""
        return nbytes * BITS_PER_BYTE / self.baudrate

    async def close(self) -> None:
        """Close the tty and wait until the transport is gone."""
        transport = self._transport
        if transport is not None and self.state is not LinkState.CLOSED:
            if isinstance(transport, asyncio.WriteTransport) and not transport.get_write_buffer_size():
                # Nothing is left to send: close at once, without pyserial-asyncio-fast's separate
                # flush (tcdrain) before the close, each a hop to a thread. The kernel's close of a
                # tty still waits for what the tty has queued (its closing_wait), as the drain would.
                transport.abort()
            else:
                transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), 2.0)
        self.state = LinkState.CLOSED

    async def wait_closed(self) -> None:
        """Wait until the tty is gone."""
        await asyncio.shield(self._closed)

    def _connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.state is LinkState.OPENING:
            self._transport = transport
            self.state = LinkState.OPEN

    def _data_received(self, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        for frame in self.decoder.feed(data):
            self._listener.frame_received(frame)
        errors = self.decoder.take_errors()
        if errors:
            self._listener.frame_errors(errors)

    def _connection_lost(self, exc: Exception | None) -> None:
        self.state = LinkState.CLOSED
        if not self._closed.done():
            self._closed.set_result(None)
        self._listener.link_lost(exc)
