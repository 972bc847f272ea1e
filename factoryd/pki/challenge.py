"""Challenge verification: the board proves it holds the key of its new certificate."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from factoryd.errors import ChallengeFailedError

P256_COORDINATE_BYTES = 32
# A shorter nonce could repeat across boards and make a recorded answer replayable.
MIN_CHALLENGE_BYTES = 16


def raw_to_der_signature(raw: bytes, size: int = P256_COORDINATE_BYTES) -> bytes:
    """Convert an r||s signature (2*size bytes, as secure elements emit) to DER."""
    if len(raw) != 2 * size:
        raise ValueError(f"raw signature must be {2 * size} bytes, got {len(raw)}")
    r = int.from_bytes(raw[:size], "big")
    s = int.from_bytes(raw[size:], "big")
    return encode_dss_signature(r, s)


def der_to_raw_signature(der: bytes, size: int = P256_COORDINATE_BYTES) -> bytes:
    """Convert a DER ECDSA signature to r||s with each half ``size`` bytes."""
    r, s = decode_dss_signature(der)
    if r.bit_length() > 8 * size or s.bit_length() > 8 * size:
        raise ValueError(f"signature values do not fit in {size} bytes")
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify_challenge(cert: x509.Certificate, challenge: bytes, signature: bytes) -> None:
    """Check a raw r||s ECDSA P-256 signature over SHA-256(challenge) with the certificate's key."""
    if len(challenge) < MIN_CHALLENGE_BYTES:
        raise ValueError(f"challenge must be at least {MIN_CHALLENGE_BYTES} bytes")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise ChallengeFailedError("the certificate's key is not EC P-256")
    if len(signature) != 2 * P256_COORDINATE_BYTES:
        raise ChallengeFailedError(
            f"challenge signature must be {2 * P256_COORDINATE_BYTES} bytes (r||s), got {len(signature)}"
        )
    try:
        public_key.verify(raw_to_der_signature(signature), challenge, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ChallengeFailedError(
            "challenge signature does not verify with the issued certificate"
        ) from None
