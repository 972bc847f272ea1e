"""Schemathesis drives every operation of the published OpenAPI spec: no generated request gets a 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.errors
import schemathesis
from hypothesis import HealthCheck, Phase

from factoryd.daemon import pipeline_settings
from factoryd.jobs.pipeline import Pipeline
from factoryd.jobs.scheduler import LotSource, Station
from factoryd.sim.board import SimBoard
from factoryd.sim.hub import SimHub
from factoryd.telemetry.live import LiveState
from tests.helpers.api import Api, api_settings, running_api

# Examples per operation and mode: ~23 operations x 2 modes stay well under a minute.
EXAMPLES_PER_OPERATION = 25


def _examples(
    operation: Any, mode: schemathesis.GenerationMode, api: Api, log: list[str]
) -> Callable[[], None]:
    """A Hypothesis test calling ``operation`` with generated cases; 5xx answers go to ``log``."""
    headers = api.headers("admin")

    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        log.append("call")
        response = case.call(base_url=api.url, headers=headers)
        if response.status_code >= 500:
            log.append(f"{operation.label} ({mode.value}): {response.status_code} {response.text}")

    return run


def _fuzz(spec: dict[str, Any], api: Api) -> tuple[int, list[str]]:
    """Run positive and negative examples of every operation; return (calls, server errors)."""
    schema = schemathesis.openapi.from_dict(spec)
    log: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                _examples(operation, mode, api, log)()
            except hypothesis.errors.Unsatisfiable:
                # An operation without parameters or body has no invalid variant to generate.
                if mode is not schemathesis.GenerationMode.NEGATIVE:
                    raise
    failures = [entry for entry in log if entry != "call"]
    return len(log) - len(failures), failures


async def test_generated_requests_never_get_a_server_error(tmp_path: Path) -> None:
    settings = api_settings(tmp_path)
    live = LiveState()
    async with running_api(tmp_path) as api:
        # A station that is built but not run: port controls work, nothing gets powered.
        hub = SimHub(2, SimBoard)
        api.ctx.station = Station(
            hub=hub,
            pipeline=Pipeline(
                hub=hub,
                ledger=api.ledger,
                telemetry=live,
                settings=pipeline_settings(settings),
                power_budget=asyncio.Semaphore(1),
            ),
            ledger=api.ledger,
            lots=LotSource(api.ledger, None, lambda info: None),  # type: ignore[arg-type,return-value]
            telemetry=live,
            rescan_s=1.0,
        )
        await api.make_lot("target", "acme")
        async with api.client() as anon:
            spec = (await anon.get("/openapi.json")).json()
        calls, failures = await asyncio.to_thread(_fuzz, spec, api)
    assert calls > 100
    assert not failures, "\n".join(failures[:10])
