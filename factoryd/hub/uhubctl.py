"""A hub switched with the ``uhubctl`` tool (Debian package; works on kernels before 6.0 too).

Every call runs ``uhubctl -l <location> -p <ports> -a on|off`` as an asyncio subprocess with a
timeout (killed, process group and all, when it does not answer), never two at once on one hub,
and reads uhubctl's "New status" lines back to verify the port really changed (uhubctl exits 0
even when a control transfer failed). After power-off the port's tty must disappear; after
power-on :meth:`UhubctlHub.wait_for_tty` waits for it to appear (udev events or by-path polling).

uhubctl's status output, for reference (``tests/data/uhubctl/`` has recorded examples)::

    Current status for hub 1-1.4 [2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps]
      Port 2: 0503 power highspeed enable connect [2e8a:000a Raspberry Pi Pico E6614C311B]
    Sent power off request
    New status for hub 1-1.4 [2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps]
      Port 2: 0000 off

Older releases print ``Current status for hub 20-1, vendor 2109:2811, 4 ports`` headers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from factoryd.config import UhubctlSettings
from factoryd.errors import HubCommandError, HubDisconnectedError
from factoryd.hub.switched import DEFAULT_REMOVE_TIMEOUT_S, SwitchedHub
from factoryd.hub.ttymap import TtyResolver, make_resolver
from factoryd.procs import run_tool

log = structlog.get_logger(__name__)

# uhubctl's own USB control timeout is 5 s per transfer; a whole call rarely takes 1 s.
DEFAULT_COMMAND_TIMEOUT_S = 10.0
# How much of uhubctl's output an error message quotes.
OUTPUT_EXCERPT_CHARS = 600

Switching = Literal["ppps", "ganged", "nops", "unknown"]

_HEADER = re.compile(r"^(Current|New) status for hub (\S+) \[(.*)\]\s*$")
_HEADER_OLD = re.compile(
    r"^(Current|New) status for hub (\S+), vendor ([0-9a-fA-F]{4}:[0-9a-fA-F]{4}), (\d+) ports"
)
_PORT = re.compile(r"^\s+Port (\d+): ([0-9a-fA-F]{4})\b(.*)$")
_USB_VERSION = re.compile(r"\bUSB (\d+\.\d+)\b")
_SWITCHING: dict[str, Switching] = {"ppps": "ppps", "ganged": "ganged", "nops": "nops"}
_NO_HUB = "No compatible devices detected"
_PERMISSION = "permission problems"


@dataclass(frozen=True)
class PortStatus:
    """One ``Port N:`` line."""

    port: int
    status: int
    flags: tuple[str, ...]
    device: str | None
    line: str

    @property
    def powered(self) -> bool:
        """uhubctl prints ``off`` for an unpowered port and ``power`` for a powered one."""
        return "off" not in self.flags and "power" in self.flags

    @property
    def connected(self) -> bool:
        """A device is attached (it may not have enumerated yet)."""
        return "connect" in self.flags


@dataclass(frozen=True)
class HubStatus:
    """One ``Current status``/``New status`` block."""

    location: str
    description: str
    new: bool
    ports: tuple[PortStatus, ...]

    @property
    def switching(self) -> Switching:
        """Per-port (ppps), ganged or no power switching, as uhubctl >= 2.2 reports it."""
        return _SWITCHING.get(self.description.rsplit(",", 1)[-1].strip(), "unknown")

    @property
    def usb_version(self) -> str | None:
        """``"2.10"``, ``"3.20"``… when uhubctl printed it."""
        m = _USB_VERSION.search(self.description)
        return m.group(1) if m else None

    def port(self, number: int) -> PortStatus | None:
        """The status line of one port, if uhubctl printed it."""
        return next((p for p in self.ports if p.port == number), None)


def parse_uhubctl(text: str) -> list[HubStatus]:
    """Parse uhubctl's human-readable output into status blocks (other lines are ignored)."""
    blocks: list[HubStatus] = []
    header: tuple[str, str, bool] | None = None
    ports: list[PortStatus] = []

    def close() -> None:
        if header is not None:
            blocks.append(HubStatus(header[0], header[1], header[2], tuple(ports)))

    for raw in text.splitlines():
        line = raw.rstrip()
        if m := _HEADER.match(line):
            close()
            header, ports = (m.group(2), m.group(3), m.group(1) == "New"), []
        elif m := _HEADER_OLD.match(line):
            close()
            header, ports = (m.group(2), f"{m.group(3)}, {m.group(4)} ports", m.group(1) == "New"), []
        elif (m := _PORT.match(line)) and header is not None:
            rest = m.group(3)
            device: str | None = None
            if " [" in rest:
                rest, _, tail = rest.partition(" [")
                device = tail.removesuffix("]").strip()
            ports.append(
                PortStatus(int(m.group(1)), int(m.group(2), 16), tuple(rest.split()), device, line.strip())
            )
    close()
    return blocks


