"""arduino-v1 and nrf91-at lines through the line's signer: the signer applies each profile's own CSR rules.

The signer is a real process (``python -m factoryd signer run``, mutual TLS on loopback), the ledger a
throwaway PostgreSQL database, the station a real daemon whose boards (Arduino's sketch, nRF91 modems
on stock AT firmware) are simulated behind real PTYs. Refused requests are sent with a real HTTPS client
and the station's own client certificate. The certificates on the boards are checked with openssl.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import Session, select

from factoryd.demo import simulated_operator
from factoryd.jobs.profiles import board_profile
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.core import verify_audit_chains
from factoryd.ledger.errors import DeviceStateError
from factoryd.ledger.issuance import open_issuance_ledger
from factoryd.ledger.model import DeviceState
from factoryd.ledger.tables import AuditEntryRow
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.pki.testca import TestPki, make_test_pki
from factoryd.protocol.nrf91 import CredentialType
from factoryd.service import StationPaths, parse_bundle, prepare_state_dir, store_bundle
from factoryd.signer.lineca import init_line_ca, issue_signer_cert
from factoryd.sim.arduino import SimArduinoBoard
from factoryd.sim.hub import SimHub
from factoryd.sim.nrf91 import SimNrf91Modem, cose_sign1, sec_tag_bstr, with_null_parameter
from factoryd.sim.secure_element import SimSecureElement
from tests.helpers.openssl import openssl
from tests.helpers.signer import LOOPBACK, LOT, SignerLine, SignerProcess, free_port, run_station

pytestmark = pytest.mark.postgres

PORTS = 3
BOARDS = 4
STATION = "st-a"
SEC_TAG = 16_842_753  # the lot profile's default nRF91 security tag
MODEM_CSR_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database per test."""
    with throwaway_postgres_database() as url:
        yield url


def make_profile_line(root: Path, ledger_url: str, profile: LotProfile, *, ids: int) -> SignerLine:
    """An active lot of ``profile`` on ``ledger_url``, its CA in the signer's state directory only."""
    signer_state = root / "signer-state"
    paths = StationPaths(signer_state)
    prepare_state_dir(paths)
    passphrase = secrets.token_urlsafe(16).encode()
    upload = secrets.token_urlsafe(16).encode()
    pki = make_test_pki(profile_kind=board_profile(profile.protocol).cert_kind, passphrase=upload)
    with Ledger.open(ledger_url) as ledger:
        ledger.create_lot(LOT, customer="ACME", profile=profile, target_quantity=ids, actor="test")
        store_bundle(paths, passphrase, LOT, parse_bundle(pki.pkcs12, upload, ledger.get_lot(LOT)))
        ledger.import_ids(LOT, "\n".join(str(uuid.uuid4()) for _ in range(ids)).encode(), actor="test")
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="test")
    ca = init_line_ca(signer_state / "signer" / "line-ca", passphrase, name="test line CA")
    cert, key = issue_signer_cert(ca, [LOOPBACK, "localhost"], signer_state / "signer" / "tls")
    return SignerLine(
        root=root,
        ledger_url=ledger_url,
        passphrase=passphrase,
        fw_public=ec.generate_private_key(ec.SECP256R1()).public_key(),  # no firmware is flashed
        signer_state=signer_state,
        line_ca_cert=ca.cert_path,
        signer_cert=cert,
        signer_key=key,
        port=free_port(),
        pki=pki,
    )


def _pki(line: SignerLine) -> TestPki:
    if line.pki is None:
        raise AssertionError("the line has no customer PKI")
    return line.pki


def _audit(url: str, action: str) -> list[dict[str, Any]]:
    with Ledger.open(url) as ledger, Session(ledger._engine) as session:
        rows = session.exec(select(AuditEntryRow).where(AuditEntryRow.action == action)).all()
        return [{"actor": row.actor, **json.loads(row.details)} for row in rows]


