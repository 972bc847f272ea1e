"""Group commit on SQLite (ledger/engine.py ``_group_commit``, ledger/aio.py ``_GroupCommits``).

Per-board writes queued for the ledger's worker together share one COMMIT: each is a savepoint of
one transaction, nothing is visible to another connection (or settled to its caller) before that
COMMIT, a write that fails is rolled back alone, and a COMMIT that fails takes every write of the
group with it. These tests open a second connection on the same file to see what is durable.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from factoryd.bench.floor import CommitCounter
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.errors import LedgerError
from factoryd.ledger import AsyncLedger
from factoryd.ledger.aio import observe_group_commits
from factoryd.ledger.core import Ledger
from factoryd.ledger.model import DeviceState, LotState
from factoryd.ledger.profile import LotProfile
from tests.helpers.station import make_line

ACTOR = "station-g"
CERT = b"\x30\x03\x02\x01\x01"
BOARDS = 24


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def _ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def _active_lot(ledger: Ledger, ids: list[str], name: str = "grouped") -> str:
    ledger.create_lot(name, customer="ACME", profile=LotProfile(), target_quantity=None, actor=ACTOR)
    ledger.import_ids(name, "\n".join(ids).encode(), actor=ACTOR)
    ledger.set_lot_state(name, LotState.ACTIVE, actor=ACTOR)
    return name


def _reserved_serials(db: Path) -> set[str]:
    """What another connection sees as reserved or provisioned: only what was committed."""
    with sqlite3.connect(db) as other:
        rows = other.execute("SELECT hw_serial FROM device WHERE hw_serial IS NOT NULL").fetchall()
    return {row[0] for row in rows}


def test_a_group_is_invisible_until_it_ends_then_all_of_it_is_there(db: Path) -> None:
    with Ledger.open(f"sqlite:///{db}") as ledger:
        lot = _active_lot(ledger, _ids(3))
        with ledger._group_commit():
            for index in range(3):
                ledger.reserve(lot, f"se-{index}", station=ACTOR, port="1", job_id=None, actor=ACTOR)
            # Inside the group each call sees the ones before it ...
            assert ledger.find_by_serial(lot, "se-0") is not None
            # ... and no other connection sees any of them yet.
            assert _reserved_serials(db) == set()
        assert _reserved_serials(db) == {"se-0", "se-1", "se-2"}
        assert ledger.verify_audit() > 0


def test_a_failing_call_is_rolled_back_alone_and_the_chain_stays_whole(db: Path) -> None:
    with Ledger.open(f"sqlite:///{db}") as ledger:
        ids = _ids(2)
        lot = _active_lot(ledger, ids)
        with ledger._group_commit():
            first = ledger.reserve(lot, "se-a", station=ACTOR, port="1", job_id=None, actor=ACTOR)
            # Provisioning an ID no board reserved is refused: its savepoint is rolled back.
            with pytest.raises(LedgerError):
                ledger.mark_provisioned(
                    lot, ids[1], "se-x", cert_der=CERT, cert_serial="01",
                    fingerprint_sha256=hashlib.sha256(CERT).hexdigest(), station=ACTOR, port="1", actor=ACTOR,
                )  # fmt: skip
            second = ledger.reserve(lot, "se-b", station=ACTOR, port="2", job_id=None, actor=ACTOR)
        assert {first.device_id, second.device_id} == set(ids)
        assert _reserved_serials(db) == {"se-a", "se-b"}
        record = ledger.find_device(ids[1])
        assert record is not None
        assert record.state is DeviceState.RESERVED
        assert record.hw_serial == "se-b"
        # Every link the group appended is chained: the refused call left no gap or stray link.
        assert ledger.verify_audit() > 0


def test_an_orm_transaction_inside_a_group_is_refused_and_nothing_of_the_group_lands(db: Path) -> None:
    with Ledger.open(f"sqlite:///{db}") as ledger:
        lot = _active_lot(ledger, _ids(1))

        def reserve_then_create_a_lot() -> None:
            with ledger._group_commit():
                ledger.reserve(lot, "se-1", station=ACTOR, port="1", job_id=None, actor=ACTOR)
                ledger.create_lot(
                    "other", customer="ACME", profile=LotProfile(), target_quantity=None, actor=ACTOR
                )

        with pytest.raises(RuntimeError, match="group commit"):
            reserve_then_create_a_lot()
        assert _reserved_serials(db) == set()
        assert ledger.find_by_serial(lot, "se-1") is None


def _defer_a_broken_foreign_key(ledger: Ledger) -> None:
    """In the caller's group: a row whose foreign key fails only at COMMIT (SQLite's deferred check)."""
    with ledger._hot(write=True) as tx:
        tx._cursor.execute("PRAGMA defer_foreign_keys = ON", {})
        tx._cursor.execute("INSERT INTO attempt (job_id, step, outcome, duration_s, at) "
                           "VALUES (999999, 'x', 'error', 0, '2026-01-01')", {})  # fmt: skip


def test_a_commit_that_fails_takes_the_whole_group_with_it(db: Path) -> None:
    with Ledger.open(f"sqlite:///{db}") as ledger:
        lot = _active_lot(ledger, _ids(2))

        def reserve_then_break_the_commit() -> None:
            with ledger._group_commit():
                ledger.reserve(lot, "se-1", station=ACTOR, port="1", job_id=None, actor=ACTOR)
                _defer_a_broken_foreign_key(ledger)

        with pytest.raises(LedgerError):
            reserve_then_break_the_commit()
        assert _reserved_serials(db) == set()
        # The ledger works on: the next write (alone) commits, onto the chain as it was.
        ledger.reserve(lot, "se-2", station=ACTOR, port="1", job_id=None, actor=ACTOR)
        assert _reserved_serials(db) == {"se-2"}
        assert ledger.verify_audit() > 0


async def test_concurrent_writes_share_commits_and_are_settled_only_once_durable(db: Path) -> None:
    counter = CommitCounter()
    counter.install()
    ids = _ids(BOARDS)
    async with AsyncLedger.open(f"sqlite:///{db}") as aledger:
        lot = await asyncio.to_thread(_active_lot, aledger.sync, ids)
        before = counter.commits
        seen_durable: list[bool] = []

        async def board(index: int) -> str:
            serial = f"se-{index:03d}"
            job = await aledger.start_job(lot, station=ACTOR, port=str(index), hw_serial=serial)
            reservation = await aledger.reserve(
                lot, serial, station=ACTOR, port=str(index), job_id=job, actor=ACTOR
            )
            # Settled means committed: another connection sees it at once.
            seen_durable.append(serial in _reserved_serials(db))
            await aledger.finish_job(job, outcome="provisioned", reason=None)
            return reservation.device_id

        got = await asyncio.gather(*(board(index) for index in range(BOARDS)))
        commits = counter.commits - before
    assert sorted(got) == sorted(ids)
    assert all(seen_durable)
    # 3 writes a board; queued together they shared COMMITs.
    assert 1 <= commits < 3 * BOARDS


async def test_a_failed_group_commit_fails_every_write_in_it_and_none_lands(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _ids(BOARDS)
    async with AsyncLedger.open(f"sqlite:///{db}") as aledger:
        ledger = aledger.sync
        lot = await asyncio.to_thread(_active_lot, ledger, ids)
        original = ledger.reserve
        calls = {"n": 0}

        def reserve_then_break_the_commit(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 1:
                _defer_a_broken_foreign_key(ledger)
            return result

        monkeypatch.setattr(ledger, "reserve", reserve_then_break_the_commit)
        results = await asyncio.gather(
            *(
                aledger.reserve(lot, f"se-{index:03d}", station=ACTOR, port="1", job_id=None, actor=ACTOR)
                for index in range(BOARDS)
            ),
            return_exceptions=True,
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    landed = _reserved_serials(db)
    # The first reservation broke its group's COMMIT: every write of that group failed, none landed;
    # the writes queued after it formed groups of their own and landed.
    assert failed
    assert all(isinstance(r, LedgerError) for r in failed)
    assert len(landed) == BOARDS - len(failed)
    assert "se-000" not in landed


async def test_the_observer_is_told_of_every_group_that_committed(db: Path) -> None:
    counter = CommitCounter()
    counter.install()
    ids = _ids(BOARDS)
    told: list[tuple[int, float]] = []
    async with AsyncLedger.open(f"sqlite:///{db}") as aledger:
        lot = await asyncio.to_thread(_active_lot, aledger.sync, ids)
        observe_group_commits(aledger, lambda writes, seconds: told.append((writes, seconds)))
        before = counter.commits

        async def board(index: int) -> None:
            serial = f"se-{index:03d}"
            job = await aledger.start_job(lot, station=ACTOR, port=str(index), hw_serial=serial)
            await aledger.reserve(lot, serial, station=ACTOR, port=str(index), job_id=job, actor=ACTOR)
            await aledger.finish_job(job, outcome="provisioned", reason=None)

        await asyncio.gather(*(board(index) for index in range(BOARDS)))
        commits = counter.commits - before
    # One report per COMMIT, and together they hold every write (3 a board).
    assert len(told) == commits
    assert sum(writes for writes, _ in told) == 3 * BOARDS
    assert all(writes >= 1 and seconds >= 0 for writes, seconds in told)


async def test_a_station_exports_its_group_commits(tmp_path: Path) -> None:
    line = await make_line(tmp_path, boards=12, ports=4)
    hub = line.hub(ports=4, supply=12)
    daemon = Daemon(
        line.settings, DaemonHooks(hub=hub, passphrase=line.passphrase, stop_when=lambda _s: hub.exhausted)
    )
    async with asyncio.timeout(60):
        station = await daemon.run()
    assert station.outcomes["provisioned"] == 12
    registry = daemon.metrics.registry
    groups = registry.get_sample_value("factoryd_ledger_group_writes_count")
    writes = registry.get_sample_value("factoryd_ledger_group_writes_sum")
    assert groups is not None
    assert writes is not None
    # Four writes a board at least (job start, reservation, issuance record, provision), in fewer
    # or as many commits; the transactions' time is recorded for each.
    assert writes >= 4 * 12
    assert 1 <= groups <= writes
    assert registry.get_sample_value("factoryd_ledger_group_seconds_count") == groups


async def test_an_observer_that_fails_keeps_no_write_waiting(db: Path) -> None:
    ids = _ids(3)
    async with AsyncLedger.open(f"sqlite:///{db}") as aledger:
        lot = await asyncio.to_thread(_active_lot, aledger.sync, ids)

        def broken(_writes: int, _seconds: float) -> None:
            raise RuntimeError("observer broke")

        observe_group_commits(aledger, broken)
        got = await asyncio.wait_for(
            asyncio.gather(
                *(
                    aledger.reserve(lot, f"se-{index}", station=ACTOR, port="1", job_id=None, actor=ACTOR)
                    for index in range(3)
                )
            ),
            10,
        )
    assert sorted(r.device_id for r in got) == sorted(ids)
    assert _reserved_serials(db) == {"se-0", "se-1", "se-2"}
