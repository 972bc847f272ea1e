"""A Matter line end to end: the real daemon, simulated boards behind real PTYs (native and mcumgr).

Each board must end with a DAC that passes the independent profile check and openssl verify against
the PAA, the lot's PAI and CD, and a commissioning object whose verifier is the one the passcode in
the ledger's sealed onboarding codes gives; the passcode itself is nowhere on the board.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from stdnum import verhoeff

from factoryd.ledger import Ledger
from factoryd.matter.cd import parse_cd
from factoryd.matter.dac import chain_problems, matter_ids
from factoryd.matter.device import parse_commissioning
from factoryd.matter.lot import MatterStore
from factoryd.matter.payload import check_passcode, parse_manual_code, parse_qr_payload
from factoryd.matter.spake2p import compute_verifier
from factoryd.protocol.messages import ObjectId
from factoryd.service import StationPaths
from factoryd.sim.board import FaultPlan, SimBoard
from factoryd.sim.mcumgr import SimMcumgrBoard
from factoryd.sim.secure_element import SimSecureElement, seeded_se_serial
from tests.helpers.openssl import openssl
from tests.helpers.station import LOT, Line, make_line

BOARDS = 3


def _check_line(line: Line, boards: list[SimBoard], tmp_path: Path, *, expected: int = BOARDS) -> None:
    paths = StationPaths(line.settings.station.state_dir)
    with Ledger.open(line.settings.ledger_url, onboarding_secret=line.passphrase) as ledger:
        records = {r.hw_serial: r for r in ledger.provisioned_devices(LOT)}
        chain = ledger  # keep the ledger open for the codes below
        files = MatterStore(paths.matter)
        paa_pem = (files.path(LOT) / "paa.pem").read_bytes()
        paa = x509.load_pem_x509_certificate(paa_pem)
        cd = parse_cd((files.path(LOT) / "cd.der").read_bytes())
        provisioned = [b for b in boards if b.serial_hex in records]
        assert len(provisioned) == expected
        for board in provisioned:
            objects = board.se.objects
            record = records[board.serial_hex]
            dac = x509.load_der_x509_certificate(objects[ObjectId.DEVICE_CERT])
            pai = x509.load_der_x509_certificate(objects[ObjectId.MATTER_PAI])
            assert chain_problems(dac, pai, paa) == []
            assert objects[ObjectId.MATTER_CD] == cd.der
            ids = matter_ids(dac)
            assert cd.allows_dac_ids(ids.vendor_id or 0, ids.product_id or 0)
            (tmp_path / "paa.pem").write_bytes(paa_pem)
            (tmp_path / "pai.pem").write_bytes(pai.public_bytes(serialization.Encoding.PEM))
            (tmp_path / "dac.pem").write_bytes(dac.public_bytes(serialization.Encoding.PEM))
            verified = openssl(
                "verify", "-x509_strict", "-CAfile", str(tmp_path / "paa.pem"),
                "-untrusted", str(tmp_path / "pai.pem"), str(tmp_path / "dac.pem"),
            )  # fmt: skip
            assert verified.returncode == 0, verified.stderr
            # The board's commissioning data against the ledger's sealed codes.
            commissioning = parse_commissioning(objects[ObjectId.MATTER_COMMISSIONING])
            codes = chain.onboarding_codes(LOT, record.device_id)
            assert codes is not None
            qr = parse_qr_payload(codes.qr_payload)
            manual = parse_manual_code(codes.manual_code)
            assert verhoeff.is_valid(codes.manual_code)  # python-stdnum, as the SDK's Python tool checks it
            assert check_passcode(qr.passcode) == manual.passcode
            assert (qr.vendor_id, qr.product_id) == (ids.vendor_id, ids.product_id)
            assert qr.discriminator == commissioning.discriminator
            assert manual.discriminator == commissioning.discriminator >> 8
            recomputed = compute_verifier(
                qr.passcode, commissioning.verifier.salt, commissioning.verifier.iterations
            )
            assert commissioning.verifier.verifier == recomputed.verifier
            # The passcode is on no object of the board, in any usual encoding.
            passcode = qr.passcode
            forms = (str(passcode).encode(), passcode.to_bytes(4, "little"), passcode.to_bytes(4, "big"))
            for data in objects.values():
                assert not any(form in data for form in forms)
        # Fresh passcodes and discriminators per device.
        all_codes = [chain.onboarding_codes(LOT, r.device_id) for r in records.values()]
        assert len({c.qr_payload for c in all_codes if c is not None}) == expected


@pytest.mark.timeout(60)
async def test_a_native_matter_line_writes_every_object_and_seals_the_codes(tmp_path: Path) -> None:
    line = await make_line(tmp_path, profile="matter", boards=BOARDS)
    hub = line.hub(ports=2, supply=BOARDS)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": BOARDS})
    _check_line(line, list(hub.finished), tmp_path)


@pytest.mark.timeout(60)
async def test_an_mcumgr_matter_line_writes_every_object_and_seals_the_codes(tmp_path: Path) -> None:
    line = await make_line(tmp_path, profile="mcumgr", matter=True, boards=BOARDS)
    hub = line.hub(ports=2, supply=BOARDS, factory=lambda: SimMcumgrBoard(firmware_key=line.fw_public))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": BOARDS})
    _check_line(line, list(hub.finished), tmp_path)


def test_a_non_matter_lot_has_no_onboarding_codes(tmp_path: Path) -> None:
    import asyncio

    line = asyncio.run(make_line(tmp_path, boards=1))
    with Ledger.open(line.settings.ledger_url, onboarding_secret=line.passphrase) as ledger:
        assert ledger.onboarding_codes(LOT, "anything") is None
        assert not ledger.is_matter_lot(LOT)


@pytest.mark.timeout(90)
def _pinned_board(line: Line, seed: int) -> SimBoard:
    return SimBoard(
        firmware_key=line.fw_public,
        se=SimSecureElement(serial=seeded_se_serial(seed)),
        faults=FaultPlan.uniform(0.1, seed=seed, per_power_on=True),
    )


async def test_with_faults_the_sealed_codes_match_what_each_board_finally_holds(tmp_path: Path) -> None:
    """Retries (a new passcode per attempt) must never leave a board whose verifier the codes do not open."""
    boards = 6
    line = await make_line(tmp_path, profile="matter", boards=boards)
    seeds = iter(range(100, 200))
    hub = line.hub(
        ports=3,
        supply=boards,
        # Each board's serial is pinned to its seed: the serial enters the fault draws, so each replays.
        factory=lambda: _pinned_board(line, next(seeds)),
    )
    station = await line.run(hub, timeout_s=80, settings=line.without_attention())
    provisioned = station.outcomes["provisioned"]
    assert provisioned >= 1
    # The faults really happened, and some of them during the write phase (where the passcode changes).
    injected = sum(sum(board.injected.values()) for board in hub.finished)
    assert injected >= 3, injected
    _check_line(line, list(hub.finished), tmp_path, expected=provisioned)
