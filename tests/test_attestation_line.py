"""Genuine parts only, end to end: a lot requiring attestation on the real pipeline and simulated boards.

Each impostor of ``sim.board.Impostor`` must be refused before an ID is reserved, with its own
reason, audited as ``board.refused``, without moving the lot's ID counts or sending the port to
ATTENTION; genuine boards provision with the attested key, and the evidence reaches the audit trail.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, col, select

from factoryd.demo import DemoOptions, run_demo
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger
from factoryd.ledger.tables import AuditEntryRow
from factoryd.pki.attestation import GENUINENESS_REASONS
from factoryd.pki.manifest import verify_manifest
from factoryd.pki.parts import PartsStore, sign_parts_entry, verify_parts_manifest
from factoryd.pki.store import BundleStore
from factoryd.pki.testca import make_ca_cert
from factoryd.protocol.messages import ObjectId
from factoryd.service import StationPaths, export_manifest
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
    # The evidence also rides on each cert.issued entry, and from there into the customer's manifest.
    evidence = {subject: d["genuineness"] for subject, d in issued}
    assert all(isinstance(e, dict) and e["method"] == "attestation" for e in evidence.values())
    paths = StationPaths(line.settings.station.state_dir)
    bundle = BundleStore(paths.bundles, line.passphrase).load(LOT)
    with line.ledger() as ledger:
        manifest = export_manifest(ledger, paths, line.passphrase, LOT)  # what `manifest export` writes
    document = verify_manifest(manifest.json_bytes, manifest.signature_der, [bundle.root])
    assert len(document["devices"]) == 4
    for device in document["devices"]:
        assert device["genuineness"] == evidence[device["device_id"]]


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


# Pre-registered parts (a vendor's parts manifest) ---------------------------------------------------


def _registered_board(line: Line) -> SimBoard:
    """A Trust&GO-style part: its identity key made at the vendor, before it reaches the line."""
    board = line.board()
    board.se.genkey(0)
    return board


def _register(line: Line, boards: list[SimBoard]) -> None:
    """Store the lot's parts manifest, as `factoryd lots parts` does after verifying it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Test Manifest Signer")])
    now = dt.datetime.now(dt.UTC)
    signer = make_ca_cert(
        name, key, serial=5, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=9)
    )
    entries = [sign_parts_entry(b.serial_hex, b.se.public_point(0), key, signer) for b in boards]
    parts = verify_parts_manifest(json.dumps(entries).encode(), [signer])
    PartsStore(StationPaths(line.settings.station.state_dir).attestation).save(LOT, parts)


async def test_registered_parts_provision_with_their_own_key(tmp_path: Path) -> None:
    line = await make_line(tmp_path, attestation=True)
    boards = [_registered_board(line) for _ in range(3)]
    keys = {b.serial_hex: b.se.public_point(0) for b in boards}
    _register(line, boards)
    supply = iter(boards)
    hub = line.hub(ports=2, supply=3, factory=lambda: next(supply))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 3})
    for board in hub.finished:
        # No GENKEY: the certificate carries the key the vendor registered.
        cert = x509.load_der_x509_certificate(board.se.objects[ObjectId.DEVICE_CERT])
        point = cert.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        assert point == keys[board.serial_hex]
    with line.ledger() as ledger:
        attested = _audit(ledger, "board.attested")
    assert {d["method"] for _, d in attested} == {"parts_manifest"}
    assert all(len(str(d["parts_entry_id"])) == 64 for _, d in attested)


@pytest.mark.parametrize("kind", ["unregistered", "wrong_key"])
async def test_unregistered_or_rekeyed_parts_are_refused(tmp_path: Path, kind: str) -> None:
    line = await make_line(tmp_path, attestation=True)
    registered = _registered_board(line)
    _register(line, [registered])
    board = _registered_board(line)
    if kind == "wrong_key":
        board.claimed_serial = registered.se.serial  # a registered serial, but its own key
    with line.ledger() as ledger:
        before = ledger.progress(LOT)
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)

    def finished(station: Station) -> bool:
        return bool(station.results)

    station = await line.run(hub, finished)
    [result] = station.results
    expected = "attestation_unregistered" if kind == "unregistered" else "attestation_key"
    assert (result.outcome, result.reason) == ("refused", expected)
    with line.ledger() as ledger:
        after = ledger.progress(LOT)
    assert (after.available, after.reserved) == (before.available, 0)


async def test_demo_with_attestation_refuses_its_impostors(tmp_path: Path) -> None:
    result = await run_demo(
        DemoOptions(ports=4, boards=24, attestation=True, impostor_rate=0.3, seed=3, state_dir=tmp_path)
    )
    refused = {b.serial: b for b in result.boards if b.outcome == "refused"}
    assert refused, "the demo's supply had no impostor"
    assert all(b.reason is not None and b.reason.startswith("attestation_") for b in refused.values())
    # Impostors took no ID: every ID the lot consumed is on a genuine, provisioned board.
    assert result.lot_provisioned == result.provisioned == result.manifest_count
    # Failed counts the refused too (a clone on a serial in flight fails as a lying board).
    assert result.provisioned + result.jobs.failed == 24
    assert set(result.failures) <= {*GENUINENESS_REASONS, "identity_mismatch"}
    assert result.duplicate_ids == 0
