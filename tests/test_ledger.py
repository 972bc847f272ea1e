"""Ledger core: lot state machine, reservations keyed by serial, provisioning, voids, jobs."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from factoryd.errors import (
    IdsExhaustedError,
    InputError,
    LotNotFoundError,
    LotStateError,
    ReservationConflictError,
)
from factoryd.ledger import (
    DeviceNotFoundError,
    DeviceState,
    DeviceStateError,
    JobNotFoundError,
    Ledger,
    LotExistsError,
    LotProfile,
    LotState,
)
from factoryd.ledger.testing import throwaway_postgres_database

ACTOR = "test"
CERT_DER = b"\x30\x03\x02\x01\x07"
CERT_FP = hashlib.sha256(CERT_DER).hexdigest()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this module's tests."""
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """An open ledger on a fresh SQLite file, or on the module's PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    with Ledger.open(url) as opened:
        yield opened


def new_ids(count: int) -> list[str]:
    """Fresh canonical UUIDs."""
    return [str(uuid.uuid4()) for _ in range(count)]


def make_lot(ledger: Ledger, ids: list[str], *, state: LotState = LotState.ACTIVE) -> str:
    """A lot with the given IDs, moved to ``state``."""
    name = f"lot-{uuid.uuid4().hex[:10]}"
    ledger.create_lot(
        name, customer="ACME", profile=LotProfile(), target_quantity=len(ids) or None, actor=ACTOR
    )
    if ids:
        ledger.import_ids(name, "\n".join(ids).encode(), fmt="txt", actor=ACTOR)
    if state is not LotState.DRAFT:
        ledger.set_lot_state(name, LotState.ACTIVE, actor=ACTOR)
    if state in (LotState.PAUSED, LotState.CLOSED):
        ledger.set_lot_state(name, state, actor=ACTOR)
    return name


def reserve(ledger: Ledger, lot: str, serial: str, port: str = "1") -> tuple[str, bool, DeviceState]:
    """Reserve and return (device_id, resumed, state)."""
    r = ledger.reserve(lot, serial, station="st1", port=port, job_id=None, actor=ACTOR)
    assert r.hw_serial == serial
    return r.device_id, r.resumed, r.state


def provision(
    ledger: Ledger, lot: str, device_id: str, serial: str, *, finish_job: int | None = None
) -> None:
    """Mark a reserved ID provisioned with the fixed test certificate (and close ``finish_job``)."""
    ledger.mark_provisioned(
        lot,
        device_id,
        serial,
        cert_der=CERT_DER,
        cert_serial="0A:1B",
        fingerprint_sha256=CERT_FP,
        station="st1",
        port="1",
        actor=ACTOR,
        finish_job=finish_job,
    )


# -- lots ---------------------------------------------------------------------------------------


def test_lot_is_created_as_draft_with_its_profile(ledger: Ledger) -> None:
    profile = LotProfile(protocol="arduino-v1", id_format="regex:[A-Z]{3}[0-9]{5}", lock=True, max_attempts=5)
    info = ledger.create_lot("order-4711", customer="ACME", profile=profile, target_quantity=100, actor=ACTOR)
    assert info.state is LotState.DRAFT
    again = ledger.get_lot("order-4711")
    assert again == info
    assert again.profile == profile
    assert again.created_at.tzinfo is not None
    assert "order-4711" in [lot.name for lot in ledger.list_lots()]


def test_lot_names_are_unique_and_validated(ledger: Ledger) -> None:
    name = make_lot(ledger, [], state=LotState.DRAFT)
    with pytest.raises(LotExistsError, match="already exists"):
        ledger.create_lot(name, customer="B", profile=LotProfile(), target_quantity=None, actor=ACTOR)
    with pytest.raises(InputError, match="lot name"):
        ledger.create_lot("bad/name", customer="B", profile=LotProfile(), target_quantity=None, actor=ACTOR)
    with pytest.raises(LotNotFoundError, match="no lot named 'missing'"):
        ledger.get_lot("missing")


def test_lot_state_machine_allows_only_the_documented_transitions(ledger: Ledger) -> None:
    lot = make_lot(ledger, [], state=LotState.DRAFT)
    with pytest.raises(LotStateError, match="cannot go from draft to paused"):
        ledger.set_lot_state(lot, LotState.PAUSED, actor=ACTOR)
    assert ledger.set_lot_state(lot, LotState.ACTIVE, actor=ACTOR).state is LotState.ACTIVE
    assert ledger.set_lot_state(lot, LotState.PAUSED, actor=ACTOR).state is LotState.PAUSED
    assert ledger.set_lot_state(lot, LotState.ACTIVE, actor=ACTOR).state is LotState.ACTIVE
    with pytest.raises(LotStateError, match="cannot go from active to draft"):
        ledger.set_lot_state(lot, LotState.DRAFT, actor=ACTOR)
    assert ledger.set_lot_state(lot, LotState.CLOSED, actor=ACTOR).state is LotState.CLOSED
    for state in LotState:
        with pytest.raises(LotStateError, match="it is final"):
            ledger.set_lot_state(lot, state, actor=ACTOR)
    assert ledger.get_lot(lot).state is LotState.CLOSED


def test_profile_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="id_format"):
        LotProfile(id_format="serial")
    with pytest.raises(ValueError, match="does not compile"):
        LotProfile(id_format="regex:[")
    with pytest.raises(ValueError, match="firmware_sha256"):
        LotProfile(firmware_sha256="abc")


# -- reservations -------------------------------------------------------------------------------


def test_reserve_hands_out_ids_in_list_order_and_resumes_by_serial(ledger: Ledger) -> None:
    ids = new_ids(3)
    lot = make_lot(ledger, ids)
    first, resumed, state = reserve(ledger, lot, "se-0001")
    assert (first, resumed, state) == (ids[0], False, DeviceState.RESERVED)
    # A retried / re-inserted board (even on another port) gets the same ID back.
    assert reserve(ledger, lot, "se-0001", port="7") == (ids[0], True, DeviceState.RESERVED)
    assert ledger.find_by_serial(lot, "se-0001") is not None
    record = ledger.find_device(ids[0])
    assert record is not None
    assert (record.state, record.hw_serial, record.port, record.lot) == (
        DeviceState.RESERVED,
        "se-0001",
        "7",
        lot,
    )
    assert reserve(ledger, lot, "se-0002")[0] == ids[1]
    progress = ledger.progress(lot)
    assert (progress.total, progress.available, progress.reserved) == (3, 1, 2)


def test_one_serial_never_holds_two_ids_and_an_id_is_never_on_two_boards(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(5))
    got = {serial: reserve(ledger, lot, serial)[0] for serial in ("a1", "b2", "c3", "a1", "b2")}
    assert len(got) == 3
    assert len(set(got.values())) == 3
    assert ledger.progress(lot).reserved == 3


def test_exhausted_lot_raises_and_still_resumes_known_serials(ledger: Ledger) -> None:
    ids = new_ids(2)
    lot = make_lot(ledger, ids)
    reserve(ledger, lot, "s1")
    reserve(ledger, lot, "s2")
    with pytest.raises(IdsExhaustedError, match="no available IDs left"):
        reserve(ledger, lot, "s3")
    assert reserve(ledger, lot, "s2") == (ids[1], True, DeviceState.RESERVED)
    assert ledger.find_by_serial(lot, "s3") is None


@pytest.mark.parametrize("state", [LotState.DRAFT, LotState.PAUSED, LotState.CLOSED])
def test_reserve_needs_an_active_lot(ledger: Ledger, state: LotState) -> None:
    lot = make_lot(ledger, new_ids(1), state=state)
    with pytest.raises(LotStateError, match=f"is {state}; reservations need an active lot"):
        reserve(ledger, lot, "s1")
    assert ledger.progress(lot).reserved == 0


def test_provisioned_board_asking_again_gets_its_record_back(ledger: Ledger) -> None:
    ids = new_ids(2)
    lot = make_lot(ledger, ids)
    device_id, _, _ = reserve(ledger, lot, "se-9")
    provision(ledger, lot, device_id, "se-9")
    assert reserve(ledger, lot, "se-9") == (device_id, True, DeviceState.PROVISIONED)
    records = ledger.provisioned_devices(lot)
    assert [r.device_id for r in records] == [device_id]
    assert records[0].cert_der == CERT_DER
    assert records[0].cert_serial == "0a1b"
    assert records[0].fingerprint_sha256 == CERT_FP
    assert records[0].provisioned_at is not None
    assert ledger.progress(lot).provisioned == 1


def test_mark_provisioned_checks_the_reservation(ledger: Ledger) -> None:
    ids = new_ids(3)
    lot = make_lot(ledger, ids)
    device_id, _, _ = reserve(ledger, lot, "owner")
    with pytest.raises(ReservationConflictError, match="not reserved to serial 'intruder'"):
        provision(ledger, lot, device_id, "intruder")
    with pytest.raises(ReservationConflictError, match="is available"):
        provision(ledger, lot, ids[2], "owner")
    with pytest.raises(DeviceNotFoundError):
        provision(ledger, lot, str(uuid.uuid4()), "owner")
    with pytest.raises(InputError, match="fingerprint"):
        ledger.mark_provisioned(
            lot,
            device_id,
            "owner",
            cert_der=CERT_DER,
            cert_serial="01",
            fingerprint_sha256="00" * 32,
            station="s",
            port="1",
            actor=ACTOR,
        )
    provision(ledger, lot, device_id, "owner")
    provision(ledger, lot, device_id, "owner")  # a retry after a lost reply is a no-op
    assert ledger.progress(lot).provisioned == 1


def test_paused_lot_still_records_boards_in_flight(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(1))
    device_id, _, _ = reserve(ledger, lot, "se-1")
    ledger.set_lot_state(lot, LotState.PAUSED, actor=ACTOR)
    provision(ledger, lot, device_id, "se-1")
    assert ledger.progress(lot).provisioned == 1


def test_void_takes_an_id_out_for_good(ledger: Ledger) -> None:
    ids = new_ids(3)
    lot = make_lot(ledger, ids)
    ledger.void(lot, ids[0], "label misprinted", actor=ACTOR)
    device_id, _, _ = reserve(ledger, lot, "se-1")
    assert device_id == ids[1]  # the void ID is skipped
    ledger.void(lot, device_id, "board damaged", actor=ACTOR)
    with pytest.raises(ReservationConflictError, match="was voided"):
        reserve(ledger, lot, "se-1")
    with pytest.raises(DeviceStateError, match="already void"):
        ledger.void(lot, ids[0], "again", actor=ACTOR)
    with pytest.raises(InputError, match="reason"):
        ledger.void(lot, ids[2], "  ", actor=ACTOR)
    record = ledger.find_device(device_id)
    assert record is not None
    assert (record.state, record.void_reason, record.hw_serial) == (DeviceState.VOID, "board damaged", "se-1")
    progress = ledger.progress(lot)
    assert (progress.void, progress.available, progress.reserved) == (2, 1, 0)


def test_closed_lot_refuses_every_change(ledger: Ledger) -> None:
    ids = new_ids(2)
    lot = make_lot(ledger, ids)
    device_id, _, _ = reserve(ledger, lot, "se-1")
    ledger.set_lot_state(lot, LotState.CLOSED, actor=ACTOR)
    with pytest.raises(LotStateError):
        provision(ledger, lot, device_id, "se-1")
    with pytest.raises(LotStateError):
        ledger.void(lot, ids[1], "x", actor=ACTOR)
    with pytest.raises(LotStateError, match="closed"):
        ledger.import_ids(lot, str(uuid.uuid4()).encode(), actor=ACTOR)
    assert ledger.progress(lot).total == 2


def test_bad_serials_are_refused(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(1))
    for serial in ("", "has space", "x" * 200):
        with pytest.raises(InputError, match="hw_serial"):
            reserve(ledger, lot, serial)
    assert ledger.progress(lot).available == 1


# -- jobs and audit -----------------------------------------------------------------------------


def test_jobs_and_attempts_are_recorded(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(1))
    job = ledger.start_job(lot, station="st1", port="3")
    assert job != ledger.start_job(lot, station="st1", port="4")
    ledger.set_job_serial(job, "se-1")
    ledger.record_attempt(job, step="genkey", outcome="failed", reason="board_timeout", duration_s=1.5)
    ledger.record_attempt(job, step="genkey", outcome="ok", reason=None, duration_s=0.4)
    ledger.finish_job(job, outcome="ok", reason=None)
    with pytest.raises(Exception, match="already finished"):
        ledger.finish_job(job, outcome="failed", reason="again")
    with pytest.raises(JobNotFoundError):
        ledger.record_attempt(10**9, step="x", outcome="ok", reason=None, duration_s=0.0)
    with pytest.raises(LotNotFoundError):
        ledger.start_job("missing", station="s", port="1")


def job_row(ledger: Ledger, job_id: int) -> tuple[str | None, str | None, bool]:
    """(hw_serial, outcome, finished) of a job, read behind the ledger's back."""
    with ledger._engine.connect() as connection:
        row = connection.execute(
            text("SELECT hw_serial, outcome, finished_at FROM job WHERE id = :id"), {"id": job_id}
        ).one()
        return row.hw_serial, row.outcome, row.finished_at is not None


