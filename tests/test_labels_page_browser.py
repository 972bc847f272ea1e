"""The station page's label panel in Chromium: printer trouble shown, previews drawn, reprints audited."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import expect

from factoryd.api import Role
from factoryd.config import LabelsConfig
from factoryd.sim.printer import PrinterCondition, SimPrinter
from tests.helpers.station import LOT, make_line
from tests.test_labels_line import QR_TEMPLATE, qr_texts
from tests.test_labels_station import audit_of
from tests.test_page_browser import (
    STATE_TIMEOUT_MS,
    _settings,
    _token,
    browser_page,
    login,
    station_with_page,
)


async def test_the_operator_sees_a_dead_printer_previews_and_reprints(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    with line.ledger() as ledger:
        ledger.set_label_template(LOT, QR_TEMPLATE, actor="test")
    operator = _token(line, "op-carla", Role.OPERATOR)
    hub = line.hub(ports=2, supply=2)
    async with SimPrinter() as printer:
        await printer.set_condition(PrinterCondition.PAPER_OUT)
        labels = LabelsConfig(
            enabled=True,
            printers={"1": str(printer.address), "2": str(printer.address)},
            retry_initial_s=0.1,
            retry_max_s=0.3,
            poll_s=0.1,
        )
        settings = _settings(line).model_copy(update={"labels": labels})
        async with station_with_page(line, settings, hub) as served, browser_page() as page:
            await login(page, served.url, operator)
            panel = page.locator("#labels")
            await expect(panel).to_be_visible(timeout=STATE_TIMEOUT_MS)
            # Both boards are done while the printer is out of paper: the panel says so.
            await expect(page.locator("#labels-queued")).to_have_text("2 waiting", timeout=STATE_TIMEOUT_MS)
            await expect(page.locator("#printers li")).to_contain_text("paper out", timeout=STATE_TIMEOUT_MS)
            await printer.set_condition(PrinterCondition.READY)
            await expect(page.locator("#labels-queued")).to_have_text("all printed", timeout=STATE_TIMEOUT_MS)
            await expect(page.locator("#printers li")).to_contain_text("ready", timeout=STATE_TIMEOUT_MS)
            rows = page.locator("#label-jobs li[data-state='printed']")
            await expect(rows).to_have_count(2, timeout=STATE_TIMEOUT_MS)
            # The preview is an image the browser could decode, as wide as the label in dots.
            await rows.first.get_by_role("button", name="Preview").click()
            preview = page.locator("#label-preview")
            await expect(preview).to_be_visible()
            await page.wait_for_function(
                "() => document.getElementById('label-preview').naturalWidth === 400",
                timeout=STATE_TIMEOUT_MS,
            )
            device_id = (await rows.first.locator(".lbl-id").inner_text()).split(" · ")[0]
            await rows.first.get_by_role("button", name="Reprint").click()
            await expect(page.locator("#toast")).to_contain_text("done", timeout=STATE_TIMEOUT_MS)
            await printer.wait_printed(3, timeout_s=STATE_TIMEOUT_MS / 1000)
    assert qr_texts(printer.printed[-1]) == [device_id]
    assert [(actor, subject) for actor, subject, _ in audit_of(line, "label.reprint")] == [
        ("op-carla", device_id)
    ]
