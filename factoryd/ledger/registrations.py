"""Cloud registration state: how far each certificate of a lot got with one cloud account.

A registration run (``factoryd cloud aws register``) records every step it completes for a
certificate before it starts the next, so a rerun after a crash, a throttling error or a
Ctrl-C does only what is missing. One row per (lot, cloud, target, certificate): the lot's CA
certificate has no device ID, a device certificate has its device's ID. Steps only move
forward; a step that a device reaches as its last (done or revoked) is audited with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlmodel import Session, col, select

from factoryd.errors import InputError, LedgerError
from factoryd.ledger.audit import as_utc
from factoryd.ledger.engine import require_label, utc_now
from factoryd.ledger.lots import LotBook
from factoryd.ledger.tables import ID_MAX_CHARS, CloudRegistrationRow

# Two stations upserting the same certificate at once lose a unique-index race at most once each.
UPSERT_RACE_RETRIES = 3
CLOUD_MAX_CHARS = 16
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CLOUD = re.compile(r"[a-z0-9-]{1,16}")


class RegistrationStep(StrEnum):
    """How far a certificate got; device steps in the order a run takes them."""

    CA_REGISTERED = "ca_registered"
    CERTIFICATE_REGISTERED = "certificate_registered"
    THING_CREATED = "thing_created"
    PRINCIPAL_ATTACHED = "principal_attached"
    POLICY_ATTACHED = "policy_attached"  # the last step of a standing device certificate: done
    REVOKED = "revoked"  # a certificate that does not stand, registered (or updated) as REVOKED


# Rank of each step: a record never moves to a lower one (a late writer cannot undo progress).
STEP_RANK: dict[RegistrationStep, int] = {step: rank for rank, step in enumerate(RegistrationStep)}
# Steps after which nothing is left to do for the certificate; reaching one is audited.
FINAL_STEPS = frozenset(
    {RegistrationStep.CA_REGISTERED, RegistrationStep.POLICY_ATTACHED, RegistrationStep.REVOKED}
)


@dataclass(frozen=True, slots=True)
class CloudRegistration:
    """One certificate's registration state with one cloud target."""

    lot: str
    cloud: str
    target: str
    device_id: str | None  # None for the lot's CA certificate
    cert_sha256: str
    step: RegistrationStep
    cloud_cert_id: str | None
    cloud_cert_arn: str | None
    updated_at: datetime


class _UpsertRaceError(Exception):
    """Another transaction inserted the same registration row first; read it and update instead."""


def _registration(row: CloudRegistrationRow, lot: str) -> CloudRegistration:
    return CloudRegistration(
        lot=lot,
        cloud=row.cloud,
        target=row.target,
        device_id=row.device_id,
        cert_sha256=row.cert_sha256,
        step=RegistrationStep(row.step),
        cloud_cert_id=row.cloud_cert_id,
        cloud_cert_arn=row.cloud_cert_arn,
        updated_at=as_utc(row.updated_at),
    )


def _check_target(cloud: str, target: str) -> None:
    if not _CLOUD.fullmatch(cloud):
        raise InputError(f"cloud must be 1..{CLOUD_MAX_CHARS} of a-z, 0-9 and '-', got {cloud!r}")
    require_label(target, "cloud target")


