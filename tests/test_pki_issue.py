"""CSR verification and device certificate issuing (factoryd-v1 and arduino-v1 profiles)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from factoryd.errors import ConfigError, CsrRejectedError, IssuanceError
from factoryd.pki import (
    CertProfile,
    Issuer,
    SoftwareSigner,
    arduino_compressed_fields,
    arduino_pack_dates,
    arduino_reconstruct_certificate,
    arduino_unpack_dates,
    load_pkcs12_bundle,
    public_key_raw64,
    verify_csr,
)
from factoryd.pki import der as derlib
from factoryd.pki.bench import run_pki_bench
from factoryd.pki.profile import arduino_subject
from factoryd.pki.testca import TestPki, make_test_pki

PASSPHRASE = b"issue-test-passphrase"
DEVICE_ID = "6ba7b810-9dad-41d1-80b4-00c04fd430c8"
ARDUINO = CertProfile(kind="arduino-v1")


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=PASSPHRASE)


@pytest.fixture(scope="module")
def arduino_pki() -> TestPki:
    return make_test_pki(profile_kind="arduino-v1", passphrase=PASSPHRASE)


@pytest.fixture(scope="module")
def issuer(pki: TestPki) -> Issuer:
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE)
    return Issuer(bundle.signer(), bundle.chain, CertProfile())


@pytest.fixture(scope="module")
def arduino_issuer(arduino_pki: TestPki) -> Issuer:
    bundle = load_pkcs12_bundle(arduino_pki.pkcs12, PASSPHRASE, profile=ARDUINO)
    return Issuer(bundle.signer(), bundle.chain, ARDUINO)


@pytest.fixture(scope="module")
def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    subject: x509.Name | None = None,
    extensions: list[x509.ExtensionType] | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)])
    )
    for extension in extensions or []:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _manual_csr(key: ec.EllipticCurvePrivateKey, attributes: bytes) -> bytes:
    """A CSR built by hand, to control the attributes field exactly (as a secure element would)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)]).public_bytes()
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = derlib.encode(
        derlib.TAG_SEQUENCE, derlib.encode_integer(0) + subject + spki + derlib.encode(0xA0, attributes)
    )
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    algorithm = derlib.encode(
        derlib.TAG_SEQUENCE, derlib.encode(derlib.TAG_OID, bytes.fromhex("2a8648ce3d040302"))
    )
    return derlib.encode(
        derlib.TAG_SEQUENCE, info + algorithm + derlib.encode(derlib.TAG_BIT_STRING, b"\0" + signature)
    )


# --- CSR verification --------------------------------------------------------------------------


def test_good_csr_in_der_and_pem(device_key: ec.EllipticCurvePrivateKey) -> None:
    der = _csr(device_key)
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert verify_csr(der, DEVICE_ID).subject.rfc4514_string() == f"CN={DEVICE_ID}"
    assert verify_csr(pem, DEVICE_ID).public_key() == device_key.public_key()


def test_csr_with_tampered_signature_is_refused(device_key: ec.EllipticCurvePrivateKey) -> None:
    der = bytearray(_csr(device_key))
    der[-5] ^= 0x01  # inside the signature's s value
    with pytest.raises(CsrRejectedError, match="signature is invalid"):
        verify_csr(bytes(der), DEVICE_ID)


def test_csr_with_wrong_cn_is_refused(device_key: ec.EllipticCurvePrivateKey) -> None:
    expected = r"is not the expected .* \(the allocated ID in the lot.s subject template\)"
    with pytest.raises(CsrRejectedError, match=expected):
        verify_csr(_csr(device_key), "11111111-2222-4333-8444-555555555555")


def test_csr_with_extra_subject_attribute_is_refused(device_key: ec.EllipticCurvePrivateKey) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil"),
            x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID),
        ]
    )
    with pytest.raises(CsrRejectedError, match="subject must be exactly"):
        verify_csr(_csr(device_key, subject), DEVICE_ID)


def test_csr_with_p384_key_is_refused() -> None:
    with pytest.raises(CsrRejectedError, match="EC secp384r1; EC P-256 required"):
        verify_csr(_csr(ec.generate_private_key(ec.SECP384R1())), DEVICE_ID)


def test_csr_with_rsa_key_is_refused() -> None:
    with pytest.raises(CsrRejectedError, match="RSA 2048; EC P-256 required"):
        verify_csr(_csr(rsa.generate_private_key(65537, 2048)), DEVICE_ID)


def test_csr_with_extension_is_refused_unless_allowed(device_key: ec.EllipticCurvePrivateKey) -> None:
    san = x509.SubjectAlternativeName([x509.DNSName("evil.example")])
    csr = _csr(device_key, extensions=[san])
    with pytest.raises(CsrRejectedError, match="disallowed extension subjectAltName"):
        verify_csr(csr, DEVICE_ID)
    assert verify_csr(csr, DEVICE_ID, allowed_extensions=frozenset({ExtensionOID.SUBJECT_ALTERNATIVE_NAME}))


