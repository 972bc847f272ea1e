"""An Acroname USBHub3p switched with the BrainStem library (``brainstem``, extra "brainstem").

The hub is found by its BrainStem serial (``discoverAndConnect(Spec.USB, serial)``); a port is
switched with ``usb.setPortEnable``/``setPortDisable`` (power and data together) and read back
with ``usb.getPortState`` (bit 0: VBUS on). Every library call returns a result code; anything
but 0 is a :class:`~factoryd.errors.HubCommandError` naming the code. factoryd port N is
BrainStem channel N-1.

The library blocks: calls run in :func:`asyncio.to_thread` under the hub's lock, with a time
limit; a thread lock makes sure an abandoned (timed-out) call never overlaps the next one.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import structlog

from factoryd.config import BrainstemHubSettings
from factoryd.errors import ConfigError, HubCommandError, HubDisconnectedError
from factoryd.hub.switched import DEFAULT_REMOVE_TIMEOUT_S, VendorLibraryHub
from factoryd.hub.ttymap import TtyResolver, make_resolver

log = structlog.get_logger(__name__)

DEFAULT_COMMAND_TIMEOUT_S = 5.0
INSTALL_HINT = "pip install 'factoryd[brainstem]'"
UDEV_HINT = "install deploy/udev/90-factoryd.rules (group factoryd needs the Acroname hub, vendor 24ff)"
# BrainStem result codes (brainstem.result.Result).
NO_ERROR = 0
NOT_FOUND = 3
PERMISSION_ERROR = 12
# NOT_FOUND, IO_ERROR, CONNECTION_ERROR: the link is gone.
LINK_LOST = frozenset({3, 6, 25})
# getPortState bit usbPortStateVBUS.
PORT_STATE_VBUS_BIT = 0

T = TypeVar("T")


def load_brainstem() -> Any:
    """The ``brainstem`` module (HubCommandError telling how to install it when missing)."""
    try:
        return importlib.import_module("brainstem")
    except ImportError as exc:
        raise HubCommandError(
            f"the Acroname backend needs the brainstem library ({exc}): {INSTALL_HINT}"
        ) from None


def parse_serial(serial: str) -> int:
    """A BrainStem serial from the config ("0x40F5849A" or decimal); "" = 0, the first hub found."""
    if not serial:
        return 0
    try:
        return int(serial, 0)
    except ValueError:
        raise ConfigError(f"brainstem hub: serial {serial!r} is not a number (e.g. 0x40F5849A)") from None


class BrainstemHub(VendorLibraryHub):
    """Ports of one Acroname USBHub3p."""

    vendor = "BrainStem hub"

    def __init__(
        self,
        location: str,
        ports: Sequence[int],
        *,
        serial: str = "",
        tty: dict[str, str] | None = None,
        resolver: TtyResolver | None = None,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        remove_timeout_s: float = DEFAULT_REMOVE_TIMEOUT_S,
        api: Any | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            "brainstem",
            location,
            ports,
            tty=tty,
            resolver=resolver,
            remove_timeout_s=remove_timeout_s,
            name=name,
            command_timeout_s=command_timeout_s,
        )
        self.location = location
        self.serial = serial
        self.serial_number = parse_serial(serial)
        self._api: Any = api
        self._stem: Any = None

    @classmethod
    def from_settings(
        cls, settings: BrainstemHubSettings, *, resolver: TtyResolver | None = None
    ) -> BrainstemHub:
        """A hub from ``[hub.brainstem]``."""
        return cls(
            settings.location,
            settings.ports,
            serial=settings.serial,
            tty=dict(settings.tty),
            resolver=resolver or make_resolver(settings.by_path_dir, udev=settings.udev),
            command_timeout_s=settings.command_timeout_s,
            remove_timeout_s=settings.remove_timeout_s,
        )

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc, tb)
        finally:
            async with self._lock:
                await self._call(self._disconnect)

    async def port_current_ua(self, port: str) -> int:
        """The current the port's device draws, in microamperes (the hub's readback)."""
        number = self._number(port)
        async with self._lock:
            return await self._call(lambda: self._value("getPortCurrent", number))

    def _code_name(self, code: int) -> str:
        result = getattr(getattr(self._api, "result", None), "Result", None)
        for attr in dir(result) if result is not None else ():
            if attr.isupper() and getattr(result, attr) == code:
                return f"{code} ({attr})"
        return str(code)

    def _check(self, code: object, what: str) -> None:
        if code != NO_ERROR:
            if code == PERMISSION_ERROR:
                raise HubCommandError(f"{self.name}: {what}: permission denied: {UDEV_HINT}")
            raise HubCommandError(
                f"{self.name}: {what} failed with BrainStem result code "
                f"{self._code_name(code) if isinstance(code, int) else repr(code)}"
            )

    def _connect(self) -> Any:
        if self._stem is not None:
            return self._stem
        api = self._api if self._api is not None else load_brainstem()
        self._api = api
        stem = api.stem.USBHub3p()
        code = stem.discoverAndConnect(api.link.Spec.USB, self.serial_number)
        if code == NOT_FOUND:
            which = f"with serial {self.serial}" if self.serial else "at all"
            raise HubDisconnectedError(
                f"{self.name}: no Acroname USBHub3p {which} on USB: unplugged, unpowered or a wrong serial; "
                f"if it is plugged in, check permissions: {UDEV_HINT}"
            )
        self._check(code, "connecting to the hub")
        self._stem = stem
        return stem

    async def check(self) -> None:
        """Raise HubDisconnectedError while no USBHub3p with this serial is on USB (a CheckedHub)."""
        async with self._lock:
            await self._call(self._rediscover)

    def _rediscover(self) -> None:
        # A link from before the cable was pulled may still look connected: only a fresh discovery tells.
        self._disconnect()
        self._connect()

    def _disconnect(self) -> None:
        stem, self._stem = self._stem, None
        if stem is not None:
            code = stem.disconnect()
            if code != NO_ERROR:
                log.warning("brainstem_disconnect_failed", hub=self.name, code=self._code_name(code))

    def _value(self, getter: str, port: int) -> int:
        stem = self._connect()
        result = getattr(stem.usb, getter)(port - 1)
        self._check(result.error, f"{getter}(port {port})")
        return int(result.value)

    def _set(self, ports: list[int], *, on: bool) -> None:
        stem = self._connect()
        for port in ports:
            code = stem.usb.setPortEnable(port - 1) if on else stem.usb.setPortDisable(port - 1)
            if code in LINK_LOST:
                # The next call discovers the hub again.
                self._stem = None
            self._check(code, f"switching port {port} {'on' if on else 'off'}")
            state = self._value("getPortState", port)
            if bool(state >> PORT_STATE_VBUS_BIT & 1) != on:
                raise HubCommandError(
                    f"{self.name}: port {port} is still {'off' if on else 'powered'} after switching it "
                    f"{'on' if on else 'off'} (port state 0x{state:08x})"
                )
