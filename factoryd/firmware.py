"""Signed firmware images: what the station flashes and what a board's bootloader accepts.

An image is signed (ECDSA P-256 / SHA-256, raw r||s as secure elements use) with the customer's
firmware-signing key. The station checks the signature itself before flashing, and the board's
bootloader checks it again at FW_END.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from factoryd.errors import FirmwareRejectedError, InputError
from factoryd.files import write_private

RAW_SIGNATURE_BYTES = 64


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


def raw_signature(der_signature: bytes) -> bytes:
    """Convert a DER ECDSA P-256 signature to raw r||s."""
    r, s = decode_dss_signature(der_signature)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign_firmware(image: bytes, version: str, key: ec.EllipticCurvePrivateKey) -> SignedFirmware:
    """Sign an image with the firmware-signing key."""
    return SignedFirmware(image, version, raw_signature(key.sign(image, ec.ECDSA(hashes.SHA256()))))


def verify_firmware(image: bytes, signature: bytes, key: ec.EllipticCurvePublicKey) -> bool:
    """What the bootloader does at FW_END."""
    if len(signature) != RAW_SIGNATURE_BYTES:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, image, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class FirmwareStore:
    """Per-lot signed firmware on the station: image, signature, version and the signing public key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save(self, lot: str, firmware: SignedFirmware, signing_key: ec.EllipticCurvePublicKey) -> None:
        """Store a lot's image after checking its signature; refuse an image that does not verify."""
        if not verify_firmware(firmware.image, firmware.signature, signing_key):
            raise InputError(f"firmware {firmware.version} for lot {lot}: signature does not verify")
        folder = self.directory / lot
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = signing_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for name, data in (
            ("image.bin", firmware.image),
            ("image.sig", firmware.signature),
            ("version", firmware.version.encode()),
            ("signing-key.pem", pem),
        ):
            write_private(folder / name, data)

    def load(self, lot: str) -> SignedFirmware | None:
        """The lot's image, verified again against its signing key; None when the lot has none."""
        folder = self.directory / lot
        if not (folder / "image.bin").exists():
            return None
        firmware = SignedFirmware(
            (folder / "image.bin").read_bytes(),
            (folder / "version").read_text().strip(),
            (folder / "image.sig").read_bytes(),
        )
        key = serialization.load_pem_public_key((folder / "signing-key.pem").read_bytes())
        if not isinstance(key, ec.EllipticCurvePublicKey) or not verify_firmware(
            firmware.image, firmware.signature, key
        ):
            raise FirmwareRejectedError(f"stored firmware for lot {lot} no longer verifies", 0)
        return firmware
