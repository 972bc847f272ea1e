"""``factoryd bench ledger``: durable claims (reserve + mark_provisioned) per second.

Two shapes: ``threads`` workers in this process acting as one station (one audit chain), or
``stations`` separate processes, each its own station with its own connection pool and audit
chain, the way several line PCs share one PostgreSQL ledger.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from multiprocessing.synchronize import Event as EventType
from statistics import quantiles
from typing import Any

from factoryd.bench.layers import processes_cpu_s
from factoryd.bench.machine import machine_info, python_speed_s
from factoryd.errors import IdsExhaustedError, InputError, LedgerError
from factoryd.ledger.core import Ledger, verify_audit_chains
from factoryd.ledger.model import LotState
from factoryd.ledger.profile import LotProfile

BENCH_ACTOR = "bench"
# A stand-in certificate: the bench measures the ledger, not X.509 encoding.
_FAKE_CERT_DER = b"\x30\x03\x02\x01\x01"
# A station process imports factoryd and opens its pool before the start signal; generous for CI.
STATION_START_TIMEOUT_S = 120.0
STATION_RUN_TIMEOUT_S = 600.0
# The command name of PostgreSQL's server processes (for the server's CPU when it runs on this machine).
POSTGRES_COMMAND = "postgres"


def _claim_one(ledger: Ledger, lot: str, station: str, serial: str, port: str) -> str:
    """One durable claim: reserve an ID for ``serial``, then mark it provisioned; the ID."""
    reservation = ledger.reserve(lot, serial, station=station, port=port, job_id=None, actor=station)
    ledger.mark_provisioned(
        lot,
        reservation.device_id,
        serial,
        cert_der=_FAKE_CERT_DER,
        cert_serial="01",
        fingerprint_sha256=hashlib.sha256(_FAKE_CERT_DER).hexdigest(),
        station=station,
        port=port,
        actor=station,
    )
    return reservation.device_id


def _station_main(url: str, lot: str, station: str, queues: tuple[Any, Any], go: EventType) -> None:
    """One station process: open the ledger, wait for the start, claim until the lot is exhausted."""
    ready, results = queues
    latencies: list[float] = []
    ids: list[str] = []
    error = None
    cpu_s = 0.0
    try:
        with Ledger.open(url) as ledger:
            ready.put(station)
            started = go.wait(STATION_START_TIMEOUT_S)
            cpu_started = time.process_time()
            while started:
                serial = f"{station}-{uuid.uuid4().hex[:16]}"
                began = time.perf_counter()
                try:
                    ids.append(_claim_one(ledger, lot, station, serial, "1"))
                except IdsExhaustedError:
                    break
                latencies.append(time.perf_counter() - began)
            cpu_s = time.process_time() - cpu_started
            if not started:
                error = "no start signal"
    except Exception as exc:  # reported to the parent, which raises it
        error = f"{type(exc).__name__}: {exc}"
        ready.put(station)
    results.put(
        {
            "station": station,
            "latencies": latencies,
            "ids": ids,
            "end": time.time(),
            "error": error,
            "cpu_s": cpu_s,
        }
    )


def run_ledger_bench(
    url: str, n: int, threads: int, *, stations: int = 0, warm: int = 0
) -> dict[str, object]:
    """Claim ``n`` IDs from a fresh throwaway lot: ``stations`` processes, or else ``threads`` workers.

    With ``warm``, the same shape first claims that many IDs from another lot, untimed, so the timed
    run meets a ledger in service (tables of some size, analysed, autovacuum past its first rounds)
    rather than a fresh one. The lots (``bench-<uuid>``) and their audit entries stay in the database:
    run it on a scratch database.
    """
    speed = python_speed_s()
    warmed: dict[str, object] | None = None
    if warm:
        warmed = _run(url, warm, threads, stations)
        _settle(url)
    result = _run(url, n, threads, stations)
    if warmed is not None:
        result["warm_up"] = {"claims": warm, "claims_per_s": warmed["claims_per_s"]}
    result.update(machine_info(speed))
    return result


def _run(url: str, n: int, threads: int, stations: int) -> dict[str, object]:
    return _run_stations(url, n, stations) if stations else _run_threads(url, n, threads)


def _server_ms_per_claim(before: dict[int, float], after: dict[int, float], claims: int) -> float | None:
    """CPU of this machine's postgres processes per claim between two readings; None if there are none."""
    if not after or claims < 1:
        return None
    used = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
    return round(used / claims * 1000, 3)


def _settle(url: str) -> None:
    """After a warm-up: the statistics of the claim's tables caught up, as a ledger in service has them."""
    with Ledger.open(url) as ledger:
        ledger._refresh_statistics("lot", "device", "job", "audit_head", "audit_entry")


