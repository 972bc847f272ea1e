"""The sysfs 'disable' hub backend against a fake /sys/bus/usb/devices tree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from factoryd.config import SysfsHubSettings
from factoryd.errors import EnumerationTimeoutError, HubCommandError
from factoryd.hub import sysfs as sysfs_mod
from factoryd.hub.base import Hub
from factoryd.hub.sysfs import SysfsHub, disable_path
from factoryd.hub.ttymap import ByPathResolver


def make_tree(root: Path, hub: str, *, ports: int = 4, config: int = 1, disable: bool = True) -> None:
    """A hub device with its interface and port directories, as Linux >= 6.0 shows them."""
    dev = root / (f"usb{hub}" if hub.isdigit() else hub)
    dev.mkdir(parents=True)
    (dev / "bConfigurationValue").write_text(f"{config}\n")
    for n in range(1, ports + 1):
        path = disable_path(root, hub, config, n)
        path.parent.mkdir(parents=True)
        if disable:
            path.write_text("0\n")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake sysfs usb/devices directory with hubs 1-1.4 (USB 2) and 2-1.3 (its USB 3 half)."""
    r = tmp_path / "sys"
    make_tree(r, "1-1.4")
    make_tree(r, "2-1.3", config=2)
    return r


@pytest.fixture
def by_path(tmp_path: Path) -> Path:
    """A stand-in for /dev/serial/by-path."""
    d = tmp_path / "by-path"
    d.mkdir()
    return d


def make_hub(
    root: Path, by_path: Path, hub: str = "1-1.4", *, dual_hub: str = "", config: int | None = None
) -> SysfsHub:
    """A sysfs hub on the fake tree."""
    resolver = ByPathResolver(by_path, poll_interval_s=0.01)
    return SysfsHub(hub, [1, 2, 3, 4], sysfs_root=root, resolver=resolver, dual_hub=dual_hub, config=config)


def disabled(root: Path, hub: str, port: int, config: int = 1) -> str:
    """What the port's disable file holds."""
    return disable_path(root, hub, config, port).read_text().strip()


async def test_power_off_and_on_write_the_disable_file(root: Path, by_path: Path) -> None:
    hub: Hub = make_hub(root, by_path)
    await hub.power_off("2")
    assert disabled(root, "1-1.4", 2) == "1"
    assert disabled(root, "1-1.4", 3) == "0"
    await hub.power_on("2")
    assert disabled(root, "1-1.4", 2) == "0"


async def test_dual_hub_and_configuration_read_from_sysfs(root: Path, by_path: Path) -> None:
    hub = make_hub(root, by_path, dual_hub="2-1.3")
    await hub.power_off("3")
    assert disabled(root, "1-1.4", 3) == "1"
    assert disabled(root, "2-1.3", 3, config=2) == "1"  # bConfigurationValue 2 was read
    assert await hub.disable_paths("3") == [
        root / "1-1.4:1.0" / "1-1.4-port3" / "disable",
        root / "2-1.3:2.0" / "2-1.3-port3" / "disable",
    ]


async def test_root_hub_paths(tmp_path: Path, by_path: Path) -> None:
    root = tmp_path / "sys"
    make_tree(root, "1", ports=2)
    hub = SysfsHub("1", [2], sysfs_root=root, resolver=ByPathResolver(by_path))
    await hub.power_off("2")
    assert (root / "1-0:1.0" / "usb1-port2" / "disable").read_text().strip() == "1"


async def test_old_kernel_without_disable_attribute(tmp_path: Path, by_path: Path) -> None:
    root = tmp_path / "sys"
    make_tree(root, "1-1.4", disable=False)
    hub = make_hub(root, by_path)
    with pytest.raises(
        HubCommandError, match=r"no per-port 'disable' attribute \(needs Linux >= 6.0\).*uhubctl"
    ):
        await hub.power_on("1")


async def test_wrong_hub_location(root: Path, by_path: Path) -> None:
    hub = make_hub(root, by_path, hub="1-9")
    with pytest.raises(HubCommandError, match=r"no USB device 1-9 under .*hubs detect"):
        await hub.power_on("1")
    explicit = make_hub(root, by_path, hub="1-9", config=1)
    with pytest.raises(HubCommandError, match=r"no USB device 1-9"):
        await explicit.power_on("1")


async def test_wrong_configuration_and_missing_port(root: Path, by_path: Path) -> None:
    with pytest.raises(HubCommandError, match=r"no hub interface 1-1.4:3.0"):
        await make_hub(root, by_path, config=3).power_on("1")
    small = SysfsHub("1-1.4", [6], sysfs_root=root, resolver=ByPathResolver(by_path))
    with pytest.raises(HubCommandError, match=r"hub 1-1.4 has no port 6"):
        await small.power_on("6")


async def test_permission_denied_names_udev_rule_and_unit(
    root: Path, by_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path, value: str) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    # Tests may run as root, which ignores file modes: refuse the write directly.
    monkeypatch.setattr(sysfs_mod, "_write_and_read", refuse)
    with pytest.raises(
        HubCommandError, match=r"permission denied writing .*90-factoryd.rules.*ReadWritePaths"
    ):
        await make_hub(root, by_path).power_off("1")


async def test_readback_mismatch(root: Path, by_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sysfs_mod, "_write_and_read", lambda path, value: "0")
    with pytest.raises(HubCommandError, match=r"port 1 of hub 1-1.4 reads disable='0' after writing 1"):
        await make_hub(root, by_path).power_off("1")


async def test_power_off_waits_for_tty_and_wait_for_tty(root: Path, by_path: Path, tmp_path: Path) -> None:
    hub = make_hub(root, by_path)
    target = tmp_path / "ttyACM0"
    target.touch()
    link = by_path / "pci-0000:00:14.0-usb-0:1.4.2:1.0"
    link.symlink_to(target)
    assert await hub.wait_for_tty("2", 1.0) == str(link)
    task = asyncio.create_task(hub.power_off("2"))
    await asyncio.sleep(0.1)
    assert not task.done()
    link.unlink()
    await asyncio.wait_for(task, 1.0)
    with pytest.raises(EnumerationTimeoutError, match=r"sysfs:1-1.4 port 2"):
        await hub.wait_for_tty("2", 0.05)


async def test_context_switches_all_off(root: Path, by_path: Path) -> None:
    async with make_hub(root, by_path) as hub:
        assert [disabled(root, "1-1.4", n) for n in range(1, 5)] == ["1"] * 4
        await hub.power_on("4")
        assert disabled(root, "1-1.4", 4) == "0"
    assert disabled(root, "1-1.4", 4) == "1"


def test_from_settings(root: Path, by_path: Path) -> None:
    settings = SysfsHubSettings(hub="1-1.4", ports=[2, 1], sysfs_root=root, by_path_dir=by_path, udev=False)
    hub = SysfsHub.from_settings(settings)
    assert hub.ports() == ["2", "1"]
    assert hub.name == "sysfs:1-1.4"
    with pytest.raises(ValueError, match=r"tty entries for ports not in ports: 3"):
        SysfsHubSettings(hub="1-1", ports=[1], tty={"3": "/dev/x"})


async def test_unknown_port(root: Path, by_path: Path) -> None:
    hub = make_hub(root, by_path)
    with pytest.raises(HubCommandError, match=r"has no port '5'"):
        await hub.power_on("5")
