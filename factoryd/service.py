"""Lot administration shared by the CLI, the HTTP API and the demo.

Each operation is one call on the ledger or the bundle store, so a refusal leaves nothing
half-written: an ID list is imported whole or not at all; a bundle is validated completely
before anything is saved; a manifest is built from committed ledger rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from factoryd.config import Settings
from factoryd.errors import BundleError
from factoryd.firmware import FirmwareStore
from factoryd.jobs.lots import cert_profile, lot_signer
from factoryd.ledger import Ledger
from factoryd.ledger.model import LotInfo
from factoryd.pki.bundle import CaBundle, load_pem_bundle, load_pkcs12_bundle
from factoryd.pki.manifest import ManifestRecord, SignedManifest, build_manifest
from factoryd.pki.passphrase import load_passphrase
from factoryd.pki.store import BundleStore


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


def station_passphrase(settings: Settings) -> bytes:
    """The passphrase protecting CA keys at rest (systemd credential or env, never the config file)."""
    return load_passphrase(settings.pki.passphrase_credential, settings.pki.passphrase_env)


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
        return load_pem_bundle(key_pem, data, upload_passphrase, trust_anchors=trust_anchors, profile=profile)
    return load_pkcs12_bundle(data, upload_passphrase, profile=profile)


def store_bundle(paths: StationPaths, passphrase: bytes, lot: str, bundle: CaBundle) -> Path:
    """Save a validated bundle, re-encrypted under the station passphrase."""
    return BundleStore(paths.bundles, passphrase).save(lot, bundle)


def export_manifest(ledger: Ledger, paths: StationPaths, passphrase: bytes, lot: str) -> SignedManifest:
    """Build and sign the manifest of every provisioned device of a lot."""
    info = ledger.get_lot(lot)
    ca = lot_signer(BundleStore(paths.bundles, passphrase), info.name)
    records = [
        ManifestRecord(
            device_id=r.device_id,
            hw_serial=r.hw_serial or "",
            cert_pem=_pem(r.cert_der or b""),
            cert_serial=r.cert_serial or "",
            fingerprint_sha256=r.fingerprint_sha256 or "",
            provisioned_at=r.provisioned_at,  # type: ignore[arg-type]
            station=r.station or "",
            port=r.port or "",
            metadata=r.metadata,
        )
        for r in ledger.provisioned_devices(lot)
    ]
    return build_manifest(info.name, records, ca.signer, ca.chain)


def write_manifest(manifest: SignedManifest, directory: Path) -> tuple[Path, Path]:
    """Write manifest JSON and its detached CMS signature; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{manifest.lot}.manifest.json"
    sig_path = directory / f"{manifest.lot}.manifest.p7s"
    json_path.write_bytes(manifest.json_bytes)
    sig_path.write_bytes(manifest.signature_der)
    return json_path, sig_path


def firmware_store(paths: StationPaths) -> FirmwareStore:
    """The station's firmware store."""
    return FirmwareStore(paths.firmware)


def _pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode("ascii")
