"""DACs the station issues: the independent profile checker (from the spec) and openssl verify with the PAA.

The checker in factoryd/matter/dac.py shares no code with the issuer; here it is also shown to catch
each broken rule on hand-made certificates, so a pass on our DACs means something.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from factoryd.errors import BundleError, IssuanceError
from factoryd.matter.dac import (
    MATTER_PID_OID,
    MATTER_VID_OID,
    NO_EXPIRY,
    DacSpec,
    certificate_problems,
    chain_problems,
    matter_ids,
)
from factoryd.matter.testing import MatterTestPki, make_matter_test_pki
from factoryd.pki.bundle import load_pkcs12_bundle
from factoryd.pki.issuer import Issuer
from factoryd.pki.profile import CertProfile
from factoryd.pki.template import SubjectTemplate
from tests.helpers.openssl import openssl

PASS = b"test-pass"


@pytest.fixture(scope="module")
def pki() -> MatterTestPki:
    return make_matter_test_pki(passphrase=PASS, product_ids=(0x8000, 0x8001))


def _issuer(pki: MatterTestPki, *, no_expiry: bool = False, subject: str = "CN={id}") -> Issuer:
    profile = CertProfile(
        dac=DacSpec(0xFFF1, (0x8000, 0x8001), no_expiry=no_expiry), subject=SubjectTemplate.parse(subject)
    )
    bundle = load_pkcs12_bundle(pki.pkcs12, PASS, profile=profile)
    return Issuer(bundle.signer(), bundle.chain, profile)


def _csr(cn: str) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def _openssl_verify(
    tmp_path: Path, pki: MatterTestPki, dac: x509.Certificate
) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "paa.pem").write_bytes(pki.paa_pem)
    (tmp_path / "pai.pem").write_bytes(pki.pai.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "dac.pem").write_bytes(dac.public_bytes(serialization.Encoding.PEM))
    return openssl(
        "verify", "-x509_strict", "-CAfile", str(tmp_path / "paa.pem"),
        "-untrusted", str(tmp_path / "pai.pem"), str(tmp_path / "dac.pem"),
    )  # fmt: skip


def test_our_dacs_pass_the_independent_profile_check_and_openssl(tmp_path: Path, pki: MatterTestPki) -> None:
    issuer = _issuer(pki)
    for device_id, fields, pid in (
        ("dev-1", {"product_id": "0x8001"}, 0x8001),
        ("dev-2", {"product_id": "32768"}, 0x8000),
    ):
        issued = issuer.issue(_csr(device_id), device_id, fields=fields)
        assert chain_problems(issued.cert, pki.pai, pki.paa) == []
        ids = matter_ids(issued.cert)
        assert (ids.vendor_id, ids.product_id) == (0xFFF1, pid)
        vid_attr = issued.cert.subject.get_attributes_for_oid(MATTER_VID_OID)[0]
        assert vid_attr.value == "FFF1"
        assert vid_attr._type is _ASN1Type.UTF8String
        assert issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
        done = _openssl_verify(tmp_path, pki, issued.cert)
        assert done.returncode == 0, done.stderr
        assert b"OK" in done.stdout
        # Partial chain: the PAI alone as the trust anchor.
        partial = openssl(
            "verify", "-partial_chain", "-CAfile", str(tmp_path / "pai.pem"), str(tmp_path / "dac.pem")
        )
        assert partial.returncode == 0, partial.stderr


def test_a_dac_without_expiry_says_99991231235959z(tmp_path: Path) -> None:
    forever = make_matter_test_pki(passphrase=PASS, product_ids=(0x8000, 0x8001), no_expiry=True)
    issued = _issuer(forever, no_expiry=True).issue(_csr("dev-3"), "dev-3", fields={"product_id": "0x8000"})
    assert issued.cert.not_valid_after_utc == NO_EXPIRY
    assert b"\x18\x0f99991231235959Z" in issued.der  # GeneralizedTime, as RFC 5280 4.1.2.5 asks
    assert chain_problems(issued.cert, forever.pai, forever.paa) == []
    assert _openssl_verify(tmp_path, forever, issued.cert).returncode == 0


def test_a_dac_without_expiry_under_a_pai_that_expires_is_refused(pki: MatterTestPki) -> None:
    with pytest.raises(BundleError, match="expires"):
        _issuer(pki, no_expiry=True)


def test_a_pid_outside_the_lot_is_refused(pki: MatterTestPki) -> None:
    with pytest.raises(IssuanceError, match="product"):
        _issuer(pki).issue(_csr("dev-4"), "dev-4", fields={"product_id": "0x9999"})
    with pytest.raises(IssuanceError, match="product_id column"):
        _issuer(pki).issue(_csr("dev-5"), "dev-5")


def _cert(
    *,
    subject: list[x509.NameAttribute[str]],
    ca: bool,
    path_length: int | None,
    usage: dict[str, bool],
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer_name: x509.Name | None = None,
    aki: bool = True,
    bc_critical: bool = True,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    signing = issuer_key or key
    flags = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    flags.update(usage)
    name = x509.Name(subject)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=bc_critical)
        .add_extension(x509.KeyUsage(**flags), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing.public_key()), critical=False
        )
    return builder.sign(signing, hashes.SHA256())


def _attr(oid: x509.ObjectIdentifier, value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(oid, value, _type=_ASN1Type.UTF8String)


CN = x509.NameAttribute(NameOID.COMMON_NAME, "x")
SIGN = {"digital_signature": True}
CA_USAGE = {"key_cert_sign": True, "crl_sign": True}


@pytest.mark.parametrize(
    ("role", "kwargs", "expected"),
    [
        (
            "dac",
            {
                "subject": [CN, _attr(MATTER_VID_OID, "fff1"), _attr(MATTER_PID_OID, "8000")],
                "ca": False,
                "path_length": None,
                "usage": SIGN,
            },
            "4 upper-case hex",
        ),
        (
            "dac",
            {"subject": [CN, _attr(MATTER_VID_OID, "FFF1")], "ca": False, "path_length": None, "usage": SIGN},
            "no Matter PID",
        ),
        (
            "dac",
            {
                "subject": [CN, _attr(MATTER_VID_OID, "FFF1"), _attr(MATTER_PID_OID, "8000")],
                "ca": False,
                "path_length": None,
                "usage": {**SIGN, "key_encipherment": True},
            },
            "keyEncipherment",
        ),
        (
            "dac",
            {
                "subject": [CN, _attr(MATTER_VID_OID, "FFF1"), _attr(MATTER_PID_OID, "8000")],
                "ca": True,
                "path_length": None,
                "usage": SIGN,
            },
            "says CA",
        ),
        (
            "dac",
            {
                "subject": [CN, _attr(MATTER_VID_OID, "FFF1"), _attr(MATTER_PID_OID, "8000")],
                "ca": False,
                "path_length": None,
                "usage": SIGN,
                "aki": False,
            },
            "authorityKeyIdentifier",
        ),
        (
            "pai",
            {"subject": [CN, _attr(MATTER_VID_OID, "FFF1")], "ca": True, "path_length": 1, "usage": CA_USAGE},
            "pathLen is 1",
        ),
        (
            "pai",
            {"subject": [CN, _attr(MATTER_VID_OID, "FFF1")], "ca": False, "path_length": None, "usage": SIGN},
            "does not say CA",
        ),
        ("pai", {"subject": [CN], "ca": True, "path_length": 0, "usage": CA_USAGE}, "no Matter VID"),
        (
            "pai",
            {
                "subject": [CN, _attr(MATTER_VID_OID, "FFF1")],
                "ca": True,
                "path_length": 0,
                "usage": CA_USAGE,
                "bc_critical": False,
            },
            "not critical",
        ),
        (
            "paa",
            {"subject": [CN, _attr(MATTER_PID_OID, "8000")], "ca": True, "path_length": 1, "usage": CA_USAGE},
            "PID",
        ),
        ("paa", {"subject": [CN], "ca": True, "path_length": 2, "usage": CA_USAGE}, "pathLen is 2"),
        (
            "paa",
            {"subject": [CN], "ca": True, "path_length": None, "usage": {"key_cert_sign": True}},
            "cRLSign",
        ),
    ],
)
def test_the_checker_catches_each_broken_rule(role: str, kwargs: dict[str, object], expected: str) -> None:
    problems = certificate_problems(_cert(**kwargs), role)  # type: ignore[arg-type]
    assert any(expected in p for p in problems), problems


def test_good_shapes_pass_and_the_legacy_cn_form_is_read() -> None:
    pai = _cert(subject=[CN, _attr(MATTER_VID_OID, "FFF1")], ca=True, path_length=0, usage=CA_USAGE)
    assert certificate_problems(pai, "pai") == []
    paa = _cert(subject=[CN], ca=True, path_length=None, usage={**CA_USAGE, **SIGN}, aki=False)
    assert certificate_problems(paa, "paa") == []
    legacy = _cert(
        subject=[x509.NameAttribute(NameOID.COMMON_NAME, "Acme DAC Mvid:FFF1 Mpid:00B1")],
        ca=False, path_length=None, usage=SIGN,
    )  # fmt: skip
    assert (matter_ids(legacy).vendor_id, matter_ids(legacy).product_id) == (0xFFF1, 0x00B1)


def test_chain_rules_vid_match_and_issuer(pki: MatterTestPki) -> None:
    other_vid = make_matter_test_pki(passphrase=PASS, vendor_id=0xFFF2)
    issued = _issuer(pki).issue(_csr("dev-6"), "dev-6", fields={"product_id": "0x8000"})
    problems = chain_problems(issued.cert, other_vid.pai, other_vid.paa)
    assert "DAC VID differs from the PAI's" in problems
    assert any("not issued by the PAI" in p for p in problems)
