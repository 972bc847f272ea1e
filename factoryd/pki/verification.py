"""CA proof of possession: a verification certificate with CN=<the cloud's code>, signed by the lot's CA.

AWS IoT (``GetRegistrationCode`` → ``RegisterCACertificate``) and Azure DPS (``generateVerificationCode``
→ ``verify``) trust a customer CA only after it signs a certificate naming their code. The subject
key is a throwaway P-256 key (neither cloud looks at it); the signature is the CA's, through the
lot's Signer, so a CA key inside a PKCS#11 token works the same way.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.errors import InputError, IssuanceError
from factoryd.pki.issuer import SIGNING_KEY_USAGE, key_identifier, random_serial
from factoryd.pki.profile import utc_now
from factoryd.pki.signer import Signer

# AWS registration codes are 64 hex digits, Azure verification codes hex/base64-like; both fit here.
VERIFICATION_CODE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Long enough to paste the certificate into the cloud's console, short enough to be worthless after.
VERIFICATION_VALIDITY_S = 7 * 24 * 3600
BACKDATE_S = 300


@dataclass(frozen=True)
class VerificationCertificate:
    """The verification certificate and what the audit trail records of it."""

    cert: x509.Certificate
    pem: str
    serial_hex: str
    code: str


def check_verification_code(code: str) -> str:
    """``code`` if it is 1..64 of ``A-Z a-z 0-9 . _ -``; InputError otherwise."""
    if not VERIFICATION_CODE.fullmatch(code):
        raise InputError(
            f"verification code {code[:80]!r} must be 1..64 characters of A-Z a-z 0-9 . _ - "
            "(AWS: the registration code, 64 hex digits; Azure: the verification code)"
        )
    return code


def verification_certificate(
    signer: Signer, code: str, *, now: dt.datetime | None = None
) -> VerificationCertificate:
    """Sign a short-lived end-entity certificate with subject CN=``code`` by the lot's CA key."""
    check_verification_code(code)
    ca = signer.certificate
    now = utc_now(now).replace(microsecond=0)
    not_before = max(now - dt.timedelta(seconds=BACKDATE_S), ca.not_valid_before_utc)
    not_after = min(now + dt.timedelta(seconds=VERIFICATION_VALIDITY_S), ca.not_valid_after_utc)
    if not not_before < now < not_after:
        raise IssuanceError(
            f"the CA certificate is not valid now (valid {ca.not_valid_before_utc:%Y-%m-%d} to "
            f"{ca.not_valid_after_utc:%Y-%m-%d})"
        )
    subject_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    try:
        aki = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        aki = key_identifier(signer.public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]))
        .issuer_name(ca.subject)
        .public_key(subject_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SIGNING_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
    )
    cert = signer.sign_certificate(builder)
    return VerificationCertificate(
        cert=cert,
        pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        serial_hex=f"{cert.serial_number:x}",
        code=code,
    )
