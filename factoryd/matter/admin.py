"""Matter lot administration shared by the CLI, the API and the demo: set-up and the onboarding file.

Each call checks everything before it writes anything (nothing half-written), and audits what it did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from factoryd.errors import InputError
from factoryd.jobs.lots import lot_signer
from factoryd.ledger import Ledger
from factoryd.matter.cd import parse_cd
from factoryd.matter.lot import MatterStore, check_matter_lot, load_certificate
from factoryd.matter.onboarding import encrypt_onboarding, load_recipient, onboarding_csv
from factoryd.pki.pkcs11 import Pkcs11Signer
from factoryd.pki.store import BundleStore
from factoryd.service import StationPaths


@dataclass(frozen=True)
class OnboardingExport:
    """The encrypted onboarding-codes file of a lot and how many devices it lists."""

    lot: str
    count: int
    der: bytes


def setup_matter_lot(
    ledger: Ledger,
    paths: StationPaths,
    passphrase: bytes,
    lot: str,
    *,
    paa: bytes,
    cd: bytes,
    cd_signer: bytes | None = None,
    recipient: bytes | None = None,
    actor: str,
) -> None:
    """Check the lot's PAI (its CA bundle) against the PAA, CD and profile; store them; refused whole."""
    info = ledger.get_lot(lot)
    profile = info.profile.matter
    if profile is None:
        raise InputError(f"lot {lot!r} is not a Matter lot (its profile has no matter section)")
    paa_cert = load_certificate(paa, "PAA")
    declaration = parse_cd(cd)
    signer_cert = load_certificate(cd_signer, "CD signing certificate") if cd_signer is not None else None
    recipient_cert = load_recipient(recipient) if recipient is not None else None
    ca = lot_signer(BundleStore(paths.bundles, passphrase), info.name)
    try:
        check_matter_lot(profile, ca.chain, paa_cert, declaration, cd_signer=signer_cert)
    finally:
        if isinstance(ca.signer, Pkcs11Signer):
            ca.signer.close()
    MatterStore(paths.matter).save(info.name, paa_cert, cd, signer_cert, recipient_cert)
    ledger.audit(
        actor=actor,
        action="lot.matter",
        subject=info.name,
        details={
            "paa": paa_cert.subject.rfc4514_string(),
            "paa_sha256": hashlib.sha256(paa_cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            "cd_sha256": hashlib.sha256(cd).hexdigest(),
            "cd_certificate_id": declaration.certificate_id,
            "cd_vendor_id": declaration.vendor_id,
            "cd_product_ids": list(declaration.product_ids),
            "cd_test_signed": declaration.is_test_signed,
            "cd_signature_verified": signer_cert is not None,
            "recipient": recipient_cert.subject.rfc4514_string() if recipient_cert is not None else None,
        },
    )


def export_onboarding_codes(
    ledger: Ledger,
    paths: StationPaths,
    passphrase: bytes,
    lot: str,
    *,
    recipient: bytes | None = None,
    actor: str,
) -> OnboardingExport:
    """The lot's onboarding codes as CMS EnvelopedData for the customer (the given or stored certificate)."""
    info = ledger.get_lot(lot)
    profile = info.profile.matter
    if profile is None:
        raise InputError(f"lot {lot!r} is not a Matter lot: it has no onboarding codes")
    recipient_cert = (
        load_recipient(recipient) if recipient is not None else MatterStore(paths.matter).recipient(lot)
    )
    if recipient_cert is None:
        raise InputError(
            f"no recipient for lot {lot!r}: give the customer's certificate (--recipient CERT.pem) "
            f"or store one with factoryd lots matter {lot} … --recipient CERT.pem"
        )
    ledger.use_onboarding_secret(passphrase)
    records = ledger.onboarding_records(lot)
    der = encrypt_onboarding(onboarding_csv(records, vendor_id=profile.vendor_id), recipient_cert)
    ledger.audit(
        actor=actor,
        action="lot.onboarding_codes_exported",
        subject=info.name,
        details={
            "devices": len(records),
            "recipient": recipient_cert.subject.rfc4514_string(),
            "recipient_sha256": hashlib.sha256(
                recipient_cert.public_bytes(serialization.Encoding.DER)
            ).hexdigest(),
        },
    )
    return OnboardingExport(info.name, len(records), der)
