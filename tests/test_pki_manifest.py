"""Signed manifest: canonical JSON, detached CMS, Python and openssl verification, tampering."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from factoryd.ledger import ProvisionedDevice
from factoryd.pki import (
    CertProfile,
    IssuedCertificate,
    Issuer,
    ManifestError,
    SoftwareSigner,
    build_manifest,
    verify_manifest,
)
from factoryd.pki.signer import CaPrivateKey, CaPublicKey
from factoryd.pki.testca import TestPki, make_ca_cert, make_test_pki

PROVISIONED_AT = dt.datetime(2026, 3, 7, 14, 0, tzinfo=dt.UTC)
GENERATED_AT = dt.datetime(2026, 3, 8, 9, 30, tzinfo=dt.UTC)
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=b"manifest-test")


def _issue(issuer: Issuer, device_id: str) -> IssuedCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    return issuer.issue(issuer.verify_csr(csr, device_id), device_id)


@dataclass(frozen=True)
class Device:
    """A provisioned device as the manifest sees it (any ManifestRecord; the ledger hands out one)."""

    device_id: str
    hw_serial: str
    cert_der: bytes
    cert_serial: str
    fingerprint_sha256: str
    provisioned_at: dt.datetime
    station: str
    port: str
    metadata: Mapping[str, object]


def _record(issued: IssuedCertificate, device_id: str, port: str = "1") -> Device:
    return Device(
        device_id=device_id,
        hw_serial=f"0123{int(port):012x}ee",
        cert_der=issued.der,
        cert_serial=issued.serial_hex,
        fingerprint_sha256=issued.fingerprint_sha256,
        provisioned_at=PROVISIONED_AT,
        station="line1-st2",
        port=port,
        metadata={"firmware": "1.4.2", "locked": True, "note": "Größe ✓"},
    )


@pytest.fixture(scope="module")
def records(pki: TestPki) -> list[Device]:
    issuer = Issuer(SoftwareSigner(pki.issuing_key, pki.issuing_cert), [pki.issuing_cert], CertProfile())
    ids = ["c-0003", "a-0001", "b-0002"]
    return [_record(_issue(issuer, device_id), device_id, str(port)) for port, device_id in enumerate(ids, 1)]


def _signer(pki: TestPki) -> SoftwareSigner:
    return SoftwareSigner(pki.issuing_key, pki.issuing_cert)


def _openssl_cms_verify(
    tmp_path: Path, content: bytes, signature: bytes, root_pem: bytes
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "manifest.json").write_bytes(content)
    (tmp_path / "manifest.p7s").write_bytes(signature)
    (tmp_path / "root.pem").write_bytes(root_pem)
    argv = [
        str(OPENSSL),
        "cms",
        "-verify",
        "-binary",
        "-content",
        str(tmp_path / "manifest.json"),
        "-inform",
        "DER",
        "-in",
        str(tmp_path / "manifest.p7s"),
        "-CAfile",
        str(tmp_path / "root.pem"),
        "-out",
        str(tmp_path / "verified.out"),
    ]
    return subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 - fixed argv


def test_manifest_round_trip(pki: TestPki, records: list[Device]) -> None:
    manifest = build_manifest(
        "LOT-7", records, _signer(pki), [pki.issuing_cert, pki.root_cert], now=GENERATED_AT
    )
    assert manifest.count == 3
    document = verify_manifest(manifest.json_bytes, manifest.signature_der, [pki.root_cert])
    assert document["schema_version"] == 1
    assert document["lot"] == "LOT-7"
    assert document["generated_at"] == "2026-03-08T09:30:00Z"
    assert document["count"] == 3
    assert [d["device_id"] for d in document["devices"]] == ["a-0001", "b-0002", "c-0003"]
    first = document["devices"][0]
    by_id = {r.device_id: r for r in records}
    assert first["cert_sha256"] == by_id["a-0001"].fingerprint_sha256
    assert first["provisioned_at"] == "2026-03-07T14:00:00Z"
    assert first["metadata"] == {"firmware": "1.4.2", "locked": True, "note": "Größe ✓"}
    # Canonical form: sorted keys, no whitespace, so the same input gives the same bytes.
    again = build_manifest(
        "LOT-7", list(reversed(records)), _signer(pki), [pki.issuing_cert], now=GENERATED_AT
    )
    assert again.json_bytes == manifest.json_bytes
    assert b'": ' not in manifest.json_bytes
    assert b'", "' not in manifest.json_bytes
    assert b"\n" not in manifest.json_bytes
    assert "Größe ✓".encode() in manifest.json_bytes  # UTF-8, not \u escapes


def test_manifest_tampering_is_detected(pki: TestPki, records: list[Device]) -> None:
    manifest = build_manifest("LOT-7", records, _signer(pki), [pki.issuing_cert, pki.root_cert])
    tampered = manifest.json_bytes.replace(b'"port":"2"', b'"port":"9"')
    assert tampered != manifest.json_bytes
    with pytest.raises(ManifestError, match="does not match the signed digest"):
        verify_manifest(tampered, manifest.signature_der, [pki.root_cert])
    broken_sig = bytearray(manifest.signature_der)
    broken_sig[-3] ^= 0x01
    with pytest.raises(ManifestError, match=r"does not verify|malformed"):
        verify_manifest(manifest.json_bytes, bytes(broken_sig), [pki.root_cert])
    with pytest.raises(ManifestError, match="malformed"):
        verify_manifest(manifest.json_bytes, manifest.signature_der[:-10], [pki.root_cert])
    other = make_test_pki(passphrase=b"other")
    with pytest.raises(ManifestError, match="does not chain to a trusted root"):
        verify_manifest(manifest.json_bytes, manifest.signature_der, [other.root_cert])


def test_manifest_signed_by_another_ca_is_refused(pki: TestPki, records: list[Device]) -> None:
    other = make_test_pki(passphrase=b"other")
    forged = build_manifest("LOT-7", records, _signer(other), [other.issuing_cert, other.root_cert])
    with pytest.raises(ManifestError, match="does not chain to a trusted root"):
        verify_manifest(forged.json_bytes, forged.signature_der, [pki.root_cert])


def test_manifest_refuses_inconsistent_records(pki: TestPki, records: list[Device]) -> None:
    signer = _signer(pki)
    with pytest.raises(ManifestError, match="appears twice"):
        build_manifest("LOT-7", [records[0], records[0]], signer, [pki.issuing_cert])
    wrong_fp = replace(records[0], fingerprint_sha256="00" * 32)
    with pytest.raises(ManifestError, match="fingerprint does not match"):
        build_manifest("LOT-7", [wrong_fp], signer, [pki.issuing_cert])
    naive = replace(records[0], provisioned_at=dt.datetime(2026, 1, 1))
    with pytest.raises(ManifestError, match="timezone-aware"):
        build_manifest("LOT-7", [naive], signer, [pki.issuing_cert])
    bad_meta = replace(records[0], metadata={"x": float("nan")})
    with pytest.raises(ManifestError, match="not plain JSON"):
        build_manifest("LOT-7", [bad_meta], signer, [pki.issuing_cert])


def test_manifest_takes_the_ledgers_record_and_writes_pem_only_on_output(
    pki: TestPki, records: list[Device]
) -> None:
    source = records[0]
    device = ProvisionedDevice(
        device_id=source.device_id,
        lot="LOT-7",
        hw_serial=source.hw_serial,
        cert_der=source.cert_der,
        cert_serial=source.cert_serial,
        fingerprint_sha256=source.fingerprint_sha256,
        provisioned_at=source.provisioned_at,
        station=source.station,
        port=source.port,
        metadata={"firmware": "1.4.2"},
    )
    manifest = build_manifest("LOT-7", [device], _signer(pki), [pki.issuing_cert])
    (entry,) = verify_manifest(manifest.json_bytes, manifest.signature_der, [pki.issuing_cert])["devices"]
    pem = x509.load_der_x509_certificate(device.cert_der).public_bytes(serialization.Encoding.PEM)
    assert entry["cert_pem"] == pem.decode("ascii")
    assert (entry["device_id"], entry["hw_serial"], entry["station"], entry["port"]) == (
        device.device_id,
        device.hw_serial,
        device.station,
        device.port,
    )
    with pytest.raises(ManifestError, match="certificate DER does not parse"):
        build_manifest("LOT-7", [replace(device, cert_der=b"\x30\x03\x02\x01\x01")], _signer(pki), [])


def test_empty_manifest_is_valid(pki: TestPki) -> None:
    manifest = build_manifest("EMPTY", [], _signer(pki), [pki.issuing_cert, pki.root_cert])
    assert verify_manifest(manifest.json_bytes, manifest.signature_der, [pki.root_cert])["devices"] == []


@pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
def test_openssl_cms_verify_accepts_manifest(pki: TestPki, records: list[Device], tmp_path: Path) -> None:
    manifest = build_manifest("LOT-7", records, _signer(pki), [pki.issuing_cert, pki.root_cert])
    result = _openssl_cms_verify(tmp_path, manifest.json_bytes, manifest.signature_der, pki.root_pem)
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr
    assert (tmp_path / "verified.out").read_bytes() == manifest.json_bytes
    tampered = manifest.json_bytes.replace(b"a-0001", b"a-0009")
    result = _openssl_cms_verify(tmp_path, tampered, manifest.signature_der, pki.root_pem)
    assert result.returncode != 0


class TokenLikeSigner:
    """A Signer that only exposes the protocol (no private key object), as a PKCS#11 token would."""

    def __init__(self, key: CaPrivateKey, certificate: x509.Certificate) -> None:
        self._inner = SoftwareSigner(key, certificate)

    @property
    def blocking(self) -> bool:
        return True  # as a token's signing calls do

    @property
    def certificate(self) -> x509.Certificate:
        return self._inner.certificate

    @property
    def public_key(self) -> CaPublicKey:
        return self._inner.public_key

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return self._inner.sign_certificate(builder)

    def sign_bytes(self, data: bytes) -> bytes:
        return self._inner.sign_bytes(data)


