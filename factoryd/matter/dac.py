"""Matter device attestation certificates: the DAC profile the issuer follows, and an independent checker.

The issuer side (``DacSpec``, ``matter_subject``) is what ``pki/issuer.py`` uses for a lot whose
``CertProfile.dac`` is set. The checker (``certificate_problems``, ``chain_problems``) is written
separately from the spec's certificate profile (Matter Core Specification 6.2.2, "Device Attestation
Certificate", and the SDK's format check, ``../shared/MATTER.md`` section 1) and shares no code with
the issuer: tests run it on the DACs the station issues. It never raises on a bad certificate; it
returns every rule the certificate breaks, as sentences.

| | PAA | PAI | DAC |
|---|---|---|---|
| basicConstraints (critical) | CA, pathLen absent or 1 | CA, pathLen 0 | not CA, no pathLen |
| keyUsage (critical) | keyCertSign + cRLSign (+ digitalSignature) | same | digitalSignature only |
| AKI | optional | required | required |
| VID attribute | optional (= PAI's) | required | required, = PAI's |
| PID attribute | forbidden | optional (= DAC's) | required |
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from factoryd.errors import ConfigError, IssuanceError

MATTER_VID_OID = x509.ObjectIdentifier("1.3.6.1.4.1.37244.2.1")
MATTER_PID_OID = x509.ObjectIdentifier("1.3.6.1.4.1.37244.2.2")
# notAfter 99991231235959Z: "no well-defined expiration date" (RFC 5280 4.1.2.5).
NO_EXPIRY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
# The SDK's limits (kMaxDERCertLength, the serial buffer, the key identifier length).
MAX_CERT_DER_BYTES = 600
MAX_SERIAL_BYTES = 20
KEY_ID_BYTES = 20

Role = Literal["paa", "pai", "dac"]
_HEX4 = re.compile(r"[0-9A-F]{4}")
_LEGACY_VID = re.compile(r"Mvid:([0-9A-F]{4})")
_LEGACY_PID = re.compile(r"Mpid:([0-9A-F]{4})")


@dataclass(frozen=True, slots=True)
class DacSpec:
    """A lot's DAC shape: the Matter vendor ID, the product IDs a DAC may carry, the lifetime rule."""

    vendor_id: int
    product_ids: tuple[int, ...]
    no_expiry: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.vendor_id <= 0xFFFF:
            raise ConfigError(f"vendor ID {self.vendor_id} is not 1..0xFFFF")
        if not self.product_ids or any(not 0 < p <= 0xFFFF for p in self.product_ids):
            raise ConfigError("a DAC spec needs product IDs in 1..0xFFFF")

    def product_id_for(self, fields: Mapping[str, str] | None) -> int:
        """The device's PID: the lot's only one, or its ID-list column ``product_id`` (hex 0x… or decimal)."""
        wanted = (fields or {}).get("product_id")
        if wanted is None:
            if len(self.product_ids) == 1:
                return self.product_ids[0]
            raise IssuanceError("the lot has several product IDs; the ID list needs a product_id column")
        try:
            pid = int(wanted, 16) if wanted.lower().startswith("0x") else int(wanted)
        except ValueError:
            raise IssuanceError(f"product_id {wanted!r} is not a number") from None
        if pid not in self.product_ids:
            raise IssuanceError(f"product_id {wanted!r} is not one of the lot's product IDs")
        return pid


def hex4(value: int) -> str:
    """The Matter subject form of a VID or PID: exactly 4 upper-case hex digits."""
    return f"{value:04X}"


def matter_subject(base: x509.Name, vendor_id: int, product_id: int) -> x509.Name:
    """``base`` with the Matter VID and PID attributes appended (UTF8String, as chip-cert writes them)."""
    return x509.Name(
        [
            *base.rdns,
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(MATTER_VID_OID, hex4(vendor_id), _type=_ASN1Type.UTF8String)]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(MATTER_PID_OID, hex4(product_id), _type=_ASN1Type.UTF8String)]
            ),
        ]
    )


# -- the independent checker ----------------------------------------------------------------------
# Its own constants, spelled from the spec, so a typo on the issuer side cannot hide on both.
_SPEC_VID_OID = x509.ObjectIdentifier("1.3.6.1.4.1.37244.2.1")
_SPEC_PID_OID = x509.ObjectIdentifier("1.3.6.1.4.1.37244.2.2")


@dataclass(frozen=True, slots=True)
class MatterIds:
    """The VID and PID a certificate's subject carries (None when absent), or the problems reading them."""

    vendor_id: int | None
    product_id: int | None
    problems: tuple[str, ...]


