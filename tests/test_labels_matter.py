"""A Matter line's labels: the QR payload zbar reads from each printed label is the ledger's, sealed.

The label carries the onboarding codes (they contain the setup passcode), so the test also checks
that neither the label queue's rows, its events nor its log lines hold them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import structlog
from pyzbar import pyzbar
from sqlmodel import Session, select

from factoryd.config import LabelsConfig
from factoryd.jobs.scheduler import Station
from factoryd.labels.preview import parse_zpl, render_image
from factoryd.labels.template import group_manual_code
from factoryd.ledger import Ledger
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.tables import AuditEntryRow, LabelJobRow
from factoryd.sim.printer import SimPrinter
from factoryd.telemetry.events import RecordingSink
from tests.helpers.station import LOT, make_line

BOARDS = 3


@pytest.mark.timeout(60)
async def test_matter_labels_carry_the_ledgers_codes_and_leak_them_nowhere(tmp_path: Path) -> None:
    line = await make_line(tmp_path, profile="matter", boards=BOARDS)
    hub = line.hub(ports=2, supply=BOARDS)
    sink = RecordingSink()
    async with SimPrinter() as printer:
        labels = LabelsConfig(enabled=True, printers={"1": str(printer.address), "2": str(printer.address)})
        settings = line.settings.model_copy(update={"labels": labels})

        def done(station: Station) -> bool:
            return hub.exhausted and len(printer.printed) >= station.outcomes["provisioned"]

        with structlog.testing.capture_logs() as logs:
            station = await line.run(hub, done, settings=settings, sinks=(sink,))
    assert station.outcomes == Counter({"provisioned": BOARDS})
    assert len(printer.printed) == BOARDS
    with Ledger.open(line.settings.ledger_url, onboarding_secret=line.passphrase) as ledger:
        devices = ledger.provisioned_devices(LOT)
        codes = {d.device_id: ledger.onboarding_codes(LOT, d.device_id) for d in devices}
    expected = {c.qr_payload: c.manual_code for c in codes.values() if c is not None}
    assert len(expected) == BOARDS
    secrets: list[str] = []
    for zpl in printer.printed:
        # zbar reads the preview drawn from the exact bytes the printer received.
        [symbol] = pyzbar.decode(render_image(zpl).convert("L"))
        payload = symbol.data.decode()
        assert payload in expected
        texts = [t.text for t in parse_zpl(zpl).texts]
        assert group_manual_code(expected[payload]) in texts
        secrets += [payload, expected[payload], group_manual_code(expected[payload])]
    # Nowhere in clear: label job rows, audit entries, telemetry events, log lines.
    engine = create_ledger_engine(line.settings.ledger_url)
    try:
        with Session(engine) as session:
            rows = [r.model_dump_json() for r in session.exec(select(LabelJobRow)).all()]
            rows += [r.details for r in session.exec(select(AuditEntryRow)).all()]
    finally:
        engine.dispose()
    haystacks = [*rows, *(repr(e) for e in sink.events), *(json.dumps(e, default=str) for e in logs)]
    for secret in secrets:
        assert not any(secret in hay for hay in haystacks), "an onboarding code leaked"
