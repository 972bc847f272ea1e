"""The uhubctl hub backend against a fake uhubctl executable and a temporary by-path directory."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from factoryd.config import UhubctlSettings
from factoryd.errors import ConfigError, EnumerationTimeoutError, HubCommandError
from factoryd.hub.base import Hub
from factoryd.hub.ttymap import ByPathResolver, TtyStillPresentError
from factoryd.hub.uhubctl import UhubctlHub, parse_uhubctl, run_command
from tests.helpers.processes import pid_alive

DATA = Path(__file__).parent / "data" / "uhubctl"
USB3_HALVES = {
    "1-1.4": "2109:2822 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps",
    "2-1.3": "2109:0822 VIA Labs, Inc. USB3.1 Hub, USB 3.20, 4 ports, ppps",
}


class FakeUhubctl:
    """tests/data/uhubctl/fake_uhubctl.py installed as an executable in a temporary directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.dir = directory
        self.binary = str(directory / "uhubctl")
        script = Path(self.binary)
        script.write_text(f"#!{sys.executable}\n" + (DATA / "fake_uhubctl.py").read_text())
        script.chmod(0o755)
        self.configure()

    def configure(self, **cfg: Any) -> None:
        """Replace the fake's behaviour (see the script's docstring)."""
        (self.dir / "fake.json").write_text(json.dumps(cfg))

    def calls(self) -> list[dict[str, Any]]:
        """Every start/end record so far."""
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def argvs(self) -> list[list[str]]:
        """The argument vectors of every call, in order."""
        return [c["argv"] for c in self.calls() if c["event"] == "start"]


@pytest.fixture
def fake(tmp_path: Path) -> FakeUhubctl:
    """A fake uhubctl that synthesises output for hub 1-1.4."""
    return FakeUhubctl(tmp_path / "bin")


@pytest.fixture
def by_path(tmp_path: Path) -> Path:
    """A stand-in for /dev/serial/by-path."""
    d = tmp_path / "by-path"
    d.mkdir()
    return d


def make_hub(fake: FakeUhubctl, by_path: Path, **kw: Any) -> UhubctlHub:
    """Hub 1-1.4 with ports 1..4, resolving ttys in the temporary by-path directory."""
    kw.setdefault("resolver", ByPathResolver(by_path, poll_interval_s=0.01))
    return UhubctlHub("1-1.4", [1, 2, 3, 4], binary=fake.binary, **kw)


def plug(by_path: Path, port: int, controller: str = "pci-0000:00:14.0") -> Path:
    """Make the by-path link udev would make for a board on hub 1-1.4's port."""
    target = by_path.parent / f"ttyACM{port}"
    target.touch()
    link = by_path / f"{controller}-usb-0:1.4.{port}:1.0"
    link.symlink_to(target)
    return link


# --- parsing recorded output -------------------------------------------------------------------


def test_parse_listing_with_usb3_halves_and_devices() -> None:
    hubs = parse_uhubctl((DATA / "list_ppps.txt").read_text())
    assert [h.location for h in hubs] == ["2-1.3", "1-1.4", "1-1"]
    usb3, usb2, parent = hubs
    assert usb3.usb_version == "3.20"
    assert usb3.switching == "ppps"
    assert all(p.powered and not p.connected for p in usb3.ports)  # "02a0 power 5gbps Rx.Detect"
    p2 = usb2.port(2)
    assert p2 is not None
    assert p2.status == 0x0503
    assert p2.flags == ("power", "highspeed", "enable", "connect")
    assert p2.device == "2341:8057 Arduino LLC Arduino NANO 33 IoT 5C7C2F8B50533151"
    p4 = usb2.port(4)
    assert p4 is not None
    assert not p4.powered
    assert usb2.port(5) is None
    assert not any(h.new for h in hubs)
    chained = parent.port(4)
    assert chained is not None
    assert chained.device is not None
    assert "4 ports" in chained.device


def test_parse_new_status_usb3_off_and_old_format() -> None:
    dual = parse_uhubctl((DATA / "off_usb3_dual.txt").read_text())
    assert [(h.location, h.new) for h in dual] == [
        ("2-1.3", False),
        ("2-1.3", True),
        ("1-1.4", False),
        ("1-1.4", True),
    ]
    off = dual[1].port(2)
    assert off is not None
    assert off.status == 0x00A0
    assert not off.powered
    old = parse_uhubctl((DATA / "off_old_format.txt").read_text())
    assert [(h.location, h.new) for h in old] == [("20-1", False), ("20-1", True)]
    assert old[0].description == "2109:2811, 4 ports"
    assert old[0].switching == "unknown"
    p4 = old[1].port(4)
    assert p4 is not None
    assert not p4.powered


def test_parse_ganged_and_garbage() -> None:
    ganged = parse_uhubctl((DATA / "ganged_on.txt").read_text())
    assert ganged[0].switching == "ganged"
    assert parse_uhubctl("Sent power on request\n  Port 1: 0100 power\nrandom words\n") == []


# --- switching ---------------------------------------------------------------------------------


def test_hub_satisfies_protocol(fake: FakeUhubctl, by_path: Path) -> None:
    hub: Hub = make_hub(fake, by_path)
    assert list(hub.ports()) == ["1", "2", "3", "4"]
    assert hub.name == "uhubctl:1-1.4"


async def test_power_on_and_off_command_lines(fake: FakeUhubctl, by_path: Path) -> None:
    hub = make_hub(fake, by_path, off_repeat=5)
    await hub.power_on("2")
    await hub.power_off("3")
    assert fake.argvs() == [
        ["-l", "1-1.4", "-p", "2", "-a", "on"],
        ["-l", "1-1.4", "-p", "3", "-a", "off", "-r", "5"],
    ]


async def test_recorded_outputs_verify(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stdout_files={"on": str(DATA / "on_port2.txt"), "off": str(DATA / "off_port2.txt")})
    hub = make_hub(fake, by_path)
    await hub.power_on("2")
    await hub.power_off("2")
    assert len(fake.argvs()) == 2


async def test_power_not_cut_is_an_error(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stdout_files={"off": str(DATA / "off_port2_still_on.txt")})
    hub = make_hub(fake, by_path)
    with pytest.raises(HubCommandError, match=r"port 2 is still powered after power off.*0503 power"):
        await hub.power_off("2")


async def test_stuck_port_in_synthesised_output(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stuck_on=[3])
    hub = make_hub(fake, by_path)
    await hub.power_off("2")
    with pytest.raises(HubCommandError, match=r"port 3 is still powered"):
        await hub.power_off("3")


async def test_output_without_new_status_is_an_error(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stdout_files={"on": str(DATA / "list_ppps.txt")})
    hub = make_hub(fake, by_path)
    with pytest.raises(HubCommandError, match=r"no new status for hub 1-1.4"):
        await hub.power_on("2")


async def test_no_compatible_devices_names_location_and_ganged(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stderr=(DATA / "no_devices.stderr").read_text(), exit=1)
    hub = make_hub(fake, by_path)
    with pytest.raises(
        HubCommandError, match=r"no per-port switchable hub at location 1-1.4.*ganged"
    ) as info:
        await hub.power_on("1")
    assert "No compatible devices detected at location 9-9" in str(info.value)


async def test_permission_problem_points_to_udev_rule(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stderr=(DATA / "permission.stderr").read_text(), exit=1)
    hub = make_hub(fake, by_path)
    with pytest.raises(HubCommandError, match=r"90-factoryd.rules"):
        await hub.power_on("1")


async def test_failure_exit_status_carries_stderr(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stderr="Error initializing USB!\n", exit=1)
    hub = make_hub(fake, by_path)
    with pytest.raises(HubCommandError, match=r"exit status 1: Error initializing USB!"):
        await hub.power_off("1")


async def test_ganged_hub_is_refused(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stdout_files={"on": str(DATA / "ganged_on.txt")})
    hub = UhubctlHub("3-4", [1], binary=fake.binary, resolver=ByPathResolver(by_path))
    with pytest.raises(HubCommandError, match=r"ganged"):
        await hub.power_on("1")


async def test_stderr_warning_with_good_output_is_success(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stderr=(DATA / "sysfs_fallback.stderr").read_text())
    hub = make_hub(fake, by_path)
    await hub.power_on("4")
    assert fake.argvs() == [["-l", "1-1.4", "-p", "4", "-a", "on"]]


