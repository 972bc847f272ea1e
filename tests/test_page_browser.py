"""The station page end to end: the real daemon (serving its API) on simulated boards, and Chromium.

Debian's ``chromium`` package (``apt-get install -y chromium``; .ci/run installs it) driven by
Playwright for Python, never a downloaded browser build. Set FACTORYD_PAGE_SCREENSHOT=<png> to
write the screenshot of docs/station-page.md (docs/img/station-page.png) while the run test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright
from sqlmodel import Session, col, select

from factoryd.api import Role, TokenStore
from factoryd.config import Settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.jobs.scheduler import Station
from factoryd.ledger import LotState
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.tables import AuditEntryRow
from factoryd.sim.board import Fault, FaultPlan, SimBoard, Timing
from factoryd.sim.hub import SimHub
from tests.helpers.station import LOT, Line, make_line

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Slow enough that powering, provisioning and done are each on screen for a while.
TIMING = Timing(keygen_s=0.4, enumerate_s=0.5)
LABELS = {"1": "A1", "2": "A2", "3": "B1", "4": "B2"}
# Generous bounds for a loaded CI machine; a healthy run takes a fraction of each.
STATE_TIMEOUT_MS = 20_000
SERVE_TIMEOUT_S = 30.0


def _chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the station page tests need Debian's chromium package "
            "(apt-get install -y chromium; .ci/run installs it)"
        )
    return CHROMIUM


def _boards(line: Line, faults: dict[int, FaultPlan]) -> Callable[[], SimBoard]:
    """Board factory: the n-th board inserted (1-based) gets faults[n], all share TIMING."""
    counter = itertools.count(1)

    def make() -> SimBoard:
        return SimBoard(
            firmware_key=line.fw_public, faults=faults.get(next(counter), FaultPlan()), timing=TIMING
        )

    return make


def _settings(line: Line, api_port: int = 0, **jobs: object) -> Settings:
    return line.settings.model_copy(
        update={
            "api": line.settings.api.model_copy(
                update={"enabled": True, "host": "127.0.0.1", "port": api_port}
            ),
            "page": line.settings.page.model_copy(update={"rows": 2, "columns": 2, "slots": LABELS}),
            "jobs": line.settings.jobs.model_copy(update={"rescan_s": 0.2, **jobs}),
        }
    )


@dataclass
class Served:
    """A daemon serving the API (and so the station page)."""

    daemon: Daemon
    url: str
    station: Station


@contextlib.asynccontextmanager
async def station_with_page(line: Line, settings: Settings, hub: SimHub) -> AsyncIterator[Served]:
    """Run the daemon (which serves the API itself, as in production) until the block ends."""
    ready: asyncio.Future[Served] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def on_ready(station: Station) -> None:
        ready.set_result(Served(daemon, f"http://127.0.0.1:{daemon.api_port}", station))
        await stop.wait()

    daemon = Daemon(
        settings,
        DaemonHooks(
            hub=hub, passphrase=line.passphrase, on_ready=on_ready, stop_when=lambda _s: stop.is_set()
        ),
    )
    running = asyncio.create_task(daemon.run(), name="page-daemon")
    try:
        async with asyncio.timeout(SERVE_TIMEOUT_S):
            served = await asyncio.shield(ready)
        yield served
    finally:
        stop.set()
        async with asyncio.timeout(SERVE_TIMEOUT_S):
            await running


def _token(line: Line, name: str, role: Role) -> str:
    with TokenStore.open(line.settings.ledger_url) as store:
        return store.create(name, role)[1]


def _audit(line: Line) -> list[AuditEntryRow]:
    engine = create_ledger_engine(line.settings.ledger_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all())
    finally:
        engine.dispose()


# Records every state a slot tile takes, so a state shown for a split second is still seen.
RECORDER = """
window.__states = [];
document.addEventListener("DOMContentLoaded", () => {
  const grid = document.getElementById("grid");
  if (!grid) return;
  new MutationObserver((records) => {
    for (const r of records) {
      const e = r.target;
      if (!e.classList || !e.classList.contains("slot")) continue;
      window.__states.push({
        port: e.dataset.port, state: e.dataset.state,
        title: e.querySelector(".slot-title").textContent,
        detail: e.querySelector(".slot-detail").textContent,
        colour: getComputedStyle(e).backgroundColor,
      });
    }
  }).observe(grid, { attributes: true, subtree: true, attributeFilter: ["data-state"] });
});
"""


@contextlib.asynccontextmanager
async def browser_page(width: int = 1920, height: int = 1080) -> AsyncIterator[Page]:
    """A fresh headless Chromium page (a 1080p wall screen by default) recording slot states."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(_chromium()), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": width, "height": height})
            await context.add_init_script(RECORDER)
            yield await context.new_page()
        finally:
            await browser.close()


