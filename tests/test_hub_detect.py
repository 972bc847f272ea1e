"""``factoryd hubs detect``: the report from uhubctl and sysfs, and its text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from factoryd.hub.detect import HubReport, detect_hubs, format_report, scan_sysfs
from factoryd.hub.sysfs import disable_path

DATA = Path(__file__).parent / "data" / "uhubctl"


def fake_uhubctl(directory: Path, **cfg: object) -> str:
    """tests/data/uhubctl/fake_uhubctl.py as an executable, configured with ``cfg``."""
    directory.mkdir()
    script = directory / "uhubctl"
    script.write_text(f"#!{sys.executable}\n" + (DATA / "fake_uhubctl.py").read_text())
    script.chmod(0o755)
    (directory / "fake.json").write_text(json.dumps(cfg))
    return str(script)


def usb_device(root: Path, name: str, *, vid: str, pid: str, product: str, hub_ports: int = 0) -> Path:
    """A device directory with the attributes detect reads."""
    dev = root / name
    dev.mkdir(parents=True)
    attrs = {
        "idVendor": vid,
        "idProduct": pid,
        "product": product,
        "bDeviceClass": "09" if hub_ports else "ef",
        "bConfigurationValue": "1",
        "version": " 2.10",
        "maxchild": str(hub_ports),
    }
    for key, value in attrs.items():
        (dev / key).write_text(value + "\n")
    location = name.removeprefix("usb")
    for n in range(1, hub_ports + 1):
        path = disable_path(root, location, 1, n)
        path.parent.mkdir(parents=True)
        path.write_text("0\n")
    return dev


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """Root hub usb1 -> hub 1-1 -> hub 1-1.4 with an Arduino (ttyACM0) on port 2; ganged hub 3-4."""
    root = tmp_path / "sys"
    usb_device(root, "usb1", vid="1d6b", pid="0002", product="xHCI Host Controller", hub_ports=2)
    usb_device(root, "1-1", vid="2109", pid="2822", product="USB2.0 Hub", hub_ports=4)
    usb_device(root, "1-1.4", vid="2109", pid="2822", product="USB2.0 Hub", hub_ports=4)
    board = usb_device(root, "1-1.4.2", vid="2341", pid="8057", product="Arduino NANO 33 IoT")
    (board / "1-1.4.2:1.0" / "tty" / "ttyACM0").mkdir(parents=True)
    usb_device(root, "3-4", vid="1a40", pid="0101", product="USB 2.0 Hub", hub_ports=4)
    return root


async def test_nothing_here_says_so_and_what_it_looked_at(tmp_path: Path) -> None:
    report = await detect_hubs(
        uhubctl_binary="uhubctl-not-installed-here",
        sysfs_root=tmp_path / "no-sys",
        kernel_release="5.15.0-91",
    )
    assert report.hubs == ()
    text = format_report(report)
    assert text.endswith("no switchable USB hub found")
    assert "'uhubctl-not-installed-here' not found on PATH" in text
    assert f"sysfs {tmp_path / 'no-sys'}: does not exist" in text
    assert "kernel 5.15.0-91: per-port 'disable' attribute missing (< 6.0)" in text


async def test_uhubctl_finding_nothing(tmp_path: Path) -> None:
    binary = fake_uhubctl(tmp_path / "bin", stderr="No compatible devices detected!\n", exit=1)
    report = await detect_hubs(uhubctl_binary=binary, sysfs_root=tmp_path / "no-sys")
    assert "exit status 1: No compatible devices detected!" in report.looked_at[0]
    assert "no switchable USB hub found" in format_report(report)


def test_scan_sysfs(sysfs: Path) -> None:
    hubs, note = scan_sysfs(sysfs)
    assert note == f"sysfs {sysfs}: 4 hub(s)"
    by_loc = {h.location: h for h in hubs}
    assert set(by_loc) == {"1", "1-1", "1-1.4", "3-4"}
    hub = by_loc["1-1.4"]
    assert hub.sysfs_disable
    port2 = hub.ports[1]
    assert port2.device == "2341:8057 Arduino NANO 33 IoT"
    assert port2.tty == "ttyACM0"
    assert port2.tty_key == "usb-0:1.4.2"
    assert by_loc["1-1"].ports[3].device_is_hub
    assert by_loc["1"].ports[0].tty_key == "usb-0:1"


async def test_merged_report(sysfs: Path, tmp_path: Path) -> None:
    binary = fake_uhubctl(tmp_path / "bin", stdout_files={"status": str(DATA / "list_force.txt")})
    report = await detect_hubs(uhubctl_binary=binary, sysfs_root=sysfs, kernel_release="6.8.0-45-generic")
    assert isinstance(report, HubReport)
    by_loc = {h.location: h for h in report.hubs}
    assert set(by_loc) == {"1", "1-1", "1-1.4", "2-1.3", "3-4"}
    assert by_loc["1-1.4"].sources == ("uhubctl", "sysfs")
    assert by_loc["2-1.3"].sources == ("uhubctl",)
    assert by_loc["3-4"].switching == "ganged"
    assert not by_loc["3-4"].switchable  # sysfs 'disable' would drop data only, not power
    assert by_loc["1-1.4"].switchable
    assert by_loc["1"].switchable  # sysfs only, switching unknown, 'disable' present
    assert by_loc["1-1.4"].ports[1].tty == "ttyACM0"
    assert by_loc["1-1.4"].ports[1].powered is True
    assert by_loc["1-1.4"].ports[3].powered is False
    text = format_report(report)
    assert "hub 3-4 [1a40:0101 USB 2.0 Hub, USB 2.00, 4 ports, ganged]" in text
    assert "not switchable per port: GANGED" in text
    assert "(chained hub: never switch this port)" in text
    assert "port 2: on   0503 power highspeed enable connect" in text
    assert "tty ttyACM0  key usb-0:1.4.2" in text
    assert text.endswith("switchable hub(s): 1, 1-1, 1-1.4, 2-1.3")
    assert "no switchable USB hub found" not in text
