"""The customer's onboarding-codes file: per Matter lot, every device's codes, encrypted to the customer.

The plaintext is a CSV (``device_id, hw_serial, vendor_id, product_id, discriminator, qr_payload,
manual_code``; VID/PID as 4 hex digits, as on the DAC). It is wrapped in CMS EnvelopedData
(RFC 5652) for the customer's certificate with AES-256-CBC content encryption, so only the holder of
the customer's private key reads the passcodes: ``openssl cms -decrypt -inform DER -in FILE
-recip CUSTOMER.pem -inkey CUSTOMER-KEY.pem``.

- RSA recipients (2048 bits or more): key transport, made by cryptography's ``PKCS7EnvelopeBuilder``.
- EC recipients (P-256, P-384): key agreement (RFC 5753, KeyAgreeRecipientInfo), which that builder
  does not offer: written here with ``pki/der.py``. An ephemeral ECDH key, the X9.63 KDF with
  SHA-256 (dhSinglePass-stdDH-sha256kdf-scheme) and AES-256 key wrap (RFC 3394) protect the content
  key; openssl cms is the oracle in the tests.
"""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.serialization import pkcs7

from factoryd.errors import InputError
from factoryd.ledger.matter import OnboardingRecord
from factoryd.pki import der

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
EC_RECIPIENT_CURVES = ("secp256r1", "secp384r1")
CONTENT_KEY_BYTES = 32  # AES-256
AES_BLOCK_BYTES = 16
# DER of the object identifiers the EC (key agreement) form writes.
_OID_ENVELOPED_DATA = bytes.fromhex("06092a864886f70d010703")  # 1.2.840.113549.1.7.3
_OID_DATA = bytes.fromhex("06092a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1
_OID_ECDH_SHA256_KDF = bytes.fromhex("06062b8104010b01")  # 1.3.132.1.11.1 dhSinglePass-stdDH-sha256kdf
_OID_AES256_WRAP = bytes.fromhex("060960864801650304012d")  # 2.16.840.1.101.3.4.1.45
_OID_AES256_CBC = bytes.fromhex("060960864801650304012a")  # 2.16.840.1.101.3.4.1.42
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
    """InputError unless the customer's certificate can receive the file (RSA >= 2048, or EC P-256/P-384)."""
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RECIPIENT_RSA_BITS:
            raise InputError(
                f"the recipient's RSA key has {key.key_size} bits; at least {MIN_RECIPIENT_RSA_BITS}"
            )
        wanted, name = "key_encipherment", "keyEncipherment"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_RECIPIENT_CURVES:
            raise InputError(f"the recipient's EC key is on {key.curve.name}; P-256 or P-384 is needed")
        wanted, name = "key_agreement", "keyAgreement"
    else:
        raise InputError("the customer's recipient certificate must carry an RSA or EC key")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not getattr(usage, wanted):
        raise InputError(f"the recipient certificate's keyUsage does not allow {name}")


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
    key = recipient.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _ec_enveloped(plaintext, recipient, key)
    return (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(plaintext)
        .add_recipient(recipient)
        .set_content_encryption_algorithm(algorithms.AES256)
        .encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )


def _ec_enveloped(plaintext: bytes, recipient: x509.Certificate, key: ec.EllipticCurvePublicKey) -> bytes:
    """EnvelopedData with one KeyAgreeRecipientInfo (RFC 5652 6.2.2, RFC 5753 3.1)."""
    seq = der.TAG_SEQUENCE
    content_key = secrets.token_bytes(CONTENT_KEY_BYTES)
    ephemeral = ec.generate_private_key(key.curve)
    shared = ephemeral.exchange(ec.ECDH(), key)
    wrap_algorithm = der.encode(seq, _OID_AES256_WRAP)  # AES key wrap: parameters absent
    # ECC-CMS-SharedInfo: the key-wrap algorithm and the KEK length in bits ([2] suppPubInfo).
    shared_info = der.encode(
        seq,
        wrap_algorithm
        + der.encode(0xA2, der.encode(der.TAG_OCTET_STRING, (8 * CONTENT_KEY_BYTES).to_bytes(4, "big"))),
    )
    kek = X963KDF(algorithm=hashes.SHA256(), length=CONTENT_KEY_BYTES, sharedinfo=shared_info).derive(shared)
    wrapped = aes_key_wrap(kek, content_key)
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    originator_key = der.encode(
        0xA1, der.encode(seq, _OID_EC_PUBLIC_KEY) + der.encode(der.TAG_BIT_STRING, b"\x00" + point)
    )
    issuer_and_serial = der.encode(
        seq, recipient.issuer.public_bytes() + der.encode_integer(recipient.serial_number)
    )
    kari = der.encode(
        0xA1,  # [1] KeyAgreeRecipientInfo
        der.encode_integer(3)
        + der.encode(der.TAG_CONTEXT_0, originator_key)
        + der.encode(seq, _OID_ECDH_SHA256_KDF + wrap_algorithm)
        + der.encode(seq, der.encode(seq, issuer_and_serial + der.encode(der.TAG_OCTET_STRING, wrapped))),
    )
    iv = secrets.token_bytes(AES_BLOCK_BYTES)
    padder = padding.PKCS7(8 * AES_BLOCK_BYTES).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    encrypted_content_info = der.encode(
        seq,
        _OID_DATA
        + der.encode(seq, _OID_AES256_CBC + der.encode(der.TAG_OCTET_STRING, iv))
        + der.encode(0x80, ciphertext),  # [0] IMPLICIT encryptedContent
    )
    # Version 2: a KeyAgreeRecipientInfo (version 3) is present and there is no originatorInfo.
    enveloped = der.encode(
        seq, der.encode_integer(2) + der.encode(der.TAG_SET, kari) + encrypted_content_info
    )
    return der.encode(seq, _OID_ENVELOPED_DATA + der.encode(der.TAG_CONTEXT_0, enveloped))
