"""A PNG preview drawn from the ZPL bytes that go to the printer, not from the template.

:func:`parse_zpl` interprets the ZPL subset :mod:`factoryd.labels.zpl` emits (and refuses any other
command, so a preview never silently differs from the print); :func:`render_png` draws it one pixel
per printer dot: text with Pillow's scalable font, QR codes with segno and DataMatrix codes with
libdmtx from the field data the printer would decode. Real-printer differences a preview does not
show: the printer's own font 0 metrics, and the symbol size a printer's DataMatrix encoder picks
(the data is the same).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from factoryd.labels.errors import LabelRenderError
from factoryd.labels.symbols import Matrix, QrErrorLevel, datamatrix_matrix, qr_matrix, text_width_dots
from factoryd.labels.zpl import DATAMATRIX_ESCAPE, HEX_INDICATOR

# A preview bigger than this many dots per side is not a label (and would cost memory).
MAX_PREVIEW_DOTS = 12_000
_HEX_ESCAPE = re.compile(re.escape(HEX_INDICATOR) + r"([0-9A-Fa-f]{2})")
_COMMAND = re.compile(r"[\^~]([A-Z0-9@]{2})")
_QR_ERROR_LEVELS = ("L", "M", "Q", "H")


@dataclass(frozen=True, slots=True)
class ZplText:
    """A ``^A0`` text field."""

    x: int
    y: int
    height: int
    width: int
    text: str


@dataclass(frozen=True, slots=True)
class ZplSymbol:
    """A ``^BQ`` or ``^BX`` field: its kind, module size in dots and the data the printer encodes."""

    kind: Literal["qr", "datamatrix"]
    x: int
    y: int
    module: int
    data: str
    error: QrErrorLevel = "Q"


@dataclass(frozen=True, slots=True)
class ZplLabel:
    """One interpreted ``^XA``…``^XZ`` format."""

    width: int
    height: int
    texts: tuple[ZplText, ...]
    symbols: tuple[ZplSymbol, ...]
    quantity: int


def _ints(params: str, command: str, count: int) -> list[int]:
    parts = params.split(",")
    try:
        return [int(p) for p in parts[:count]]
    except ValueError:
        raise LabelRenderError(f"^{command}{params}: expected {count} numbers") from None


def _field_data(raw: str, hex_escapes: bool) -> str:
    if not hex_escapes:
        return raw
    out = bytearray()
    at = 0
    for match in _HEX_ESCAPE.finditer(raw):
        out += raw[at : match.start()].encode("ascii")
        out.append(int(match.group(1), 16))
        at = match.end()
    tail = raw[at:]
    if HEX_INDICATOR in tail:
        raise LabelRenderError(f"^FH data has a broken escape: {raw!r}")
    out += tail.encode("ascii")
    try:
        return out.decode("utf-8")  # ^CI28
    except UnicodeDecodeError as exc:
        raise LabelRenderError(f"^FD data is not UTF-8 after ^FH: {exc}") from None


def _undouble(data: str, escape: str) -> str:
    out, at = [], 0
    while at < len(data):
        ch = data[at]
        if ch == escape:
            if data[at + 1 : at + 2] != escape:
                # Escape sequences (FNC1, byte values) are not part of what factoryd emits.
                raise LabelRenderError(f"DataMatrix data uses escape sequence {data[at : at + 2]!r}")
            at += 1
        out.append(ch)
        at += 1
    return "".join(out)


def parse_zpl(zpl: bytes) -> ZplLabel:
    """Interpret one label of factoryd's ZPL subset; LabelRenderError for anything else."""
    try:
        text = zpl.decode("ascii")
    except UnicodeDecodeError:
        raise LabelRenderError("the ZPL is not ASCII (field data must be ^FH-escaped)") from None
    width = height = 0
    quantity = 1
    started = ended = False
    origin: tuple[int, int] | None = None
    font: tuple[int, int] | None = None
    symbol: tuple[str, int, QrErrorLevel, str] | None = None
    hex_escapes = False
    texts: list[ZplText] = []
    symbols: list[ZplSymbol] = []
    pos = 0
    while pos < len(text):
        if text[pos] in "\r\n":
            pos += 1
            continue
        match = _COMMAND.match(text, pos)
        if match is None:
            raise LabelRenderError(f"unexpected ZPL text at byte {pos}: {text[pos : pos + 20]!r}")
        command = match.group(1)
        if text[pos] == "~":
            raise LabelRenderError(f"control command ~{command} inside a label format")
        if ended:
            raise LabelRenderError(f"^{command} after ^XZ: one label per job")
        if command == "FD":
            end = text.find("^FS", match.end())
            if end < 0:
                raise LabelRenderError("^FD without ^FS")
            raw = text[match.end() : end]
            pos = end + 3
            if origin is None:
                raise LabelRenderError("^FD without ^FO")
            data = _field_data(raw, hex_escapes)
            if symbol is not None:
                kind, module, error, escape = symbol
                if kind == "qr":
                    switches, sep, data = data.partition(",")
                    if (
                        not sep
                        or len(switches) != 2
                        or switches[0] not in _QR_ERROR_LEVELS
                        or switches[1] != "A"
                    ):
                        raise LabelRenderError(f"^BQ data must start with '<level>A,', got {switches!r}")
                    error = switches[0]  # type: ignore[assignment]  # checked against the levels above
                    symbols.append(ZplSymbol("qr", origin[0], origin[1], module, data, error))
                else:
                    symbols.append(
                        ZplSymbol("datamatrix", origin[0], origin[1], module, _undouble(data, escape))
                    )
            elif font is not None:
                texts.append(ZplText(origin[0], origin[1], font[0], font[1], data))
            else:
                raise LabelRenderError("^FD with neither a font (^A0) nor a barcode (^BQ, ^BX)")
            origin, font, symbol, hex_escapes = None, None, None, False
            continue
        end = text.find("^", match.end())
        tilde = text.find("~", match.end())
        if end < 0 or 0 <= tilde < end:
            end = tilde
        if end < 0:
            end = len(text)
        params = text[match.end() : end].strip()
        pos = end
        if command == "XA":
            started = True
        elif not started:
            raise LabelRenderError(f"^{command} before ^XA")
        elif command == "XZ":
            ended = True
        elif command == "CI":
            if params != "28":
                raise LabelRenderError(f"^CI{params}: only ^CI28 (UTF-8) is used")
        elif command == "PW":
            width = _ints(params, command, 1)[0]
        elif command == "LL":
            height = _ints(params, command, 1)[0]
        elif command == "LH":
            if _ints(params, command, 2) != [0, 0]:
                raise LabelRenderError("^LH must be 0,0")
        elif command == "FO":
            x, y = _ints(params, command, 2)
            origin = (x, y)
        elif command == "A0":
            if not params.startswith("N,"):
                raise LabelRenderError(f"^A0{params}: only orientation N is used")
            h, w = _ints(params[2:], command, 2)
            font = (h, w)
        elif command == "FH":
            if params not in ("", HEX_INDICATOR):
                raise LabelRenderError(f"^FH{params}: only the default indicator {HEX_INDICATOR!r}")
            hex_escapes = True
        elif command == "BQ":
            parts = params.split(",")
            if len(parts) < 3 or parts[0] != "N" or parts[1] != "2":
                raise LabelRenderError(f"^BQ{params}: expected N,2,<magnification>")
            symbol = ("qr", _ints(parts[2], command, 1)[0], "Q", "")
        elif command == "BX":
            parts = params.split(",")
            if len(parts) < 7 or parts[0] != "N" or parts[2] != "200":
                raise LabelRenderError(f"^BX{params}: expected N,<module>,200,…")
            if parts[6] != DATAMATRIX_ESCAPE:
                raise LabelRenderError(f"^BX escape character must be {DATAMATRIX_ESCAPE!r}")
            symbol = ("datamatrix", _ints(parts[1], command, 1)[0], "Q", parts[6])
        elif command == "PQ":
            quantity = _ints(params, command, 1)[0]
        else:
            raise LabelRenderError(f"the preview does not know ZPL command ^{command}")
    if not ended:
        raise LabelRenderError("the ZPL has no ^XZ")
    if not (0 < width <= MAX_PREVIEW_DOTS and 0 < height <= MAX_PREVIEW_DOTS):
        raise LabelRenderError(f"label size {width}x{height} dots (^PW/^LL) is missing or too big")
    return ZplLabel(width, height, tuple(texts), tuple(symbols), quantity)


