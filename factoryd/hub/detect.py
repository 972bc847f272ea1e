"""``factoryd hubs detect``: which USB hubs can be switched, their ports, and what is plugged in.

Looks at uhubctl's listing (``uhubctl -f`` lists ganged hubs too, marked as such) when the tool is
installed, and at sysfs (hubs, the per-port ``disable`` attribute of Linux >= 6.0, attached devices
and their ttys). The report always says what it looked at, so "nothing found" can be trusted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from factoryd.errors import HubCommandError
from factoryd.hub.sysfs import SYSFS_USB_DEVICES, disable_path
from factoryd.hub.ttymap import topology_key
from factoryd.hub.uhubctl import DEFAULT_COMMAND_TIMEOUT_S, Switching, parse_uhubctl, run_command

USB_CLASS_HUB = "09"
# Linux 6.0 added the per-port 'disable' attribute.
SYSFS_DISABLE_MIN_KERNEL = (6, 0)


@dataclass(frozen=True)
class DetectedPort:
    """One port of a detected hub."""

    number: int
    powered: bool | None = None
    status: str = ""
    device: str | None = None
    device_is_hub: bool = False
    tty: str | None = None
    tty_key: str = ""
    sysfs_disable: bool = False


@dataclass(frozen=True)
class DetectedHub:
    """A hub, as uhubctl and/or sysfs see it."""

    location: str
    description: str
    switching: Switching = "unknown"
    sources: tuple[str, ...] = ()
    ports: tuple[DetectedPort, ...] = ()
    sysfs_disable: bool = False

    @property
    def switchable(self) -> bool:
        """Ports can be switched one by one (per-port power, or sysfs 'disable' on a hub not known ganged)."""
        return self.switching == "ppps" or (self.sysfs_disable and self.switching not in ("ganged", "nops"))


@dataclass(frozen=True)
class HubReport:
    """Every hub found and every place looked at."""

    hubs: tuple[DetectedHub, ...] = ()
    looked_at: tuple[str, ...] = field(default_factory=tuple)

    @property
    def switchable(self) -> tuple[DetectedHub, ...]:
        """Hubs a factoryd backend can switch port by port."""
        return tuple(h for h in self.hubs if h.switchable)


def _kernel_version(release: str) -> tuple[int, int]:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _describe(dev: Path) -> str:
    vid_pid = f"{_read(dev / 'idVendor')}:{_read(dev / 'idProduct')}"
    words = [w for w in (_read(dev / "manufacturer"), _read(dev / "product"), _read(dev / "serial")) if w]
    return " ".join([vid_pid, *words])


def _find_tty(dev: Path) -> str | None:
    # ttyACM: <dev>/<dev>:1.0/tty/ttyACM0; ttyUSB: <dev>/<dev>:1.0/ttyUSB0.
    ttys = sorted(
        [p.name for p in dev.glob("*:*/tty/tty*")] + [p.name for p in dev.glob("*:*/ttyUSB*")],
    )
    return ttys[0] if ttys else None


def scan_sysfs(root: Path) -> tuple[list[DetectedHub], str]:
    """Hubs under a sysfs ``usb/devices`` directory, and a line saying what was seen (blocking)."""
    if not root.is_dir():
        return [], f"sysfs {root}: does not exist (no USB host controller visible to this system)"
    hubs: list[DetectedHub] = []
    for dev in sorted(root.iterdir()):
        name = dev.name
        if ":" in name or _read(dev / "bDeviceClass") != USB_CLASS_HUB:
            continue
        location = name.removeprefix("usb") if name.startswith("usb") else name
        config = _read(dev / "bConfigurationValue")
        nports = int(_read(dev / "maxchild") or 0)
        ports: list[DetectedPort] = []
        for n in range(1, nports + 1):
            child = root / (f"{location}-{n}" if location.isdigit() else f"{location}.{n}")
            has_disable = config.isdigit() and disable_path(root, location, int(config), n).exists()
            present = child.is_dir()
            ports.append(
                DetectedPort(
                    number=n,
                    device=_describe(child) if present else None,
                    device_is_hub=present and _read(child / "bDeviceClass") == USB_CLASS_HUB,
                    tty=_find_tty(child) if present else None,
                    tty_key=topology_key(location, n),
                    sysfs_disable=has_disable,
                )
            )
        hubs.append(
            DetectedHub(
                location=location,
                description=f"{_describe(dev)}, USB {_read(dev / 'version')}, {nports} ports",
                sources=("sysfs",),
                ports=tuple(ports),
                sysfs_disable=bool(ports) and all(p.sysfs_disable for p in ports),
            )
        )
    return hubs, f"sysfs {root}: {len(hubs)} hub(s)"


async def scan_uhubctl(binary: str, timeout_s: float) -> tuple[list[DetectedHub], str]:
    """Hubs as ``uhubctl -f`` lists them, and a line saying what was seen."""
    path = shutil.which(binary)
    if path is None:
        return [], f"uhubctl: {binary!r} not found on PATH (Debian package 'uhubctl')"
    try:
        result = await run_command([path, "-f"], timeout_s)
    except HubCommandError as exc:
        return [], f"uhubctl: {exc}"
    if result.returncode != 0:
        said = " ".join(result.stderr.split()) or "(no output)"
        return [], f"uhubctl {path} -f: exit status {result.returncode}: {said}"
    hubs = [
        DetectedHub(
            location=b.location,
            description=b.description,
            switching=b.switching,
            sources=("uhubctl",),
            ports=tuple(
                DetectedPort(
                    number=p.port,
                    powered=p.powered,
                    status=f"{p.status:04x} {' '.join(p.flags)}",
                    device=p.device,
                    device_is_hub=p.device is not None and " ports" in p.device,
                    tty_key=topology_key(b.location, p.port),
                )
                for p in b.ports
            ),
        )
        for b in parse_uhubctl(result.stdout)
        if not b.new
    ]
    return hubs, f"uhubctl {path} -f: {len(hubs)} hub(s)"


def _merge(from_uhubctl: list[DetectedHub], from_sysfs: list[DetectedHub]) -> list[DetectedHub]:
    by_location = {h.location: h for h in from_sysfs}
    merged: list[DetectedHub] = []
    for hub in from_uhubctl:
        sys_hub = by_location.pop(hub.location, None)
        if sys_hub is None:
            merged.append(hub)
            continue
        sys_ports = {p.number: p for p in sys_hub.ports}
        ports = tuple(
            replace(
                p,
                tty=sys_ports[p.number].tty if p.number in sys_ports else None,
                sysfs_disable=p.number in sys_ports and sys_ports[p.number].sysfs_disable,
                device_is_hub=p.device_is_hub
                or (sys_ports[p.number].device_is_hub if p.number in sys_ports else False),
            )
            for p in hub.ports
        )
        merged.append(
            replace(hub, sources=("uhubctl", "sysfs"), ports=ports, sysfs_disable=sys_hub.sysfs_disable)
        )
    merged += by_location.values()
    return sorted(merged, key=lambda h: h.location)


async def detect_hubs(
    *,
    uhubctl_binary: str = "uhubctl",
    sysfs_root: Path = SYSFS_USB_DEVICES,
    timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
    kernel_release: str | None = None,
) -> HubReport:
    """Look for hubs with uhubctl and in sysfs; never raises for "nothing there"."""
    release = kernel_release or os.uname().release
    from_uhubctl, uhubctl_note = await scan_uhubctl(uhubctl_binary, timeout_s)
    from_sysfs, sysfs_note = await asyncio.to_thread(scan_sysfs, sysfs_root)
    supported = _kernel_version(release) >= SYSFS_DISABLE_MIN_KERNEL
    disable_note = "supported" if supported else "missing (< 6.0)"
    kernel_note = f"kernel {release}: per-port 'disable' attribute {disable_note}"
    return HubReport(tuple(_merge(from_uhubctl, from_sysfs)), (uhubctl_note, sysfs_note, kernel_note))


def _port_line(p: DetectedPort) -> str:
    state = {True: "on ", False: "off", None: "?  "}[p.powered]
    parts = [f"  port {p.number}: {state}"]
    if p.status:
        parts.append(p.status)
    if p.device:
        parts.append(f"[{p.device}]")
    if p.device_is_hub:
        parts.append("(chained hub: never switch this port)")
    if p.tty:
        parts.append(f"tty {p.tty}")
    parts.append(f"key {p.tty_key}")
    return "  ".join(parts)


def format_report(report: HubReport) -> str:
    """The report as text for people."""
    lines = ["Looked at:", *(f"  - {note}" for note in report.looked_at), ""]
    for hub in report.hubs:
        how = {
            "ppps": "per-port power switching",
            "ganged": "GANGED: all ports switch together",
            "nops": "no power switching",
            "unknown": "power switching unknown",
        }[hub.switching]
        sysfs = "sysfs 'disable': yes" if hub.sysfs_disable else "sysfs 'disable': no"
        if not hub.switchable:
            verdict = "not switchable per port"
        elif hub.switching == "ppps":
            verdict = "switchable"
        else:
            verdict = "switchable via sysfs 'disable' (whether power is really cut is unverified)"
        lines.append(f"hub {hub.location} [{hub.description}]")
        lines.append(f"  {verdict}: {how}; {sysfs}; seen by {', '.join(hub.sources)}")
        lines += [_port_line(p) for p in hub.ports]
        lines.append("")
    n = len(report.switchable)
    if n == 0:
        lines.append(
            "no switchable USB hub found"
            + (f" ({len(report.hubs)} hub(s) seen, none switchable per port)" if report.hubs else "")
        )
    else:
        locations = ", ".join(h.location for h in report.switchable)
        lines.append(f"{n} switchable hub(s): {locations}")
    return "\n".join(lines)
