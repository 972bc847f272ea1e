"""Key attestation: a board proves its new key was made inside a genuine secure element.

The station sends a fresh 32-byte nonce; the secure element generates a key pair and signs, with its
device-unique attestation key (provisioned by the chip vendor, never the device key), a statement
covering the nonce, its serial and the new public key. It returns the statement's signature and the
attestation certificate chain (leaf first). ``verify_attestation`` checks, before an ID is reserved:

* the chain: leaf → intermediates → one of the lot's trusted roots, every certificate valid now,
  every issuer a CA (basicConstraints) allowed to sign certificates, path lengths respected, the
  leaf allowed ``digitalSignature`` (``attestation_chain``; a certificate outside its validity is
  ``attestation_expired``);
* the leaf names the board's serial in its subject ``serialNumber`` attribute (OID 2.5.4.5), the
  serial exactly as the station records it (lowercase hex of the SE serial) (``attestation_serial``);
* the nonce the board echoes is the one just sent (``attestation_nonce``: a replayed statement);
* the signature over :func:`statement_bytes` verifies with the leaf's key (``attestation_signature``);
* the board's slot key signs a second fresh challenge that verifies with the attested key
  (``attestation_key``), and later the CSR's key is the attested key (:func:`check_csr_key`).

Statement encoding (the same bytes for every transport; SMP carries them as CBOR fields)::

    "factoryd-attest-v1" 0x00 | slot u8 | nonce (32) | u16 len | serial (ASCII) | u16 len | public key

with the public key an uncompressed P-256 point (65 bytes) and u16 lengths big-endian. The signature
is DER ECDSA with SHA-256 (P-256 or P-384 attestation keys) or RSA PKCS#1 v1.5 with SHA-256.

The lot's trusted roots (the SE vendor's CA, or the device maker's own chip-programming CA) are
stored per lot on the station (``AttestationRootStore``), validated like CA bundles. A lot may
instead (or as well) hold a vendor's parts manifest (``pki/parts.py``): then a board proves the key
registered for its serial (``attestation_unregistered`` when the serial is not listed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from factoryd.errors import BundleError, RefusedBoardError
from factoryd.files import write_private
from factoryd.pki.challenge import raw_to_der_signature
from factoryd.pki.profile import utc_now
from factoryd.pki.signer import key_problem

NONCE_BYTES = 32
STATEMENT_CONTEXT = b"factoryd-attest-v1\x00"
P256_POINT_BYTES = 65
# An attestation chain is leaf + one or two vendor intermediates; longer ones are refused unread.
MAX_ATTESTATION_CHAIN = 4
# A roots file holds a handful of vendor CAs; the cap stops a hostile upload.
MAX_ROOTS_BYTES = 256 * 1024
MAX_ROOTS = 32
ROOTS_FILE = "roots.pem"
# The station keeps each lot's roots under <state_dir>/attestation/<lot>/ (StationPaths.attestation).
ATTESTATION_DIRNAME = "attestation"

AttestationReason = Literal[
    "attestation_chain",
    "attestation_serial",
    "attestation_signature",
    "attestation_nonce",
    "attestation_key",
    "attestation_expired",
    "attestation_missing",
    "attestation_unregistered",
]
# Reasons that say "not a genuine part" (the scheduler does not count them towards ATTENTION).
GENUINENESS_REASONS: frozenset[str] = frozenset(get_args(AttestationReason))
E = TypeVar("E", bound=x509.ExtensionType)


class AttestationError(RefusedBoardError):
    """The board's secure element did not prove it is genuine; ``reason`` names the failed check."""

    # Only an instance made without __init__ (the error-tree test) lacks its own.
    _reason: str = "attestation"

    def __init__(self, reason: AttestationReason, message: str) -> None:
        super().__init__(message)
        self._reason = reason

    @property
    def reason(self) -> str:
        """The failed check (``attestation_chain``, ``attestation_nonce``, ...)."""
        return self._reason


@dataclass(frozen=True)
class AttestationEvidence:
    """What a board returned for one attested key generation (plus its proof of possession)."""

    slot: int
    nonce: bytes  # as the board echoed it
    public_key: bytes  # uncompressed P-256 point of the new key
    signature: bytes  # over statement_bytes(...), by the attestation key
    chain: tuple[bytes, ...]  # attestation certificate chain, DER, leaf first
    # A second fresh challenge, sent after the statement, and the slot key's raw r||s signature of it.
    possession_challenge: bytes = b""
    possession_signature: bytes = b""


