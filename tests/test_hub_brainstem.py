"""The Acroname BrainStem hub backend against a fake of the brainstem package's public surface."""

from __future__ import annotations

import asyncio
import builtins
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from factoryd.backends import build_hub
from factoryd.config import BrainstemHubSettings, HubSettings, Settings
from factoryd.errors import ConfigError, HubCommandError, HubDisconnectedError
from factoryd.hub.base import probe_hub
from factoryd.hub.brainstem import BrainstemHub
from factoryd.hub.ttymap import ByPathResolver

SERIAL = 0x40F5849A


class FakeResult:
    """brainstem.result.Result: error and value."""

    NO_ERROR = 0
    NOT_FOUND = 3
    IO_ERROR = 6
    PERMISSION_ERROR = 12
    CONNECTION_ERROR = 25

    def __init__(self, error: int, value: int = 0) -> None:
        self.error = error
        self.value = value


class FakeUsb:
    """USBHub3p.usb: per-channel enable/disable, state and current readback."""

    def __init__(self, api: FakeBrainstemApi) -> None:
        self.api = api

    def _enter(self, call: tuple[str, int]) -> None:
        with self.api.guard:
            self.api.active += 1
            self.api.max_active = max(self.api.max_active, self.api.active)
        time.sleep(self.api.delay_s)
        self.api.calls.append(call)
        with self.api.guard:
            self.api.active -= 1

    def setPortEnable(self, channel: int) -> int:  # noqa: N802 - the library's names
        self._enter(("enable", channel))
        if self.api.unplugged:
            return FakeResult.NOT_FOUND  # the link is gone under an open stem
        if self.api.set_error:
            return self.api.set_error
        if channel not in self.api.stuck:
            self.api.vbus[channel] = True
        return 0

    def setPortDisable(self, channel: int) -> int:  # noqa: N802
        self._enter(("disable", channel))
        if self.api.unplugged:
            return FakeResult.NOT_FOUND
        if self.api.set_error:
            return self.api.set_error
        if channel not in self.api.stuck:
            self.api.vbus[channel] = False
        return 0

    def getPortState(self, channel: int) -> FakeResult:  # noqa: N802
        # bit 0 VBUS, bits 1-2 USB2 data lines.
        return FakeResult(0, 0b111 if self.api.vbus[channel] else 0)

    def getPortCurrent(self, channel: int) -> FakeResult:  # noqa: N802
        return FakeResult(0, 85_000 if self.api.vbus[channel] else 0)


class FakeStem:
    """brainstem.stem.USBHub3p."""

    def __init__(self, api: FakeBrainstemApi) -> None:
        self.api = api
        self.usb = FakeUsb(api)

    def discoverAndConnect(self, transport: int, serial_number: int = 0) -> int:  # noqa: N802
        self.api.connects.append((transport, serial_number))
        if self.api.connect_error:
            return self.api.connect_error
        if self.api.unplugged:
            return FakeResult.NOT_FOUND
        return 0 if serial_number in (0, SERIAL) else FakeResult.NOT_FOUND

    def disconnect(self) -> int:
        self.api.disconnects += 1
        return 0


class FakeBrainstemApi:
    """A stand-in for the brainstem module: .stem.USBHub3p, .link.Spec.USB, .result.Result."""

    def __init__(self) -> None:
        self.stem = types.SimpleNamespace(USBHub3p=lambda: FakeStem(self))
        self.link = types.SimpleNamespace(Spec=types.SimpleNamespace(USB=1))
        self.result = types.SimpleNamespace(Result=FakeResult)
        self.vbus = dict.fromkeys(range(8), True)
        self.stuck: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.connects: list[tuple[int, int]] = []
        self.disconnects = 0
        self.connect_error = 0
        self.unplugged = False  # the USB cable pulled: discovery finds nothing, calls on a stem fail
        self.set_error = 0
        self.delay_s = 0.0
        self.active = 0
        self.max_active = 0
        self.guard = threading.Lock()


@pytest.fixture
def by_path(tmp_path: Path) -> Path:
    """A stand-in for /dev/serial/by-path."""
    d = tmp_path / "by-path"
    d.mkdir()
    return d


def make_hub(api: FakeBrainstemApi, by_path: Path, **kw: Any) -> BrainstemHub:
    """A USBHub3p with ports 1..4 (channels 0..3) on the fake library."""
    kw.setdefault("serial", "0x40F5849A")
    return BrainstemHub(
        "1-1.4", [1, 2, 3, 4], resolver=ByPathResolver(by_path, poll_interval_s=0.01), api=api, **kw
    )


async def test_power_on_and_off_are_verified(by_path: Path) -> None:
    api = FakeBrainstemApi()
    hub = make_hub(api, by_path)
    await hub.power_off("2")
    assert api.connects == [(1, SERIAL)]
    assert api.calls == [("disable", 1)]  # port 2 is channel 1
    assert api.vbus[1] is False
    assert await hub.port_current_ua("2") == 0
    await hub.power_on("2")
    assert api.vbus[1] is True
    assert await hub.port_current_ua("2") == 85_000
    assert len(api.connects) == 1  # the link is kept


