"""A minimal MCUboot image signer for the simulator and the demo (the station itself never signs).

It writes what ``imgtool sign -k KEY -H HDR --pad-header -v VERSION -s auto`` writes for an
ECDSA P-256 key: header, body, a protected TLV area with the security counter, then the SHA256,
KEYHASH and ECDSA signature TLVs (layout in ``MCUBOOT_SMP.md``). ``imgtool verify`` accepts its
images (tests/test_firmware_upload.py). Written here rather than imported from imgtool, whose
Python API is a command line tool's internals, so that ``factoryd demo`` needs nothing beyond
``pip install factoryd``.
"""

from __future__ import annotations

import hashlib
import re
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from factoryd.errors import InputError
from factoryd.mcuboot import (
    HEADER_BYTES,
    IMAGE_MAGIC,
    TLV_INFO_MAGIC,
    TLV_PROT_INFO_MAGIC,
    TlvType,
)

# imgtool's usual -H for Zephyr images: room for the vector table alignment.
DEFAULT_HEADER_BYTES = 0x200
# imgtool --pad-header fills the header padding with the flash's erased value.
ERASED_BYTE = 0xFF
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:\+(\d+))?")
_HEADER = struct.Struct("<IIHHII BBHI I")


def parse_version(version: str) -> tuple[int, int, int, int]:
    """``major.minor.revision[+build]`` as imgtool reads it."""
    match = _VERSION.fullmatch(version)
    if match is None:
        raise InputError(f"image version {version!r} is not major.minor.revision[+build]")
    major, minor, revision, build = (int(g) if g else 0 for g in match.groups())
    if major > 0xFF or minor > 0xFF or revision > 0xFFFF or build > 0xFFFF_FFFF:
        raise InputError(f"image version {version!r} does not fit the MCUboot header")
    return major, minor, revision, build


def auto_security_counter(version: str) -> int:
    """imgtool's ``-s auto``: major<<24 | minor<<16 | revision."""
    major, minor, revision, _ = parse_version(version)
    return major << 24 | minor << 16 | revision


def _tlv(tlv_type: int, value: bytes) -> bytes:
    return struct.pack("<HH", tlv_type, len(value)) + value


def sign_image(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey,
    version: str,
    *,
    header_bytes: int = DEFAULT_HEADER_BYTES,
    security_counter: int | None = None,
    load_addr: int = 0,
) -> bytes:
    """An MCUboot image of ``payload`` signed with ``key`` (counter: ``-s auto`` unless given)."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise InputError(f"the simulator signs with ECDSA P-256 only, not {key.curve.name}")
    if not HEADER_BYTES <= header_bytes <= 0xFFFF:
        raise InputError(f"header size {header_bytes} must be {HEADER_BYTES}..65535 bytes")
    major, minor, revision, build = parse_version(version)
    counter = auto_security_counter(version) if security_counter is None else security_counter
    protected_tlvs = _tlv(TlvType.SEC_CNT, struct.pack("<I", counter))
    protected = struct.pack("<HH", TLV_PROT_INFO_MAGIC, 4 + len(protected_tlvs)) + protected_tlvs
    header = _HEADER.pack(
        IMAGE_MAGIC,
        load_addr,
        header_bytes,
        len(protected),
        len(payload),
        0,
        major,
        minor,
        revision,
        build,
        0,
    )
    signed = header + bytes([ERASED_BYTE]) * (header_bytes - HEADER_BYTES) + payload + protected
    digest = hashlib.sha256(signed).digest()
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    tlvs = (
        _tlv(TlvType.SHA256, digest)
        + _tlv(TlvType.KEYHASH, hashlib.sha256(public_der).digest())
        + _tlv(TlvType.ECDSA_SIG, signature)
    )
    return signed + struct.pack("<HH", TLV_INFO_MAGIC, 4 + len(tlvs)) + tlvs
