"""The Hub interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable


class Hub(Protocol):
    """A set of switchable ports, each with at most one board behind it.

    A hub is an async context manager: the daemon enters every backend the same way, and each
    does its own start (switch all ports off, open a udev monitor, connect to a hub process) there.
    """

    name: str

    async def __aenter__(self) -> Self:
        """Make the hub ready to use (ports listed, powered off)."""

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Power everything off and release what the hub holds."""

    def ports(self) -> Sequence[str]:
        """Port names, in fixture order."""

    async def power_on(self, port: str) -> None:
        """Switch the port's power on (returns before the device enumerates)."""

    async def power_off(self, port: str) -> None:
        """Switch the port's power off and wait until its device is gone."""

    async def wait_for_tty(self, port: str, timeout_s: float) -> str:
        """Wait until the port's serial device exists; return its path (EnumerationTimeoutError)."""

    async def release(self, port: str) -> None:
        """The board on this port is finished: the operator may take it (power is already off)."""

    async def device_serial(self, port: str, tty: str) -> str | None:
        """The USB serial number the port's device enumerated with (None when it reports none)."""


@runtime_checkable
class CheckedHub(Protocol):
    """A hub that can tell whether it is there at all (its cable pulled, its power lost)."""

    async def check(self) -> None:
        """Return when the hub answers; raise HubDisconnectedError (or another HubError) when not."""


async def probe_hub(hub: Hub) -> None:
    """Raise while the hub is gone; a backend that cannot tell passes (its next job finds out)."""
    if isinstance(hub, CheckedHub):
        await hub.check()
