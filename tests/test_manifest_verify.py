"""`factoryd manifest verify`: the customer's check of a manifest, without a station."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from factoryd.cli.main import app
from factoryd.ledger import ProvisionedDevice
from factoryd.pki import CertProfile, Issuer, SoftwareSigner, build_manifest
from factoryd.pki.manifest import canonical_json, sign_detached
from factoryd.pki.manifest_check import check_manifest
from factoryd.pki.testca import TestPki, make_test_pki

runner = CliRunner()
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=b"verify-test")


def _signer(pki: TestPki) -> SoftwareSigner:
    return SoftwareSigner(pki.issuing_key, pki.issuing_cert)


def _chain(pki: TestPki) -> tuple[x509.Certificate, ...]:
    return (pki.issuing_cert, pki.root_cert)


def _device(issuer: Issuer, device_id: str) -> ProvisionedDevice:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    issued = issuer.issue(issuer.verify_csr(csr, device_id), device_id)
    return ProvisionedDevice(
        device_id=device_id,
        lot="lot-v",
        hw_serial=f"hw-{device_id}",
        cert_der=issued.der,
        cert_serial=issued.serial_hex,
        fingerprint_sha256=issued.fingerprint_sha256,
        provisioned_at=NOW,
        station="st1",
        port="1",
        metadata={},
    )


@pytest.fixture(scope="module")
def signed(pki: TestPki) -> tuple[bytes, bytes]:
    issuer = Issuer(_signer(pki), _chain(pki), CertProfile())
    records = [_device(issuer, f"dev-{n}") for n in range(3)]
    manifest = build_manifest("lot-v", records, _signer(pki), _chain(pki))
    return manifest.json_bytes, manifest.signature_der


def _resign(pki: TestPki, document: dict[str, Any]) -> tuple[bytes, bytes]:
    """A changed document signed by the real CA: only the content checks can catch it."""
    content = canonical_json(document)
    return content, sign_detached(content, _signer(pki), _chain(pki))


def _failed(report_lines: list[str]) -> set[str]:
    return {line.split(":")[0] for line in report_lines if ": FAILED" in line}


def test_a_good_manifest_passes_every_check(pki: TestPki, signed: tuple[bytes, bytes]) -> None:
    report = check_manifest(*signed, [pki.root_cert])
    assert report.ok, report.lines()
    assert [c.name for c in report.checks] == [
        "signature",
        "document",
        "ca",
        "certificates",
        "unique",
        "counts",
        "revoked",
    ]
    assert report.devices == 3
    assert report.lines()[-1] == "lot lot-v: 3 provisioned, 0 revoked: manifest OK"


def test_one_altered_byte_is_refused(pki: TestPki, signed: tuple[bytes, bytes]) -> None:
    content, signature = signed
    position = content.index(b"dev-1")
    altered = content[:position] + b"dev-7" + content[position + 5 :]
    report = check_manifest(altered, signature, [pki.root_cert])
    assert not report.ok
    assert "signature" in _failed(report.lines())
    assert "modified" in report.checks[0].detail


def test_a_foreign_signature_is_refused(pki: TestPki, signed: tuple[bytes, bytes]) -> None:
    other = make_test_pki(passphrase=b"other")
    content, _ = signed
    foreign = sign_detached(
        content, SoftwareSigner(other.issuing_key, other.issuing_cert), [other.issuing_cert]
    )
    report = check_manifest(content, foreign, [pki.root_cert])
    assert not report.ok
    assert _failed(report.lines()) >= {"signature", "ca"}
    # Against the foreign CA's own root the signature verifies, but the manifest names our CA.
    report = check_manifest(content, foreign, [other.root_cert])
    assert _failed(report.lines()) >= {"ca", "certificates"}


def test_a_duplicate_id_is_refused(pki: TestPki, signed: tuple[bytes, bytes]) -> None:
    document = json.loads(signed[0])
    document["devices"][1]["device_id"] = document["devices"][0]["device_id"]
    report = check_manifest(*_resign(pki, document), [pki.root_cert])
    assert _failed(report.lines()) == {"unique"}
    assert "device IDs listed twice: dev-0" in report.checks[4].detail


def test_a_duplicate_serial_is_refused(pki: TestPki, signed: tuple[bytes, bytes]) -> None:
    document = json.loads(signed[0])
    first = document["devices"][0]
    document["revoked"] = [
        {
            "device_id": first["device_id"],
            "cert_serial": first["cert_serial"],
            "cert_sha256": "00" * 32,
            "reason": "superseded",
            "issued_at": first["provisioned_at"],
            "revoked_at": first["provisioned_at"],
        }
    ]
    document["revoked_count"] = 1
    report = check_manifest(*_resign(pki, document), [pki.root_cert])
    assert _failed(report.lines()) == {"unique", "revoked"}
    assert f"certificate serials listed twice: {first['cert_serial']}" in report.checks[4].detail


def test_wrong_counts_and_a_foreign_device_certificate_are_refused(
    pki: TestPki, signed: tuple[bytes, bytes]
) -> None:
    document = json.loads(signed[0])
    document["count"] = 4
    report = check_manifest(*_resign(pki, document), [pki.root_cert])
    assert _failed(report.lines()) == {"counts"}
    other = make_test_pki(passphrase=b"other-2")
    stranger = _device(
        Issuer(
            SoftwareSigner(other.issuing_key, other.issuing_cert),
            (other.issuing_cert, other.root_cert),
            CertProfile(),
        ),
        "dev-9",
    )
    document = json.loads(signed[0])
    document["devices"].append(
        {
            **document["devices"][0],
            "device_id": "dev-9",
            "cert_serial": stranger.cert_serial,
            "cert_sha256": stranger.fingerprint_sha256,
            "cert_pem": x509.load_der_x509_certificate(stranger.cert_der)
            .public_bytes(serialization.Encoding.PEM)
            .decode(),
        }
    )
    document["count"] = 4
    report = check_manifest(*_resign(pki, document), [pki.root_cert])
    assert _failed(report.lines()) == {"certificates"}
    assert "dev-9" in report.checks[3].detail


def test_cli_says_what_it_found_and_exits_non_zero_on_failure(
    pki: TestPki, signed: tuple[bytes, bytes], tmp_path: Path
) -> None:
    content, signature = signed
    (tmp_path / "m.json").write_bytes(content)
    (tmp_path / "m.p7s").write_bytes(signature)
    (tmp_path / "ca.pem").write_bytes(pki.root_cert.public_bytes(serialization.Encoding.PEM))
    args = [
        "manifest",
        "verify",
        str(tmp_path / "m.json"),
        str(tmp_path / "m.p7s"),
        "--ca",
        str(tmp_path / "ca.pem"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "signature: OK" in result.output
    assert "3 provisioned, 0 revoked: manifest OK" in result.output
    (tmp_path / "m.json").write_bytes(content.replace(b"dev-2", b"dev-3"))
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "signature: FAILED" in result.output
    assert "manifest FAILED" in result.output
    (tmp_path / "ca.pem").write_bytes(b"not a certificate")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "no PEM certificates" in result.output
