"""Verify device CSRs and issue device certificates with a lot's CA."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factoryd.errors import BundleError, CsrRejectedError, IssuanceError, StationClockError
from factoryd.matter.dac import matter_subject
from factoryd.pki.bundle import _validate_arduino
from factoryd.pki.profile import CertProfile, arduino_subject, utc_now
from factoryd.pki.signer import CaPublicKey, Signer, spki_der
from factoryd.pki.template import RenderedIdentity

# CA/Browser Forum BR 7.1: at least 64 bits of CSPRNG output; 16 bytes leave a wide margin.
SERIAL_BYTES = 16
# A PEM CSR is well under 1 KiB; bigger input is refused before parsing.
MAX_CSR_BYTES = 16 * 1024
ACCEPTED_CSR_HASHES = ("sha256", "sha384", "sha512")
# Rendered identities kept per issuer (one a board in flight: above the 1 024 ports a station runs).
IDENTITY_CACHE_MAX_ENTRIES = 4096
# PKCS#9 extensionRequest: the one CSR attribute we tolerate (empty, or with allowed extensions).
EXTENSION_REQUEST_OID = x509.ObjectIdentifier("1.2.840.113549.1.9.14")
# The day this factoryd release was cut (raised at each release; tests/test_faults_clock.py checks it
# is not after the newest commit). A station clock before it is certainly wrong (a dead RTC battery
# reads 1970 or 2000, an NTP step went the wrong way): certificates are never issued from it.
RELEASE_DATE = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class IssuedCertificate:
    """A freshly issued device certificate in the forms the pipeline and ledger need."""

    cert: x509.Certificate
    der: bytes
    pem: str
    serial_hex: str
    fingerprint_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> IssuedCertificate:
        """Wrap an x509 certificate."""
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(
            cert=cert,
            der=der,
            pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            serial_hex=f"{cert.serial_number:x}",
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )


def parse_csr(csr_data: bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR given as DER or PEM, refusing with CsrRejectedError."""
    if len(csr_data) > MAX_CSR_BYTES:
        raise CsrRejectedError(f"CSR is too large: {len(csr_data)} bytes (limit {MAX_CSR_BYTES})")
    try:
        if csr_data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(csr_data)
        return x509.load_der_x509_csr(csr_data)
    except ValueError as exc:
        raise CsrRejectedError(f"CSR does not parse: {exc}") from None


def verify_csr(
    csr_data: bytes,
    expected_cn: str,
    *,
    allowed_extensions: frozenset[x509.ObjectIdentifier] = frozenset(),
) -> x509.CertificateSigningRequest:
    """Check a device CSR: proof of possession, subject exactly CN=expected_cn, P-256 key, no extensions."""
    csr = parse_csr(csr_data)
    if not csr.is_signature_valid:
        raise CsrRejectedError("CSR signature is invalid (no proof of possession of the key)")
    hash_algorithm = csr.signature_hash_algorithm
    if hash_algorithm is None or hash_algorithm.name not in ACCEPTED_CSR_HASHES:
        name = hash_algorithm.name if hash_algorithm else "none"
        raise CsrRejectedError(f"CSR signed with {name}; SHA-256 or stronger required")
    attributes = [a for rdn in csr.subject.rdns for a in rdn]
    if len(attributes) != 1 or attributes[0].oid != NameOID.COMMON_NAME:
        raise CsrRejectedError(
            f"CSR subject must be exactly CN={expected_cn}, got {csr.subject.rfc4514_string()!r}"
        )
    if attributes[0].value != expected_cn:
        raise CsrRejectedError(
            f"CSR common name {attributes[0].value!r} is not the expected {expected_cn!r} "
            "(the allocated ID in the lot's subject template)"
        )
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise CsrRejectedError(f"CSR key is {_key_name(public_key)}; EC P-256 required")
    try:
        attributes_oids = [attribute.oid for attribute in csr.attributes]
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrRejectedError(f"CSR attributes or extensions do not parse: {exc}") from None
    for oid in attributes_oids:
        if oid != EXTENSION_REQUEST_OID:
            raise CsrRejectedError(f"CSR carries a disallowed attribute {oid.dotted_string}")
    for extension in extensions:
        if extension.oid not in allowed_extensions:
            name = extension.oid._name or extension.oid.dotted_string
            raise CsrRejectedError(
                f"CSR requests a disallowed extension {name} ({extension.oid.dotted_string})"
            )
    return csr


