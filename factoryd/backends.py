"""Picks the hub backend the settings ask for: the simulator or one of the real hubs.

This is the one place that knows every backend. The simulator is a backend like the others
(``factoryd.sim``); the hardware backends are imported only when chosen, since some need a
vendor library that is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_never

from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.config import Settings, SimHubSettings
from factoryd.errors import ConfigError
from factoryd.hub.base import Hub
from factoryd.sim.board import FaultPlan, SimBoard, Timing
from factoryd.sim.hub import SimHub
from factoryd.sim.remote import CONNECTION_POOL, RemoteSimHub

BoardFactory = Callable[[], SimBoard]
# Board n of a run with fault seed s gets seed s * stride + n: runs with neighbouring seeds share no
# board's fault plan (for their first million boards).
_SEED_STRIDE = 1_000_003


def sim_board_factory(
    sim: SimHubSettings, *, firmware_key: ec.EllipticCurvePublicKey | None = None
) -> BoardFactory:
    """Boards for the simulated hub, with the configured fault plan and timing model."""
    timing = (Timing.realistic() if sim.timing == "realistic" else Timing()).scaled(sim.timing_scale)
    counter = iter(range(1, 1 << 62))

    def make() -> SimBoard:
        seed = sim.fault_seed * _SEED_STRIDE + next(counter)
        faults = FaultPlan.uniform(sim.fault_rate, seed=seed, per_power_on=True)
        return SimBoard(faults=faults, timing=timing, firmware_key=firmware_key)

    return make


def build_hub(settings: Settings, board_factory: BoardFactory | None = None) -> Hub:
    """The hub backend the settings ask for (not entered yet: the daemon enters it)."""
    hub = settings.hub
    match hub.backend:
        case "sim":
            factory = board_factory or sim_board_factory(hub.sim)
            return SimHub(hub.sim.ports, factory, supply=hub.sim.boards)
        case "sim-remote":
            if hub.sim.control_socket is None:
                raise ConfigError("hub.backend = 'sim-remote' needs hub.sim.control_socket")
            return RemoteSimHub(hub.sim.control_socket, pool=CONNECTION_POOL)
        case "sysfs":
            from factoryd.hub.sysfs import SysfsHub  # noqa: PLC0415 - hardware backends load on demand

            return SysfsHub.from_settings(hub.sysfs)
        case "ykush":
            from factoryd.hub.ykush import YkushHub  # noqa: PLC0415

            return YkushHub.from_settings(hub.ykush)
        case "brainstem":
            from factoryd.hub.brainstem import BrainstemHub  # noqa: PLC0415

            return BrainstemHub.from_settings(hub.brainstem)
        case "uhubctl":
            from factoryd.hub.uhubctl import UhubctlHub  # noqa: PLC0415

            return UhubctlHub.from_settings(hub.uhubctl)
        case _:
            assert_never(hub.backend)
