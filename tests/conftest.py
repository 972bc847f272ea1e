"""Shared fixtures: leftover-task check, simulated boards behind real PTYs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from factoryd.protocol.native import BoardClient
from factoryd.sim.board import SimBoard
from factoryd.sim.pty import PtyBoard, serve_pty
from tests.helpers.boards import FAST_TIMEOUTS
from tests.helpers.mqtt_broker import mqtt_broker, mqtt_broker_factory  # noqa: F401 - pytest fixtures
from tests.helpers.postgres import postgres_server, pytest_runtest_setup  # noqa: F401 - pytest plugin


@pytest.fixture(autouse=True)
def restore_logging_config() -> Iterator[None]:
    """Tests that configure logging (CLI, demo, secrets) must not change it for the tests after them."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert not leftover, f"tasks left behind: {[t.get_name() for t in leftover]}"


@pytest.fixture
async def sim_board() -> AsyncIterator[PtyBoard]:
    """One fault-free simulated board behind a real PTY."""
    async with serve_pty(SimBoard()) as pty_board:
        yield pty_board


@pytest.fixture
async def client(sim_board: PtyBoard) -> AsyncIterator[BoardClient]:
    """A client on the production serial path to the simulated board."""
    async with await BoardClient.open(sim_board.path, timeouts=FAST_TIMEOUTS) as c:
        yield c
