"""``factoryd bench ledger``: durable claims (reserve + mark_provisioned) per second."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from statistics import quantiles

from factoryd.errors import IdsExhaustedError, InputError
from factoryd.ledger.core import Ledger
from factoryd.ledger.model import LotState
from factoryd.ledger.profile import LotProfile

BENCH_ACTOR = "bench"
# A stand-in certificate: the bench measures the ledger, not X.509 encoding.
_FAKE_CERT_DER = b"\x30\x03\x02\x01\x01"


def run_ledger_bench(url: str, n: int, threads: int) -> dict[str, object]:
    """Claim ``n`` IDs from a fresh throwaway lot with ``threads`` workers; return rates and latencies.

    The lot (``bench-<uuid>``) and its audit entries stay in the database: run it on a scratch database.
    """
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
