"""Key attestation: the verification library, the lot's roots, the native messages, the lot policy."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from factoryd.errors import BundleError, ProtocolViolationError, RefusedBoardError
from factoryd.jobs.lots import activation_gaps
from factoryd.ledger import LotProfile
from factoryd.ledger.model import LotInfo, LotProgress, LotState
from factoryd.pki.attestation import (
    GENUINENESS_REASONS,
    AttestationError,
    AttestationEvidence,
    AttestationRootStore,
    check_csr_key,
    load_attestation_roots,
    statement_bytes,
    verify_attestation,
)
from factoryd.pki.challenge import der_to_raw_signature
from factoryd.pki.testca import make_ca_cert
from factoryd.protocol.messages import AttestedKeyReply, GenKeyAttested
from factoryd.sim.secure_element import SimSecureElement, SimVendorCa, attestation_certificate, make_csr
from factoryd.telemetry.reasons import reason_text

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def vendor() -> SimVendorCa:
    """One test chip vendor for the module."""
    return SimVendorCa.make()


def _evidence(se: SimSecureElement, nonce: bytes) -> AttestationEvidence:
    """What the native session collects from a genuine part: statement, chain, proof of possession."""
    point, signature = se.attest(0, nonce)
    challenge = secrets.token_bytes(32)
    return AttestationEvidence(
        0, nonce, point, signature, se.attestation_chain, challenge, se.sign(0, challenge)
    )


def _verify(
    evidence: AttestationEvidence | None, se: SimSecureElement, nonce: bytes, vendor: SimVendorCa
) -> str:
    """The reason verification refuses with."""
    with pytest.raises(AttestationError) as caught:
        verify_attestation(evidence, nonce=nonce, serial=se.serial_text, roots=[vendor.root_cert])
    return caught.value.reason


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_genuine_part_verifies_and_yields_its_evidence(vendor: SimVendorCa) -> None:
    se = vendor.provision(SimSecureElement())
    nonce = secrets.token_bytes(32)
    evidence = _evidence(se, nonce)
    result = verify_attestation(evidence, nonce=nonce, serial=se.serial_text, roots=[vendor.root_cert])
    assert result.public_key == se.public_point(0)
    assert result.cert_fingerprint_sha256 == hashlib.sha256(se.attestation_chain[0]).hexdigest()
    assert "Attestation Signer" in result.cert_issuer
    assert result.details()["method"] == "attestation"
    # The board may include the root itself at the end of its chain: the trusted copy decides.
    with_root = dataclasses.replace(evidence, chain=(*evidence.chain, _der(vendor.root_cert)))
    verify_attestation(with_root, nonce=nonce, serial=se.serial_text, roots=[vendor.root_cert])


def test_the_error_is_a_refusal_with_a_genuineness_reason() -> None:
    error = AttestationError("attestation_nonce", "replayed")
    assert isinstance(error, RefusedBoardError)
    assert error.reason == "attestation_nonce" in GENUINENESS_REASONS
    assert reason_text(error.reason) == "Not a genuine part: put it aside."


def test_no_attestation_is_missing(vendor: SimVendorCa) -> None:
    se = SimSecureElement()
    nonce = secrets.token_bytes(32)
    assert _verify(None, se, nonce, vendor) == "attestation_missing"
    empty = AttestationEvidence(0, nonce, b"\x04" + bytes(64), b"sig", ())
    assert _verify(empty, se, nonce, vendor) == "attestation_missing"


def test_a_replayed_statement_is_a_nonce_failure(vendor: SimVendorCa) -> None:
    se = vendor.provision(SimSecureElement())
    old = _evidence(se, secrets.token_bytes(32))
    assert _verify(old, se, secrets.token_bytes(32), vendor) == "attestation_nonce"


def test_a_statement_signed_by_another_key_fails_its_signature(vendor: SimVendorCa) -> None:
    se = vendor.provision(SimSecureElement())
    nonce = secrets.token_bytes(32)
    evidence = _evidence(se, nonce)
    other = ec.generate_private_key(ec.SECP256R1())
    forged = other.sign(
        statement_bytes(0, nonce, se.serial_text, evidence.public_key), ec.ECDSA(hashes.SHA256())
    )
    assert (
        _verify(dataclasses.replace(evidence, signature=forged), se, nonce, vendor) == "attestation_signature"
    )
    # A statement for another slot does not verify either: the slot is covered.
    assert _verify(dataclasses.replace(evidence, slot=1), se, nonce, vendor) == "attestation_signature"


def test_a_part_naming_another_serial_is_refused(vendor: SimVendorCa) -> None:
    se = vendor.provision(SimSecureElement())
    nonce = secrets.token_bytes(32)
    evidence = _evidence(se, nonce)
    with pytest.raises(AttestationError) as caught:
        verify_attestation(evidence, nonce=nonce, serial="0123" + "00" * 7, roots=[vendor.root_cert])
    assert caught.value.reason == "attestation_serial"


def test_possession_of_another_key_is_refused(vendor: SimVendorCa) -> None:
    se = vendor.provision(SimSecureElement())
    nonce = secrets.token_bytes(32)
    evidence = _evidence(se, nonce)
    stranger = ec.generate_private_key(ec.SECP256R1())
    wrong = der_to_raw_signature(stranger.sign(evidence.possession_challenge, ec.ECDSA(hashes.SHA256())))
    assert (
        _verify(dataclasses.replace(evidence, possession_signature=wrong), se, nonce, vendor)
        == "attestation_key"
    )
    # A public key that is no P-256 point (signed as such by a genuine part) is refused the same way.
    bad_point = b"\x04" + bytes(64)
    signature = se.attestation_key.sign(  # type: ignore[union-attr]
        statement_bytes(0, nonce, se.serial_text, bad_point), ec.ECDSA(hashes.SHA256())
    )
    odd = dataclasses.replace(evidence, public_key=bad_point, signature=signature)
    assert _verify(odd, se, nonce, vendor) == "attestation_key"


def test_the_csr_must_carry_the_attested_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    check_csr_key(point, x509.load_der_x509_csr(make_csr(key, "id")))
    other = x509.load_der_x509_csr(make_csr(ec.generate_private_key(ec.SECP256R1()), "id"))
    with pytest.raises(AttestationError) as caught:
        check_csr_key(point, other)
    assert caught.value.reason == "attestation_key"


def test_an_expired_attestation_certificate_is_refused(vendor: SimVendorCa) -> None:
    se = vendor.provision(SimSecureElement(), expired=True)
    nonce = secrets.token_bytes(32)
    assert _verify(_evidence(se, nonce), se, nonce, vendor) == "attestation_expired"


def test_chains_that_do_not_reach_the_lot_roots_are_refused(vendor: SimVendorCa) -> None:
    nonce = secrets.token_bytes(32)
    # A genuine part of another vendor.
    foreign = SimVendorCa.make("Other Vendor").provision(SimSecureElement())
    assert _verify(_evidence(foreign, nonce), foreign, nonce, vendor) == "attestation_chain"
    # A forged, self-signed attestation certificate naming the right serial.
    se = vendor.provision(SimSecureElement())
    key = ec.generate_private_key(ec.SECP256R1())
    fake = attestation_certificate(
        se.serial_text,
        key.public_key(),
        None,
        key,
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=1),
    )
    se.attestation_key, se.attestation_chain = key, (_der(fake),)
    assert _verify(_evidence(se, nonce), se, nonce, vendor) == "attestation_chain"
    # A leaf signed straight by another leaf (no CA in between).
    genuine = vendor.provision(SimSecureElement())
    leaf_key = genuine.attestation_key
    parent = x509.load_der_x509_certificate(genuine.attestation_chain[0])
    child_key = ec.generate_private_key(ec.SECP256R1())
    child = attestation_certificate(
        se.serial_text, child_key.public_key(), parent, leaf_key,  # type: ignore[arg-type]
        not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1),
    )  # fmt: skip
    se.attestation_key = child_key
    se.attestation_chain = (_der(child), genuine.attestation_chain[0], genuine.attestation_chain[1])
    assert _verify(_evidence(se, nonce), se, nonce, vendor) == "attestation_chain"


def test_path_length_and_leaf_key_usage_are_enforced(vendor: SimVendorCa) -> None:
    nonce = secrets.token_bytes(32)
    # A sub-CA below the vendor's pathLen-0 signer: one intermediate too many.
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = make_ca_cert(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rogue sub-CA")]), sub_key,
        issuer=vendor.signer_cert, issuer_key=vendor.signer_key, serial=77,
        not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=30),
    )  # fmt: skip
    se = SimSecureElement()
    se.attestation_key = ec.generate_private_key(ec.SECP256R1())
    leaf = attestation_certificate(
        se.serial_text, se.attestation_key.public_key(), sub, sub_key,
        not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=30),
    )  # fmt: skip
    se.attestation_chain = (_der(leaf), _der(sub), _der(vendor.signer_cert))
    assert _verify(_evidence(se, nonce), se, nonce, vendor) == "attestation_chain"
    # A leaf the vendor did not allow to sign.
    key = ec.generate_private_key(ec.SECP256R1())
    no_sign = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, se.serial_text)]))
        .issuer_name(vendor.signer_cert.subject)
        .public_key(key.public_key())
        .serial_number(5)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(
            x509.KeyUsage(False, False, False, False, True, False, False, False, False), critical=True
        )
        .sign(vendor.signer_key, hashes.SHA256())
    )
    se.attestation_key, se.attestation_chain = key, (_der(no_sign), _der(vendor.signer_cert))
    assert _verify(_evidence(se, nonce), se, nonce, vendor) == "attestation_chain"


def test_a_lot_without_roots_trusts_nobody(vendor: SimVendorCa) -> None:
    se = vendor.provision(SimSecureElement())
    nonce = secrets.token_bytes(32)
    with pytest.raises(AttestationError) as caught:
        verify_attestation(_evidence(se, nonce), nonce=nonce, serial=se.serial_text, roots=[])
    assert caught.value.reason == "attestation_chain"


# The lot's roots ---------------------------------------------------------------------------------


def test_roots_are_validated_and_stored_whole(vendor: SimVendorCa, tmp_path: Path) -> None:
    other = SimVendorCa.make("Second Vendor")
    roots = load_attestation_roots(vendor.root_pem + other.root_pem + vendor.root_pem)
    assert [r.subject for r in roots] == [vendor.root_cert.subject, other.root_cert.subject]
    store = AttestationRootStore(tmp_path / "attestation")
    assert not store.has("lot")
    assert store.load("lot") == ()
    path = store.save("lot", roots)
    assert store.has("lot")
    assert store.load("lot") == roots
    assert path.read_bytes() == vendor.root_pem + other.root_pem


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_bad_roots_are_refused_naming_the_problem(vendor: SimVendorCa) -> None:
    leaf = x509.load_der_x509_certificate(vendor.provision(SimSecureElement()).attestation_chain[0])
    with pytest.raises(BundleError, match="not a CA certificate"):
        load_attestation_roots(vendor.root_pem + _pem(leaf))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old root")])
    old = make_ca_cert(
        name, key, serial=1, not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(days=1)
    )
    with pytest.raises(BundleError, match="not valid now"):
        load_attestation_roots(_pem(old))
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused on purpose
    weak = make_ca_cert(name, weak_key, serial=2, not_before=NOW, not_after=NOW + dt.timedelta(days=9))
    with pytest.raises(BundleError, match="RSA 1024"):
        load_attestation_roots(_pem(weak))
    with pytest.raises(BundleError, match="malformed"):
        load_attestation_roots(b"not a certificate")
    with pytest.raises(BundleError, match="too large"):
        load_attestation_roots(b"x" * (256 * 1024 + 1))


# The lot's policy --------------------------------------------------------------------------------


def test_a_profile_that_cannot_attest_is_refused_at_lot_creation() -> None:
    assert LotProfile(attestation="required").attestation == "required"
    assert LotProfile().attestation == "none"
    with pytest.raises(ValidationError, match="arduino-v1 cannot attest"):
        LotProfile(protocol="arduino-v1", attestation="required")
    with pytest.raises(ValidationError):
        LotProfile(attestation="maybe")


def test_activation_lists_missing_attestation_roots(tmp_path: Path, vendor: SimVendorCa) -> None:
    (tmp_path / "bundles" / "lot").mkdir(parents=True)
    info = LotInfo(
        name="lot", customer="c", state=LotState.DRAFT, profile=LotProfile(attestation="required"),
        target_quantity=None, created_at=NOW,
    )  # fmt: skip
    progress = LotProgress(total=5, available=5, reserved=0, provisioned=0, void=0)
    gaps = activation_gaps(info, progress, tmp_path / "bundles", tmp_path / "firmware")
    assert len(gaps) == 1
    assert "attestation roots" in gaps[0]
    AttestationRootStore(tmp_path / "attestation").save("lot", [vendor.root_cert])
    assert activation_gaps(info, progress, tmp_path / "bundles", tmp_path / "firmware") == []


# The native messages -----------------------------------------------------------------------------


def test_genkey_attested_messages_round_trip() -> None:
    request = GenKeyAttested(0, bytes(range(32)))
    assert GenKeyAttested.decode(request.encode()) == request
    reply = AttestedKeyReply(bytes(32), b"\x04" + bytes(64), b"sig", (b"leaf", b"ca"))
    assert AttestedKeyReply.decode(reply.encode()) == reply


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        bytes(32),  # nonce only
        bytes(32) + b"\x00\x41" + bytes(65) + b"\x00\x01s" + b"\x00",  # no certificate
        bytes(32) + b"\x00\x41" + bytes(65) + b"\x00\x01s" + b"\x05",  # more than MAX_ATTEST_CHAIN
        bytes(32) + b"\x00\x02ab" + b"\x00\x01s" + b"\x01\x00\x01c",  # key is no P-256 point
        bytes(32) + b"\x00\x41" + bytes(65) + b"\x00\x01s" + b"\x01\x00\x01c" + b"!",  # trailing byte
    ],
)
def test_malformed_attested_replies_are_protocol_violations(payload: bytes) -> None:
    with pytest.raises(ProtocolViolationError):
        AttestedKeyReply.decode(payload)


def test_a_short_nonce_is_refused_both_ways() -> None:
    with pytest.raises(ValueError, match="nonce"):
        GenKeyAttested(0, bytes(16)).encode()
    with pytest.raises(ProtocolViolationError):
        GenKeyAttested.decode(b"\x00" + bytes(16))