def test_csr_ca_extension_is_refused(device_key: ec.EllipticCurvePrivateKey) -> None:
    csr = _csr(device_key, extensions=[x509.BasicConstraints(ca=True, path_length=None)])
    with pytest.raises(CsrRejectedError, match="disallowed extension basicConstraints"):
        verify_csr(csr, DEVICE_ID)


def test_csr_empty_attributes_and_empty_extension_request_are_tolerated(
    device_key: ec.EllipticCurvePrivateKey,
) -> None:
    # Secure-element CSRs end with "a0 00"; some tools send an extensionRequest with no extensions.
    assert verify_csr(_manual_csr(device_key, b""), DEVICE_ID)
    empty_request = derlib.encode(
        derlib.TAG_SEQUENCE,
        derlib.encode(derlib.TAG_OID, bytes.fromhex("2a864886f70d01090e"))
        + derlib.encode(derlib.TAG_SET, derlib.encode(derlib.TAG_SEQUENCE, b"")),
    )
    assert verify_csr(_manual_csr(device_key, empty_request), DEVICE_ID)


def test_csr_with_other_attribute_is_refused(device_key: ec.EllipticCurvePrivateKey) -> None:
    challenge_password = derlib.encode(
        derlib.TAG_SEQUENCE,
        derlib.encode(derlib.TAG_OID, bytes.fromhex("2a864886f70d010907"))
        + derlib.encode(derlib.TAG_SET, derlib.encode(0x0C, b"secret")),
    )
    with pytest.raises(CsrRejectedError, match=r"disallowed attribute 1\.2\.840\.113549\.1\.9\.7"):
        verify_csr(_manual_csr(device_key, challenge_password), DEVICE_ID)


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01", b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n"])
def test_garbage_csr_is_refused(garbage: bytes) -> None:
    with pytest.raises(CsrRejectedError, match="does not parse"):
        verify_csr(garbage, DEVICE_ID)


def test_oversize_csr_is_refused() -> None:
    with pytest.raises(CsrRejectedError, match="too large"):
        verify_csr(b"\x30" * 20000, DEVICE_ID)


# --- factoryd-v1 issuing -----------------------------------------------------------------------


