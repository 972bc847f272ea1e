"""The YKUSH hub backend against a fake of pykush's public surface and a temporary by-path directory."""

from __future__ import annotations

import builtins
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from factoryd.backends import build_hub
from factoryd.config import HubSettings, Settings, YkushHubSettings
from factoryd.errors import ConfigError, HubCommandError, HubDisconnectedError
from factoryd.hub import ykush as ykush_mod
from factoryd.hub.base import probe_hub
from factoryd.hub.ttymap import ByPathResolver
from factoryd.hub.ykush import YkushHub

UP, DOWN, ERROR = 1, 0, 255


class FakeYkushNotFoundError(Exception):
    """pykush.YKUSHNotFound."""


class FakeYkushApi:
    """A stand-in for the pykush module: YKUSH devices by serial, state per port."""

    YKUSH_PORT_STATE_UP = UP
    YKUSH_PORT_STATE_DOWN = DOWN
    YKUSH_PORT_STATE_ERROR = ERROR
    YKUSHNotFound = FakeYkushNotFoundError

    def __init__(self, serials: tuple[str, ...] = ("YK12345",), ports: int = 3) -> None:
        self.serials = serials
        self.state = dict.fromkeys(range(1, ports + 1), UP)  # ports come up ON with the hub
        self.calls: list[tuple[str, int, int | None]] = []
        self.stuck: set[int] = set()  # ports whose state never changes
        self.open_error: BaseException | None = None
        self.unplugged = False  # the USB cable pulled: no device to open, open handles fail
        self.delay_s = 0.0
        self.active = 0
        self.max_active = 0
        self._guard = threading.Lock()

    def YKUSH(self, serial: str | None = None) -> FakeDevice:  # noqa: N802 - pykush's name
        if self.open_error is not None:
            raise self.open_error
        if self.unplugged or (serial is not None and serial not in self.serials):
            raise FakeYkushNotFoundError()
        return FakeDevice(self)


class FakeDevice:
    """pykush.YKUSH: set_port_state/get_port_state."""

    def __init__(self, api: FakeYkushApi) -> None:
        self.api = api

    def _enter(self) -> None:
        with self.api._guard:
            self.api.active += 1
            self.api.max_active = max(self.api.max_active, self.api.active)
        time.sleep(self.api.delay_s)
        with self.api._guard:
            self.api.active -= 1

    def _gone(self) -> None:
        if self.api.unplugged:
            raise OSError("read error")  # hidapi on a handle whose device went away

    def set_port_state(self, port: int, state: int) -> bool:
        self._gone()
        self._enter()
        self.api.calls.append(("set", port, state))
        if port not in self.api.state:
            return False
        if port not in self.api.stuck:
            self.api.state[port] = state
        return True

    def get_port_state(self, port: int) -> int:
        self._gone()
        self.api.calls.append(("get", port, None))
        return self.api.state.get(port, ERROR)


@pytest.fixture
def by_path(tmp_path: Path) -> Path:
    """A stand-in for /dev/serial/by-path."""
    d = tmp_path / "by-path"
    d.mkdir()
    return d


def make_hub(api: FakeYkushApi, by_path: Path, **kw: Any) -> YkushHub:
    """A YKUSH with printed ports 1..3 on the fake library."""
    kw.setdefault("serial", "YK12345")
    return YkushHub("1-1.4", [1, 2, 3], resolver=ByPathResolver(by_path, poll_interval_s=0.01), api=api, **kw)


async def test_power_on_and_off_are_verified(by_path: Path) -> None:
    api = FakeYkushApi()
    hub = make_hub(api, by_path)
    await hub.power_off("2")
    assert api.state == {1: UP, 2: DOWN, 3: UP}
    assert api.calls == [("set", 2, DOWN), ("get", 2, None)]
    await hub.power_on("2")
    assert api.state[2] == UP
    assert await hub.port_states() == {"1": True, "2": True, "3": True}


async def test_context_switches_every_port_off_at_start_and_end(by_path: Path) -> None:
    api = FakeYkushApi()
    async with make_hub(api, by_path) as hub:
        assert set(api.state.values()) == {DOWN}  # the hub powered up with every port ON
        await hub.power_on("3")
        assert api.state[3] == UP
    assert set(api.state.values()) == {DOWN}


async def test_state_that_does_not_change_is_an_error(by_path: Path) -> None:
    api = FakeYkushApi()
    api.stuck = {1}
    with pytest.raises(HubCommandError, match=r"ykush:1-1.4: port 1 is still on after switching it off"):
        await make_hub(api, by_path).power_off("1")


async def test_error_state_and_refused_port(by_path: Path) -> None:
    api = FakeYkushApi(ports=2)
    hub = make_hub(api, by_path)
    with pytest.raises(HubCommandError, match=r"refused to switch port 3 off .*hub.ykush.ports"):
        await hub.power_off("3")
    api.state[1] = ERROR
    api.stuck = {1}
    with pytest.raises(HubCommandError, match=r"port 1 reports state 255"):
        await hub.power_on("1")


async def test_hub_not_found_names_serial_and_udev_rule(by_path: Path) -> None:
    hub = make_hub(FakeYkushApi(), by_path, serial="YK99999")
    with pytest.raises(
        HubCommandError, match=r"no YKUSH hub with serial 'YK99999'.*ykushcmd -l.*90-factoryd"
    ):
        await hub.power_on("1")