def matter_ids(cert: x509.Certificate) -> MatterIds:
    """The Matter VID/PID of a subject: OID attributes, else the legacy ``Mvid:``/``Mpid:`` CN form."""
    problems: list[str] = []
    found: dict[str, int | None] = {"VID": None, "PID": None}
    for oid, name in ((_SPEC_VID_OID, "VID"), (_SPEC_PID_OID, "PID")):
        attributes = cert.subject.get_attributes_for_oid(oid)
        if len(attributes) > 1:
            problems.append(f"the subject has {len(attributes)} Matter {name} attributes")
        if attributes:
            value = attributes[0].value
            if not isinstance(value, str) or not _HEX4.fullmatch(value):
                problems.append(f"the Matter {name} attribute {value!r} is not 4 upper-case hex digits")
            else:
                found[name] = int(value, 16)
    if found["VID"] is None and found["PID"] is None and not problems:
        # Legacy fallback: only read when no OID attribute exists, and only the CN's first 64 chars.
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(names[0].value)[:64] if names else ""
        vid, pid = _LEGACY_VID.search(cn), _LEGACY_PID.search(cn)
        found["VID"] = int(vid.group(1), 16) if vid else None
        found["PID"] = int(pid.group(1), 16) if pid else None
    return MatterIds(found["VID"], found["PID"], tuple(problems))