def _openssl_verifies(tmp: Path, pki: TestPki, cert_der: bytes) -> None:
    """openssl (the vendor oracle) verifies the certificate to the lot's root through its issuing CA."""
    pem = serialization.Encoding.PEM
    (tmp / "root.pem").write_bytes(pki.root_cert.public_bytes(pem))
    (tmp / "issuing.pem").write_bytes(pki.issuing_cert.public_bytes(pem))
    (tmp / "device.der").write_bytes(cert_der)
    converted = openssl(
        "x509", "-inform", "DER", "-in", str(tmp / "device.der"), "-out", str(tmp / "device.pem")
    )
    assert converted.returncode == 0, converted.stderr
    result = openssl(
        "verify",
        "-CAfile",
        str(tmp / "root.pem"),
        "-untrusted",
        str(tmp / "issuing.pem"),
        str(tmp / "device.pem"),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _check_signed_line(line: SignerLine, *, expect: int) -> dict[str, bytes]:
    """Every provisioned ID carries the one certificate the signer recorded as standing for it."""
    ledger = open_issuance_ledger(line.ledger_url)
    try:
        ledger.verify_audit()
        records = ledger.issuances(LOT)
        provisioned = {d.device_id: d for d in ledger.provisioned_devices(LOT)}
    finally:
        ledger.close()
    assert len(provisioned) == expect
    standing = {r.fingerprint_sha256: r for r in records if r.current}
    for device_id, device in provisioned.items():
        signed = standing.get(device.fingerprint_sha256)
        assert signed is not None, f"{device_id}: recorded a certificate the signer did not sign"
        assert (signed.device_id, signed.hw_serial, signed.station) == (device_id, device.hw_serial, STATION)
    # The signer audited each certificate it signed, as its own actor.
    issued = _audit(line.ledger_url, "cert.issued")
    assert {entry["fingerprint_sha256"] for entry in issued} == {r.fingerprint_sha256 for r in records}
    assert {entry["actor"] for entry in issued} == {"signer-1"}
    return {device_id: device.cert_der for device_id, device in provisioned.items()}


class SignerClientOf:
    """Requests to the signer as a station sends them, with that station's client certificate."""

    def __init__(self, line: SignerLine, station: str) -> None:
        self._line = line
        self._station = station

    def reserve(self, serial: str) -> tuple[str, int]:
        """A real reservation by the station: (device ID, job id)."""
        with Ledger.open(self._line.ledger_url) as ledger:
            job = ledger.start_job(LOT, station=self._station, port="p9", hw_serial=serial)
            reservation = ledger.reserve(
                LOT, serial, station=self._station, port="p9", job_id=job, actor="test"
            )
        return reservation.device_id, job

    def issue(
        self,
        *,
        device_id: str,
        serial: str,
        job: int,
        csr_der: bytes,
        point: bytes,
        cose: bytes | None = None,
    ) -> httpx.Response:
        """POST one certificate request."""
        body: dict[str, Any] = {
            "request_id": secrets.token_hex(16),
            "lot": LOT,
            "device_id": device_id,
            "hw_serial": serial,
            "job_id": job,
            "csr": base64.b64encode(csr_der).decode(),
            "key": base64.b64encode(point).decode(),
        }
        if cose is not None:
            body["keygen_attestation"] = base64.b64encode(cose).decode()
        with self._line.client(self._station) as client:
            return client.post("/v1/certificates", json=body)


def _csr(key: ec.EllipticCurvePrivateKey, cn: str, *extensions: x509.ExtensionType) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _keygen_cose(identity: ec.EllipticCurvePrivateKey, device_uuid: bytes, csr_der: bytes) -> bytes:
    """The COSE_Sign1 a modem's %KEYGEN sends with its CSR (NRF91_AT.md), signed by ``identity``."""
    payload = cbor2.dumps(
        cbor2.CBORTag(
            55799,
            [
                9,
                device_uuid,
                sec_tag_bstr(SEC_TAG),
                hashlib.sha256(csr_der).digest(),
                secrets.token_bytes(16),
            ],
        )
    )
    return cose_sign1(identity, payload)


def _refused(response: httpx.Response, code: str, words: str) -> None:
    assert response.status_code == httpx.codes.FORBIDDEN, response.text
    body = response.json()
    assert body["code"] == code, body
    assert words in body["message"], body


def _refusals(url: str) -> list[tuple[str, str]]:
    return [(entry["code"], entry["message"]) for entry in _audit(url, "signer.refused")]


def _signed_count(url: str) -> int:
    ledger = open_issuance_ledger(url)
    try:
        return len(ledger.issuances(LOT))
    finally:
        ledger.close()


async def test_an_arduino_line_provisions_through_the_signer_with_the_sketchs_template(
    tmp_path: Path, pg_url: str
) -> None:
    line = make_profile_line(tmp_path, pg_url, LotProfile(protocol="arduino-v1"), ids=BOARDS + 4)
    boards: list[SimArduinoBoard] = []

    def board() -> SimArduinoBoard:
        made = SimArduinoBoard(se=SimSecureElement(), usb_serial=secrets.token_hex(8).upper())
        boards.append(made)
        return made

    signer = SignerProcess(line)
    signer.start()
    try:
        settings = line.station_settings(STATION, tmp_path / STATION, ports=PORTS)
        hub = SimHub(PORTS, board, supply=BOARDS)
        station = await run_station(settings, hub, line.passphrase, on_ready=simulated_operator, timeout_s=40)
        assert station.outcomes["provisioned"] == BOARDS, station.outcomes
        recorded = _check_signed_line(line, expect=BOARDS)
        # What each board rebuilds from its slots is, byte for byte, the certificate the signer signed.
        rebuilt = sorted(b.rebuilt_certificate() for b in boards)
        assert rebuilt == sorted(recorded.values())
        _openssl_verifies(tmp_path, _pki(line), rebuilt[0])

        # Refused, audited, nothing signed: a CSR for another ID's CN, and one the sketch never makes.
        client = SignerClientOf(line, STATION)
        before = _signed_count(pg_url)
        key = ec.generate_private_key(ec.SECP256R1())
        serial = "usb:" + secrets.token_hex(8)
        device_id, job = client.reserve(serial)
        other = str(uuid.uuid4())
        _refused(
            client.issue(
                device_id=device_id, serial=serial, job=job, csr_der=_csr(key, other), point=_point(key)
            ),
            "csr_rejected",
            "common name",
        )
        # The nRF91 modem's keyUsage request is tolerated for nrf91-at lots only.
        with_usage = _csr(key, device_id, MODEM_CSR_KEY_USAGE)
        _refused(
            client.issue(device_id=device_id, serial=serial, job=job, csr_der=with_usage, point=_point(key)),
            "csr_rejected",
            "disallowed extension",
        )
        assert _signed_count(pg_url) == before
        codes = [code for code, _ in _refusals(pg_url)]
        assert codes.count("csr_rejected") == 2
        # The same request, within the rules, is signed: the refusals were the rules'.
        good = client.issue(
            device_id=device_id, serial=serial, job=job, csr_der=_csr(key, device_id), point=_point(key)
        )
        assert good.status_code == httpx.codes.OK, good.text
    finally:
        signer.stop()


async def test_an_nrf91_line_provisions_through_the_signer_with_the_modems_rules(
    tmp_path: Path, pg_url: str
) -> None:
    # Every other modem sends its CSR with a NULL parameter (some modem firmware does).
    modems = [SimNrf91Modem(null_param=n % 2 == 1) for n in range(BOARDS)]
    listed = SimNrf91Modem()  # a listed modem that is not on the line: its identity key signs below
    keys = {
        m.device_uuid.hex(): m.identity_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        for m in [*modems, listed]
    }
    profile = LotProfile(protocol="nrf91-at", nrf91_identity_keys=keys)
    line = make_profile_line(tmp_path, pg_url, profile, ids=BOARDS + 4)
    supply = iter(modems)
    signer = SignerProcess(line)
    signer.start()
    try:
        settings = line.station_settings(STATION, tmp_path / STATION, ports=PORTS)
        hub = SimHub(PORTS, lambda: next(supply), supply=BOARDS)
        station = await run_station(settings, hub, line.passphrase, on_ready=simulated_operator, timeout_s=40)
        assert station.outcomes["provisioned"] == BOARDS, station.outcomes
        recorded = _check_signed_line(line, expect=BOARDS)
        for modem in modems:
            stored = modem.credential(SEC_TAG, CredentialType.CLIENT_CERT)
            assert stored is not None
            cert = x509.load_pem_x509_certificate(stored)
            assert cert.public_bytes(serialization.Encoding.DER) in recorded.values()
            key = cert.public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey)
            assert key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            ) == modem.key_public_point(SEC_TAG)
        _openssl_verifies(tmp_path, _pki(line), next(iter(recorded.values())))

        client = SignerClientOf(line, STATION)
        serial = "imei:490154203237518"
        device_id, job = client.reserve(serial)
        before = _signed_count(pg_url)
        key = ec.generate_private_key(ec.SECP256R1())
        point = _point(key)

        def modem_csr(cn: str, *extensions: x509.ExtensionType) -> bytes:
            return with_null_parameter(_csr(key, cn, MODEM_CSR_KEY_USAGE, *extensions))

        wrong_cn = modem_csr(str(uuid.uuid4()))
        _refused(
            client.issue(
                device_id=device_id,
                serial=serial,
                job=job,
                csr_der=wrong_cn,
                point=point,
                cose=_keygen_cose(listed.identity_key, listed.device_uuid, wrong_cn),
            ),
            "csr_rejected",
            "common name",
        )
        # Breaking the nRF91 rules: an extension besides keyUsage; no %KEYGEN attestation; one signed
        # by an identity key the lot does not list for that device.
        san = modem_csr(device_id, x509.SubjectAlternativeName([x509.DNSName("evil.example")]))
        _refused(
            client.issue(
                device_id=device_id,
                serial=serial,
                job=job,
                csr_der=san,
                point=point,
                cose=_keygen_cose(listed.identity_key, listed.device_uuid, san),
            ),
            "csr_rejected",
            "disallowed extension",
        )
        good_csr = modem_csr(device_id)
        _refused(
            client.issue(device_id=device_id, serial=serial, job=job, csr_der=good_csr, point=point),
            "csr_rejected",
            "without its %KEYGEN attestation",
        )
        forged = _keygen_cose(ec.generate_private_key(ec.SECP256R1()), listed.device_uuid, good_csr)
        _refused(
            client.issue(
                device_id=device_id, serial=serial, job=job, csr_der=good_csr, point=point, cose=forged
            ),
            "csr_rejected",
            "does not verify with the identity key",
        )
        # An attestation of other CSR bytes (the station swapped the CSR): not the modem's.
        other = _keygen_cose(listed.identity_key, listed.device_uuid, modem_csr(device_id))
        _refused(
            client.issue(
                device_id=device_id, serial=serial, job=job, csr_der=good_csr, point=point, cose=other
            ),
            "csr_rejected",
            "SHA-256",
        )
        assert _signed_count(pg_url) == before
        messages = [message for code, message in _refusals(pg_url) if code == "csr_rejected"]
        assert len(messages) == 5
        assert any("%KEYGEN attestation" in message for message in messages)
        # Within the rules (keyUsage requested, NULL parameter, the listed modem's attestation): signed.
        good = client.issue(
            device_id=device_id,
            serial=serial,
            job=job,
            csr_der=good_csr,
            point=point,
            cose=_keygen_cose(listed.identity_key, listed.device_uuid, good_csr),
        )
        assert good.status_code == httpx.codes.OK, good.text
        cert = x509.load_der_x509_certificate(base64.b64decode(good.json()["certificate"]))
        assert (
            cert.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            == point
        )
        # The certificate gets the lot's keyUsage, not the one the modem asked for.
        assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    finally:
        signer.stop()


