"""MCUboot images: parse and verify a signed image as MCUboot's bootutil does, with no I/O.

Layout (little-endian; facts in ``MCUBOOT_SMP.md``, refusals in ``docs/firmware.md``)::

    header (hdr_size) | body (img_size) | protected TLVs (0x6908) | TLVs (0x6907) | ... | trailer

:func:`verify_image` is what the bootloader checks: structure, the SHA-256 over exactly
``[0, hdr_size + img_size + protect_tlv_size)``, the key (KEYHASH or PUBKEY) against the lot's
firmware-signing key and the signature. :func:`check_image_policy` adds what the station requires
of a lot's image on top (ECDSA P-256, not encrypted, bootable, counter, slot size).
:func:`verify_lot_image` runs both. Every length is checked before it is used: bad input raises
:class:`McubootImageError` and nothing else.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag, StrEnum

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from factoryd.errors import InputError

IMAGE_MAGIC = 0x96F3B83D
HEADER_BYTES = 32  # struct image_header; hdr_size may be larger (padding up to the vector table)
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_INFO_BYTES = 4  # u16 magic, u16 total size including this info
TLV_HEADER_BYTES = 4  # u16 type, u16 length
SEC_CNT_BYTES = 4
# MCUboot's ECDSA signature buffer (SIG_BUF_SIZE in image_validate.c); DER r,s of P-256 is 70-72 bytes.
ECDSA_SIG_MAX_BYTES = 128
ED25519_SIG_BYTES = 64
# imgtool's swap trailer defaults (`sign -M 128 --align 1 --max-align 8`), see swap_trailer_bytes().
DEFAULT_MAX_SECTORS = 128
DEFAULT_ALIGN_BYTES = 1
DEFAULT_MAX_ALIGN_BYTES = 8
TRAILER_MAGIC_BYTES = 16
_HEADER = struct.Struct("<IIHHII BBHI I")
_TLV = struct.Struct("<HH")


class McubootImageError(InputError):
    """An MCUboot image was refused; the message names exactly what is wrong."""


class TlvType(IntEnum):
    """TLV types of bootutil/image.h (u16 on the wire)."""

    KEYHASH = 0x01
    PUBKEY = 0x02
    SHA256 = 0x10
    SHA384 = 0x11
    SHA512 = 0x12
    RSA2048 = 0x20
    ECDSA224 = 0x21
    ECDSA_SIG = 0x22
    RSA3072 = 0x23
    ED25519 = 0x24
    SIG_PURE = 0x25
    ENC_RSA2048 = 0x30
    ENC_KW = 0x31
    ENC_EC256 = 0x32
    ENC_X25519 = 0x33
    ENC_X25519_SHA512 = 0x34
    DEPENDENCY = 0x40
    SEC_CNT = 0x50
    BOOT_RECORD = 0x60
    DECOMP_SIZE = 0x70
    DECOMP_SHA = 0x71
    DECOMP_SIGNATURE = 0x72


class ImageFlag(IntFlag):
    """Header flags (ih_flags)."""

    PIC = 0x01
    ENCRYPTED_AES128 = 0x04
    ENCRYPTED_AES256 = 0x08
    NON_BOOTABLE = 0x10
    RAM_LOAD = 0x20
    ROM_FIXED = 0x100
    COMPRESSED_LZMA1 = 0x200
    COMPRESSED_LZMA2 = 0x400
    COMPRESSED_ARM_THUMB = 0x800


class SignatureType(StrEnum):
    """The signature algorithms MCUboot builds can verify (one per build)."""

    ECDSA_P256 = "ECDSA P-256"
    ECDSA_P384 = "ECDSA P-384"
    RSA_2048 = "RSA-2048"
    RSA_3072 = "RSA-3072"
    ED25519 = "Ed25519"


class KeyFormat(StrEnum):
    """How an image names its signing key (imgtool `--public-key-format`); an MCUboot build takes one."""

    HASH = "hash"  # KEYHASH TLV: stock MCUboot, keys built into the bootloader
    FULL = "full"  # PUBKEY TLV: MCUBOOT_HW_KEY builds, which check the key against a hash in hardware


SigningPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_ENCRYPTED_FLAGS = ImageFlag.ENCRYPTED_AES128 | ImageFlag.ENCRYPTED_AES256
_KEY_FORMAT_WORDS = {KeyFormat.HASH: "by its hash (KEYHASH TLV)", KeyFormat.FULL: "in full (PUBKEY TLV)"}
_ENCRYPTION_FLAG_NAMES = (
    (ImageFlag.ENCRYPTED_AES128, "AES-128 flag"),
    (ImageFlag.ENCRYPTED_AES256, "AES-256 flag"),
)
_COMPRESSED_FLAGS = ImageFlag.COMPRESSED_LZMA1 | ImageFlag.COMPRESSED_LZMA2 | ImageFlag.COMPRESSED_ARM_THUMB
_ENC_TLVS = frozenset(
    {TlvType.ENC_RSA2048, TlvType.ENC_KW, TlvType.ENC_EC256, TlvType.ENC_X25519, TlvType.ENC_X25519_SHA512}
)
_SIG_TLVS = frozenset(
    {TlvType.RSA2048, TlvType.ECDSA224, TlvType.ECDSA_SIG, TlvType.RSA3072, TlvType.ED25519}
)
# MCUBOOT_USE_TLV_ALLOW_LIST: only these may sit in the unprotected area, which the signature does not
# cover. Anything else there (a SEC_CNT, a DEPENDENCY) could be added or changed by anyone.
_UNPROTECTED_ALLOWED = frozenset(
    {
        TlvType.KEYHASH,
        TlvType.PUBKEY,
        TlvType.SHA256,
        TlvType.SHA384,
        TlvType.SHA512,
        TlvType.SIG_PURE,
        *_SIG_TLVS,
        *_ENC_TLVS,
    }
)
_HASH_TLV = {
    SignatureType.ECDSA_P256: TlvType.SHA256,
    SignatureType.ECDSA_P384: TlvType.SHA384,
    SignatureType.RSA_2048: TlvType.SHA256,
    SignatureType.RSA_3072: TlvType.SHA256,
    SignatureType.ED25519: TlvType.SHA256,
}
_SIG_TLV = {
    SignatureType.ECDSA_P256: TlvType.ECDSA_SIG,
    SignatureType.ECDSA_P384: TlvType.ECDSA_SIG,
    SignatureType.RSA_2048: TlvType.RSA2048,
    SignatureType.RSA_3072: TlvType.RSA3072,
    SignatureType.ED25519: TlvType.ED25519,
}


@dataclass(frozen=True)
class McubootImage:
    """A verified MCUboot image: what the lot profile records and the firmware step compares."""

    version: str  # "1.2.3+4", as imgtool prints it
    version_tuple: tuple[int, int, int]  # (major, minor, revision)
    build: int
    hash: str  # hex SHA-256 (SHA-384 for P-384): the SHA256 TLV, SMP's image "hash"
    security_counter: int | None  # protected SEC_CNT; None when the image carries none
    hdr_size: int
    img_size: int
    protect_tlv_size: int
    load_addr: int
    flags: int
    key_hash: str  # hex hash of the signing key as MCUboot embeds it (SubjectPublicKeyInfo DER)
    key_format: KeyFormat  # the key TLV before the valid signature: KEYHASH or PUBKEY
    signature_type: SignatureType
    total_size: int  # header + body + both TLV areas: what must fit the slot before its trailer
    file_size: int  # total_size plus any padding (`imgtool sign --pad`) or trailing bytes
    tlv_types: tuple[int, ...]  # every TLV's type in file order, protected area first


@dataclass(frozen=True)
class _Tlv:
    type: int
    offset: int  # of the value
    value: bytes


def _tlv_name(tlv_type: int) -> str:
    try:
        return f"{TlvType(tlv_type).name} (0x{tlv_type:02x})"
    except ValueError:
        return f"0x{tlv_type:02x}"


def signature_type_of(key: SigningPublicKey) -> SignatureType:
    """The MCUboot signature type a public key verifies; refuse key types MCUboot cannot use."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return SignatureType.ECDSA_P256
        if isinstance(key.curve, ec.SECP384R1):
            return SignatureType.ECDSA_P384
        raise McubootImageError(f"MCUboot has no signature type for an EC key on curve {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size == 2048:
            return SignatureType.RSA_2048
        if key.key_size == 3072:
            return SignatureType.RSA_3072
        raise McubootImageError(f"MCUboot has no signature type for an RSA-{key.key_size} key")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return SignatureType.ED25519
    raise McubootImageError(f"MCUboot has no signature type for a {type(key).__name__}")


def public_key_bytes(key: SigningPublicKey) -> bytes:
    """The key as MCUboot embeds it and as PUBKEY carries it: SubjectPublicKeyInfo DER, PKCS#1 for RSA."""
    fmt = (
        serialization.PublicFormat.PKCS1
        if isinstance(key, rsa.RSAPublicKey)
        else serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key.public_bytes(serialization.Encoding.DER, fmt)


def _digest(hash_tlv: TlvType, data: bytes) -> bytes:
    if hash_tlv == TlvType.SHA384:
        return hashlib.sha384(data).digest()
    return hashlib.sha256(data).digest()


def signing_key_hash(key: SigningPublicKey) -> str:
    """The KEYHASH an image signed by this key carries (hex), as `imgtool getpubhash` prints it."""
    return _digest(_HASH_TLV[signature_type_of(key)], public_key_bytes(key)).hex()


def swap_trailer_bytes(
    *,
    align: int = DEFAULT_ALIGN_BYTES,
    max_align: int = DEFAULT_MAX_ALIGN_BYTES,
    max_sectors: int = DEFAULT_MAX_SECTORS,
) -> int:
    """Bytes MCUboot's swap trailer takes at the slot end, computed as imgtool does (0x1B0 by default)."""
    if align not in {1, 2, 4, 8, 16, 32} or max_align not in {8, 16, 32} or max_sectors < 1:
        raise McubootImageError(
            f"invalid trailer geometry: align {align}, max_align {max_align}, max_sectors {max_sectors}"
        )
    magic_bytes = -(-TRAILER_MAGIC_BYTES // max_align) * max_align
    # swap status (3 entries per sector), image_ok/copy_done/swap_info/swap_size, magic
    return max_sectors * 3 * align + 4 * max_align + magic_bytes


DEFAULT_TRAILER_BYTES = swap_trailer_bytes()


def _read_area(data: bytes, offset: int, *, protected: bool) -> tuple[int, list[_Tlv]]:
    """Parse one TLV area whose info starts at ``offset``; return its end and its TLVs."""
    name = "protected TLV area" if protected else "TLV area"
    (total,) = struct.unpack_from("<H", data, offset + 2)  # _area_magic checked the info is in the file
    if total < TLV_INFO_BYTES:
        raise McubootImageError(
            f"{name} at offset 0x{offset:x} says it is {total} bytes, "
            f"smaller than its {TLV_INFO_BYTES}-byte info"
        )
    end = offset + total
    if end > len(data):
        raise McubootImageError(
            f"{name} at offset 0x{offset:x} ({total} bytes) runs past the end of the file "
            f"({len(data)} bytes): the file is truncated"
        )
    tlvs: list[_Tlv] = []
    pos = offset + TLV_INFO_BYTES
    while pos < end:
        if pos + TLV_HEADER_BYTES > end:
            raise McubootImageError(f"TLV header at offset 0x{pos:x} runs past the end of the {name}")
        tlv_type, length = _TLV.unpack_from(data, pos)
        value_at = pos + TLV_HEADER_BYTES
        if value_at + length > end:
            limit = "the file" if value_at + length > len(data) else f"the {name} (0x{end:x})"
            raise McubootImageError(
                f"TLV {_tlv_name(tlv_type)} at offset 0x{pos:x} (length {length}) "
                f"runs past the end of {limit}"
            )
        tlvs.append(_Tlv(tlv_type, value_at, data[value_at : value_at + length]))
        pos = value_at + length
    return end, tlvs


def _parse_areas(data: bytes, tlv_off: int, protect_tlv_size: int) -> tuple[int, list[_Tlv]]:
    """Both TLV areas after the body, as bootutil_tlv_iter_begin reads them; return end and TLVs."""
    tlvs: list[_Tlv] = []
    magic = _area_magic(data, tlv_off)
    if magic == TLV_PROT_INFO_MAGIC:
        (total,) = struct.unpack_from("<H", data, tlv_off + 2)
        if total != protect_tlv_size:
            raise McubootImageError(
                f"protected TLV area is {total} bytes but the header says protect_tlv_size {protect_tlv_size}"
            )
        tlv_off, tlvs = _read_area(data, tlv_off, protected=True)
        magic = _area_magic(data, tlv_off)
    elif protect_tlv_size != 0:
        raise McubootImageError(
            f"bad TLV area magic 0x{magic:04X} at offset 0x{tlv_off:x}: the header says protect_tlv_size "
            f"{protect_tlv_size}, so a protected TLV area (0x{TLV_PROT_INFO_MAGIC:04X}) must start there"
        )
    if magic != TLV_INFO_MAGIC:
        raise McubootImageError(
            f"bad TLV area magic 0x{magic:04X} at offset 0x{tlv_off:x} (expected 0x{TLV_INFO_MAGIC:04X})"
        )
    end, unprotected = _read_area(data, tlv_off, protected=False)
    for tlv in unprotected:
        if tlv.type not in _UNPROTECTED_ALLOWED:
            raise McubootImageError(
                f"TLV {_tlv_name(tlv.type)} at offset 0x{tlv.offset - TLV_HEADER_BYTES:x} is in the "
                "unprotected TLV area, which the signature does not cover; MCUboot accepts it only "
                "in the protected area"
            )
    return end, tlvs + unprotected


def _area_magic(data: bytes, offset: int) -> int:
    """The magic of the TLV area info at ``offset``; refuse a file that ends before it."""
    if offset + TLV_INFO_BYTES > len(data):
        raise McubootImageError(
            f"TLV area info at offset 0x{offset:x} runs past the end of the file ({len(data)} bytes)"
        )
    magic: int = struct.unpack_from("<H", data, offset)[0]
    return magic


def _image_signature_type(tlvs: list[_Tlv]) -> SignatureType | None:
    """The algorithm the image's first signature TLV uses (ECDSA P-256 vs P-384 by its hash TLV)."""
    types = {t.type for t in tlvs}
    for tlv in tlvs:
        if tlv.type == TlvType.ECDSA_SIG:
            return SignatureType.ECDSA_P384 if TlvType.SHA384 in types else SignatureType.ECDSA_P256
        if tlv.type == TlvType.RSA2048:
            return SignatureType.RSA_2048
        if tlv.type == TlvType.RSA3072:
            return SignatureType.RSA_3072
        if tlv.type == TlvType.ED25519:
            return SignatureType.ED25519
        if tlv.type == TlvType.ECDSA224:
            raise McubootImageError(
                "image is signed with ECDSA P-224, which current MCUboot no longer supports"
            )
    return None


def _strip_ecdsa_padding(sig: bytes) -> bytes:
    """Drop the 0-2 zero bytes `imgtool sign --pad-sig` appends after the DER SEQUENCE (MCUboot < 1.5)."""
    if len(sig) >= 2 and sig[0] == 0x30 and sig[1] < 0x80:
        end = sig[1] + 2
        if end <= len(sig) and not any(sig[end:]):
            return sig[:end]
    return sig


def _signature_valid(key: SigningPublicKey, kind: SignatureType, sig: bytes, digest: bytes) -> bool:
    """Verify a signature over the image digest as bootutil_verify_sig does for each algorithm."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if len(sig) > ECDSA_SIG_MAX_BYTES:
                return False
            algorithm = hashes.SHA384() if kind == SignatureType.ECDSA_P384 else hashes.SHA256()
            key.verify(_strip_ecdsa_padding(sig), digest, ec.ECDSA(Prehashed(algorithm)))
        elif isinstance(key, rsa.RSAPublicKey):
            if len(sig) != key.key_size // 8:
                return False
            # bootutil's RSA-PSS: MGF1-SHA256, salt length fixed at 32 bytes.
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            key.verify(sig, digest, pss, Prehashed(hashes.SHA256()))
        else:
            if len(sig) != ED25519_SIG_BYTES:
                return False
            # Non-pure Ed25519 in MCUboot signs the SHA-256 digest as the message.
            key.verify(sig, digest)
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _check_signature(
    tlvs: list[_Tlv], signing_key: SigningPublicKey, lot_type: SignatureType, digest: bytes
) -> tuple[KeyFormat, bytes]:
    """Find a signature by the lot's key as bootutil_img_validate does; return the key TLV kind and hash."""
    hash_tlv, sig_tlv = _HASH_TLV[lot_type], _SIG_TLV[lot_type]
    lot_key = public_key_bytes(signing_key)
    lot_key_hash = _digest(hash_tlv, lot_key)
    foreign_key_hash: bytes | None = None  # the first key TLV naming another key
    names_lot_key = False  # some key TLV names the lot's key
    checked = False  # a signature TLV followed such a key TLV
    valid: KeyFormat | None = None  # set by the first signature that verifies
    key_matches: KeyFormat | None = None  # the key TLV just seen names the lot's key
    # A signature counts only right after a key TLV naming the lot's key (MCUboot's key_id).
    for tlv in tlvs:
        if tlv.type in {TlvType.KEYHASH, TlvType.PUBKEY}:
            if tlv.type == TlvType.KEYHASH and len(tlv.value) != len(digest):
                raise McubootImageError(f"KEYHASH TLV is {len(tlv.value)} bytes, expected {len(digest)}")
            named = KeyFormat.HASH if tlv.type == TlvType.KEYHASH else KeyFormat.FULL
            expected = lot_key_hash if named == KeyFormat.HASH else lot_key
            key_matches = named if tlv.value == expected else None
            names_lot_key = names_lot_key or key_matches is not None
            if key_matches is None and foreign_key_hash is None:
                foreign_key_hash = tlv.value if named == KeyFormat.HASH else _digest(hash_tlv, tlv.value)
        elif tlv.type == sig_tlv:
            if key_matches is not None:
                checked = True
                if valid is None and _signature_valid(signing_key, lot_type, tlv.value, digest):
                    valid = key_matches
            key_matches = None
    if valid is not None:
        return valid, lot_key_hash
    if checked:
        raise McubootImageError(f"the {lot_type} signature does not verify with the lot's key")
    if names_lot_key:
        raise McubootImageError(f"no {lot_type} signature TLV follows the TLV naming the lot's key")
    if foreign_key_hash is None:
        raise McubootImageError("image carries no KEYHASH or PUBKEY TLV naming its signing key")
    raise McubootImageError(
        f"signed by a different key (key hash {foreign_key_hash.hex()[:16]}…; "
        f"the lot's key hash is {lot_key_hash.hex()[:16]}…)"
    )


def _security_counter(tlvs: list[_Tlv]) -> int | None:
    """The image's SEC_CNT (the allow list keeps it in the protected area), None without one."""
    counters = [t for t in tlvs if t.type == TlvType.SEC_CNT]
    if not counters:
        return None
    if len(counters) > 1:
        raise McubootImageError(
            f"image carries {len(counters)} SEC_CNT TLVs; the security counter to record is ambiguous"
        )
    if len(counters[0].value) != SEC_CNT_BYTES:
        raise McubootImageError(f"SEC_CNT TLV is {len(counters[0].value)} bytes, expected {SEC_CNT_BYTES}")
    counter: int = struct.unpack("<I", counters[0].value)[0]
    return counter


def verify_image(data: bytes, signing_key: SigningPublicKey) -> McubootImage:
    """Check an image as MCUboot does (structure, hash, key, signature); refuse it with the reason."""
    size = len(data)
    if size < HEADER_BYTES:
        raise McubootImageError(
            f"file is {size} bytes, shorter than the {HEADER_BYTES}-byte MCUboot image header"
        )
    (magic, load_addr, hdr_size, protect_tlv_size, img_size, flags, major, minor, revision, build, _) = (
        _HEADER.unpack_from(data, 0)
    )
    if magic != IMAGE_MAGIC:
        raise McubootImageError(
            f"bad header magic 0x{magic:08X}: not an MCUboot image (expected 0x{IMAGE_MAGIC:08X})"
        )
    if hdr_size < HEADER_BYTES:
        raise McubootImageError(
            f"header size {hdr_size} is smaller than the {HEADER_BYTES}-byte image header"
        )
    if hdr_size > size:
        raise McubootImageError(f"header size {hdr_size} runs past the end of the file ({size} bytes)")
    tlv_off = hdr_size + img_size
    if tlv_off > size:
        raise McubootImageError(
            f"image body (img_size {img_size}) at offset 0x{hdr_size:x} runs past the end of the file "
            f"({size} bytes)"
        )
    total_size, tlvs = _parse_areas(data, tlv_off, protect_tlv_size)

    lot_type = signature_type_of(signing_key)
    if any(t.type == TlvType.SIG_PURE for t in tlvs):
        raise McubootImageError(
            "image has a pure signature (SIG_PURE TLV), which the station does not verify"
        )
    image_type = _image_signature_type(tlvs)
    if image_type is None:
        raise McubootImageError("image carries no signature TLV: it is unsigned")
    sig_tlv = _SIG_TLV[lot_type]
    hash_tlv = _HASH_TLV[lot_type]
    types = {t.type for t in tlvs}
    # A multi-signature image may carry the lot's algorithm after another one.
    if image_type != lot_type and not (sig_tlv in types and hash_tlv in types):
        raise McubootImageError(f"image is signed with {image_type}; the lot expects {lot_type}")
    hash_tlvs = [t for t in tlvs if t.type == hash_tlv]
    if not hash_tlvs:
        raise McubootImageError(f"image carries no {hash_tlv.name} TLV: MCUboot needs the image hash")
    digest = _digest(hash_tlv, data[: tlv_off + protect_tlv_size])
    for tlv in hash_tlvs:  # MCUboot checks every one
        if len(tlv.value) != len(digest):
            raise McubootImageError(f"{hash_tlv.name} TLV is {len(tlv.value)} bytes, expected {len(digest)}")
        if tlv.value != digest:
            hint = (
                ": the image is encrypted, and the hash covers the plaintext "
                "(encrypted images are not supported)"
                if flags & _ENCRYPTED_FLAGS
                else ""
            )
            raise McubootImageError(f"image hash does not match the {hash_tlv.name} TLV{hint}")

    key_format, lot_key_hash = _check_signature(tlvs, signing_key, lot_type, digest)
    counter = _security_counter(tlvs)

    return McubootImage(
        version=f"{major}.{minor}.{revision}+{build}",
        version_tuple=(major, minor, revision),
        build=build,
        hash=digest.hex(),
        security_counter=counter,
        hdr_size=hdr_size,
        img_size=img_size,
        protect_tlv_size=protect_tlv_size,
        load_addr=load_addr,
        flags=flags,
        key_hash=lot_key_hash.hex(),
        key_format=key_format,
        signature_type=lot_type,
        total_size=total_size,
        file_size=size,
        tlv_types=tuple(t.type for t in tlvs),
    )


def check_image_policy(
    image: McubootImage,
    *,
    slot_size: int,
    previous_security_counter: int | None = None,
    trailer_bytes: int = DEFAULT_TRAILER_BYTES,
    key_format: KeyFormat = KeyFormat.HASH,
) -> None:
    """Refuse a verified image the station must not flash to a lot's boards; the message says why."""
    if image.signature_type != SignatureType.ECDSA_P256:
        raise McubootImageError(
            f"image is signed with {image.signature_type}; the lot expects {SignatureType.ECDSA_P256}"
        )
    if image.key_format != key_format:
        raise McubootImageError(
            f"image names its signing key {_KEY_FORMAT_WORDS[image.key_format]}, but the lot's bootloader "
            f"expects it {_KEY_FORMAT_WORDS[key_format]}: sign with --public-key-format {key_format}"
        )
    encryption = [name for flag, name in _ENCRYPTION_FLAG_NAMES if image.flags & flag] + [
        f"{TlvType(t).name} TLV" for t in image.tlv_types if t in _ENC_TLVS
    ]
    if encryption:
        raise McubootImageError(
            f"image is marked encrypted ({', '.join(encryption)}); the station does not support encrypted "
            "images: it cannot check an encrypted body, and MCUboot decrypts any image so marked when it "
            "installs it. Sign the image without -E/--encrypt"
        )
    if image.flags & ImageFlag.NON_BOOTABLE:
        raise McubootImageError("image is marked non-bootable (flag 0x10); the lot needs a bootable image")
    if image.flags & _COMPRESSED_FLAGS:
        raise McubootImageError(
            "image is compressed (LZMA flags); the station does not support compressed images"
        )
    if previous_security_counter is not None:
        if image.security_counter is None:
            raise McubootImageError(
                "image has no security counter (SEC_CNT TLV); the lot's previous image had "
                f"{previous_security_counter}"
            )
        if image.security_counter < previous_security_counter:
            raise McubootImageError(
                f"security counter {image.security_counter} is lower than the lot's previous image "
                f"({previous_security_counter})"
            )
    if slot_size <= 0 or trailer_bytes < 0:
        raise McubootImageError(f"invalid slot geometry: slot size {slot_size}, trailer {trailer_bytes}")
    if image.total_size + trailer_bytes > slot_size:
        raise McubootImageError(
            f"image is {image.total_size} bytes (0x{image.total_size:x}); with the {trailer_bytes}-byte "
            f"trailer it does not fit the {slot_size}-byte (0x{slot_size:x}) slot"
        )
    if image.file_size > slot_size:
        raise McubootImageError(
            f"file is {image.file_size} bytes (0x{image.file_size:x}), larger than the {slot_size}-byte "
            f"(0x{slot_size:x}) slot"
        )


def verify_lot_image(
    data: bytes,
    signing_key: SigningPublicKey,
    *,
    slot_size: int,
    previous_security_counter: int | None = None,
    trailer_bytes: int = DEFAULT_TRAILER_BYTES,
    key_format: KeyFormat = KeyFormat.HASH,
) -> McubootImage:
    """Verify an image as MCUboot does, then apply the station's lot policy; return what to record."""
    image = verify_image(data, signing_key)
    check_image_policy(
        image,
        slot_size=slot_size,
        previous_security_counter=previous_security_counter,
        trailer_bytes=trailer_bytes,
        key_format=key_format,
    )
    return image
