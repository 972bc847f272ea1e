"""Revocation: which certificates stand, the lot's CRL checked by openssl, the manifest's revoked list."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.errors import InputError, IssuanceError
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.certificates import RevocationCause
from factoryd.pki import CertProfile, IssuedCertificate, Issuer, load_pkcs12_bundle, verify_manifest
from factoryd.pki.crl import CrlEntry, build_crl
from factoryd.pki.manifest_check import check_manifest
from factoryd.pki.testca import TestPki, make_test_pki
from factoryd.service import StationPaths, export_crl, export_manifest, store_bundle

OPENSSL = shutil.which("openssl")
PASSPHRASE = b"crl-test"
STATION_PASSPHRASE = b"station-pass"
LOT = "acme-crl"
STATION = "st1"


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=PASSPHRASE)


@dataclass
class Line:
    """A lot whose devices went every way a certificate can: provisioned, failed, reworked, voided."""

    ledger: Ledger
    paths: StationPaths
    issuer: Issuer
    pki: TestPki
    certs: dict[str, IssuedCertificate]
    ids: list[str]


def _csr(common_name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


@pytest.fixture
def line(pki: TestPki, tmp_path: Path) -> Line:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    paths = StationPaths(tmp_path / "state")
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE)
    store_bundle(paths, STATION_PASSPHRASE, LOT, bundle)
    issuer = Issuer(bundle.signer(), bundle.chain, CertProfile())
    ids = [str(uuid.uuid4()) for _ in range(5)]
    ledger.create_lot(LOT, customer="acme", profile=LotProfile(), target_quantity=None, actor="test")
    ledger.import_ids(LOT, ("\n".join(ids) + "\n").encode(), filename="ids.txt", actor="test")
    ledger.set_lot_state(LOT, LotState.ACTIVE, actor="test")
    result = Line(ledger, paths, issuer, pki, {}, ids)

    def job(serial: str, label: str, *, outcome: str | None) -> str:
        job_id = ledger.start_job(LOT, station=STATION, port="1", hw_serial=serial)
        device_id = ledger.reserve(LOT, serial, station=STATION, port="1", job_id=job_id, actor="t").device_id
        issued = issuer.issue(issuer.verify_csr(_csr(device_id), device_id), device_id)
        # What the pipeline's _audit_issued records before the certificate leaves the station.
        ledger.audit(
            actor=STATION,
            action="cert.issued",
            subject=device_id,
            details={
                "hw_serial": serial,
                "cert_serial": issued.serial_hex,
                "fingerprint_sha256": issued.fingerprint_sha256,
                "job_id": job_id,
            },
        )
        result.certs[label] = issued
        if outcome == "provisioned":
            ledger.mark_provisioned(
                LOT,
                device_id,
                serial,
                cert_der=issued.der,
                cert_serial=issued.serial_hex,
                fingerprint_sha256=issued.fingerprint_sha256,
                station=STATION,
                port="1",
                actor="t",
                finish_job=job_id,
            )
        elif outcome is not None:
            ledger.finish_job(job_id, outcome=outcome, reason="write failed after the certificate")
        return device_id

    job("aa01", "good", outcome="provisioned")
    job("aa02", "retried-first", outcome="failed")
    job("aa02", "retried-second", outcome="provisioned")
    job("aa03", "failed", outcome="failed")
    voided = job("aa04", "voided", outcome="failed")
    ledger.void(LOT, voided, "board scrapped", actor="t")
    job("aa05", "running", outcome=None)
    return result


def _openssl_verify(
    line: Line, tmp_path: Path, crl_pem: bytes, label: str
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None, "openssl is required"
    (tmp_path / "root.pem").write_bytes(line.pki.root_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "issuing.pem").write_bytes(line.pki.issuing_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "lot.crl.pem").write_bytes(crl_pem)
    (tmp_path / f"{label}.pem").write_text(line.certs[label].pem)
    # -crl_check checks the leaf against the issuing CA's CRL (the root has none to offer).
    return subprocess.run(  # noqa: S603 - fixed argv
        [
            OPENSSL,
            "verify",
            "-crl_check",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-CRLfile",
            "lot.crl.pem",
            f"{label}.pem",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_revoked_certificates_are_the_ones_that_do_not_stand(line: Line) -> None:
    revoked = {r.cert_serial: r for r in line.ledger.revoked_certificates(LOT)}
    causes = {
        label: revoked[c.serial_hex].cause for label, c in line.certs.items() if c.serial_hex in revoked
    }
    assert causes == {
        "retried-first": RevocationCause.SUPERSEDED,
        "failed": RevocationCause.FAILED,
        "voided": RevocationCause.VOIDED,
    }
    issued = line.ledger.issued_certificates(LOT)
    assert [e.cert_serial for e in issued] == [c.serial_hex for c in line.certs.values()]


def test_crl_rejects_revoked_and_accepts_provisioned(line: Line, tmp_path: Path) -> None:
    crl = export_crl(line.ledger, line.paths, STATION_PASSPHRASE, LOT, next_update_days=7, actor="test")
    for label in ("good", "retried-second", "running"):
        result = _openssl_verify(line, tmp_path, crl.pem, label)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{label}.pem: OK" in result.stdout
    for label in ("retried-first", "failed", "voided"):
        result = _openssl_verify(line, tmp_path, crl.pem, label)
        assert result.returncode != 0, label
        assert "certificate revoked" in result.stdout + result.stderr


def test_crl_fields(line: Line) -> None:
    crl = export_crl(line.ledger, line.paths, STATION_PASSPHRASE, LOT, next_update_days=7, actor="test").crl
    assert crl.is_signature_valid(line.pki.issuing_cert.public_key())
    assert crl.issuer == line.pki.issuing_cert.subject
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = line.pki.issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    reasons = {}
    for entry in crl:
        try:
            reasons[entry.serial_number] = entry.extensions.get_extension_for_class(
                x509.CRLReason
            ).value.reason
        except x509.ExtensionNotFound:
            reasons[entry.serial_number] = None
    assert reasons == {
        line.certs["retried-first"].cert.serial_number: x509.ReasonFlags.superseded,
        line.certs["voided"].cert.serial_number: x509.ReasonFlags.cessation_of_operation,
        # A failed job's certificate has no reason to give: reasonCode is omitted, never 0.
        line.certs["failed"].cert.serial_number: None,
    }


def test_crl_numbers_increase_across_runs_and_are_audited(line: Line) -> None:
    numbers = [
        export_crl(line.ledger, line.paths, STATION_PASSPHRASE, LOT, actor="test").number for _ in range(3)
    ]
    assert numbers == [1, 2, 3]
    crl = export_crl(line.ledger, line.paths, STATION_PASSPHRASE, LOT, actor="test").crl
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4
    assert line.ledger.crl_numbers(LOT) == [1, 2, 3, 4]
    assert line.ledger.verify_audit() > 0


def test_abandoned_job_revokes_its_certificate(line: Line) -> None:
    before = {r.cert_serial for r in line.ledger.revoked_certificates(LOT)}
    assert line.certs["running"].serial_hex not in before
    line.ledger.abandon_open_jobs(STATION, reason="station restarted")
    after = {r.cert_serial: r.cause for r in line.ledger.revoked_certificates(LOT)}
    assert after[line.certs["running"].serial_hex] is RevocationCause.FAILED


def test_manifest_lists_revoked_certificates_separately(line: Line) -> None:
    manifest = export_manifest(line.ledger, line.paths, STATION_PASSPHRASE, LOT)
    document = verify_manifest(manifest.json_bytes, manifest.signature_der, [line.pki.root_cert])
    assert {d["cert_serial"] for d in document["devices"]} == {
        line.certs["good"].serial_hex,
        line.certs["retried-second"].serial_hex,
    }
    revoked = {r["cert_serial"]: r for r in document["revoked"]}
    assert document["revoked_count"] == 3
    assert set(revoked) == {line.certs[k].serial_hex for k in ("retried-first", "failed", "voided")}
    entry = revoked[line.certs["voided"].serial_hex]
    assert entry["reason"] == "voided"
    assert entry["cert_sha256"] == line.certs["voided"].fingerprint_sha256
    assert set(entry) == {"device_id", "cert_serial", "cert_sha256", "reason", "issued_at", "revoked_at"}
    report = check_manifest(manifest.json_bytes, manifest.signature_der, [line.pki.root_cert])
    assert report.ok, report.lines()
    assert (report.devices, report.revoked) == (2, 3)


def test_bad_next_update_is_refused_before_a_number_is_taken(line: Line) -> None:
    with pytest.raises(InputError, match=r"1\.\.3660"):
        export_crl(line.ledger, line.paths, STATION_PASSPHRASE, LOT, next_update_days=0, actor="test")
    assert line.ledger.crl_numbers(LOT) == []


def test_build_crl_refuses_bad_entries(pki: TestPki) -> None:
    signer = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE).signer()
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(IssuanceError, match="not hex"):
        build_crl(signer, [CrlEntry("xyz", now, "failed")], number=1)
    with pytest.raises(IssuanceError, match="unknown revocation cause"):
        build_crl(signer, [CrlEntry("ab", now, "stolen")], number=1)
    with pytest.raises(IssuanceError, match="20 octets"):
        build_crl(signer, [], number=1 << 160)