def _extension(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None


def certificate_problems(cert: x509.Certificate, role: Role) -> list[str]:
    """Every rule of the Matter certificate profile ``cert`` breaks as a ``role`` (empty: conforms)."""
    what = role.upper()
    problems: list[str] = []
    der = cert.public_bytes(serialization.Encoding.DER)
    if len(der) > MAX_CERT_DER_BYTES:
        problems.append(f"{what} is {len(der)} bytes of DER; at most {MAX_CERT_DER_BYTES}")
    if cert.version is not x509.Version.v3:
        problems.append(f"{what} is not X.509 v3")
    serial_bytes = (cert.serial_number.bit_length() + 8) // 8
    if cert.serial_number <= 0 or serial_bytes > MAX_SERIAL_BYTES:
        problems.append(f"{what} serial is not a positive integer of at most {MAX_SERIAL_BYTES} bytes")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        problems.append(f"{what} is not signed with ecdsa-with-SHA256")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        problems.append(f"{what} key is not EC P-256")
    if cert.not_valid_before_utc >= cert.not_valid_after_utc:
        problems.append(f"{what} notBefore is not before notAfter")
    seen: dict[str, int] = {}
    for ext in cert.extensions:
        seen[ext.oid.dotted_string] = seen.get(ext.oid.dotted_string, 0) + 1
    for oid, count in seen.items():
        if count > 1:
            problems.append(f"{what} has extension {oid} {count} times")
    problems += _basic_constraints_problems(cert, role)
    problems += _key_usage_problems(cert, role)
    problems += _key_id_problems(cert, role)
    ids = matter_ids(cert)
    problems += [f"{what}: {p}" for p in ids.problems]
    if role in ("pai", "dac") and ids.vendor_id is None:
        problems.append(f"{what} subject has no Matter VID")
    if role == "dac" and ids.product_id is None:
        problems.append("DAC subject has no Matter PID")
    if role == "paa" and ids.product_id is not None:
        problems.append("PAA subject carries a Matter PID (forbidden)")
    return problems


def _basic_constraints_problems(cert: x509.Certificate, role: Role) -> list[str]:
    what = role.upper()
    ext = _extension(cert, x509.BasicConstraints)
    if ext is None:
        return [f"{what} has no basicConstraints"]
    problems = [] if ext.critical else [f"{what} basicConstraints is not critical"]
    value = ext.value
    if not isinstance(value, x509.BasicConstraints):
        return [*problems, f"{what} basicConstraints does not parse"]
    if role == "dac":
        if value.ca:
            problems.append("DAC basicConstraints says CA")
        if value.path_length is not None:
            problems.append("DAC basicConstraints has a pathLen")
    elif not value.ca:
        problems.append(f"{what} basicConstraints does not say CA")
    elif role == "pai" and value.path_length != 0:
        problems.append(f"PAI pathLen is {value.path_length}, must be 0")
    elif role == "paa" and value.path_length not in (None, 1):
        problems.append(f"PAA pathLen is {value.path_length}, must be absent or 1")
    return problems


def _key_usage_problems(cert: x509.Certificate, role: Role) -> list[str]:
    what = role.upper()
    ext = _extension(cert, x509.KeyUsage)
    if ext is None:
        return [f"{what} has no keyUsage"]
    problems = [] if ext.critical else [f"{what} keyUsage is not critical"]
    usage = ext.value
    if not isinstance(usage, x509.KeyUsage):
        return [*problems, f"{what} keyUsage does not parse"]
    others = {
        "nonRepudiation": usage.content_commitment,
        "keyEncipherment": usage.key_encipherment,
        "dataEncipherment": usage.data_encipherment,
        "keyAgreement": usage.key_agreement,
    }
    if role == "dac":
        others |= {"keyCertSign": usage.key_cert_sign, "cRLSign": usage.crl_sign}
        if not usage.digital_signature:
            problems.append("DAC keyUsage lacks digitalSignature")
    elif not (usage.key_cert_sign and usage.crl_sign):
        problems.append(f"{what} keyUsage lacks keyCertSign or cRLSign")
    extra = [name for name, on in others.items() if on]
    if extra:
        problems.append(f"{what} keyUsage has {', '.join(extra)} (not allowed)")
    return problems


def _key_id_problems(cert: x509.Certificate, role: Role) -> list[str]:
    what = role.upper()
    problems: list[str] = []
    ski = _extension(cert, x509.SubjectKeyIdentifier)
    if ski is None:
        problems.append(f"{what} has no subjectKeyIdentifier")
    else:
        if ski.critical:
            problems.append(f"{what} subjectKeyIdentifier is critical")
        if isinstance(ski.value, x509.SubjectKeyIdentifier) and len(ski.value.digest) != KEY_ID_BYTES:
            problems.append(f"{what} subjectKeyIdentifier is not {KEY_ID_BYTES} bytes")
    aki = _extension(cert, x509.AuthorityKeyIdentifier)
    if aki is None:
        if role != "paa":
            problems.append(f"{what} has no authorityKeyIdentifier")
    else:
        if aki.critical:
            problems.append(f"{what} authorityKeyIdentifier is critical")
        value = aki.value
        if isinstance(value, x509.AuthorityKeyIdentifier) and (
            value.key_identifier is None or len(value.key_identifier) != KEY_ID_BYTES
        ):
            problems.append(f"{what} authorityKeyIdentifier has no {KEY_ID_BYTES}-byte keyIdentifier")
    return problems


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    key = parent.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or child.signature_hash_algorithm is None:
        return False
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _key_ids_link(child: x509.Certificate, parent: x509.Certificate) -> bool:
    aki = _extension(child, x509.AuthorityKeyIdentifier)
    ski = _extension(parent, x509.SubjectKeyIdentifier)
    if aki is None or ski is None:
        return False
    aki_value, ski_value = aki.value, ski.value
    return (
        isinstance(aki_value, x509.AuthorityKeyIdentifier)
        and isinstance(ski_value, x509.SubjectKeyIdentifier)
        and aki_value.key_identifier == ski_value.digest
    )


def chain_problems(
    dac: x509.Certificate,
    pai: x509.Certificate,
    paa: x509.Certificate | None = None,
    *,
    at: dt.datetime | None = None,
) -> list[str]:
    """Every rule a DAC → PAI (→ PAA) chain breaks: each profile, the VID/PID rules, links, validity."""
    problems = certificate_problems(dac, "dac") + certificate_problems(pai, "pai")
    dac_ids, pai_ids = matter_ids(dac), matter_ids(pai)
    if dac_ids.vendor_id is not None and dac_ids.vendor_id != pai_ids.vendor_id:
        problems.append("DAC VID differs from the PAI's")
    if pai_ids.product_id is not None and pai_ids.product_id != dac_ids.product_id:
        problems.append("PAI carries a PID and it differs from the DAC's")
    if dac.issuer != pai.subject or not _signed_by(dac, pai) or not _key_ids_link(dac, pai):
        problems.append("DAC is not issued by the PAI (issuer name, signature or AKI/SKI)")
    when = at or dac.not_valid_before_utc
    for cert, name in ((dac, "DAC"), (pai, "PAI")):
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            problems.append(f"{name} is not valid at {when:%Y-%m-%dT%H:%M:%SZ}")
    if paa is not None:
        problems += certificate_problems(paa, "paa")
        paa_ids = matter_ids(paa)
        if paa_ids.vendor_id is not None and paa_ids.vendor_id != pai_ids.vendor_id:
            problems.append("PAA carries a VID and it differs from the PAI's")
        if pai.issuer != paa.subject or not _signed_by(pai, paa) or not _key_ids_link(pai, paa):
            problems.append("PAI is not issued by the PAA (issuer name, signature or AKI/SKI)")
        if not paa.not_valid_before_utc <= when <= paa.not_valid_after_utc:
            problems.append(f"PAA is not valid at {when:%Y-%m-%dT%H:%M:%SZ}")
    return problems
