"""The customer's onboarding-codes file: per Matter lot, every device's codes, encrypted to the customer.

The plaintext is a CSV (``device_id, hw_serial, vendor_id, product_id, discriminator, qr_payload,
manual_code``; VID/PID as 4 hex digits, as on the DAC). It is wrapped in CMS EnvelopedData
(RFC 5652) for the customer's certificate with AES-256-CBC content encryption, so only the holder of
the customer's private key reads the passcodes: ``openssl cms -decrypt -inform DER -in FILE
-recip CUSTOMER.pem -inkey CUSTOMER-KEY.pem``. cryptography's ``PKCS7EnvelopeBuilder`` makes it;
in this version it takes RSA recipients only (key transport), so the customer's certificate must
carry an RSA key (2048 bits or more).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from factoryd.errors import InputError
from factoryd.ledger.matter import OnboardingRecord

CSV_COLUMNS = (
    "device_id",
    "hw_serial",
    "vendor_id",
    "product_id",
    "discriminator",
    "qr_payload",
    "manual_code",
)
MIN_RECIPIENT_RSA_BITS = 2048
FILE_SUFFIX = ".onboarding-codes.p7m"


def onboarding_csv(records: Sequence[OnboardingRecord], *, vendor_id: int) -> bytes:
    """The plaintext file: one CSV row per device, header first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        writer.writerow(
            [
                record.device_id,
                record.hw_serial,
                f"{vendor_id:04X}",
                f"{record.product_id:04X}",
                record.discriminator,
                record.codes.qr_payload,
                record.codes.manual_code,
            ]
        )
    return out.getvalue().encode()


def check_recipient(certificate: x509.Certificate) -> None:
    """InputError unless the customer's certificate can receive the file (RSA >= 2048, key encipherment)."""
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise InputError(
            "the customer's recipient certificate must carry an RSA key: the onboarding-codes file is "
            "CMS EnvelopedData with RSA key transport (EC key agreement is not supported yet)"
        )
    if key.key_size < MIN_RECIPIENT_RSA_BITS:
        raise InputError(
            f"the recipient's RSA key has {key.key_size} bits; at least {MIN_RECIPIENT_RSA_BITS}"
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_encipherment:
        raise InputError("the recipient certificate's keyUsage does not allow keyEncipherment")


def load_recipient(data: bytes) -> x509.Certificate:
    """The customer's recipient certificate (PEM or DER), checked."""
    try:
        cert = (
            x509.load_pem_x509_certificate(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_certificate(data)
        )
    except ValueError as exc:
        raise InputError(f"the recipient is not a certificate: {exc}") from None
    check_recipient(cert)
    return cert


def encrypt_onboarding(plaintext: bytes, recipient: x509.Certificate) -> bytes:
    """CMS EnvelopedData (DER) of ``plaintext`` for ``recipient``, AES-256-CBC content encryption."""
    check_recipient(recipient)
    return (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(plaintext)
        .add_recipient(recipient)
        .set_content_encryption_algorithm(algorithms.AES256)
        .encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )
