"""Soak, genuine parts only: a lot requiring attestation, 5 % impostors among faulty genuine boards.

CI runs a small size; SOAK_PORTS=32 SOAK_DEVICES=2000 for the full run by hand. Afterwards: 0 IDs
consumed by impostors (no reservation or device bound to an impostor's serial), 0 IDs on two boards,
0 IDs lost (every ID available, reserved to a genuine board, provisioned or void), every impostor
refused with a genuineness reason, and the manifest lists exactly the provisioned devices.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from factoryd.pki.attestation import GENUINENESS_REASONS
from factoryd.protocol.messages import ObjectId
from factoryd.service import StationPaths, export_manifest
from factoryd.sim.board import FaultPlan, Impostor, SimBoard, equip_attestation
from factoryd.sim.secure_element import SimVendorCa
from tests.helpers.station import LOT, make_line

PORTS = int(os.environ.get("SOAK_PORTS", "8"))
DEVICES = int(os.environ.get("SOAK_DEVICES", "80"))
IMPOSTOR_RATE = 0.05
FAULT_RATE = 0.1


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_soak_attestation_with_impostors(tmp_path: Path) -> None:
    rng = random.Random(2027)  # noqa: S311 - a reproducible supply, not cryptography
    line = await make_line(tmp_path, boards=DEVICES, ports=PORTS, attestation=True)
    vendor = SimVendorCa.make(seed=line.options.seed)
    impostors: list[tuple[SimBoard, Impostor]] = []
    genuine: list[bytes] = []

    def supply() -> SimBoard:
        faults = FaultPlan.uniform(FAULT_RATE, seed=rng.randrange(1 << 30), per_power_on=True)
        board = line.board(faults)
        kind = rng.choice(list(Impostor)) if rng.random() < IMPOSTOR_RATE or not impostors else None
        # A clone copies the serial of a genuine board fed in before it.
        copied = genuine[-1] if genuine and kind is Impostor.CLONE else None
        equip_attestation(board, vendor, kind, copied_serial=copied)
        if kind is None:
            genuine.append(board.se.serial)
        else:
            impostors.append((board, kind))
        return board

    hub = line.hub(ports=PORTS, supply=DEVICES, factory=supply)
    # This soak is about IDs and impostors: no port stops for attention (tests/test_pipeline.py has that).
    station = await line.run(hub, timeout_s=800, settings=line.without_attention())
    assert impostors, "the supply had no impostor"

    refused = {r.hw_serial: r for r in station.results if r.outcome == "refused"}
    genuine_serials = {s.hex() for s in genuine}
    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
        devices = ledger.provisioned_devices(LOT)
        manifest = export_manifest(
            ledger, StationPaths(line.settings.station.state_dir), line.passphrase, LOT
        )
        # 0 IDs consumed by impostors: no reservation or device is bound to an impostor's own serial
        # (a clone reports a genuine board's serial, whose ID belongs to that board).
        for board, kind in impostors:
            serial = board.info().serial_hex
            if serial not in genuine_serials:
                record = ledger.find_by_serial(LOT, serial)
                assert record is None, f"{kind} impostor {serial} holds {record}"
    for board, kind in impostors:
        assert ObjectId.DEVICE_ID not in board.se.objects, f"{kind} impostor left with a device ID"
        if kind is not Impostor.CLONE:
            # A clone on a serial in flight may be refused as a lying board instead (identity_mismatch).
            result = refused.get(board.info().serial_hex)
            assert result is not None, f"{kind} impostor was not refused"
            assert result.reason in GENUINENESS_REASONS
    # 0 duplicates: no ID on two boards.
    on_boards = Counter(raw for b in hub.finished if (raw := b.se.objects.get(ObjectId.DEVICE_ID)))
    assert all(n == 1 for n in on_boards.values())
    # 0 lost: every ID is in exactly one state, and every provisioned one is on its board.
    assert progress.available + progress.reserved + progress.provisioned + progress.void == progress.total
    held = {raw.decode() for raw in on_boards}
    assert {d.device_id for d in devices} <= held
    assert {d["device_id"] for d in json.loads(manifest.json_bytes)["devices"]} == {
        d.device_id for d in devices
    }
