"""Pre-registered parts: a chip vendor's signed manifest binding each secure element's serial to its key.

Microchip Trust&GO / TrustFLEX style (``../shared/ATTESTATION.md``): a JSON array with one entry per
chip, each a flattened JWS (``protected``, ``payload``, ``signature``, base64url without padding, plus
an unprotected ``header.uniqueId``). The protected header says ``alg`` ES256 and names its signer by
``kid`` (base64url of the signer certificate's SubjectKeyIdentifier) and ``x5t#S256`` (base64url of
the SHA-256 of its DER); the signature is raw ``r‖s`` over ``protected + "." + payload``. The payload
carries ``uniqueId`` (the SE serial, 18 lowercase hex digits) and ``publicKeySet.keys`` (JWKs, ``kid``
= slot; slot ``"0"`` is the device key, EC P-256 ``x``/``y``).

``verify_parts_manifest`` checks every entry against the pinned signer certificates the station is
given (``--signer``): a signer it knows, the JWS signature, the payload's serial equal to the
unprotected one, a slot-0 P-256 key, no serial twice. It is refused whole, naming the failing entry.
The result maps serial → slot-0 public key (uncompressed point), stored per lot in
``<state_dir>/attestation/<lot>/parts.json``. Entries of payload version 2 carry no keys and are
refused (such a manifest cannot bind a serial to a key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.errors import BundleError
from factoryd.files import write_private
from factoryd.pki.attestation import AttestationError
from factoryd.pki.challenge import der_to_raw_signature, raw_to_der_signature

# A real manifest of a reel holds a few thousand entries of ~1.5 KiB each.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
PARTS_FILE = "parts.json"
_SERIAL = re.compile(r"[0-9a-f]{18}")
_COORDINATE_BYTES = 32


class PartsManifestError(BundleError):
    """A parts manifest refused whole; the message names the failing entry."""


@dataclass(frozen=True)
class RegisteredPart:
    """One chip of the manifest: its serial, its slot-0 key, and where the entry came from."""

    serial: str
    public_key: bytes  # uncompressed P-256 point
    entry_id: str  # the payload's SHA-256 (hex): what the customer's manifest names as evidence


def _b64url_decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not base64url") from exc


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _signer_ids(cert: x509.Certificate) -> set[str]:
    ids = {_b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())}
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    ids.add(_b64url(ski))
    return ids


def verify_parts_manifest(data: bytes, signers: Sequence[x509.Certificate]) -> dict[str, RegisteredPart]:
    """Verify every entry of a parts manifest against the pinned signers; refused whole otherwise."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise PartsManifestError(
            f"parts manifest is too large: {len(data)} bytes (limit {MAX_MANIFEST_BYTES})"
        )
    if not signers:
        raise PartsManifestError("no manifest signer certificate given (--signer)")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for cert in signers:
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise PartsManifestError(
                f"manifest signer {cert.subject.rfc4514_string()!r} has no P-256 key (ES256)"
            )
        for signer_id in _signer_ids(cert):
            keys[signer_id] = public
    try:
        entries = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise PartsManifestError("parts manifest is not JSON") from None
    if not isinstance(entries, list) or not entries:
        raise PartsManifestError("parts manifest must be a non-empty JSON array of entries")
    parts: dict[str, RegisteredPart] = {}
    for index, entry in enumerate(entries):
        try:
            part = _verify_entry(entry, keys)
        except (ValueError, KeyError, TypeError) as exc:
            unique = entry.get("header", {}).get("uniqueId") if isinstance(entry, dict) else None
            raise PartsManifestError(f"entry {index} (uniqueId {unique!r}): {exc}") from None
        if part.serial in parts:
            raise PartsManifestError(f"entry {index}: serial {part.serial} appears twice (a clone?)")
        parts[part.serial] = part
    return parts


def _verify_entry(entry: Any, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> RegisteredPart:
    if not isinstance(entry, dict):
        raise TypeError("not a JSON object")
    protected_b64, payload_b64, signature_b64 = entry["protected"], entry["payload"], entry["signature"]
    header = json.loads(_b64url_decode(protected_b64, "protected"))
    if header.get("alg") != "ES256":
        raise ValueError(f"alg {header.get('alg')!r}, not ES256")
    signer = keys.get(header.get("x5t#S256", "")) or keys.get(header.get("kid", ""))
    if signer is None:
        raise ValueError("signed by a signer that was not given (kid / x5t#S256 unknown)")
    signature = _b64url_decode(signature_b64, "signature")
    try:
        signer.verify(
            raw_to_der_signature(signature),
            f"{protected_b64}.{payload_b64}".encode("ascii"),
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, ValueError):
        raise ValueError("the JWS signature does not verify (tampered entry or wrong signer)") from None
    payload_raw = _b64url_decode(payload_b64, "payload")
    payload = json.loads(payload_raw)
    serial = payload["uniqueId"]
    if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
        raise ValueError(f"uniqueId {serial!r} is not 18 lowercase hex digits")
    unprotected = entry.get("header", {}).get("uniqueId")
    if unprotected is not None and unprotected != serial:
        raise ValueError(f"header uniqueId {unprotected!r} differs from the signed one {serial!r}")
    slot0 = [k for k in payload.get("publicKeySet", {}).get("keys", []) if k.get("kid") == "0"]
    if len(slot0) != 1:
        raise ValueError("no slot-0 key in publicKeySet (a v2 entry without keys?)")
    jwk = slot0[0]
    if (jwk.get("kty"), jwk.get("crv")) != ("EC", "P-256"):
        raise ValueError(f"slot-0 key is {jwk.get('kty')}/{jwk.get('crv')}, not EC P-256")
    x, y = _b64url_decode(jwk["x"], "x"), _b64url_decode(jwk["y"], "y")
    if len(x) != _COORDINATE_BYTES or len(y) != _COORDINATE_BYTES:
        raise ValueError("slot-0 key coordinates are not 32 bytes")
    point = b"\x04" + x + y
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)  # raises ValueError off the curve
    if "x5c" in jwk:
        _check_device_chain(jwk["x5c"], point)
    return RegisteredPart(serial, point, hashlib.sha256(payload_raw).hexdigest())


