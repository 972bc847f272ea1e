"""Labels on a real line: boards behind PTYs, the daemon, simulated ZPL printers on 127.0.0.1.

The oracle for the printed codes is zbar (QR) and zxing-cpp (DataMatrix), reading the PNG preview
made from the very bytes each printer received.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image
from pyzbar import pyzbar

from factoryd.config import LabelsConfig, Settings
from factoryd.jobs.scheduler import Station
from factoryd.labels.preview import render_image
from factoryd.labels.template import MATTER_TEMPLATE_TOML
from factoryd.ledger import DeviceState
from factoryd.ledger.labels import LabelKind, LabelState
from factoryd.sim.board import Fault, FaultPlan, Impostor, SimBoard, equip_attestation
from factoryd.sim.printer import PrinterCondition, SimPrinter
from factoryd.sim.secure_element import SimVendorCa
from factoryd.telemetry.events import JobEvent, RecordingSink
from tests.helpers.station import LOT, Line, make_line

# The lot's own template: the device ID as a QR code (zbar reads QR, not DataMatrix) and in text.
QR_TEMPLATE = """
format = 1
dpi = 203
width_dots = 400
height_dots = 240

[[field]]
kind = "qr"
x_dots = 20
y_dots = 20
magnification = 4
error = "M"
value = "{device_id}"

