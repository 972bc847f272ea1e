"""Firmware images for the simulated bootloader: signed with a firmware-signing key (P-256)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from factoryd.sim.secure_element import raw_signature

FACTORY_FW_VERSION = "1.0.0-factory"
# What a board that left the board maker runs: a fixed placeholder image.
FACTORY_FW_IMAGE = b"factoryd-sim provisioning firmware " + FACTORY_FW_VERSION.encode()


@dataclass(frozen=True)
class SignedFirmware:
    """An image with its raw r||s signature."""

    image: bytes
    version: str
    signature: bytes

    @property
    def sha256(self) -> bytes:
        """Digest the board reports once installed."""
        return hashlib.sha256(self.image).digest()


def sign_firmware(image: bytes, version: str, key: ec.EllipticCurvePrivateKey) -> SignedFirmware:
    """Sign an image with the firmware-signing key."""
    return SignedFirmware(image, version, raw_signature(key.sign(image, ec.ECDSA(hashes.SHA256()))))


def verify_firmware(image: bytes, signature: bytes, key: ec.EllipticCurvePublicKey) -> bool:
    """What the bootloader does at FW_END."""
    if len(signature) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, image, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
