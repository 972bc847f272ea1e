"""`factoryd bench tools`: both ways of starting a tool are measured, on the loop asked for.

What they cost is the benchmark's to report (docs/performance.md #20g), not a test's to bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factoryd.bench.tools import run_tools_bench
from factoryd.cli.main import app


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_bench_measures_both_ways_in_a_process_of_the_size_asked(loop: str) -> None:
    result = run_tools_bench(5, rss_mib=60, loop=loop)
    assert result["loop"] == loop
    assert result["rss_mib"] >= 60
    assert result["runs_each"] == 5
    assert result["daemon_uses"] == "run_tool"
    assert set(result["ways"]) == {"run_tool", "loop.subprocess_exec"}
    for figures in result["ways"].values():
        assert figures["cpu_ms_per_run"] > 0
        assert figures["wall_ms_per_run"] > 0
    assert result["python_10m_adds_s"] > 0


def test_the_cli_writes_the_json_result(tmp_path: Path) -> None:
    out = CliRunner().invoke(
        app, ["bench", "tools", "--runs", "5", "--rss-mib", "1", "-o", str(tmp_path / "t.json")]
    )
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "t.json").read_text())["bench"] == "tools"


def test_the_cli_names_a_bad_loop() -> None:
    out = CliRunner().invoke(app, ["bench", "tools", "--loop", "trio"])
    assert out.exit_code != 0
    assert "--loop must be auto, asyncio or uvloop" in out.output
