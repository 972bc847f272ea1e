"""Everything a job needs about its lot, loaded once per lot and shared by all ports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from factoryd.errors import FactorydError, LotStateError
from factoryd.firmware import FirmwareStore, LotFirmware
from factoryd.jobs.profiles import board_profile
from factoryd.ledger import AsyncLedger
from factoryd.ledger.model import LOT_TRANSITIONS, LotInfo, LotProgress, LotState
from factoryd.ledger.profile import LotProfile
from factoryd.matter.lot import MATTER_DIRNAME, MatterLotFiles, MatterStore, check_matter_lot
from factoryd.pki.attestation import ATTESTATION_DIRNAME, AttestationRootStore
from factoryd.pki.bundle import chain_pem
from factoryd.pki.issuer import Issuer
from factoryd.pki.parts import PartsStore, RegisteredPart
from factoryd.pki.pkcs11 import open_token_lot
from factoryd.pki.profile import CertProfile
from factoryd.pki.signer import Signer
from factoryd.pki.store import BundleStore
from factoryd.signer.client import SignerClient


@dataclass(frozen=True, repr=False)
class LotContext:
    """A lot ready to provision: its profile, issuer (holding the CA key) and what gets written."""

    name: str
    profile: LotProfile
    issuer: Issuer
    chain_pem: bytes
    firmware: LotFirmware | None  # the MCUboot image the profile names, verified
    # Trusted roots for key attestation (pki/attestation.py); empty unless the lot requires it.
    attestation_roots: tuple[x509.Certificate, ...] = ()
    # A vendor's pre-registered parts (pki/parts.py), serial → key: when set, boards prove that key.
    registered_parts: Mapping[str, RegisteredPart] = field(default_factory=dict)
    # A Matter lot's PAI, PAA and Certification Declaration (matter/lot.py); None for other lots.
    matter: MatterLotFiles | None = None
    # The line's signer (``[pki] signer``): it signs, and ``issuer`` holds the chain but no key.
    remote: SignerClient | None = None

    def __repr__(self) -> str:
        return f"LotContext({self.name!r}, protocol={self.profile.protocol!r})"


def cert_profile(profile: LotProfile) -> CertProfile:
    """The certificate profile a lot profile asks for."""
    return CertProfile(
        kind=board_profile(profile.protocol).cert_kind,
        cert_validity_days=profile.cert_validity_days,
        subject=profile.subject_template(),
        dac=profile.matter.dac_spec() if profile.matter is not None else None,
    )


@dataclass(frozen=True, repr=False)
class LotSigner:
    """A lot's CA as the station uses it: the signer (software key or token), its chain, device PEM."""

    signer: Signer
    chain: tuple[x509.Certificate, ...]
    chain_pem: bytes


def lot_signer(bundles: BundleStore, lot: str) -> LotSigner:
    """Open a lot's CA: a PKCS#11 token when its bundle names one (pkcs11.json), else the key file."""
    token_lot = open_token_lot(bundles.path(lot))
    if token_lot is not None:
        return LotSigner(token_lot.signer, token_lot.chain, token_lot.chain_pem)
    bundle = bundles.load(lot)
    return LotSigner(bundle.signer(), bundle.chain, chain_pem(bundle))


def remote_lot_signer(remote: SignerClient, info: LotInfo) -> LotSigner:
    """A lot's chain from the line's signer, no key (blocking).

    Every board profile's job issues through the signer when the lot has one (``jobs/board.py``'s
    ``issue_for_key`` and ``issue_remote``); the signer applies the profile's own CSR rules.
    """
    lot = remote.open_lot(info.name)
    return LotSigner(lot.signer, lot.chain, lot.device_chain_pem)


def load_lot_context(
    info: LotInfo,
    bundles: BundleStore,
    firmware_dir: Path,
    attestation_dir: Path | None = None,
    *,
    remote: SignerClient | None = None,
) -> LotContext:
    """Open a lot's CA, firmware and attestation roots (blocking: run off the event loop).

    ``attestation_dir`` defaults to ``attestation/`` beside ``firmware_dir`` (``StationPaths``).
    With ``remote`` (the line's signer) only the lot's chain is fetched from it: no key is opened.
    """
    ca = remote_lot_signer(remote, info) if remote is not None else lot_signer(bundles, info.name)
    roots: tuple[x509.Certificate, ...] = ()
    parts: dict[str, RegisteredPart] = {}
    if info.profile.attestation == "required":
        directory = attestation_dir or firmware_dir.parent / ATTESTATION_DIRNAME
        roots = AttestationRootStore(directory).load(info.name)
        parts = PartsStore(directory).load(info.name)
        if not roots and not parts:
            raise LotStateError(
                f"lot {info.name!r} requires attestation but has no attestation roots or parts manifest"
            )
    matter: MatterLotFiles | None = None
    if info.profile.matter is not None:
        matter = MatterStore(firmware_dir.parent / MATTER_DIRNAME).load(info.name, ca.chain)
        # Checked again at every opening: the CA bundle may have been replaced since `lots matter`.
        check_matter_lot(info.profile.matter, ca.chain, matter.paa, matter.cd)
    return LotContext(
        name=info.name,
        profile=info.profile,
        issuer=Issuer(ca.signer, ca.chain, cert_profile(info.profile)),
        chain_pem=ca.chain_pem,
        firmware=FirmwareStore(firmware_dir).load_current(info.name, info.profile),
        attestation_roots=roots,
        registered_parts=parts,
        remote=remote,
        matter=matter,
    )


