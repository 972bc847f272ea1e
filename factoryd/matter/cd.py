"""The Matter Certification Declaration: a CMS SignedData whose content is a Matter TLV structure.

Shape (spec 6.3.1; SDK ``CertificationDeclaration.cpp``): ContentInfo(signedData) → SignedData
version 3, one digest algorithm SHA-256, eContentType pkcs7-data with the TLV as content, no
certificates, one SignerInfo version 3 naming its signer by subjectKeyIdentifier only, digest
SHA-256, no signed attributes, ecdsa-with-SHA256 over the raw TLV content.

TLV (anonymous structure, context tags): 0 format_version, 1 vendor_id, 2 product_id_array (1..100),
3 device_type_id, 4 certificate_id (19 characters), 5 security_level, 6 security_information,
7 version_number, 8 certification_type (0 development/test, 1 provisional, 2 official),
9/10 dac_origin_vendor_id/_product_id (both or neither), 11 authorized_paa_list (up to 10 SKIDs).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.errors import InputError
from factoryd.matter import tlv
from factoryd.pki import der

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_DATA = "1.2.840.113549.1.7.1"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
# A real CD is a few hundred bytes; the SDK's buffer is 600 (kMaxCMSSignedCDMessage).
MAX_CD_BYTES = 600
CERTIFICATE_ID_CHARS = 19
MAX_PRODUCT_IDS = 100
MAX_AUTHORIZED_PAAS = 10
SKID_BYTES = 20
CERTIFICATION_TYPES = {0: "development and test", 1: "provisional", 2: "official"}
# The SDK's test CD signing key's SKID (credentials/test/certification-declaration/): a CD signed
# by it is a test CD, accepted by commissioners only when they allow test keys.
TEST_CD_SIGNER_SKID = bytes.fromhex("62FA823359ACFAA9963E1CFA140ADDF504F37160")


class CdError(InputError):
    """The Certification Declaration does not parse, or says something it may not."""


@dataclass(frozen=True, slots=True)
class CertificationDeclaration:
    """A parsed Certification Declaration, its signer's SKID and what was signed."""

    format_version: int
    vendor_id: int
    product_ids: tuple[int, ...]
    device_type_id: int
    certificate_id: str
    security_level: int
    security_information: int
    version_number: int
    certification_type: int
    dac_origin_vendor_id: int | None
    dac_origin_product_id: int | None
    authorized_paa_skids: tuple[bytes, ...]
    signer_skid: bytes
    content: bytes  # the TLV, as signed
    signature: bytes  # DER ECDSA
    der: bytes

    @property
    def is_test_signed(self) -> bool:
        """True when the SDK's published test key signed it (only test commissioners accept it)."""
        return self.signer_skid == TEST_CD_SIGNER_SKID

    def verify(self, signer: x509.Certificate) -> None:
        """CdError unless ``signer`` (its SKID and key) made this CD's signature."""
        try:
            skid = signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            raise CdError("the CD signing certificate has no subjectKeyIdentifier") from None
        if skid != self.signer_skid:
            raise CdError(
                f"the CD names signer SKID {self.signer_skid.hex().upper()}, the certificate given is "
                f"{skid.hex().upper()}"
            )
        key = signer.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise CdError("the CD signing certificate's key is not EC P-256")
        try:
            key.verify(self.signature, self.content, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CdError("the CD's signature does not verify with the CD signing certificate") from None

    def allows_dac_ids(self, vendor_id: int, product_id: int) -> bool:
        """Whether a DAC (and PAI) with these IDs may carry this CD (spec 6.2.3 step 6)."""
        if self.dac_origin_vendor_id is not None:
            return vendor_id == self.dac_origin_vendor_id and product_id == self.dac_origin_product_id
        return vendor_id == self.vendor_id and product_id in self.product_ids


def _algorithm(tlv_: der.Tlv, what: str) -> str:
    parts = der.expect(tlv_, der.TAG_SEQUENCE, what).children()
    if not parts:
        raise CdError(f"{what} is empty")
    return der.decode_oid(parts[0])


def _unwrap_cms(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(content, signer SKID, signature) of a CD's CMS envelope, every fixed field checked."""
    content_info = der.expect(der.read_single(data), der.TAG_SEQUENCE, "ContentInfo").children()
    if len(content_info) != 2 or der.decode_oid(content_info[0]) != OID_SIGNED_DATA:
        raise CdError("the CD is not a CMS SignedData")
    signed = der.expect(
        der.read_single(der.expect(content_info[1], der.TAG_CONTEXT_0, "content").content),
        der.TAG_SEQUENCE,
        "SignedData",
    ).children()
    if len(signed) != 4:
        raise CdError(
            "the CD's SignedData must hold exactly version, digestAlgorithms, encapContentInfo and "
            "signerInfos (no certificates or CRLs)"
        )
    version, digests, encap, signer_infos = signed
    if der.decode_integer(version) != 3:
        raise CdError("the CD's SignedData version is not 3")
    digest_list = der.expect(digests, der.TAG_SET, "digestAlgorithms").children()
    if len(digest_list) != 1 or _algorithm(digest_list[0], "digest algorithm") != OID_SHA256:
        raise CdError("the CD's digest algorithm is not SHA-256")
    encap_parts = der.expect(encap, der.TAG_SEQUENCE, "encapContentInfo").children()
    if len(encap_parts) != 2 or der.decode_oid(encap_parts[0]) != OID_DATA:
        raise CdError("the CD's content type is not pkcs7-data")
    content = der.expect(
        der.read_single(der.expect(encap_parts[1], der.TAG_CONTEXT_0, "eContent").content),
        der.TAG_OCTET_STRING,
        "eContent",
    ).content
    infos = der.expect(signer_infos, der.TAG_SET, "signerInfos").children()
    if len(infos) != 1:
        raise CdError(f"the CD has {len(infos)} signers; exactly one is allowed")
    info = der.expect(infos[0], der.TAG_SEQUENCE, "SignerInfo").children()
    if len(info) != 5:
        raise CdError("the CD's SignerInfo must have no signed or unsigned attributes")
    info_version, sid, digest_alg, signature_alg, signature = info
    if der.decode_integer(info_version) != 3:
        raise CdError("the CD's SignerInfo version is not 3 (signer named by SKID)")
    if sid.tag != 0x80 or len(sid.content) != SKID_BYTES:
        raise CdError("the CD's signer is not named by a 20-byte subjectKeyIdentifier")
    if _algorithm(digest_alg, "SignerInfo digest") != OID_SHA256:
        raise CdError("the CD's SignerInfo digest is not SHA-256")
    if _algorithm(signature_alg, "signature algorithm") != OID_ECDSA_SHA256:
        raise CdError("the CD's signature algorithm is not ecdsa-with-SHA256")
    return content, sid.content, der.expect(signature, der.TAG_OCTET_STRING, "signature").content


def _uint(element: tlv.TlvElement, name: str, bits: int) -> int:
    if element.kind != "uint" or not isinstance(element.value, int) or isinstance(element.value, bool):
        raise CdError(f"CD field {name} is not an unsigned integer")
    if element.value >= 1 << bits:
        raise CdError(f"CD field {name} does not fit {bits} bits")
    return element.value


def parse_cd(data: bytes) -> CertificationDeclaration:
    """Parse a DER Certification Declaration; CdError naming the first problem."""
    if not data:
        raise CdError("the CD file is empty")
    if len(data) > MAX_CD_BYTES:
        raise CdError(f"the CD is {len(data)} bytes; commissioners accept at most {MAX_CD_BYTES}")
    try:
        content, skid, signature = _unwrap_cms(data)
        root = tlv.decode(content)
    except der.DerError as exc:
        raise CdError(f"the CD is not valid DER: {exc}") from None
    except tlv.TlvError as exc:
        raise CdError(f"the CD's content is not valid Matter TLV: {exc}") from None
    if root.kind != "struct" or root.tag is not None:
        raise CdError("the CD's content is not an anonymous TLV structure")
    fields: dict[int, tlv.TlvElement] = {}
    last = -1
    for member in root.members():
        if member.tag is None or member.tag <= last:
            raise CdError("the CD's fields are not in increasing tag order")
        last = member.tag
        fields[member.tag] = member
    for required, name in (
        (0, "format_version"),
        (1, "vendor_id"),
        (2, "product_id_array"),
        (3, "device_type_id"),
        (4, "certificate_id"),
        (5, "security_level"),
        (6, "security_information"),
        (7, "version_number"),
        (8, "certification_type"),
    ):
        if required not in fields:
            raise CdError(f"the CD has no {name} (tag {required})")
    format_version = _uint(fields[0], "format_version", 8)
    if format_version != 1:
        raise CdError(f"the CD's format_version is {format_version}; only 1 is defined")
    pids_element = fields[2]
    if pids_element.kind != "array":
        raise CdError("the CD's product_id_array is not an array")
    product_ids = tuple(_uint(e, "product_id", 16) for e in pids_element.members())
    if not 1 <= len(product_ids) <= MAX_PRODUCT_IDS:
        raise CdError(f"the CD lists {len(product_ids)} product IDs; 1..{MAX_PRODUCT_IDS} are allowed")
    cert_id = fields[4]
    if cert_id.kind != "utf8" or not isinstance(cert_id.value, str):
        raise CdError("the CD's certificate_id is not a UTF-8 string")
    if len(cert_id.value) != CERTIFICATE_ID_CHARS:
        raise CdError(
            f"the CD's certificate_id has {len(cert_id.value)} characters, not {CERTIFICATE_ID_CHARS}"
        )
    certification_type = _uint(fields[8], "certification_type", 8)
    if certification_type not in CERTIFICATION_TYPES:
        raise CdError(f"the CD's certification_type {certification_type} is not 0, 1 or 2")
    origin_vid = _uint(fields[9], "dac_origin_vendor_id", 16) if 9 in fields else None
    origin_pid = _uint(fields[10], "dac_origin_product_id", 16) if 10 in fields else None
    if (origin_vid is None) != (origin_pid is None):
        raise CdError("the CD has only one of dac_origin_vendor_id and dac_origin_product_id")
    paas: tuple[bytes, ...] = ()
    if 11 in fields:
        if fields[11].kind != "array":
            raise CdError("the CD's authorized_paa_list is not an array")
        members = fields[11].members()
        if not 1 <= len(members) <= MAX_AUTHORIZED_PAAS:
            raise CdError(f"the CD's authorized_paa_list holds {len(members)} entries; 1..10 are allowed")
        for member in members:
            if (
                member.kind != "bytes"
                or not isinstance(member.value, bytes)
                or len(member.value) != SKID_BYTES
            ):
                raise CdError("an authorized_paa_list entry is not a 20-byte SKID")
        paas = tuple(m.value for m in members if isinstance(m.value, bytes))
    return CertificationDeclaration(
        format_version=format_version,
        vendor_id=_uint(fields[1], "vendor_id", 16),
        product_ids=product_ids,
        device_type_id=_uint(fields[3], "device_type_id", 32),
        certificate_id=cert_id.value,
        security_level=_uint(fields[5], "security_level", 8),
        security_information=_uint(fields[6], "security_information", 16),
        version_number=_uint(fields[7], "version_number", 16),
        certification_type=certification_type,
        dac_origin_vendor_id=origin_vid,
        dac_origin_product_id=origin_pid,
        authorized_paa_skids=paas,
        signer_skid=skid,
        content=content,
        signature=signature,
        der=data,
    )


# -- writer (test and demo CDs; a real CD comes from the CSA) ----------------------------------

_OID_DER = {
    OID_SIGNED_DATA: bytes.fromhex("06092a864886f70d010702"),
    OID_DATA: bytes.fromhex("06092a864886f70d010701"),
    OID_SHA256: bytes.fromhex("0609608648016503040201"),
    OID_ECDSA_SHA256: bytes.fromhex("06082a8648ce3d040302"),
}


def cd_content(
    *,
    vendor_id: int,
    product_ids: tuple[int, ...],
    device_type_id: int,
    certificate_id: str,
    certification_type: int = 0,
    security_level: int = 0,
    security_information: int = 0,
    version_number: int = 1,
    dac_origin: tuple[int, int] | None = None,
    authorized_paa_skids: tuple[bytes, ...] = (),
) -> bytes:
    """The TLV content of a CD with these fields (as the SDK's chip-cert gen-cd writes it)."""
    members = [
        tlv.encode_uint(0, 1),
        tlv.encode_uint(1, vendor_id),
        tlv.encode_container(2, "array", [tlv.encode_uint(None, pid) for pid in product_ids]),
        tlv.encode_uint(3, device_type_id),
        tlv.encode_utf8(4, certificate_id),
        tlv.encode_uint(5, security_level),
        tlv.encode_uint(6, security_information),
        tlv.encode_uint(7, version_number),
        tlv.encode_uint(8, certification_type),
    ]
    if dac_origin is not None:
        members += [tlv.encode_uint(9, dac_origin[0]), tlv.encode_uint(10, dac_origin[1])]
    if authorized_paa_skids:
        members.append(
            tlv.encode_container(11, "array", [tlv.encode_bytes(None, s) for s in authorized_paa_skids])
        )
    return tlv.encode_container(None, "struct", members)


def sign_cd(content: bytes, key: ec.EllipticCurvePrivateKey, signer_skid: bytes) -> bytes:
    """Wrap TLV ``content`` in the CD's CMS SignedData, signed by ``key`` and named by ``signer_skid``."""
    seq, set_ = der.TAG_SEQUENCE, der.TAG_SET
    sha256 = der.encode(seq, _OID_DER[OID_SHA256])
    signature = key.sign(content, ec.ECDSA(hashes.SHA256()))
    signer_info = der.encode(
        seq,
        der.encode_integer(3)
        + der.encode(0x80, signer_skid)
        + sha256
        + der.encode(seq, _OID_DER[OID_ECDSA_SHA256])
        + der.encode(der.TAG_OCTET_STRING, signature),
    )
    encap = der.encode(
        seq, _OID_DER[OID_DATA] + der.encode(der.TAG_CONTEXT_0, der.encode(der.TAG_OCTET_STRING, content))
    )
    signed_data = der.encode(
        seq, der.encode_integer(3) + der.encode(set_, sha256) + encap + der.encode(set_, signer_info)
    )
    return der.encode(seq, _OID_DER[OID_SIGNED_DATA] + der.encode(der.TAG_CONTEXT_0, signed_data))
