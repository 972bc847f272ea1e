"""Label templates, ZPL and previews: malformed templates refused, hostile values inert, codes decodable."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st
from pyzbar import pyzbar

from factoryd.errors import InputError
from factoryd.labels.errors import LabelRenderError, LabelTemplateError
from factoryd.labels.preview import parse_zpl, render_image, render_png
from factoryd.labels.printer import PrinterTimeouts, ZplPrinter
from factoryd.labels.template import (
    DEFAULT_TEMPLATE_TOML,
    MATTER_TEMPLATE_TOML,
    LabelTemplate,
    LabelValues,
    group_manual_code,
)
from factoryd.labels.zpl import escape_field_data, render_zpl
from factoryd.ledger import Ledger, LotProfile
from factoryd.sim.printer import SimPrinter

HEADER = "format = 1\ndpi = 203\nwidth_dots = 400\nheight_dots = 240\n"
TEXT = '[[field]]\nkind = "text"\nx_dots = 10\ny_dots = 10\nheight_dots = 20\nvalue = "{value}"\n'
# ZPL commands an attacker would like to smuggle in: end the label, start another, printer controls.
BIG_QR = '[[field]]\nkind = "qr"\nx_dots = 300\ny_dots = 10\nmagnification = 10\nvalue = "{device_id}"\n'
BIG_DATAMATRIX = (
    '[[field]]\nkind = "datamatrix"\nx_dots = 10\ny_dots = 10\nmodule_dots = 40\nvalue = "{lot}"\n'
)
OVERLAPPING_QR = '[[field]]\nkind = "qr"\nx_dots = 100\ny_dots = 20\nmagnification = 4\nvalue = "{lot}"\n'
HOSTILE = "X^XZ^XA^FO0,0^A0N,99,99^FDpwned^FS^XZ~JR~HS_1E\\&é"


def text_template(value: str) -> str:
    return HEADER + TEXT.replace("{value}", value)


def values(device_id: str = "dev-1", **codes: str) -> LabelValues:
    return LabelValues(device_id=device_id, serial="0123ABCD", lot="lot-1", **codes)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("format = 1\n[[field", "not valid TOML"),
        (HEADER, "field: Field required"),
        (HEADER.replace("dpi = 203", "dpi = 250"), "dpi must be one of"),
        (HEADER.replace("format = 1", "format = 2"), "format: Input should be 1"),
        (
            text_template("{device_id}").replace('kind = "text"', 'kind = "code128"'),
            "does not match any of the expected tags",
        ),
        (text_template("{password}"), "unknown placeholder {password}"),
        (text_template("{device_id!r}"), "takes no format spec or conversion"),
        (text_template("{device_id:>10}"), "takes no format spec or conversion"),
        (text_template("{device_id"), "write {{ and }} for literal braces"),
        (text_template("x").replace("x_dots = 10", "x_dots = 400"), "outside the 400x240-dot label"),
        (text_template("x").replace("y_dots = 10", "y_dots = 230"), "runs off the 240-dot label"),
        (text_template("x") + "colour = 'red'\n", "Extra inputs are not permitted"),
        (HEADER + BIG_QR, "runs off the 400x240-dot label"),
        (HEADER + OVERLAPPING_QR + TEXT.replace("{value}", "W" * 30), "overlaps field 2 (text)"),
        (
            HEADER
            + '[[field]]\nkind = "datamatrix"\nx_dots = 10\ny_dots = 10\nmodule_dots = 40\nvalue = "{lot}"\n',
            "runs off",
        ),
    ],
)
def test_a_malformed_template_is_refused_with_the_problem_named(text: str, problem: str) -> None:
    with pytest.raises(LabelTemplateError, match=re.escape(problem)):
        LabelTemplate.parse(text, source="t.toml")


def test_builtin_templates_parse_and_know_what_they_need() -> None:
    plain = LabelTemplate.parse(DEFAULT_TEMPLATE_TOML)
    matter = LabelTemplate.parse(MATTER_TEMPLATE_TOML)
    assert not plain.needs_onboarding_codes
    assert matter.needs_onboarding_codes
    assert plain.placeholders == {"device_id", "serial", "lot"}


def test_a_template_that_prints_codes_fails_for_a_device_without_them() -> None:
    template = LabelTemplate.parse(MATTER_TEMPLATE_TOML)
    with pytest.raises(LabelRenderError, match=r"has no onboarding codes"):
        render_zpl(template, values())


def test_manual_codes_are_grouped_as_printed() -> None:
    assert group_manual_code("34970112332") == "3497-011-2332"
    assert group_manual_code("702871264504387000187") == "7028-712-6450-4387-000-18-7"
    with pytest.raises(LabelRenderError):
        group_manual_code("1234")


def test_a_hostile_device_id_cannot_add_printer_commands() -> None:
    template = LabelTemplate.parse(DEFAULT_TEMPLATE_TOML)
    zpl = render_zpl(template, values(HOSTILE)).decode("ascii")
    # One format, no control command anywhere, and every ^FD holds only escaped data up to its ^FS.
    assert zpl.count("^XA") == 1
    assert zpl.count("^XZ") == 1
    assert "~" not in zpl
    for data in re.findall(r"\^FD(.*?)\^FS", zpl):
        assert "^" not in data
        assert "~" not in data
    # The preview (and so the printer) shows the literal text and encodes the literal ID.
    label = parse_zpl(zpl.encode())
    assert HOSTILE in [t.text for t in label.texts]
    image = render_image(zpl.encode()).convert("L")
    [code] = [b for b in zxingcpp.read_barcodes(image) if b.format == zxingcpp.BarcodeFormat.DataMatrix]
    assert code.text == HOSTILE


def test_a_hostile_template_text_is_data_too() -> None:
    template = LabelTemplate.parse(text_template("^XZ~JR ^FDx"), source="t.toml")
    zpl = render_zpl(template, values()).decode("ascii")
    assert zpl.count("^XZ") == 1
    assert "~" not in zpl
    assert [t.text for t in parse_zpl(zpl.encode()).texts] == ["^XZ~JR ^FDx"]


async def test_the_printer_receives_one_label_for_a_hostile_id(tmp_path: Path) -> None:
    template = LabelTemplate.parse(DEFAULT_TEMPLATE_TOML)
    zpl = render_zpl(template, values(HOSTILE))
    async with SimPrinter() as sim:
        printer = ZplPrinter(sim.address, PrinterTimeouts(connect_s=1, status_s=1, write_s=1))
        await printer.print_label(zpl)
        # Two ~HS of our own (before and after); the "~HS" inside the ID never reached the parser.
        assert sim.status_queries == 2
        assert sim.printed == [zpl.rstrip(b"\n")]


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=60).filter(lambda s: all(ch.isprintable() for ch in s)))
def test_escaped_field_data_round_trips_through_the_preview_parser(text: str) -> None:
    escaped = escape_field_data(text)
    assert escaped.isascii()
    assert not set(escaped) & set("^~\\")
    zpl = f"^XA^PW100^LL100^FO0,0^A0N,20,20^FH^FD{escaped}^FS^XZ".encode()
    assert [t.text for t in parse_zpl(zpl).texts] == [text]


@pytest.mark.parametrize(
    ("zpl", "problem"),
    [
        (b"^XA^PW10^LL10^FO0,0^GB10,10,1^FS^XZ", "does not know ZPL command ^GB"),
        (b"^XA^PW10^LL10~JR^XZ", "control command ~JR"),
        (b"^XA^PW10^LL10^XZ^XA^XZ", "after ^XZ"),
        (b"^XA^PW10^LL10", "no ^XZ"),
        (b"^XA^PW10^LL10^FO0,0^FDx", "^FD without ^FS"),
    ],
)
def test_the_preview_refuses_zpl_it_does_not_emit(zpl: bytes, problem: str) -> None:
    with pytest.raises(LabelRenderError, match=re.escape(problem)):
        parse_zpl(zpl)


def test_a_matter_label_carries_the_qr_payload_and_manual_code() -> None:
    # MATTER.md vector: discriminator 3840, passcode 20202021, BLE, VID FFF1 / PID 8000.
    template = LabelTemplate.parse(MATTER_TEMPLATE_TOML)
    zpl = render_zpl(template, values(qr_payload="MT:Y.K9042C00KA0648G00", manual_code="34970112332"))
    png = render_png(zpl)
    assert png.startswith(b"\x89PNG")
    image = render_image(zpl).convert("L")
    assert [s.data for s in pyzbar.decode(image)] == [b"MT:Y.K9042C00KA0648G00"]
    assert "3497-011-2332" in [t.text for t in parse_zpl(zpl).texts]


async def test_the_ledger_refuses_a_malformed_template_and_keeps_the_old_one(tmp_path: Path) -> None:
    def run() -> None:
        with Ledger.open(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
            ledger.create_lot("lot-1", customer="acme", profile=LotProfile(), target_quantity=None, actor="t")
            stored = ledger.set_label_template("lot-1", DEFAULT_TEMPLATE_TOML, actor="t")
            with pytest.raises(LabelTemplateError, match="unknown placeholder"):
                ledger.set_label_template("lot-1", text_template("{pin}"), actor="t")
            with pytest.raises(InputError):
                ledger.set_label_template("lot-1", "not toml [", actor="t")
            kept = ledger.label_template("lot-1")
            assert kept is not None
            assert kept.sha256 == stored.sha256
            assert ledger.verify_audit() >= 2  # lot.create + label.template, nothing for the refusals

    await asyncio.to_thread(run)