def test_start_job_records_the_serial_in_one_call(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(1))
    job = ledger.start_job(lot, station="st1", port="3", hw_serial="se-9")
    assert job_row(ledger, job) == ("se-9", None, False)
    with pytest.raises(InputError, match="hw_serial"):
        ledger.start_job(lot, station="st1", port="3", hw_serial="has space")
    assert job_row(ledger, ledger.start_job(lot, station="st1", port="4")) == (None, None, False)


def test_mark_provisioned_finishes_the_job_in_the_same_transaction(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(3))
    job = ledger.start_job(lot, station="st1", port="1", hw_serial="se-1")
    device_id, _, _ = reserve(ledger, lot, "se-1")
    provision(ledger, lot, device_id, "se-1", finish_job=job)
    assert job_row(ledger, job) == ("se-1", "provisioned", True)
    provision(ledger, lot, device_id, "se-1", finish_job=job)  # a retry after a lost reply: no-op
    assert job_row(ledger, job) == ("se-1", "provisioned", True)
    with pytest.raises(Exception, match="already finished"):
        ledger.finish_job(job, outcome="failed", reason="late")

    # A job that cannot be closed refuses the whole record: the ID stays reserved, no audit entry.
    other, _, _ = reserve(ledger, lot, "se-2")
    before = ledger.verify_audit()
    with pytest.raises(JobNotFoundError):
        provision(ledger, lot, other, "se-2", finish_job=10**9)
    with pytest.raises(Exception, match="already finished"):
        provision(ledger, lot, other, "se-2", finish_job=job)
    record = ledger.find_by_serial(lot, "se-2")
    assert record is not None
    assert record.state is DeviceState.RESERVED
    assert ledger.verify_audit() == before


