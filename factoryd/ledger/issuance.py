"""What the line's signing service signed: issuance checked against the reservation, in one transaction.

``factoryd signer`` (``factoryd/signer/``) calls :meth:`IssuanceBook.issue` for every request a
station sends. In one transaction, the device row locked, it checks that the ledger shows exactly
that device ID reserved *by that station* for that secure-element serial, in an active lot, under
the open job that reserved it; it counts the lot's certificates against the customer's quota;
then it lets the caller build and sign the certificate (``sign``), and records the certificate
(``signer_issuance``) with its ``cert.issued`` audit entry before anything is returned.

Rules the transaction keeps:

- **Idempotent**: a request id seen before returns the certificate recorded for it (a lost reply,
  retried); the same id with another CSR, device, serial or station is refused.
- **One standing certificate per device ID.** A second request for the same reservation (the job
  restarted after the certificate was signed but before the board was recorded: the board made a
  new key) supersedes the earlier certificate, which is recorded as superseded (``current`` NULL,
  ``cert.superseded`` in the trail: it was never recorded on a board, and the lot's CRL revokes it
  as superseded, see ``ledger/certificates.py``). At most ``max_per_device`` certificates are ever
  signed for one ID; a provisioned ID gets none.
- **Quota**: every signature counts, superseded ones included (a superseded certificate is still a
  valid signature until the CRL reaches the relying party), so a quota of N signs N certificates.
  The lot's count (``signer_lot``) is locked by every issuance of the lot and raised with it, so
  concurrent requests never both pass the quota at N-1 (and counting costs no table scan).

Refusals are audited by :meth:`IssuanceBook.record_refusal` (``signer.refused``) in their own
transaction, after the refused one rolled back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from factoryd.errors import LedgerError, LotNotFoundError
from factoryd.ledger.audit import as_utc
from factoryd.ledger.core import Ledger
from factoryd.ledger.engine import require_label, require_serial, utc_now
from factoryd.ledger.lots import LotBook
from factoryd.ledger.model import DeviceState, LotState
from factoryd.ledger.profile import LotProfile
from factoryd.ledger.tables import DeviceRow, JobRow, SignerIssuanceRow, SignerLotRow

CERT_ISSUED_ACTION = "cert.issued"  # the action ledger/certificates.py reads
CERT_SUPERSEDED_ACTION = "cert.superseded"
REFUSED_ACTION = "signer.refused"
# Request ids: what a station can make unique (its name, job, a digest); kept to a safe alphabet.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{16,64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Details kept of a refusal's message in the audit trail.
REFUSAL_MESSAGE_MAX_CHARS = 300


class IssuanceRefusedError(LedgerError):
    """The ledger does not allow this certificate; ``code`` names the rule (``not_reserved``, …)."""

    # Only an instance made without __init__ (the error-tree test) lacks its own.
    _code: str = "issuance_refused"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self._code = code

    @property
    def code(self) -> str:
        """The refused rule, label-safe (metrics, the station's failure reason)."""
        return self._code

    @property
    def reason(self) -> str:
        """The refused rule (as ``code``)."""
        return self._code


@dataclass(frozen=True, slots=True)
class IssuanceRequest:
    """What a station asks the signer for, as the ledger checks it."""

    request_id: str
    lot: str
    device_id: str
    hw_serial: str
    station: str  # from the station's verified client certificate, never from the request body
    job_id: int | None
    csr_sha256: str


@dataclass(frozen=True, slots=True)
class ReservedDevice:
    """The reservation a request is checked against, handed to ``sign``."""

    lot: str
    profile: LotProfile
    device_id: str
    hw_serial: str
    metadata: Mapping[str, str]
    signed_before: int  # certificates already signed for this ID (a re-issue when > 0)


@dataclass(frozen=True, slots=True)
class SignedDevice:
    """What ``sign`` returns: the certificate and how the board was shown genuine (if it had to be)."""

    cert_der: bytes
    cert_serial: str  # lowercase hex
    fingerprint_sha256: str
    genuineness: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class IssuanceRecord:
    """One certificate the signer signed."""

    request_id: str
    lot: str
    device_id: str
    hw_serial: str
    station: str
    job_id: int | None
    cert_der: bytes
    cert_serial: str
    fingerprint_sha256: str
    current: bool
    issued_at: datetime
    superseded_at: datetime | None


@dataclass(frozen=True, slots=True)
class IssuanceOutcome:
    """The answer to one request."""

    record: IssuanceRecord
    replayed: bool  # the request id was seen before: the certificate recorded then
    superseded: str | None  # serial of the certificate this one supersedes
    signed_in_lot: int  # certificates signed for the lot, this one included


def _record(row: SignerIssuanceRow, lot: str) -> IssuanceRecord:
    return IssuanceRecord(
        request_id=row.request_id,
        lot=lot,
        device_id=row.device_id,
        hw_serial=row.hw_serial,
        station=row.station,
        job_id=row.job_id,
        cert_der=row.cert_der,
        cert_serial=row.cert_serial,
        fingerprint_sha256=row.cert_fingerprint_sha256,
        current=row.current is not None,
        issued_at=as_utc(row.issued_at),
        superseded_at=None if row.superseded_at is None else as_utc(row.superseded_at),
    )


def check_request(request: IssuanceRequest) -> None:
    """InputError unless the request's fields are well formed (before any transaction)."""
    if not REQUEST_ID_RE.fullmatch(request.request_id):
        raise IssuanceRefusedError(
            "bad_request", f"request_id must be 16..64 of [A-Za-z0-9._:-], got {request.request_id!r}"
        )
    if not _SHA256_HEX.fullmatch(request.csr_sha256):
        raise IssuanceRefusedError("bad_request", "csr_sha256 must be 64 lowercase hex digits")
    require_label(request.device_id, "device_id")
    require_label(request.station, "station")
    require_serial(request.hw_serial)


class IssuanceBook(LotBook):
    """The signer's part of the ledger: checked issuance, refusals, the lot's signed count."""

    def issue(
        self,
        request: IssuanceRequest,
        *,
        sign: Callable[[ReservedDevice], SignedDevice],
        actor: str,
        max_per_device: int,
        quota_max: int | None = None,
    ) -> IssuanceOutcome:
        """Check the reservation, count the quota, sign (``sign``) and record, in one transaction.

        IssuanceRefusedError names the broken rule; what ``sign`` raises (a refused CSR) rolls back.
        """
        check_request(request)
        with self._transaction(write=True) as session:
            try:
                lot_row = self._lot_row(session, request.lot)
            except LotNotFoundError:
                raise IssuanceRefusedError("unknown_lot", f"no lot named {request.lot!r}") from None
            if lot_row.id is None:
                raise LedgerError(f"lot {request.lot!r} has no id")
            lot_id = lot_row.id
            # The lot's count, locked: two requests of one lot never both pass the quota at N-1.
            counter = self._counter(session, lot_id)
            device = session.exec(
                select(DeviceRow)
                .where(DeviceRow.lot_id == lot_id, DeviceRow.device_id == request.device_id)
                .with_for_update()
            ).first()
            seen = session.exec(
                select(SignerIssuanceRow).where(SignerIssuanceRow.request_id == request.request_id)
            ).first()
            if seen is not None:
                return self._replay(seen, request, lot_id, counter.signed)
            if LotState(lot_row.state) is not LotState.ACTIVE:
                raise IssuanceRefusedError(
                    "lot_not_active",
                    f"lot {request.lot!r} is {lot_row.state}; only an active lot is signed for",
                )
            if device is None:
                raise IssuanceRefusedError(
                    "unknown_device", f"ID {request.device_id!r} is not on the list of lot {request.lot!r}"
                )
            self._check_reservation(session, device, request)
            previous = session.exec(
                select(SignerIssuanceRow)
                .where(SignerIssuanceRow.lot_id == lot_id, SignerIssuanceRow.device_id == request.device_id)
                .order_by(col(SignerIssuanceRow.id))
            ).all()
            if len(previous) >= max_per_device:
                raise IssuanceRefusedError(
                    "reissue_limit",
                    f"ID {request.device_id!r} already has {len(previous)} certificates signed "
                    f"(limit {max_per_device}): void the ID and give the board another",
                )
            signed_count = counter.signed
            if quota_max is not None and signed_count >= quota_max:
                raise IssuanceRefusedError(
                    "quota_exhausted",
                    f"lot {request.lot!r} has used its customer quota: {signed_count} of {quota_max} "
                    "certificates signed (the customer must sign a larger quota)",
                )
            signed = sign(
                ReservedDevice(
                    lot=request.lot,
                    profile=LotProfile.model_validate(lot_row.profile),
                    device_id=device.device_id,
                    hw_serial=request.hw_serial,
                    metadata=dict(device.metadata_),
                    signed_before=len(previous),
                )
            )
            return self._record_signed(
                session,
                request=request,
                lot_id=lot_id,
                previous=previous,
                signed=signed,
                signed_count=signed_count,
                actor=actor,
            )

    def _check_reservation(self, session: Session, device: DeviceRow, request: IssuanceRequest) -> None:
        state = DeviceState(device.state)
        where = f"ID {request.device_id!r} in lot {request.lot!r}"
        if state is DeviceState.PROVISIONED:
            raise IssuanceRefusedError(
                "already_provisioned", f"{where} is provisioned already; it gets no second certificate"
            )
        if state is not DeviceState.RESERVED:
            raise IssuanceRefusedError("not_reserved", f"{where} is {state}, not reserved")
        if device.hw_serial != request.hw_serial:
            raise IssuanceRefusedError(
                "wrong_serial",
                f"{where} is reserved for serial {device.hw_serial!r}, not {request.hw_serial!r}",
            )
        if device.station != request.station:
            raise IssuanceRefusedError(
                "wrong_station",
                f"{where} is reserved by station {device.station!r}, not by {request.station!r}",
            )
        if request.job_id is not None:
            if device.job_id != request.job_id:
                raise IssuanceRefusedError(
                    "wrong_job", f"{where} is reserved under job {device.job_id}, not job {request.job_id}"
                )
            job = session.get(JobRow, request.job_id)
            if job is None or job.finished_at is not None:
                raise IssuanceRefusedError("job_closed", f"job {request.job_id} is not open")

    @staticmethod
    def _replay(
        seen: SignerIssuanceRow, request: IssuanceRequest, lot_id: int, signed: int
    ) -> IssuanceOutcome:
        same = (
            seen.lot_id == lot_id
            and seen.device_id == request.device_id
            and seen.hw_serial == request.hw_serial
            and seen.station == request.station
            and seen.csr_sha256 == request.csr_sha256
        )
        if not same:
            raise IssuanceRefusedError(
                "request_reused", f"request id {request.request_id!r} was used for another request"
            )
        return IssuanceOutcome(
            record=_record(seen, request.lot),
            replayed=True,
            superseded=None,
            signed_in_lot=signed,
        )

    def _counter(self, session: Session, lot_id: int) -> SignerLotRow:
        """The lot's certificate count, created at 0 on first use and locked for the transaction."""
        insert = pg_insert if self._is_postgres else sqlite_insert
        session.execute(insert(SignerLotRow).values(lot_id=lot_id, signed=0).on_conflict_do_nothing())
        return session.exec(select(SignerLotRow).where(SignerLotRow.lot_id == lot_id).with_for_update()).one()

    def _record_signed(
        self,
        session: Session,
        *,
        request: IssuanceRequest,
        lot_id: int,
        previous: Sequence[SignerIssuanceRow],
        signed: SignedDevice,
        signed_count: int,
        actor: str,
    ) -> IssuanceOutcome:
        now = utc_now()
        superseded: str | None = None
        for old in previous:
            if old.current is None:
                continue
            old.current = None
            old.superseded_at = now
            session.add(old)
            superseded = old.cert_serial
            self._audit_in_session(
                session,
                actor=actor,
                action=CERT_SUPERSEDED_ACTION,
                subject=request.device_id,
                details={
                    "lot": request.lot,
                    "cert_serial": old.cert_serial,
                    "fingerprint_sha256": old.cert_fingerprint_sha256,
                    "hw_serial": old.hw_serial,
                    "station": old.station,
                    "request_id": old.request_id,
                    "deployed": False,
                },
                at=now,
            )
        # The superseded row must leave the unique (device_id, current) slot before the new row takes it.
        session.flush()
        row = SignerIssuanceRow(
            request_id=request.request_id,
            lot_id=lot_id,
            device_id=request.device_id,
            hw_serial=request.hw_serial,
            station=request.station,
            job_id=request.job_id,
            csr_sha256=request.csr_sha256,
            cert_der=signed.cert_der,
            cert_serial=signed.cert_serial,
            cert_fingerprint_sha256=signed.fingerprint_sha256,
            current=1,
            issued_at=now,
        )
        session.add(row)
        counter = session.exec(select(SignerLotRow).where(SignerLotRow.lot_id == lot_id)).one()
        counter.signed = signed_count + 1
        session.add(counter)
        session.flush()
        details: dict[str, object] = {
            "lot": request.lot,
            "hw_serial": request.hw_serial,
            "station": request.station,
            "cert_serial": signed.cert_serial,
            "fingerprint_sha256": signed.fingerprint_sha256,
            "job_id": request.job_id,
            "request_id": request.request_id,
        }
        if signed.genuineness is not None:
            details["genuineness"] = signed.genuineness
        if superseded is not None:
            details["supersedes"] = superseded
        self._audit_in_session(
            session,
            actor=actor,
            action=CERT_ISSUED_ACTION,
            subject=request.device_id,
            details=details,
            at=now,
        )
        return IssuanceOutcome(
            record=_record(row, request.lot),
            replayed=False,
            superseded=superseded,
            signed_in_lot=signed_count + 1,
        )

    def record_refusal(
        self, *, actor: str, station: str, lot: str, device_id: str, code: str, message: str, request_id: str
    ) -> None:
        """Audit a refused request (``signer.refused``), whatever part of it was malformed."""
        subject = device_id if device_id and len(device_id) <= 128 and device_id.isprintable() else station
        self.audit(
            actor=actor,
            action=REFUSED_ACTION,
            subject=subject or "unknown",
            details={
                "station": station,
                "lot": lot[:128],
                "device_id": device_id[:128],
                "code": code,
                "message": message[:REFUSAL_MESSAGE_MAX_CHARS],
                "request_id": request_id[:64],
            },
        )

    def manage_lot(self, lot: str) -> None:
        """Make the lot the signer's (a ``signer_lot`` row): then only its certificates are recorded."""
        insert = pg_insert if self._is_postgres else sqlite_insert
        with self._transaction(write=True) as session:
            lot_row = self._lot_row(session, lot)
            session.execute(insert(SignerLotRow).values(lot_id=lot_row.id, signed=0).on_conflict_do_nothing())

    def signed_count(self, lot: str) -> int:
        """Certificates the signer signed for the lot (superseded ones included): the quota's count."""
        with self._transaction(write=False) as session:
            lot_row = self._lot_row(session, lot)
            counter = session.exec(select(SignerLotRow).where(SignerLotRow.lot_id == lot_row.id)).first()
            return 0 if counter is None else counter.signed

    def issuances(self, lot: str) -> list[IssuanceRecord]:
        """Every certificate the signer signed for the lot, in the order it signed them."""
        with self._transaction(write=False) as session:
            lot_row = self._lot_row(session, lot)
            rows = session.exec(
                select(SignerIssuanceRow)
                .where(SignerIssuanceRow.lot_id == lot_row.id)
                .order_by(col(SignerIssuanceRow.id))
            ).all()
            return [_record(row, lot) for row in rows]


class IssuanceLedger(Ledger, IssuanceBook):
    """The ledger as the signing service opens it: the station's ledger plus checked issuance."""


def open_issuance_ledger(url: str) -> IssuanceLedger:
    """Open (and migrate to head) the ledger at ``url`` as the signer uses it."""
    ledger = IssuanceLedger.open(url)
    if not isinstance(ledger, IssuanceLedger):
        ledger.close()
        raise LedgerError("the ledger opened as the wrong class")
    return ledger
