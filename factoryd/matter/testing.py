"""A throwaway Matter PKI for the demo and the tests: PAA → PAI, a CD signing key and a signed CD.

Like ``pki/testca.py``: nothing here is trusted by a real commissioner. Test VIDs are 0xFFF1..0xFFF4
(spec 2.5.2); the shapes follow the SDK's test certificates (``credentials/test/attestation``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from factoryd.matter.cd import cd_content, sign_cd
from factoryd.matter.dac import MATTER_PID_OID, MATTER_VID_OID, NO_EXPIRY, hex4
from factoryd.pki.bundle import pem_of
from factoryd.pki.passphrase import Secret
from factoryd.pki.testca import ca_key_usage

TEST_VENDOR_ID = 0xFFF1
TEST_PRODUCT_ID = 0x8000
# The SDK's test CD certificate ID and a light bulb's device type (0x0100, "On/Off Light").
TEST_CERTIFICATE_ID = "ZIG20141ZB330001-24"
TEST_DEVICE_TYPE_ID = 0x0100
TEST_VALIDITY_DAYS = 40 * 366


def _name(common_name: str, vendor_id: int | None, product_id: int | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if vendor_id is not None:
        attributes.append(x509.NameAttribute(MATTER_VID_OID, hex4(vendor_id), _type=_ASN1Type.UTF8String))
    if product_id is not None:
        attributes.append(x509.NameAttribute(MATTER_PID_OID, hex4(product_id), _type=_ASN1Type.UTF8String))
    return x509.Name(attributes)


def make_matter_ca(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: x509.Certificate | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    path_length: int | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    ca: bool = True,
) -> x509.Certificate:
    """A PAA (self-signed) or PAI certificate in the Matter profile (``ca=False`` makes a broken one)."""
    signing_key = issuer_key or key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(ca_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    )
    return builder.sign(signing_key, hashes.SHA256())


@dataclass(frozen=True, repr=False)
class MatterTestPki:
    """A generated PAA, PAI (the lot's CA), CD signer and CD, and the PAI as an uploadable bundle."""

    __test__ = False  # not a pytest test class

    passphrase: Secret
    paa_key: ec.EllipticCurvePrivateKey
    paa: x509.Certificate
    pai_key: ec.EllipticCurvePrivateKey
    pai: x509.Certificate
    cd_signer_key: ec.EllipticCurvePrivateKey
    cd_signer: x509.Certificate
    cd_der: bytes
    pkcs12: bytes
    key_pem: bytes
    chain_pem: bytes

    def __repr__(self) -> str:
        return f"MatterTestPki(pai={self.pai.subject.rfc4514_string()!r})"

    @property
    def paa_pem(self) -> bytes:
        """The PAA as PEM (the trust anchor for openssl verify)."""
        return pem_of([self.paa])

    @property
    def cd_signer_pem(self) -> bytes:
        """The CD signing certificate as PEM."""
        return pem_of([self.cd_signer])


def make_matter_test_pki(
    *,
    passphrase: bytes,
    vendor_id: int = TEST_VENDOR_ID,
    product_ids: tuple[int, ...] = (TEST_PRODUCT_ID,),
    pai_vendor_id: int | None = None,
    cd_vendor_id: int | None = None,
    pai_is_ca: bool = True,
    no_expiry: bool = False,
    now: dt.datetime | None = None,
) -> MatterTestPki:
    """Generate a Matter test PKI (``pai_vendor_id``, ``cd_vendor_id``, ``pai_is_ca``: broken ones)."""
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    start = now - dt.timedelta(days=1)
    # With no_expiry the PAA and PAI say 99991231235959Z too, so they can carry DACs that do.
    end = NO_EXPIRY - dt.timedelta(days=365) if no_expiry else start + dt.timedelta(days=TEST_VALIDITY_DAYS)
    paa_key, pai_key, cd_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    paa = make_matter_ca(
        _name("factoryd Matter Test PAA", vendor_id),
        paa_key,
        path_length=1,
        not_before=start,
        not_after=NO_EXPIRY if no_expiry else end + dt.timedelta(days=365),
    )
    pai = make_matter_ca(
        _name("factoryd Matter Test PAI", pai_vendor_id if pai_vendor_id is not None else vendor_id),
        pai_key,
        issuer=paa,
        issuer_key=paa_key,
        path_length=0,
        not_before=start,
        not_after=NO_EXPIRY if no_expiry else end,
        ca=pai_is_ca,
    )
    cd_signer = make_matter_ca(
        _name("factoryd Matter Test CD Signing Authority", None),
        cd_key,
        path_length=1,
        not_before=start,
        not_after=end,
    )
    skid = x509.SubjectKeyIdentifier.from_public_key(cd_key.public_key()).digest
    content = cd_content(
        vendor_id=cd_vendor_id if cd_vendor_id is not None else vendor_id,
        product_ids=product_ids,
        device_type_id=TEST_DEVICE_TYPE_ID,
        certificate_id=TEST_CERTIFICATE_ID,
    )
    secret = Secret(passphrase)
    encryption = serialization.BestAvailableEncryption(bytes(secret))
    return MatterTestPki(
        passphrase=secret,
        paa_key=paa_key,
        paa=paa,
        pai_key=pai_key,
        pai=pai,
        cd_signer_key=cd_key,
        cd_signer=cd_signer,
        cd_der=sign_cd(content, cd_key, skid),
        pkcs12=pkcs12.serialize_key_and_certificates(b"matter-pai", pai_key, pai, [paa], encryption),
        key_pem=pai_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        ),
        chain_pem=pem_of([pai, paa]),
    )
