"""`factoryd bench attestation`: it runs, and the wire cost it reports is what the frames take.

The CPU figure is a benchmark's to report (docs/performance.md), not a test's to bound: no timing here.
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from factoryd.bench.attestation import run_attestation_bench
from factoryd.cli.main import app


def test_the_bench_reports_station_cpu_and_the_extra_wire_bytes() -> None:
    result = run_attestation_bench(rounds=5)
    assert result["rounds"] == 5
    assert result["station_cpu_ms_median"] > 0
    # Two certificates of a few hundred bytes, a statement signature and the possession round trip.
    assert 600 < result["extra_wire_bytes"] < 2500
    assert result["extra_wire_bytes"] == result["wire_bytes_attested"] - result["wire_bytes_plain_genkey"]
    assert result["extra_ms_at_115200_baud"] == round(result["extra_wire_bytes"] * 10 / 115200 * 1000, 1)


def test_the_cli_prints_the_json_result() -> None:
    out = CliRunner().invoke(app, ["bench", "attestation", "--rounds", "3"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["bench"] == "attestation"
