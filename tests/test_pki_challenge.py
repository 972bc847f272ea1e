"""Challenge verification with the issued certificate, and raw/DER signature conversion."""

from __future__ import annotations

import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.errors import ChallengeFailedError
from factoryd.pki import (
    CertProfile,
    Issuer,
    SoftwareSigner,
    der_to_raw_signature,
    raw_to_der_signature,
    verify_challenge,
)
from factoryd.pki.testca import make_test_pki

DEVICE_ID = "0d9f5a3e-4b1c-4f2e-9a7d-3c5b8e1f2a40"


@pytest.fixture(scope="module")
def board() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    pki = make_test_pki(passphrase=b"challenge-test")
    issuer = Issuer(SoftwareSigner(pki.issuing_key, pki.issuing_cert), [pki.issuing_cert], CertProfile())
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    return key, issuer.issue(issuer.verify_csr(csr, DEVICE_ID), DEVICE_ID).cert


def _board_sign(key: ec.EllipticCurvePrivateKey, challenge: bytes) -> bytes:
    """What a secure element returns: r||s over SHA-256(challenge)."""
    return der_to_raw_signature(key.sign(challenge, ec.ECDSA(hashes.SHA256())))


def test_challenge_signed_by_board_key_verifies(
    board: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    key, cert = board
    challenge = os.urandom(32)
    signature = _board_sign(key, challenge)
    assert len(signature) == 64
    assert verify_challenge(cert, challenge, signature) is None


def test_challenge_failures(board: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    key, cert = board
    challenge = os.urandom(32)
    signature = _board_sign(key, challenge)
    with pytest.raises(ChallengeFailedError, match="does not verify"):
        verify_challenge(cert, os.urandom(32), signature)
    flipped = bytearray(signature)
    flipped[40] ^= 0x80
    with pytest.raises(ChallengeFailedError, match="does not verify"):
        verify_challenge(cert, challenge, bytes(flipped))
    with pytest.raises(ChallengeFailedError, match="does not verify"):
        verify_challenge(cert, challenge, bytes(64))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ChallengeFailedError, match="does not verify"):
        verify_challenge(cert, challenge, _board_sign(other, challenge))
    with pytest.raises(ChallengeFailedError, match="must be 64 bytes"):
        verify_challenge(cert, challenge, key.sign(challenge, ec.ECDSA(hashes.SHA256())))  # DER, not raw


def test_short_challenge_is_a_programming_error(
    board: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    key, cert = board
    with pytest.raises(ValueError, match="at least 16 bytes"):
        verify_challenge(cert, b"short", _board_sign(key, b"short"))


def test_raw_der_round_trip_including_small_values() -> None:
    for raw in (bytes(31) + b"\x01" + bytes(31) + b"\x02", b"\xff" * 64, os.urandom(64)):
        assert der_to_raw_signature(raw_to_der_signature(raw)) == raw
    with pytest.raises(ValueError, match="64 bytes"):
        raw_to_der_signature(b"\x01" * 63)
    big = raw_to_der_signature(b"\x01" * 96, size=48)
    with pytest.raises(ValueError, match="do not fit"):
        der_to_raw_signature(big)
