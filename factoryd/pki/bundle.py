"""Customer certificate bundles: parse PKCS#12 or PEM, validate, refuse whole with a reason."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from factoryd.errors import BundleError, IssuanceError
from factoryd.pki.profile import ARDUINO_ISSUER, CertProfile, utc_now
from factoryd.pki.signer import CaPrivateKey, SoftwareSigner, key_problem, spki_der

# A CA bundle is a few KiB; the cap stops a hostile upload from eating memory/CPU.
MAX_BUNDLE_BYTES = 1024 * 1024
# Deeper hierarchies than this do not occur in practice; the bound stops loops.
MAX_CHAIN_DEPTH = 8
ARDUINO_AKI_BYTES = 20


@dataclass(frozen=True, repr=False)
class CaBundle:
    """A validated lot CA: its certificate and key, chain to the root, trust anchors for devices."""

    certificate: x509.Certificate
    private_key: CaPrivateKey
    chain: tuple[x509.Certificate, ...]  # chain[0] is ``certificate``, the last one the root
    trust_anchors: tuple[x509.Certificate, ...] = ()

    def __repr__(self) -> str:
        return (
            f"CaBundle(subject={self.certificate.subject.rfc4514_string()!r}, "
            f"chain={len(self.chain)}, trust_anchors={len(self.trust_anchors)})"
        )

    @property
    def root(self) -> x509.Certificate:
        """The customer's root certificate (last in the chain)."""
        return self.chain[-1]

    def signer(self) -> SoftwareSigner:
        """A signer holding this bundle's key."""
        return SoftwareSigner(self.private_key, self.certificate)


def describe(cert: x509.Certificate) -> str:
    """A short human name for a certificate in messages."""
    return repr(cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}")


def pem_of(certs: Sequence[x509.Certificate]) -> bytes:
    """Concatenated PEM of ``certs``."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def chain_pem(bundle: CaBundle) -> bytes:
    """What the device gets as CA chain: issuing CA up to the root, then the trust anchors."""
    return device_chain_pem(bundle.chain, bundle.trust_anchors)


def device_chain_pem(chain: Sequence[x509.Certificate], trust_anchors: Sequence[x509.Certificate]) -> bytes:
    """The chain, then the trust anchors, each certificate once, as PEM."""
    seen: set[bytes] = set()
    ordered: list[x509.Certificate] = []
    for cert in (*chain, *trust_anchors):
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            ordered.append(cert)
    return pem_of(ordered)


def load_pkcs12_bundle(
    data: bytes,
    passphrase: bytes,
    *,
    profile: CertProfile | None = None,
    now: dt.datetime | None = None,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> CaBundle:
    """Parse and validate a PKCS#12 bundle; extra certificates outside the chain become trust anchors."""
    _check_size("PKCS#12 file", data, max_bytes)
    if not passphrase:
        raise BundleError("a passphrase is required: the CA key must be protected")
    try:
        parsed = pkcs12.load_pkcs12(data, bytes(passphrase))
    except ValueError as exc:
        if "password" in str(exc).lower():
            raise BundleError(
                "wrong passphrase for the PKCS#12 file (or its integrity check failed)"
            ) from None
        raise BundleError("malformed PKCS#12 file: could not be parsed") from None
    if parsed.key is None:
        raise BundleError("malformed PKCS#12 file: it holds no private key")
    key = parsed.key
    certs = [c.certificate for c in parsed.additional_certs]
    if parsed.cert is not None:
        certs.insert(0, parsed.cert.certificate)
    return _assemble(key, certs, [], profile=profile, now=now, extras_are_anchors=True)


