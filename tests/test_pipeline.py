"""The station end to end on simulated boards behind real PTYs: pipeline, retries, re-checks, refusals."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from factoryd.demo import DemoOptions, run_demo
from factoryd.jobs.pipeline import Pipeline
from factoryd.ledger import LotProfile, LotState
from factoryd.ledger.model import DeviceState
from factoryd.pki.store import BundleStore
from factoryd.protocol.messages import ObjectId
from factoryd.service import StationPaths
from factoryd.sim.arduino import SimArduinoBoard
from factoryd.sim.board import Fault, FaultPlan
from factoryd.telemetry.events import PortState, RecordingSink
from tests.helpers.station import LOT, make_line


@pytest.mark.timeout(600)
async def test_demo_16_ports_200_devices_10pct_faults(tmp_path: Path) -> None:
    result = await run_demo(DemoOptions(ports=16, boards=200, fault_rate=0.1, seed=7, state_dir=tmp_path))
    outcomes = result.outcomes
    # Every board ends provisioned or failed with a reason; none is lost.
    assert sum(outcomes.values()) == 200
    assert set(outcomes) <= {"provisioned", "failed", "refused", "rechecked"}
    assert outcomes["provisioned"] == result.provisioned >= 150
    assert all(reason != "unknown" for reason in result.failures)
    # check_provisioned() ran for every device: CA signature, CN, cert on board, key = SE key.
    assert result.certificates_verified == result.provisioned
    assert result.manifest_count == result.provisioned
    assert result.audit_entries > result.provisioned


async def test_every_board_gets_a_distinct_id_and_ledger_agrees(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    hub = line.hub(ports=4, supply=12)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 12})
    ids = [b.se.objects[ObjectId.DEVICE_ID].decode() for b in hub.finished]
    assert len(set(ids)) == 12
    with line.ledger() as ledger:
        records = {r.device_id: r for r in ledger.provisioned_devices(LOT)}
        assert set(records) == set(ids)
        for board in hub.finished:
            record = records[board.se.objects[ObjectId.DEVICE_ID].decode()]
            assert record.hw_serial == board.serial_hex
        # The lot profile asks for its MCUboot image and a lock: both happened on every board, which
        # reports the image's hash (SHA256 TLV) and version as the lot recorded them.
        profile = ledger.get_lot(LOT).profile
        assert profile.firmware_version == "2.0.0+0"
        assert all(
            (b.fw_version, b.fw_sha256.hex()) == (profile.firmware_version, profile.firmware_sha256)
            and b.se.locked
            for b in hub.finished
        )
        progress = ledger.progress(LOT)
        assert progress.provisioned == 12
        assert progress.reserved == 0


async def test_reinserted_board_is_rechecked_not_reissued(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    hub = line.hub(ports=2, supply=2)
    await line.run(hub)
    done = hub.finished[0]
    cert_before = done.se.objects[ObjectId.DEVICE_CERT]
    again = line.hub(ports=1, supply=0)
    again.insert("1", done)
    station = await line.run(again)
    assert station.outcomes == Counter({"rechecked": 1})
    assert done.se.objects[ObjectId.DEVICE_CERT] == cert_before
    with line.ledger() as ledger:
        assert ledger.progress(LOT).provisioned == 2


async def test_board_of_another_lot_is_refused_without_rework(tmp_path: Path) -> None:
    first = await make_line(tmp_path / "a")
    hub = first.hub(ports=1, supply=1)
    await first.run(hub)
    foreign = hub.finished[0]
    second = await make_line(tmp_path / "b")
    other = second.hub(ports=1, supply=0)
    other.insert("1", foreign)
    station = await second.run(other)
    assert station.outcomes == Counter({"refused": 1})
    assert station.results[0].reason == "refused_board"
    with second.ledger() as ledger:
        progress = ledger.progress(LOT)
        assert progress.reserved == 0
        assert progress.provisioned == 0


async def test_interrupted_board_resumes_with_its_reserved_id(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    board = line.board()
    with line.ledger() as ledger:
        # This station's previous run died mid-job (its job is still open: the restart closes it).
        station_name = line.settings.station.name
        job = ledger.start_job(LOT, station=station_name, port="9")
        reservation = ledger.reserve(
            LOT, board.serial_hex, station=station_name, port="9", job_id=job, actor="test"
        )
    # The crashed run had already written the ID onto the board.
    board.se.store(ObjectId.DEVICE_ID, reservation.device_id.encode())
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    assert station.results[0].device_id == reservation.device_id
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, board.serial_hex)
        assert record is not None
        assert record.state is DeviceState.PROVISIONED
        assert record.device_id == reservation.device_id


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.WRONG_CN, "csr_rejected"),
        (Fault.BAD_CSR_SIGNATURE, "csr_rejected"),
        (Fault.WEAK_KEY, "csr_rejected"),
        (Fault.HANG, "board_timeout"),
    ],
)
async def test_permanent_board_faults_fail_with_reason_and_keep_reservation(
    tmp_path: Path, fault: Fault, reason: str
) -> None:
    line = await make_line(tmp_path)
    bad = line.board(FaultPlan.only(fault))
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", bad)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == reason
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, bad.serial_hex)
        if fault is Fault.HANG:
            assert record is None  # it never answered HELLO: no ID was touched
        else:
            # The ID stays bound to this board (rule 1): a re-inserted board resumes with it.
            assert record is not None
            assert record.state is DeviceState.RESERVED
        assert ledger.progress(LOT).provisioned == 0


async def test_one_stuck_board_does_not_stall_the_others(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    boards = [line.board(FaultPlan.only(Fault.HANG))] + [line.board() for _ in range(9)]
    feed = iter(boards)
    hub = line.hub(ports=3, supply=10, factory=lambda: next(feed))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 9, "failed": 1})


async def test_port_goes_to_attention_after_failures_in_a_row(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    hub = line.hub(ports=1, supply=5, factory=lambda: line.board(FaultPlan.only(Fault.WRONG_CN)))

    def stuck(station: object) -> bool:
        control = station.ports["1"]  # type: ignore[attr-defined]
        return control.attention is not None and not control.busy

    station = await line.run(hub, stuck)
    control = station.ports["1"]
    assert control.failures_in_row == 3
    assert "3 boards failed in a row" in (control.attention or "")
    assert station.outcomes == Counter({"failed": 3})


async def test_transient_faults_recover_within_the_job(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    plan = FaultPlan(corrupt_byte=0.05, drop_reply=0.05, reset_mid_write=0.1, readback_differs=0.1, seed=5)
    hub = line.hub(ports=4, supply=16, factory=lambda: line.board(plan))
    station = await line.run(hub)
    assert station.outcomes["provisioned"] >= 14
    injected = Counter[str]()
    for board in hub.finished:
        injected.update(board.injected)
    assert injected[Fault.RESET_MID_WRITE] > 0
    assert injected[Fault.READBACK_DIFFERS] > 0


async def test_a_bug_in_one_port_costs_that_port_not_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = await make_line(tmp_path)
    original = Pipeline.run

    async def buggy(self: Pipeline, port: str, *args: Any, **kwargs: Any) -> Any:
        if port == "1":
            raise RuntimeError("simulated bug")
        return await original(self, port, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run", buggy)
    hub = line.hub(ports=2, supply=6)

    def done(station: Any) -> bool:
        return bool(station.ports["1"].attention) and station.outcomes["provisioned"] >= 4

    station = await line.run(hub, done)
    assert "simulated bug" in (station.ports["1"].attention or "")
    assert station.outcomes["provisioned"] >= 4


async def test_demo_with_the_arduino_profile(tmp_path: Path) -> None:
    result = await run_demo(
        DemoOptions(ports=4, boards=12, fault_rate=0.1, seed=3, profile="arduino-v1", state_dir=tmp_path)
    )
    assert sum(result.outcomes.values()) == 12
    assert result.provisioned >= 8
    assert result.duplicate_ids == 0
    # Each board's rebuilt certificate is the ledger's, issued by the CA, for the board's own key.
    assert result.certificates_verified == result.provisioned


async def test_a_finished_board_left_in_its_slot_keeps_showing_done(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    board = line.board()
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    # A real hub's release() leaves the board where it is: the port must not be re-provisioned,
    # and what it shows after each rescan is still "done".
    hub.release = _keep_board  # type: ignore[method-assign]
    jobs_seen: list[int] = []

    def rescanned_twice(station: Any) -> bool:
        jobs_seen.append(sum(station.outcomes.values()))
        return len(jobs_seen) > 20 and station.outcomes["provisioned"] == 1

    settings = line.settings.model_copy(
        update={"jobs": line.settings.jobs.model_copy(update={"rescan_s": 0.05})}
    )
    recorder = RecordingSink()
    daemon_station = await line.run(hub, rescanned_twice, settings=settings, sinks=(recorder,))
    assert daemon_station.outcomes == Counter({"provisioned": 1})
    assert board.se.locked
    states = [u.state for u in recorder.ports if u.port == "1"]
    assert states.count(PortState.POWERING) > 3  # it was looked at again and again
    last_after_power = [s for s in states if s is not PortState.POWERING][-1]
    assert last_after_power is PortState.DONE


async def _keep_board(port: str) -> None:
    return None


@pytest.mark.timeout(300)
async def test_demo_operator_acknowledges_attention_so_the_run_ends(tmp_path: Path) -> None:
    # Every board is faulty: ports go to attention after three failures in a row; the simulated
    # operator acknowledges them, so the supply is used up and the demo ends.
    result = await run_demo(
        DemoOptions(ports=2, boards=6, fault_rate=1.0, seed=5, state_dir=tmp_path, flash=False)
    )
    assert sum(result.outcomes.values()) == 6
    assert result.outcomes.get("failed", 0) + result.outcomes.get("refused", 0) >= 5
    assert result.duplicate_ids == 0


@pytest.mark.parametrize("profile", ["factoryd-v1", "arduino-v1"])
async def test_link_statistics_reach_telemetry_for_every_profile(tmp_path: Path, profile: str) -> None:
    line = await make_line(tmp_path, profile=profile, boards=2, ports=1)
    factory = SimArduinoBoard if profile == "arduino-v1" else line.board
    recorder = RecordingSink()
    station = await line.run(line.hub(ports=1, supply=2, factory=factory), sinks=(recorder,))
    assert station.outcomes["provisioned"] == 2
    assert recorder.links, "no LinkStats event"
    for stats in recorder.links:
        assert stats.port == "1"
        assert stats.frames_sent > 0
        assert stats.frames_received > 0
        assert stats.crc_errors >= 0


async def test_a_subject_template_shapes_every_certificate_the_line_issues(tmp_path: Path) -> None:
    """O from the lot, serialNumber from the ID list's extra column, a URI SAN: through the real pipeline."""
    line = await make_line(tmp_path)
    paths = StationPaths(line.settings.station.state_dir)
    store = BundleStore(paths.bundles, line.passphrase)
    profile = LotProfile(
        subject="O={org}, serialNumber={meta.sn}, CN={id}",
        subject_fields={"org": "Acme Devices"},
        san_uris=["https://devices.acme.example/{id}"],
    )
    ids = [str(uuid.uuid4()) for _ in range(3)]
    id_list = "id,sn\n" + "".join(f"{device_id},SN-{n:04d}\n" for n, device_id in enumerate(ids))
    with line.ledger() as ledger:
        ledger.create_lot("tmpl-lot", customer="acme", profile=profile, target_quantity=3, actor="test")
        store.save("tmpl-lot", store.load(LOT))
        ledger.import_ids("tmpl-lot", id_list.encode(), filename="ids.csv", actor="test")
        ledger.set_lot_state(LOT, LotState.PAUSED, actor="test")
        ledger.set_lot_state("tmpl-lot", LotState.ACTIVE, actor="test")
    jobs = line.settings.jobs.model_copy(update={"lot": "tmpl-lot"})
    station = await line.run(
        line.hub(ports=2, supply=3), settings=line.settings.model_copy(update={"jobs": jobs})
    )
    assert station.outcomes == Counter({"provisioned": 3})
    with line.ledger() as ledger:
        devices = ledger.provisioned_devices("tmpl-lot")
    assert sorted(d.device_id for d in devices) == sorted(ids)
    for device in devices:
        cert = x509.load_der_x509_certificate(device.cert_der)
        serial_number = f"SN-{ids.index(device.device_id):04d}"
        assert cert.subject.rfc4514_string() == (
            f"CN={device.device_id},2.5.4.5={serial_number},O=Acme Devices"
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"https://devices.acme.example/{device.device_id}"
        ]
