"""`factoryd bench signer` runs end to end on a small load and reports its figures (no time asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from factoryd.cli.main import app


def test_the_signer_bench_reports_throughput_and_added_latency(tmp_path: Path) -> None:
    out = tmp_path / "signer.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "signer",
            "--stations",
            "2",
            "--per-station",
            "3",
            "--latency-samples",
            "3",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "signer"
    assert figures["requests"] == 6
    assert figures["stations"] == 2
    assert figures["certificates_per_second"] > 0
    assert set(figures["added_latency_per_board_ms"]) == {"idle_p50", "idle_p95", "loaded_p50", "loaded_p95"}
    assert set(figures["issue_step_ms"]) == {"local_signing", "through_signer_idle", "through_signer_loaded"}