def _local_certificate(pki: TestPki, device_id: str) -> x509.Certificate:
    """A certificate made with a copy of the lot's CA key (what root on a station might hold)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(pki.issuing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(pki.issuing_key, hashes.SHA256())
    )


def _mark(ledger: Ledger, lot: str, device_id: str, serial: str, cert: x509.Certificate) -> None:
    der = cert.public_bytes(serialization.Encoding.DER)
    ledger.mark_provisioned(
        lot,
        device_id,
        serial,
        cert_der=der,
        cert_serial=f"{cert.serial_number:x}",
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        station=STATION,
        port="p9",
        actor="test",
    )


def test_a_signer_lot_records_only_the_certificate_the_signer_stands_by(tmp_path: Path, pg_url: str) -> None:
    line = make_profile_line(tmp_path, pg_url, LotProfile(protocol="factoryd-v1"), ids=6)
    # A second lot the signer never sees: its stations record what they issue, as before.
    with Ledger.open(pg_url) as ledger:
        ledger.create_lot(
            "local-lot",
            customer="ACME",
            profile=LotProfile(protocol="factoryd-v1"),
            target_quantity=1,
            actor="test",
        )
        ledger.import_ids("local-lot", str(uuid.uuid4()).encode(), actor="test")
        ledger.set_lot_state("local-lot", LotState.ACTIVE, actor="test")
    signer = SignerProcess(line)
    signer.start()
    try:
        # A station opens the lot through the signer: from then on the lot is the signer's.
        with line.client(STATION) as http:
            assert http.get(f"/v1/lots/{LOT}").status_code == httpx.codes.OK
        client = SignerClientOf(line, STATION)
        serial = "se:" + secrets.token_hex(9)
        device_id, job = client.reserve(serial)
        pki = _pki(line)
        with Ledger.open(pg_url) as ledger:
            # The ledger remembers the head of its chain, so the provision and its audit link go as one
            # statement (ledger/hot.py ``provision_and_append``): refused, it appends nothing either.
            ledger.audit(actor="test", action="note", subject=device_id, details={})
            # Before the signer signed anything for the lot: a certificate of a CA-key copy is refused.
            with pytest.raises(DeviceStateError, match="not the one the line's signer signed"):
                _mark(ledger, LOT, device_id, serial, _local_certificate(pki, device_id))
            record = ledger.find_by_serial(LOT, serial)
            assert record is not None
            assert record.state is DeviceState.RESERVED
            assert not [e for e in _audit(pg_url, "id.provisioned") if e["hw_serial"] == serial]
            verify_audit_chains(ledger)
        # Two requests for the same reservation (a restarted job's new key): the first is superseded.
        signed = []
        for _ in range(2):
            key = ec.generate_private_key(ec.SECP256R1())
            response = client.issue(
                device_id=device_id, serial=serial, job=job, csr_der=_csr(key, device_id), point=_point(key)
            )
            assert response.status_code == httpx.codes.OK, response.text
            signed.append(x509.load_der_x509_certificate(base64.b64decode(response.json()["certificate"])))
        assert response.json()["supersedes"] == f"{signed[0].serial_number:x}"
        with Ledger.open(pg_url) as ledger:
            with pytest.raises(DeviceStateError, match="not the one the line's signer signed"):
                _mark(ledger, LOT, device_id, serial, signed[0])
            assert ledger.progress(LOT).provisioned == 0
            _mark(ledger, LOT, device_id, serial, signed[1])
            assert ledger.progress(LOT).provisioned == 1
            # The lot the signer does not manage records a locally issued certificate.
            other = ledger.reserve("local-lot", serial, station=STATION, port="p9", job_id=None, actor="test")
            _mark(ledger, "local-lot", other.device_id, serial, _local_certificate(pki, other.device_id))
            assert ledger.progress("local-lot").provisioned == 1
            ledger.verify_audit()
        assert len(_audit(pg_url, "id.provisioned")) == 2
    finally:
        signer.stop()