def test_lookups_of_unknown_lots_and_ids(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(1))
    device_id, _, _ = reserve(ledger, lot, "se-1")
    found = ledger.find_device(device_id)
    assert found is not None
    assert (found.lot, found.hw_serial, found.state) == (lot, "se-1", DeviceState.RESERVED)
    assert found.reserved_at is not None
    assert found.reserved_at.tzinfo is not None
    assert ledger.find_device(str(uuid.uuid4())) is None
    assert ledger.find_by_serial(lot, "nobody") is None
    with pytest.raises(LotNotFoundError):
        ledger.find_by_serial("missing", "se-1")
    with pytest.raises(JobNotFoundError):
        ledger.set_job_serial(10**9, "se-1")
    with pytest.raises(JobNotFoundError):
        ledger.finish_job(10**9, outcome="ok", reason=None)


def audit_actions(ledger: Ledger, after: int) -> list[tuple[str, str]]:
    """(action, subject) of the audit entries after the first ``after``, read behind the ledger's back.

    In the trail's order (seq); seq numbers may skip values on PostgreSQL, where a rolled-back
    append still consumed one, so the first ``after`` entries are skipped by position.
    """
    with ledger._engine.connect() as connection:
        rows = connection.execute(text("SELECT action, subject FROM audit_entry ORDER BY seq"))
        return [(row.action, row.subject) for row in rows][after:]


