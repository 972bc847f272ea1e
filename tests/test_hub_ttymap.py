"""Port -> tty resolution: topology keys, the by-path poller, the udev-event resolver."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import pytest

from factoryd.errors import EnumerationTimeoutError, HubCommandError
from factoryd.hub.ttymap import (
    ByPathResolver,
    PortTtys,
    TtyStillPresentError,
    UdevResolver,
    make_resolver,
    topology_key,
)


def link(by_path: Path, name: str) -> Path:
    """A by-path symlink to a fresh tty stand-in."""
    target = by_path.parent / f"tty-{len(os.listdir(by_path))}-{abs(hash(name))}"
    target.touch()
    (by_path / name).symlink_to(target)
    return by_path / name


@pytest.fixture
def by_path(tmp_path: Path) -> Path:
    """A stand-in for /dev/serial/by-path."""
    d = tmp_path / "by-path"
    d.mkdir()
    return d


class FakeMonitor:
    """pyudev.Monitor's surface: a pipe that becomes readable when an event is queued."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.queue: collections.deque[str] = collections.deque()
        self.started = False

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return self._r

    def poll(self, timeout: float | None = None) -> str | None:
        if not self.queue:
            return None
        os.read(self._r, 1)
        return self.queue.popleft()

    def emit(self, device: str) -> None:
        self.queue.append(device)
        os.write(self._w, b"x")

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@pytest.fixture
def monitor() -> collections.abc.Iterator[FakeMonitor]:
    """A fake udev monitor, closed after the test."""
    m = FakeMonitor()
    yield m
    m.close()


def test_topology_key() -> None:
    assert topology_key("1-1.4", 2) == "usb-0:1.4.2"
    assert topology_key("3-2", 1) == "usb-0:2.1"
    assert topology_key("1", 3) == "usb-0:3"  # a root hub's port
    with pytest.raises(HubCommandError, match=r"not of the form"):
        topology_key("1-1.x", 2)


def test_find_by_id_path_topology_and_absolute_path(by_path: Path, tmp_path: Path) -> None:
    acm = link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
    link(by_path, "pci-0000:00:14.0-usbv2-0:1.4.2:1.0")  # newer systemd's second link: not a duplicate
    second_iface = link(by_path, "pci-0000:00:14.0-usb-0:1.4.3:1.2")
    resolver = ByPathResolver(by_path)
    assert resolver.find("pci-0000:00:14.0-usb-0:1.4.2") == str(acm)
    assert resolver.find("pci-0000:00:14.0-usb-0:1.4.2:1.0") == str(acm)
    assert resolver.find("usb-0:1.4.2") == str(acm)
    assert resolver.find("usb-0:1.4.3") == str(second_iface)
    assert resolver.find("usb-0:1.4") is None  # the hub itself, not a port below it
    assert resolver.find("pci-0000:00:14.0-usb-0:1.4.21") is None
    slot = tmp_path / "slot-1"
    assert resolver.find(str(slot)) is None
    slot.touch()
    assert resolver.find(str(slot)) == str(slot)


def test_topology_key_on_two_controllers_is_ambiguous(by_path: Path) -> None:
    link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
    link(by_path, "pci-0000:03:00.0-usb-0:1.4.2:1.0")
    with pytest.raises(HubCommandError, match=r"several USB controllers.*full ID_PATH"):
        ByPathResolver(by_path).find("usb-0:1.4.2")


def test_dangling_link_and_missing_directory_count_as_absent(by_path: Path, tmp_path: Path) -> None:
    stale = link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
    stale.resolve().unlink()  # the node went, the link stayed
    assert ByPathResolver(by_path).find("usb-0:1.4.2") is None
    assert ByPathResolver(tmp_path / "gone").find("usb-0:1.4.2") is None


