"""Lot administration shared by the CLI, the HTTP API and the demo.

Each operation is one call on the ledger or the bundle store, so a refusal leaves nothing
half-written: an ID list is imported whole or not at all; a bundle is validated completely
before anything is saved; a manifest is built from committed ledger rows only.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from factoryd.config import Settings
from factoryd.errors import BundleError, ConfigError, InputError
from factoryd.files import write_together
from factoryd.firmware import FirmwareStore
from factoryd.jobs.lots import cert_profile, lot_signer
from factoryd.jobs.profiles import board_profile
from factoryd.ledger import Ledger
from factoryd.ledger.core import audit_chain_heads
from factoryd.ledger.model import LotInfo
from factoryd.matter.lot import MATTER_DIRNAME
from factoryd.pki.attestation import ATTESTATION_DIRNAME, AttestationRootStore, load_attestation_roots
from factoryd.pki.bundle import CaBundle, chain_pem, load_pem_bundle, load_pkcs12_bundle
from factoryd.pki.crl import DEFAULT_NEXT_UPDATE_DAYS, MAX_NEXT_UPDATE_DAYS, CrlEntry, SignedCrl, build_crl
from factoryd.pki.manifest import SignedManifest, build_manifest
from factoryd.pki.parts import PartsManifestError, PartsStore, verify_parts_manifest
from factoryd.pki.passphrase import load_passphrase
from factoryd.pki.pkcs11 import Pkcs11Signer
from factoryd.pki.signer import Signer
from factoryd.pki.store import BundleStore
from factoryd.pki.verification import (
    VerificationCertificate,
    check_verification_code,
    verification_certificate,
)

# What systemd's StateDirectoryMode= and deploy/install.sh give the state directory: the service
# user alone, since it holds the ledger and the encrypted CA keys.
STATE_DIR_MODE = 0o700
# The way out that needs no root, ending both errors of prepare_state_dir.
_OWN_STATE_DIR = (
    "or set [station] state_dir in the config (or FACTORYD_STATION__STATE_DIR) to a directory of yours"
)


@dataclass(frozen=True)
class StationPaths:
    """Where a station keeps its files."""

    state_dir: Path

    @property
    def bundles(self) -> Path:
        """Encrypted CA bundles, one directory per lot (0700, files 0600)."""
        return self.state_dir / "bundles"

    @property
    def firmware(self) -> Path:
        """Signed firmware images per lot."""
        return self.state_dir / "firmware"

    @property
    def manifests(self) -> Path:
        """Exported manifests."""
        return self.state_dir / "manifests"

    @property
    def attestation(self) -> Path:
        """Trusted attestation roots per lot (pki/attestation.py)."""
        return self.state_dir / ATTESTATION_DIRNAME

    @property
    def matter(self) -> Path:
        """Matter lots' PAA, Certification Declaration and customer recipient (matter/lot.py)."""
        return self.state_dir / MATTER_DIRNAME


