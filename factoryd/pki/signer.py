"""Who holds the CA key: the ``Signer`` protocol and its in-memory implementation."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from factoryd.errors import SignerError

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
CaPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# RSA below 2048 bits is no longer acceptable for a CA (NIST SP 800-131A).
MIN_RSA_KEY_BITS = 2048
SUPPORTED_CA_CURVES = ("secp256r1", "secp384r1")


def key_problem(public_key: object) -> str | None:
    """Why a CA public key is unsupported, or None when it is EC P-256/P-384 or RSA >= 2048."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in SUPPORTED_CA_CURVES:
            return f"unsupported key type: EC {public_key.curve.name} (P-256 or P-384 required)"
        return None
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_KEY_BITS:
            return f"unsupported key type: RSA {public_key.key_size} bits (at least {MIN_RSA_KEY_BITS})"
        return None
    return f"unsupported key type: {type(public_key).__name__} (EC P-256/P-384 or RSA >= 2048 required)"


def hash_for_key(public_key: CaPublicKey) -> hashes.SHA256 | hashes.SHA384:
    """The digest paired with a CA key: SHA-384 for P-384, SHA-256 otherwise."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def spki_der(public_key: CaPublicKey | x509.Certificate) -> bytes:
    """SubjectPublicKeyInfo DER of a key or of a certificate's key."""
    key = public_key.public_key() if isinstance(public_key, x509.Certificate) else public_key
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@runtime_checkable
class Signer(Protocol):
    """Holds the issuing CA key: in memory (``SoftwareSigner``) or in a PKCS#11 token."""

    @property
    def blocking(self) -> bool:
        """True when signing may take long enough to stall an event loop (run it in a thread)."""
        ...

    @property
    def certificate(self) -> x509.Certificate:
        """The issuing CA certificate."""
        ...

    @property
    def public_key(self) -> CaPublicKey:
        """The CA public key."""
        ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a fully populated certificate builder with the CA key."""
        ...

    def sign_bytes(self, data: bytes) -> bytes:
        """Sign ``data`` (ECDSA DER or RSA PKCS#1 v1.5, digest from ``hash_for_key``)."""
        ...


class SoftwareSigner:
    """A Signer with the CA key in memory."""

    # Well under a millisecond per signature: not worth a thread hop.
    blocking = False

    def __init__(self, private_key: CaPrivateKey, certificate: x509.Certificate) -> None:
        problem = key_problem(private_key.public_key())
        if problem:
            raise SignerError(problem)
        if spki_der(private_key.public_key()) != spki_der(certificate):
            raise SignerError("CA private key does not match the CA certificate")
        self._key = private_key
        self._certificate = certificate

    def __repr__(self) -> str:
        return f"SoftwareSigner(subject={self._certificate.subject.rfc4514_string()!r})"

    @property
    def certificate(self) -> x509.Certificate:
        """The issuing CA certificate."""
        return self._certificate

    @property
    def public_key(self) -> CaPublicKey:
        """The CA public key."""
        return self._key.public_key()

    @property
    def private_key(self) -> CaPrivateKey:
        """The in-memory key (for building CMS with cryptography directly)."""
        return self._key

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a fully populated certificate builder with the CA key."""
        try:
            return builder.sign(self._key, hash_for_key(self._key.public_key()))
        except (ValueError, TypeError) as exc:
            raise SignerError(f"signing the certificate failed: {exc}") from exc

    def sign_bytes(self, data: bytes) -> bytes:
        """Sign ``data`` (ECDSA DER or RSA PKCS#1 v1.5, digest from ``hash_for_key``)."""
        algorithm = hash_for_key(self._key.public_key())
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(data, ec.ECDSA(algorithm))
        return self._key.sign(data, padding.PKCS1v15(), algorithm)
