"""The per-lot X.509 v2 CRL (RFC 5280 section 5), signed by the lot's CA through its Signer.

cryptography signs a CRL only with a private key in memory; a token signer only signs bytes. So
the CRL is built with a throwaway key of the CA's kind, and its tbsCertList is then signed by
the real signer and the signature spliced in (the algorithm identifier is the same for both).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factoryd.errors import IssuanceError
from factoryd.pki import der
from factoryd.pki.issuer import key_identifier
from factoryd.pki.profile import utc_now
from factoryd.pki.signer import Signer, hash_for_key

DEFAULT_NEXT_UPDATE_DAYS = 30
# A CRL nobody refreshes for years is a CRL nobody trusts; relying parties want a bounded nextUpdate.
MAX_NEXT_UPDATE_DAYS = 3660
# RFC 5280 5.2.3: at most 20 octets.
MAX_CRL_NUMBER = (1 << 159) - 1
# What the ledger's revocation causes are in RFC 5280 5.3.1 terms; None: no reasonCode (unspecified).
CAUSE_REASONS: dict[str, x509.ReasonFlags | None] = {
    "superseded": x509.ReasonFlags.superseded,
    "voided": x509.ReasonFlags.cessation_of_operation,
    "failed": None,
}


@dataclass(frozen=True)
class CrlEntry:
    """One revoked certificate: its serial (hex), when it was revoked and why (a ledger cause)."""

    cert_serial: str
    revoked_at: dt.datetime
    cause: str


@dataclass(frozen=True)
class SignedCrl:
    """A signed CRL in the forms callers need."""

    crl: x509.CertificateRevocationList
    der: bytes
    number: int

    @property
    def pem(self) -> bytes:
        """PEM form (what ``openssl verify -CRLfile`` reads by default)."""
        return self.crl.public_bytes(serialization.Encoding.PEM)


def build_crl(
    signer: Signer,
    entries: Sequence[CrlEntry],
    *,
    number: int,
    next_update_days: int = DEFAULT_NEXT_UPDATE_DAYS,
    now: dt.datetime | None = None,
) -> SignedCrl:
    """Build and sign the CRL listing ``entries``, numbered ``number``."""
    if not 0 <= number <= MAX_CRL_NUMBER:
        raise IssuanceError(f"CRL number {number} does not fit in 20 octets")
    if not 1 <= next_update_days <= MAX_NEXT_UPDATE_DAYS:
        raise IssuanceError(
            f"next update must be 1..{MAX_NEXT_UPDATE_DAYS} days away, got {next_update_days}"
        )
    ca = signer.certificate
    this_update = utc_now(now).replace(microsecond=0)
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.crl_sign:
        raise IssuanceError("the lot's CA certificate may not sign CRLs (its keyUsage lacks cRLSign)")
    try:
        aki = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        aki = key_identifier(signer.public_key)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(this_update)
        .next_update(this_update + dt.timedelta(days=next_update_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
    )
    seen: set[int] = set()
    for entry in entries:
        try:
            serial = int(entry.cert_serial, 16)
        except ValueError:
            raise IssuanceError(f"certificate serial {entry.cert_serial!r} is not hex") from None
        if entry.cause not in CAUSE_REASONS:
            raise IssuanceError(f"unknown revocation cause {entry.cause!r}")
        if serial in seen:
            continue
        seen.add(serial)
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(min(utc_now(entry.revoked_at), this_update))
        )
        reason = CAUSE_REASONS[entry.cause]
        if reason is not None:
            revoked = revoked.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    public_key = signer.public_key
    throwaway: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(public_key.curve)
        if isinstance(public_key, ec.EllipticCurvePublicKey)
        else rsa.generate_private_key(65537, 2048)
    )
    draft = builder.sign(throwaway, hash_for_key(public_key)).public_bytes(serialization.Encoding.DER)
    signed = _splice(draft, signer)
    crl = x509.load_der_x509_crl(signed)
    if not crl.is_signature_valid(public_key):
        raise IssuanceError("the CA signer produced a CRL signature that does not verify")
    return SignedCrl(crl, signed, number)


def _splice(draft: bytes, signer: Signer) -> bytes:
    """Replace a CRL's signature by the signer's signature over its tbsCertList."""
    parts = der.expect(der.read_single(draft), der.TAG_SEQUENCE, "CertificateList").children()
    if len(parts) != 3:
        raise IssuanceError("the CRL draft is not a CertificateList")
    tbs, algorithm = parts[0], parts[1]
    signature = signer.sign_bytes(tbs.raw)
    return der.encode(
        der.TAG_SEQUENCE, tbs.raw + algorithm.raw + der.encode(der.TAG_BIT_STRING, b"\x00" + signature)
    )