@dataclass(frozen=True)
class AttestationResult:
    """A verified attestation: the evidence the customer's manifest carries per device."""

    public_key: bytes
    cert_fingerprint_sha256: str
    cert_issuer: str
    cert_subject: str
    root_subject: str

    def details(self) -> dict[str, str]:
        """The audit-trail and manifest form."""
        return {
            "method": "attestation",
            "attestation_cert_sha256": self.cert_fingerprint_sha256,
            "attestation_issuer": self.cert_issuer,
            "attestation_root": self.root_subject,
        }


def statement_bytes(slot: int, nonce: bytes, serial: str, public_key: bytes) -> bytes:
    """The exact bytes an attestation statement signs (module docstring)."""
    raw_serial = serial.encode("ascii")
    return (
        STATEMENT_CONTEXT
        + bytes([slot])
        + nonce
        + struct.pack(">H", len(raw_serial))
        + raw_serial
        + struct.pack(">H", len(public_key))
        + public_key
    )


def verify_attestation(
    evidence: AttestationEvidence | None,
    *,
    nonce: bytes,
    serial: str,
    roots: Sequence[x509.Certificate],
    now: dt.datetime | None = None,
) -> AttestationResult:
    """Check a board's attestation against the nonce just sent, its serial and the lot's roots."""
    if evidence is None or not evidence.chain or not evidence.signature:
        raise AttestationError("attestation_missing", "the board sent no attestation (no attestation key?)")
    if not roots:
        raise AttestationError("attestation_chain", "the lot has no trusted attestation roots")
    when = utc_now(now)
    chain = _parse_chain(evidence.chain)
    root = _verify_path(chain, roots, when)
    leaf = chain[0]
    named = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    if named != [serial]:
        raise AttestationError(
            "attestation_serial",
            f"the attestation certificate names serial {named[0] if named else None!r}, "
            f"the board reported {serial!r}",
        )
    if evidence.nonce != nonce:
        raise AttestationError(
            "attestation_nonce", "the statement covers another nonce than the one just sent (a replay?)"
        )
    message = statement_bytes(evidence.slot, evidence.nonce, serial, evidence.public_key)
    if not _signature_ok(leaf.public_key(), evidence.signature, message):
        raise AttestationError(
            "attestation_signature", "the statement's signature does not verify with the attestation key"
        )
    attested = _p256_key(evidence.public_key)
    try:
        attested.verify(
            raw_to_der_signature(evidence.possession_signature),
            evidence.possession_challenge,
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, ValueError) as exc:
        raise AttestationError(
            "attestation_key", "the board's slot key is not the attested key (possession check failed)"
        ) from exc
    return AttestationResult(
        public_key=evidence.public_key,
        cert_fingerprint_sha256=hashlib.sha256(evidence.chain[0]).hexdigest(),
        cert_issuer=leaf.issuer.rfc4514_string(),
        cert_subject=leaf.subject.rfc4514_string(),
        root_subject=root.subject.rfc4514_string(),
    )


def check_csr_key(attested_point: bytes, csr: x509.CertificateSigningRequest) -> None:
    """The CSR must carry exactly the attested key (``attestation_key`` otherwise)."""
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or (
        public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        != attested_point
    ):
        raise AttestationError("attestation_key", "the CSR's key is not the attested key")


# Trusted roots ----------------------------------------------------------------------------------


def load_attestation_roots(data: bytes, now: dt.datetime | None = None) -> tuple[x509.Certificate, ...]:
    """Parse and validate a PEM file of attestation roots; BundleError naming the first bad one."""
    if len(data) > MAX_ROOTS_BYTES:
        raise BundleError(f"attestation roots file is too large: {len(data)} bytes (limit {MAX_ROOTS_BYTES})")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise BundleError("malformed attestation roots file: not a sequence of PEM certificates") from None
    if not certs:
        raise BundleError("malformed attestation roots file: it holds no certificate")
    if len(certs) > MAX_ROOTS:
        raise BundleError(f"attestation roots file holds {len(certs)} certificates (limit {MAX_ROOTS})")
    when = utc_now(now)
    unique: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        name = repr(cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}")
        problem = _ca_problem(cert, when) or key_problem(cert.public_key())
        if problem:
            raise BundleError(f"attestation root {name}: {problem}")
        unique.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
    return tuple(unique.values())


