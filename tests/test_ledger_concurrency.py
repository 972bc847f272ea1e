"""Several stations claiming from one lot at once: no ID twice, no serial with two IDs."""

from __future__ import annotations

import multiprocessing
import random
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from factoryd.errors import IdListError, IdsExhaustedError
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.bench import run_ledger_bench
from factoryd.ledger.testing import throwaway_postgres_database

ACTOR = "station"
THREADS = 8
CLAIMS_PER_THREAD = 12
# Fewer serials than claims: boards are re-inserted and several stations ask for the same one at once.
SERIALS = 60


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this module."""
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    value: str = request.getfixturevalue("pg_url")
    return value


def make_active_lot(url: str, count: int) -> str:
    """A fresh active lot with ``count`` IDs."""
    name = f"lot-{uuid.uuid4().hex[:10]}"
    with Ledger.open(url) as ledger:
        ledger.create_lot(name, customer="ACME", profile=LotProfile(), target_quantity=count, actor=ACTOR)
        ledger.import_ids(name, "\n".join(str(uuid.uuid4()) for _ in range(count)).encode(), actor=ACTOR)
        ledger.set_lot_state(name, LotState.ACTIVE, actor=ACTOR)
    return name


def check_invariants(url: str, lot: str, seen: list[tuple[str, str]]) -> None:
    """Every serial got one ID, every ID went to one serial, both in replies and in the database."""
    by_serial: dict[str, set[str]] = defaultdict(set)
    by_id: dict[str, set[str]] = defaultdict(set)
    for serial, device_id in seen:
        by_serial[serial].add(device_id)
        by_id[device_id].add(serial)
    assert all(len(ids) == 1 for ids in by_serial.values()), "a serial got two IDs"
    assert all(len(serials) == 1 for serials in by_id.values()), "an ID went to two boards"
    with Ledger.open(url) as ledger:
        with ledger._engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT d.device_id, d.hw_serial FROM device d JOIN lot l ON l.id = d.lot_id "
                    "WHERE l.name = :lot AND d.hw_serial IS NOT NULL"
                ),
                {"lot": lot},
            ).all()
        assert {row.hw_serial: row.device_id for row in rows} == {
            s: next(iter(i)) for s, i in by_serial.items()
        }
        assert ledger.progress(lot).reserved == len(by_serial)
        assert ledger.verify_audit() > 0


def claim_many(url: str, lot: str, worker: int, serials: list[str]) -> list[tuple[str, str]]:
    """One station: its own connection pool, reserving a series of serials."""
    got: list[tuple[str, str]] = []
    with Ledger.open(url) as ledger:
        for serial in serials:
            reservation = ledger.reserve(
                lot, serial, station=f"st{worker}", port="1", job_id=None, actor=ACTOR
            )
            got.append((serial, reservation.device_id))
    return got


def test_threads_with_their_own_connections_never_double_assign(url: str) -> None:
    lot = make_active_lot(url, SERIALS)
    rng = random.Random(4711)  # noqa: S311 - reproducible test plan, not cryptography
    serials = [f"se-{i:04d}" for i in range(SERIALS)]
    plans = [[rng.choice(serials) for _ in range(CLAIMS_PER_THREAD)] for _ in range(THREADS)]
    plans[1] = list(plans[0])  # two stations racing for the same boards in the same order
    seen: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def station(index: int) -> None:
        try:
            start.wait()
            got = claim_many(url, lot, index, plans[index])
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            seen.extend(got)

    threads = [threading.Thread(target=station, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(seen) == THREADS * CLAIMS_PER_THREAD
    check_invariants(url, lot, seen)


def test_exhaustion_under_contention_hands_out_each_id_once(url: str) -> None:
    ids_in_lot = 10
    lot = make_active_lot(url, ids_in_lot)
    granted: list[tuple[str, str]] = []
    exhausted: list[str] = []
    lock = threading.Lock()

    def station(index: int) -> None:
        with Ledger.open(url) as ledger:
            for n in range(4):
                serial = f"st{index}-{n}"
                try:
                    r = ledger.reserve(
                        lot, serial, station=f"st{index}", port=str(n), job_id=None, actor=ACTOR
                    )
                except IdsExhaustedError:
                    with lock:
                        exhausted.append(serial)
                else:
                    with lock:
                        granted.append((serial, r.device_id))

    threads = [threading.Thread(target=station, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == ids_in_lot
    assert len(exhausted) == 6 * 4 - ids_in_lot
    check_invariants(url, lot, granted)


def test_stations_asking_for_the_same_serial_at_once_share_one_reservation(url: str) -> None:
    lot = make_active_lot(url, 20)
    stations = 6
    rounds = 5
    ledgers = [Ledger.open(url) for _ in range(stations)]
    barrier = threading.Barrier(stations)
    replies: list[tuple[str, str, bool]] = []
    lock = threading.Lock()

    def station(index: int) -> None:
        for n in range(rounds):
            barrier.wait()  # every station asks for board n at the same moment
            r = ledgers[index].reserve(
                lot, f"board-{n}", station=f"st{index}", port="1", job_id=None, actor=ACTOR
            )
            with lock:
                replies.append((f"board-{n}", r.device_id, r.resumed))

    try:
        threads = [threading.Thread(target=station, args=(i,)) for i in range(stations)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for ledger in ledgers:
            ledger.close()
    assert len(replies) == stations * rounds
    fresh = [serial for serial, _, resumed in replies if not resumed]
    assert sorted(fresh) == [f"board-{n}" for n in range(rounds)]  # exactly one fresh claim per board
    check_invariants(url, lot, [(serial, device_id) for serial, device_id, _ in replies])


@pytest.mark.postgres
def test_concurrent_imports_of_overlapping_lists_leave_one_whole_list(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = [str(uuid.uuid4()) for _ in range(50)]
    lists = {name: shared + [str(uuid.uuid4()) for _ in range(10)] for name in ("left", "right")}
    lots = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in lists}
    with Ledger.open(pg_url) as ledger:
        for lot in lots.values():
            ledger.create_lot(lot, customer="ACME", profile=LotProfile(), target_quantity=None, actor=ACTOR)
    # Both imports pass the duplicate check before either commits: the unique index decides.
    both_checked = threading.Barrier(2, timeout=30)
    original = Ledger._refuse_known_ids

    def check_then_wait(self: Ledger, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        both_checked.wait()

    monkeypatch.setattr(Ledger, "_refuse_known_ids", check_then_wait)
    outcomes: dict[str, object] = {}

    def importer(name: str) -> None:
        with Ledger.open(pg_url) as ledger:
            try:
                outcomes[name] = ledger.import_ids(lots[name], "\n".join(lists[name]).encode(), actor=ACTOR)
            except IdListError as exc:
                outcomes[name] = exc

    threads = [threading.Thread(target=importer, args=(name,)) for name in lists]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = sorted(v for v in outcomes.values() if isinstance(v, int))
    refusals = [v for v in outcomes.values() if isinstance(v, IdListError)]
    assert counts == [60]
    assert len(refusals) == 1
    assert "imported concurrently" in str(refusals[0])
    with Ledger.open(pg_url) as ledger:
        assert sorted(ledger.progress(lot).total for lot in lots.values()) == [0, 60]


def _process_station(url: str, lot: str, worker: int, serials: list[str], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put(claim_many(url, lot, worker, serials))


def test_processes_share_one_sqlite_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    lot = make_active_lot(url, 40)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    serials = [f"se-{i:03d}" for i in range(30)]
    processes = [
        context.Process(
            target=_process_station, args=(url, lot, worker, serials[worker::2] + serials[:5], out)
        )
        for worker in range(3)
    ]
    for process in processes:
        process.start()
    results = [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    seen = [pair for result in results for pair in result]
    assert len(seen) == sum(len(serials[w::2]) + 5 for w in range(3))
    check_invariants(url, lot, seen)


def test_bench_reports_durable_claims(url: str) -> None:
    result = run_ledger_bench(url, 30, 3)
    assert result["claimed"] == 30
    assert isinstance(result["claims_per_s"], float)
    assert result["claims_per_s"] > 0
    assert result["backend"] in ("sqlite", "postgresql")
    # The machine it ran on: the interpreter's speed (docs/performance.md compares machines by it).
    assert isinstance(result["python_10m_adds_s"], float)
    assert result["python_10m_adds_s"] > 0
    with Ledger.open(url) as ledger:
        lot = str(result["lot"])
        assert ledger.get_lot(lot).state is LotState.CLOSED
        assert ledger.progress(lot).provisioned == 30


def test_bench_warms_the_ledger_up_on_another_lot_first(url: str) -> None:
    with Ledger.open(url) as ledger:
        before = {info.name for info in ledger.list_lots()}
    result = run_ledger_bench(url, 20, 2, warm=15)
    assert result["claimed"] == 20
    warm_up = result["warm_up"]
    assert isinstance(warm_up, dict)
    assert warm_up["claims"] == 15
    assert warm_up["claims_per_s"] > 0
    with Ledger.open(url) as ledger:
        made = {
            info.name: ledger.progress(info.name).provisioned
            for info in ledger.list_lots()
            if info.name not in before
        }
    # The warm-up claimed from a lot of its own, then the timed run from another.
    assert sorted(made.values()) == [15, 20]
    assert made[str(result["lot"])] == 20


@pytest.mark.postgres
def test_bench_stations_each_keep_their_own_chain_and_report_both_sides_cpu(pg_url: str) -> None:
    """``bench ledger --stations``: processes of their own, one chain each, no ID twice; the server's CPU
    is read from this machine's postgres processes (the test's cluster runs here)."""
    result = run_ledger_bench(pg_url, 40, 1, stations=2)
    assert result["claimed"] == 40
    assert result["duplicate_ids"] == 0
    per_station = result["per_station"]
    assert isinstance(per_station, dict)
    assert sum(per_station.values()) == 40
    assert result["audit_chain_entries"] == {name: 2 * count for name, count in per_station.items()}
    for side in ("station_cpu_ms_per_claim", "server_cpu_ms_per_claim"):
        value = result[side]
        assert isinstance(value, float)
        assert value > 0, side
