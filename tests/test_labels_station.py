"""Labels at the station: the page panel and its previews, audited reprints (page and CLI), metrics."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
from pyzbar import pyzbar
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from factoryd.api.tokens import Role, TokenStore
from factoryd.cli.main import app
from factoryd.config import LabelsConfig
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.jobs.scheduler import Station
from factoryd.labels.queue import LabelMetrics
from factoryd.labels.template import MATTER_TEMPLATE_TOML, SAMPLE_VALUES
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.labels import LabelKind, LabelState
from factoryd.ledger.tables import AuditEntryRow
from factoryd.sim.printer import SimPrinter
from tests.helpers.line_procs import wait_for
from tests.helpers.station import LOT, Line, make_line
from tests.test_labels_line import QR_TEMPLATE, qr_texts

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def audit_of(line: Line, action: str) -> list[tuple[str, str, dict[str, object]]]:
    """(actor, subject, details) of every audit entry with ``action``."""
    engine = create_ledger_engine(line.settings.ledger_url)
    try:
        with Session(engine) as session:
            rows = session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all()
            return [(r.actor, r.subject, json.loads(r.details)) for r in rows if r.action == action]
    finally:
        engine.dispose()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def station_config(line: Line, tmp_path: Path) -> str:
    """A config file for the CLI naming the line's station and ledger."""
    path = tmp_path / "cli.toml"
    settings = line.settings
    path.write_text(
        f'[station]\nname = "{settings.station.name}"\nstate_dir = "{settings.station.state_dir}"\n'
        f'[ledger]\nurl = "{settings.ledger_url}"\n'
    )
    return str(path)


def test_every_label_metric_is_documented() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    LabelMetrics(registry)
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        assert f"`{name}`" in doc, f"docs/metrics.md does not document {name}"


