"""Customer bundle upload: happy paths and the hostile corpus in tests/data/bad/bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factoryd.errors import BundleError
from factoryd.pki import CertProfile, chain_pem, load_pem_bundle, load_pkcs12_bundle, validate_bundle
from factoryd.pki.testca import TestPki, make_test_pki

CORPUS_DIR = Path(__file__).parent / "data" / "bad" / "bundles"
CORPUS: list[dict[str, Any]] = json.loads((CORPUS_DIR / "expected.json").read_text())
PASSPHRASE = b"bundle-test-passphrase"


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=PASSPHRASE)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _load_case(case: dict[str, Any]) -> None:
    files = {role: (CORPUS_DIR / name).read_bytes() for role, name in case["files"].items()}
    kwargs: dict[str, Any] = {}
    if "max_bytes" in case:
        kwargs["max_bytes"] = case["max_bytes"]
    if "profile" in case:
        kwargs["profile"] = CertProfile(**case["profile"])
    passphrase = case["passphrase"].encode()
    if case["format"] == "pkcs12":
        load_pkcs12_bundle(files["pkcs12"], passphrase, **kwargs)
    else:
        load_pem_bundle(
            files["key"], files["chain"], passphrase, trust_anchors=files.get("trust_anchors"), **kwargs
        )


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_corpus_bundle_is_refused_with_reason(case: dict[str, Any]) -> None:
    with pytest.raises(BundleError) as info:
        _load_case(case)
    assert case["error"] in str(info.value)
    if case["passphrase"]:
        assert case["passphrase"] not in str(info.value)


def test_corpus_covers_every_refusal() -> None:
    fragments = {c["error"] for c in CORPUS}
    required = [
        "does not match",
        "is not a CA",
        "lacks the keyCertSign",
        "has expired",
        "not yet valid",
        "before device certificates issued now",
        "is not in the bundle",
        "does not verify with the key",
        "path length violated",
        "unsupported key type",
        "wrong passphrase",
        "malformed",
        "too large",
        "not encrypted",
        "CA subject must be exactly",
    ]
    for fragment in required:
        assert any(fragment in f for f in fragments), fragment
    formats = {c["format"] for c in CORPUS}
    assert formats == {"pkcs12", "pem"}


def test_pkcs12_happy_path_splits_chain_and_trust_anchors(pki: TestPki) -> None:
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE)
    assert bundle.certificate == pki.issuing_cert
    assert [_der(c) for c in bundle.chain] == [_der(pki.issuing_cert), _der(pki.root_cert)]
    assert [_der(c) for c in bundle.trust_anchors] == [_der(pki.server_ca_cert)]
    assert bundle.root == pki.root_cert


def test_pem_happy_path_with_separate_trust_anchors(pki: TestPki) -> None:
    bundle = load_pem_bundle(pki.key_pem, pki.chain_pem, PASSPHRASE, trust_anchors=pki.trust_anchors_pem)
    assert bundle.chain == (pki.issuing_cert, pki.root_cert)
    assert bundle.trust_anchors == (pki.server_ca_cert,)
    without = load_pem_bundle(pki.key_pem, pki.chain_pem, PASSPHRASE)
    assert without.trust_anchors == ()


def test_pem_chain_order_does_not_matter(pki: TestPki) -> None:
    reversed_chain = pki.root_pem + pki.issuing_pem
    bundle = load_pem_bundle(pki.key_pem, reversed_chain, PASSPHRASE)
    assert bundle.chain == (pki.issuing_cert, pki.root_cert)


def test_chain_pem_is_chain_then_anchors(pki: TestPki) -> None:
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE)
    certs = x509.load_pem_x509_certificates(chain_pem(bundle))
    assert certs == [pki.issuing_cert, pki.root_cert, pki.server_ca_cert]


def test_default_size_limit_is_one_mebibyte(pki: TestPki) -> None:
    with pytest.raises(BundleError, match="too large"):
        load_pkcs12_bundle(b"\0" * (1024 * 1024 + 1), PASSPHRASE)
    with pytest.raises(BundleError, match="trust anchor file is too large"):
        load_pem_bundle(pki.key_pem, pki.chain_pem, PASSPHRASE, trust_anchors=b"x" * (1024 * 1024 + 1))


def test_arduino_profile_accepts_arduino_named_ca() -> None:
    arduino = make_test_pki(profile_kind="arduino-v1", passphrase=PASSPHRASE)
    bundle = load_pkcs12_bundle(arduino.pkcs12, PASSPHRASE, profile=CertProfile(kind="arduino-v1"))
    assert bundle.certificate.subject.rfc4514_string() == "CN=Arduino,OU=IT,O=Arduino LLC US,C=US"


def test_device_validity_longer_than_ca_is_refused(pki: TestPki) -> None:
    too_long = CertProfile(cert_validity_days=60 * 365)
    with pytest.raises(BundleError, match="before device certificates issued now"):
        load_pkcs12_bundle(pki.pkcs12, PASSPHRASE, profile=too_long)


def test_validate_bundle_rechecks_later(pki: TestPki) -> None:
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE)
    validate_bundle(bundle)
    later = pki.issuing_cert.not_valid_after_utc.replace(year=pki.issuing_cert.not_valid_after_utc.year + 1)
    with pytest.raises(BundleError, match="has expired"):
        validate_bundle(bundle, now=later)


def test_bundle_repr_hides_key(pki: TestPki) -> None:
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE)
    text = repr(bundle)
    assert "Issuing CA" in text
    assert "PRIVATE" not in text
    assert "private_key" not in text


def test_wrong_passphrase_that_decrypts_to_garbage_is_still_a_wrong_passphrase(pki: TestPki) -> None:
    # About one wrong passphrase in 200 decrypts the key to bytes whose padding passes; cryptography
    # then reports an ASN.1 error instead of "incorrect password". Find such an encryption (bounded).
    right, wrong = b"the-right-passphrase", b"not-the-passphrase"
    encryption = serialization.BestAvailableEncryption(right)
    for _ in range(5000):
        key_pem = pki.issuing_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        try:
            serialization.load_pem_private_key(key_pem, wrong)
        except ValueError as exc:
            if "password" not in str(exc):
                break
    else:
        pytest.fail("no encryption whose wrong-passphrase decryption passes the padding check")
    with pytest.raises(BundleError, match="wrong passphrase"):
        load_pem_bundle(key_pem, pki.chain_pem, wrong)