async def test_wait_present_and_absent(by_path: Path) -> None:
    resolver = ByPathResolver(by_path, poll_interval_s=0.01)
    waiting = asyncio.create_task(resolver.wait_present("usb-0:1.4.2", 2.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    made = link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
    assert await waiting == str(made)
    gone = asyncio.create_task(resolver.wait_absent("usb-0:1.4.2", 2.0))
    await asyncio.sleep(0.05)
    assert not gone.done()
    made.unlink()
    await asyncio.wait_for(gone, 1.0)


async def test_timeouts_name_key_and_directory(by_path: Path) -> None:
    resolver = ByPathResolver(by_path, poll_interval_s=0.01)
    with pytest.raises(
        EnumerationTimeoutError, match=rf"no tty for usb-0:1.4.2 after 0.1 s \(looked in {by_path}\)"
    ):
        await resolver.wait_present("usb-0:1.4.2", 0.1)
    link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
    with pytest.raises(TtyStillPresentError, match=r"still present 0.1 s after power-off"):
        await resolver.wait_absent("usb-0:1.4.2", 0.1)
    with pytest.raises(TimeoutError):  # both are TimeoutErrors too
        await resolver.wait_absent("usb-0:1.4.2", 0.05)


async def test_port_ttys_name_the_port(by_path: Path) -> None:
    ttys = PortTtys.build(
        "hub-a", "1-1.4", [1, 2], {"2": "pci-0000:00:14.0-usb-0:1.4.2"}, ByPathResolver(by_path)
    )
    assert ttys.keys == {"1": "usb-0:1.4.1", "2": "pci-0000:00:14.0-usb-0:1.4.2"}
    with pytest.raises(
        EnumerationTimeoutError, match=r"^hub-a port 2: no tty for pci-0000:00:14.0-usb-0:1.4.2"
    ):
        await ttys.wait_present("2", 0.05)


async def test_udev_resolver_wakes_on_events_not_timers(by_path: Path, monitor: FakeMonitor) -> None:
    # A re-check interval far beyond the test: only the event can wake the waiter in time.
    async with UdevResolver(by_path, monitor=monitor, recheck_s=30.0) as resolver:
        assert monitor.started
        waiting = asyncio.create_task(resolver.wait_present("usb-0:1.4.2", 10.0))
        await asyncio.sleep(0.05)
        made = link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the link is there but no event yet: no polling
        started = time.monotonic()
        monitor.emit("add ttyACM0")
        assert await asyncio.wait_for(waiting, 1.0) == str(made)
        assert time.monotonic() - started < 0.5
        gone = asyncio.create_task(resolver.wait_absent("usb-0:1.4.2", 10.0))
        await asyncio.sleep(0.02)
        made.unlink()
        monitor.emit("remove ttyACM0")
        await asyncio.wait_for(gone, 1.0)
        assert resolver.events == 2


async def test_udev_resolver_rechecks_when_an_event_is_lost(by_path: Path, monitor: FakeMonitor) -> None:
    async with UdevResolver(by_path, monitor=monitor, recheck_s=0.05) as resolver:
        waiting = asyncio.create_task(resolver.wait_present("usb-0:1.4.2", 2.0))
        made = link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
        assert await waiting == str(made)
        assert resolver.events == 0


async def test_udev_resolver_outside_context_polls(by_path: Path, monitor: FakeMonitor) -> None:
    resolver = UdevResolver(by_path, monitor=monitor)
    resolver.poll_interval_s = 0.01
    waiting = asyncio.create_task(resolver.wait_present("usb-0:1.4.2", 2.0))
    made = link(by_path, "pci-0000:00:14.0-usb-0:1.4.2:1.0")
    assert await waiting == str(made)


async def test_make_resolver(by_path: Path) -> None:
    plain = make_resolver(by_path, udev=False)
    assert type(plain) is ByPathResolver
    assert plain.root == by_path
    pytest.importorskip("pyudev")
    chosen = make_resolver(by_path, udev=True)
    assert isinstance(chosen, ByPathResolver)
    if isinstance(chosen, UdevResolver):  # libudev and a netlink socket are available here
        async with chosen:
            with pytest.raises(EnumerationTimeoutError):
                await chosen.wait_present("usb-0:9.9.9", 0.05)
