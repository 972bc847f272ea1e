"""Protocol revision 3 (docs/protocol.md §4.3): every WRITE and the challenge's SIGN in one burst.

The host sends the five requests in one write and the board answers them in order; each reply is
still checked (the digest of what the store reads back, the status, the signature). Older boards
are never sent a burst, and a burst survives the link faults a single request survives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from factoryd.errors import BoardResetError, BoardStatusError, ReadbackMismatchError
from factoryd.protocol.messages import PIPELINE_REVISION, READBACK_REVISION, Command, ObjectId, Status
from factoryd.protocol.native import BoardClient
from factoryd.sim.board import Fault, FaultPlan, SimBoard
from factoryd.sim.pty import serve_pty
from tests.helpers.boards import FAST_TIMEOUTS
from tests.helpers.station import provision_one

CN = "0b6f6c9e-2d1a-4c7e-9f3b-5a4d3c2b1a09"
OBJECTS = [
    (ObjectId.DEVICE_ID, CN.encode()),
    (ObjectId.DEVICE_CERT, b"\x30" * 900),
    (ObjectId.CA_CHAIN, b"-----BEGIN CERTIFICATE-----\n" * 100),
    (ObjectId.ENDPOINT, b'{"endpoint": "mqtts://x:8883"}'),
]
CHALLENGE = bytes(range(32))


def _verify_raw(point: bytes, message: bytes, raw: bytes) -> None:
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.verify(der, message, ec.ECDSA(hashes.SHA256()))


async def test_a_burst_is_one_write_and_every_reply_is_checked() -> None:
    board = SimBoard()
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        assert (await client.hello()).version == PIPELINE_REVISION
        assert client.pipelines
        point = await client.genkey()
        writes, frames = client.link.stats.writes, client.link.stats.frames_sent
        signature = await client.write_all_and_sign(OBJECTS, CHALLENGE)
        assert client.link.stats.writes - writes == 1
        assert client.link.stats.frames_sent - frames == len(OBJECTS) + 1
        _verify_raw(point, CHALLENGE, signature)
        assert client.pending == 0
    assert {obj: board.se.objects[obj] for obj, _ in OBJECTS} == dict(OBJECTS)
    # The requests waited in the board's receive path together: it was a burst, not a sequence.
    assert board.max_queued_requests >= 2


async def test_a_revision_2_board_is_never_sent_a_burst() -> None:
    board = SimBoard()
    board.revision = READBACK_REVISION
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        await client.hello()
        assert not client.pipelines
        with pytest.raises(RuntimeError, match="revision 2"):
            await client.write_all_and_sign(OBJECTS, CHALLENGE)
    assert board.se.objects == {}


@pytest.mark.parametrize("fault", [Fault.CORRUPT_BYTE, Fault.DROP_REPLY, Fault.OVERSIZE_FRAME])
async def test_a_burst_recovers_from_link_faults(fault: Fault) -> None:
    board = SimBoard(faults=FaultPlan.only(fault, 0.25, seed=5))
    async with (
        serve_pty(board) as pty,
        await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS, resends=8) as client,
    ):
        await client.hello()
        point = await client.genkey()
        for _ in range(6):
            _verify_raw(point, CHALLENGE, await client.write_all_and_sign(OBJECTS, CHALLENGE))
        assert client.pending == 0
        assert client.stats.resends > 0
    assert board.injected.get(fault, 0) > 0
    assert {obj: board.se.objects[obj] for obj, _ in OBJECTS} == dict(OBJECTS)


async def test_a_store_that_keeps_other_bytes_fails_the_burst_naming_the_object() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.READBACK_DIFFERS))
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        await client.hello()
        await client.genkey()
        with pytest.raises(ReadbackMismatchError, match="DEVICE_ID"):
            await client.write_all_and_sign(OBJECTS, CHALLENGE)
        assert client.pending == 0


async def test_a_refused_request_in_the_middle_fails_the_burst_with_its_status() -> None:
    board = SimBoard()
    too_large = [OBJECTS[0], (ObjectId.DEVICE_CERT, b"x" * 4001), *OBJECTS[2:]]
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        await client.hello()
        await client.genkey()
        with pytest.raises(BoardStatusError) as info:
            await client.write_all_and_sign(too_large, CHALLENGE)
        assert info.value.status == Status.TOO_LARGE
        assert client.pending == 0
        # The link is still usable: the next burst goes through.
        await client.write_all_and_sign(OBJECTS, CHALLENGE)


async def test_a_reset_during_the_burst_fails_it_as_a_reset_and_leaves_no_waiter() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.RESET_MID_WRITE))
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        await client.hello()
        await client.genkey()
        with pytest.raises(BoardResetError):
            await client.write_all_and_sign(OBJECTS, CHALLENGE)
        assert client.pending == 0


async def test_the_station_bursts_to_revision_3_boards_only_with_the_same_commands(tmp_path: Path) -> None:
    old, old_seen = await provision_one(tmp_path / "rev2", READBACK_REVISION)
    new, new_seen = await provision_one(tmp_path / "rev3", PIPELINE_REVISION)
    # The same commands run on the board either way: the burst saves round trips, not checks.
    assert old_seen == new_seen
    assert new_seen[Command.WRITE] == 4
    assert new_seen[Command.SIGN] == 1
    assert old.max_queued_requests == 1
    assert new.max_queued_requests >= 2
