"""Runs the atheris fuzz targets for a bounded number of inputs (coverage-guided, libFuzzer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TARGETS = sorted((Path(__file__).parent / "fuzz").glob("fuzz_*.py"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", TARGETS, ids=lambda p: p.stem)
def test_fuzz_target_survives(target: Path, tmp_path: Path) -> None:
    result = subprocess.run(  # noqa: S603 - our own interpreter and fuzz target
        [sys.executable, str(target), "-runs=30000", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 30000 runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))
