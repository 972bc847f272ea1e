"""A ZPL label printer on raw TCP (port 9100): host status (``~HS``) and jobs, with timeouts.

LABELS.md: the raw port is first come, first served, so one job holds one connection: connect,
``~HS`` (refuse to print unless the printer is ready), write the label, ``~HS`` again (a printer
that ran out of paper on this label keeps it in its buffer and prints it after reloading; the
operator is told), close. Zebra's current firmware sends no ``~HS`` reply at all while media or
ribbon is out or the head is open: a missing reply is "not ready", never "ready".
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from factoryd.labels.errors import PrinterError, PrinterNotReadyError, PrinterOfflineError

# LABELS.md: transport is raw TCP port 9100 (AppSocket/JetDirect).
DEFAULT_PRINTER_PORT = 9100
CONNECT_TIMEOUT_S = 3.0
STATUS_TIMEOUT_S = 2.0
WRITE_TIMEOUT_S = 10.0
# Each ~HS string ends with ETX (LABELS.md: <STX>…<ETX><CR><LF>).
ETX = 0x03
# ~HS answers three short strings; anything longer is not a ZPL printer.
MAX_STATUS_BYTES = 512
# A host name or IPv4 address, optionally :port (IPv6 goes in brackets, parsed apart).
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>\d{1,5}))?")


@dataclass(frozen=True, slots=True)
class PrinterAddress:
    """Where a printer listens."""

    host: str
    port: int = DEFAULT_PRINTER_PORT

    @classmethod
    def parse(cls, text: str) -> PrinterAddress:
        """``host`` or ``host:port`` (IPv6 as ``[addr]:port``); ValueError names the problem."""
        value = text.strip()
        if value.startswith("["):
            addr, sep, rest = value[1:].partition("]")
            port_text = rest.removeprefix(":") if sep else ""
            if not addr or not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"printer address {text!r}: expected [ipv6]:port")
            return cls(addr, cls._port(text, port_text or str(DEFAULT_PRINTER_PORT)))
        match = _HOST_PORT.fullmatch(value)
        if match is None:
            raise ValueError(f"printer address {text!r}: expected host or host:port")
        return cls(match["host"], cls._port(text, match["port"] or str(DEFAULT_PRINTER_PORT)))

    @staticmethod
    def _port(text: str, port_text: str) -> int:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"printer address {text!r}: port must be 1..65535")
        return int(port_text)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PrinterStatus:
    """The ``~HS`` flags that decide whether a label can print (1 = true in the reply)."""

    paper_out: bool
    paused: bool
    head_up: bool
    ribbon_out: bool
    buffer_full: bool
    under_temperature: bool
    over_temperature: bool
    formats_in_buffer: int
    labels_remaining: int

    @property
    def problems(self) -> tuple[str, ...]:
        """Condition codes that stop printing, most actionable first (empty: ready)."""
        found = [
            ("paper_out", self.paper_out),
            ("head_open", self.head_up),
            ("ribbon_out", self.ribbon_out),
            ("paused", self.paused),
            ("buffer_full", self.buffer_full),
            ("head_too_hot", self.over_temperature),
            ("head_too_cold", self.under_temperature),
        ]
        return tuple(code for code, on in found if on)

    @property
    def ready(self) -> bool:
        """True when nothing stops printing."""
        return not self.problems


def parse_host_status(reply: bytes) -> PrinterStatus:
    """Parse the three ``<STX>…<ETX>`` strings of a ``~HS`` reply; PrinterError if malformed."""
    strings = re.findall(rb"\x02([^\x02\x03]*)\x03", reply)
    if len(strings) < 3:
        raise PrinterError(f"~HS reply has {len(strings)} of 3 status strings: {reply[:80]!r}")
    try:
        one = strings[0].decode("ascii").split(",")
        two = strings[1].decode("ascii").split(",")
    except UnicodeDecodeError:
        raise PrinterError("~HS reply is not ASCII") from None
    # LABELS.md: string 1 aaa,b,c,dddd,eee,f,g,h,iii,j,k,l; string 2 mmm,n,o,p,q,r,s,t,uuuuuuuu,v,www.
    if len(one) < 12 or len(two) < 9:
        raise PrinterError(f"~HS status strings have {len(one)} and {len(two)} fields, want 12 and 11")

    def flag(value: str) -> bool:
        if value.strip() not in ("0", "1"):
            raise PrinterError(f"~HS flag {value!r} is not 0 or 1")
        return value.strip() == "1"

    try:
        formats, labels = int(one[4]), int(two[8])
    except ValueError:
        raise PrinterError("~HS counters are not numbers") from None
    return PrinterStatus(
        paper_out=flag(one[1]),
        paused=flag(one[2]),
        buffer_full=flag(one[5]),
        under_temperature=flag(one[10]),
        over_temperature=flag(one[11]),
        head_up=flag(two[2]),
        ribbon_out=flag(two[3]),
        formats_in_buffer=formats,
        labels_remaining=labels,
    )


@dataclass(frozen=True, slots=True)
class PrinterTimeouts:
    """Time limits of one printer exchange, in seconds."""

    connect_s: float = CONNECT_TIMEOUT_S
    status_s: float = STATUS_TIMEOUT_S
    write_s: float = WRITE_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class PrintReceipt:
    """What the printer said before and after a job."""

    before: PrinterStatus
    after: PrinterStatus | None  # None: no reply after the job (media out during the label?)


class ZplPrinter:
    """One printer; jobs to it are serialised (its raw port serves one connection at a time)."""

    def __init__(self, address: PrinterAddress, timeouts: PrinterTimeouts | None = None) -> None:
        self.address = address
        self.timeouts = timeouts or PrinterTimeouts()
        self._lock = asyncio.Lock()

    async def status(self) -> PrinterStatus:
        """Ask ``~HS`` on a connection of its own."""
        async with self._lock, self._connected() as (reader, writer):
            return await self._query(reader, writer)

    async def print_label(self, zpl: bytes) -> PrintReceipt:
        """Print one label if the printer reports ready; PrinterError (queue and retry) otherwise."""
        async with self._lock, self._connected() as (reader, writer):
            before = await self._query(reader, writer)
            if not before.ready:
                condition = before.problems[0]
                raise PrinterNotReadyError(
                    f"printer {self.address} is not ready: {', '.join(before.problems)}", condition=condition
                )
            await self._write(writer, zpl)
            try:
                after: PrinterStatus | None = await self._query(reader, writer)
            except PrinterNotReadyError:
                after = None
            return PrintReceipt(before, after)

    @contextlib.asynccontextmanager
    async def _connected(self) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        try:
            async with asyncio.timeout(self.timeouts.connect_s):
                reader, writer = await asyncio.open_connection(self.address.host, self.address.port)
        except TimeoutError:
            raise PrinterOfflineError(
                f"printer {self.address} did not accept a connection within {self.timeouts.connect_s} s"
            ) from None
        except OSError as exc:
            raise PrinterOfflineError(f"printer {self.address} is offline: {exc.strerror or exc}") from exc
        try:
            yield reader, writer
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.timeouts.connect_s):
                    await writer.wait_closed()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeouts.write_s):
                writer.write(data)
                await writer.drain()
        except TimeoutError:
            raise PrinterOfflineError(
                f"printer {self.address} took no data for {self.timeouts.write_s} s"
            ) from None
        except OSError as exc:
            raise PrinterOfflineError(f"printer {self.address} dropped the connection: {exc}") from exc

    async def _query(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> PrinterStatus:
        await self._write(writer, b"~HS")
        reply = b""
        try:
            async with asyncio.timeout(self.timeouts.status_s):
                while reply.count(ETX) < 3:
                    chunk = await reader.read(MAX_STATUS_BYTES)
                    if not chunk:
                        raise PrinterOfflineError(f"printer {self.address} closed the connection")
                    reply += chunk
                    if len(reply) > MAX_STATUS_BYTES:
                        raise PrinterError(f"printer {self.address} sent {len(reply)} bytes for ~HS")
        except TimeoutError:
            # LABELS.md: no reply at all while media out, ribbon out, head open or head over-temperature.
            raise PrinterNotReadyError(
                f"printer {self.address} sent no status within {self.timeouts.status_s} s "
                "(media or ribbon out, head open?)",
                condition="no_status",
            ) from None
        except OSError as exc:
            raise PrinterOfflineError(f"printer {self.address} dropped the connection: {exc}") from exc
        return parse_host_status(reply)
