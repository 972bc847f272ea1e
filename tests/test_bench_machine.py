"""Every #20 benchmark says what machine it ran on, the interpreter's speed included."""

from __future__ import annotations

import pytest

from factoryd.bench.machine import REPORTED_ADDS, machine_info, python_speed_s


def test_python_speed_is_reported_per_ten_million_additions() -> None:
    small = python_speed_s(adds=200_000, repeats=2)
    assert small > 0
    # Scaled to 10 M additions: 50 times the 200 000-addition loop, so far above the loop's own time.
    assert small * 200_000 / REPORTED_ADDS < 1.0 < small * 1000


@pytest.mark.parametrize(("adds", "repeats"), [(0, 3), (1000, 0), (-5, 1)])
def test_python_speed_refuses_an_empty_calibration(adds: int, repeats: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        python_speed_s(adds=adds, repeats=repeats)


def test_machine_info_carries_the_speed_it_was_given_and_the_load() -> None:
    info = machine_info(1.234)
    assert info["python_10m_adds_s"] == 1.234
    assert info["cpus"] >= 1
    assert len(info["load_average"]) == 3
    assert info["python"].count(".") == 2