async def test_open_failure_points_to_udev_rules(by_path: Path) -> None:
    api = FakeYkushApi()
    api.open_error = OSError("open failed")
    with pytest.raises(HubCommandError, match=r"cannot open the YKUSH \(open failed\).*90-factoryd.rules"):
        await make_hub(api, by_path).power_on("1")
    api.open_error = PermissionError(13, "Permission denied")
    with pytest.raises(HubCommandError, match=r"permission denied .*90-factoryd.rules"):
        await make_hub(api, by_path).power_on("1")


async def test_library_missing_says_what_to_install(by_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_pykush(name: str, *args: Any, **kwargs: Any) -> types.ModuleType:
        if name == "pykush":
            raise ModuleNotFoundError("No module named 'pykush'", name="pykush")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pykush)
    monkeypatch.delitem(__import__("sys").modules, "pykush", raising=False)
    hub = YkushHub("1-1.4", [1], resolver=ByPathResolver(by_path))
    with pytest.raises(HubCommandError, match=r"yepkit-pykush.*pip install 'factoryd\[ykush\]'"):
        await hub.power_on("1")


async def test_calls_never_overlap(by_path: Path) -> None:
    import asyncio

    api = FakeYkushApi()
    api.delay_s = 0.02
    hub = make_hub(api, by_path)
    await asyncio.gather(*(hub.power_on(p) for p in ("1", "2", "3", "1", "2", "3")))
    assert api.max_active == 1
    assert len([c for c in api.calls if c[0] == "set"]) == 6


async def test_timeout_is_an_error(by_path: Path) -> None:
    api = FakeYkushApi()
    api.delay_s = 0.3
    hub = make_hub(api, by_path, command_timeout_s=0.05)
    with pytest.raises(HubCommandError, match=r"no answer from the YKUSH after 0.1 s"):
        await hub.power_on("1")


def test_printed_labels_map_to_usb_ports(by_path: Path) -> None:
    hub = make_hub(FakeYkushApi(), by_path, usb_port={"1": 3, "3": 1}, tty={"2": "/dev/factoryd/slot-2"})
    assert hub.ports() == ["1", "2", "3"]
    assert hub.tty_key("1") == "usb-0:1.4.3"
    assert hub.tty_key("2") == "/dev/factoryd/slot-2"
    assert hub.tty_key("3") == "usb-0:1.4.1"


async def test_switching_uses_printed_numbers(by_path: Path) -> None:
    api = FakeYkushApi()
    hub = make_hub(api, by_path, usb_port={"1": 3, "3": 1})
    await hub.power_off("1")
    assert api.calls[0] == ("set", 1, DOWN)  # the command number is the printed one


async def test_power_off_waits_for_the_mapped_tty(by_path: Path, tmp_path: Path) -> None:
    import asyncio

    hub = make_hub(FakeYkushApi(), by_path, usb_port={"1": 3}, remove_timeout_s=1.0)
    target = tmp_path / "ttyACM0"
    target.touch()
    link = by_path / "pci-0000:00:14.0-usb-0:1.4.3:1.0"
    link.symlink_to(target)
    assert await hub.wait_for_tty("1", 1.0) == str(link)
    task = asyncio.create_task(hub.power_off("1"))
    await asyncio.sleep(0.1)
    assert not task.done()
    link.unlink()
    await asyncio.wait_for(task, 1.0)


def test_settings_and_from_settings(by_path: Path) -> None:
    settings = YkushHubSettings(
        serial="YK1", location="1-2", ports=[1, 2], usb_port={"2": 1}, by_path_dir=by_path, udev=False
    )
    hub = YkushHub.from_settings(settings)
    assert hub.serial == "YK1"
    assert hub.tty_key("2") == "usb-0:2.1"
    with pytest.raises(ValueError, match=r"usb_port entries for ports not in ports: 5"):
        YkushHubSettings(location="1-2", ports=[1], usb_port={"5": 1})
    with pytest.raises(ValueError, match=r"usb_port entries must be USB port numbers >= 1: 1"):
        YkushHubSettings(location="1-2", ports=[1], usb_port={"1": 0})
    with pytest.raises(ConfigError, match=r"location is empty"):
        YkushHub("", [1])
    with pytest.raises(ConfigError, match=r"usb_port entries for ports not in ports"):
        YkushHub("1-2", [1], usb_port={"4": 2})


def test_build_hub_picks_ykush(by_path: Path) -> None:
    settings = Settings(
        hub=HubSettings(
            backend="ykush",
            ykush=YkushHubSettings(location="1-2", ports=[1], by_path_dir=by_path, udev=False),
        )
    )
    assert isinstance(build_hub(settings, None), ykush_mod.YkushHub)


async def test_an_unplugged_ykush_is_disconnected_until_it_is_back(by_path: Path) -> None:
    api = FakeYkushApi()
    hub = make_hub(api, by_path)
    await probe_hub(hub)  # a CheckedHub: the station can ask it whether it is there
    await hub.power_on("1")  # a handle is open from now on
    api.unplugged = True
    with pytest.raises(HubCommandError, match="switching port 1"):
        await hub.power_off("1")
    # The station's probe after a failed job: a fresh open says the hub is gone, not just one port.
    with pytest.raises(HubDisconnectedError, match=r"no YKUSH hub with serial 'YK12345'.*unplugged"):
        await probe_hub(hub)
    with pytest.raises(HubDisconnectedError):
        await hub.power_on("1")
    api.unplugged = False
    await probe_hub(hub)
    await hub.power_off("1")
    assert api.state[1] == DOWN
