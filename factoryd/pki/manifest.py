"""The signed manifest a customer downloads: canonical JSON plus a detached CMS signature.

Customers check it with
``openssl cms -verify -binary -content manifest.json -inform DER -in manifest.p7s -CAfile root.pem``
(OpenSSL's default S/MIME purpose wants digitalSignature in the CA's keyUsage when keyUsage is
present; otherwise add ``-purpose any``). ``verify_manifest`` does the same checks in Python.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from factoryd.errors import PkiError
from factoryd.pki import der
from factoryd.pki.profile import utc_now
from factoryd.pki.signer import Signer, SoftwareSigner, hash_for_key

MANIFEST_SCHEMA_VERSION = 1
MAX_CHAIN_DEPTH = 8

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_DATA = "1.2.840.113549.1.7.1"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}
_SIGNATURE_ALGORITHMS = {
    "1.2.840.10045.2.1",  # id-ecPublicKey, as some CMS producers write it
    "1.2.840.10045.4.3.2",
    "1.2.840.10045.4.3.3",
    "1.2.840.10045.4.3.4",
    "1.2.840.113549.1.1.1",  # rsaEncryption (PKCS#1 v1.5)
    "1.2.840.113549.1.1.11",
    "1.2.840.113549.1.1.12",
    "1.2.840.113549.1.1.13",
}


class ManifestError(PkiError):
    """A manifest could not be built, or does not verify."""


class ManifestRecord(Protocol):
    """What the manifest needs of one provisioned device (the ledger's ``ProvisionedDevice`` is one)."""

    @property
    def device_id(self) -> str:
        """The customer's device ID."""
        ...

    @property
    def hw_serial(self) -> str:
        """The board's secure-element serial."""
        ...

    @property
    def cert_der(self) -> bytes:
        """The device certificate, DER (PEM only in the manifest's output)."""
        ...

    @property
    def cert_serial(self) -> str:
        """The certificate's serial number, hex (as ``IssuedCertificate.serial_hex``)."""
        ...

    @property
    def fingerprint_sha256(self) -> str:
        """Hex SHA-256 of ``cert_der``."""
        ...

    @property
    def provisioned_at(self) -> dt.datetime:
        """When the device was recorded as provisioned (timezone-aware)."""
        ...

    @property
    def station(self) -> str:
        """The station that provisioned it."""
        ...

    @property
    def port(self) -> str:
        """The hub port name as the station config spells it."""
        ...

    @property
    def metadata(self) -> Mapping[str, object]:
        """The extra fields of the device's line in the customer's ID list."""
        ...


class AuditAnchor(Protocol):
    """One audit chain's head as the ledger had it when the manifest was made (``ledger.audit.ChainHead``)."""

    @property
    def chain(self) -> str:
        """The chain's name (the actor appending to it: a station, ``cli``…)."""
        ...

    @property
    def seq(self) -> int:
        """Its last link's position."""
        ...

    @property
    def hash(self) -> str:
        """Its last link's hash (hex)."""
        ...


class RevokedRecord(Protocol):
    """A certificate issued for the lot that does not stand (the ledger's ``RevokedCertificate``)."""

    @property
    def device_id(self) -> str:
        """The device ID the certificate names."""
        ...

    @property
    def cert_serial(self) -> str:
        """The certificate's serial number, hex."""
        ...

    @property
    def fingerprint_sha256(self) -> str:
        """Hex SHA-256 of the certificate's DER."""
        ...

    @property
    def issued_at(self) -> dt.datetime:
        """When the station signed it."""
        ...

    @property
    def revoked_at(self) -> dt.datetime:
        """Since when it does not stand."""
        ...

    @property
    def cause(self) -> str:
        """``superseded``, ``voided`` or ``failed`` (docs/clouds.md, Revocation)."""
        ...


@dataclass(frozen=True)
class SignedManifest:
    """The canonical JSON document and its detached DER CMS signature."""

    lot: str
    count: int
    json_bytes: bytes
    signature_der: bytes

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the JSON document."""
        return hashlib.sha256(self.json_bytes).hexdigest()


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the byte form that is signed."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _iso(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        raise ManifestError("timestamps must be timezone-aware")
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _device_entry(record: ManifestRecord, genuineness: Mapping[str, str] | None = None) -> dict[str, Any]:
    try:
        cert = x509.load_der_x509_certificate(record.cert_der)
    except ValueError:
        raise ManifestError(f"device {record.device_id!r}: certificate DER does not parse") from None
    cert_sha256 = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if record.fingerprint_sha256.lower() != cert_sha256:
        raise ManifestError(f"device {record.device_id!r}: fingerprint does not match its certificate")
    if int(record.cert_serial, 16) != cert.serial_number:
        raise ManifestError(f"device {record.device_id!r}: serial does not match its certificate")
    entry: dict[str, Any] = {
        "device_id": record.device_id,
        "hw_serial": record.hw_serial,
        "cert_serial": f"{cert.serial_number:x}",
        "cert_sha256": cert_sha256,
        "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "provisioned_at": _iso(record.provisioned_at),
        "station": record.station,
        "port": record.port,
        "metadata": dict(record.metadata),
    }
    if genuineness is not None:
        entry["genuineness"] = dict(genuineness)
    return entry


def _revoked_entry(record: RevokedRecord) -> dict[str, Any]:
    return {
        "device_id": record.device_id,
        "cert_serial": record.cert_serial.lower(),
        "cert_sha256": record.fingerprint_sha256.lower(),
        "reason": str(record.cause),
        "issued_at": _iso(record.issued_at),
        "revoked_at": _iso(record.revoked_at),
    }


def build_manifest(
    lot: str,
    records: Sequence[ManifestRecord],
    signer: Signer,
    chain: Sequence[x509.Certificate],
    *,
    revoked: Sequence[RevokedRecord] = (),
    genuineness: Mapping[str, Mapping[str, str]] | None = None,
    audit_chains: Sequence[AuditAnchor] = (),
    now: dt.datetime | None = None,
) -> SignedManifest:
    """Build the canonical manifest of ``records`` and sign it (detached CMS) with the lot's CA.

    ``revoked`` lists the certificates the CA signed for the lot that do not stand (the CRL's
    entries), so the manifest accounts for every certificate issued. ``genuineness`` maps a device
    ID to how its secure element proved genuine (``AttestationResult.details()``: attestation
    certificate fingerprint and issuer); such a device's entry carries it as ``genuineness``.
    ``audit_chains`` are the ledger's audit chain heads now (``ledger.core.audit_chain_heads``): signed into
    the manifest as ``audit_chains``, they let ``factoryd audit verify --manifest`` catch a chain
    whose tail was cut off later together with its head row.
    """
    evidence = genuineness or {}
    entries = sorted(
        (_device_entry(r, evidence.get(r.device_id)) for r in records), key=lambda e: str(e["device_id"])
    )
    for previous, current in itertools.pairwise(entries):
        if previous["device_id"] == current["device_id"]:
            raise ManifestError(f"device {current['device_id']!r} appears twice")
    revoked_entries = sorted(
        (_revoked_entry(r) for r in revoked), key=lambda e: (str(e["issued_at"]), str(e["cert_serial"]))
    )
    standing = {str(e["cert_serial"]) for e in entries}
    for entry in revoked_entries:
        if entry["cert_serial"] in standing:
            raise ManifestError(f"certificate {entry['cert_serial']} is listed as provisioned and revoked")
    ca = signer.certificate
    document = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "lot": lot,
        "generated_at": _iso(utc_now(now)),
        "count": len(entries),
        "ca": {
            "subject": ca.subject.rfc4514_string(),
            "fingerprint_sha256": hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest(),
        },
        "devices": entries,
        "revoked_count": len(revoked_entries),
        "revoked": revoked_entries,
    }
    if audit_chains:
        document["audit_chains"] = [
            {"chain": a.chain, "seq": a.seq, "hash": a.hash}
            for a in sorted(audit_chains, key=lambda a: a.chain)
        ]
    try:
        content = canonical_json(document)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest metadata is not plain JSON: {exc}") from None
    return SignedManifest(lot, len(entries), content, sign_detached(content, signer, chain))


def sign_detached(content: bytes, signer: Signer, chain: Sequence[x509.Certificate]) -> bytes:
    """A detached DER CMS SignedData over ``content``, embedding the signer's chain."""
    ca = signer.certificate
    algorithm = hash_for_key(signer.public_key)
    if isinstance(signer, SoftwareSigner):
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = signer.private_key
    elif isinstance(signer.public_key, ec.EllipticCurvePublicKey):
        # Any other signer (a token) only signs bytes: build the CMS with a throwaway key of the
        # same kind, then sign the real signed attributes and splice that signature in.
        key = ec.generate_private_key(signer.public_key.curve)
    else:
        key = rsa.generate_private_key(65537, 2048)
    builder = pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(ca, key, algorithm)
    ca_der = ca.public_bytes(serialization.Encoding.DER)
    for cert in chain:
        if cert.public_bytes(serialization.Encoding.DER) != ca_der:
            builder = builder.add_certificate(cert)
    options = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
    cms = builder.sign(serialization.Encoding.DER, options)
    if isinstance(signer, SoftwareSigner):
        return cms
    return _splice_signature(cms, signer)


def _signer_info_parts(cms: bytes) -> tuple[der.Tlv, der.Tlv, list[der.Tlv], list[der.Tlv]]:
    content_info = der.expect(der.read_single(cms), der.TAG_SEQUENCE, "ContentInfo")
    ci_parts = content_info.children()
    if len(ci_parts) != 2 or der.decode_oid(ci_parts[0]) != OID_SIGNED_DATA:
        raise der.DerError("not a CMS SignedData")
    wrapper = der.expect(ci_parts[1], der.TAG_CONTEXT_0, "ContentInfo content")
    wrapped = wrapper.children()
    if len(wrapped) != 1:
        raise der.DerError("SignedData wrapper holds more than one element")
    signed_data = der.expect(wrapped[0], der.TAG_SEQUENCE, "SignedData")
    sd_parts = signed_data.children()
    if len(sd_parts) < 4:
        raise der.DerError("SignedData is too short")
    infos = der.expect(sd_parts[-1], der.TAG_SET, "signerInfos").children()
    if len(infos) != 1:
        raise der.DerError(f"expected exactly one signer, found {len(infos)}")
    info = der.expect(infos[0], der.TAG_SEQUENCE, "SignerInfo")
    return ci_parts[0], info, sd_parts, info.children()


def _splice_signature(cms: bytes, signer: Signer) -> bytes:
    oid, _, sd_parts, parts = _signer_info_parts(cms)
    signed_attrs = der.expect(parts[3], der.TAG_CONTEXT_0, "signedAttrs")
    # The signature covers the attributes re-tagged as a SET OF (RFC 5652 5.4).
    signature = signer.sign_bytes(bytes([der.TAG_SET]) + signed_attrs.raw[1:])
    new_parts = [p.raw for p in parts]
    new_parts[5] = der.encode(der.TAG_OCTET_STRING, signature)
    info = der.encode(der.TAG_SEQUENCE, b"".join(new_parts))
    signed_data = der.encode(
        der.TAG_SEQUENCE, b"".join(p.raw for p in sd_parts[:-1]) + der.encode(der.TAG_SET, info)
    )
    return der.encode(der.TAG_SEQUENCE, oid.raw + der.encode(der.TAG_CONTEXT_0, signed_data))


def verify_manifest(
    json_bytes: bytes,
    sig_der: bytes,
    trust_roots: Sequence[x509.Certificate],
    *,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Verify the detached signature chains to ``trust_roots`` and the document is consistent; return it."""
    try:
        signer_cert = verify_detached(json_bytes, sig_der, trust_roots, utc_now(now))
    except der.DerError as exc:
        raise ManifestError(f"signature is malformed: {exc}") from None
    try:
        document = json.loads(json_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(f"manifest schema_version is not {MANIFEST_SCHEMA_VERSION}")
    if canonical_json(document) != json_bytes:
        raise ManifestError("manifest is not in canonical form")
    devices = document.get("devices")
    if not isinstance(devices, list) or document.get("count") != len(devices):
        raise ManifestError("manifest count does not match its device list")
    revoked = document.get("revoked", [])
    if not isinstance(revoked, list) or document.get("revoked_count", 0) != len(revoked):
        raise ManifestError("manifest revoked_count does not match its revoked list")
    ids = [str(d.get("device_id")) for d in devices if isinstance(d, dict)]
    if len(ids) != len(devices) or ids != sorted(ids) or len(set(ids)) != len(ids):
        raise ManifestError("manifest devices are not unique and sorted by device_id")
    for device in devices:
        try:
            cert = x509.load_pem_x509_certificate(str(device["cert_pem"]).encode())
        except (KeyError, ValueError):
            raise ManifestError(f"device {device.get('device_id')!r}: certificate does not parse") from None
        if hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest() != device.get(
            "cert_sha256"
        ):
            raise ManifestError(f"device {device['device_id']!r}: cert_sha256 does not match its certificate")
    ca_info = document.get("ca")
    signer_fp = hashlib.sha256(signer_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if not isinstance(ca_info, dict) or ca_info.get("fingerprint_sha256") != signer_fp:
        raise ManifestError("manifest names another CA than the one that signed it")
    return document


def verify_detached(
    content: bytes, sig_der: bytes, trust_roots: Sequence[x509.Certificate], now: dt.datetime
) -> x509.Certificate:
    """Check a detached CMS signature over ``content`` chaining to ``trust_roots``; return the signer."""
    _, _, sd_parts, parts = _signer_info_parts(sig_der)
    encap = der.expect(sd_parts[2], der.TAG_SEQUENCE, "encapContentInfo").children()
    if len(encap) != 1:
        raise ManifestError("signature is not detached (it embeds content)")
    if der.decode_oid(encap[0]) != OID_DATA:
        raise ManifestError("signed content type is not id-data")
    certs: list[x509.Certificate] = []
    if sd_parts[3].tag == der.TAG_CONTEXT_0:
        for item in sd_parts[3].children():
            try:
                certs.append(x509.load_der_x509_certificate(item.raw))
            except ValueError:
                raise ManifestError("signature embeds a malformed certificate") from None
    if len(parts) < 6:
        raise der.DerError("SignerInfo is too short")
    sid = der.expect(parts[1], der.TAG_SEQUENCE, "issuerAndSerialNumber").children()
    if len(sid) != 2:
        raise der.DerError("malformed issuerAndSerialNumber")
    issuer_raw, serial = sid[0].raw, der.decode_integer(sid[1])
    digest_oid = der.decode_oid(der.expect(parts[2], der.TAG_SEQUENCE, "digestAlgorithm").children()[0])
    if digest_oid not in _DIGESTS:
        raise ManifestError(f"unsupported digest algorithm {digest_oid}")
    algorithm = _DIGESTS[digest_oid]()
    signed_attrs = der.expect(parts[3], der.TAG_CONTEXT_0, "signedAttrs")
    sig_alg = der.decode_oid(der.expect(parts[4], der.TAG_SEQUENCE, "signatureAlgorithm").children()[0])
    if sig_alg not in _SIGNATURE_ALGORITHMS:
        raise ManifestError(f"unsupported signature algorithm {sig_alg}")
    signature = der.expect(parts[5], der.TAG_OCTET_STRING, "signature").content

    attributes: dict[str, list[der.Tlv]] = {}
    for attribute in signed_attrs.children():
        attr_parts = der.expect(attribute, der.TAG_SEQUENCE, "attribute").children()
        oid = der.decode_oid(attr_parts[0])
        if oid in attributes:
            raise ManifestError(f"signed attribute {oid} appears twice")
        attributes[oid] = der.expect(attr_parts[1], der.TAG_SET, "attribute values").children()
    content_type = attributes.get(OID_CONTENT_TYPE)
    if not content_type or len(content_type) != 1 or der.decode_oid(content_type[0]) != OID_DATA:
        raise ManifestError("signed contentType attribute is missing or not id-data")
    digest_values = attributes.get(OID_MESSAGE_DIGEST)
    if not digest_values or len(digest_values) != 1:
        raise ManifestError("signed messageDigest attribute is missing")
    digest = hashes.Hash(algorithm)
    digest.update(content)
    if der.expect(digest_values[0], der.TAG_OCTET_STRING, "messageDigest").content != digest.finalize():
        raise ManifestError("manifest content does not match the signed digest (modified?)")

    signer_certs = [c for c in certs if c.serial_number == serial and c.issuer.public_bytes() == issuer_raw]
    if not signer_certs:
        raise ManifestError("the signer's certificate is not in the signature")
    signer_cert = signer_certs[0]
    to_verify = bytes([der.TAG_SET]) + signed_attrs.raw[1:]
    public_key = signer_cert.public_key()
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, to_verify, ec.ECDSA(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, to_verify, padding.PKCS1v15(), algorithm)
        else:
            raise ManifestError("the signer's key type is not supported")
    except InvalidSignature:
        raise ManifestError("manifest signature does not verify") from None
    verify_path(signer_cert, certs, trust_roots, now)
    return signer_cert


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_path(
    signer_cert: x509.Certificate,
    pool: Sequence[x509.Certificate],
    trust_roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> None:
    """Check ``signer_cert`` chains through ``pool`` to one of ``trust_roots``, all valid at ``now``."""
    root_ders = {r.public_bytes(serialization.Encoding.DER) for r in trust_roots}
    current = signer_cert
    for _ in range(MAX_CHAIN_DEPTH):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise ManifestError(f"certificate {current.subject.rfc4514_string()!r} is not valid now")
        if current.public_bytes(serialization.Encoding.DER) in root_ders:
            return
        roots = [
            r for r in trust_roots if r.subject == current.issuer and _is_ca(r) and _issued_by(current, r)
        ]
        if roots:
            root = roots[0]
            if not root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                raise ManifestError(f"trust root {root.subject.rfc4514_string()!r} is not valid now")
            return
        parents = [
            c
            for c in pool
            if c is not current and c.subject == current.issuer and _is_ca(c) and _issued_by(current, c)
        ]
        if not parents:
            break
        current = parents[0]
    raise ManifestError("the signer's certificate does not chain to a trusted root")