class AttestationRootStore:
    """Per-lot attestation roots on the station: ``<dir>/<lot>/roots.pem``, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, lot: str) -> Path:
        """The lot's roots file."""
        return self.directory / lot / ROOTS_FILE

    def save(self, lot: str, roots: Sequence[x509.Certificate]) -> Path:
        """Store validated roots (whole file or nothing); returns the path."""
        path = self.path(lot)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots)
        write_private(path, pem, mode=0o644)  # public certificates, but written whole or not at all
        return path

    def has(self, lot: str) -> bool:
        """Whether roots are stored for the lot."""
        return self.path(lot).is_file()

    def load(self, lot: str) -> tuple[x509.Certificate, ...]:
        """The lot's roots (empty when none are stored); expiry is checked per board, not here."""
        path = self.path(lot)
        if not path.is_file():
            return ()
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))


# Internals --------------------------------------------------------------------------------------


def _parse_chain(ders: Sequence[bytes]) -> list[x509.Certificate]:
    if len(ders) > MAX_ATTESTATION_CHAIN:
        raise AttestationError(
            "attestation_chain",
            f"attestation chain of {len(ders)} certificates (limit {MAX_ATTESTATION_CHAIN})",
        )
    try:
        return [x509.load_der_x509_certificate(d) for d in ders]
    except ValueError as exc:
        raise AttestationError("attestation_chain", "an attestation certificate does not parse") from exc


def _verify_path(
    chain: list[x509.Certificate], roots: Sequence[x509.Certificate], when: dt.datetime
) -> x509.Certificate:
    """Check leaf → intermediates → a root; return the root it ends at."""
    for cert in chain:
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise AttestationError(
                "attestation_expired",
                f"attestation certificate {cert.subject.rfc4514_string()!r} is not valid now "
                f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})",
            )
    leaf = chain[0]
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise AttestationError("attestation_chain", "the attestation certificate may not sign (keyUsage)")
    root_ders = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    # The board may send the root itself at the end of its chain: the trusted copy decides, not its.
    if len(chain) > 1 and chain[-1].public_bytes(serialization.Encoding.DER) in root_ders:
        chain = chain[:-1]
    for depth, cert in enumerate(chain[1:]):
        _check_issuer(chain[depth], cert, intermediates_below=depth)
    top = chain[-1]
    for root in roots:
        if root.subject != top.issuer:
            continue
        try:
            _check_issuer(top, root, intermediates_below=len(chain) - 1)
        except AttestationError:
            continue
        if not root.not_valid_before_utc <= when <= root.not_valid_after_utc:
            raise AttestationError(
                "attestation_expired", f"attestation root {root.subject.rfc4514_string()!r} is not valid now"
            )
        return root
    raise AttestationError(
        "attestation_chain",
        f"the attestation chain ({top.issuer.rfc4514_string()!r}) does not end at a root the lot trusts",
    )


def _check_issuer(child: x509.Certificate, issuer: x509.Certificate, *, intermediates_below: int) -> None:
    name = issuer.subject.rfc4514_string()
    constraints = _extension(issuer, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise AttestationError("attestation_chain", f"{name!r} issues attestation certificates but is no CA")
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        raise AttestationError(
            "attestation_chain", f"{name!r}: path length {constraints.path_length} exceeded"
        )
    usage = _extension(issuer, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise AttestationError("attestation_chain", f"{name!r} may not sign certificates (keyUsage)")
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise AttestationError(
            "attestation_chain", f"{child.subject.rfc4514_string()!r} is not signed by {name!r}"
        ) from exc


def _ca_problem(cert: x509.Certificate, when: dt.datetime) -> str | None:
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        return "not a CA certificate (basicConstraints CA:TRUE missing)"
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return "may not sign certificates (keyUsage keyCertSign missing)"
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        return f"not valid now ({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})"
    return None


def _extension(cert: x509.Certificate, kind: type[E]) -> E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # a malformed extension: the certificate is not usable
        raise AttestationError("attestation_chain", f"malformed certificate extension: {exc}") from exc


def _signature_ok(key: object, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _p256_key(point: bytes) -> ec.EllipticCurvePublicKey:
    if len(point) != P256_POINT_BYTES:
        raise AttestationError("attestation_key", f"attested key of {len(point)} bytes is no P-256 point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise AttestationError("attestation_key", "the attested key is not a point on P-256") from exc
