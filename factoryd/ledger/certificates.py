"""Every certificate the station signed for a lot, which of them stand, and the lot's CRL numbers.

The audit trail has a ``cert.issued`` entry for each device certificate, written before the
certificate leaves the station (subject = device ID; details: cert_serial, fingerprint_sha256,
hw_serial, job_id). A certificate *stands* when it is the one recorded on a provisioned device.
The others are revoked once nothing can still make them stand:

- the device was voided: ``voided`` (CRL reason cessationOfOperation);
- the device carries, or was issued, a later certificate (a retry, a rework): ``superseded``;
- its job ended without recording it (it failed after the certificate was issued, perhaps
  after writing it to the board): ``failed`` (no CRL reason code, i.e. unspecified).

A certificate whose job is still running is neither: it may yet be recorded. CRL numbers come
from the trail's ``crl.issued`` entries (subject = lot name), so no table is needed for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlmodel import col, select

from factoryd.errors import LedgerError
from factoryd.ledger.audit import as_utc
from factoryd.ledger.engine import utc_now
from factoryd.ledger.lots import LotBook
from factoryd.ledger.model import DeviceState
from factoryd.ledger.tables import AuditEntryRow, DeviceRow, JobRow
from factoryd.pki.crl import MAX_CRL_NUMBER

CERT_ISSUED_ACTION = "cert.issued"
CRL_ISSUED_ACTION = "crl.issued"
_VOIDED_ACTION = "id.voided"


class RevocationCause(StrEnum):
    """Why an issued certificate does not stand."""

    SUPERSEDED = "superseded"
    VOIDED = "voided"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class IssuedCertificateEntry:
    """One ``cert.issued`` entry of the audit trail."""

    seq: int
    device_id: str
    cert_serial: str
    fingerprint_sha256: str
    hw_serial: str | None
    job_id: int | None
    issued_at: datetime
    # How the board's secure element was shown genuine (attestation or parts-manifest evidence).
    genuineness: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class RevokedCertificate:
    """A certificate the lot's CA signed that does not stand, and since when."""

    device_id: str
    cert_serial: str  # lowercase hex, as IssuedCertificate.serial_hex
    fingerprint_sha256: str
    issued_at: datetime
    revoked_at: datetime
    cause: RevocationCause


@dataclass(frozen=True, slots=True)
class _DeviceState:
    state: DeviceState
    fingerprint: str | None
    provisioned_at: datetime | None


def _entry(row: AuditEntryRow) -> IssuedCertificateEntry:
    try:
        details = json.loads(row.details)
        serial = str(details["cert_serial"]).lower()
        fingerprint = str(details["fingerprint_sha256"]).lower()
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"audit entry {row.seq} ({row.action}) lacks the certificate's serial") from exc
    job_id = details.get("job_id")
    evidence = details.get("genuineness")
    if row.seq is None:  # a row read back always has its database-assigned seq
        raise LedgerError(f"audit entry ({row.action}) read without its seq")
    return IssuedCertificateEntry(
        seq=row.seq,
        device_id=row.subject,
        cert_serial=serial,
        fingerprint_sha256=fingerprint,
        hw_serial=details.get("hw_serial"),
        job_id=job_id if isinstance(job_id, int) else None,
        issued_at=as_utc(row.at),
        genuineness={str(k): str(v) for k, v in evidence.items()} if isinstance(evidence, dict) else None,
    )