async def login(page: Page, url: str, token: str) -> None:
    """Log in through the page's form."""
    await page.goto(f"{url}/station")
    await page.fill("#token", token)
    await page.click("#login-button")
    await page.wait_for_selector("#connection[data-connected='true']", timeout=STATE_TIMEOUT_MS)


def slot(port: str, state: str | None = None) -> str:
    """CSS selector of a slot tile, optionally in one state."""
    return f".slot[data-port='{port}']" + (f"[data-state='{state}']" if state else "")


async def seen(page: Page, port: str, state: str, *, after: int = 0) -> dict[str, str]:
    """Wait until slot ``port`` has shown ``state`` (recorded after entry ``after``); that record."""
    handle = await page.wait_for_function(
        "([port, state, after]) => window.__states.slice(after)"
        ".find((s) => s.port === port && s.state === state)",
        arg=[port, state, after],
        timeout=STATE_TIMEOUT_MS,
    )
    record: dict[str, str] = await handle.json_value()
    return record


async def recorded(page: Page) -> int:
    """How many slot states were recorded so far."""
    count: int = await page.evaluate("window.__states.length")
    return count


async def lot_done_above(page: Page, count: int) -> None:
    """Wait until the lot panel's "done" count is above ``count``."""
    await page.wait_for_function(
        "(n) => Number(document.getElementById('lot-done').textContent) > n",
        arg=count,
        timeout=STATE_TIMEOUT_MS,
    )


def set_lot_state(line: Line, state: LotState) -> None:
    """Pause or resume the lot straight in the ledger (as another station's operator would)."""
    ledger = line.ledger()
    try:
        ledger.set_lot_state(LOT, state, actor="test")
    finally:
        ledger.close()


async def test_page_follows_the_run_shows_failures_and_retries(tmp_path: Path) -> None:
    """Colours change as boards are provisioned; a rejected CSR puts its slot in attention with the
    reason in words; Retry on the page restarts the slot; pause/resume work; all is audited."""
    _chromium()
    line = await make_line(tmp_path, boards=16, ports=4)
    operator = _token(line, "op-anna", Role.OPERATOR)
    await asyncio.to_thread(set_lot_state, line, LotState.PAUSED)
    # Board 1 goes into port 1 and sends a CSR for another name; one failure stops the port.
    hub = line.hub(4, 12, _boards(line, {1: FaultPlan.only(Fault.WRONG_CN)}))
    settings = _settings(line, attention_after_failures=1)
    async with station_with_page(line, settings, hub) as served, browser_page() as page:
        await login(page, served.url, operator)
        assert "fdt_" not in page.url
        # The grid mirrors the fixture: 2 x 2, labelled as printed on it, in the configured order.
        assert await page.eval_on_selector("#grid", "g => g.dataset.columns") == "2"
        assert await page.eval_on_selector_all(".slot", "s => s.map(e => e.dataset.port)") == list(LABELS)
        assert await page.text_content(f"{slot('3')} .slot-label") == "B1"
        await page.wait_for_selector("#lot-state[data-state='paused']", timeout=STATE_TIMEOUT_MS)
        await page.click("#lot-resume")

        # Slots change colour as boards go through.
        working = await seen(page, "2", "provisioning")
        assert working["title"].startswith("Step "), working
        done = await seen(page, "2", "done")
        assert done["colour"] != working["colour"]
        assert "Take the board out" in done["detail"]

        # The failed board: attention, the reason in plain words, Retry and Acknowledge offered.
        attention = slot("1", "attention")
        await page.wait_for_selector(attention, timeout=STATE_TIMEOUT_MS)
        detail = await page.text_content(f"{attention} .slot-detail") or ""
        assert "certificate request was wrong" in detail, detail
        assert "csr_rejected" not in detail
        assert await page.is_visible(f"{attention} button.act-retry")
        assert await page.is_visible(f"{attention} button.act-ack")
        events = await page.text_content("#events") or ""
        assert "Failed: The board's certificate request was wrong" in events, events

        path = os.environ.get("FACTORYD_PAGE_SCREENSHOT")
        if path:
            await page.wait_for_selector(".slot[data-state='provisioning']", timeout=STATE_TIMEOUT_MS)
            await page.screenshot(path=path)

        # Retry on the page restarts the slot: it leaves attention and provisions its board.
        mark = await recorded(page)
        await page.click(f"{attention} button.act-retry")
        await seen(page, "1", "provisioning", after=mark)
        await seen(page, "1", "done", after=mark)

        # Pause and resume the lot from the page.
        await page.click("#lot-pause")
        await page.wait_for_selector("#lot-state[data-state='paused']", timeout=STATE_TIMEOUT_MS)
        await page.click("#lot-resume")
        await page.wait_for_selector("#lot-state[data-state='active']", timeout=STATE_TIMEOUT_MS)
        assert int(await page.text_content("#lot-done") or "0") >= 2

        # A tablet in portrait: everything still fits the width.
        await page.set_viewport_size({"width": 800, "height": 1280})
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0

    trail = [(r.actor, r.action, r.subject) for r in _audit(line)]
    assert ("op-anna", "station.port.retry", "1") in trail
    assert trail.count(("op-anna", "station.lot.resume", LOT)) == 2
    assert ("op-anna", "station.lot.pause", LOT) in trail
    assert ("op-anna", "POST /station/actions/ports/{port}/retry", "1") in trail


