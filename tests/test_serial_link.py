"""SerialLink over a real pseudo-terminal: open, send, frames and errors reach the listener, link loss."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import tty
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from factoryd.errors import LinkClosedError, LinkOpenError
from factoryd.transport.framing import Frame, FrameDecoder, FrameKind
from factoryd.transport.serial_link import LinkState, SerialLink

# Descriptors at or above this make select() fail (FD_SETSIZE): the link must not use it.
FD_SETSIZE = 1024


@dataclass
class Listener:
    frames: list[Any] = field(default_factory=list)
    errors: int = 0
    lost: list[BaseException | None] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def frame_received(self, frame: Any) -> None:
        self.frames.append(frame)
        self.changed.set()

    def frame_errors(self, count: int) -> None:
        self.errors += count
        self.changed.set()

    def link_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.changed.set()

    async def until(self, done: Any, timeout_s: float = 2.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@contextlib.contextmanager
def pty_pair() -> Iterator[tuple[int, str]]:
    """A pty: the master fd (the board's side) and the slave's path (the link's tty)."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        yield master, path
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.asynccontextmanager
async def open_link(path: str) -> AsyncIterator[tuple[SerialLink[FrameDecoder], Listener]]:
    link = await SerialLink.open(path, FrameDecoder())
    listener = Listener()
    link.attach(listener)
    try:
        yield link, listener
    finally:
        await link.close()


async def read_master(master: int, size: int, timeout_s: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(timeout_s):
        while len(got) < size:
            ready = asyncio.Event()
            loop.add_reader(master, ready.set)
            try:
                await ready.wait()
            finally:
                loop.remove_reader(master)
            got += os.read(master, 4096)
    return got


async def test_open_send_and_receive_frames() -> None:
    with pty_pair() as (master, path):
        async with open_link(path) as (link, listener):
            assert link.state is LinkState.OPEN
            request = Frame(FrameKind.REQUEST, 7, 1, 0, b"hi").encode()
            link.send(request)
            assert await read_master(master, len(request)) == request
            assert (link.stats.frames_sent, link.stats.bytes_sent) == (1, len(request))

            reply = Frame(FrameKind.RESPONSE, 7, 1, 0, b"ok")
            os.write(master, reply.encode() + Frame(FrameKind.EVENT, 0, 0x80).encode())
            await listener.until(lambda: len(listener.frames) == 2)
            assert listener.frames[0] == reply
            assert link.stats.bytes_received > 0
        assert link.state is LinkState.CLOSED
        with pytest.raises(LinkClosedError):
            link.send(b"x")


async def test_garbled_frames_reach_the_listener_as_errors() -> None:
    with pty_pair() as (master, path):
        async with open_link(path) as (_link, listener):
            good = Frame(FrameKind.RESPONSE, 1, 1).encode()
            corrupted = bytearray(good)
            corrupted[2] ^= 0xFF
            os.write(master, bytes(corrupted) + good)
            await listener.until(lambda: listener.frames and listener.errors)
            assert listener.errors == 1
            assert len(listener.frames) == 1


async def test_link_lost_when_the_peer_goes() -> None:
    with pty_pair() as (master, path):
        async with open_link(path) as (link, listener):
            os.close(master)
            await listener.until(lambda: listener.lost)
            assert link.state is LinkState.CLOSED
            with pytest.raises(LinkClosedError):
                link.send(b"x")


async def test_frames_before_attach_are_replayed() -> None:
    with pty_pair() as (master, path):
        link = await SerialLink.open(path, FrameDecoder())
        try:
            frame = Frame(FrameKind.EVENT, 0, 0x80)
            os.write(master, frame.encode())
            await asyncio.sleep(0.1)
            listener = Listener()
            link.attach(listener)
            assert listener.frames == [frame]
        finally:
            await link.close()


async def test_open_failure_names_the_path() -> None:
    with pytest.raises(LinkOpenError, match="/dev/nonexistent-serial-link"):
        await SerialLink.open("/dev/nonexistent-serial-link", FrameDecoder())


async def test_descriptor_above_fd_setsize_is_read_without_select() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_SETSIZE + 64
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    fillers: list[int] = []
    try:
        with pty_pair() as (master, path):
            # Occupy the low descriptors so the link's tty gets one >= FD_SETSIZE.
            while (fd := os.open(os.devnull, os.O_RDONLY)) < FD_SETSIZE:
                fillers.append(fd)
            os.close(fd)
            async with open_link(path) as (link, listener):
                assert link._transport is not None
                assert link._transport.serial.fd >= FD_SETSIZE  # type: ignore[attr-defined]
                frame = Frame(FrameKind.RESPONSE, 3, 1, 0, b"high fd")
                os.write(master, frame.encode())
                await listener.until(lambda: listener.frames)
                assert listener.frames == [frame]
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
