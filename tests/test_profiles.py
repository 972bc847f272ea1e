"""The board-profile registry: every profile has its four parts, and lots name only registered ones."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from pydantic import ValidationError

import factoryd
from factoryd.jobs.board import BoardSession
from factoryd.jobs.profiles import PROFILES, board_profile, profile_names
from factoryd.jobs.steps import Step
from factoryd.ledger.profile import LotProfile
from factoryd.sim.board import SimBoard
from factoryd.sim.profiles import SIM_BOARDS


def test_the_four_profiles_are_registered() -> None:
    assert profile_names() == ("factoryd-v1", "arduino-v1", "mcumgr", "nrf91-at")


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_has_framer_client_job_and_sim_board(name: str) -> None:
    profile = board_profile(name)
    assert profile.name == name
    decoder = profile.framer()
    assert decoder.feed(b"") == []
    assert decoder.take_errors() == 0
    assert profile.client.__module__.startswith("factoryd.protocol.")
    assert callable(profile.client.open)
    assert profile.session.__module__.startswith("factoryd.jobs.")  # type: ignore[attr-defined]
    for method in ("identify", "existing", "provision", "__aenter__", "__aexit__"):
        assert inspect.iscoroutinefunction(getattr(profile.session, method)), method
    assert isinstance(profile.session.identify_step, Step)  # type: ignore[attr-defined]
    assert callable(getattr(profile.session, "link_stats", None))
    assert issubclass(SIM_BOARDS[name], SimBoard)


def test_the_sim_table_names_exactly_the_registered_profiles() -> None:
    assert set(SIM_BOARDS) == set(PROFILES)


def test_session_protocol_names_what_the_pipeline_calls() -> None:
    members = {"identify", "existing", "provision", "link_stats", "identify_step"}
    assert members <= set(dir(BoardSession))


def test_unknown_profile_is_refused_with_the_known_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown board profile 'esp-idf'; known: factoryd-v1, arduino-v1, mcumgr, nrf91-at"
    ):
        board_profile("esp-idf")


def test_lot_profile_refuses_an_unknown_protocol_naming_the_known_ones() -> None:
    with pytest.raises(
        ValidationError, match=r"unknown board protocol 'esp-idf'; known: factoryd-v1, arduino-v1, mcumgr"
    ):
        LotProfile(protocol="esp-idf")
    assert LotProfile(protocol="arduino-v1").protocol == "arduino-v1"
    assert LotProfile().protocol == "factoryd-v1"


def test_no_driver_layer_imports_the_simulator() -> None:
    root = Path(factoryd.__file__).parent
    offenders = []
    for package in ("hub", "protocol", "transport", "jobs", "ledger", "pki"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("factoryd.sim")]
    assert offenders == []