async def test_page_shows_a_failed_slot_and_survives_a_daemon_restart(tmp_path: Path) -> None:
    """A board that fails shows FAILED with its reason; stopping the daemon shows the reconnecting
    banner; a new daemon on the same port gets the page back to live data without a new login."""
    _chromium()
    line = await make_line(tmp_path, boards=16, ports=4)
    supervisor = _token(line, "sup-ben", Role.SUPERVISOR)
    await asyncio.to_thread(set_lot_state, line, LotState.PAUSED)
    settings = _settings(line)
    first = line.hub(4, 6, _boards(line, {2: FaultPlan.only(Fault.WRONG_CN)}))
    async with browser_page(1280, 800) as page:
        async with station_with_page(line, settings, first) as served:
            port = int(served.url.rsplit(":", 1)[1])
            await login(page, served.url, supervisor)
            # A supervisor watches: no action buttons.
            assert not await page.is_visible(".slot button.act-disable")
            assert not await page.is_visible("#lot-resume")
            await asyncio.to_thread(set_lot_state, line, LotState.ACTIVE)
            failed = await seen(page, "2", "failed")
            assert "certificate request was wrong" in failed["detail"], failed
            assert failed["title"] == "Failed"
            await seen(page, "1", "done")
            await lot_done_above(page, 0)
            before = int(await page.text_content("#lot-done") or "0")

        # The daemon is gone: the page says so and keeps the last known tiles.
        await page.wait_for_selector("#banner", state="visible", timeout=STATE_TIMEOUT_MS)
        assert await page.get_attribute("#connection", "data-connected") == "false"
        assert await page.locator(".slot").count() == 4

        await asyncio.to_thread(set_lot_state, line, LotState.PAUSED)
        second = line.hub(4, 4, _boards(line, {}))
        async with station_with_page(line, _settings(line, api_port=port), second) as again:
            assert again.url == served.url
            await page.wait_for_selector("#banner", state="hidden", timeout=STATE_TIMEOUT_MS)
            assert await page.get_attribute("#connection", "data-connected") == "true"
            await page.wait_for_selector("#lot-state[data-state='paused']", timeout=STATE_TIMEOUT_MS)
            mark = await recorded(page)
            await asyncio.to_thread(set_lot_state, line, LotState.ACTIVE)
            # Live again: new boards go through and the lot's count moves on.
            await seen(page, "3", "provisioning", after=mark)
            await lot_done_above(page, before)
            assert page.url.endswith("/station")
