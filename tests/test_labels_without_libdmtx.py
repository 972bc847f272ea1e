"""A station without Debian's libdmtx: it provisions, and labels that need a DataMatrix fail in words.

pylibdmtx is imported when the first DataMatrix is made (labels/symbols.py), so `pip install factoryd`
on a fresh machine runs the demo; with labels on, the station says what to install and the demo ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from factoryd.demo import DemoOptions, run_demo
from factoryd.labels.errors import LabelRenderError
from factoryd.labels.symbols import datamatrix_matrix


def _without_libdmtx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pylibdmtx", None)
    monkeypatch.setitem(sys.modules, "pylibdmtx.pylibdmtx", None)


def test_a_datamatrix_without_libdmtx_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_libdmtx(monkeypatch)
    with pytest.raises(LabelRenderError, match="apt-get install libdmtx0b"):
        datamatrix_matrix(b"6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b")


async def test_the_demo_provisions_and_counts_labels_it_cannot_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_libdmtx(monkeypatch)
    plain = await run_demo(DemoOptions(ports=2, boards=3, seed=1, state_dir=tmp_path / "plain"))
    assert plain.provisioned == 3
    labelled = await run_demo(
        DemoOptions(ports=2, boards=3, seed=1, state_dir=tmp_path / "labels", labels=True)
    )
    assert labelled.provisioned == 3
    assert (labelled.labels_printed, labelled.labels_failed) == (0, 3)