def _key_name(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    size = getattr(key, "key_size", None)
    base = type(key).__name__.removeprefix("_").replace("PublicKey", "")
    return f"{base} {size}" if size else base


# An end entity that signs (TLS client auth, challenges, proofs of possession) and does nothing else.
SIGNING_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def random_serial() -> int:
    """A positive serial from 16 CSPRNG bytes with the top bit cleared (>= 64 bits of entropy)."""
    raw = bytearray(secrets.token_bytes(SERIAL_BYTES))
    raw[0] &= 0x7F
    return int.from_bytes(raw, "big") or 1


def arduino_serial() -> int:
    """A serial whose DER content is exactly 16 bytes (first byte 0x01..0x7F), as the board stores it."""
    while True:
        raw = bytearray(secrets.token_bytes(SERIAL_BYTES))
        raw[0] &= 0x7F
        if raw[0]:
            return int.from_bytes(raw, "big")


def key_identifier(public_key: CaPublicKey) -> bytes:
    """RFC 5280 4.2.1.2 method 1 key identifier: SHA-1 of the subjectPublicKey bits (20 bytes)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


class Issuer:
    """Issues device certificates for one lot with its CA signer, chain and profile."""

    def __init__(self, signer: Signer, chain: Sequence[x509.Certificate], profile: CertProfile) -> None:
        if not chain:
            raise IssuanceError("the CA chain is empty")
        if spki_der(chain[0]) != spki_der(signer.certificate) or chain[0] != signer.certificate:
            raise IssuanceError("chain[0] must be the signer's CA certificate")
        if profile.kind == "arduino-v1":
            try:
                _validate_arduino(signer.certificate)
            except BundleError as exc:
                raise IssuanceError(str(exc)) from None
        self._signer = signer
        self._chain = tuple(chain)
        self._profile = profile
        ca = signer.certificate
        try:
            ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            ca_key = ca.public_key()
            if not isinstance(ca_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise IssuanceError("the CA key type is not supported") from None
            ski = key_identifier(ca_key)
        self._aki = ski
        # Device ID -> (its fields, its rendered identity): a board asks for its CN, its CSR check and its
        # certificate (3 renders of the template per board before); bounded, oldest entry dropped first.
        self._identities: dict[str, tuple[dict[str, str], RenderedIdentity]] = {}

    def __repr__(self) -> str:
        subject = self._signer.certificate.subject.rfc4514_string()
        return f"Issuer(ca={subject!r}, profile={self._profile.kind!r})"

    @property
    def signer(self) -> Signer:
        """The CA signer (a software key, or a token whose signatures may take milliseconds)."""
        return self._signer

    @property
    def profile(self) -> CertProfile:
        """The device certificate profile."""
        return self._profile

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Issuing CA first, root last."""
        return self._chain

    @property
    def authority_key_identifier(self) -> bytes:
        """The key identifier put into every device certificate's AKI."""
        return self._aki

    def identity(self, device_id: str, fields: Mapping[str, str] | None = None) -> RenderedIdentity:
        """The device's subject and SANs from the lot's template; IssuanceError on a value it cannot hold.

        ``fields`` is the device's metadata (the extra columns of its line in the ID list).
        """
        given = {} if fields is None else fields
        cached = self._identities.get(device_id)
        if cached is not None and cached[0] == given:
            return cached[1]
        identity = self._profile.subject.render(device_id, fields)
        if len(self._identities) >= IDENTITY_CACHE_MAX_ENTRIES:
            # Threads may share an issuer (the signer): a racing eviction of the same key is harmless.
            self._identities.pop(next(iter(self._identities), device_id), None)
        self._identities[device_id] = (dict(given), identity)
        return identity

    def common_name(self, device_id: str, fields: Mapping[str, str] | None = None) -> str:
        """The CN the board must put in its CSR (``get_csr(common_name)``): the templated CN."""
        return self.identity(device_id, fields).common_name

    def check_clock(self, now: dt.datetime | None = None) -> None:
        """Refuse (StationClockError) a station clock before the release date or outside the CA's validity."""
        clock = utc_now(now)
        ca = self._signer.certificate
        if now is None and clock < RELEASE_DATE:
            raise StationClockError(
                f"the station clock reads {clock:%Y-%m-%d %H:%M}Z, before this factoryd release "
                f"({RELEASE_DATE:%Y-%m-%d}): it is wrong; fix the time (NTP) before certificates are issued"
            )
        if clock < ca.not_valid_before_utc:
            raise StationClockError(
                f"the station clock reads {clock:%Y-%m-%d %H:%M}Z, before the CA certificate becomes valid "
                f"({ca.not_valid_before_utc:%Y-%m-%d %H:%M}Z): the clock is wrong or the CA is not valid yet"
            )
        if clock > ca.not_valid_after_utc:
            raise StationClockError(
                f"the station clock reads {clock:%Y-%m-%d %H:%M}Z, after the CA certificate expired "
                f"({ca.not_valid_after_utc:%Y-%m-%d %H:%M}Z): the clock is wrong or the CA must be renewed"
            )

    def verify_csr(
        self, csr_der: bytes, device_id: str, *, fields: Mapping[str, str] | None = None
    ) -> x509.CertificateSigningRequest:
        """Check a device CSR against this lot's profile: its subject is exactly CN=<the templated CN>."""
        return verify_csr(
            csr_der,
            self.common_name(device_id, fields),
            allowed_extensions=self._profile.allowed_csr_extensions,
        )

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        device_id: str,
        *,
        fields: Mapping[str, str] | None = None,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue the device certificate for a verified CSR; refuses if the CA would expire first.

        The subject and SANs come from the lot's template with ``fields`` (the device's metadata).
        """
        identity = self.identity(device_id, fields)
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
            raise IssuanceError(f"device key is {_key_name(public_key)}; EC P-256 required")
        # The station clock is checked only when it is used (``now`` given: a caller's chosen time).
        self.check_clock(now)
        now = utc_now(now)
        not_before, not_after = self._profile.validity_window(now)
        ca = self._signer.certificate
        if not_after > ca.not_valid_after_utc:
            raise IssuanceError(
                f"the CA certificate expires {ca.not_valid_after_utc:%Y-%m-%d %H:%M}Z, before the device "
                f"certificate would ({not_after:%Y-%m-%d %H:%M}Z); "
                "shorten the device validity or renew the CA"
            )
        if not_before < ca.not_valid_before_utc:
            if self._profile.kind == "arduino-v1":
                raise IssuanceError(
                    "arduino-v1: the CA became valid after the start of the current hour; "
                    "issue again after the next full hour"
                )
            # Never start before the CA itself: path validation would fail on the overlap.
            not_before = ca.not_valid_before_utc
        aki = x509.AuthorityKeyIdentifier(self._aki, None, None)
        builder = (
            x509.CertificateBuilder()
            .issuer_name(ca.subject)
            .public_key(public_key)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        if self._profile.kind == "arduino-v1":
            # The board rebuilds exactly this shape from a template: AKI and nothing else.
            builder = (
                builder.subject_name(arduino_subject(device_id))
                .serial_number(arduino_serial())
                .add_extension(aki, critical=False)
            )
        elif self._profile.dac is not None:
            # A Matter DAC (spec 6.2.2): the VID/PID subject attributes, CA:FALSE and digitalSignature
            # (both critical), SKI and AKI; no EKU or SAN (commissioners ignore them, chip-cert writes none).
            dac = self._profile.dac
            ca_key = ca.public_key()
            if not isinstance(ca_key, ec.EllipticCurvePublicKey) or ca_key.curve.name != "secp256r1":
                raise IssuanceError("a Matter PAI must have an EC P-256 key (DACs are ecdsa-with-SHA256)")
            subject = matter_subject(identity.subject, dac.vendor_id, dac.product_id_for(fields))
            builder = (
                builder.subject_name(subject)
                .serial_number(random_serial())
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(SIGNING_KEY_USAGE, critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(aki, critical=False)
            )
        else:
            builder = (
                builder.subject_name(identity.subject)
                .serial_number(random_serial())
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(SIGNING_KEY_USAGE, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(aki, critical=False)
            )
            san = identity.san()
            if san is not None:
                # Non-critical: the subject is not empty (RFC 5280 4.2.1.6).
                builder = builder.add_extension(san, critical=False)
        cert = self._signer.sign_certificate(builder)
        if self._profile.dac is not None and not isinstance(cert.signature_hash_algorithm, hashes.SHA256):
            raise IssuanceError("Matter DACs must be signed with ecdsa-with-SHA256")
        if self._profile.kind == "arduino-v1" and not isinstance(
            cert.signature_hash_algorithm, hashes.SHA256
        ):
            raise IssuanceError("arduino-v1 certificates must be signed with ecdsa-with-SHA256")
        return IssuedCertificate.from_certificate(cert)
