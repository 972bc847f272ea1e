"""Hostile boards: each trick is refused with a reason and wastes no ID beyond its reservation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from factoryd.errors import BoardFloodError, LedgerError, ReservationConflictError
from factoryd.jobs.scheduler import MAX_PAUSED_RERUNS
from factoryd.ledger import AsyncLedger, LedgerUnavailableError
from factoryd.ledger.model import DeviceState
from factoryd.protocol.messages import ObjectId
from factoryd.protocol.native import BoardClient
from factoryd.service import StationPaths, export_crl
from factoryd.sim.board import Fault, FaultPlan, SimBoard
from factoryd.sim.pty import serve_pty
from factoryd.transport.framing import MAX_ENCODED_FRAME
from tests.helpers.boards import FAST_TIMEOUTS
from tests.helpers.station import LOT, make_line


async def test_board_claiming_a_provisioned_boards_serial_is_refused(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    hub = line.hub(ports=1, supply=1)
    await line.run(hub)
    victim = hub.finished[0]
    clone = line.board()
    clone.claimed_serial = victim.se.serial
    again = line.hub(ports=1, supply=0)
    again.insert("1", clone)
    station = await line.run(again)
    assert station.outcomes == Counter({"refused": 1})
    assert station.results[0].reason == "refused_board"
    assert ObjectId.DEVICE_CERT not in clone.se.objects
    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
        assert (progress.provisioned, progress.reserved) == (1, 0)


async def test_two_boards_with_one_serial_never_share_an_id(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    # A slow genuine board and a clone of it on the next port, powered at the same time.
    genuine = line.board()
    clone = line.board()
    clone.claimed_serial = genuine.se.serial
    hub = line.hub(ports=2, supply=0)
    hub.insert("1", genuine)
    hub.insert("2", clone)
    station = await line.run(hub)
    assert sum(station.outcomes.values()) == 2
    written = [b.se.objects.get(ObjectId.DEVICE_ID) for b in (genuine, clone)]
    assert written.count(None) >= 1 or written[0] != written[1]
    with line.ledger() as ledger:
        assert ledger.progress(LOT).provisioned <= 1
    reasons = {r.reason for r in station.results if r.outcome != "provisioned"}
    assert reasons <= {"identity_mismatch", "refused_board", None}


async def test_replayed_csr_is_rejected_and_reservation_kept(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    board = line.board()
    board.replay_csr = True
    # A first CSR from an earlier key exists on the board already.
    board.se.genkey(0)
    board._first_csr[0] = board.se.csr(0, "00000000-0000-4000-8000-000000000000")
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "csr_rejected"
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, board.serial_hex)
        assert record is not None
        assert record.state is DeviceState.RESERVED


async def test_flooding_board_fails_alone_and_buffers_stay_bounded(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    flooder = line.board()
    flooder.flood_bytes = 200_000
    feed = iter([flooder, *(line.board() for _ in range(5))])
    hub = line.hub(ports=2, supply=6, factory=lambda: next(feed))
    station = await line.run(hub)
    assert station.outcomes["provisioned"] == 5
    assert station.outcomes["failed"] == 1
    failed = next(r for r in station.results if r.outcome == "failed")
    assert failed.reason == "board_flood"
    # Refused before anything was written: no certificate on it, no ID bound to it.
    assert ObjectId.DEVICE_CERT not in flooder.se.objects
    with line.ledger() as ledger:
        assert ledger.find_by_serial(LOT, flooder.serial_hex) is None


async def test_flood_does_not_grow_the_host_buffer() -> None:
    board = SimBoard()
    board.flood_bytes = 100_000
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        with pytest.raises(BoardFloodError, match="undecodable frames"):
            await client.hello()
        assert client.pending == 0
        assert client.link.decoder.buffered <= MAX_ENCODED_FRAME
        with pytest.raises(BoardFloodError):
            await client.hello()


async def test_readback_that_differs_is_never_recorded_as_provisioned(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    board = line.board(FaultPlan.only(Fault.READBACK_DIFFERS))
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "readback_mismatch"
    with line.ledger() as ledger:
        assert ledger.progress(LOT).provisioned == 0


async def test_board_locked_before_the_ledger_record_is_completed_not_refused(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    hub = line.hub(ports=1, supply=1)
    await line.run(hub)
    board = hub.finished[0]
    device_id = board.se.objects[ObjectId.DEVICE_ID].decode()
    # Rewind the ledger as if the station died after LOCK and before recording: a fresh lot
    # whose reservation for this board is still open.
    other = await make_line(tmp_path / "rewound")
    with other.ledger() as ledger:
        job = ledger.start_job(LOT, station="crashed", port="1")
        reservation = ledger.reserve(
            LOT, board.serial_hex, station="crashed", port="1", job_id=job, actor="t"
        )
    assert reservation.device_id != device_id  # different lot: its CA did not issue the board's cert
    again = other.hub(ports=1, supply=0)
    again.insert("1", board)
    station = await other.run(again)
    # The board is locked and holds another CA's certificate: it fails verification, never re-issued.
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "verification"
    with other.ledger() as ledger:
        assert ledger.progress(LOT).provisioned == 0


async def test_station_dying_between_lock_and_record_completes_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = await make_line(tmp_path)
    original = AsyncLedger.mark_provisioned
    calls = {"n": 0}

    async def lost_once(self: AsyncLedger, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise LedgerUnavailableError("database went away after LOCK")
        await original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncLedger, "mark_provisioned", lost_once)
    hub = line.hub(ports=1, supply=1)
    station = await line.run(hub)
    board = hub.finished[0]
    assert board.se.locked
    # The ledger outage fails the job (its reservation kept, the board left in its port: intake pauses,
    # jobs/ledger_hold.py); when the ledger answers again the board's next job completes it as it is.
    assert station.outcomes == Counter({"failed": 1, "provisioned": 1})
    assert [r.reason for r in station.results] == ["ledger_unavailable", None]
    assert station.results[1].device_id == station.results[0].device_id
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, board.serial_hex)
        assert record is not None
        assert record.state is DeviceState.PROVISIONED
        assert record.cert_der == board.se.objects[ObjectId.DEVICE_CERT]


async def test_a_serial_in_flight_on_another_station_gets_no_id(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    serial = "0123aabbccddeeff00"
    with line.ledger() as ledger:
        first = ledger.start_job(LOT, station="station-a", port="1", hw_serial=serial)
        held = ledger.reserve(LOT, serial, station="station-a", port="1", job_id=first, actor="a")
        second = ledger.start_job(LOT, station="station-b", port="3", hw_serial=serial)
        with pytest.raises(ReservationConflictError, match="being provisioned right now by job"):
            ledger.reserve(LOT, serial, station="station-b", port="3", job_id=second, actor="b")
        # Station A dies; when it restarts it closes what it left open, and the board may move.
        assert ledger.abandon_open_jobs("station-a", reason="station restarted") == 1
        moved = ledger.reserve(LOT, serial, station="station-b", port="3", job_id=second, actor="b")
        assert moved.device_id == held.device_id
        assert moved.resumed
        assert ledger.progress(LOT).reserved == 1


async def test_a_locked_board_whose_certificate_a_published_crl_revoked_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its job failed after LOCK and a CRL said so: coming back, it must not make that certificate stand."""
    line = await make_line(tmp_path)
    original = AsyncLedger.mark_provisioned

    async def always_lost(self: AsyncLedger, *args: Any, **kwargs: Any) -> None:
        # Not an outage (that would keep the board in its port until the ledger is back): the record fails.
        raise LedgerError("the database refused the record after LOCK")

    monkeypatch.setattr(AsyncLedger, "mark_provisioned", always_lost)
    hub = line.hub(ports=1, supply=1)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    board = hub.finished[0]
    assert board.se.locked
    cert_serial = f"{x509.load_der_x509_certificate(board.se.objects[ObjectId.DEVICE_CERT]).serial_number:x}"
    paths = StationPaths(line.settings.station.state_dir)
    with line.ledger() as ledger:
        assert cert_serial in {r.cert_serial for r in ledger.revoked_certificates(LOT)}
        export_crl(ledger, paths, line.passphrase, LOT, actor="test")  # published: the revocation stands
        assert ledger.published_revoked_serials(LOT) == {cert_serial}
    monkeypatch.setattr(AsyncLedger, "mark_provisioned", original)
    again = line.hub(ports=1, supply=0)
    again.insert("1", board)
    station = await line.run(again)
    assert station.outcomes == Counter({"refused": 1})
    assert station.results[0].reason == "refused_board"
    with line.ledger() as ledger:
        assert ledger.progress(LOT).provisioned == 0
        assert cert_serial in {r.cert_serial for r in ledger.revoked_certificates(LOT)}


async def test_a_board_failing_for_a_ledger_outage_the_probe_cannot_see_is_not_rerun_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intake resumes each time the ledger answers, yet this board's record keeps failing: it is let go."""
    line = await make_line(tmp_path)

    async def always_lost(self: AsyncLedger, *args: Any, **kwargs: Any) -> None:
        raise LedgerUnavailableError("database went away after LOCK")

    monkeypatch.setattr(AsyncLedger, "mark_provisioned", always_lost)
    hub = line.hub(ports=1, supply=1)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": MAX_PAUSED_RERUNS + 1})
    assert {r.reason for r in station.results} == {"ledger_unavailable"}
    assert len({r.device_id for r in station.results}) == 1  # one ID all along
    board = hub.finished[0]  # released to the operator at last
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, board.serial_hex)
        assert record is not None
        assert record.state is DeviceState.RESERVED  # kept for the board: nothing lost
        assert ledger.progress(LOT).provisioned == 0
