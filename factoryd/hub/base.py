"""The Hub interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Hub(Protocol):
    """A set of switchable ports, each with at most one board behind it."""

    name: str

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
