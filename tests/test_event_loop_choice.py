"""``[station] event_loop``: which loop ``factoryd run`` runs the daemon on (#20b)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from factoryd.cli.main import run_event_loop
from factoryd.config import Settings
from factoryd.errors import ConfigError


def _loop_module(choice: str) -> str:
    """The module of the loop class ``run_event_loop(choice)`` ran a coroutine on."""
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_event_loop(main, choice)
    return seen[0]


def test_default_is_auto() -> None:
    assert Settings().station.event_loop == "auto"


def test_asyncio_is_the_standard_loop() -> None:
    assert _loop_module("asyncio").startswith("asyncio")


def test_uvloop_and_auto_run_on_uvloop_when_installed() -> None:
    assert _loop_module("uvloop").startswith("uvloop")
    assert _loop_module("auto").startswith("uvloop")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert _loop_module("auto").startswith("asyncio")
    with pytest.raises(ConfigError, match="uvloop is not installed: pip install uvloop"):
        _loop_module("uvloop")