async def test_port_missing_from_hub(fake: FakeUhubctl, by_path: Path) -> None:
    hub = UhubctlHub("1-1.4", [7], binary=fake.binary, resolver=ByPathResolver(by_path))
    with pytest.raises(HubCommandError, match=r"has no port 7"):
        await hub.power_on("7")  # uhubctl prints no line for a port the hub does not have


async def test_unknown_port_name_is_refused_without_running(fake: FakeUhubctl, by_path: Path) -> None:
    hub = make_hub(fake, by_path)
    with pytest.raises(HubCommandError, match=r"has no port '9'"):
        await hub.power_on("9")
    with pytest.raises(HubCommandError, match=r"has no port 'x'"):
        await hub.release("x")
    assert fake.argvs() == []


async def test_missing_binary(by_path: Path, tmp_path: Path) -> None:
    hub = UhubctlHub("1-1.4", [1], binary=str(tmp_path / "nope"), resolver=ByPathResolver(by_path))
    with pytest.raises(HubCommandError, match=r"not found"):
        await hub.power_on("1")


async def test_dual_location_switches_both_halves(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(hubs=USB3_HALVES)
    hub = make_hub(fake, by_path, dual_location="2-1.3")
    await hub.power_off("2")
    assert fake.argvs() == [["-l", "1-1.4", "-p", "2", "-a", "off"], ["-l", "2-1.3", "-p", "2", "-a", "off"]]


async def test_uhubctl_pairing_usb3_halves_itself_is_verified(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(stdout_files={"off": str(DATA / "off_usb3_dual.txt")})
    hub = UhubctlHub("2-1.3", [2], binary=fake.binary, resolver=ByPathResolver(by_path))
    await hub.power_off("2")
    fake.configure(stdout_files={"off": str(DATA / "off_port2_still_on.txt")})
    hub_usb2 = UhubctlHub("1-1.4", [2], binary=fake.binary, resolver=ByPathResolver(by_path))
    with pytest.raises(HubCommandError):
        await hub_usb2.power_off("2")


# --- timeouts, cancellation, serialisation -----------------------------------------------------


async def test_timeout_kills_the_process(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(hang=True)
    hub = make_hub(fake, by_path, command_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(HubCommandError, match=r"no answer after 0.5 s \(killed\)"):
        await hub.power_on("1")
    assert time.monotonic() - started < 3.0
    [call] = fake.calls()
    assert not pid_alive(call["pid"])  # killed and reaped: no zombie either


async def test_cancellation_kills_the_process(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(hang=True)
    hub = make_hub(fake, by_path)
    task = asyncio.create_task(hub.power_on("1"))
    for _ in range(200):
        if fake.calls():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [call] = fake.calls()
    assert not pid_alive(call["pid"])


async def test_calls_to_one_hub_never_overlap(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(sleep_s=0.2)
    hub = make_hub(fake, by_path)
    await asyncio.gather(hub.power_on("2"), hub.power_on("3"), hub.power_on("4"))
    calls = fake.calls()
    spans = sorted(
        (s["t"], e["t"])
        for s in calls
        if s["event"] == "start"
        for e in calls
        if e["event"] == "end" and e["pid"] == s["pid"]
    )
    assert len(spans) == 3
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert end <= next_start, f"overlapping uhubctl calls: {spans}"


async def test_two_hubs_run_in_parallel(fake: FakeUhubctl, by_path: Path) -> None:
    fake.configure(sleep_s=0.3, hubs=USB3_HALVES)
    a = make_hub(fake, by_path)
    b = UhubctlHub("2-1.3", [1], binary=fake.binary, resolver=ByPathResolver(by_path))
    await asyncio.gather(a.power_on("1"), b.power_on("1"))
    starts = [c["t"] for c in fake.calls() if c["event"] == "start"]
    ends = [c["t"] for c in fake.calls() if c["event"] == "end"]
    assert max(starts) < min(ends)  # the per-hub lock does not serialise different hubs


async def test_run_command_returns_output(fake: FakeUhubctl) -> None:
    result = await run_command([fake.binary, "-l", "1-1.4"], 5.0)
    assert result.returncode == 0
    assert result.stdout.startswith("Current status for hub 1-1.4 [")


# --- ttys --------------------------------------------------------------------------------------


async def test_power_off_waits_for_the_tty_to_go(fake: FakeUhubctl, by_path: Path) -> None:
    hub = make_hub(fake, by_path)
    link = plug(by_path, 2)
    task = asyncio.create_task(hub.power_off("2"))
    await asyncio.sleep(0.3)
    assert not task.done()  # uhubctl answered long ago; the tty is still there
    link.unlink()
    await asyncio.wait_for(task, 2.0)


async def test_power_off_tty_that_stays_is_an_error(fake: FakeUhubctl, by_path: Path) -> None:
    hub = make_hub(fake, by_path, remove_timeout_s=0.2)
    plug(by_path, 2)
    with pytest.raises(TtyStillPresentError, match=r"uhubctl:1-1.4 port 2: .*still present"):
        await hub.power_off("2")


async def test_wait_for_tty_appears(fake: FakeUhubctl, by_path: Path) -> None:
    hub = make_hub(fake, by_path)
    await hub.power_on("3")

    async def enumerate_later() -> Path:
        await asyncio.sleep(0.15)
        return plug(by_path, 3)

    waiting = asyncio.create_task(hub.wait_for_tty("3", 2.0))
    link = await enumerate_later()
    assert await waiting == str(link)


async def test_wait_for_tty_timeout_names_port_and_path(fake: FakeUhubctl, by_path: Path) -> None:
    hub = make_hub(fake, by_path)
    plug(by_path, 1)  # another port's board must not count
    with pytest.raises(EnumerationTimeoutError, match=rf"port 2: no tty for usb-0:1.4.2 .*{by_path}"):
        await hub.wait_for_tty("2", 0.2)


async def test_configured_tty_path_is_used(fake: FakeUhubctl, by_path: Path, tmp_path: Path) -> None:
    slot = tmp_path / "slot-1"
    hub = make_hub(fake, by_path, tty={"2": str(slot)})
    assert hub.tty_key("2") == str(slot)
    assert hub.tty_key("1") == "usb-0:1.4.1"
    slot.touch()
    assert await hub.wait_for_tty("2", 1.0) == str(slot)


async def test_context_switches_everything_off_at_start_and_end(fake: FakeUhubctl, by_path: Path) -> None:
    async with make_hub(fake, by_path) as hub:
        await hub.power_on("1")
    assert fake.argvs() == [
        ["-l", "1-1.4", "-p", "1,2,3,4", "-a", "off"],
        ["-l", "1-1.4", "-p", "1", "-a", "on"],
        ["-l", "1-1.4", "-p", "1,2,3,4", "-a", "off"],
    ]


async def test_status(fake: FakeUhubctl, by_path: Path) -> None:
    hub = make_hub(fake, by_path)
    [block] = await hub.status()
    assert block.location == "1-1.4"
    assert [p.powered for p in block.ports] == [True, True, True, True]


# --- configuration -----------------------------------------------------------------------------


def test_from_settings(fake: FakeUhubctl, by_path: Path) -> None:
    settings = UhubctlSettings(
        binary=fake.binary,
        location="1-1.4",
        ports=[1, 2],
        tty={"1": "/dev/factoryd/slot-1"},
        dual_location="2-1.3",
        command_timeout_s=3.0,
        by_path_dir=by_path,
        udev=False,
    )
    hub = UhubctlHub.from_settings(settings)
    assert hub.ports() == ["1", "2"]
    assert hub.dual_location == "2-1.3"
    assert hub.command_timeout_s == 3.0
    assert hub.tty_key("1") == "/dev/factoryd/slot-1"
    assert hub.tty_key("2") == "usb-0:1.4.2"


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"tty entries for ports not in ports: 5"):
        UhubctlSettings(location="1-1", ports=[1], tty={"5": "/dev/x"})
    with pytest.raises(ConfigError, match=r"location is empty"):
        UhubctlHub("", [1])
    with pytest.raises(ConfigError, match=r"distinct"):
        UhubctlHub("1-1", [1, 1])
    with pytest.raises(HubCommandError, match=r"not of the form"):
        UhubctlHub("hub-a", [1])