def _check_device_chain(x5c: object, point: bytes) -> None:
    """The entry's device certificate carries the slot-0 key and is signed by the signer CA after it.

    Trust&GO entries carry the chip's device certificate and its signer CA (``x5c``). The chain above
    the signer CA (Microchip's root) is not in the entry; the JWS signature by the pinned manifest
    signer is what vouches for the entry as a whole.
    """
    if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
        raise ValueError("slot-0 x5c is not a list of base64 certificates")
    try:
        chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
    except (ValueError, binascii.Error):
        raise ValueError("slot-0 x5c holds a certificate that does not parse") from None
    leaf_key = chain[0].public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or (
        leaf_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        != point
    ):
        raise ValueError("the device certificate in x5c is not for the slot-0 key")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            issuer = parent.subject.rfc4514_string()
            raise ValueError(f"x5c: {child.subject.rfc4514_string()!r} is not signed by {issuer!r}") from None


def verify_registered_part(
    parts: Mapping[str, RegisteredPart], serial: str, challenge: bytes, signature: bytes
) -> RegisteredPart:
    """A board of a parts lot: its serial must be registered and its key sign the fresh challenge."""
    part = parts.get(serial)
    if part is None:
        raise AttestationError(
            "attestation_unregistered", f"serial {serial} is not in the lot's parts manifest"
        )
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), part.public_key)
    try:
        key.verify(raw_to_der_signature(signature), challenge, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise AttestationError(
            "attestation_key", f"the board's key is not the one the parts manifest registers for {serial}"
        ) from exc
    return part


def sign_parts_entry(
    serial: str,
    point: bytes,
    signer_key: ec.EllipticCurvePrivateKey,
    signer_cert: x509.Certificate,
    *,
    x5c: Sequence[str] = (),
) -> dict[str, Any]:
    """One manifest entry in the vendor's format (test manifests; the station never signs one)."""
    der = signer_cert.public_bytes(serialization.Encoding.DER)
    header = {
        "typ": "JWT",
        "alg": "ES256",
        "kid": _b64url(x509.SubjectKeyIdentifier.from_public_key(signer_cert.public_key()).digest),
        "x5t#S256": _b64url(hashlib.sha256(der).digest()),
    }
    slot0: dict[str, Any] = {
        "kid": "0",
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(point[1:33]),
        "y": _b64url(point[33:]),
    }
    if x5c:
        slot0["x5c"] = list(x5c)
    payload = {
        "version": 1,
        "model": "ATECC608B",
        "partNumber": "ATECC608B-TNGTLS",
        "uniqueId": serial,
        "publicKeySet": {"keys": [slot0]},
    }
    protected = _b64url(json.dumps(header, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    signature = signer_key.sign(f"{protected}.{body}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return {
        "header": {"uniqueId": serial},
        "protected": protected,
        "payload": body,
        "signature": _b64url(der_to_raw_signature(signature)),
    }


class PartsStore:
    """Per-lot registered parts on the station: ``<dir>/<lot>/parts.json`` (serial → key), atomic."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, lot: str) -> Path:
        """The lot's parts file."""
        return self.directory / lot / PARTS_FILE

    def save(self, lot: str, parts: Mapping[str, RegisteredPart]) -> Path:
        """Store verified parts (whole file or nothing)."""
        path = self.path(lot)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        document = {
            serial: {"public_key": part.public_key.hex(), "entry_id": part.entry_id}
            for serial, part in sorted(parts.items())
        }
        write_private(path, json.dumps(document, sort_keys=True, indent=1).encode(), mode=0o644)
        return path

    def load(self, lot: str) -> dict[str, RegisteredPart]:
        """The lot's registered parts (empty when none are stored)."""
        path = self.path(lot)
        if not path.is_file():
            return {}
        document = json.loads(path.read_bytes())
        return {
            serial: RegisteredPart(serial, bytes.fromhex(item["public_key"]), item["entry_id"])
            for serial, item in document.items()
        }
