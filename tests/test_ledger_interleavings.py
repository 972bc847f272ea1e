"""Property: whatever the interleaving of reserve / complete / fail / crash across stations, no ID is
bound to two serials, no serial holds two IDs, an ID once bound never moves, none is lost."""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factoryd.errors import IdsExhaustedError, ReservationConflictError
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.model import DeviceState

LOT = "prop-lot"
STATIONS = ["st-a", "st-b", "st-c"]
SERIALS = [f"0123{n:014x}" for n in range(6)]
IDS = 5  # fewer IDs than boards: exhaustion is part of the state space

ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from(STATIONS), st.sampled_from(SERIALS)),
        st.tuples(st.just("complete"), st.sampled_from(STATIONS), st.sampled_from(SERIALS)),
        st.tuples(st.just("fail"), st.sampled_from(STATIONS), st.sampled_from(SERIALS)),
        st.tuples(st.just("crash"), st.sampled_from(STATIONS), st.just("")),
    ),
    min_size=1,
    max_size=40,
)


def _fake_cert(device_id: str) -> bytes:
    return b"\x30\x03cert-for-" + device_id.encode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=ops)
def test_no_interleaving_breaks_exactly_once(program: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(f"sqlite:///{Path(tmp) / 'l.db'}") as ledger:
        ledger.create_lot(LOT, customer="c", profile=LotProfile(), target_quantity=None, actor="t")
        ledger.import_ids(
            LOT, "\n".join(str(uuid.uuid4()) for _ in range(IDS)).encode(), fmt="txt", actor="t"
        )
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="t")
        jobs: dict[tuple[str, str], int] = {}  # (station, serial) -> open job
        bound: dict[str, str] = {}  # serial -> ID, once seen it must never change
        for op, station, serial in program:
            if op == "crash":
                ledger.abandon_open_jobs(station, reason="crash")
                jobs = {k: v for k, v in jobs.items() if k[0] != station}
                continue
            if op == "reserve":
                job = jobs.get((station, serial)) or ledger.start_job(
                    LOT, station=station, port=serial[-2:], hw_serial=serial
                )
                jobs[(station, serial)] = job
                try:
                    reservation = ledger.reserve(
                        LOT, serial, station=station, port=serial[-2:], job_id=job, actor=station
                    )
                except (IdsExhaustedError, ReservationConflictError):
                    continue
                assert bound.setdefault(serial, reservation.device_id) == reservation.device_id
            elif op in ("complete", "fail"):
                record = ledger.find_by_serial(LOT, serial)
                job = jobs.pop((station, serial), None)
                if record is None or job is None:
                    continue
                if op == "fail":
                    ledger.finish_job(job, outcome="failed", reason="test")
                    continue
                cert = _fake_cert(record.device_id)
                try:
                    ledger.mark_provisioned(
                        LOT, record.device_id, serial, cert_der=cert, cert_serial="01",
                        fingerprint_sha256=hashlib.sha256(cert).hexdigest(), station=station,
                        port=serial[-2:], actor=station, finish_job=job,
                    )  # fmt: skip
                except ReservationConflictError:
                    continue
            _check(ledger, bound)
        _check(ledger, bound)
        ledger.verify_audit()


def _check(ledger: Ledger, bound: dict[str, str]) -> None:
    progress = ledger.progress(LOT)
    assert (
        progress.total == IDS == progress.available + progress.reserved + progress.provisioned + progress.void
    )
    by_id: dict[str, str] = {}
    for serial in SERIALS:
        record = ledger.find_by_serial(LOT, serial)
        if record is None:
            assert serial not in bound
            continue
        assert record.state in (DeviceState.RESERVED, DeviceState.PROVISIONED)
        assert bound.get(serial) == record.device_id  # an ID, once bound, never moves
        assert by_id.setdefault(record.device_id, serial) == serial  # never two serials
    assert len(by_id) == progress.reserved + progress.provisioned
