"""Customer-signed quotas: at most N certificates for a lot, until a date, signed by the customer.

A quota is a JWS in compact serialisation (RFC 7515), readable with any JOSE library::

    BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)

- header: ``{"alg": "ES256" | "ES384" | "RS256", "typ": "factoryd-quota+jws", "x5t#S256": …}``, the
  last the base64url SHA-256 of the DER of the certificate whose key signed it;
- payload: ``{"v": 1, "quota_id": …, "lot": …, "max_certificates": N, "not_after": "…Z",
  "issued_at": "…Z"}`` (ISO 8601 UTC);
- signature: ES256/ES384 as raw ``r‖s`` (RFC 7518 3.4), RS256 as PKCS#1 v1.5.

The signing certificate must be one of the lot's chain *above* the issuing CA (the customer's root
or an intermediate they keep): the issuing CA's key is on the signer, and a quota the factory could
sign itself would bound nothing. A lot whose chain is the issuing CA alone cannot carry a quota.

The signer keeps each lot's quota on its own disk (``<state_dir>/signer/quotas/<lot>.jws``, 0600,
never in the shared database a station can write) and verifies it again for every request: a file
changed afterwards is refused as ``quota_invalid``, a passed ``not_after`` as ``quota_expired``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from factoryd.files import write_private
from factoryd.pki.signer import CaPrivateKey
from factoryd.pki.store import CHAIN_FILE, LOT_NAME_RE, BundleStore
from factoryd.signer.errors import QuotaError, SigningRefusedError

QUOTA_TYPE = "factoryd-quota+jws"
QUOTA_VERSION = 1
QUOTA_SUFFIX = ".jws"
# A quota is a few hundred bytes; anything bigger is refused unread.
MAX_QUOTA_BYTES = 16 * 1024
# No lot is signed for beyond this many certificates in one quota (a typo guard: 10 million).
MAX_QUOTA_CERTIFICATES = 10_000_000
_CURVE_ALG = {"secp256r1": ("ES256", hashes.SHA256(), 32), "secp384r1": ("ES384", hashes.SHA384(), 48)}


@dataclass(frozen=True, slots=True)
class Quota:
    """A verified quota."""

    quota_id: str
    lot: str
    max_certificates: int
    not_after: dt.datetime
    issued_at: dt.datetime
    signer_subject: str
    signer_sha256: str

    def expired(self, now: dt.datetime) -> bool:
        """True once ``not_after`` has passed."""
        return now >= self.not_after


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise QuotaError(f"quota {what} is not base64url") from None


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: object, what: str) -> dt.datetime:
    if not isinstance(value, str):
        raise QuotaError(f"quota {what} must be an ISO 8601 UTC time string")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise QuotaError(f"quota {what} {value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise QuotaError(f"quota {what} {value!r} has no time zone (end it in Z)")
    return moment.astimezone(dt.UTC)


def cert_sha256(cert: x509.Certificate) -> str:
    """base64url SHA-256 of a certificate's DER (the JWS ``x5t#S256``)."""
    return _b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def make_quota(
    *,
    lot: str,
    max_certificates: int,
    not_after: dt.datetime,
    key: CaPrivateKey,
    certificate: x509.Certificate,
    now: dt.datetime | None = None,
    quota_id: str | None = None,
) -> bytes:
    """Sign a quota with the customer's key (the CLI's ``factoryd signer make-quota``); returns the JWS."""
    if not LOT_NAME_RE.fullmatch(lot):
        raise QuotaError(f"invalid lot name {lot!r}")
    if not 1 <= max_certificates <= MAX_QUOTA_CERTIFICATES:
        raise QuotaError(f"max_certificates must be 1..{MAX_QUOTA_CERTIFICATES}, got {max_certificates}")
    issued = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    if not_after.tzinfo is None:
        raise QuotaError("not_after needs a time zone")
    if not_after <= issued:
        raise QuotaError(f"not_after {_utc_text(not_after)} is not in the future")
    public = key.public_key()
    if public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise QuotaError("the key does not match the certificate")
    alg = _alg_for(certificate)
    header = {"alg": alg, "typ": QUOTA_TYPE, "x5t#S256": cert_sha256(certificate)}
    payload = {
        "v": QUOTA_VERSION,
        "quota_id": quota_id or str(uuid.uuid4()),
        "lot": lot,
        "max_certificates": max_certificates,
        "not_after": _utc_text(not_after),
        "issued_at": _utc_text(issued),
    }
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    ).encode("ascii")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        _, digest, size = _CURVE_ALG[key.curve.name]
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    else:
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return signing_input + b"." + _b64url(signature).encode("ascii")


