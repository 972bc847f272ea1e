"""A hub switched through the kernel's per-port ``disable`` attribute (Linux >= 6.0, no extra tool).

``/sys/bus/usb/devices/<hub>:<cfg>.0/<hub>-port<N>/disable``: write ``1`` to switch the port off
(the kernel disconnects the device and cuts port power if the hub can), ``0`` to switch it on.
Reading it back tells whether the port is powered. A root hub ``<bus>`` has its ports under
``<bus>-0:<cfg>.0/usb<bus>-port<N>``. File I/O goes through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from factoryd.config import SysfsHubSettings
from factoryd.errors import HubCommandError, HubDisconnectedError
from factoryd.hub.switched import DEFAULT_REMOVE_TIMEOUT_S, SwitchedHub
from factoryd.hub.ttymap import TtyResolver, make_resolver

log = structlog.get_logger(__name__)

SYSFS_USB_DEVICES = Path("/sys/bus/usb/devices")


def hub_device_name(hub: str) -> str:
    """The sysfs device name of a hub location: ``1-1.4`` stays, root hub ``1`` is ``usb1``."""
    return f"usb{hub}" if hub.isdigit() else hub


def disable_path(root: Path, hub: str, config: int, port: int) -> Path:
    """Where the kernel exposes the ``disable`` attribute of one hub port."""
    if hub.isdigit():
        return root / f"{hub}-0:{config}.0" / f"usb{hub}-port{port}" / "disable"
    return root / f"{hub}:{config}.0" / f"{hub}-port{port}" / "disable"


def _write_and_read(path: Path, value: str) -> str:
    # No O_CREAT: a missing attribute must fail (old kernel, wrong path), never become a new file.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return path.read_text().strip()


class SysfsHub(SwitchedHub):
    """Ports of one hub (and optionally its USB 3 twin) switched through sysfs."""

    def __init__(
        self,
        hub: str,
        ports: Sequence[int],
        *,
        sysfs_root: Path = SYSFS_USB_DEVICES,
        config: int | None = None,
        tty: dict[str, str] | None = None,
        dual_hub: str = "",
        resolver: TtyResolver | None = None,
        remove_timeout_s: float = DEFAULT_REMOVE_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        super().__init__(
            "sysfs", hub, ports, tty=tty, resolver=resolver, remove_timeout_s=remove_timeout_s, name=name
        )
        self.hub = hub
        self.dual_hub = dual_hub
        self.sysfs_root = sysfs_root
        self._config = config
        self._configs: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: SysfsHubSettings, *, resolver: TtyResolver | None = None) -> SysfsHub:
        """A hub from ``[hub.sysfs]``."""
        return cls(
            settings.hub,
            settings.ports,
            sysfs_root=settings.sysfs_root,
            config=settings.config,
            tty=dict(settings.tty),
            dual_hub=settings.dual_hub,
            resolver=resolver or make_resolver(settings.by_path_dir, udev=settings.udev),
            remove_timeout_s=settings.remove_timeout_s,
        )

    async def _switch(self, ports: list[int], *, on: bool) -> None:
        for number in ports:
            await self._set(number, disabled=not on)

    async def check(self) -> None:
        """Raise HubDisconnectedError while the hub (or its USB 3 twin) is missing from sysfs."""
        for hub in self._hubs():
            device = self.sysfs_root / hub_device_name(hub)
            if not await asyncio.to_thread(device.exists):
                self._configs.clear()
                raise HubDisconnectedError(
                    f"{self.name}: hub disconnected: no USB device {device.name} under {self.sysfs_root}"
                )
            await self._config_of(hub)

    async def disable_paths(self, port: str) -> list[Path]:
        """The ``disable`` files switched for a port (this hub, then its twin)."""
        number = self._number(port)
        return [disable_path(self.sysfs_root, h, await self._config_of(h), number) for h in self._hubs()]

    def _hubs(self) -> list[str]:
        return [self.hub, self.dual_hub] if self.dual_hub else [self.hub]

    async def _config_of(self, hub: str) -> int:
        if self._config is not None:
            return self._config
        if hub not in self._configs:
            attr = self.sysfs_root / hub_device_name(hub) / "bConfigurationValue"
            try:
                text = (await asyncio.to_thread(attr.read_text)).strip()
            except FileNotFoundError:
                raise HubDisconnectedError(
                    f"{self.name}: hub disconnected: no USB device {hub_device_name(hub)} under "
                    f"{self.sysfs_root} (hub unplugged or wrong location; run 'factoryd hubs detect')"
                ) from None
            except OSError as exc:
                raise HubCommandError(f"{self.name}: cannot read {attr}: {exc.strerror}") from exc
            if not text.isdigit():
                raise HubCommandError(f"{self.name}: hub {hub} is not configured ({attr} reads {text!r})")
            self._configs[hub] = int(text)
        return self._configs[hub]

    async def _set(self, port: int, *, disabled: bool) -> None:
        value = "1" if disabled else "0"
        async with self._lock:
            for hub in self._hubs():
                path = disable_path(self.sysfs_root, hub, await self._config_of(hub), port)
                try:
                    readback = await asyncio.to_thread(_write_and_read, path, value)
                except FileNotFoundError:
                    if not (self.sysfs_root / hub_device_name(hub)).exists():
                        self._configs.clear()  # a hub that comes back is read afresh
                        raise HubDisconnectedError(self._missing(path, hub, port)) from None
                    raise HubCommandError(self._missing(path, hub, port)) from None
                except PermissionError:
                    raise HubCommandError(
                        f"{self.name}: permission denied writing {path}: install "
                        "deploy/udev/90-factoryd.rules (group factoryd may write the hub's 'disable' files) "
                        "and make /sys/bus/usb/devices "
                        "writable for the service (ReadWritePaths=/sys/bus/usb/devices/ in factoryd.service)"
                    ) from None
                except OSError as exc:
                    raise HubCommandError(f"{self.name}: writing {value} to {path}: {exc.strerror}") from exc
                if readback != value:
                    raise HubCommandError(
                        f"{self.name}: port {port} of hub {hub} reads disable={readback!r} "
                        f"after writing {value}"
                    )
        log.debug("hub_port_switched", hub=self.name, port=port, disabled=disabled)

    def _missing(self, path: Path, hub: str, port: int) -> str:
        port_dir, iface_dir = path.parent, path.parent.parent
        if not (self.sysfs_root / hub_device_name(hub)).exists():
            return (
                f"{self.name}: hub disconnected: no USB device {hub_device_name(hub)} under "
                f"{self.sysfs_root} (hub unplugged or wrong location; run 'factoryd hubs detect')"
            )
        if not iface_dir.exists():
            return (
                f"{self.name}: {hub} has no hub interface {iface_dir.name} (not a hub? other configuration?)"
            )
        if not port_dir.exists():
            return f"{self.name}: hub {hub} has no port {port} ({port_dir} missing)"
        return (
            f"{self.name}: {path} does not exist: kernel {os.uname().release} has no per-port 'disable' "
            "attribute (needs Linux >= 6.0); use the uhubctl backend"
        )