def _matrix(symbol: ZplSymbol) -> Matrix:
    if symbol.kind == "qr":
        return qr_matrix(symbol.data, symbol.error)
    return datamatrix_matrix(symbol.data.encode("utf-8"))


def render_image(zpl: bytes) -> Image.Image:
    """The label as a 1-bit image, one pixel per printer dot."""
    label = parse_zpl(zpl)
    image = Image.new("1", (label.width, label.height), 1)
    draw = ImageDraw.Draw(image)
    for symbol in label.symbols:
        for row, cells in enumerate(_matrix(symbol)):
            for col, dark in enumerate(cells):
                if dark:
                    x = symbol.x + col * symbol.module
                    y = symbol.y + row * symbol.module
                    draw.rectangle((x, y, x + symbol.module - 1, y + symbol.module - 1), fill=0)
    for item in label.texts:
        font = ImageFont.load_default(size=item.height)
        if item.width == item.height:
            draw.text((item.x, item.y), item.text, font=font, fill=0)
            continue
        # ^A0 with another width: draw at the height, then stretch horizontally to the asked width.
        _left, _top, right, bottom = (int(v) for v in font.getbbox(item.text))
        strip = Image.new("1", (max(1, right), max(1, bottom)), 1)
        ImageDraw.Draw(strip).text((0, 0), item.text, font=font, fill=0)
        stretched = strip.resize((text_width_dots(item.text, item.height, item.width), strip.height))
        image.paste(stretched, (item.x, item.y))
    return image


def render_png(zpl: bytes) -> bytes:
    """The label as PNG bytes (1 bit per pixel, one pixel per dot)."""
    buffer = io.BytesIO()
    render_image(zpl).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