def test_every_transition_extends_the_audit_chain(ledger: Ledger) -> None:
    before = ledger.verify_audit()
    ids = new_ids(2)
    lot = make_lot(ledger, ids)
    device_id, _, _ = reserve(ledger, lot, "se-1")
    reserve(ledger, lot, "se-1")
    provision(ledger, lot, device_id, "se-1")
    ledger.void(lot, ids[1], "label torn", actor=ACTOR)
    ledger.set_lot_state(lot, LotState.CLOSED, actor=ACTOR)
    ledger.audit(actor="operator", action="port.disabled", subject="port-3", details={"why": "loose cable"})
    assert ledger.verify_audit() == before + 9
    assert audit_actions(ledger, before) == [
        ("lot.created", lot),
        ("ids.imported", lot),
        ("lot.state_changed", lot),
        ("id.reserved", ids[0]),
        ("id.resumed", ids[0]),
        ("id.provisioned", ids[0]),
        ("id.voided", ids[1]),
        ("lot.state_changed", lot),
        ("port.disabled", "port-3"),
    ]


def test_failed_calls_leave_no_audit_entry(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(1))
    reserve(ledger, lot, "a")
    before = ledger.verify_audit()
    with pytest.raises(IdsExhaustedError):
        reserve(ledger, lot, "b")
    with pytest.raises(LotStateError):
        ledger.set_lot_state(lot, LotState.DRAFT, actor=ACTOR)
    assert ledger.verify_audit() == before


def test_audit_details_must_be_json(ledger: Ledger) -> None:
    before = ledger.verify_audit()
    with pytest.raises(Exception, match="not plain JSON"):
        ledger.audit(actor="a", action="x", subject="y", details={"when": object()})
    assert ledger.verify_audit() == before


# -- threads and the async facade ---------------------------------------------------------------


def test_sync_ledger_is_usable_from_several_threads(ledger: Ledger) -> None:
    lot = make_lot(ledger, new_ids(8))
    results: dict[str, str] = {}
    lock = threading.Lock()

    def work(serial: str) -> None:
        device_id, _, _ = reserve(ledger, lot, serial)
        with lock:
            results[serial] = device_id

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results.values())) == 8
