"""Runs the real daemon on a simulated hub inside a test (lot, CA, firmware made by the demo's set-up)."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.config import Settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.demo import DEMO_LOT, DemoOptions, demo_settings, prepare_lot
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger
from factoryd.protocol.messages import ObjectId
from factoryd.sim.board import FaultPlan, SimBoard
from factoryd.sim.hub import SimHub
from factoryd.telemetry.events import TelemetrySink

LOT = DEMO_LOT


@dataclass
class Line:
    """A prepared lot plus what is needed to run stations on it."""

    options: DemoOptions
    settings: Settings
    passphrase: bytes
    fw_public: ec.EllipticCurvePublicKey

    def board(self, faults: FaultPlan | None = None) -> SimBoard:
        """A fresh board whose bootloader trusts the lot's firmware key."""
        return SimBoard(firmware_key=self.fw_public, faults=faults or FaultPlan())

    def hub(self, ports: int, supply: int | None, factory: Callable[[], SimBoard] | None = None) -> SimHub:
        """A simulated hub fed with this line's boards."""
        return SimHub(ports, factory or self.board, supply=supply)

    def without_attention(self) -> Settings:
        """The line's settings with ports that never stop for the operator (attention).

        A run fed faulty boards can give one port three failures in a row; the port then waits for the
        operator holding the next board the simulated hub put in, so the supply never runs out and
        ``run`` waits for its timeout. Tests that are not about the attention rule use these settings.
        """
        jobs = self.settings.jobs.model_copy(update={"attention_after_failures": 1_000_000})
        return self.settings.model_copy(update={"jobs": jobs})

    def ledger(self) -> Ledger:
        """A sync ledger on the line's database."""
        return Ledger.open(self.settings.ledger_url)

    async def run(
        self,
        hub: SimHub,
        stop_when: Callable[[Station], bool] | None = None,
        *,
        settings: Settings | None = None,
        timeout_s: float = 60.0,
        sinks: tuple[TelemetrySink, ...] = (),
    ) -> Station:
        """Run a daemon until the hub's supply is used up (or stop_when)."""

        def done(station: Station) -> bool:
            return stop_when(station) if stop_when else hub.exhausted

        hooks = DaemonHooks(hub=hub, passphrase=self.passphrase, stop_when=done, extra_sinks=sinks)
        daemon = Daemon(settings or self.settings, hooks)
        async with asyncio.timeout(timeout_s):
            return await daemon.run()


async def make_line(tmp_path: Path, **option_overrides: object) -> Line:
    """Prepare a lot (CA, signed firmware, IDs) in an SQLite ledger under tmp_path."""
    options = replace(DemoOptions(state_dir=tmp_path, boards=20, ports=4), **option_overrides)  # type: ignore[arg-type]
    settings = demo_settings(options, tmp_path)
    passphrase = secrets.token_urlsafe(16).encode()
    fw_public = await asyncio.to_thread(prepare_lot, options, settings, passphrase)
    return Line(options, settings, passphrase, fw_public)


def count_commands(board: SimBoard) -> Counter[int]:
    """Count the commands the board executes (resends answered from its reply cache are not counted)."""
    seen: Counter[int] = Counter()
    execute = board._execute

    async def counted(request: object) -> object:
        seen[type(request).command] += 1  # type: ignore[attr-defined]
        return await execute(request)  # type: ignore[arg-type]

    board._execute = counted  # type: ignore[method-assign]
    return seen


async def provision_one(tmp_path: Path, revision: int) -> tuple[SimBoard, Counter[int]]:
    """Provision one board of protocol ``revision`` on a fresh line, checked; it and the commands it ran."""
    line = await make_line(tmp_path)
    board = line.board()
    board.revision = revision
    seen = count_commands(board)
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    with line.ledger() as ledger:
        record = ledger.find_by_serial(DEMO_LOT, board.serial_hex)
    assert record is not None
    assert record.cert_der == board.se.objects[ObjectId.DEVICE_CERT]
    assert board.se.locked
    return board, seen
