"""The device-ID state machine: available → reserved(hw_serial) → provisioned, or void(reason).

A reservation binds an ID to a board's secure-element serial before anything is written to the
board, so a retry, a crash or a re-inserted board resumes with the same ID; a provisioned ID
records the certificate the board carries; a void ID is out of use for good. Also here: what
the ledger knows about each ID (records, counts, the provisioned devices of a lot).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import datetime

from factoryd.errors import (
    IdsExhaustedError,
    InputError,
    LedgerError,
    LotNotFoundError,
    LotStateError,
    ReservationConflictError,
)
from factoryd.ledger.audit import as_utc, canonical_json, link_hash, link_hash_prefix
from factoryd.ledger.engine import _PendingLink, require_label, require_serial, utc_now
from factoryd.ledger.errors import DeviceNotFoundError, DeviceStateError
from factoryd.ledger.hot import DeviceRowView, HeadRow, LotDeviceRow, Query, Tx
from factoryd.ledger.jobs import JobBook
from factoryd.ledger.model import (
    DeviceRecord,
    DeviceState,
    LotProgress,
    LotState,
    ProvisionedDevice,
    Reservation,
)

# Concurrent reservations of the same serial on PostgreSQL lose a unique-index race at most once
# per competitor; a few rounds always settle it.
RESERVE_RACE_RETRIES = 5
# What a job that ends in mark_provisioned(..., finish_job=...) is closed with.
PROVISIONED_JOB_OUTCOME = "provisioned"
_HEX = re.compile(r"[0-9a-f]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Certificate serials are at most 20 octets (RFC 5280 4.1.2.2); the column holds 64 hex digits.
CERT_SERIAL_MAX_HEX_DIGITS = 64


class _SerialRaceError(Exception):
    """Another transaction bound the same serial first (PostgreSQL); retry the reservation."""


def _reservation(row: DeviceRowView, hw_serial: str, *, resumed: bool) -> Reservation:
    return Reservation(
        device_id=row.device_id,
        hw_serial=hw_serial,
        resumed=resumed,
        state=DeviceState(row.state),
        metadata=dict(row.metadata),
    )


def _record(row: DeviceRowView, lot: str) -> DeviceRecord:
    return DeviceRecord(
        device_id=row.device_id,
        lot=lot,
        state=DeviceState(row.state),
        metadata=dict(row.metadata),
        hw_serial=row.hw_serial,
        station=row.station,
        port=row.port,
        job_id=row.job_id,
        reserved_at=None if row.reserved_at is None else as_utc(row.reserved_at),
        provisioned_at=None if row.provisioned_at is None else as_utc(row.provisioned_at),
        cert_der=row.cert_der,
        cert_serial=row.cert_serial,
        fingerprint_sha256=row.cert_fingerprint_sha256,
        void_reason=row.void_reason,
    )


def _provisioned(row: DeviceRowView, lot: str) -> ProvisionedDevice:
    """The record of a provisioned row; LedgerError if the row lacks what provisioning wrote."""
    if (
        row.hw_serial is None
        or row.station is None
        or row.port is None
        or row.provisioned_at is None
        or row.cert_der is None
        or row.cert_serial is None
        or row.cert_fingerprint_sha256 is None
    ):
        raise LedgerError(f"ID {row.device_id!r} in lot {lot!r} is provisioned but its record is incomplete")
    return ProvisionedDevice(
        device_id=row.device_id,
        lot=lot,
        hw_serial=row.hw_serial,
        cert_der=row.cert_der,
        cert_serial=row.cert_serial,
        fingerprint_sha256=row.cert_fingerprint_sha256,
        provisioned_at=as_utc(row.provisioned_at),
        station=row.station,
        port=row.port,
        metadata=dict(row.metadata),
    )


def _device_now(tx: Tx, query: Query[LotDeviceRow], params: dict[str, object]) -> DeviceRowView | None:
    """The device row a lot + device lookup finds now (reading back a write whose reply was lost)."""
    found = tx.first(query, params)
    return None if found is None else found.device


class DeviceBook(JobBook):
    """Reservations, provisioning and voids of device IDs, and what the ledger knows of each."""

    def reserve(
        self,
        lot: str,
        hw_serial: str,
        *,
        station: str,
        port: str,
        job_id: int | None,
        actor: str,
        device_id: str | None = None,
    ) -> Reservation:
        """Bind an ID (the next available, or exactly ``device_id``) to a board's serial, or return its own.

        A serial that already holds an ID gets it back (``resumed``); with ``device_id`` set, an ID
        absent from the lot, reserved or provisioned to another serial, or void is a ReservationConflictError.
        """
        require_serial(hw_serial)
        require_label(station, "station")
        require_label(port, "port")
        for _ in range(RESERVE_RACE_RETRIES):
            try:
                return self._reserve_once(
                    lot,
                    hw_serial,
                    station=station,
                    port=port,
                    job_id=job_id,
                    actor=actor,
                    device_id=device_id,
                )
            except _SerialRaceError:
                continue
        raise ReservationConflictError(
            f"serial {hw_serial!r} kept colliding with concurrent reservations in lot {lot!r}"
        )

    def _reserve_once(
        self,
        lot: str,
        hw_serial: str,
        *,
        station: str,
        port: str,
        job_id: int | None,
        actor: str,
        device_id: str | None,
    ) -> Reservation:
        def race(_exc: Exception) -> Exception:
            return _SerialRaceError()

        now = utc_now()
        reserved = {
            "b_hw_serial": hw_serial,
            "b_station": station,
            "b_port": port,
            "b_job_id": job_id,
            "b_at": now,
        }
        if device_id is None:
            at_once = self._reserve_at_once(
                lot, hw_serial, station=station, port=port, job_id=job_id, actor=actor, now=now, race=race
            )
            if at_once is not None:
                return at_once
        with self._hot(write=True, on_integrity=race) as tx:
            reserve_next = self._sql.reserve_next if device_id is None else None
            claimed: DeviceRowView | None = None
            if reserve_next is not None:
                # PostgreSQL: the lot check, the serial's own row and the claim in one round trip.
                found = tx.first(
                    reserve_next, {"name": lot, "hw_serial": hw_serial, "chain": actor, **reserved}
                )
                if found is None:
                    raise LotNotFoundError(f"no lot named {lot!r}")
                tx.xid = found.xid
                if found.head is not None:
                    self._head_hints[actor] = found.head  # locked by this transaction: the append's head
                lot_id, lot_state, existing = found.lot_id, LotState(found.lot_state), found.existing
                claimed = found.claimed
            else:
                lot_id, lot_state, existing = self._lot_and_device(
                    tx, self._sql.lot_device_by_serial, lot, {"name": lot, "hw_serial": hw_serial}
                )
            if lot_state is not LotState.ACTIVE:
                raise LotStateError(f"lot {lot!r} is {lot_state}; reservations need an active lot")
            if existing is not None:
                if device_id is not None and existing.device_id != device_id:
                    raise ReservationConflictError(
                        f"serial {hw_serial!r} already holds ID {existing.device_id!r} in lot {lot!r}, "
                        f"not {device_id!r}"
                    )
                return self._resume(
                    tx, existing, lot, hw_serial, station=station, port=port, job_id=job_id, actor=actor
                )
            # A concurrent reservation of the same serial fails in the UPDATE (unique index), before auditing.
            if device_id is None:
                row = (
                    claimed
                    if reserve_next is not None
                    else tx.first(self._sql.claim, {"lot_id": lot_id, **reserved})
                )
                if row is None:
                    raise IdsExhaustedError(f"lot {lot!r} has no available IDs left")
            else:
                row = self._chosen_row(tx, lot_id, lot, device_id)
                if self._is_postgres:
                    # The head before the serial is bound, as every reservation takes them (hot.py
                    # ``_reserve_next_statement``).
                    self._lock_head(tx, actor)
                tx.execute(self._sql.reserve, {"row_id": row.id, **reserved})
            self._append_audit(
                tx,
                actor=actor,
                action="id.reserved",
                subject=row.device_id,
                details={
                    "lot": lot,
                    "hw_serial": hw_serial,
                    "station": station,
                    "port": port,
                    "job_id": job_id,
                },
                at=now,
            )
            return Reservation(
                device_id=row.device_id,
                hw_serial=hw_serial,
                resumed=False,
                state=DeviceState.RESERVED,
                metadata=dict(row.metadata),
            )

    def _reserve_at_once(
        self,
        lot: str,
        hw_serial: str,
        *,
        station: str,
        port: str,
        job_id: int | None,
        actor: str,
        now: datetime,
        race: Callable[[Exception], Exception],
    ) -> Reservation | None:
        """PostgreSQL: a fresh reservation and its audit link in one round trip (hot.py
        ``_reserve_and_append_statement``), when the actor's chain head is remembered.

        None: nothing was written (the serial already holds an ID, the remembered head moved, the
        clock stepped back) and the transactional path decides, as it always did.
        """
        query = self._sql.reserve_and_append
        head = self._head_hints.get(actor)
        if query is None or head is None or self._clock_stepped(now):
            return None
        require_label(actor, "actor")
        details = {"lot": lot, "hw_serial": hw_serial, "station": station, "port": port, "job_id": job_id}
        details_json = canonical_json(details)
        seq, action = head.seq + 1, "id.reserved"
        prefix = link_hash_prefix(
            seq=seq, at=now, actor=actor, action=action, details_json=details_json, prev_hash=head.hash
        )
        params = {
            "name": lot,
            "hw_serial": hw_serial,
            "b_hw_serial": hw_serial,
            "b_station": station,
            "b_port": port,
            "b_job_id": job_id,
            "b_at": now,
            "chain": actor,
            "old_seq": head.seq,
            "old_hash": head.hash,
            "b_seq": seq,
            "b_prefix": prefix,
            "b_actor": actor,
            "b_details": details_json,
        }

        def landed(tx: Tx) -> Reservation | None:
            # The lost statement's own reservation: this serial, here, at exactly this moment.
            row = _device_now(tx, self._sql.lot_device_by_serial, {"name": lot, "hw_serial": hw_serial})
            if row is None or row.state != DeviceState.RESERVED or row.reserved_at != now:
                return None
            if (row.station, row.port, row.job_id) != (station, port, job_id):
                return None
            return _reservation(row, hw_serial, resumed=False)

        outcome = self._hot_statement(query, params, landed=landed, chain=actor, at=now, on_integrity=race)
        found, read_back = outcome
        if read_back is not None:
            return read_back
        if found is None:
            raise LotNotFoundError(f"no lot named {lot!r}")
        lot_state = LotState(found.lot_state)
        if lot_state is not LotState.ACTIVE:
            raise LotStateError(f"lot {lot!r} is {lot_state}; reservations need an active lot")
        claimed = found.claimed
        if claimed is None:
            if found.existing is not None:
                return None  # the serial holds an ID: resumed (or refused) by the transactional path
            if not found.head_current:
                self._head_hints.pop(actor, None)
                return None
            raise IdsExhaustedError(f"lot {lot!r} has no available IDs left")
        expected = link_hash(
            seq=seq,
            at=now,
            actor=actor,
            action=action,
            subject=claimed.device_id,
            details_json=details_json,
            prev_hash=head.hash,
        )
        if found.link_hash != expected:
            self._head_hints.pop(actor, None)
            raise LedgerError(
                f"audit chain {actor!r} seq {seq}: the server hashed the reservation of "
                f"{claimed.device_id!r} as {found.link_hash}, not {expected} (the chain breaks there)"
            )
        self._head_hints[actor] = HeadRow(seq, expected)
        self._last_audit_at = now
        return _reservation(claimed, hw_serial, resumed=False)

    def _chosen_row(self, tx: Tx, lot_id: int, lot: str, device_id: str) -> DeviceRowView:
        """The available row of exactly ``device_id``, locked; ReservationConflictError otherwise."""
        # Locked FOR UPDATE: a second serial wanting the same ID waits here, then sees it reserved.
        row = tx.first(self._sql.device_by_id_locked, {"lot_id": lot_id, "device_id": device_id})
        if row is None:
            raise ReservationConflictError(f"ID {device_id!r} is not on the list of lot {lot!r}")
        if row.state != DeviceState.AVAILABLE:
            holder = f" for serial {row.hw_serial!r}" if row.hw_serial else ""
            raise ReservationConflictError(f"ID {device_id!r} in lot {lot!r} is {row.state}{holder}")
        return row

    def _resume(
        self,
        tx: Tx,
        row: DeviceRowView,
        lot: str,
        hw_serial: str,
        *,
        station: str,
        port: str,
        job_id: int | None,
        actor: str,
    ) -> Reservation:
        """The ID ``hw_serial`` already holds (``row``), its reservation moved to this job."""
        state = DeviceState(row.state)
        if state is DeviceState.VOID:
            raise ReservationConflictError(
                f"serial {hw_serial!r} held ID {row.device_id!r} in lot {lot!r}, which was voided "
                f"({row.void_reason}); this board gets no other ID"
            )
        if state is DeviceState.RESERVED:
            if row.job_id is not None and row.job_id != job_id and (row.station, row.port) != (station, port):
                holder = tx.first(self._sql.job_open, {"job_id": row.job_id})
                if holder is not None and holder.finished_at is None:
                    # Two boards with one serial at once (a clone), or a board moved while its job
                    # still runs elsewhere: never hand the same ID to a second live job.
                    raise ReservationConflictError(
                        f"serial {hw_serial!r} is being provisioned right now by job {row.job_id} on "
                        f"station {holder.station!r} port {holder.port!r}; a cloned board, or one moved "
                        "while its job runs (finish or abandon that job first)"
                    )
            moved = {"station": row.station, "port": row.port, "job_id": row.job_id}
            tx.execute(
                self._sql.move_reservation,
                {"row_id": row.id, "b_station": station, "b_port": port, "b_job_id": job_id},
            )
            self._append_audit(
                tx,
                actor=actor,
                action="id.resumed",
                subject=row.device_id,
                details={
                    "lot": lot,
                    "hw_serial": hw_serial,
                    "station": station,
                    "port": port,
                    "job_id": job_id,
                    "previous": moved,
                },
                at=utc_now(),
            )
        return _reservation(row, hw_serial, resumed=True)

    def _lot_and_device(
        self, tx: Tx, query: Query[LotDeviceRow], lot: str, params: dict[str, object]
    ) -> tuple[int, LotState, DeviceRowView | None]:
        """The lot's id and state (share-locked) and the device ``query`` matches (locked), in one round trip.

        The row also carries the PostgreSQL transaction id, noted on ``tx`` for the lost-COMMIT read-back.
        """
        found = tx.first(query, params)
        if found is None:
            raise LotNotFoundError(f"no lot named {lot!r}")
        if found.xid is not None:
            tx.xid = found.xid
        return found.lot_id, LotState(found.lot_state), found.device

    def _device_row(self, tx: Tx, lot_id: int, lot: str, device_id: str) -> DeviceRowView:
        """The ID's row, locked for the transaction; DeviceNotFoundError if the lot has no such ID."""
        row = tx.first(self._sql.device_by_id_locked, {"lot_id": lot_id, "device_id": device_id})
        if row is None:
            raise DeviceNotFoundError(f"no ID {device_id!r} in lot {lot!r}")
        return row

    def mark_provisioned(
        self,
        lot: str,
        device_id: str,
        hw_serial: str,
        *,
        cert_der: bytes,
        cert_serial: str,
        fingerprint_sha256: str,
        station: str,
        port: str,
        actor: str,
        finish_job: int | None = None,
    ) -> None:
        """Record that the board holding this reservation now carries its verified certificate.

        With ``finish_job``, that job is closed as ``provisioned`` in the same transaction.
        """
        require_serial(hw_serial)
        fingerprint = fingerprint_sha256.lower()
        serial_hex = cert_serial.lower().replace(":", "")
        if not cert_der:
            raise InputError("cert_der is empty")
        if not _SHA256_HEX.fullmatch(fingerprint) or hashlib.sha256(cert_der).hexdigest() != fingerprint:
            raise InputError("fingerprint_sha256 is not the SHA-256 of cert_der")
        if not _HEX.fullmatch(serial_hex) or len(serial_hex) > CERT_SERIAL_MAX_HEX_DIGITS:
            raise InputError(f"cert_serial must be hex, got {cert_serial!r}")
        now = utc_now()
        provision = {
            "b_cert_der": cert_der,
            "b_cert_serial": serial_hex,
            "b_fingerprint": fingerprint,
            "b_provisioned_at": now,
            "b_station": station,
            "b_port": port,
        }
        details: dict[str, object] = {
            "lot": lot,
            "hw_serial": hw_serial,
            "station": station,
            "port": port,
            "cert_serial": serial_hex,
            "fingerprint_sha256": fingerprint,
        }
        if self._provision_at_once(
            lot, device_id, hw_serial, provision, details, actor=actor, finish_job=finish_job, now=now
        ):
            return
        with self._hot(write=True) as tx:
            _lot_id, lot_state, found = self._lot_and_device(
                tx, self._sql.lot_device_by_id, lot, {"name": lot, "device_id": device_id}
            )
            if lot_state not in (LotState.ACTIVE, LotState.PAUSED):
                raise LotStateError(f"lot {lot!r} is {lot_state}; it records no more devices")
            if found is None:
                raise DeviceNotFoundError(f"no ID {device_id!r} in lot {lot!r}")
            row = found
            if (
                row.state == DeviceState.PROVISIONED
                and row.hw_serial == hw_serial
                and row.cert_fingerprint_sha256 == fingerprint
            ):
                # A retry after a commit whose reply was lost: already recorded (and the job
                # closed with it, if it was asked to be).
                if finish_job is not None:
                    self._finish_job(
                        tx,
                        finish_job,
                        outcome=PROVISIONED_JOB_OUTCOME,
                        reason=None,
                        at=now,
                        retry=True,
                    )
                return
            if row.state != DeviceState.RESERVED or row.hw_serial != hw_serial:
                raise ReservationConflictError(
                    f"ID {device_id!r} in lot {lot!r} is {row.state}"
                    f"{f' for serial {row.hw_serial!r}' if row.hw_serial else ''}, "
                    f"not reserved to serial {hw_serial!r}"
                )
            updated = self._change_with_audit(
                tx,
                self._sql.provision,
                self._sql.provision_and_append,
                {"row_id": row.id, **provision},
                actor=actor,
                action="id.provisioned",
                subject=device_id,
                details=details,
                at=now,
            )
            if updated != 1:
                # The row is locked and reserved to this serial: only the signer guard of the
                # UPDATE (hot.py ``_signer_allows``) leaves it untouched. Nothing was written.
                raise DeviceStateError(
                    f"ID {device_id!r} in lot {lot!r}: certificate {fingerprint} is not the one the line's "
                    "signer signed and stands for this ID; a lot the signer manages records no other"
                )
            if finish_job is not None:
                self._finish_job(tx, finish_job, outcome=PROVISIONED_JOB_OUTCOME, reason=None, at=now)

    def _provision_at_once(
        self,
        lot: str,
        device_id: str,
        hw_serial: str,
        provision: dict[str, object],
        details: dict[str, object],
        *,
        actor: str,
        finish_job: int | None,
        now: datetime,
    ) -> bool:
        """PostgreSQL: the provision, its audit link and the job's close in one round trip (hot.py
        ``_provision_at_once_statement``), when the actor's chain head is remembered.

        False: nothing was written (a retry of a recorded provision, a conflict, the signer's refusal,
        a moved head, a closed job…) and the transactional path decides and says what it is.
        """
        query = self._sql.provision_at_once if finish_job is None else self._sql.provision_at_once_finishing
        head = self._head_hints.get(actor)
        if query is None or head is None or self._clock_stepped(now):
            return False
        require_label(actor, "actor")
        link = _PendingLink(now, actor, "id.provisioned", device_id, canonical_json(details))
        link_params, new_head = self._link_params(link, head)
        params = {
            **link_params,
            **provision,
            "name": lot,
            "device_id": device_id,
            "hw_serial": hw_serial,
            "job_id": finish_job,
            "b_outcome": PROVISIONED_JOB_OUTCOME,
        }

        def landed(tx: Tx) -> bool | None:
            # The lost statement's own provision: this certificate, recorded at exactly this moment.
            row = _device_now(tx, self._sql.lot_device_by_id, {"name": lot, "device_id": device_id})
            if row is None or row.state != DeviceState.PROVISIONED or row.provisioned_at != now:
                return None
            if (row.hw_serial, row.cert_fingerprint_sha256) != (hw_serial, provision["b_fingerprint"]):
                return None
            return True

        outcome = self._hot_statement(query, params, landed=landed, chain=actor, at=now)
        done, read_back = outcome
        if read_back is not None:
            return True
        if done is None or done.changed == 0:
            if done is not None and not done.head_current:
                self._head_hints.pop(actor, None)
            return False
        if done.appended != 1 or (finish_job is not None and done.finished != 1):
            self._head_hints.pop(actor, None)
            raise LedgerError(
                f"ID {device_id!r} in lot {lot!r}: provisioned in one statement without its audit link "
                f"or its job's close ({done}); the head was locked and current, so this is a ledger bug"
            )
        self._head_hints[actor] = new_head
        self._last_audit_at = now
        return True

    def void(self, lot: str, device_id: str, reason: str, *, actor: str) -> None:
        """Take an ID out of use for good, keeping its serial binding and certificate on record."""
        if not reason.strip():
            raise InputError("voiding an ID needs a reason")
        now = utc_now()
        with self._hot(write=True) as tx:
            lot_id, lot_state = self._lot_shared(tx, lot)
            if lot_state is LotState.CLOSED:
                raise LotStateError(f"lot {lot!r} is closed; its IDs can no longer change")
            row = self._device_row(tx, lot_id, lot, device_id)
            previous = DeviceState(row.state)
            if previous is DeviceState.VOID:
                raise DeviceStateError(f"ID {device_id!r} in lot {lot!r} is already void ({row.void_reason})")
            tx.execute(self._sql.void, {"row_id": row.id, "b_reason": reason})
            self._append_audit(
                tx,
                actor=actor,
                action="id.voided",
                subject=device_id,
                details={
                    "lot": lot,
                    "previous_state": previous.value,
                    "hw_serial": row.hw_serial,
                    "reason": reason,
                },
                at=now,
            )

    # -- queries ----------------------------------------------------------------------------

    def find_by_serial(self, lot: str, hw_serial: str) -> DeviceRecord | None:
        """The ID a serial holds in a lot, whatever its state, or None."""
        with self._hot(write=False) as tx:
            lot_id = self._lot_id(tx, lot)
            row = tx.first(self._sql.device_by_serial, {"lot_id": lot_id, "hw_serial": hw_serial})
            return None if row is None else _record(row, lot)

    def find_device(self, device_id: str) -> DeviceRecord | None:
        """An ID in any lot (IDs are unique across lots), or None."""
        with self._hot(write=False) as tx:
            found = tx.first(self._sql.device_any_lot, {"device_id": device_id})
            return None if found is None else _record(found.device, found.lot_name)

    def progress(self, lot: str) -> LotProgress:
        """How many IDs of the lot are available, reserved, provisioned and void."""
        with self._hot(write=False) as tx:
            lot_id = self._lot_id(tx, lot)
            grouped = tx.all(self._sql.count_by_state, {"lot_id": lot_id})
        counts: dict[DeviceState, int] = dict.fromkeys(DeviceState, 0)
        for row in grouped:
            counts[DeviceState(row.state)] = row.ids
        return LotProgress(
            total=sum(counts.values()),
            available=counts[DeviceState.AVAILABLE],
            reserved=counts[DeviceState.RESERVED],
            provisioned=counts[DeviceState.PROVISIONED],
            void=counts[DeviceState.VOID],
        )

    def provisioned_devices(self, lot: str) -> list[ProvisionedDevice]:
        """Every provisioned device of the lot in the order they were made (for the manifest)."""
        with self._hot(write=False) as tx:
            lot_id = self._lot_id(tx, lot)
            rows = tx.all(self._sql.provisioned_in_lot, {"lot_id": lot_id})
        return [_provisioned(row, lot) for row in rows]
