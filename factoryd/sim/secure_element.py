"""A simulated secure element: keys made inside and never exported, a serial, an irreversible lock."""

from __future__ import annotations

import hashlib
import random
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.pki.challenge import der_to_raw_signature
from factoryd.protocol.messages import ObjectId

# ATECC508/608 serial numbers are 9 bytes and start with 0x01 0x23.
SE_SERIAL_PREFIX = b"\x01\x23"
SE_SERIAL_LEN = 9
KEY_SLOTS = 2


class SeRefusal(Exception):  # noqa: N818 - a board-internal signal, mapped to a status code
    """The secure element refuses an operation; carries the protocol status name."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def new_se_serial() -> bytes:
    """A random serial in the ATECC format."""
    return SE_SERIAL_PREFIX + secrets.token_bytes(SE_SERIAL_LEN - len(SE_SERIAL_PREFIX))


def seeded_se_serial(seed: int) -> bytes:
    """A serial in the ATECC format that depends on ``seed`` alone (reproducible simulated lines)."""
    # Not a secret: a simulated part's serial, reproducible on purpose.
    rng = random.Random(seed)  # noqa: S311
    return SE_SERIAL_PREFIX + rng.randbytes(SE_SERIAL_LEN - len(SE_SERIAL_PREFIX))


@dataclass
class SimSecureElement:
    """Keys live in ``_keys`` and only public parts, CSRs and signatures come out."""

    serial: bytes = field(default_factory=new_se_serial)
    locked: bool = False
    objects: dict[ObjectId, bytes] = field(default_factory=dict)
    _keys: dict[int, ec.EllipticCurvePrivateKey] = field(default_factory=dict, repr=False)

    def genkey(self, slot: int) -> bytes:
        """Make a new P-256 key in a slot; return the uncompressed public point."""
        self._check_slot(slot)
        if self.locked:
            raise SeRefusal("LOCKED")
        self._keys[slot] = ec.generate_private_key(ec.SECP256R1())
        return self.public_point(slot)

    def has_key(self, slot: int) -> bool:
        """Whether the slot holds a key."""
        return slot in self._keys

    def public_point(self, slot: int) -> bytes:
        """The slot's public key as an uncompressed point."""
        return (
            self._key(slot)
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )

    def csr(self, slot: int, common_name: str) -> bytes:
        """A DER CSR with subject CN=common_name, signed by the slot key."""
        return make_csr(self._key(slot), common_name)

    def sign(self, slot: int, message: bytes) -> bytes:
        """Raw r||s ECDSA-SHA256 signature by the slot key."""
        return der_to_raw_signature(self._key(slot).sign(message, ec.ECDSA(hashes.SHA256())))

    def store(self, obj: ObjectId, data: bytes) -> bytes:
        """Store an object; return the digest of what was stored."""
        if self.locked:
            raise SeRefusal("LOCKED")
        self.objects[obj] = data
        return hashlib.sha256(data).digest()

    def lock(self) -> None:
        """Lock for good."""
        self.locked = True

    def _key(self, slot: int) -> ec.EllipticCurvePrivateKey:
        self._check_slot(slot)
        key = self._keys.get(slot)
        if key is None:
            raise SeRefusal("NO_KEY")
        return key

    @staticmethod
    def _check_slot(slot: int) -> None:
        if not 0 <= slot < KEY_SLOTS:
            raise SeRefusal("BAD_ARGUMENT")


def make_csr(key: ec.EllipticCurvePrivateKey | object, common_name: str) -> bytes:
    """Build a minimal DER CSR (used by the secure element and by fault injection)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    csr = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)