def load_pem_bundle(
    key_pem: bytes,
    chain_pem: bytes,
    passphrase: bytes,
    *,
    trust_anchors: bytes | None = None,
    profile: CertProfile | None = None,
    now: dt.datetime | None = None,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> CaBundle:
    """Parse and validate an encrypted PKCS#8 key plus a PEM chain (CA certificate up to the root)."""
    _check_size("key file", key_pem, max_bytes)
    _check_size("chain file", chain_pem, max_bytes)
    if trust_anchors is not None:
        _check_size("trust anchor file", trust_anchors, max_bytes)
    if not passphrase:
        raise BundleError("a passphrase is required: the CA key must be protected")
    try:
        loaded = serialization.load_pem_private_key(key_pem, bytes(passphrase))
    except TypeError:
        # cryptography raises TypeError when a password is given for an unencrypted key.
        raise BundleError(
            "the CA private key is not encrypted; export it as encrypted PKCS#8 "
            "(e.g. openssl pkcs8 -topk8 -v2 aes-256-cbc)"
        ) from None
    except ValueError:
        if _is_encrypted_key(key_pem):
            # A wrong passphrase usually fails the padding check ("Incorrect password"), but about one
            # in 200 decrypts to padding that passes and then fails as ASN.1: both are a wrong passphrase.
            raise BundleError("wrong passphrase for the CA private key") from None
        raise BundleError("malformed key file: no readable PEM private key") from None
    except UnsupportedAlgorithm:
        raise BundleError("unsupported key type: the key file's algorithm is not supported") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise BundleError(_unsupported(loaded.public_key()))
    certs = _load_pem_certs("chain file", chain_pem)
    anchors = _load_pem_certs("trust anchor file", trust_anchors) if trust_anchors else []
    return _assemble(loaded, certs, anchors, profile=profile, now=now, extras_are_anchors=False)


def validate_bundle(
    bundle: CaBundle, profile: CertProfile | None = None, now: dt.datetime | None = None
) -> None:
    """Re-run every bundle check on an assembled bundle (e.g. before starting a lot)."""
    _validate(bundle, profile or CertProfile(), utc_now(now))


def _is_encrypted_key(key_pem: bytes) -> bool:
    """Whether ``key_pem`` is a well-formed encrypted private key (its passphrase aside)."""
    try:
        serialization.load_pem_private_key(key_pem, None)
    except TypeError:  # "password was not given but private key is encrypted"
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return False


def _check_size(what: str, data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise BundleError(f"{what} is too large: {len(data)} bytes (limit {max_bytes})")


def _unsupported(public_key: object) -> str:
    return key_problem(public_key) or "unsupported key type"


def _load_pem_certs(what: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise BundleError(f"malformed {what}: not a sequence of PEM certificates") from None
    if not certs:
        raise BundleError(f"malformed {what}: it holds no certificate")
    return certs


def _assemble(
    key: object,
    certs: list[x509.Certificate],
    anchors: list[x509.Certificate],
    *,
    profile: CertProfile | None,
    now: dt.datetime | None,
    extras_are_anchors: bool,
) -> CaBundle:
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        public = getattr(key, "public_key", None)
        raise BundleError(_unsupported(public() if callable(public) else key))
    problem = key_problem(key.public_key())
    if problem:
        raise BundleError(problem)
    key_spki = spki_der(key.public_key())
    matching = [c for c in certs if spki_der(c) == key_spki]
    if not matching:
        raise BundleError(
            "private key does not match the CA certificate (no certificate carries its public key)"
        )
    ca_cert = matching[0]
    pool = [c for c in certs if c is not ca_cert]
    chain = _build_chain(ca_cert, pool)
    chain_ders = {c.public_bytes(serialization.Encoding.DER) for c in chain}
    leftovers = [c for c in pool if c.public_bytes(serialization.Encoding.DER) not in chain_ders]
    if leftovers and not extras_are_anchors:
        raise BundleError(
            f"certificate {describe(leftovers[0])} is not part of the CA's chain; "
            "pass trust anchors separately (trust_anchors)"
        )
    bundle = CaBundle(ca_cert, key, tuple(chain), tuple(anchors + leftovers))
    _validate(bundle, profile or CertProfile(), utc_now(now))
    return bundle


def _build_chain(ca_cert: x509.Certificate, pool: list[x509.Certificate]) -> list[x509.Certificate]:
    chain = [ca_cert]
    current = ca_cert
    for _ in range(MAX_CHAIN_DEPTH):
        if current.issuer == current.subject:
            _check_signed_by(current, current)
            return chain
        candidates = [c for c in pool if c.subject == current.issuer and c not in chain]
        if not candidates:
            raise BundleError(
                f"chain does not verify: issuer {current.issuer.rfc4514_string()!r} of "
                f"{describe(current)} is not in the bundle (the chain must reach the root)"
            )
        for candidate in candidates:
            try:
                current.verify_directly_issued_by(candidate)
            except (InvalidSignature, ValueError, TypeError):
                continue
            chain.append(candidate)
            current = candidate
            break
        else:
            raise BundleError(
                f"chain does not verify: the signature on {describe(current)} does not verify "
                f"with the key of {describe(candidates[0])}"
            )
    raise BundleError(f"chain does not verify: longer than {MAX_CHAIN_DEPTH} certificates")


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        raise BundleError(
            f"chain does not verify: the self-signature of root {describe(cert)} is invalid"
        ) from None


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise BundleError(f"malformed extensions in {describe(cert)}: {exc}") from None


def _validate(bundle: CaBundle, profile: CertProfile, now: dt.datetime) -> None:
    ca = bundle.certificate
    for index, cert in enumerate(bundle.chain):
        role = "CA certificate" if index == 0 else f"chain certificate {describe(cert)}"
        basic = _ext(cert, x509.BasicConstraints)
        if not isinstance(basic, x509.BasicConstraints) or not basic.ca:
            raise BundleError(f"{role} is not a CA (basicConstraints CA:TRUE missing)")
        usage = _ext(cert, x509.KeyUsage)
        if not isinstance(usage, x509.KeyUsage) or not usage.key_cert_sign:
            raise BundleError(f"{role} lacks the keyCertSign key usage")
        # CA certificates below this one count against its pathLenConstraint (RFC 5280 4.2.1.9);
        # the device certificate at the end of the path does not.
        below = index
        if basic.path_length is not None and below > basic.path_length:
            raise BundleError(
                f"path length violated: {role} allows {basic.path_length} CA(s) below it, "
                f"the chain has {below}"
            )
        if index > 0 and (problem := key_problem(cert.public_key())):
            raise BundleError(f"{role}: {problem}")
        _check_time(role, cert, now)
    _check_time_anchors(bundle.trust_anchors, now)
    if profile.kind == "arduino-v1":
        _validate_arduino(ca)
    try:
        _, device_not_after = profile.validity_window(now)
    except IssuanceError as exc:
        raise BundleError(str(exc)) from None
    for index, cert in enumerate(bundle.chain):
        if cert.not_valid_after_utc < device_not_after:
            role = "CA certificate" if index == 0 else f"chain certificate {describe(cert)}"
            raise BundleError(
                f"{role} expires {cert.not_valid_after_utc:%Y-%m-%d}, before device certificates issued now "
                f"would ({device_not_after:%Y-%m-%d}); shorten the lot's device validity or renew the CA"
            )


def _check_time(role: str, cert: x509.Certificate, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise BundleError(f"{role} is not yet valid (notBefore {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z)")
    if now > cert.not_valid_after_utc:
        raise BundleError(f"{role} has expired (notAfter {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z)")


def _check_time_anchors(anchors: Sequence[x509.Certificate], now: dt.datetime) -> None:
    for cert in anchors:
        _check_time(f"trust anchor {describe(cert)}", cert, now)


def _validate_arduino(ca: x509.Certificate) -> None:
    if ca.subject.public_bytes() != ARDUINO_ISSUER.public_bytes():
        raise BundleError(
            "arduino-v1 profile: the CA subject must be exactly C=US, O=Arduino LLC US, OU=IT, CN=Arduino "
            f"(PrintableString, in that order); got {ca.subject.rfc4514_string()!r}"
        )
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise BundleError(
            "arduino-v1 profile: the CA key must be EC P-256 (the board stores r||s of 64 bytes)"
        )
    ski = _ext(ca, x509.SubjectKeyIdentifier)
    if isinstance(ski, x509.SubjectKeyIdentifier) and len(ski.digest) != ARDUINO_AKI_BYTES:
        raise BundleError(
            f"arduino-v1 profile: the CA's subjectKeyIdentifier must be {ARDUINO_AKI_BYTES} bytes, "
            f"got {len(ski.digest)}"
        )
