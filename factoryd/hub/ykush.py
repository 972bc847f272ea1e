"""A Yepkit YKUSH hub switched over its HID control interface (``yepkit-pykush``, extra "ykush").

The YKUSH is a USB hub plus a HID control device (vendor 04d8). Its ports come up ON whenever the
hub gets power, so :class:`~factoryd.hub.switched.SwitchedHub` switches them all off at start.
Commands use the port numbers printed on the board; the USB port numbers in the topology path
(what ``/dev/serial/by-path`` shows) differ, so ``usb_port`` maps one to the other for the ttys.

The library blocks: every call runs in :func:`asyncio.to_thread` under the hub's lock, with a
time limit; a thread lock makes sure an abandoned (timed-out) call never overlaps the next one.
Each switch is read back with ``get_port_state``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import structlog

from factoryd.config import YkushHubSettings
from factoryd.errors import ConfigError, HubCommandError, HubDisconnectedError
from factoryd.hub.switched import DEFAULT_REMOVE_TIMEOUT_S, VendorLibraryHub
from factoryd.hub.ttymap import TtyResolver, make_resolver, topology_key

log = structlog.get_logger(__name__)

# One HID exchange takes milliseconds; opening the device enumerates HID devices first.
DEFAULT_COMMAND_TIMEOUT_S = 5.0
INSTALL_HINT = "pip install 'factoryd[ykush]'"
UDEV_HINT = (
    "install deploy/udev/90-factoryd.rules (group factoryd needs the YKUSH's hidraw device, vendor 04d8)"
)

T = TypeVar("T")


def load_pykush() -> Any:
    """The ``pykush`` module (HubCommandError telling how to install it when missing)."""
    try:
        return importlib.import_module("pykush")
    except ImportError as exc:
        raise HubCommandError(
            f"the YKUSH backend needs the yepkit-pykush library ({exc}): {INSTALL_HINT}"
        ) from None


def usb_tty_keys(
    location: str, ports: Sequence[int], usb_port: Mapping[str, int], tty: Mapping[str, str]
) -> dict[str, str]:
    """Tty keys per printed port: configured ones, else the topology key of its USB port number."""
    return {str(p): tty.get(str(p)) or topology_key(location, usb_port.get(str(p), p)) for p in ports}


class YkushHub(VendorLibraryHub):
    """Ports of one YKUSH, named by the numbers printed on the board."""

    vendor = "YKUSH"

    def __init__(
        self,
        location: str,
        ports: Sequence[int],
        *,
        serial: str = "",
        usb_port: Mapping[str, int] | None = None,
        tty: dict[str, str] | None = None,
        resolver: TtyResolver | None = None,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        remove_timeout_s: float = DEFAULT_REMOVE_TIMEOUT_S,
        api: Any | None = None,
        name: str | None = None,
    ) -> None:
        usb_port = dict(usb_port or {})
        unknown = sorted(set(usb_port) - {str(p) for p in ports})
        if unknown:
            raise ConfigError(f"ykush hub {location}: usb_port entries for ports not in ports: {unknown}")
        keys = usb_tty_keys(location, ports, usb_port, tty or {}) if location else tty
        super().__init__(
            "ykush",
            location,
            ports,
            tty=keys,
            resolver=resolver,
            remove_timeout_s=remove_timeout_s,
            name=name,
            command_timeout_s=command_timeout_s,
        )
        self.location = location
        self.serial = serial
        self.usb_port = usb_port
        self._api: Any = api
        self._device: Any = None

    @classmethod
    def from_settings(cls, settings: YkushHubSettings, *, resolver: TtyResolver | None = None) -> YkushHub:
        """A hub from ``[hub.ykush]``."""
        return cls(
            settings.location,
            settings.ports,
            serial=settings.serial,
            usb_port=dict(settings.usb_port),
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
            self._device = None

    async def port_states(self) -> dict[str, bool]:
        """Printed port -> powered, as the hub reports it."""
        async with self._lock:
            return await self._call(self._read_states)

    async def check(self) -> None:
        """Raise HubDisconnectedError while no YKUSH with this serial is on the bus (a CheckedHub)."""
        async with self._lock:
            await self._call(self._reopen)

    def _reopen(self) -> None:
        # A handle from before the cable was pulled may still look open: only a fresh open tells.
        self._device = None
        self._open()

    def _timed_out(self) -> None:
        self._device = None

    def _open(self) -> Any:
        if self._device is not None:
            return self._device
        api = self._api if self._api is not None else load_pykush()
        self._api = api
        not_found: type[BaseException] = getattr(api, "YKUSHNotFound", LookupError)
        try:
            self._device = api.YKUSH(serial=self.serial or None)
        except not_found:
            which = f"with serial {self.serial!r}" if self.serial else "at all"
            raise HubDisconnectedError(
                f"{self.name}: no YKUSH hub {which} (vendor 04d8): unplugged, unpowered or a wrong serial "
                f"(`ykushcmd -l` lists them); if it is plugged in, check permissions: {UDEV_HINT}"
            ) from None
        except PermissionError as exc:
            raise HubCommandError(f"{self.name}: permission denied opening the YKUSH: {UDEV_HINT}") from exc
        except OSError as exc:
            # hidapi says "open failed" for both a vanished device and a permission problem.
            raise HubCommandError(
                f"{self.name}: cannot open the YKUSH ({exc}): is it still plugged in? "
                f"If so it is a permission problem: {UDEV_HINT}"
            ) from exc
        return self._device

    def _state(self, device: Any, port: int) -> bool:
        api = self._api
        try:
            state = device.get_port_state(port)
        except OSError as exc:
            self._device = None
            raise HubCommandError(f"{self.name}: reading port {port}: {exc}") from exc
        if state == api.YKUSH_PORT_STATE_UP:
            return True
        if state == api.YKUSH_PORT_STATE_DOWN:
            return False
        raise HubCommandError(f"{self.name}: port {port} reports state {state!r} (error) after switching")

    def _set(self, ports: list[int], *, on: bool) -> None:
        device = self._open()
        api = self._api
        wanted = api.YKUSH_PORT_STATE_UP if on else api.YKUSH_PORT_STATE_DOWN
        for port in ports:
            try:
                accepted = device.set_port_state(port, wanted)
            except OSError as exc:
                self._device = None
                raise HubCommandError(f"{self.name}: switching port {port}: {exc}") from exc
            if accepted is False:
                raise HubCommandError(
                    f"{self.name}: the YKUSH refused to switch port {port} {'on' if on else 'off'} "
                    "(no such port on this model? check hub.ykush.ports)"
                )
            if self._state(device, port) != on:
                raise HubCommandError(
                    f"{self.name}: port {port} is still {'off' if on else 'on'} "
                    f"after switching it {'on' if on else 'off'}"
                )

    def _read_states(self) -> dict[str, bool]:
        device = self._open()
        return {str(p): self._state(device, p) for p in self._ports}