def _alg_for(cert: x509.Certificate) -> str:
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in _CURVE_ALG:
            raise QuotaError(f"quota signer key EC {public.curve.name} is not supported (P-256, P-384)")
        return _CURVE_ALG[public.curve.name][0]
    if isinstance(public, rsa.RSAPublicKey):
        return "RS256"
    raise QuotaError(f"quota signer key {type(public).__name__} is not supported")


def quota_signers(chain: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The certificates whose keys may sign a lot's quota: the chain above the issuing CA."""
    return tuple(chain[1:])


def verify_quota(data: bytes, chain: Sequence[x509.Certificate], *, lot: str) -> Quota:
    """Verify a quota JWS against the lot's chain; QuotaError names what is wrong (expiry not checked)."""
    if len(data) > MAX_QUOTA_BYTES:
        raise QuotaError(f"quota file is too large: {len(data)} bytes (limit {MAX_QUOTA_BYTES})")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise QuotaError("quota file is not a compact JWS (not ASCII)") from None
    parts = text.split(".")
    if len(parts) != 3:
        raise QuotaError("quota file is not a compact JWS (three base64url parts joined by '.')")
    try:
        header = json.loads(_b64url_decode(parts[0], "header"))
        payload = json.loads(_b64url_decode(parts[1], "payload"))
    except (ValueError, UnicodeDecodeError):
        raise QuotaError("quota header or payload is not JSON") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise QuotaError("quota header and payload must be JSON objects")
    if header.get("typ") != QUOTA_TYPE:
        raise QuotaError(f"quota typ must be {QUOTA_TYPE!r}, got {header.get('typ')!r}")
    if set(header) - {"alg", "typ", "x5t#S256"}:
        # "crit", "jku", "x5u" and friends would ask for behaviour we do not have: refused.
        raise QuotaError(
            f"quota header has unsupported members: {sorted(set(header) - {'alg', 'typ', 'x5t#S256'})}"
        )
    signers = quota_signers(chain)
    if not signers:
        raise QuotaError(
            f"lot {lot!r}: its CA chain is the issuing CA alone, whose key the signer holds; a quota "
            "needs a customer key above it (the root or an intermediate the customer keeps)"
        )
    thumbprint = header.get("x5t#S256")
    signer = next((c for c in signers if cert_sha256(c) == thumbprint), None)
    if signer is None:
        names = ", ".join(repr(c.subject.rfc4514_string()) for c in signers)
        raise QuotaError(f"quota is signed by a certificate outside lot {lot!r}'s chain (allowed: {names})")
    alg = header.get("alg")
    if alg != _alg_for(signer):
        raise QuotaError(f"quota alg {alg!r} does not fit the signer's key ({_alg_for(signer)})")
    signature = _b64url_decode(parts[2], "signature")
    if not _signature_ok(signer, (parts[0] + "." + parts[1]).encode("ascii"), signature):
        raise QuotaError("quota signature does not verify (tampered, or signed by another key)")
    if payload.get("v") != QUOTA_VERSION:
        raise QuotaError(f"quota version {payload.get('v')!r} is not {QUOTA_VERSION}")
    if payload.get("lot") != lot:
        raise QuotaError(f"quota is for lot {payload.get('lot')!r}, not {lot!r}")
    maximum = payload.get("max_certificates")
    if (
        not isinstance(maximum, int)
        or isinstance(maximum, bool)
        or not 0 <= maximum <= MAX_QUOTA_CERTIFICATES
    ):
        raise QuotaError(f"quota max_certificates must be an integer 0..{MAX_QUOTA_CERTIFICATES}")
    quota_id = payload.get("quota_id")
    if not isinstance(quota_id, str) or not 1 <= len(quota_id) <= 128:
        raise QuotaError("quota quota_id must be a string of 1..128 characters")
    return Quota(
        quota_id=quota_id,
        lot=lot,
        max_certificates=maximum,
        not_after=_parse_time(payload.get("not_after"), "not_after"),
        issued_at=_parse_time(payload.get("issued_at"), "issued_at"),
        signer_subject=signer.subject.rfc4514_string(),
        signer_sha256=str(thumbprint),
    )


def _signature_ok(cert: x509.Certificate, message: bytes, signature: bytes) -> bool:
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            _, digest, size = _CURVE_ALG[public.curve.name]
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public.verify(der, message, ec.ECDSA(digest))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


class QuotaStore:
    """Each lot's installed quota on the signer's own disk: ``<directory>/<lot>.jws``, 0600."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def path(self, lot: str) -> Path:
        """Where ``lot``'s quota lives."""
        if not LOT_NAME_RE.fullmatch(lot):
            raise QuotaError(f"invalid lot name {lot!r}")
        return self._dir / f"{lot}{QUOTA_SUFFIX}"

    def install(self, lot: str, data: bytes, chain: Sequence[x509.Certificate], *, now: dt.datetime) -> Quota:
        """Verify and store a quota; an expired one, or one older than the installed quota, is refused."""
        quota = verify_quota(data, chain, lot=lot)
        if quota.expired(now):
            raise QuotaError(f"quota {quota.quota_id} expired at {_utc_text(quota.not_after)}")
        path = self.path(lot)
        if path.is_file():
            try:
                current = verify_quota(path.read_bytes(), chain, lot=lot)
            except QuotaError:
                current = None  # a broken installed quota is replaced by a good one
            if current is not None and quota.issued_at < current.issued_at:
                raise QuotaError(
                    f"quota {quota.quota_id} was issued {_utc_text(quota.issued_at)}, before the installed "
                    f"quota {current.quota_id} ({_utc_text(current.issued_at)}): an older quota never "
                    "replaces a newer one"
                )
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, data.strip() + b"\n")
        return quota

    def current(self, lot: str, chain: Sequence[x509.Certificate], *, now: dt.datetime) -> Quota | None:
        """The lot's quota, verified now; None when it has none. SigningRefusedError when it is not usable."""
        path = self.path(lot)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SigningRefusedError(
                "quota_invalid", f"the quota file {path} cannot be read: {exc}"
            ) from exc
        try:
            quota = verify_quota(data, chain, lot=lot)
        except QuotaError as exc:
            raise SigningRefusedError(
                "quota_invalid", f"lot {lot!r}: the installed quota is refused: {exc}"
            ) from exc
        if quota.expired(now):
            raise SigningRefusedError(
                "quota_expired",
                f"lot {lot!r}: quota {quota.quota_id} expired at {_utc_text(quota.not_after)}",
            )
        return quota


def quota_chain(bundles: BundleStore, lot: str) -> tuple[x509.Certificate, ...]:
    """The chain a lot's quota is checked against: the signer's bundle of the lot (key not opened)."""
    directory = bundles.path(lot)
    try:
        return tuple(x509.load_pem_x509_certificates((directory / CHAIN_FILE).read_bytes()))
    except FileNotFoundError:
        raise QuotaError(f"the signer holds no CA bundle for lot {lot!r}") from None
    except ValueError as exc:
        raise QuotaError(f"lot {lot!r}: its chain file does not parse: {exc}") from None
