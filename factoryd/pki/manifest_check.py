"""Customer-side manifest verification: every check named with its result, no station needed.

``factoryd manifest verify MANIFEST.json SIG --ca CHAIN.pem`` runs :func:`check_manifest`: the
detached CMS signature against the customer's CA chain, the document's form, every device
certificate's chain and its recorded serial and fingerprint, uniqueness of IDs, serials and
fingerprints, the counts, that no revoked certificate is also listed as provisioned, and the form of
the audit chain heads the manifest anchors (if it carries them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factoryd.pki import der
from factoryd.pki.manifest import (
    MANIFEST_SCHEMA_VERSION,
    ManifestError,
    canonical_json,
    verify_detached,
    verify_path,
)
from factoryd.pki.profile import utc_now

# Only the first few offenders are named; the rest are counted.
MAX_NAMED = 3
# An audit chain head's hash: SHA-256 in hex.
AUDIT_HASH_HEX_CHARS = 64


@dataclass(frozen=True)
class Check:
    """One named check and what it found."""

    name: str
    ok: bool
    detail: str


@dataclass
class ManifestReport:
    """Every check of a manifest; ``ok`` only when all passed."""

    lot: str | None = None
    devices: int = 0
    revoked: int = 0
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        """The report as the CLI prints it."""
        out = [f"{c.name}: {'OK' if c.ok else 'FAILED'} ({c.detail})" for c in self.checks]
        out.append(
            f"lot {self.lot or '?'}: {self.devices} provisioned, {self.revoked} revoked: "
            + ("manifest OK" if self.ok else "manifest FAILED")
        )
        return out


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _duplicates(values: list[str]) -> list[str]:
    return sorted(v for v, n in Counter(values).items() if n > 1)


def check_manifest(
    json_bytes: bytes,
    sig_der: bytes,
    ca_chain: Sequence[x509.Certificate],
    *,
    now: dt.datetime | None = None,
) -> ManifestReport:
    """Run every check on a manifest and its detached signature against the customer's CA chain."""
    moment = utc_now(now)
    report = ManifestReport()

    def check(name: str, run: Callable[[], str]) -> bool:
        try:
            detail = run()
        except (ManifestError, der.DerError) as exc:
            report.checks.append(Check(name, False, str(exc)))
            return False
        report.checks.append(Check(name, True, detail))
        return True

    signer: list[x509.Certificate] = []

    def signature() -> str:
        signer.append(verify_detached(json_bytes, sig_der, ca_chain, moment))
        return f"signed by {signer[0].subject.rfc4514_string()}, chains to the CA given"

    check("signature", signature)
    try:
        document = json.loads(json_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        report.checks.append(Check("document", False, f"not JSON: {exc}"))
        return report
    if not isinstance(document, dict):
        report.checks.append(Check("document", False, "not a JSON object"))
        return report
    raw_devices, raw_revoked = document.get("devices"), document.get("revoked", [])
    report.lot = str(document.get("lot"))

    def form() -> str:
        if document.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise ManifestError(f"schema_version is not {MANIFEST_SCHEMA_VERSION}")
        if canonical_json(document) != json_bytes:
            raise ManifestError("not in canonical form (sorted keys, no whitespace)")
        if not isinstance(raw_devices, list) or not all(isinstance(d, dict) for d in raw_devices):
            raise ManifestError("devices is not a list of objects")
        if not isinstance(raw_revoked, list) or not all(isinstance(r, dict) for r in raw_revoked):
            raise ManifestError("revoked is not a list of objects")
        return f"schema {MANIFEST_SCHEMA_VERSION}, canonical JSON"

    if not check("document", form):
        return report
    if not isinstance(raw_devices, list) or not isinstance(raw_revoked, list):
        return report  # form() refused them already
    devices: list[dict[str, Any]] = raw_devices
    revoked: list[dict[str, Any]] = raw_revoked
    report.devices, report.revoked = len(devices), len(revoked)

    def ca() -> str:
        ca_info = document.get("ca")
        if not signer:
            raise ManifestError("the signature did not verify, so the signing CA is unknown")
        fingerprint = hashlib.sha256(signer[0].public_bytes(serialization.Encoding.DER)).hexdigest()
        if not isinstance(ca_info, dict) or ca_info.get("fingerprint_sha256") != fingerprint:
            raise ManifestError("the manifest names another CA than the one that signed it")
        return f"CA {ca_info.get('subject')}"

    check("ca", ca)
    certificates: dict[int, x509.Certificate] = {}

    def chains() -> str:
        pool = [*ca_chain, *signer]
        bad: list[str] = []
        for index, device in enumerate(devices):
            name = str(device.get("device_id"))
            try:
                cert = x509.load_pem_x509_certificate(str(device["cert_pem"]).encode())
            except (KeyError, ValueError):
                bad.append(f"{name}: certificate does not parse")
                continue
            certificates[index] = cert
            fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
            if device.get("cert_sha256") != fingerprint:
                bad.append(f"{name}: cert_sha256 is not its certificate's")
            elif device.get("cert_serial") != f"{cert.serial_number:x}":
                bad.append(f"{name}: cert_serial is not its certificate's")
            else:
                try:
                    verify_path(cert, pool, ca_chain, moment)
                except ManifestError as exc:
                    bad.append(f"{name}: {exc}".replace("the signer's certificate", "its certificate"))
        if bad:
            raise ManifestError(f"{len(bad)} of {len(devices)} device certificates: {_names(bad)}")
        return f"{len(devices)} device certificates chain to the CA"

    check("certificates", chains)

    def unique() -> str:
        problems = []
        ids = _duplicates([str(d.get("device_id")) for d in devices])
        if ids:
            problems.append(f"device IDs listed twice: {_names(ids)}")
        serials = _duplicates([str(e.get("cert_serial")) for e in [*devices, *revoked]])
        if serials:
            problems.append(f"certificate serials listed twice: {_names(serials)}")
        fingerprints = _duplicates(
            [str(d.get("cert_sha256")) for d in devices] + [str(r.get("cert_sha256")) for r in revoked]
        )
        if fingerprints:
            problems.append(f"fingerprints listed twice: {_names(fingerprints)}")
        if problems:
            raise ManifestError("; ".join(problems))
        return "device IDs, serials and fingerprints are unique"

    check("unique", unique)

    def counts() -> str:
        if document.get("count") != len(devices):
            raise ManifestError(f"count says {document.get('count')}, the list has {len(devices)} devices")
        if document.get("revoked_count", 0) != len(revoked):
            raise ManifestError(
                f"revoked_count says {document.get('revoked_count')}, the list has {len(revoked)}"
            )
        return f"{len(devices)} devices, {len(revoked)} revoked"

    check("counts", counts)

    def revocations() -> str:
        provisioned = {str(d.get("cert_serial")) for d in devices} | {
            str(d.get("cert_sha256")) for d in devices
        }
        both = [
            str(r.get("cert_serial"))
            for r in revoked
            if str(r.get("cert_serial")) in provisioned or str(r.get("cert_sha256")) in provisioned
        ]
        if both:
            raise ManifestError(f"revoked certificates also listed as provisioned: {_names(both)}")
        return f"{len(revoked)} revoked certificates, none listed as provisioned"

    check("revoked", revocations)
    if "audit_chains" in document:

        def anchors() -> str:
            # The station's audit chain heads when the manifest was signed: `factoryd audit verify
            # --manifest` checks them against the ledger; here only their form can be checked.
            raw = document["audit_chains"]
            if not isinstance(raw, list) or not all(
                isinstance(a, dict)
                and isinstance(a.get("chain"), str)
                and isinstance(a.get("seq"), int)
                and isinstance(a.get("hash"), str)
                and len(a["hash"]) == AUDIT_HASH_HEX_CHARS
                for a in raw
            ):
                raise ManifestError("audit_chains is not a list of {chain, seq, hash} heads")
            return f"{len(raw)} audit chain heads anchored (`factoryd audit verify --manifest` checks them)"

        check("audit anchors", anchors)
    return report


def load_chain(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM file; ManifestError when it holds none."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ManifestError(f"the CA file holds no PEM certificates: {exc}") from None
    return chain
