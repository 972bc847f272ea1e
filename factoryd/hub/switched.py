"""What every backend for a real, switchable hub shares: ports, ttys, start and stop states.

A backend says how to switch ports (``_switch``); this class numbers the ports, resolves their
ttys (udev events or the by-path directory), switches everything off at start and at shutdown
(HUBS.md), waits for a tty to go after power-off, and reads a device's USB serial.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

import structlog

from factoryd.errors import ConfigError, HubCommandError, HubError
from factoryd.hub.ttymap import PortTtys, TtyResolver, make_resolver
from factoryd.hub.usbserial import usb_serial_of_tty

log = structlog.get_logger(__name__)
DEFAULT_REMOVE_TIMEOUT_S = 5.0
T = TypeVar("T")


class SwitchedHub:
    """Base of the hardware hub backends; subclasses implement ``_switch``."""

    def __init__(
        self,
        kind: str,
        location: str,
        ports: Sequence[int],
        *,
        tty: dict[str, str] | None,
        resolver: TtyResolver | None,
        remove_timeout_s: float,
        name: str | None,
    ) -> None:
        if not location:
            raise ConfigError(f"{kind} hub: location is empty (run 'factoryd hubs detect')")
        if not ports or len(set(ports)) != len(ports) or min(ports) < 1:
            raise ConfigError(
                f"{kind} hub {location}: ports must be distinct numbers >= 1, got {list(ports)}"
            )
        self.name = name or f"{kind}:{location}"
        self.remove_timeout_s = remove_timeout_s
        self._ports = list(ports)
        self._resolver = resolver if resolver is not None else make_resolver()
        self._ttys = PortTtys.build(self.name, location, self._ports, tty or {}, self._resolver)
        # Calls that switch one hub must not overlap (they read-modify-write the port state).
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    async def _switch(self, ports: list[int], *, on: bool) -> None:
        """Switch ports and verify the hub reports the new state (HubCommandError otherwise)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        if isinstance(self._resolver, contextlib.AbstractAsyncContextManager):
            await self._stack.enter_async_context(self._resolver)
        try:
            # HUBS.md: every port off at start (some hubs power all ports up with the hub).
            await self.power_off_all()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.power_off_all()
        except HubError as err:
            log.error("hub_power_off_at_exit_failed", hub=self.name, error=str(err))
        finally:
            await self._stack.aclose()

    def ports(self) -> Sequence[str]:
        """Port names (the hub's port numbers), in configured order."""
        return [str(p) for p in self._ports]

    def tty_key(self, port: str) -> str:
        """The tty key (path or ID_PATH) the port is resolved with."""
        self._number(port)
        return self._ttys.keys[port]

    async def power_on(self, port: str) -> None:
        """Switch the port on and verify it."""
        await self._switch([self._number(port)], on=True)

    async def power_off(self, port: str) -> None:
        """Switch the port off, verify it, and wait until its tty is gone."""
        await self._switch([self._number(port)], on=False)
        await self._ttys.wait_absent(port, self.remove_timeout_s)

    async def power_off_all(self) -> None:
        """Every configured port off; ttys that linger are logged, not raised."""
        await self._switch(self._ports, on=False)
        results = await asyncio.gather(
            *(self._ttys.wait_absent(p, self.remove_timeout_s) for p in self.ports()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, HubError):
                log.warning("tty_lingers_after_power_off", hub=self.name, error=str(result))
            elif isinstance(result, BaseException):
                raise result

    async def wait_for_tty(self, port: str, timeout_s: float) -> str:
        """Wait until the port's tty appears; return its path (EnumerationTimeoutError)."""
        self._number(port)
        return await self._ttys.wait_present(port, timeout_s)

    async def device_serial(self, port: str, tty: str) -> str | None:
        """The USB serial of the device behind the port's tty (sysfs)."""
        return await asyncio.to_thread(usb_serial_of_tty, tty)

    async def release(self, port: str) -> None:
        """Nothing to do: power is already off and the operator is told by telemetry."""
        self._number(port)

    def _number(self, port: str) -> int:
        try:
            number = int(port)
        except ValueError:
            number = -1
        if number not in self._ports:
            raise HubCommandError(f"{self.name} has no port {port!r} (ports: {', '.join(self.ports())})")
        return number


class VendorLibraryHub(SwitchedHub):
    """A hub driven by a blocking vendor library: each call in a worker thread, one at a time, bounded.

    Subclasses implement the blocking ``_set(ports, on=...)`` and name their hardware in ``vendor``;
    ``_timed_out`` lets them drop a cached device handle after a call that never returned.
    """

    vendor = "hub"

    def __init__(
        self,
        kind: str,
        location: str,
        ports: Sequence[int],
        *,
        tty: dict[str, str] | None,
        resolver: TtyResolver | None,
        remove_timeout_s: float,
        name: str | None,
        command_timeout_s: float,
    ) -> None:
        super().__init__(
            kind, location, ports, tty=tty, resolver=resolver, remove_timeout_s=remove_timeout_s, name=name
        )
        self.command_timeout_s = command_timeout_s
        self._thread_lock = threading.Lock()

    def _set(self, ports: list[int], *, on: bool) -> None:
        """Switch ports through the vendor library and verify (blocking)."""
        raise NotImplementedError

    def _timed_out(self) -> None:
        """A call did not return in time (its thread may still run)."""

    async def _switch(self, ports: list[int], *, on: bool) -> None:
        async with self._lock:
            await self._call(lambda: self._set(ports, on=on))
        log.debug("hub_ports_switched", hub=self.name, ports=ports, action="on" if on else "off")

    async def _call(self, fn: Callable[[], T]) -> T:
        # The asyncio lock orders callers; the thread lock keeps a call abandoned after a timeout
        # from overlapping the next one inside the library.
        def locked() -> T:
            with self._thread_lock:
                return fn()

        try:
            async with asyncio.timeout(self.command_timeout_s):
                return await asyncio.to_thread(locked)
        except TimeoutError:
            self._timed_out()
            raise HubCommandError(
                f"{self.name}: no answer from the {self.vendor} after {self.command_timeout_s:.1f} s"
            ) from None
