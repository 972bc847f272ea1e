"""A simulated secure element: keys made inside and never exported, a serial, an irreversible lock.

A genuine part also carries a device-unique attestation key and its certificate chain from a chip
vendor's CA (``SimVendorCa``, a test vendor the demo and the tests make): ``attest`` generates a key
and signs the statement of ``factoryd.pki.attestation`` over the station's nonce, its serial and
the new public key. A part without an attestation key (a clone) refuses with NO_KEY.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.pki.attestation import statement_bytes
from factoryd.pki.challenge import der_to_raw_signature
from factoryd.pki.testca import make_ca_cert
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
    # Provisioned by the chip vendor (SimVendorCa.provision); None on a clone.
    attestation_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    attestation_chain: tuple[bytes, ...] = ()

    @property
    def serial_text(self) -> str:
        """The serial as the statement and the attestation certificate name it (lowercase hex)."""
        return self.serial.hex()

    def attest(self, slot: int, nonce: bytes) -> tuple[bytes, bytes]:
        """Make a new key in a slot and attest it: (public point, DER signature of the statement)."""
        if self.attestation_key is None or not self.attestation_chain:
            raise SeRefusal("NO_KEY")
        point = self.genkey(slot)
        message = statement_bytes(slot, nonce, self.serial_text, point)
        return point, self.attestation_key.sign(message, ec.ECDSA(hashes.SHA256()))

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


# Simulated chip vendors ----------------------------------------------------------------------------

# A genuine part's attestation certificate outlives any line run: 20 years (Trust M's lifetime).
ATTESTATION_CERT_DAYS = 20 * 366


@dataclass(frozen=True, repr=False)
class SimVendorCa:
    """A test chip vendor: root → attestation signer (pathLen 0) → one attestation cert per part."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey
    signer_cert: x509.Certificate

    @classmethod
    def make(cls, name: str = "factoryd Test SE Vendor", *, seed: int | None = None) -> SimVendorCa:
        """A vendor CA (P-256); with ``seed`` its keys depend on (name, seed) alone (the demo's runs)."""
        now = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
        root_key = _vendor_key(name, seed, "root")
        signer_key = _vendor_key(name, seed, "signer")
        root = make_ca_cert(
            _vendor_name(name, f"{name} Root CA"), root_key, serial=0x5EC1,
            not_before=now, not_after=now + dt.timedelta(days=40 * 366), digital_signature=False,
        )  # fmt: skip
        signer = make_ca_cert(
            _vendor_name(name, f"{name} Attestation Signer"), signer_key, issuer=root, issuer_key=root_key,
            serial=0x5EC2, not_before=now, not_after=now + dt.timedelta(days=30 * 366), path_length=0,
            digital_signature=False,
        )  # fmt: skip
        return cls(root_key, root, signer_key, signer)

    @property
    def root_pem(self) -> bytes:
        """The root as PEM (what a lot's attestation-roots file holds)."""
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    def certificate(
        self, serial: str, key: ec.EllipticCurvePublicKey, *, expired: bool = False
    ) -> x509.Certificate:
        """An attestation certificate naming ``serial`` (subject serialNumber) for ``key``."""
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        start = now - dt.timedelta(days=ATTESTATION_CERT_DAYS + 2 if expired else 1)
        end = now - dt.timedelta(days=1) if expired else start + dt.timedelta(days=ATTESTATION_CERT_DAYS)
        return attestation_certificate(
            serial, key, self.signer_cert, self.signer_key, not_before=start, not_after=end
        )

    def provision(self, se: SimSecureElement, *, expired: bool = False) -> SimSecureElement:
        """Give a part its attestation key and chain (what the chip vendor does at its factory)."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self.certificate(se.serial_text, key.public_key(), expired=expired)
        se.attestation_key = key
        se.attestation_chain = (
            leaf.public_bytes(serialization.Encoding.DER),
            self.signer_cert.public_bytes(serialization.Encoding.DER),
        )
        return se


def attestation_certificate(
    serial: str,
    key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """An end-entity attestation certificate (self-signed when ``issuer`` is None: a forgery)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "factoryd Test SE Vendor"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"SE {serial}"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


# The order of the P-256 group: a derived private key must lie in [1, n).
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _vendor_key(name: str, seed: int | None, role: str) -> ec.EllipticCurvePrivateKey:
    if seed is None:
        return ec.generate_private_key(ec.SECP256R1())
    # A simulated vendor's key, reproducible on purpose (not a secret of anyone's).
    digest = hashlib.sha256(f"factoryd-sim-vendor/{name}/{seed}/{role}".encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def _vendor_name(org: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