class CertificateBook(LotBook):
    """The certificates of a lot as the audit trail knows them, and its CRL numbers."""

    def issued_certificates(self, lot: str) -> list[IssuedCertificateEntry]:
        """Every certificate signed for the lot's devices, in the order they were issued."""
        with self._transaction(write=False) as session:
            lot_id = self._lot_row(session, lot).id
            rows = session.exec(
                select(AuditEntryRow)
                .join(DeviceRow, col(DeviceRow.device_id) == col(AuditEntryRow.subject))
                .where(DeviceRow.lot_id == lot_id, AuditEntryRow.action == CERT_ISSUED_ACTION)
                .order_by(col(AuditEntryRow.seq))
            ).all()
            return [_entry(row) for row in rows]

    def revoked_certificates(self, lot: str) -> list[RevokedCertificate]:
        """The lot's certificates that were issued but do not stand, in the order they were issued."""
        with self._transaction(write=False, snapshot=True) as session:
            lot_id = self._lot_row(session, lot).id
            audit_rows = session.exec(
                select(AuditEntryRow)
                .join(DeviceRow, col(DeviceRow.device_id) == col(AuditEntryRow.subject))
                .where(
                    DeviceRow.lot_id == lot_id,
                    col(AuditEntryRow.action).in_([CERT_ISSUED_ACTION, _VOIDED_ACTION]),
                )
                .order_by(col(AuditEntryRow.seq))
            ).all()
            # Only the columns needed: a large lot's certificates (cert_der) stay in the database.
            devices = {
                device_id: _DeviceState(
                    DeviceState(state),
                    fingerprint,
                    None if provisioned_at is None else as_utc(provisioned_at),
                )
                for device_id, state, fingerprint, provisioned_at in session.exec(
                    select(
                        DeviceRow.device_id,
                        DeviceRow.state,
                        DeviceRow.cert_fingerprint_sha256,
                        DeviceRow.provisioned_at,
                    ).where(DeviceRow.lot_id == lot_id, DeviceRow.state != DeviceState.AVAILABLE.value)
                ).all()
            }
            jobs = {
                job_id: None if finished_at is None else as_utc(finished_at)
                for job_id, finished_at in session.exec(
                    select(JobRow.id, JobRow.finished_at).where(JobRow.lot_id == lot_id)
                ).all()
            }
        issued = [_entry(row) for row in audit_rows if row.action == CERT_ISSUED_ACTION]
        voided_at = {row.subject: as_utc(row.at) for row in audit_rows if row.action == _VOIDED_ACTION}
        next_issue: dict[int, datetime] = {}
        latest: dict[str, datetime] = {}
        for entry in reversed(issued):
            if entry.device_id in latest:
                next_issue[entry.seq] = latest[entry.device_id]
            latest[entry.device_id] = entry.issued_at
        revoked = []
        for entry in issued:
            device = devices.get(entry.device_id)
            if device is None:
                # An ID that is available again carries nothing: treat its certificate as failed.
                device = _DeviceState(DeviceState.AVAILABLE, None, None)
            if device.state is DeviceState.PROVISIONED and device.fingerprint == entry.fingerprint_sha256:
                continue
            job_open = entry.job_id in jobs and jobs[entry.job_id] is None
            if device.state is DeviceState.VOID:
                cause = RevocationCause.VOIDED
                at = voided_at.get(entry.device_id, entry.issued_at)
            elif device.state is DeviceState.PROVISIONED:
                cause = RevocationCause.SUPERSEDED
                at = next_issue.get(entry.seq) or device.provisioned_at or entry.issued_at
            elif entry.seq in next_issue:
                cause = RevocationCause.SUPERSEDED
                at = next_issue[entry.seq]
            elif job_open:
                continue  # its job runs: it may still be recorded
            else:
                cause = RevocationCause.FAILED
                at = jobs.get(entry.job_id or -1) or entry.issued_at
            revoked.append(
                RevokedCertificate(
                    device_id=entry.device_id,
                    cert_serial=entry.cert_serial,
                    fingerprint_sha256=entry.fingerprint_sha256,
                    issued_at=entry.issued_at,
                    revoked_at=max(at, entry.issued_at),
                    cause=cause,
                )
            )
        return revoked

    def crl_numbers(self, lot: str) -> list[int]:
        """The CRL numbers issued for the lot so far, in order."""
        with self._transaction(write=False) as session:
            rows = session.exec(
                select(AuditEntryRow.details)
                .where(AuditEntryRow.action == CRL_ISSUED_ACTION, AuditEntryRow.subject == lot)
                .order_by(col(AuditEntryRow.seq))
            ).all()
        return [_crl_number(details) for details in rows]

    def published_revoked_serials(self, lot: str) -> set[str]:
        """Certificate serials (lowercase hex) some CRL of the lot has already listed as revoked.

        A published revocation cannot be taken back (a relying party may have acted on it), so a
        certificate in this set must never be recorded as standing again.
        """
        with self._transaction(write=False) as session:
            rows = session.exec(
                select(AuditEntryRow.details).where(
                    AuditEntryRow.action == CRL_ISSUED_ACTION, AuditEntryRow.subject == lot
                )
            ).all()
        serials: set[str] = set()
        for details in rows:
            listed = json.loads(details).get("serials", [])
            serials.update(str(s).lower() for s in listed if isinstance(s, str))
        return serials

    def record_crl(self, lot: str, *, actor: str, details: dict[str, object]) -> int:
        """Take the lot's next CRL number and record a ``crl.issued`` entry naming it, atomically.

        Call it before signing: a CRL that then fails to sign leaves a gap in the numbers, never a
        number used twice.
        """
        with self._transaction(write=True) as session, self._session_tx(session) as tx:
            self._lot_row(session, lot)
            # The lot row locked exclusively serialises the lot's CRL numbering across stations and
            # actors (each appends to its own audit chain), so two CRLs never read the same last
            # number (SQLite: the write transaction already does).
            tx.first(self._sql.lot_locked, {"name": lot})
            rows = session.exec(
                select(AuditEntryRow.details).where(
                    AuditEntryRow.action == CRL_ISSUED_ACTION, AuditEntryRow.subject == lot
                )
            ).all()
            number = max((_crl_number(d) for d in rows), default=0) + 1
            if number > MAX_CRL_NUMBER:
                raise LedgerError(f"lot {lot!r} has used every CRL number")
            self._append_audit(
                tx,
                actor=actor,
                action=CRL_ISSUED_ACTION,
                subject=lot,
                details={"lot": lot, **details, "crl_number": number},
                at=utc_now(),
            )
        return number


def _crl_number(details_json: str) -> int:
    try:
        number = json.loads(details_json)["crl_number"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerError("a crl.issued audit entry has no crl_number") from exc
    if not isinstance(number, int):
        raise LedgerError("a crl.issued audit entry has a crl_number that is not an integer")
    return number