async def active_lot(ledger: AsyncLedger, wanted: str | None) -> LotInfo | None:
    """The lot this station provisions now: the configured one if active, else the only active lot."""
    if wanted is not None:
        info = await ledger.get_lot(wanted)
        return info if info.state is LotState.ACTIVE else None
    active = [lot for lot in await ledger.list_lots() if lot.state is LotState.ACTIVE]
    if len(active) > 1:
        names = ", ".join(sorted(lot.name for lot in active))
        raise LotStateError(f"several lots are active ({names}); set jobs.lot in the config to choose one")
    return active[0] if active else None


def activation_gaps(info: LotInfo, progress: LotProgress, bundles_dir: Path, firmware_dir: Path) -> list[str]:
    """Everything the station still lacks to provision the lot's boards; empty when it can start.

    Reads only what is on disk (no passphrase, no token): the lot's IDs, its CA bundle directory
    and, when the profile names a firmware hash, the station's verified MCUboot image of that hash.
    """
    name = info.name
    gaps = []
    if progress.total == 0:
        gaps.append(
            f"no device IDs (import the customer's list: factoryd lots import {name} FILE, "
            f"or POST /lots/{name}/ids)"
        )
    elif progress.available == 0 and progress.reserved == 0:
        gaps.append(
            f"no device ID left to provision ({progress.provisioned} provisioned, {progress.void} void "
            f"of {progress.total}; import more: factoryd lots import {name} FILE, or POST /lots/{name}/ids)"
        )
    if not (bundles_dir / name).is_dir():
        gaps.append(
            f"no CA bundle (store the customer's: factoryd lots bundle {name} FILE, "
            f"or POST /lots/{name}/bundle)"
        )
    if info.profile.attestation == "required":
        directory = bundles_dir.parent / ATTESTATION_DIRNAME
        if not AttestationRootStore(directory).has(name) and not PartsStore(directory).path(name).is_file():
            gaps.append(
                f"no attestation roots, and the profile requires attestation (store the SE vendor's CA: "
                f"factoryd lots attestation-roots {name} ROOTS.pem, or POST /lots/{name}/attestation-roots; "
                f"or a parts manifest: factoryd lots parts {name} MANIFEST.json --signer CERT.pem)"
            )
    if info.profile.matter is not None and not MatterStore(bundles_dir.parent / MATTER_DIRNAME).has(name):
        gaps.append(
            f"no PAA and Certification Declaration for the Matter lot (store them, checked against the "
            f"PAI: factoryd lots matter {name} --paa PAA.pem --cd CD.der)"
        )
    wanted = info.profile.firmware_sha256
    if wanted is not None:
        where = firmware_dir / name
        try:
            firmware = FirmwareStore(firmware_dir).load_current(name, info.profile)
        except (OSError, FactorydError) as exc:
            gaps.append(f"the firmware image in {where} cannot be used: {exc}")
        else:
            # The store finds an image by its MCUboot hash and verifies it: found is the right one.
            if firmware is None:
                gaps.append(
                    f"no firmware image in {where}, and the profile asks for firmware_sha256 {wanted} "
                    f"(store it: factoryd lots firmware {name} IMAGE --signing-key PUB.pem, "
                    f"or POST /lots/{name}/firmware)"
                )
    return gaps


def check_activation(info: LotInfo, progress: LotProgress, bundles_dir: Path, firmware_dir: Path) -> None:
    """Refuse to activate a lot the station cannot provision, naming everything missing at once.

    A lot whose state does not allow activation is left to the ledger's own transition error.
    Blocking (reads and verifies the firmware image): run it off the event loop.
    """
    if LotState.ACTIVE not in LOT_TRANSITIONS[info.state]:
        return
    gaps = activation_gaps(info, progress, bundles_dir, firmware_dir)
    if gaps:
        raise LotStateError(f"lot {info.name!r} cannot be activated: " + "; ".join(gaps))
