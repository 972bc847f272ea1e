"""A simulated ZPL label printer on 127.0.0.1: a raw TCP (9100-style) server that keeps every label.

It answers ``~HS`` with the three status strings of the ZPL manual (LABELS.md) built from its
condition, stores each ``^XA``…``^XZ`` format it receives as one label, and can be switched to
offline (the port refuses connections), paper out, head open or paused. Like a real Zebra it keeps
a label received while it cannot print and prints it when the condition clears; with
``silent_when_faulted`` it sends no ``~HS`` reply while paper is out or the head is open, as
Zebra's current firmware does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import TracebackType
from typing import Self

from factoryd.config import LabelsConfig
from factoryd.labels.printer import PrinterAddress

STX, ETX = b"\x02", b"\x03"
# A label format bigger than this is a stuck stream, not a label (a 4x6 inch label is a few kB).
MAX_FORMAT_BYTES = 1 << 20
READ_CHUNK_BYTES = 4096


class PrinterCondition(StrEnum):
    """What the simulated printer is doing."""

    READY = "ready"
    OFFLINE = "offline"
    PAPER_OUT = "paper_out"
    HEAD_OPEN = "head_open"
    PAUSED = "paused"


def host_status_reply(condition: PrinterCondition, *, formats_in_buffer: int = 0) -> bytes:
    """The ``~HS`` reply of a printer in ``condition`` (203 dpi, 4x6 inch media, tear-off)."""
    paper_out = int(condition is PrinterCondition.PAPER_OUT)
    paused = int(condition is PrinterCondition.PAUSED)
    head_up = int(condition is PrinterCondition.HEAD_OPEN)
    one = f"030,{paper_out},{paused},1218,{formats_in_buffer:03d},0,0,0,000,0,0,0"
    two = f"001,0,{head_up},0,0,2,4,0,00000000,1,000"
    three = "1234,0"
    return b"".join(STX + s.encode() + ETX + b"\r\n" for s in (one, two, three))


class SimPrinter:
    """One simulated printer; ``async with`` starts and stops its server."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, silent_when_faulted: bool = False) -> None:
        self._host = host
        self._port = port
        self.silent_when_faulted = silent_when_faulted
        self.condition = PrinterCondition.READY
        self.printed: list[bytes] = []  # every label printed, in order
        self.held: list[bytes] = []  # labels received while unable to print
        self.status_queries = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self._changed = asyncio.Condition()

    @property
    def address(self) -> PrinterAddress:
        """Where the printer listens (the port is fixed at the first start)."""
        if self._port == 0:
            raise RuntimeError("the simulated printer has not started yet")
        return PrinterAddress(self._host, self._port)

    async def __aenter__(self) -> Self:
        await self._listen()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def set_condition(self, condition: PrinterCondition) -> None:
        """Switch the printer; offline closes its port, and a ready printer prints what it held."""
        was_offline = self.condition is PrinterCondition.OFFLINE
        self.condition = condition
        if condition is PrinterCondition.OFFLINE:
            await self._close()
        elif was_offline:
            await self._listen()
        if condition is PrinterCondition.READY and self.held:
            self.printed.extend(self.held)
            self.held.clear()
        await self._notify()

    async def wait_printed(self, count: int, timeout_s: float) -> list[bytes]:
        """Wait until ``count`` labels are printed; TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self.printed) >= count)
        return list(self.printed)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        # Python 3.11's wait_closed does not wait for the connection handlers: end them here.
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        buffer = b""
        try:
            while True:
                chunk = await reader.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                buffer = await self._consume(buffer + chunk, writer)
                if len(buffer) > MAX_FORMAT_BYTES:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _consume(self, buffer: bytes, writer: asyncio.StreamWriter) -> bytes:
        """Handle every complete command in ``buffer``; return the incomplete rest."""
        while True:
            buffer = buffer.lstrip(b"\r\n\t ")
            if buffer.startswith(b"~HS"):
                buffer = buffer[3:]
                self.status_queries += 1
                faulted = self.condition in (PrinterCondition.PAPER_OUT, PrinterCondition.HEAD_OPEN)
                if not (self.silent_when_faulted and faulted):
                    writer.write(host_status_reply(self.condition, formats_in_buffer=len(self.held)))
                    await writer.drain()
                continue
            if buffer.startswith(b"^XA"):
                end = buffer.find(b"^XZ")
                if end < 0:
                    return buffer
                label, buffer = buffer[: end + 3], buffer[end + 3 :]
                if self.condition is PrinterCondition.READY:
                    self.printed.append(label)
                else:
                    self.held.append(label)
                await self._notify()
                continue
            if len(buffer) < 3:
                return buffer
            # Anything else is not what a factoryd station sends: drop up to the next command.
            nxt = min(
                (i for i in (buffer.find(b"^XA", 1), buffer.find(b"~HS", 1)) if i > 0), default=len(buffer)
            )
            buffer = buffer[nxt:]


async def start_printers(ports: Iterable[str]) -> dict[str, SimPrinter]:
    """One started printer per port (``factoryd demo``); stop them with :func:`stop_printers`."""
    printers: dict[str, SimPrinter] = {}
    try:
        for port in ports:
            printers[port] = await SimPrinter().__aenter__()
    except BaseException:
        await stop_printers(printers)
        raise
    return printers


async def stop_printers(printers: Mapping[str, SimPrinter]) -> None:
    """Stop every printer :func:`start_printers` started."""
    for printer in printers.values():
        await printer.__aexit__(None, None, None)


def printed_labels(printers: Mapping[str, SimPrinter]) -> int:
    """Labels the printers printed, all together."""
    return sum(len(p.printed) for p in {id(p): p for p in printers.values()}.values())


def printer_settings(printers: Mapping[str, SimPrinter]) -> LabelsConfig:
    """``[labels]`` for a station whose ports print on these printers (short retries for a demo)."""
    return LabelsConfig(
        enabled=True,
        printers={port: str(p.address) for port, p in printers.items()},
        retry_initial_s=0.2,
        retry_max_s=2.0,
        poll_s=0.5,
    )
