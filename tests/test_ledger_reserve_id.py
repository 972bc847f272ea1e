"""Reserving exactly a given ID for a serial: the claim path's exactly-once rules, by ID."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator

import pytest

from factoryd.errors import ReservationConflictError
from factoryd.ledger import DeviceState, Ledger, LotProfile, LotState
from factoryd.ledger.testing import throwaway_postgres_database

ACTOR = "test"
CERT_DER = b"\x30\x03\x02\x01\x07"
CERT_FP = hashlib.sha256(CERT_DER).hexdigest()
PROFILE = LotProfile(protocol="nrf91-at", device_id_from="imei", id_format="regex:nrf-[0-9]{15}")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this module's tests."""
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh SQLite file, or the module's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    """An open ledger on ``url``."""
    with Ledger.open(url) as opened:
        yield opened


def imei_ids(count: int) -> list[str]:
    """Derived IDs of ``count`` distinct, random IMEIs."""
    base = uuid.uuid4().int % 10**14
    return [f"nrf-{(base + n) % 10**15:015d}" for n in range(count)]


def make_lot(ledger: Ledger, ids: list[str]) -> str:
    """An active imei lot whose customer's list is ``ids``."""
    name = f"lot-{uuid.uuid4().hex[:10]}"
    ledger.create_lot(name, customer="ACME", profile=PROFILE, target_quantity=len(ids), actor=ACTOR)
    ledger.import_ids(name, "\n".join(ids).encode(), fmt="txt", actor=ACTOR)
    ledger.set_lot_state(name, LotState.ACTIVE, actor=ACTOR)
    return name


def reserve_id(ledger: Ledger, lot: str, serial: str, device_id: str, port: str = "1") -> tuple[str, bool]:
    r = ledger.reserve(lot, serial, station="st", port=port, job_id=None, actor=ACTOR, device_id=device_id)
    return r.device_id, r.resumed


def counts(ledger: Ledger, lot: str) -> tuple[int, int, int, int]:
    p = ledger.progress(lot)
    return p.available, p.reserved, p.provisioned, p.void


def test_reserves_exactly_the_given_id_not_the_next(ledger: Ledger) -> None:
    ids = imei_ids(3)
    lot = make_lot(ledger, ids)
    assert reserve_id(ledger, lot, "imei:2", ids[2]) == (ids[2], False)
    record = ledger.find_by_serial(lot, "imei:2")
    assert record is not None
    assert (record.device_id, record.state) == (ids[2], DeviceState.RESERVED)
    # The claim path still hands out the first available one in import order.
    assert ledger.reserve(lot, "other", station="st", port="2", job_id=None, actor=ACTOR).device_id == ids[0]


def test_a_retried_serial_gets_the_same_reservation_back(ledger: Ledger) -> None:
    ids = imei_ids(2)
    lot = make_lot(ledger, ids)
    reserve_id(ledger, lot, "imei:1", ids[1])
    assert reserve_id(ledger, lot, "imei:1", ids[1], port="3") == (ids[1], True)
    assert counts(ledger, lot) == (1, 1, 0, 0)


def test_an_id_absent_from_the_list_is_refused_and_consumes_nothing(ledger: Ledger) -> None:
    ids = imei_ids(2)
    lot = make_lot(ledger, ids)
    with pytest.raises(ReservationConflictError, match="not on the list"):
        reserve_id(ledger, lot, "imei:9", "nrf-999999999999999")
    assert counts(ledger, lot) == (2, 0, 0, 0)
    assert ledger.find_by_serial(lot, "imei:9") is None


def test_an_id_reserved_to_another_serial_is_refused(ledger: Ledger) -> None:
    ids = imei_ids(2)
    lot = make_lot(ledger, ids)
    reserve_id(ledger, lot, "imei:a", ids[0])
    with pytest.raises(ReservationConflictError, match="reserved for serial 'imei:a'"):
        reserve_id(ledger, lot, "imei:b", ids[0])
    assert counts(ledger, lot) == (1, 1, 0, 0)
    assert ledger.find_by_serial(lot, "imei:b") is None


def test_provisioned_and_void_ids_are_refused(ledger: Ledger) -> None:
    ids = imei_ids(3)
    lot = make_lot(ledger, ids)
    reserve_id(ledger, lot, "imei:a", ids[0])
    ledger.mark_provisioned(
        lot, ids[0], "imei:a", cert_der=CERT_DER, cert_serial="07", fingerprint_sha256=CERT_FP,
        station="st", port="1", actor=ACTOR,
    )  # fmt: skip
    ledger.void(lot, ids[1], "damaged label", actor=ACTOR)
    with pytest.raises(ReservationConflictError, match="provisioned"):
        reserve_id(ledger, lot, "imei:b", ids[0])
    with pytest.raises(ReservationConflictError, match="void"):
        reserve_id(ledger, lot, "imei:c", ids[1])
    assert counts(ledger, lot) == (1, 0, 1, 1)


def test_a_serial_holding_another_id_gets_no_second_one(ledger: Ledger) -> None:
    ids = imei_ids(2)
    lot = make_lot(ledger, ids)
    reserve_id(ledger, lot, "imei:a", ids[0])
    with pytest.raises(ReservationConflictError, match="already holds"):
        reserve_id(ledger, lot, "imei:a", ids[1])
    assert counts(ledger, lot) == (1, 1, 0, 0)


def test_two_stations_racing_for_one_derived_id_bind_it_once(ledger: Ledger, url: str) -> None:
    ids = imei_ids(1)
    lot = make_lot(ledger, ids)
    won: list[str] = []
    lost: list[str] = []
    barrier = threading.Barrier(8)

    def station(n: int) -> None:
        with Ledger.open(url) as own:
            barrier.wait()
            try:
                reserve_id(own, lot, f"imei:{n}", ids[0], port=str(n))
                won.append(f"imei:{n}")
            except ReservationConflictError:
                lost.append(f"imei:{n}")

    threads = [threading.Thread(target=station, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert len(lost) == 7
    record = ledger.find_by_serial(lot, won[0])
    assert record is not None
    assert record.device_id == ids[0]
    assert counts(ledger, lot) == (0, 1, 0, 0)
