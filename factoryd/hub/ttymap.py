"""Which tty belongs to which hub port: slots keyed by USB topology (ID_PATH), never ttyACM numbers.

A port's *tty key* is one of:

- an absolute path: a ``/dev/serial/by-path/...`` link or a udev ``SYMLINK`` such as
  ``/dev/factoryd/slot-3`` (see ``deploy/udev/90-factoryd.rules``);
- a full ID_PATH, e.g. ``pci-0000:00:14.0-usb-0:1.4.2`` (the USB device) or
  ``pci-0000:00:14.0-usb-0:1.4.2:1.0`` (its interface), looked up in the by-path directory;
- a topology path without the controller, ``usb-0:1.4.2`` (what :func:`topology_key` derives from a
  hub location and port), matched against every controller and refused if ambiguous.

:class:`ByPathResolver` looks at the by-path directory (systemd's ``60-serial.rules`` makes a link
there for every ttyACM/ttyUSB) every few tens of milliseconds. :class:`UdevResolver` wakes up on
udev tty add/remove events instead (pyudev, extra ``udev``) — HUBS.md: wait for the events, do not
sleep — and checks the same directory, which udev has updated before it announces the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import structlog

from factoryd.errors import EnumerationTimeoutError, HubCommandError, HubError

log = structlog.get_logger(__name__)

BY_PATH_DIR = Path("/dev/serial/by-path")
# Short enough to add little to enumeration (the kernel alone takes a few hundred ms, HUBS.md),
# long enough that a handful of waiting ports cost nothing.
POLL_INTERVAL_S = 0.025
# With udev events, a slow re-check in case an event was lost (netlink buffer overrun).
UDEV_RECHECK_S = 0.5


class TtyStillPresentError(HubError, TimeoutError):
    """The port's tty did not go away after power-off (power not really cut, or a stale node)."""


class TtyResolver(Protocol):
    """Finds the serial device behind a tty key and follows it appearing and disappearing."""

    async def wait_present(self, port_id_path: str, timeout_s: float) -> str:
        """Wait until the tty exists; return its path (EnumerationTimeoutError)."""

    async def wait_absent(self, port_id_path: str, timeout_s: float) -> None:
        """Wait until the tty is gone (TtyStillPresentError)."""


def topology_key(location: str, port: int) -> str:
    """The controller-less ID_PATH part of the device on ``port`` of the hub at ``location``."""
    bus, _, chain = location.partition("-")
    if not bus.isdigit() or (chain and not all(p.isdigit() for p in chain.split("."))):
        raise HubCommandError(f"hub location {location!r} is not of the form <bus>-<port>[.<port>...]")
    return f"usb-0:{chain}.{port}" if chain else f"usb-0:{port}"