async def test_page_panel_preview_and_audited_reprints(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    with line.ledger() as ledger:
        ledger.set_label_template(LOT, QR_TEMPLATE, actor="test")
    with TokenStore.open(line.settings.ledger_url) as store:
        _, operator = store.create("op-anna", Role.OPERATOR)
        _, supervisor = store.create("sup-ben", Role.SUPERVISOR)
    hub = line.hub(ports=2, supply=2)
    seen: dict[str, object] = {}
    finished = asyncio.Event()
    async with SimPrinter() as printer:
        labels = LabelsConfig(
            enabled=True, printers={"1": str(printer.address), "2": str(printer.address)}, poll_s=0.1
        )
        settings = line.settings.model_copy(
            update={
                "labels": labels,
                "api": line.settings.api.model_copy(update={"enabled": True, "port": 0}),
            }
        )

        async def on_ready(station: Station) -> None:
            try:
                await page_checks(
                    daemon,
                    station=station,
                    printer=printer,
                    operator=operator,
                    supervisor=supervisor,
                    seen=seen,
                )
            finally:
                finished.set()

        hooks = DaemonHooks(
            hub=hub, passphrase=line.passphrase, stop_when=lambda _s: finished.is_set(), on_ready=on_ready
        )
        daemon = Daemon(settings, hooks)
        async with asyncio.timeout(60):
            await daemon.run()
    assert seen["done"] is True
    reprints = audit_of(line, "label.reprint")
    assert [(actor, subject) for actor, subject, _ in reprints] == [("op-anna", seen["device_id"])]
    # The reprint printed: three labels, the reprinted one twice.
    ids = [qr_texts(zpl)[0] for zpl in printer.printed]
    assert len(ids) == 3
    assert ids.count(str(seen["device_id"])) == 2
    registry = daemon.metrics.registry
    assert registry.get_sample_value("factoryd_labels_printed_total", {"outcome": "printed"}) == 3
    assert registry.get_sample_value("factoryd_labels_queued") == 0
    assert registry.get_sample_value("factoryd_label_printer_ready", {"port": "1"}) == 1


async def page_checks(
    daemon: Daemon,
    *,
    station: Station,
    printer: SimPrinter,
    operator: str,
    supervisor: str,
    seen: dict[str, object],
) -> None:
    """What an operator does on the page while the line runs."""
    await printer.wait_printed(2, timeout_s=20)
    url = f"http://127.0.0.1:{daemon.api_port}"
    op = {"Authorization": f"Bearer {operator}"}
    sup = {"Authorization": f"Bearer {supervisor}"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(100):  # the panel counts the queue every poll
            panel = (await client.get("/station/labels", headers=sup)).json()
            if panel["queued"] == 0 and len(panel["jobs"]) == 2:
                break
            await asyncio.sleep(0.05)
        assert panel["enabled"] is True
        assert [p["ready"] for p in panel["printers"]] == [True]
        assert {j["state"] for j in panel["jobs"]} == {"printed"}
        job = panel["jobs"][0]
        # The preview: a PNG drawn from the label's ZPL; zbar reads the device ID back.
        answer = await client.get(f"/station/labels/{job['id']}/preview.png", headers=sup)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/png"
        assert answer.headers["cache-control"] == "no-store"
        from io import BytesIO

        from PIL import Image

        image = Image.open(BytesIO(answer.content)).convert("L")
        assert [s.data.decode() for s in pyzbar.decode(image)] == [job["device_id"]]
        # A supervisor may watch but not reprint; an operator may, and it is audited with the name.
        refused = await client.post(f"/station/actions/labels/{job['id']}/reprint", headers=sup)
        assert refused.status_code == 403
        unknown = await client.post("/station/actions/labels/reprint", headers=op, json={"device_id": "nope"})
        assert unknown.status_code == 404
        done = await client.post(f"/station/actions/labels/{job['id']}/reprint", headers=op)
        assert done.status_code == 200, done.text
        assert done.json()["job"]["kind"] == "reprint"
        assert done.json()["job"]["requested_by"] == "op-anna"
    await printer.wait_printed(3, timeout_s=10)
    labels = station.labels
    assert labels is not None

    async def drained() -> bool:
        return labels.queued == 0

    # The queue's count (and its gauge) is refreshed by the queue's poll, up to poll_s after the print.
    await wait_for(drained, 10, "the label queue's count to drop to 0 after the reprint")
    seen["device_id"] = job["device_id"]
    seen["done"] = True


async def test_cli_lists_previews_and_reprints_with_an_audit_entry(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    with line.ledger() as ledger:
        ledger.set_label_template(LOT, QR_TEMPLATE, actor="test")
    hub = line.hub(ports=1, supply=1)
    async with SimPrinter() as printer:
        labels = LabelsConfig(enabled=True, printers={"1": str(printer.address)}, poll_s=0.1)
        settings = line.settings.model_copy(update={"labels": labels})

        def printed(_station: Station) -> bool:
            return len(printer.printed) >= 1

        station = await line.run(hub, printed, settings=settings)
    [device_id] = [r.device_id for r in station.results if r.outcome == "provisioned"]
    assert device_id is not None
    config = station_config(line, tmp_path)
    code, listed = await asyncio.to_thread(cli, "labels", "list", "--json", "-c", config)
    assert code == 0, listed
    [job] = json.loads(listed)
    assert (job["device_id"], job["state"], job["kind"]) == (device_id, "printed", "board")
    # Preview from the same ZPL as the print (0600: a Matter label would carry the passcode).
    png, zpl = tmp_path / "label.png", tmp_path / "label.zpl"
    code, out = await asyncio.to_thread(
        cli, "labels", "preview", device_id, "-o", str(png), "--zpl", str(zpl), "-c", config
    )
    assert code == 0, out
    assert png.stat().st_mode & 0o777 == 0o600
    assert zpl.read_bytes().rstrip(b"\n") == printer.printed[0]
    from PIL import Image

    assert [s.data.decode() for s in pyzbar.decode(Image.open(png).convert("L"))] == [device_id]
    # A reprint is queued for the running station to print, and audited with the CLI's user.
    code, out = await asyncio.to_thread(cli, "labels", "reprint", device_id, "-c", config)
    assert code == 0, out
    assert re.search(r"reprint of .* queued as label job \d+ for port 1", out)
    [(actor, subject, details)] = audit_of(line, "label.reprint")
    assert actor.startswith("cli")
    assert subject == device_id
    assert details["port"] == "1"
    with line.ledger() as ledger:
        jobs = ledger.label_jobs(device_id=device_id)
    assert [(j.kind, j.state) for j in jobs] == [
        (LabelKind.REPRINT, LabelState.QUEUED),
        (LabelKind.BOARD, LabelState.PRINTED),
    ]
    # The next station run prints it.
    async with SimPrinter() as again:
        settings = line.settings.model_copy(
            update={"labels": LabelsConfig(enabled=True, printers={"1": str(again.address)}, poll_s=0.1)}
        )

        def reprinted(_station: Station) -> bool:
            return len(again.printed) >= 1

        await line.run(line.hub(ports=1, supply=0), reprinted, settings=settings)
    assert qr_texts(again.printed[0]) == [device_id]
    # Unknown devices and refused templates: one clear line, exit 2, nothing stored.
    code, out = await asyncio.to_thread(cli, "labels", "reprint", "no-such-device", "-c", config)
    assert (code, "no device 'no-such-device'" in out) == (2, True)
    bad = tmp_path / "bad.toml"
    bad.write_text('format = 1\ndpi = 203\nwidth_dots = 400\nheight_dots = 240\n[[field]]\nkind = "text"\n')
    code, out = await asyncio.to_thread(cli, "labels", "template", LOT, str(bad), "-c", config)
    assert code == 2
    assert "refused" in out
    assert "x_dots" in out
    matter = tmp_path / "matter.toml"
    matter.write_text(MATTER_TEMPLATE_TOML)
    code, out = await asyncio.to_thread(cli, "labels", "template", LOT, str(matter), "-c", config)
    assert code == 2
    assert "not a Matter lot" in out
    code, out = await asyncio.to_thread(
        cli, "labels", "check", str(matter), "--preview", str(tmp_path / "m.png")
    )
    assert code == 0, out
    assert "placeholders: device_id, lot, manual_code, qr_payload, serial" in out
    from PIL import Image as PilImage

    sample = [s.data for s in pyzbar.decode(PilImage.open(tmp_path / "m.png").convert("L"))]
    assert sample == [SAMPLE_VALUES["qr_payload"].encode()]
    assert audit_of(line, "label.template")[-1][2]["sha256"]  # only the test's own template
    assert len(audit_of(line, "label.template")) == 1