async def test_context_switches_all_off_and_disconnects(by_path: Path) -> None:
    api = FakeBrainstemApi()
    async with make_hub(api, by_path) as hub:
        assert [api.vbus[c] for c in range(4)] == [False] * 4
        assert api.vbus[4] is True  # not ours
        await hub.power_on("4")
        assert api.vbus[3] is True
    assert api.vbus[3] is False
    assert api.disconnects == 1


async def test_state_that_does_not_change_is_an_error(by_path: Path) -> None:
    api = FakeBrainstemApi()
    api.stuck = {0}
    with pytest.raises(HubCommandError, match=r"port 1 is still powered after switching it off .*0x00000007"):
        await make_hub(api, by_path).power_off("1")


async def test_result_code_is_named(by_path: Path) -> None:
    api = FakeBrainstemApi()
    api.set_error = FakeResult.IO_ERROR
    hub = make_hub(api, by_path)
    with pytest.raises(
        HubCommandError, match=r"switching port 3 on failed with BrainStem result code 6 \(IO_ERROR\)"
    ):
        await hub.power_on("3")
    api.set_error = 0
    await hub.power_on("3")
    assert len(api.connects) == 2  # an I/O error drops the link; the next call rediscovers the hub


async def test_hub_not_found(by_path: Path) -> None:
    hub = make_hub(FakeBrainstemApi(), by_path, serial="1234")
    with pytest.raises(HubCommandError, match=r"no Acroname USBHub3p with serial 1234 on USB.*90-factoryd"):
        await hub.power_on("1")


async def test_permission_error_points_to_udev_rules(by_path: Path) -> None:
    api = FakeBrainstemApi()
    api.connect_error = FakeResult.PERMISSION_ERROR
    with pytest.raises(
        HubCommandError, match=r"connecting to the hub: permission denied: .*90-factoryd.rules"
    ):
        await make_hub(api, by_path).power_on("1")


async def test_library_missing_says_what_to_install(by_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_brainstem(name: str, *args: Any, **kwargs: Any) -> types.ModuleType:
        if name == "brainstem":
            raise ModuleNotFoundError("No module named 'brainstem'", name="brainstem")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_brainstem)
    monkeypatch.delitem(sys.modules, "brainstem", raising=False)
    hub = BrainstemHub("1-1.4", [1], resolver=ByPathResolver(by_path))
    with pytest.raises(HubCommandError, match=r"brainstem library.*pip install 'factoryd\[brainstem\]'"):
        await hub.power_on("1")


async def test_calls_never_overlap(by_path: Path) -> None:
    api = FakeBrainstemApi()
    api.delay_s = 0.02
    hub = make_hub(api, by_path)
    await asyncio.gather(*(hub.power_on(p) for p in ("1", "2", "3", "4", "1", "2")))
    assert api.max_active == 1
    assert len(api.calls) == 6


async def test_timeout_is_an_error(by_path: Path) -> None:
    api = FakeBrainstemApi()
    api.delay_s = 0.3
    hub = make_hub(api, by_path, command_timeout_s=0.05)
    with pytest.raises(HubCommandError, match=r"no answer from the BrainStem hub"):
        await hub.power_on("1")


def test_settings_and_from_settings(by_path: Path) -> None:
    settings = BrainstemHubSettings(
        serial="0x40F5849A",
        location="1-2",
        ports=[1, 2],
        tty={"1": "/dev/factoryd/slot-1"},
        by_path_dir=by_path,
    )
    hub = BrainstemHub.from_settings(settings)
    assert hub.serial_number == SERIAL
    assert hub.tty_key("1") == "/dev/factoryd/slot-1"
    with pytest.raises(ValueError, match=r"serial 'abc' is not a number"):
        BrainstemHubSettings(serial="abc")
    with pytest.raises(ValueError, match=r"tty entries for ports not in ports: 9"):
        BrainstemHubSettings(location="1-2", ports=[1], tty={"9": "/dev/x"})
    with pytest.raises(ConfigError, match=r"serial 'xyz' is not a number"):
        BrainstemHub("1-2", [1], serial="xyz")
    assert BrainstemHub("1-2", [1], resolver=ByPathResolver(by_path)).serial_number == 0


def test_build_hub_picks_brainstem(by_path: Path) -> None:
    settings = Settings(
        hub=HubSettings(
            backend="brainstem",
            brainstem=BrainstemHubSettings(location="1-2", ports=[1], by_path_dir=by_path, udev=False),
        )
    )
    assert isinstance(build_hub(settings, None), BrainstemHub)


async def test_an_unplugged_brainstem_is_disconnected_until_it_is_back(by_path: Path) -> None:
    api = FakeBrainstemApi()
    hub = make_hub(api, by_path)
    await probe_hub(hub)  # a CheckedHub: the station can ask it whether it is there
    await hub.power_on("1")  # a stem is connected from now on
    api.unplugged = True
    with pytest.raises(HubCommandError, match="switching port 1 off"):
        await hub.power_off("1")
    # The station's probe after a failed job: a fresh discovery says the hub is gone, not one port.
    with pytest.raises(HubDisconnectedError, match=r"no Acroname USBHub3p with serial .*unplugged"):
        await probe_hub(hub)
    api.unplugged = False
    await probe_hub(hub)
    await hub.power_off("1")
    assert api.vbus[0] is False
