"""Fault 5: the API, the station page's event stream and /metrics flooded while the line provisions.

A load generator in another process (``factoryd.bench.load``, bounded in requests and time, to
127.0.0.1 only) hammers all three while the real daemon provisions boards from a `factoryd sim hub`
process. Requests past the limits must be refused at once with 429/503/413 (no timeouts), every
board must still be provisioned exactly once, and the daemon's memory must stay bounded. No time
is asserted: `factoryd bench load` measures the rates (docs/bench/load.json).

CI runs a short flood on a small line; ``FAULTS_LONG=1`` a longer one on more boards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from factoryd.api.limits import LoadLimitMiddleware, LoadLimits
from factoryd.bench.load import LoadPlan, run_line
from factoryd.telemetry.limits import TokenBuckets
from tests.helpers.line_procs import check_invariants

LONG = os.environ.get("FAULTS_LONG") == "1"
PORTS = 8 if LONG else 4
DEVICES = 200 if LONG else 40
# The daemon may grow by this much under the flood (buffers, caches, one render per stream); a leak
# per request would be tens of MB over the thousands of requests sent.
RSS_GROWTH_MAX_BYTES = 80 * 1024 * 1024


@pytest.mark.faults
@pytest.mark.timeout(600 if LONG else 120)
async def test_flooded_station_refuses_quickly_and_keeps_provisioning(tmp_path: Path) -> None:
    plan = LoadPlan(duration_s=300 if LONG else 30, max_requests=200_000 if LONG else 20_000)
    run = await run_line(
        tmp_path, ports=PORTS, devices=DEVICES, timing="realistic", timing_scale=0.3, plan=plan
    )
    assert run.load is not None, "the load generator reported nothing"
    kinds = run.load["kinds"]
    statuses = {kind: v["statuses"] for kind, v in kinds.items()}
    # Every request got an answer; none waited into a timeout, none hit a dead socket.
    assert run.load["timeouts"] == 0, statuses
    assert not [s for v in statuses.values() for s in v if s.startswith("error")], statuses
    # Past the limits: 429 (rates), 503 (event streams over the cap), 413 (declared oversize body).
    assert statuses["metrics"].get("429", 0) > 0, statuses
    assert statuses["api"].get("429", 0) > 0, statuses
    assert statuses["events"].get("503", 0) > 0, statuses
    assert statuses["upload"].get("413", 0) > 0, statuses
    # Within them: real answers.
    for kind in ("metrics", "api", "events"):
        assert statuses[kind].get("200", 0) > 0, statuses
    assert run.streams_refused > 0
    # The line finished, exactly once per board.
    assert run.provisioned == DEVICES, run.outcomes
    check_invariants(run.ledger_url, run.inventory, min_provisioned=DEVICES)
    assert run.rss_after_bytes - run.rss_before_bytes < RSS_GROWTH_MAX_BYTES, run.summary()


@pytest.mark.faults
def test_token_buckets_are_bounded_and_refill() -> None:
    now = [0.0]
    buckets = TokenBuckets(2.0, 3, max_keys=100, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # the next token in half a second
    assert buckets.peek("a") == pytest.approx(0.5)  # the server's accept-time check spends nothing
    now[0] += 0.5
    assert buckets.peek("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.peek("never-seen") == 0.0
    for n in range(10_000):  # a spray of fake clients evicts, it does not grow memory
        buckets.take(f"fake-{n}")
    assert len(buckets) == 100


@pytest.mark.faults
async def test_event_stream_cap_answers_503_at_once() -> None:
    sent: list[dict[str, object]] = []
    entered: list[str] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        entered.append(str(scope["path"]))

    limits = LoadLimits(max_event_streams=1, address_rate_per_s=1000, address_burst=1000)
    middleware = LoadLimitMiddleware(app, limits)  # type: ignore[arg-type]
    middleware.streams = 1  # one stream is open

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/station/events", "client": ("127.0.0.1", 1), "headers": []}
    await middleware(scope, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"5") in sent[0]["headers"]  # type: ignore[operator]
    assert entered == []
    await middleware({**scope, "path": "/lots"}, None, send)  # type: ignore[arg-type]
    assert entered == ["/lots"]