def prepare_state_dir(paths: StationPaths) -> Path:
    """Create the state directory (0700, as the service has it) if missing; ConfigError if unusable.

    The error says what is wrong (missing and not creatable, not a directory, not writable by this
    user) and how to fix it, instead of SQLite's "unable to open database file".
    """
    directory = paths.state_dir
    me = _user(os.geteuid())
    try:
        directory.mkdir(mode=STATE_DIR_MODE, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(
            f"the state directory {directory} does not exist and user {me} cannot create it "
            f"({exc.strerror}); create it with: sudo install -d -m 0700 -o {me} {directory} "
            f"(deploy/install.sh makes it for the service user factoryd), {_OWN_STATE_DIR}"
        ) from None
    else:
        # mkdir's mode is cut by the umask; this is the mode the service's StateDirectoryMode= sets.
        os.chmod(directory, STATE_DIR_MODE)
        return directory
    if not directory.is_dir():
        raise ConfigError(f"the state directory {directory} exists but is not a directory")
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        info = directory.stat()
        raise ConfigError(
            f"the state directory {directory} (owner {_user(info.st_uid)}, mode "
            f"{stat.S_IMODE(info.st_mode):04o}) is not writable by user {me}; on a station installed "
            f"with deploy/install.sh run admin commands as: sudo factoryd-admin …, {_OWN_STATE_DIR}"
        )
    return directory


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def station_passphrase(settings: Settings) -> bytes:
    """The passphrase protecting CA keys at rest (credential, private file or env; never the config)."""
    pki = settings.pki
    return load_passphrase(pki.passphrase_credential, pki.passphrase_env, file=pki.passphrase_file)


def parse_bundle(
    data: bytes,
    upload_passphrase: bytes,
    lot: LotInfo,
    *,
    key_pem: bytes | None = None,
    trust_anchors: bytes | None = None,
) -> CaBundle:
    """Validate an uploaded bundle against the lot's profile: PKCS#12, or PEM chain + encrypted key."""
    profile = cert_profile(lot.profile)
    if data.lstrip().startswith(b"-----BEGIN"):
        if key_pem is None:
            raise BundleError("a PEM bundle needs the encrypted private key (PKCS#8 PEM) as well")
        bundle = load_pem_bundle(
            key_pem, data, upload_passphrase, trust_anchors=trust_anchors, profile=profile
        )
    else:
        bundle = load_pkcs12_bundle(data, upload_passphrase, profile=profile)
    # What the lot's boards cannot take (e.g. a chain longer than an nRF91 AT line) is refused here,
    # at lot set-up, not on the line.
    check_chain = board_profile(lot.profile.protocol).check_chain
    if check_chain is not None:
        check_chain(lot.profile, chain_pem(bundle), f"lot {lot.name}")
    return bundle


def store_bundle(paths: StationPaths, passphrase: bytes, lot: str, bundle: CaBundle) -> Path:
    """Save a validated bundle, re-encrypted under the station passphrase."""
    return BundleStore(paths.bundles, passphrase).save(lot, bundle)


def export_manifest(ledger: Ledger, paths: StationPaths, passphrase: bytes, lot: str) -> SignedManifest:
    """Build and sign the manifest of every provisioned device of a lot, and its revoked certificates."""
    info = ledger.get_lot(lot)
    ca = lot_signer(BundleStore(paths.bundles, passphrase), info.name)
    devices = ledger.provisioned_devices(lot)
    # Per device, how its secure element was shown genuine: the evidence of the certificate it holds.
    holds = {d.device_id: d.fingerprint_sha256 for d in devices}
    genuineness = {
        entry.device_id: entry.genuineness
        for entry in ledger.issued_certificates(lot)
        if entry.genuineness and holds.get(entry.device_id) == entry.fingerprint_sha256
    }
    with _closing(ca.signer):
        return build_manifest(
            info.name,
            devices,
            ca.signer,
            ca.chain,
            revoked=ledger.revoked_certificates(lot),
            genuineness=genuineness,
            # Signed heads of every audit chain: a tail cut off later (head row rewound) is caught.
            audit_chains=audit_chain_heads(ledger),
        )


@contextmanager
def _closing(signer: Signer) -> Iterator[None]:
    """Release a token signer's session when done (a software signer holds nothing to release)."""
    try:
        yield
    finally:
        if isinstance(signer, Pkcs11Signer):
            signer.close()


def ca_verification(
    ledger: Ledger, paths: StationPaths, passphrase: bytes, lot: str, code: str, *, actor: str
) -> VerificationCertificate:
    """A verification certificate (CN=code) signed by the lot's CA key, recorded in the audit trail."""
    check_verification_code(code)
    info = ledger.get_lot(lot)
    ca = lot_signer(BundleStore(paths.bundles, passphrase), info.name)
    with _closing(ca.signer):
        verification = verification_certificate(ca.signer, code)
    # Recorded before anyone sees it: every certificate the CA key signs is in the trail.
    ledger.audit(
        actor=actor,
        action="lot.ca_verification",
        subject=info.name,
        details={
            "code": code,
            "cert_serial": verification.serial_hex,
            "not_after": verification.cert.not_valid_after_utc.isoformat(),
        },
    )
    return verification


def export_crl(
    ledger: Ledger,
    paths: StationPaths,
    passphrase: bytes,
    lot: str,
    *,
    next_update_days: int = DEFAULT_NEXT_UPDATE_DAYS,
    actor: str,
) -> SignedCrl:
    """Sign the lot's CRL of every certificate issued that does not stand, with the next CRL number."""
    if not 1 <= next_update_days <= MAX_NEXT_UPDATE_DAYS:
        raise InputError(f"--next-update-days must be 1..{MAX_NEXT_UPDATE_DAYS}, got {next_update_days}")
    info = ledger.get_lot(lot)
    ca = lot_signer(BundleStore(paths.bundles, passphrase), info.name)
    with _closing(ca.signer):
        revoked = ledger.revoked_certificates(lot)
        entries = [CrlEntry(r.cert_serial, r.revoked_at, r.cause.value) for r in revoked]
        # The serials go into the audit trail: once published, a revocation is never taken back.
        details: dict[str, object] = {
            "revoked": len(entries),
            "serials": [e.cert_serial.lower() for e in entries],
            "next_update_days": next_update_days,
        }
        number = ledger.record_crl(lot, actor=actor, details=details)
        return build_crl(ca.signer, entries, number=number, next_update_days=next_update_days)


def write_manifest(manifest: SignedManifest, directory: Path) -> tuple[Path, Path]:
    """Write manifest JSON and its detached CMS signature; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{manifest.lot}.manifest.json"
    sig_path = directory / f"{manifest.lot}.manifest.p7s"
    # Both whole and new, or both old (a full disk must leave no manifest beside a stale signature).
    write_together({json_path: manifest.json_bytes, sig_path: manifest.signature_der}, mode=0o644)
    return json_path, sig_path


def store_attestation_roots(paths: StationPaths, ledger: Ledger, lot: str, data: bytes, *, actor: str) -> int:
    """Validate a PEM file of attestation roots (refused whole) and store it as the lot's; the count."""
    info = ledger.get_lot(lot)
    roots = load_attestation_roots(data)
    AttestationRootStore(paths.attestation).save(info.name, roots)
    ledger.audit(
        actor=actor,
        action="lot.attestation_roots",
        subject=info.name,
        details={"roots": [r.subject.rfc4514_string() for r in roots]},
    )
    return len(roots)


def store_parts_manifest(
    paths: StationPaths, ledger: Ledger, lot: str, data: bytes, signers_pem: list[bytes], *, actor: str
) -> int:
    """Verify a vendor parts manifest against pinned signers (refused whole) and store serial → key."""
    info = ledger.get_lot(lot)
    signers = []
    for pem in signers_pem:
        try:
            signers += x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise PartsManifestError("a --signer file is not a PEM certificate") from None
    parts = verify_parts_manifest(data, signers)
    PartsStore(paths.attestation).save(info.name, parts)
    ledger.audit(
        actor=actor,
        action="lot.parts_manifest",
        subject=info.name,
        details={"parts": len(parts), "signers": [s.subject.rfc4514_string() for s in signers]},
    )
    return len(parts)


def firmware_store(paths: StationPaths) -> FirmwareStore:
    """The station's firmware store."""
    return FirmwareStore(paths.firmware)
