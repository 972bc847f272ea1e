"""Matter lot set-up: the checks before a lot may make DACs, and the lot's Matter files on the station.

At set-up (``factoryd lots matter LOT --paa PAA.pem --cd CD.der``) the station checks, all at once
and before anything is stored: the PAI (the lot's CA bundle certificate) has the PAI profile and
chains to the PAA (signature, AKI/SKI, validity now); the PAA has the PAA profile; the CD parses
(and verifies with the CD signing certificate, when one is given); the VIDs and PIDs agree between
PAI, lot profile and CD (a mismatch would make every device fail commissioning later). A refusal
names every problem and stores nothing. The files live in ``<state>/matter/<lot>/`` (``paa.pem``,
``cd.der``, optionally ``cd-signer.pem``), written as one directory rename.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from factoryd.errors import InputError
from factoryd.files import private_staging_dir, write_new
from factoryd.matter.cd import CdError, CertificationDeclaration, parse_cd
from factoryd.matter.dac import certificate_problems, matter_ids
from factoryd.matter.profile import MatterProfile

MATTER_DIRNAME = "matter"
PAA_FILE = "paa.pem"
CD_FILE = "cd.der"
CD_SIGNER_FILE = "cd-signer.pem"
# The customer's certificate the onboarding-codes file is encrypted to (matter/onboarding.py).
RECIPIENT_FILE = "recipient.pem"


class MatterLotError(InputError):
    """A Matter lot's PAI, PAA, CD and profile do not fit together; the message lists every reason."""


@dataclass(frozen=True)
class MatterLotFiles:
    """A Matter lot's files as the jobs use them: the PAI (from the bundle), the PAA, the CD."""

    pai: x509.Certificate
    paa: x509.Certificate
    cd: CertificationDeclaration

    @property
    def pai_der(self) -> bytes:
        """The PAI as the board stores it."""
        return self.pai.public_bytes(serialization.Encoding.DER)


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):  # another issuer name, key type or signature
        return False
    return True


def matter_lot_problems(
    profile: MatterProfile,
    chain: Sequence[x509.Certificate],
    paa: x509.Certificate,
    cd: CertificationDeclaration,
    *,
    cd_signer: x509.Certificate | None = None,
    now: dt.datetime | None = None,
) -> list[str]:
    """Every reason the lot's PAI chain, PAA, CD and Matter profile cannot make commissionable devices."""
    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    if not chain:
        return ["the lot has no CA certificate (its PAI)"]
    pai = chain[0]
    problems += certificate_problems(pai, "pai")
    problems += certificate_problems(paa, "paa")
    if pai.issuer != paa.subject or not _signed_by(pai, paa):
        problems.append("the PAI does not chain to the PAA (issuer name or signature)")
    else:
        try:
            aki = pai.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
            ski = paa.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            aki, ski = None, b""
        if aki != ski:
            problems.append("the PAI's authorityKeyIdentifier is not the PAA's subjectKeyIdentifier")
    for cert, name in ((pai, "PAI"), (paa, "PAA")):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            problems.append(
                f"the {name} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d})"
            )
    pai_ids, paa_ids = matter_ids(pai), matter_ids(paa)
    lot_vid = profile.vendor_id
    if pai_ids.vendor_id is not None and pai_ids.vendor_id != lot_vid:
        problems.append(f"the PAI's VID 0x{pai_ids.vendor_id:04X} is not the lot's 0x{lot_vid:04X}")
    if paa_ids.vendor_id is not None and paa_ids.vendor_id != lot_vid:
        problems.append(f"the PAA's VID 0x{paa_ids.vendor_id:04X} is not the lot's 0x{lot_vid:04X}")
    if pai_ids.product_id is not None and profile.product_ids != (pai_ids.product_id,):
        problems.append(f"the PAI is bound to PID 0x{pai_ids.product_id:04X}: the lot may have only that PID")
    for pid in profile.product_ids:
        if not cd.allows_dac_ids(lot_vid, pid):
            if cd.dac_origin_vendor_id is not None:
                problems.append(
                    f"the CD names DAC origin 0x{cd.dac_origin_vendor_id:04X}/"
                    f"0x{cd.dac_origin_product_id or 0:04X}; "
                    f"the lot's DACs would carry 0x{lot_vid:04X}/0x{pid:04X}"
                )
            elif cd.vendor_id != lot_vid:
                problems.append(
                    f"the CD's vendor_id 0x{cd.vendor_id:04X} is not the lot's VID 0x{lot_vid:04X}"
                )
            else:
                problems.append(f"the lot's PID 0x{pid:04X} is not in the CD's product_id_array")
    if cd.authorized_paa_skids:
        try:
            paa_skid = paa.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            paa_skid = b""
        if paa_skid not in cd.authorized_paa_skids:
            problems.append("the CD's authorized_paa_list does not list the lot's PAA")
    if cd_signer is not None:
        try:
            cd.verify(cd_signer)
        except CdError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))  # a rule reached two ways is said once


