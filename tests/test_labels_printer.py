"""The raw-TCP ZPL printer client: ~HS parsing, readiness, timeouts, against servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from factoryd.labels.errors import PrinterError, PrinterNotReadyError, PrinterOfflineError
from factoryd.labels.printer import PrinterAddress, PrinterTimeouts, ZplPrinter, parse_host_status
from factoryd.sim.printer import PrinterCondition, SimPrinter, host_status_reply

FAST = PrinterTimeouts(connect_s=0.5, status_s=0.3, write_s=0.5)
# The ~HS example of Zebra's ZPL II programming guide (host status return), one flag flipped per case.
GUIDE_ONE = "030,{paper},{pause},1245,000,0,0,0,000,0,0,0"
GUIDE_TWO = "001,0,{head},{ribbon},1,2,4,0,00000000,1,000"


def guide_reply(paper: int = 0, pause: int = 0, head: int = 0, ribbon: int = 0) -> bytes:
    one = GUIDE_ONE.format(paper=paper, pause=pause)
    two = GUIDE_TWO.format(head=head, ribbon=ribbon)
    return b"".join(b"\x02" + s.encode() + b"\x03\r\n" for s in (one, two, "1234,0"))


@pytest.mark.parametrize(
    ("flags", "problems"),
    [
        ({}, ()),
        ({"paper": 1}, ("paper_out",)),
        ({"pause": 1}, ("paused",)),
        ({"head": 1}, ("head_open",)),
        ({"ribbon": 1}, ("ribbon_out",)),
        ({"paper": 1, "pause": 1}, ("paper_out", "paused")),
    ],
)
def test_host_status_flags_as_the_zpl_guide_lays_them_out(
    flags: dict[str, int], problems: tuple[str, ...]
) -> None:
    status = parse_host_status(guide_reply(**flags))
    assert status.problems == problems
    assert status.ready is (not problems)


@pytest.mark.parametrize(
    "reply",
    [b"", b"\x02030,0,0\x03", guide_reply().replace(b"030,0,0", b"030,x,0"), b"\x02a\x03\x02b\x03\x02c\x03"],
)
def test_a_malformed_status_reply_is_an_error(reply: bytes) -> None:
    with pytest.raises(PrinterError):
        parse_host_status(reply)


def test_the_simulator_answers_like_the_guide() -> None:
    assert parse_host_status(host_status_reply(PrinterCondition.READY)).ready
    assert parse_host_status(host_status_reply(PrinterCondition.PAPER_OUT)).problems == ("paper_out",)
    assert parse_host_status(host_status_reply(PrinterCondition.HEAD_OPEN)).problems == ("head_open",)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.0.5.21", PrinterAddress("10.0.5.21", 9100)),
        ("printer-3.line.lan:6101", PrinterAddress("printer-3.line.lan", 6101)),
        ("[fd00::21]:9100", PrinterAddress("fd00::21", 9100)),
        ("[fd00::21]", PrinterAddress("fd00::21", 9100)),
    ],
)
def test_printer_addresses(text: str, address: PrinterAddress) -> None:
    assert PrinterAddress.parse(text) == address
    assert PrinterAddress.parse(str(address)) == address


@pytest.mark.parametrize("text", ["", "host:0", "host:70000", "a b", "fd00::21", "host:port", "[fd00::1"])
def test_bad_printer_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="printer address"):
        PrinterAddress.parse(text)


@contextlib.asynccontextmanager
async def server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[PrinterAddress]:
    """A TCP server on 127.0.0.1 whose connection handlers end with it."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield PrinterAddress("127.0.0.1", srv.sockets[0].getsockname()[1])
    finally:
        srv.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


async def test_a_printer_that_never_answers_status_is_not_ready_within_the_timeout() -> None:
    received = bytearray()

    async def mute(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(100):
            received.extend(chunk)

    async with server(mute) as address:
        printer = ZplPrinter(address, FAST)
        with pytest.raises(PrinterNotReadyError) as caught:
            await printer.print_label(b"^XA^XZ")
    assert caught.value.condition == "no_status"
    assert caught.value.transient
    assert bytes(received) == b"~HS"  # the label itself was never sent


async def test_a_printer_that_hangs_up_is_offline() -> None:
    async def hang_up(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        return

    async with server(hang_up) as address:
        with pytest.raises(PrinterOfflineError):
            await ZplPrinter(address, FAST).status()


async def test_a_closed_port_is_offline() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PrinterOfflineError, match="offline"):
        await ZplPrinter(PrinterAddress("127.0.0.1", port), FAST).print_label(b"^XA^XZ")


async def test_a_chatty_printer_is_refused() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(3)
        writer.write(b"x" * 2000)
        await writer.drain()
        await reader.read(100)

    async with server(chatty) as address:
        with pytest.raises(PrinterError, match="bytes for ~HS"):
            await ZplPrinter(address, FAST).status()


async def test_a_label_sent_while_ready_prints_and_one_held_prints_after_reload() -> None:
    async with SimPrinter() as sim:
        printer = ZplPrinter(sim.address, FAST)
        receipt = await printer.print_label(b"^XA^FO0,0^A0N,20,20^FDa^FS^XZ")
        assert receipt.before.ready
        assert receipt.after is not None
        assert receipt.after.ready
        assert len(sim.printed) == 1
        # Jobs to one printer are serialised (its raw port serves one connection at a time).
        await asyncio.gather(*(printer.print_label(b"^XA^XZ") for _ in range(5)))
        assert len(sim.printed) == 6
        assert sim.connections == 6
        # A printer that ran out of paper holds what it got and prints it once reloaded.
        await sim.set_condition(PrinterCondition.PAPER_OUT)
        with pytest.raises(PrinterNotReadyError):
            await printer.print_label(b"^XA^XZ")
        assert sim.held == []
        await sim.set_condition(PrinterCondition.READY)
        assert len(await sim.wait_printed(6, timeout_s=1)) == 6
