"""The signer's ledger: issuance only against a station's own reservation, once, in one transaction."""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from factoryd.errors import InputError
from factoryd.ledger import LotProfile, LotState
from factoryd.ledger.issuance import (
    IssuanceLedger,
    IssuanceRefusedError,
    IssuanceRequest,
    ReservedDevice,
    SignedDevice,
    open_issuance_ledger,
)
from factoryd.ledger.testing import throwaway_postgres_database

ACTOR = "signer-1"
STATION = "st-a"
MAX_PER_DEVICE = 3


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this module."""
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IssuanceLedger]:
    """The signer's ledger on each backend."""
    url = (
        f"sqlite:///{tmp_path / 'ledger.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    opened = open_issuance_ledger(url)
    try:
        yield opened
    finally:
        opened.close()


def _lot(ledger: IssuanceLedger, count: int = 6) -> str:
    name = f"lot-{uuid.uuid4().hex[:10]}"
    ledger.create_lot(name, customer="ACME", profile=LotProfile(), target_quantity=count, actor="cli")
    ledger.import_ids(name, "\n".join(str(uuid.uuid4()) for _ in range(count)).encode(), actor="cli")
    ledger.set_lot_state(name, LotState.ACTIVE, actor="cli")
    return name


def _reserve(ledger: IssuanceLedger, lot: str, station: str = STATION) -> tuple[str, str, int]:
    serial = secrets.token_hex(9)
    job = ledger.start_job(lot, station=station, port="1", hw_serial=serial)
    reservation = ledger.reserve(lot, serial, station=station, port="1", job_id=job, actor=station)
    return reservation.device_id, serial, job


def _request(
    lot: str, device_id: str, serial: str, job: int | None, *, station: str = STATION
) -> IssuanceRequest:
    csr = secrets.token_bytes(64)  # the ledger only keeps the CSR's digest
    return IssuanceRequest(
        request_id=uuid.uuid4().hex,
        lot=lot,
        device_id=device_id,
        hw_serial=serial,
        station=station,
        job_id=job,
        csr_sha256=hashlib.sha256(csr).hexdigest(),
    )


class _Signer:
    """A stand-in for the CSR checks and the CA: counts how often it was asked to sign."""

    def __init__(self) -> None:
        self.calls: list[ReservedDevice] = []
        self._lock = threading.Lock()

    def __call__(self, reserved: ReservedDevice) -> SignedDevice:
        with self._lock:
            self.calls.append(reserved)
        der = secrets.token_bytes(300)
        return SignedDevice(
            cert_der=der,
            cert_serial=secrets.token_hex(16),
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        )


def _issue(ledger: IssuanceLedger, request: IssuanceRequest, signer: _Signer, quota: int | None = None):  # type: ignore[no-untyped-def]
    return ledger.issue(request, sign=signer, actor=ACTOR, max_per_device=MAX_PER_DEVICE, quota_max=quota)


def _refused(ledger: IssuanceLedger, request: IssuanceRequest, code: str, quota: int | None = None) -> None:
    signer = _Signer()
    with pytest.raises(IssuanceRefusedError) as refused:
        _issue(ledger, request, signer, quota)
    assert refused.value.code == code, refused.value
    assert not signer.calls, "a refused request must never reach the CA"


def test_a_reserved_id_is_signed_once_and_a_retry_returns_the_same_certificate(
    ledger: IssuanceLedger,
) -> None:
    lot = _lot(ledger)
    device_id, serial, job = _reserve(ledger, lot)
    signer = _Signer()
    request = _request(lot, device_id, serial, job)
    first = _issue(ledger, request, signer)
    assert not first.replayed
    assert first.signed_in_lot == 1
    again = _issue(ledger, request, signer)  # the reply was lost: the station sends the same request
    assert again.replayed
    assert again.record.cert_der == first.record.cert_der
    assert len(signer.calls) == 1
    assert signer.calls[0].device_id == device_id
    assert [r.cert_serial for r in ledger.issuances(lot)] == [first.record.cert_serial]
    # The certificate and its audit entry went in together: the CRL machinery sees it as issued.
    entries = ledger.issued_certificates(lot)
    assert [e.cert_serial for e in entries] == [first.record.cert_serial]
    assert entries[0].hw_serial == serial
    ledger.verify_audit()


def test_requests_outside_the_stations_own_reservation_are_refused(ledger: IssuanceLedger) -> None:
    lot = _lot(ledger)
    device_id, serial, job = _reserve(ledger, lot)
    other_id, other_serial, other_job = _reserve(ledger, lot, station="st-b")
    available = ledger.find_by_serial(lot, serial)
    assert available is not None
    _refused(ledger, _request(lot, "not-on-the-list", serial, job), "unknown_device")
    _refused(ledger, _request(lot, other_id, other_serial, other_job), "wrong_station")
    _refused(ledger, _request(lot, device_id, "ffffffffffffffffff", job), "wrong_serial")
    _refused(ledger, _request(lot, device_id, serial, other_job), "wrong_job")
    _refused(ledger, _request("no-such-lot", device_id, serial, job), "unknown_lot")
    # An ID nobody reserved: the next free one of the list.
    free = next(
        d.device_id
        for d in (ledger.find_device(i) for i in _ids(ledger, lot))
        if d is not None and str(d.state) == "available"
    )
    _refused(ledger, _request(lot, free, serial, job), "not_reserved")
    ledger.finish_job(job, outcome="failed", reason="test")
    _refused(ledger, _request(lot, device_id, serial, job), "job_closed")
    ledger.set_lot_state(lot, LotState.PAUSED, actor="cli")
    _refused(ledger, _request(lot, other_id, other_serial, other_job, station="st-b"), "lot_not_active")
    with pytest.raises(IssuanceRefusedError, match="request_id"):
        _issue(ledger, IssuanceRequest("short", lot, device_id, serial, STATION, job, "0" * 64), _Signer())
    with pytest.raises(InputError):
        _issue(ledger, _request(lot, device_id, "has space", job), _Signer())


def _ids(ledger: IssuanceLedger, lot: str) -> list[str]:
    from sqlmodel import Session, select

    from factoryd.ledger.tables import DeviceRow, LotRow

    with Session(ledger._engine) as session:
        lot_id = session.exec(select(LotRow.id).where(LotRow.name == lot)).one()
        return list(session.exec(select(DeviceRow.device_id).where(DeviceRow.lot_id == lot_id)).all())


def test_a_provisioned_id_gets_no_second_certificate(ledger: IssuanceLedger) -> None:
    lot = _lot(ledger)
    device_id, serial, job = _reserve(ledger, lot)
    issued = _issue(ledger, _request(lot, device_id, serial, job), _Signer()).record
    ledger.mark_provisioned(
        lot,
        device_id,
        serial,
        cert_der=issued.cert_der,
        cert_serial=issued.cert_serial,
        fingerprint_sha256=issued.fingerprint_sha256,
        station=STATION,
        port="1",
        actor=STATION,
        finish_job=job,
    )
    _refused(ledger, _request(lot, device_id, serial, job), "already_provisioned")
    # Same request id with another CSR: refused, not replayed.
    reused = _request(lot, device_id, serial, job)
    reused = IssuanceRequest(issued.request_id, lot, device_id, serial, STATION, job, reused.csr_sha256)
    _refused(ledger, reused, "request_reused")


def test_a_restarted_job_supersedes_its_earlier_certificate_up_to_the_limit(ledger: IssuanceLedger) -> None:
    lot = _lot(ledger)
    device_id, serial, job = _reserve(ledger, lot)
    signer = _Signer()
    first = _issue(ledger, _request(lot, device_id, serial, job), signer)
    # The job restarts (power cycle): same reservation, the board made a new key, a new CSR.
    job2 = ledger.start_job(lot, station=STATION, port="1", hw_serial=serial)
    ledger.finish_job(job, outcome="failed", reason="restart")
    ledger.reserve(lot, serial, station=STATION, port="1", job_id=job2, actor=STATION)
    second = _issue(ledger, _request(lot, device_id, serial, job2), signer)
    assert second.superseded == first.record.cert_serial
    records = ledger.issuances(lot)
    assert [(r.cert_serial, r.current) for r in records] == [
        (first.record.cert_serial, False),
        (second.record.cert_serial, True),
    ]
    assert records[0].superseded_at is not None
    third = _issue(ledger, _request(lot, device_id, serial, job2), signer)
    assert third.superseded == second.record.cert_serial
    _refused(ledger, _request(lot, device_id, serial, job2), "reissue_limit")
    assert signer.calls[1].signed_before == 1
    ledger.verify_audit()


def test_the_quota_stops_issuance_at_exactly_n(ledger: IssuanceLedger) -> None:
    quota = 3
    lot = _lot(ledger, count=quota + 2)
    signer = _Signer()
    for _ in range(quota):
        device_id, serial, job = _reserve(ledger, lot)
        outcome = _issue(ledger, _request(lot, device_id, serial, job), signer, quota)
    assert outcome.signed_in_lot == quota
    device_id, serial, job = _reserve(ledger, lot)
    _refused(ledger, _request(lot, device_id, serial, job), "quota_exhausted", quota)
    assert ledger.signed_count(lot) == quota


@pytest.mark.postgres
def test_concurrent_requests_never_pass_the_quota(pg_url: str) -> None:
    """Eight threads, each its own connection, race for a quota of five: exactly five certificates."""
    quota, threads = 5, 8
    ledger = open_issuance_ledger(pg_url)
    try:
        lot = _lot(ledger, count=threads)
        requests = [_request(lot, *_reserve(ledger, lot)) for _ in range(threads)]
    finally:
        ledger.close()
    signer = _Signer()
    results: list[str] = []
    barrier = threading.Barrier(threads)

    def ask(request: IssuanceRequest) -> None:
        own = open_issuance_ledger(pg_url)
        try:
            barrier.wait()
            try:
                _issue(own, request, signer, quota)
                results.append("issued")
            except IssuanceRefusedError as exc:
                results.append(exc.code)
        finally:
            own.close()

    workers = [threading.Thread(target=ask, args=(r,)) for r in requests]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(results) == ["issued"] * quota + ["quota_exhausted"] * (threads - quota)
    check = open_issuance_ledger(pg_url)
    try:
        assert check.signed_count(lot) == quota
        check.verify_audit()
    finally:
        check.close()


def test_refusals_are_audited(ledger: IssuanceLedger) -> None:
    lot = _lot(ledger)
    ledger.record_refusal(
        actor=ACTOR,
        station="st-x",
        lot=lot,
        device_id="dev-1",
        code="wrong_station",
        message="m",
        request_id="r",
    )
    from sqlmodel import Session, select

    from factoryd.ledger.tables import AuditEntryRow

    with Session(ledger._engine) as session:
        rows = session.exec(select(AuditEntryRow).where(AuditEntryRow.action == "signer.refused")).all()
    assert any('"code":"wrong_station"' in row.details and row.subject == "dev-1" for row in rows)


def test_migration_0007_follows_0006_and_matches_the_model(ledger: IssuanceLedger) -> None:
    from typing import Any

    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import MetaData
    from sqlmodel import SQLModel

    from factoryd.ledger.migrate import alembic_config
    from factoryd.ledger.tables import SignerIssuanceRow, SignerLotRow

    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_revision("0007_signer").down_revision == "0006_labels"
    metadata = MetaData()
    mine = (SignerIssuanceRow.__tablename__, SignerLotRow.__tablename__)
    for name in ("lot", *mine):
        SQLModel.metadata.tables[name].to_metadata(metadata)

    def only_issuance(_obj: Any, name: str | None, kind: str, _reflected: bool, _compare_to: Any) -> bool:
        return kind != "table" or name in mine

    with ledger._engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_object": only_issuance})
        assert compare_metadata(context, metadata) == []