def check_matter_lot(
    profile: MatterProfile,
    chain: Sequence[x509.Certificate],
    paa: x509.Certificate,
    cd: CertificationDeclaration,
    *,
    cd_signer: x509.Certificate | None = None,
) -> None:
    """MatterLotError listing every problem, or nothing when the lot's Matter files fit."""
    problems = matter_lot_problems(profile, chain, paa, cd, cd_signer=cd_signer)
    if problems:
        raise MatterLotError("the Matter lot is refused: " + "; ".join(problems))


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """One certificate from PEM or DER bytes; InputError naming ``what`` otherwise."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
            if len(certs) != 1:
                raise InputError(f"the {what} file holds {len(certs)} certificates; exactly one is expected")
            return certs[0]
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InputError(f"the {what} is not a certificate: {exc}") from None


class MatterStore:
    """Per-lot Matter files on the station: ``<dir>/<lot>/{paa.pem, cd.der[, cd-signer.pem]}``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, lot: str) -> Path:
        """The lot's directory."""
        return self.directory / lot

    def has(self, lot: str) -> bool:
        """Whether the lot's PAA and CD are stored."""
        return (self.path(lot) / PAA_FILE).is_file() and (self.path(lot) / CD_FILE).is_file()

    def save(
        self,
        lot: str,
        paa: x509.Certificate,
        cd_der: bytes,
        cd_signer: x509.Certificate | None = None,
        recipient: x509.Certificate | None = None,
    ) -> Path:
        """Store checked files; an existing set is replaced whole (one rename), never half."""
        target = self.path(lot)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = target.with_name(f".{target.name}.old")
        staged = target.with_name(f".{target.name}.new")
        shutil.rmtree(staged, ignore_errors=True)  # left by a crash between the renames below
        with private_staging_dir(staged) as staging:
            write_new(staging / PAA_FILE, paa.public_bytes(serialization.Encoding.PEM), mode=0o644)
            write_new(staging / CD_FILE, cd_der, mode=0o644)
            for cert, name in ((cd_signer, CD_SIGNER_FILE), (recipient, RECIPIENT_FILE)):
                if cert is not None:
                    write_new(staging / name, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        staged.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return target

    def recipient(self, lot: str) -> x509.Certificate | None:
        """The customer's stored recipient certificate, if one was given at set-up."""
        path = self.path(lot) / RECIPIENT_FILE
        return load_certificate(path.read_bytes(), "stored recipient") if path.is_file() else None

    def load(self, lot: str, chain: Sequence[x509.Certificate]) -> MatterLotFiles:
        """The lot's files with its PAI (``chain[0]``); InputError when they are missing or unreadable."""
        directory = self.path(lot)
        if not self.has(lot):
            raise InputError(
                f"Matter lot {lot!r} has no PAA and CD on this station "
                f"(store them: factoryd lots matter {lot} --paa PAA.pem --cd CD.der)"
            )
        paa = load_certificate((directory / PAA_FILE).read_bytes(), "stored PAA")
        cd = parse_cd((directory / CD_FILE).read_bytes())
        if not chain:
            raise InputError(f"Matter lot {lot!r} has no PAI")
        return MatterLotFiles(pai=chain[0], paa=paa, cd=cd)
