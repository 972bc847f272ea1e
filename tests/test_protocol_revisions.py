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

from factoryd.protocol.messages import READBACK_REVISION, Command, LockReply
from factoryd.sim.board import Fault, FaultPlan
from tests.helpers.station import LOT, make_line, provision_one

# READ of the 4 objects and the HELLO after LOCK.
ROUND_TRIPS_SAVED = 5


async def test_both_revisions_provision_and_revision_2_needs_five_round_trips_less(tmp_path: Path) -> None:
    _, old = await provision_one(tmp_path / "rev1", 1)
    _, new = await provision_one(tmp_path / "rev2", READBACK_REVISION)
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