class RegistrationBook(LotBook):
    """The ledger's record of cloud registrations (mixed into ``Ledger``)."""

    def cloud_registrations(self, lot: str, *, cloud: str, target: str) -> list[CloudRegistration]:
        """Every recorded registration of the lot's certificates with ``cloud`` at ``target``."""
        _check_target(cloud, target)
        with self._transaction(write=False) as session:
            lot_id = self._lot_row(session, lot).id
            rows = session.exec(
                select(CloudRegistrationRow)
                .where(
                    CloudRegistrationRow.lot_id == lot_id,
                    CloudRegistrationRow.cloud == cloud,
                    CloudRegistrationRow.target == target,
                )
                .order_by(col(CloudRegistrationRow.id))
            ).all()
            return [_registration(row, lot) for row in rows]

    def record_cloud_step(
        self,
        lot: str,
        *,
        cloud: str,
        target: str,
        cert_sha256: str,
        device_id: str | None,
        step: RegistrationStep,
        cloud_cert_id: str | None,
        cloud_cert_arn: str | None,
        actor: str,
    ) -> CloudRegistration:
        """Record that a certificate reached ``step`` with a cloud target; never moves a record back.

        A final step (CA registered, policy attached, revoked) is audited in the same transaction.
        """
        _check_target(cloud, target)
        fingerprint = cert_sha256.lower()
        if not _SHA256_HEX.fullmatch(fingerprint):
            raise InputError(f"cert_sha256 must be 64 hex digits, got {cert_sha256!r}")
        if device_id is not None:
            require_label(device_id, "device_id", ID_MAX_CHARS)
        wanted = RegistrationStep(step)
        for _attempt in range(UPSERT_RACE_RETRIES):
            try:
                return self._upsert_step(
                    lot,
                    cloud=cloud,
                    target=target,
                    cert_sha256=fingerprint,
                    device_id=device_id,
                    step=wanted,
                    cloud_cert_id=cloud_cert_id,
                    cloud_cert_arn=cloud_cert_arn,
                    actor=actor,
                )
            except _UpsertRaceError:
                continue
        raise LedgerError(f"recording the cloud registration of {fingerprint} kept losing to another writer")

    def _upsert_step(
        self,
        lot: str,
        *,
        cloud: str,
        target: str,
        cert_sha256: str,
        device_id: str | None,
        step: RegistrationStep,
        cloud_cert_id: str | None,
        cloud_cert_arn: str | None,
        actor: str,
    ) -> CloudRegistration:
        now = utc_now()
        with self._transaction(write=True, on_integrity=lambda _exc: _UpsertRaceError()) as session:
            lot_id = self._lot_row(session, lot).id
            if lot_id is None:
                raise LedgerError(f"lot {lot!r} has no id")
            row = self._registration_row(session, lot_id, cloud, target, cert_sha256)
            if row is None:
                row = CloudRegistrationRow(
                    lot_id=lot_id,
                    cloud=cloud,
                    target=target,
                    device_id=device_id,
                    cert_sha256=cert_sha256,
                    step=step.value,
                    cloud_cert_id=cloud_cert_id,
                    cloud_cert_arn=cloud_cert_arn,
                    updated_at=now,
                )
            else:
                if row.device_id != device_id:
                    raise InputError(
                        f"certificate {cert_sha256} is recorded for device {row.device_id!r}, "
                        f"not {device_id!r}"
                    )
                if STEP_RANK[RegistrationStep(row.step)] >= STEP_RANK[step]:
                    return _registration(row, lot)  # already there (a retry, or a concurrent run)
                row.step = step.value
                row.cloud_cert_id = cloud_cert_id or row.cloud_cert_id
                row.cloud_cert_arn = cloud_cert_arn or row.cloud_cert_arn
                row.updated_at = now
            session.add(row)
            session.flush()
            if step in FINAL_STEPS:
                self._audit_in_session(
                    session,
                    actor=actor,
                    action=f"cloud.{step.value}",
                    subject=device_id if device_id is not None else lot,
                    details={
                        "lot": lot,
                        "cloud": cloud,
                        "target": target,
                        "cert_sha256": cert_sha256,
                        "cloud_cert_id": row.cloud_cert_id,
                    },
                    at=now,
                )
            return _registration(row, lot)

    @staticmethod
    def _registration_row(
        session: Session, lot_id: int, cloud: str, target: str, cert_sha256: str
    ) -> CloudRegistrationRow | None:
        return session.exec(
            select(CloudRegistrationRow)
            .where(
                CloudRegistrationRow.lot_id == lot_id,
                CloudRegistrationRow.cloud == cloud,
                CloudRegistrationRow.target == target,
                CloudRegistrationRow.cert_sha256 == cert_sha256,
            )
            .with_for_update()
        ).first()
