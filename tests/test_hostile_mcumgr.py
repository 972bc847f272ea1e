"""Hostile mcumgr (SMP) boards: every trick is refused with a reason, costs no ID, crashes nothing.

Each board is the simulated Zephyr board behind a real PTY whose replies are bent the way a broken
or malicious firmware could bend them: the wrong group or sequence number, a body that is not a
CBOR map, a CBOR nesting bomb, a packet larger than any SMP buffer, a declared object length of a
terabyte, a spray of undecodable lines, a serial that changes between two identity calls. The real
pipeline runs it on the real station; afterwards the ledger holds no provisioned device and no
reservation for tricks before the reservation, and the one reservation, bound to the board's serial
(resumable, not lost), for a trick after it.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from factoryd.ledger.model import DeviceState
from factoryd.protocol.mcumgr import McumgrCommand
from factoryd.protocol.messages import ObjectId
from factoryd.sim.mcumgr import McumgrPtyBoard, SimMcumgrBoard
from factoryd.transport.smp_framing import MAX_PACKET_BYTES, SmpPacket
from tests.helpers.station import LOT, Line, make_line

# Nested one-element arrays far beyond any decoder's depth limit, inside one SMP buffer.
CBOR_BOMB = b"\x81" * 6000 + b"\x00"
# Undecodable console lines sprayed before each reply (the engine's flood cap is 64).
FLOOD_LINES = 200
# Peak Python allocations a flooding board may cost the station (decoder buffers are capped).
FLOOD_PEAK_BYTES = 32 * 1024 * 1024


def _pack(reply: SmpPacket, body: dict[str, object]) -> SmpPacket:
    return dataclasses.replace(reply, payload=cbor2.dumps(body))


class HostileMcumgrBoard(SimMcumgrBoard):
    """A simulated mcumgr board whose replies to ``armed`` commands are bent by ``trick``."""

    def __init__(self, trick: str, armed: frozenset[McumgrCommand] | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.trick = trick
        self.armed = armed
        self.bent = 0
        self.identities = 0
        self.lock_seen = False

    def _is_armed(self, packet: SmpPacket) -> bool:
        command = packet.group << 8 | packet.command
        return self.armed is None or command in {int(c) for c in self.armed}

    async def answer(self, packet: SmpPacket) -> SmpPacket | None:
        """The honest reply, then bent."""
        reply = await super().answer(packet)
        command = packet.group << 8 | packet.command
        if self.trick == "changing_serial" and command == McumgrCommand.KEYGEN and self.identities < 2:
            return None  # no answer: the pipeline restarts the job and asks who the board is again
        if self.trick == "serial_after_lock" and command == McumgrCommand.LOCK:
            self.lock_seen = True
        if self.trick == "serial_after_lock" and not self.lock_seen:
            return reply
        if reply is None or not self._is_armed(packet):
            return reply
        self.bent += 1
        match self.trick:
            case "wrong_group":
                return dataclasses.replace(reply, group=(reply.group + 1) % 256)
            case "wrong_seq":
                return dataclasses.replace(reply, seq=(reply.seq + 7) % 256)
            case "not_a_map":
                return dataclasses.replace(reply, payload=cbor2.dumps([1, 2, 3]))
            case "cbor_bomb":
                return dataclasses.replace(reply, payload=CBOR_BOMB)
            case "oversize":
                return dataclasses.replace(reply, payload=b"\x40" * (MAX_PACKET_BYTES + 1024))
            case "huge_len":
                body = cbor2.loads(reply.payload)
                if isinstance(body, dict) and "len" in body:
                    body["len"] = 1 << 40
                return _pack(reply, body)
            case "serial_after_lock":
                body = cbor2.loads(reply.payload)
                if isinstance(body, dict) and isinstance(body.get("serial"), bytes):
                    body["serial"] = bytes(b ^ 0xFF for b in body["serial"])
                return _pack(reply, body)
            case "changing_serial":
                self.identities += 1
                body = cbor2.loads(reply.payload)
                if self.identities > 1 and isinstance(body, dict) and isinstance(body.get("serial"), bytes):
                    body["serial"] = bytes(b ^ 0xFF for b in body["serial"])
                return _pack(reply, body)
        return reply

    def open_pty(self) -> McumgrPtyBoard:
        """A PTY that sprays garbage lines before each reply when the trick is ``flood``."""
        return _FloodingPty(self) if self.trick == "flood" else super().open_pty()


class _FloodingPty(McumgrPtyBoard):
    async def _send(self, data: bytes) -> None:
        if data.startswith(b"\x06\x09"):  # an SMP packet's first console line
            await super()._send(b"\x06\x09!!not-base64!!\n" * FLOOD_LINES)
        await super()._send(data)


async def _run(
    tmp_path: Path, make: Callable[[Line], HostileMcumgrBoard]
) -> tuple[Line, HostileMcumgrBoard, str]:
    line = await make_line(tmp_path, profile="mcumgr", flash=False)
    board = make(line)
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub, timeout_s=90)
    assert len(station.results) == 1, station.results
    result = station.results[0]
    assert result.outcome in ("failed", "refused"), result
    assert result.reason is not None
    assert board.bent > 0, "the trick never fired"
    assert ObjectId.DEVICE_CERT not in board.se.objects or result.device_id is not None
    return line, board, result.reason


def _no_id_consumed(line: Line) -> None:
    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
        assert (progress.provisioned, progress.reserved, progress.void) == (0, 0, 0), progress
        ledger.verify_audit()


def _reservation_kept(line: Line, board: SimMcumgrBoard) -> None:
    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
        assert (progress.provisioned, progress.reserved, progress.void) == (0, 1, 0), progress
        record = ledger.find_by_serial(LOT, board.serial_hex)
        assert record is not None
        assert record.state is DeviceState.RESERVED  # bound to this board: a re-insert resumes it
        ledger.verify_audit()


@pytest.mark.parametrize(
    ("trick", "reasons"),
    [
        ("wrong_group", {"board_timeout", "protocol_violation"}),
        ("wrong_seq", {"board_timeout"}),
        ("not_a_map", {"protocol_violation"}),
        ("cbor_bomb", {"protocol_violation"}),
        ("oversize", {"board_timeout", "frame", "smp_framing", "protocol_violation"}),
    ],
)
async def test_bent_identity_reply_is_refused_before_any_id(
    tmp_path: Path, trick: str, reasons: set[str]
) -> None:
    def make(line: Line) -> HostileMcumgrBoard:
        return HostileMcumgrBoard(trick, frozenset({McumgrCommand.IDENTITY}), firmware_key=line.fw_public)

    line, _, reason = await _run(tmp_path, make)
    assert reason in reasons
    _no_id_consumed(line)


async def test_flooding_board_fails_alone_with_bounded_memory(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        line, _, reason = await _run(
            tmp_path, lambda line: HostileMcumgrBoard("flood", firmware_key=line.fw_public)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason in {"board_flood", "board_timeout"}
    assert peak < FLOOD_PEAK_BYTES
    _no_id_consumed(line)


async def test_terabyte_object_length_is_refused_and_reservation_kept(tmp_path: Path) -> None:
    def make(line: Line) -> HostileMcumgrBoard:
        return HostileMcumgrBoard(
            "huge_len", frozenset({McumgrCommand.READ_OBJECT}), firmware_key=line.fw_public
        )

    line, board, reason = await _run(tmp_path, make)
    assert reason == "protocol_violation"
    _reservation_kept(line, board)


async def test_csr_bomb_after_reservation_keeps_the_reservation(tmp_path: Path) -> None:
    def make(line: Line) -> HostileMcumgrBoard:
        return HostileMcumgrBoard("cbor_bomb", frozenset({McumgrCommand.CSR}), firmware_key=line.fw_public)

    line, board, reason = await _run(tmp_path, make)
    assert reason == "protocol_violation"
    _reservation_kept(line, board)


async def test_serial_that_changes_between_identity_calls_is_refused(tmp_path: Path) -> None:
    def make(line: Line) -> HostileMcumgrBoard:
        return HostileMcumgrBoard(
            "changing_serial", frozenset({McumgrCommand.IDENTITY}), firmware_key=line.fw_public
        )

    line, board, reason = await _run(tmp_path, make)
    assert reason == "identity_mismatch"
    assert board.identities >= 2
    # KEYGEN comes after the reservation: it stays bound to the serial the job started with.
    _reservation_kept(line, board)


async def test_serial_that_changes_after_lock_is_refused(tmp_path: Path) -> None:
    def make(line: Line) -> HostileMcumgrBoard:
        return HostileMcumgrBoard(
            "serial_after_lock", frozenset({McumgrCommand.IDENTITY}), firmware_key=line.fw_public
        )

    line, board, reason = await _run(tmp_path, make)
    assert board.lock_seen
    assert reason == "identity_mismatch"
    # Nothing recorded as provisioned for a board that turned into another one at the last step.
    _reservation_kept(line, board)
