"""A throwaway customer PKI for the demo and the tests: root, issuing CA (pathLen 0), server-CA anchor."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from factoryd.pki.bundle import pem_of
from factoryd.pki.passphrase import Secret
from factoryd.pki.profile import ARDUINO_ISSUER, ProfileKind, utc_now
from factoryd.pki.signer import CaPrivateKey

# Long enough for 31-year arduino-v1 device certificates issued today.
DEFAULT_TEST_CA_VALIDITY_DAYS = 40 * 366
# Fixed serials keep test output stable; real CAs are the customer's business.
ROOT_SERIAL = 0x1001
ISSUING_SERIAL = 0x2002
SERVER_CA_SERIAL = 0x3003


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "factoryd test customer"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def ca_key_usage(*, digital_signature: bool) -> x509.KeyUsage:
    """keyCertSign + cRLSign (+ digitalSignature, which OpenSSL wants for CMS signing)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca_cert(
    subject: x509.Name,
    key: CaPrivateKey,
    *,
    issuer: x509.Certificate | None = None,
    issuer_key: CaPrivateKey | None = None,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None = None,
    digital_signature: bool = True,
) -> x509.Certificate:
    """A CA certificate, self-signed unless ``issuer``/``issuer_key`` are given."""
    signing_key = issuer_key or key
    issuer_name = issuer.subject if issuer else subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(ca_key_usage(digital_signature=digital_signature), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key())
    builder = builder.add_extension(aki, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@dataclass(frozen=True, repr=False)
class TestPki:
    """Everything a test or the demo needs about one generated customer PKI."""

    __test__ = False  # not a pytest test class

    profile_kind: ProfileKind
    passphrase: Secret
    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    issuing_key: ec.EllipticCurvePrivateKey
    issuing_cert: x509.Certificate
    server_ca_cert: x509.Certificate
    pkcs12: bytes
    key_pem: bytes
    chain_pem: bytes
    trust_anchors_pem: bytes

    def __repr__(self) -> str:
        subject = self.issuing_cert.subject.rfc4514_string()
        return f"TestPki(profile_kind={self.profile_kind!r}, issuing={subject!r})"

    @property
    def root_pem(self) -> bytes:
        """The root certificate as PEM (openssl -CAfile)."""
        return pem_of([self.root_cert])

    @property
    def issuing_pem(self) -> bytes:
        """The issuing CA certificate as PEM."""
        return pem_of([self.issuing_cert])


def make_test_pki(
    *,
    profile_kind: ProfileKind = "factoryd-v1",
    passphrase: bytes,
    validity_days: int = DEFAULT_TEST_CA_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> TestPki:
    """Generate a root, an issuing CA valid ``validity_days`` and a server-CA trust anchor (all P-256)."""
    now = utc_now(now).replace(microsecond=0)
    start = now - dt.timedelta(days=1)
    root_key = ec.generate_private_key(ec.SECP256R1())
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    root = make_ca_cert(
        _name("factoryd Test Root CA"),
        root_key,
        serial=ROOT_SERIAL,
        not_before=start,
        not_after=start + dt.timedelta(days=validity_days + 365),
    )
    issuing_subject = ARDUINO_ISSUER if profile_kind == "arduino-v1" else _name("factoryd Test Issuing CA")
    issuing = make_ca_cert(
        issuing_subject,
        issuing_key,
        issuer=root,
        issuer_key=root_key,
        serial=ISSUING_SERIAL,
        not_before=start,
        not_after=start + dt.timedelta(days=validity_days),
        path_length=0,
    )
    server_ca = make_ca_cert(
        _name("factoryd Test Cloud Server CA"),
        server_key,
        serial=SERVER_CA_SERIAL,
        not_before=start,
        not_after=start + dt.timedelta(days=validity_days),
    )
    secret = Secret(passphrase)
    encryption = serialization.BestAvailableEncryption(bytes(secret))
    p12 = pkcs12.serialize_key_and_certificates(
        b"issuing-ca", issuing_key, issuing, [root, server_ca], encryption
    )
    key_pem = issuing_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return TestPki(
        profile_kind=profile_kind,
        passphrase=secret,
        root_key=root_key,
        root_cert=root,
        issuing_key=issuing_key,
        issuing_cert=issuing,
        server_ca_cert=server_ca,
        pkcs12=p12,
        key_pem=key_pem,
        chain_pem=pem_of([issuing, root]),
        trust_anchors_pem=pem_of([server_ca]),
    )