def test_issued_certificate_profile(
    issuer: Issuer, pki: TestPki, device_key: ec.EllipticCurvePrivateKey
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued = issuer.issue(issuer.verify_csr(_csr(device_key), DEVICE_ID), DEVICE_ID, now=now)
    cert = issued.cert
    assert cert.subject.rfc4514_string() == f"CN={DEVICE_ID}"
    assert cert.issuer == pki.issuing_cert.subject
    assert issued.not_before == now - dt.timedelta(minutes=5)
    assert issued.not_after == now + dt.timedelta(days=3650)
    assert cert.public_key() == device_key.public_key()
    extensions = {e.oid: e for e in cert.extensions}
    assert set(extensions) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    basic = extensions[ExtensionOID.BASIC_CONSTRAINTS]
    assert basic.critical
    assert basic.value == x509.BasicConstraints(ca=False, path_length=None)
    usage = extensions[ExtensionOID.KEY_USAGE]
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert list(extensions[ExtensionOID.EXTENDED_KEY_USAGE].value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = pki.issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert extensions[ExtensionOID.AUTHORITY_KEY_IDENTIFIER].value.key_identifier == ca_ski
    assert issued.serial_hex == f"{cert.serial_number:x}"
    assert issued.pem.startswith("-----BEGIN CERTIFICATE-----")
    assert issued.der == cert.public_bytes(serialization.Encoding.DER)
    assert len(issued.fingerprint_sha256) == 64


def test_backdate_and_validity_are_configurable(pki: TestPki, device_key: ec.EllipticCurvePrivateKey) -> None:
    profile = CertProfile(cert_validity_days=30, backdate_s=3600)
    issuer = Issuer(
        SoftwareSigner(pki.issuing_key, pki.issuing_cert), [pki.issuing_cert, pki.root_cert], profile
    )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued = issuer.issue(issuer.verify_csr(_csr(device_key), DEVICE_ID), DEVICE_ID, now=now)
    assert issued.not_before == now - dt.timedelta(hours=1)
    assert issued.not_after == now + dt.timedelta(days=30)


def test_serials_are_random_positive_and_unique(
    issuer: Issuer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    csr = issuer.verify_csr(_csr(device_key), DEVICE_ID)
    serials = [issuer.issue(csr, DEVICE_ID).cert.serial_number for _ in range(1000)]
    assert len(set(serials)) == 1000
    assert all(0 < s < 1 << 127 for s in serials)  # 16 bytes, top bit clear: positive in DER
    # 127 random bits: about half of them use the top available bit, nearly all use more than 120 bits.
    assert sum(s >> 126 for s in serials) > 400
    assert sum(s.bit_length() > 120 for s in serials) > 980


def test_refuses_when_ca_expires_before_device_cert(device_key: ec.EllipticCurvePrivateKey) -> None:
    short = make_test_pki(passphrase=PASSPHRASE, validity_days=100)
    issuer = Issuer(
        SoftwareSigner(short.issuing_key, short.issuing_cert), [short.issuing_cert], CertProfile()
    )
    with pytest.raises(IssuanceError, match=r"expires .* before the device certificate would"):
        issuer.issue(issuer.verify_csr(_csr(device_key), DEVICE_ID), DEVICE_ID)


def test_issuer_refuses_mismatched_chain_and_arduino_profile_on_normal_ca(pki: TestPki) -> None:
    signer = SoftwareSigner(pki.issuing_key, pki.issuing_cert)
    with pytest.raises(IssuanceError, match="chain\\[0\\]"):
        Issuer(signer, [pki.root_cert], CertProfile())
    with pytest.raises(IssuanceError, match="CA subject must be exactly"):
        Issuer(signer, [pki.issuing_cert, pki.root_cert], ARDUINO)


def test_profile_validation() -> None:
    with pytest.raises(ConfigError, match="unknown certificate profile"):
        CertProfile(kind="x509-v9")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="validity_years"):
        CertProfile(kind="arduino-v1", validity_years=32)
    with pytest.raises(ConfigError, match="cert_validity_days"):
        CertProfile(cert_validity_days=0)


# --- external tools ----------------------------------------------------------------------------


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
@pytest.mark.parametrize("kind", ["factoryd-v1", "arduino-v1"])
def test_openssl_verifies_issued_cert(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    prefix = "" if kind == "factoryd-v1" else "arduino_"
    the_pki: TestPki = request.getfixturevalue(f"{prefix}pki")
    the_issuer: Issuer = request.getfixturevalue(f"{prefix}issuer")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = arduino_subject(DEVICE_ID) if kind == "arduino-v1" else None
    issued = the_issuer.issue(the_issuer.verify_csr(_csr(key, subject), DEVICE_ID), DEVICE_ID)
    root = _write(tmp_path / "root.pem", the_pki.root_pem)
    untrusted = _write(tmp_path / "issuing.pem", the_pki.issuing_pem)
    cert = _write(tmp_path / "device.pem", issued.pem)
    result = subprocess.run(  # noqa: S603 - fixed argv, test files only
        ["openssl", "verify", "-x509_strict", "-CAfile", root, "-untrusted", untrusted, cert],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")
    other = make_test_pki(passphrase=PASSPHRASE)
    wrong_root = _write(tmp_path / "other-root.pem", other.root_pem)
    result = subprocess.run(  # noqa: S603
        ["openssl", "verify", "-CAfile", wrong_root, "-untrusted", untrusted, cert],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


# pkilint findings our profiles produce on purpose (documented in factoryd/pki/profile.py's users' docs):
# the Arduino template has no subjectKeyIdentifier, which RFC 5280 only recommends for end entities.
EXPECTED_PKILINT_FINDINGS = {
    "factoryd-v1": set(),
    "arduino-v1": {"pkix.certificate_skid_end_entity_missing"},
}


@pytest.mark.skipif(shutil.which("lint_pkix_cert") is None, reason="pkilint not installed")
@pytest.mark.parametrize("kind", ["factoryd-v1", "arduino-v1"])
def test_pkilint_finds_no_errors(kind: str, issuer: Issuer, arduino_issuer: Issuer, tmp_path: Path) -> None:
    the_issuer = issuer if kind == "factoryd-v1" else arduino_issuer
    key = ec.generate_private_key(ec.SECP256R1())
    subject = arduino_subject(DEVICE_ID) if kind == "arduino-v1" else None
    issued = the_issuer.issue(the_issuer.verify_csr(_csr(key, subject), DEVICE_ID), DEVICE_ID)
    cert = _write(tmp_path / "device.pem", issued.pem)
    result = subprocess.run(  # noqa: S603 - fixed argv, test files only
        ["lint_pkix_cert", "lint", "-s", "WARNING", "-f", "JSON", cert],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stderr == ""
    findings = {
        f["code"]: f["severity"]
        for item in json.loads(result.stdout)["results"]
        for f in item["finding_descriptions"]
    }
    assert not {code for code, severity in findings.items() if severity in {"ERROR", "FATAL"}}, findings
    assert set(findings) == EXPECTED_PKILINT_FINDINGS[kind], findings


# --- arduino-v1 ---------------------------------------------------------------------------------


def test_arduino_date_packing_vector() -> None:
    # ARDUINO_V1.md: b0 = (year-2000)<<3 | month>>1; b1 = (month&1)<<7 | day<<2 | hour>>3;
    # b2 = (hour&7)<<5 | years.  2024-03-07 14h, 31 years: b0=24<<3|1, b1=1<<7|7<<2|1, b2=6<<5|31.
    assert arduino_pack_dates(2024, 3, 7, 14, 31) == bytes([0xC1, 0x9D, 0xDF])
    assert arduino_unpack_dates(bytes([0xC1, 0x9D, 0xDF])) == (2024, 3, 7, 14, 31)
    for month in range(1, 13):
        for hour in (0, 7, 8, 23):
            packed = arduino_pack_dates(2031, month, 31, hour, 1)
            assert arduino_unpack_dates(packed) == (2031, month, 31, hour, 1)
    with pytest.raises(ValueError, match="year"):
        arduino_pack_dates(2032, 1, 1, 0, 1)


def test_arduino_certificate_fields_and_reconstruction(device_key: ec.EllipticCurvePrivateKey) -> None:
    now = dt.datetime(2026, 3, 7, 14, 42, 10, tzinfo=dt.UTC)
    arduino_pki = make_test_pki(profile_kind="arduino-v1", passphrase=PASSPHRASE, now=now)
    signer = SoftwareSigner(arduino_pki.issuing_key, arduino_pki.issuing_cert)
    arduino_issuer = Issuer(signer, [arduino_pki.issuing_cert, arduino_pki.root_cert], ARDUINO)
    csr = arduino_issuer.verify_csr(_csr(device_key, arduino_subject(DEVICE_ID)), DEVICE_ID)
    issued = arduino_issuer.issue(csr, DEVICE_ID, now=now)
    assert issued.not_before == dt.datetime(2026, 3, 7, 14, tzinfo=dt.UTC)
    assert issued.not_after == dt.datetime(2057, 3, 7, 14, tzinfo=dt.UTC)
    assert [e.oid for e in issued.cert.extensions] == [ExtensionOID.AUTHORITY_KEY_IDENTIFIER]
    fields = arduino_compressed_fields(issued.cert)
    assert (fields.year, fields.month, fields.day, fields.hour, fields.years) == (2026, 3, 7, 14, 31)
    assert len(fields.serial16) == 16
    assert 0 < fields.serial16[0] < 0x80
    ca_ski = arduino_pki.issuing_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value.digest
    assert fields.aki20 == ca_ski
    assert len(fields.signature64) == 64
    assert fields.packed_dates == arduino_pack_dates(2026, 3, 7, 14, 31)
    # What the board rebuilds from the stored fields must be our certificate, byte for byte.
    rebuilt = arduino_reconstruct_certificate(fields, DEVICE_ID, public_key_raw64(device_key.public_key()))
    assert rebuilt == issued.der


def test_arduino_serials_are_exactly_16_bytes(
    arduino_issuer: Issuer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    csr = arduino_issuer.verify_csr(_csr(device_key, arduino_subject(DEVICE_ID)), DEVICE_ID)
    for _ in range(200):
        serial = arduino_issuer.issue(csr, DEVICE_ID).cert.serial_number
        assert 1 << 120 <= serial < 1 << 127


def test_arduino_window_rules() -> None:
    leap = ARDUINO.validity_window(dt.datetime(2028, 2, 29, 10, 30, tzinfo=dt.UTC))
    assert leap == (dt.datetime(2028, 2, 28, 23, tzinfo=dt.UTC), dt.datetime(2059, 2, 28, 23, tzinfo=dt.UTC))
    with pytest.raises(IssuanceError, match="cannot start in 2032"):
        ARDUINO.validity_window(dt.datetime(2032, 1, 1, 1, tzinfo=dt.UTC))
    short = CertProfile(kind="arduino-v1", validity_years=5)
    start, end = short.validity_window(dt.datetime(2026, 1, 1, 0, 2, tzinfo=dt.UTC))
    assert (start, end) == (
        dt.datetime(2025, 12, 31, 23, tzinfo=dt.UTC),
        dt.datetime(2030, 12, 31, 23, tzinfo=dt.UTC),
    )


def test_compressed_fields_refuse_a_normal_cert(
    issuer: Issuer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    issued = issuer.issue(issuer.verify_csr(_csr(device_key), DEVICE_ID), DEVICE_ID)
    with pytest.raises(IssuanceError, match="not an arduino-v1 certificate"):
        arduino_compressed_fields(issued.cert)


# --- bench --------------------------------------------------------------------------------------


def test_bench_reports_rate() -> None:
    result = run_pki_bench(20)
    assert result["n"] == 20
    assert result["per_second"] > 0
    assert result["elapsed_s"] > 0