[[field]]
kind = "text"
x_dots = 20
y_dots = 200
height_dots = 20
value = "{device_id}"
"""


def qr_texts(zpl: bytes) -> list[str]:
    """What zbar reads in the preview of a printed label."""
    image = render_image(zpl).convert("L")
    return [symbol.data.decode() for symbol in pyzbar.decode(image) if symbol.type == "QRCODE"]


def datamatrix_texts(zpl: bytes) -> list[str]:
    """What zxing-cpp (its own DataMatrix decoder, not libdmtx) reads in the preview."""
    image: Image.Image = render_image(zpl).convert("L")
    return [b.text for b in zxingcpp.read_barcodes(image) if b.format == zxingcpp.BarcodeFormat.DataMatrix]


def labelled(line: Line, printers: dict[str, SimPrinter], **overrides: object) -> Settings:
    """The line's settings with labels on: each port's printer, fast retries."""
    labels = LabelsConfig(
        enabled=True,
        printers={port: str(p.address) for port, p in printers.items()},
        status_timeout_s=0.3,
        connect_timeout_s=0.5,
        retry_initial_s=0.05,
        retry_max_s=0.2,
        poll_s=0.1,
        **overrides,  # type: ignore[arg-type]
    )
    return line.settings.model_copy(update={"labels": labels})


def printed(printers: dict[str, SimPrinter]) -> list[bytes]:
    """Every label the distinct printers printed."""
    unique = {id(p): p for p in printers.values()}.values()
    return list(itertools.chain.from_iterable(p.printed for p in unique))


async def test_one_label_per_provisioned_board_none_for_failed(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    with line.ledger() as ledger:
        ledger.set_label_template(LOT, QR_TEMPLATE, actor="test")
    boards = iter(
        [FaultPlan()] * 3
        + [FaultPlan.only(Fault.WRONG_CN)]
        + [FaultPlan()] * 3
        + [FaultPlan.only(Fault.WEAK_KEY)]
    )

    def board() -> SimBoard:
        return line.board(next(boards, FaultPlan()))

    hub = line.hub(ports=4, supply=8, factory=board)
    async with SimPrinter() as left, SimPrinter() as right:
        printers = {"1": left, "2": left, "3": right, "4": right}
        settings = labelled(line, printers)

        def done(station: Station) -> bool:
            return hub.exhausted and len(printed(printers)) >= station.outcomes["provisioned"]

        station = await line.run(hub, done, settings=settings)
    assert station.outcomes["provisioned"] == 6
    assert station.outcomes["failed"] + station.outcomes["refused"] == 2
    with line.ledger() as ledger:
        records = [ledger.find_device(res.device_id) for res in station.results if res.device_id]
        provisioned = {r.device_id: r.port for r in records if r and r.state is DeviceState.PROVISIONED}
        jobs = ledger.label_jobs(station=line.settings.station.name)
    assert len(provisioned) == 6
    # Exactly one label per provisioned board, on its port's printer, whose QR (zbar) is its device ID.
    for printer, ports in ((left, {"1", "2"}), (right, {"3", "4"})):
        decoded = [qr_texts(zpl) for zpl in printer.printed]
        assert all(len(d) == 1 for d in decoded)
        ids = [d[0] for d in decoded]
        assert sorted(ids) == sorted(i for i, port in provisioned.items() if port in ports)
    assert Counter(j.state for j in jobs) == Counter({LabelState.PRINTED: 6})
    assert {j.device_id for j in jobs} == set(provisioned)
    assert all(j.kind is LabelKind.BOARD for j in jobs)
    # Nothing queued for the failed boards: their IDs (if any) never reached provisioned.
    failed_ids = {r.device_id for r in station.results if r.outcome != "provisioned" and r.device_id}
    assert not failed_ids & {j.device_id for j in jobs}


async def test_default_template_datamatrix_reads_back_with_zxing(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    hub = line.hub(ports=2, supply=2)
    async with SimPrinter() as printer:
        printers = {"1": printer, "2": printer}

        def done(station: Station) -> bool:
            return hub.exhausted and len(printer.printed) >= station.outcomes["provisioned"]

        station = await line.run(hub, done, settings=labelled(line, printers))
    ids = sorted(r.device_id or "" for r in station.results if r.outcome == "provisioned")
    assert len(ids) == 2
    assert sorted(datamatrix_texts(zpl)[0] for zpl in printer.printed) == ids


@pytest.mark.parametrize(
    "condition", [PrinterCondition.OFFLINE, PrinterCondition.PAPER_OUT, PrinterCondition.HEAD_OPEN]
)
async def test_printer_trouble_queues_labels_and_provisioning_goes_on(
    tmp_path: Path, condition: PrinterCondition
) -> None:
    line = await make_line(tmp_path)
    with line.ledger() as ledger:
        ledger.set_label_template(LOT, QR_TEMPLATE, actor="test")
    hub = line.hub(ports=2, supply=4)
    sink = RecordingSink()
    # HEAD_OPEN as current Zebra firmware does it: no ~HS answer at all.
    async with SimPrinter(silent_when_faulted=condition is PrinterCondition.HEAD_OPEN) as printer:
        await printer.set_condition(condition)
        printers = {"1": printer, "2": printer}
        seen_queued: list[int] = []

        def done(station: Station) -> bool:
            labels = station.labels
            if labels is not None and hub.exhausted:
                seen_queued.append(labels.queued)
            return hub.exhausted and bool(seen_queued) and seen_queued[-1] == 4

        station = await line.run(hub, done, settings=labelled(line, printers), sinks=(sink,))
        # Every board was provisioned while the printer could not print; the four labels wait.
        assert station.outcomes == Counter({"provisioned": 4})
        assert printer.printed == []
        labels = station.labels
        assert labels is not None
        [view] = labels.printers
        assert view.ready is False
        assert (
            view.condition
            == {"offline": "offline", "paper_out": "paper_out", "head_open": "no_status"}[condition]
        )
        with line.ledger() as ledger:
            jobs = ledger.label_jobs(station=line.settings.station.name)
        assert [j.state for j in jobs] == [LabelState.QUEUED] * 4
        # The oldest label is the one being tried (labels print in order); it names the trouble.
        oldest = jobs[-1]
        assert oldest.condition == view.condition
        assert oldest.attempts >= 1
        assert oldest.last_error is not None
        assert str(printer.address) in oldest.last_error
        # The operator (and MQTT) heard of it: label step events with the printer's condition.
        label_events = [e for e in sink.events if isinstance(e, JobEvent) and e.step == "label"]
        assert {e.reason for e in label_events if e.reason} == {f"label_{view.condition}"}
        # The printer comes back: a new station run prints what waited, oldest first, once each.
        await printer.set_condition(PrinterCondition.READY)
        hub2 = line.hub(ports=2, supply=0)

        def printed_all(_station: Station) -> bool:
            return len(printer.printed) >= 4

        await line.run(hub2, printed_all, settings=labelled(line, printers))
    ids = [qr_texts(zpl)[0] for zpl in printer.printed]
    assert ids == [j.device_id for j in reversed(jobs)]
    with line.ledger() as ledger:
        assert {j.state for j in ledger.label_jobs(station=line.settings.station.name)} == {
            LabelState.PRINTED
        }


async def test_printer_recovers_while_the_station_runs(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    with line.ledger() as ledger:
        ledger.set_label_template(LOT, QR_TEMPLATE, actor="test")
    hub = line.hub(ports=1, supply=2)
    async with SimPrinter() as printer:
        await printer.set_condition(PrinterCondition.PAPER_OUT)

        async def reload_paper() -> None:
            while not hub.exhausted or printer.status_queries < 2:
                await asyncio.sleep(0.02)
            await printer.set_condition(PrinterCondition.READY)

        task = asyncio.create_task(reload_paper())

        def done(_station: Station) -> bool:
            return len(printer.printed) >= 2

        await line.run(hub, done, settings=labelled(line, {"1": printer}))
        await task
    assert len({qr_texts(zpl)[0] for zpl in printer.printed}) == 2


async def test_no_label_for_a_board_refused_as_not_genuine(tmp_path: Path) -> None:
    line = await make_line(tmp_path, attestation=True)
    with line.ledger() as ledger:
        ledger.set_label_template(LOT, QR_TEMPLATE, actor="test")
    vendor = SimVendorCa.make(seed=line.options.seed)  # the demo's set-up trusts this vendor's root
    supply = iter([None, Impostor.CLONE, None])

    def board() -> SimBoard:
        return equip_attestation(line.board(), vendor, next(supply, None))

    hub = line.hub(ports=1, supply=3, factory=board)
    async with SimPrinter() as printer:

        def done(station: Station) -> bool:
            return hub.exhausted and len(printer.printed) >= station.outcomes["provisioned"]

        station = await line.run(hub, done, settings=labelled(line, {"1": printer}))
    assert station.outcomes == Counter({"provisioned": 2, "refused": 1})
    provisioned = sorted(r.device_id or "" for r in station.results if r.outcome == "provisioned")
    assert sorted(qr_texts(zpl)[0] for zpl in printer.printed) == provisioned
    with line.ledger() as ledger:
        assert len(ledger.label_jobs()) == 2


async def test_a_port_without_printer_and_a_label_that_cannot_be_made_are_shown(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    # The station's default template prints Matter codes, which this plain lot's devices have not got.
    matter_template = tmp_path / "matter.toml"
    matter_template.write_text(MATTER_TEMPLATE_TOML)
    hub = line.hub(ports=2, supply=2)
    sink = RecordingSink()
    async with SimPrinter() as printer:
        settings = labelled(line, {"1": printer}, template=matter_template)

        def done(station: Station) -> bool:
            labels = station.labels
            if labels is None or not hub.exhausted:
                return False
            with line.ledger() as ledger:
                jobs = ledger.label_jobs()
            return len(jobs) == 2 and all(j.condition in ("render", "no_printer") for j in jobs)

        station = await line.run(hub, done, settings=settings, sinks=(sink,))
    assert station.outcomes == Counter({"provisioned": 2})
    assert printer.printed == []
    with line.ledger() as ledger:
        jobs = {j.port: j for j in ledger.label_jobs()}
    assert jobs["1"].state is LabelState.FAILED
    assert jobs["1"].last_error is not None
    assert "has no onboarding codes" in jobs["1"].last_error
    assert jobs["2"].state is LabelState.QUEUED
    assert jobs["2"].condition == "no_printer"
    outcomes = {(e.port, e.outcome, e.reason) for e in sink.events if e.step == "label"}
    assert ("1", "failed", "label_render") in outcomes
    assert ("2", "queued", "label_no_printer") in outcomes
