"""Detached signatures of customer ID lists: ECDSA P-256 / SHA-256, DER-encoded."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.errors import IdListError


def load_customer_key(public_key_pem: bytes) -> ec.EllipticCurvePublicKey:
    """Load a customer's list-signing key, refusing anything but an EC P-256 public key."""
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise IdListError(f"the customer public key is not a PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdListError("the customer public key must be an EC P-256 (secp256r1) key")
    return key


def verify_list_signature(data: bytes, signature_der: bytes, public_key_pem: bytes) -> None:
    """Check a detached DER ECDSA-P256-SHA256 signature over the exact list bytes."""
    key = load_customer_key(public_key_pem)
    try:
        key.verify(signature_der, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise IdListError(
            "the ID list's signature does not verify with the customer public key; nothing was imported"
        ) from exc