@dataclass(frozen=True)
class CommandResult:
    """What a finished command printed."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= OUTPUT_EXCERPT_CHARS else "…" + text[-OUTPUT_EXCERPT_CHARS:]


async def run_command(argv: Sequence[str], timeout_s: float) -> CommandResult:
    """Run a command without blocking the loop (``procs.run_tool``: no fork of the daemon); kill its
    process group on timeout or cancellation."""
    try:
        result = await run_tool(argv, timeout_s)
    except FileNotFoundError as exc:
        raise HubCommandError(
            f"{argv[0]}: not found (install the 'uhubctl' package or set hub.uhubctl.binary)"
        ) from exc
    except PermissionError as exc:
        raise HubCommandError(f"{argv[0]}: cannot execute ({exc.strerror})") from exc
    except TimeoutError:
        raise HubCommandError(f"{' '.join(argv)}: no answer after {timeout_s:.1f} s (killed)") from None
    return CommandResult(
        tuple(argv),
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )


class UhubctlHub(SwitchedHub):
    """Ports of one uhubctl-switchable hub (and optionally its USB 3 twin)."""

    def __init__(
        self,
        location: str,
        ports: Sequence[int],
        *,
        binary: str = "uhubctl",
        tty: dict[str, str] | None = None,
        dual_location: str = "",
        resolver: TtyResolver | None = None,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        remove_timeout_s: float = DEFAULT_REMOVE_TIMEOUT_S,
        off_repeat: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(
            "uhubctl",
            location,
            ports,
            tty=tty,
            resolver=resolver,
            remove_timeout_s=remove_timeout_s,
            name=name,
        )
        self.location = location
        self.dual_location = dual_location
        self.binary = binary
        self.command_timeout_s = command_timeout_s
        self.off_repeat = off_repeat

    @classmethod
    def from_settings(cls, settings: UhubctlSettings, *, resolver: TtyResolver | None = None) -> UhubctlHub:
        """A hub from ``[hub.uhubctl]``."""
        return cls(
            settings.location,
            settings.ports,
            binary=settings.binary,
            tty=dict(settings.tty),
            dual_location=settings.dual_location,
            resolver=resolver or make_resolver(settings.by_path_dir, udev=settings.udev),
            command_timeout_s=settings.command_timeout_s,
            remove_timeout_s=settings.remove_timeout_s,
            off_repeat=settings.off_repeat,
        )

    async def status(self) -> list[HubStatus]:
        """uhubctl's current view of the hub (and its USB 3 twin)."""
        blocks: list[HubStatus] = []
        async with self._lock:
            for loc in self._locations():
                result = await run_command([self.binary, "-l", loc], self.command_timeout_s)
                self._check_exit(result, loc)
                blocks += parse_uhubctl(result.stdout)
        return blocks

    async def check(self) -> None:
        """Raise HubDisconnectedError while uhubctl cannot see the hub (or its USB 3 twin)."""
        await self.status()

    def _locations(self) -> list[str]:
        return [self.location, self.dual_location] if self.dual_location else [self.location]

    async def _switch(self, ports: list[int], *, on: bool) -> None:
        action = "on" if on else "off"
        port_list = ",".join(str(p) for p in ports)
        async with self._lock:
            for loc in self._locations():
                argv = [self.binary, "-l", loc, "-p", port_list, "-a", action]
                if not on and self.off_repeat:
                    argv += ["-r", str(self.off_repeat)]
                result = await run_command(argv, self.command_timeout_s)
                self._check_exit(result, loc)
                self._verify(result, loc, ports, on=on)
                if result.stderr.strip():
                    # e.g. the sysfs 'disable' write was refused and uhubctl fell back to libusb.
                    log.warning("uhubctl_stderr", hub=self.name, location=loc, stderr=_excerpt(result.stderr))
        log.debug("hub_ports_switched", hub=self.name, ports=port_list, action=action)

    def _check_exit(self, result: CommandResult, loc: str) -> None:
        cmd = " ".join(result.argv)
        if _NO_HUB in result.stderr:
            hint = (
                " uhubctl reported USB permission problems: install deploy/udev/90-factoryd.rules"
                if _PERMISSION in result.stderr
                else ""
            )
            # After a good start this means the hub went away (a permission problem is not that).
            error = HubCommandError if hint else HubDisconnectedError
            raise error(
                f"{cmd}: {'' if hint else 'hub disconnected: '}uhubctl found no per-port switchable hub at "
                f"location {loc} — the hub is unplugged, "
                "the location is wrong, or the hub is ganged (switches all ports together; uhubctl skips "
                f"those). Run 'factoryd hubs detect'.{hint} uhubctl said: {_excerpt(result.stderr)}"
            )
        if result.returncode != 0:
            said = _excerpt(result.stderr) or _excerpt(result.stdout) or "(no output)"
            raise HubCommandError(f"{cmd}: exit status {result.returncode}: {said}")

    def _verify(self, result: CommandResult, loc: str, ports: list[int], *, on: bool) -> None:
        cmd = " ".join(result.argv)
        new = [b for b in parse_uhubctl(result.stdout) if b.new]
        mine = [b for b in new if b.location == loc]
        if not mine:
            raise HubCommandError(
                f"{cmd}: uhubctl printed no new status for hub {loc}; output: {_excerpt(result.stdout)!r}"
            )
        if mine[0].switching == "ganged":
            raise HubCommandError(
                f"{cmd}: hub {loc} is ganged ({mine[0].description}): it switches every port together"
            )
        for block in new:
            for number in ports:
                st = block.port(number)
                if st is None:
                    if block.location == loc:
                        raise HubCommandError(
                            f"{cmd}: hub {loc} has no port {number} ({block.description}); "
                            "check hub.uhubctl.ports"
                        )
                    continue
                if st.powered != on:
                    raise HubCommandError(
                        f"{cmd}: hub {block.location} port {number} is still "
                        f"{'off' if on else 'powered'} after power {'on' if on else 'off'}: {st.line!r}"
                        + (f"; uhubctl stderr: {_excerpt(result.stderr)}" if result.stderr.strip() else "")
                    )