def _ca_with_key(key: CaPrivateKey) -> tuple[x509.Certificate, x509.Certificate]:
    """A root and an issuing CA holding ``key`` (returns issuing, root)."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Alt Root")])
    root = make_ca_cert(
        root_name, root_key, serial=7, not_before=start, not_after=start + dt.timedelta(days=900)
    )
    issuing = make_ca_cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Alt Issuing")]),
        key,
        issuer=root,
        issuer_key=root_key,
        serial=8,
        not_before=start,
        not_after=start + dt.timedelta(days=800),
        path_length=0,
    )
    return issuing, root


@pytest.mark.parametrize("key_kind", ["p256-token", "p384", "p384-token", "rsa2048", "rsa2048-token"])
def test_manifest_with_other_keys_and_token_signers(
    key_kind: str, records: list[Device], tmp_path: Path
) -> None:
    key: CaPrivateKey
    if key_kind.startswith("rsa"):
        key = rsa.generate_private_key(65537, 2048)
    elif key_kind.startswith("p384"):
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    issuing, root = _ca_with_key(key)
    signer = TokenLikeSigner(key, issuing) if key_kind.endswith("token") else SoftwareSigner(key, issuing)
    manifest = build_manifest("LOT-ALT", records, signer, [issuing, root])
    document = verify_manifest(manifest.json_bytes, manifest.signature_der, [root])
    assert document["ca"]["subject"] == "CN=Alt Issuing"
    with pytest.raises(ManifestError):
        verify_manifest(manifest.json_bytes + b" ", manifest.signature_der, [root])
    if OPENSSL is not None:
        root_pem = root.public_bytes(serialization.Encoding.PEM)
        result = _openssl_cms_verify(tmp_path, manifest.json_bytes, manifest.signature_der, root_pem)
        assert result.returncode == 0, result.stderr


def test_verify_refuses_non_canonical_json(pki: TestPki, records: list[Device]) -> None:
    # A correctly signed but non-canonical document (e.g. from another tool) is refused.
    pretty = json.dumps({"schema_version": 1, "devices": [], "count": 0}, indent=1).encode()
    from factoryd.pki.manifest import sign_detached

    signature = sign_detached(pretty, _signer(pki), [pki.issuing_cert])
    with pytest.raises(ManifestError, match="canonical"):
        verify_manifest(pretty, signature, [pki.root_cert])