def _run_threads(url: str, n: int, threads: int) -> dict[str, object]:
    """``threads`` workers of one process claim ``n`` IDs from a fresh lot (one station, one chain)."""
    if n < 1 or threads < 1:
        raise InputError(f"bench needs n >= 1 and threads >= 1, got n={n}, threads={threads}")
    lot = f"bench-{uuid.uuid4().hex[:12]}"
    fingerprint = hashlib.sha256(_FAKE_CERT_DER).hexdigest()
    with Ledger.open(url) as ledger:
        ledger.create_lot(lot, customer="bench", profile=LotProfile(), target_quantity=n, actor=BENCH_ACTOR)
        ids = "\n".join(str(uuid.uuid4()) for _ in range(n)).encode()
        ledger.import_ids(lot, ids, fmt="txt", actor=BENCH_ACTOR)
        ledger.set_lot_state(lot, LotState.ACTIVE, actor=BENCH_ACTOR)
        latencies_s: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(index: int) -> None:
            mine: list[float] = []
            try:
                while True:
                    serial = f"bench{index:03d}{uuid.uuid4().hex[:16]}"
                    started = time.perf_counter()
                    try:
                        reservation = ledger.reserve(
                            lot, serial, station="bench", port=str(index), job_id=None, actor=BENCH_ACTOR
                        )
                    except IdsExhaustedError:
                        break
                    ledger.mark_provisioned(
                        lot,
                        reservation.device_id,
                        serial,
                        cert_der=_FAKE_CERT_DER,
                        cert_serial="01",
                        fingerprint_sha256=fingerprint,
                        station="bench",
                        port=str(index),
                        actor=BENCH_ACTOR,
                    )
                    mine.append(time.perf_counter() - started)
            except BaseException as exc:  # reported to the caller below, never swallowed
                with lock:
                    errors.append(exc)
            with lock:
                latencies_s.extend(mine)

        workers = [
            threading.Thread(target=worker, args=(i,), name=f"ledger-bench-{i}") for i in range(threads)
        ]
        started = time.perf_counter()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed_s = time.perf_counter() - started
        if errors:
            raise errors[0]
        ledger.set_lot_state(lot, LotState.CLOSED, actor=BENCH_ACTOR)
        progress = ledger.progress(lot)
        backend = ledger.backend
    cuts = quantiles(latencies_s, n=100, method="inclusive") if len(latencies_s) > 1 else latencies_s * 99
    return {
        "backend": backend,
        "lot": lot,
        "n": n,
        "threads": threads,
        "claimed": progress.provisioned,
        "elapsed_s": round(elapsed_s, 4),
        "claims_per_s": round(progress.provisioned / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "latency_p50_ms": round(cuts[49] * 1000, 2),
        "latency_p99_ms": round(cuts[98] * 1000, 2),
    }


def _prepare_lot(ledger: Ledger, n: int) -> str:
    """A fresh active lot of ``n`` IDs."""
    lot = f"bench-{uuid.uuid4().hex[:12]}"
    ledger.create_lot(lot, customer="bench", profile=LotProfile(), target_quantity=n, actor=BENCH_ACTOR)
    ids = "\n".join(str(uuid.uuid4()) for _ in range(n)).encode()
    ledger.import_ids(lot, ids, fmt="txt", actor=BENCH_ACTOR)
    ledger.set_lot_state(lot, LotState.ACTIVE, actor=BENCH_ACTOR)
    return lot


def _run_stations(url: str, n: int, stations: int) -> dict[str, object]:
    """``stations`` processes claim from one lot at once, each its own station and audit chain."""
    if n < 1 or stations < 1:
        raise InputError(f"bench needs n >= 1 and stations >= 1, got n={n}, stations={stations}")
    with Ledger.open(url) as ledger:
        lot = _prepare_lot(ledger, n)
        backend = ledger.backend
    # spawn, not fork: the parent holds a connection pool and threads.
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    names = [f"bench-station-{i:02d}" for i in range(stations)]
    procs = [
        context.Process(target=_station_main, args=(url, lot, name, (ready, results), go), name=name)
        for name in names
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=STATION_START_TIMEOUT_S)
        server_before = processes_cpu_s(POSTGRES_COMMAND)
        started = time.time()
        go.set()
        reports = [results.get(timeout=STATION_RUN_TIMEOUT_S) for _ in procs]
        server_after = processes_cpu_s(POSTGRES_COMMAND)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = [r["error"] for r in reports if r["error"]]
    if failed:
        raise LedgerError(f"a bench station failed: {failed[0]}")
    elapsed_s = max(r["end"] for r in reports) - started
    latencies = [x for r in reports for x in r["latencies"]]
    held = Counter(i for r in reports for i in r["ids"])
    with Ledger.open(url) as ledger:
        ledger.set_lot_state(lot, LotState.CLOSED, actor=BENCH_ACTOR)
        progress = ledger.progress(lot)
        chains = verify_audit_chains(ledger)
    cuts = quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "backend": backend,
        "lot": lot,
        "n": n,
        "stations": stations,
        "shape": "one process per station, each with its own pool and audit chain",
        "claimed": progress.provisioned,
        "duplicate_ids": sum(1 for count in held.values() if count > 1),
        "per_station": {r["station"]: len(r["ids"]) for r in reports},
        "audit_chain_entries": {name: chains[name].count for name in names if name in chains},
        "elapsed_s": round(elapsed_s, 4),
        "claims_per_s": round(progress.provisioned / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "latency_p50_ms": round(cuts[49] * 1000, 2),
        "latency_p99_ms": round(cuts[98] * 1000, 2),
        # The stations' own CPU over their claim loops (the database server's is not in it).
        "station_cpu_ms_per_claim": round(
            sum(r["cpu_s"] for r in reports) / max(len(latencies), 1) * 1000, 3
        ),
        # The server's, if it runs on this machine: every postgres process (backends, WAL writer,
        # autovacuum) over the same window; processes that ended meanwhile are missing from it.
        "server_cpu_ms_per_claim": _server_ms_per_claim(server_before, server_after, len(latencies)),
    }
