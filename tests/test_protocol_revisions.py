"""Protocol revisions 1 and 2 (docs/protocol.md §4.2, §7): both provision, and both are verified.

Revision 2 firmware reads each object back itself (WRITE's digest is over the stored bytes) and
reports the lock state in the LOCK reply, so the station skips its READs and the HELLO after LOCK;
revision 1 firmware gets both. Either way a store that keeps other bytes, or a LOCK that did not
lock, fails the board and records nothing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from factoryd.protocol.messages import READBACK_REVISION, Command, LockReply, ObjectId
from factoryd.sim.board import Fault, FaultPlan, SimBoard
from tests.helpers.station import LOT, make_line

# READ of the 4 objects and the HELLO after LOCK.
ROUND_TRIPS_SAVED = 5


def _counting(board: SimBoard) -> Counter[int]:
    """Count the commands the board executes (resends answered from the cache are not counted)."""
    seen: Counter[int] = Counter()
    execute = board._execute

    async def counted(request: object) -> object:
        seen[type(request).command] += 1  # type: ignore[attr-defined]
        return await execute(request)  # type: ignore[arg-type]

    board._execute = counted  # type: ignore[method-assign]
    return seen


async def _provision_one(tmp_path: Path, revision: int) -> Counter[int]:
    """Provision one board of ``revision`` on a fresh line; the commands it executed."""
    line = await make_line(tmp_path)
    board = line.board()
    board.revision = revision
    seen = _counting(board)
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, board.serial_hex)
    assert record is not None
    assert record.cert_der == board.se.objects[ObjectId.DEVICE_CERT]
    assert board.se.locked
    return seen


async def test_both_revisions_provision_and_revision_2_needs_five_round_trips_less(tmp_path: Path) -> None:
    old = await _provision_one(tmp_path / "rev1", 1)
    new = await _provision_one(tmp_path / "rev2", READBACK_REVISION)
    assert old[Command.WRITE] == new[Command.WRITE] == 4
    assert old[Command.READ] == 4  # every object read back by the station
    assert new[Command.READ] == 0  # the board read them back itself
    assert old[Command.HELLO] == new[Command.HELLO] + 1  # the lock check after LOCK
    assert sum(old.values()) - sum(new.values()) == ROUND_TRIPS_SAVED
    assert {k: v for k, v in old.items() if k not in (Command.READ, Command.HELLO)} == {
        k: v for k, v in new.items() if k != Command.HELLO
    }


@pytest.mark.parametrize("revision", [1, READBACK_REVISION])
async def test_a_store_that_keeps_other_bytes_fails_the_board_in_both_revisions(
    tmp_path: Path, revision: int
) -> None:
    line = await make_line(tmp_path)
    board = line.board(FaultPlan.only(Fault.READBACK_DIFFERS))
    board.revision = revision
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "readback_mismatch"
    with line.ledger() as ledger:
        assert ledger.progress(LOT).provisioned == 0


@pytest.mark.parametrize("revision", [1, READBACK_REVISION])
async def test_a_lock_that_did_not_lock_fails_the_board_in_both_revisions(
    tmp_path: Path, revision: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = await make_line(tmp_path)
    board = line.board()
    board.revision = revision
    # The secure element acknowledges LOCK but stays unlocked (a part whose lock fuse failed).
    monkeypatch.setattr(board.se, "lock", lambda: None)
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "verification"
    assert not board.se.locked
    with line.ledger() as ledger:
        assert ledger.progress(LOT).provisioned == 0


def test_the_lock_reply_decodes_both_revisions() -> None:
    assert LockReply.decode(b"").locked is None
    assert LockReply.decode(b"\x01").locked is True
    assert LockReply.decode(b"\x00").locked is False
    assert LockReply(True).encode() == b"\x01"
    with pytest.raises(Exception, match="neither 0 nor 1"):
        LockReply.decode(b"\x02")
    with pytest.raises(Exception, match="LOCK reply"):
        LockReply.decode(b"\x01\x00")
