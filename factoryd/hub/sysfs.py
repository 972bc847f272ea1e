"""A hub switched through the kernel's per-port ``disable`` attribute (Linux >= 6.0, no extra tool).

``/sys/bus/usb/devices/<hub>:<cfg>.0/<hub>-port<N>/disable``: write ``1`` to switch the port off
(the kernel disconnects the device and cuts port power if the hub can), ``0`` to switch it on.
Reading it back tells whether the port is powered. A root hub ``<bus>`` has its ports under
``<bus>-0:<cfg>.0/usb<bus>-port<N>``. File I/O goes through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from factoryd.config import SysfsHubSettings
from factoryd.errors import ConfigError, HubCommandError, HubError
from factoryd.hub.ttymap import PortTtys, TtyResolver, make_resolver
from factoryd.hub.usbserial import usb_serial_of_tty

log = structlog.get_logger(__name__)

SYSFS_USB_DEVICES = Path("/sys/bus/usb/devices")
DEFAULT_REMOVE_TIMEOUT_S = 5.0


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


class SysfsHub:
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
        if not hub:
            raise ConfigError("sysfs hub: hub location is empty (run 'factoryd hubs detect')")
        if not ports or len(set(ports)) != len(ports) or min(ports) < 1:
            raise ConfigError(f"sysfs hub {hub}: ports must be distinct numbers >= 1, got {list(ports)}")
        self.name = name or f"sysfs:{hub}"
        self.hub = hub
        self.dual_hub = dual_hub
        self.sysfs_root = sysfs_root
        self.remove_timeout_s = remove_timeout_s
        self._config = config
        self._configs: dict[str, int] = {}
        self._ports = list(ports)
        self._resolver = resolver if resolver is not None else make_resolver()
        self._ttys = PortTtys.build(self.name, hub, self._ports, tty or {}, self._resolver)
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

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

    async def __aenter__(self) -> Self:
        if isinstance(self._resolver, contextlib.AbstractAsyncContextManager):
            await self._stack.enter_async_context(self._resolver)
        try:
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

    async def power_on(self, port: str) -> None:
        """Enable the port (write 0) and verify it reads back powered."""
        await self._set(self._number(port), disabled=False)

    async def power_off(self, port: str) -> None:
        """Disable the port (write 1), verify it, and wait until its tty is gone."""
        await self._set(self._number(port), disabled=True)
        await self._ttys.wait_absent(port, self.remove_timeout_s)

    async def power_off_all(self) -> None:
        """Every configured port off; ttys that linger are logged, not raised."""
        for number in self._ports:
            await self._set(number, disabled=True)
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

    async def disable_paths(self, port: str) -> list[Path]:
        """The ``disable`` files switched for a port (this hub, then its twin)."""
        number = self._number(port)
        return [disable_path(self.sysfs_root, h, await self._config_of(h), number) for h in self._hubs()]

    def _hubs(self) -> list[str]:
        return [self.hub, self.dual_hub] if self.dual_hub else [self.hub]

    def _number(self, port: str) -> int:
        try:
            number = int(port)
        except ValueError:
            number = -1
        if number not in self._ports:
            raise HubCommandError(f"{self.name} has no port {port!r} (ports: {', '.join(self.ports())})")
        return number

    async def _config_of(self, hub: str) -> int:
        if self._config is not None:
            return self._config
        if hub not in self._configs:
            attr = self.sysfs_root / hub_device_name(hub) / "bConfigurationValue"
            try:
                text = (await asyncio.to_thread(attr.read_text)).strip()
            except FileNotFoundError:
                raise HubCommandError(
                    f"{self.name}: no USB device {hub_device_name(hub)} under {self.sysfs_root} "
                    "(hub unplugged or wrong location; run 'factoryd hubs detect')"
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
                f"{self.name}: no USB device {hub_device_name(hub)} under {self.sysfs_root} "
                "(hub unplugged or wrong location; run 'factoryd hubs detect')"
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
