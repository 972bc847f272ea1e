"""Genuine parts only, end to end: a lot requiring attestation on the real pipeline and simulated boards.

Each impostor of ``sim.board.Impostor`` must be refused before an ID is reserved, with its own
reason, audited as ``board.refused``, without moving the lot's ID counts or sending the port to
ATTENTION; genuine boards provision with the attested key, and the evidence reaches the audit trail.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger
from factoryd.ledger.tables import AuditEntryRow
from factoryd.protocol.messages import ObjectId
from factoryd.sim.board import IMPOSTOR_REASONS, Impostor, SimBoard, equip_attestation
from factoryd.sim.secure_element import SimVendorCa
from tests.helpers.station import LOT, Line, make_line


def _audit(ledger: Ledger, action: str) -> list[tuple[str, dict[str, object]]]:
    with Session(ledger._engine) as session:
        rows = session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all()
        return [(row.subject, json.loads(row.details)) for row in rows if row.action == action]


def _vendor(line: Line) -> SimVendorCa:
    # The demo's set-up stored this vendor's root as the lot's attestation root (same seed, same keys).
    return SimVendorCa.make(seed=line.options.seed)


def _genuine(line: Line) -> SimBoard:
    return equip_attestation(line.board(), _vendor(line))


async def test_genuine_boards_provision_with_the_attested_key(tmp_path: Path) -> None:
    line = await make_line(tmp_path, attestation=True)
    hub = line.hub(ports=2, supply=4, factory=lambda: _genuine(line))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 4})
    with line.ledger() as ledger:
        attested = _audit(ledger, "board.attested")
        issued = _audit(ledger, "cert.issued")
    assert sorted(subject for subject, _ in attested) == sorted(b.serial_hex for b in hub.finished)
    for board in hub.finished:
        # One key in the slot: the attested one is the one certified (no second GENKEY).
        assert board.se.objects[ObjectId.DEVICE_CERT]
        leaf = board.se.attestation_chain[0]
        details = next(d for s, d in attested if s == board.serial_hex)
        assert details["attestation_cert_sha256"] == hashlib.sha256(leaf).hexdigest()
        assert "Attestation Signer" in str(details["attestation_issuer"])
    # The evidence also rides on each cert.issued entry, for the customer's manifest.
    assert all(isinstance(d.get("genuineness"), dict) for _, d in issued)


@pytest.mark.parametrize("impostor", list(Impostor))
async def test_each_impostor_is_refused_before_reservation(tmp_path: Path, impostor: Impostor) -> None:
    line = await make_line(tmp_path, attestation=True)
    vendor = _vendor(line)
    genuine = _genuine(line)
    board = equip_attestation(line.board(), vendor, impostor, copied_serial=genuine.se.serial)
    with line.ledger() as ledger:
        before = ledger.progress(LOT)
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)

    def finished(station: object) -> bool:
        return bool(station.results)  # type: ignore[attr-defined]

    station = await line.run(hub, finished)
    [result] = station.results
    assert (result.outcome, result.reason) == ("refused", IMPOSTOR_REASONS[impostor])
    assert ObjectId.DEVICE_ID not in board.se.objects
    with line.ledger() as ledger:
        after = ledger.progress(LOT)
        refused = _audit(ledger, "board.refused")
    # No ID consumed: nothing reserved, nothing provisioned, nothing voided.
    assert (after.available, after.reserved, after.provisioned, after.void) == (
        before.available, 0, 0, before.void,
    )  # fmt: skip
    [(subject, details)] = refused
    assert subject == result.hw_serial
    assert details["reason"] == IMPOSTOR_REASONS[impostor]
    assert details["port"] == "1"
    assert details["device_id"] is None
    # One fake says nothing about the fixture.
    assert station.ports["1"].failures_in_row == 0


async def test_a_stream_of_fakes_does_not_stop_the_port(tmp_path: Path) -> None:
    line = await make_line(tmp_path, attestation=True)
    vendor = _vendor(line)
    hub = line.hub(
        ports=1, supply=5, factory=lambda: equip_attestation(line.board(), vendor, Impostor.FORGED)
    )
    station = await line.run(hub)
    assert station.outcomes == Counter({"refused": 5})
    assert station.ports["1"].attention is None
    with line.ledger() as ledger:
        assert ledger.progress(LOT).reserved == 0


async def test_impostors_stop_the_port_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = await make_line(tmp_path, attestation=True)
    vendor = _vendor(line)
    clone = Impostor.CLONE
    hub = line.hub(ports=1, supply=5, factory=lambda: equip_attestation(line.board(), vendor, clone))
    # The daemon does not pass the switch from the config yet: every Station of this test sets it.
    original = Station.__init__

    def init(self: Station, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        self.impostors_need_attention = True

    monkeypatch.setattr(Station, "__init__", init)

    def stuck(station: Station) -> bool:
        control = station.ports["1"]
        return control.attention is not None and not control.busy

    station = await line.run(hub, stuck)
    assert "3 boards failed in a row" in (station.ports["1"].attention or "")


async def test_a_lot_without_attestation_still_uses_genkey(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    hub = line.hub(ports=1, supply=1, factory=lambda: _genuine(line))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    with line.ledger() as ledger:
        assert _audit(ledger, "board.attested") == []