class ByPathResolver:
    """Resolves tty keys in a by-path directory, polling it (no udev needed)."""

    def __init__(self, root: Path = BY_PATH_DIR, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.root = root
        self.poll_interval_s = poll_interval_s

    def find(self, key: str) -> str | None:
        """The tty path for a key now, or None; a dangling link (stale node) counts as absent."""
        if os.path.isabs(key):
            return key if os.path.exists(key) else None
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            # udev removes the directory when the last serial device goes.
            return None
        if key.startswith("usb-0:"):
            needle = f"-{key}:"
            matches = [n for n in names if needle in n]
            controllers = {n.split(needle)[0] for n in matches}
            if len(controllers) > 1:
                raise HubCommandError(
                    f"tty key {key!r} matches devices on several USB controllers "
                    f"({', '.join(sorted(controllers))}): configure the full ID_PATH for this port"
                )
        else:
            matches = [n for n in names if n == key or n.startswith(f"{key}:")]
        # A board with several serial interfaces: the lowest interface number is its console.
        for name in matches:
            path = self.root / name
            if os.path.exists(path):
                return str(path)
        return None

    async def wait_present(self, port_id_path: str, timeout_s: float) -> str:
        """Wait until the tty exists; return its path."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    token = self._token()
                    path = self.find(port_id_path)
                    if path is not None:
                        return path
                    await self._idle(token)
        except TimeoutError:
            raise EnumerationTimeoutError(
                f"no tty for {port_id_path} after {timeout_s:.1f} s (looked in {self._where(port_id_path)})"
            ) from None

    async def wait_absent(self, port_id_path: str, timeout_s: float) -> None:
        """Wait until the tty is gone."""
        path: str | None = None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    token = self._token()
                    path = self.find(port_id_path)
                    if path is None:
                        return
                    await self._idle(token)
        except TimeoutError:
            raise TtyStillPresentError(
                f"tty {path} for {port_id_path} still present {timeout_s:.1f} s after power-off "
                "(is the power really cut? a stale device node?)"
            ) from None

    def _where(self, key: str) -> str:
        return key if os.path.isabs(key) else str(self.root)

    def _token(self) -> asyncio.Event | None:
        return None

    async def _idle(self, token: asyncio.Event | None) -> None:
        await asyncio.sleep(self.poll_interval_s)


class UdevMonitor(Protocol):
    """The part of ``pyudev.Monitor`` the resolver uses."""

    def start(self) -> None:
        """Start receiving events."""

    def fileno(self) -> int:
        """The netlink socket, for the event loop."""

    def poll(self, timeout: float | None = None) -> Any:
        """The next event's device, or None."""


def pyudev_tty_monitor() -> UdevMonitor:
    """A pyudev monitor for tty events (HubCommandError if pyudev or libudev is missing)."""
    try:
        pyudev: Any = importlib.import_module("pyudev")
        monitor: UdevMonitor = pyudev.Monitor.from_netlink(pyudev.Context())
        pyudev_monitor: Any = monitor
        pyudev_monitor.filter_by("tty")
    except (ImportError, OSError) as exc:
        raise HubCommandError(f"udev monitor unavailable ({exc}); install factoryd[udev]") from exc
    return monitor


class UdevResolver(ByPathResolver):
    """Resolves tty keys in the by-path directory, woken by udev tty add/remove events.

    Use it as an async context manager (the hubs enter it); outside one it polls like its parent.
    """

    def __init__(
        self,
        root: Path = BY_PATH_DIR,
        *,
        monitor: UdevMonitor | None = None,
        recheck_s: float = UDEV_RECHECK_S,
    ) -> None:
        super().__init__(root)
        self.recheck_s = recheck_s
        self.events = 0
        self._monitor = monitor
        self._fd: int | None = None
        self._wake = asyncio.Event()

    async def __aenter__(self) -> Self:
        if self._monitor is None:
            self._monitor = pyudev_tty_monitor()
        self._monitor.start()
        self._fd = self._monitor.fileno()
        asyncio.get_running_loop().add_reader(self._fd, self._drain)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None

    def _drain(self) -> None:
        if self._monitor is None:
            return
        try:
            while self._monitor.poll(timeout=0) is not None:
                self.events += 1
        except OSError as exc:  # ENOBUFS after an overrun: the re-check catches up
            log.warning("udev_monitor_error", error=str(exc))
        # Wake every waiter; each re-checks its own key.
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def _token(self) -> asyncio.Event | None:
        # Taken before the check, so an event between the check and the wait is not missed.
        return self._wake if self._fd is not None else None

    async def _idle(self, token: asyncio.Event | None) -> None:
        if token is None:
            await super()._idle(token)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.recheck_s):
                await token.wait()


def make_resolver(root: Path = BY_PATH_DIR, *, udev: bool = True) -> ByPathResolver:
    """The udev resolver when pyudev and libudev are there (and wanted), else the polling one."""
    if udev:
        try:
            return UdevResolver(root, monitor=pyudev_tty_monitor())
        except HubCommandError as exc:
            log.info("udev_unavailable_polling", reason=str(exc), root=str(root))
    return ByPathResolver(root)


class PortTtys:
    """Port name -> tty key, and waits that name the hub and port in their errors."""

    def __init__(self, hub_name: str, keys: Mapping[str, str], resolver: TtyResolver) -> None:
        self.hub_name = hub_name
        self.keys = dict(keys)
        self.resolver = resolver

    @classmethod
    def build(
        cls,
        hub_name: str,
        location: str,
        ports: Sequence[int],
        configured: Mapping[str, str],
        resolver: TtyResolver,
    ) -> PortTtys:
        """Configured keys, and topology keys derived from the hub location for the other ports."""
        keys = {str(p): configured.get(str(p)) or topology_key(location, p) for p in ports}
        return cls(hub_name, keys, resolver)

    async def wait_present(self, port: str, timeout_s: float) -> str:
        """Wait for the port's tty (EnumerationTimeoutError naming the port and the key)."""
        try:
            return await self.resolver.wait_present(self.keys[port], timeout_s)
        except EnumerationTimeoutError as exc:
            raise EnumerationTimeoutError(f"{self.hub_name} port {port}: {exc}") from exc

    async def wait_absent(self, port: str, timeout_s: float) -> None:
        """Wait until the port's tty is gone (TtyStillPresentError naming the port)."""
        try:
            await self.resolver.wait_absent(self.keys[port], timeout_s)
        except TtyStillPresentError as exc:
            raise TtyStillPresentError(f"{self.hub_name} port {port}: {exc}") from exc
