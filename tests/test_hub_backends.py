"""Backend selection (factoryd.backends), the Hub context-manager contract, and the import direction."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.backends import build_hub, sim_board_factory
from factoryd.config import HubSettings, Settings, SimHubSettings, SysfsHubSettings, UhubctlSettings
from factoryd.errors import ConfigError, HubCommandError
from factoryd.hub.sysfs import SysfsHub
from factoryd.hub.uhubctl import UhubctlHub
from factoryd.sim.board import SimBoard
from factoryd.sim.hub import SimHub
from factoryd.sim.remote import RemoteSimHub, SimHubServer

PACKAGE = Path(__file__).resolve().parent.parent / "factoryd"
# Layers below the composition root: none of them may know about the simulator (issue 15).
SIM_FREE = ["hub", "protocol", "transport", "jobs", "ledger", "pki", "daemon.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("where", SIM_FREE)
def test_layers_below_the_composition_root_do_not_import_the_simulator(where: str) -> None:
    root = PACKAGE / where
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    assert files
    offenders = {
        str(f.relative_to(PACKAGE)): sorted(n for n in _imports(f) if n.startswith("factoryd.sim"))
        for f in files
    }
    assert {f: n for f, n in offenders.items() if n} == {}


def test_build_hub_picks_the_simulated_hub() -> None:
    settings = Settings(hub=HubSettings(backend="sim", sim=SimHubSettings(ports=3, boards=5)))
    hub = build_hub(settings)
    assert isinstance(hub, SimHub)
    assert list(hub.ports()) == ["1", "2", "3"]
    assert hub.boards_inserted == 3


def test_build_hub_uses_the_given_board_factory() -> None:
    made: list[SimBoard] = []

    def factory() -> SimBoard:
        made.append(SimBoard())
        return made[-1]

    hub = build_hub(Settings(hub=HubSettings(sim=SimHubSettings(ports=2))), factory)
    assert isinstance(hub, SimHub)
    assert [hub.board("1"), hub.board("2")] == made


def test_build_hub_picks_the_remote_simulated_hub(tmp_path: Path) -> None:
    socket = tmp_path / "hub.sock"
    settings = Settings(hub=HubSettings(backend="sim-remote", sim=SimHubSettings(control_socket=socket)))
    hub = build_hub(settings)
    assert isinstance(hub, RemoteSimHub)
    assert hub.socket_path == socket


def test_build_hub_refuses_a_remote_hub_without_a_socket() -> None:
    # The settings validator refuses this too; model_copy skips validation, build_hub must not.
    remote = HubSettings().model_copy(update={"backend": "sim-remote"})
    settings = Settings().model_copy(update={"hub": remote})
    with pytest.raises(ConfigError, match="control_socket"):
        build_hub(settings)


def test_build_hub_picks_sysfs_and_uhubctl(tmp_path: Path) -> None:
    sysfs = Settings(
        hub=HubSettings(
            backend="sysfs",
            sysfs=SysfsHubSettings(hub="1-1", ports=[1, 2], by_path_dir=tmp_path, udev=False),
        )
    )
    assert isinstance(build_hub(sysfs), SysfsHub)
    uhubctl = Settings(
        hub=HubSettings(
            backend="uhubctl",
            uhubctl=UhubctlSettings(location="1-1", ports=[1], by_path_dir=tmp_path, udev=False),
        )
    )
    assert isinstance(build_hub(uhubctl), UhubctlHub)


def test_sim_board_factory_gives_each_board_its_own_fault_seed_and_the_firmware_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    make = sim_board_factory(SimHubSettings(fault_rate=0.5, fault_seed=3), firmware_key=key)
    boards = [make() for _ in range(3)]
    assert len({b.faults.seed for b in boards}) == 3
    assert all(b.firmware_key is key for b in boards)
    assert all(b.faults.hang == 0.5 and b.faults.per_power_on for b in boards)


async def test_remote_hub_connects_when_entered(tmp_path: Path) -> None:
    socket = tmp_path / "hub.sock"
    async with SimHub(2, SimBoard) as sim:
        ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(SimHubServer(sim, socket).serve(ready))
            await ready.wait()
            remote = RemoteSimHub(socket, pool=2)
            with pytest.raises(HubCommandError, match="not connected"):
                remote.ports()
            async with remote as entered:
                assert entered is remote
                assert list(remote.ports()) == ["1", "2"]
                await remote.power_on("1")
                assert (await remote.status())["inserted"] == 2
            assert remote._idle == []  # leaving closed the pooled connections
            serving.cancel()


async def test_remote_hub_without_a_hub_process_fails_on_enter(tmp_path: Path) -> None:
    remote = RemoteSimHub(tmp_path / "nobody.sock", connect_timeout_s=0.2)
    with pytest.raises(HubCommandError, match="ports failed"):
        async with remote:
            pytest.fail("entered a hub with no hub process")
