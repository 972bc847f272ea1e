"""A label as ZPL II: one ``^XA``…``^XZ`` format, every value hex-escaped with ``^FH``.

The emitted subset is small on purpose, because :mod:`factoryd.labels.preview` interprets exactly
these bytes to draw the preview: ``^XA ^CI28 ^PW ^LL ^LH ^FO ^A0 ^BQ ^BX ^FH ^FD ^FS ^PQ ^XZ``.

Injection: a ZPL printer reads ``^`` and ``~`` anywhere in the stream as the start of a command
(``~`` commands act at once, even inside field data). Every value, whether a device ID or a
template's own text, therefore goes through :func:`escape_field_data`: each byte outside printable
ASCII, and ``^ ~ _ \\``, becomes ``_XX`` (``^FH``'s hex escape), so field data never contains a
command character. The DataMatrix escape character (``^BX`` parameter g) is ``_`` too and is
doubled in the data first (LABELS.md: doubled = literal).
"""

from __future__ import annotations

from dataclasses import dataclass

from factoryd.labels.errors import LabelRenderError
from factoryd.labels.symbols import (
    DATAMATRIX_QUIET_MODULES,
    QR_QUIET_MODULES,
    datamatrix_matrix,
    qr_matrix,
    text_width_dots,
)
from factoryd.labels.template import DataMatrixField, LabelTemplate, LabelValues, QrField, TextField

# ^FH's escape indicator (the ZPL default) and the DataMatrix escape character we set in ^BX.
HEX_INDICATOR = "_"
DATAMATRIX_ESCAPE = "_"
# Bytes that must never appear raw in field data: the command prefixes, the escape indicator, and
# the backslash (ZPL's \& line break in ^FB blocks).
_UNSAFE = frozenset(b"^~_\\")
# ^BQ: model 2 (LABELS.md: default, recommended); mask 7 = automatic.
QR_MODEL = 2
QR_MASK = 7
# ^BX quality 200 = ECC 200 (0..140 are legacy); aspect 1 = square.
DATAMATRIX_QUALITY = 200
DATAMATRIX_ASPECT = 1


def escape_field_data(value: str) -> str:
    """``value`` as ``^FH`` field data: UTF-8, with unsafe and non-printable bytes as ``_XX``."""
    out: list[str] = []
    for byte in value.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte not in _UNSAFE:
            out.append(chr(byte))
        else:
            out.append(f"{HEX_INDICATOR}{byte:02X}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Box:
    """Where a field lands on the label, in dots (a symbol's box includes its quiet zone)."""

    x: int
    y: int
    width: int
    height: int

    def overlaps(self, other: Box) -> bool:
        """True when the two boxes share any dot."""
        return (
            self.x < other.x + other.width
            and other.x < self.x + self.width
            and self.y < other.y + other.height
            and other.y < self.y + self.height
        )


def _check_box(template: LabelTemplate, number: int, kind: str, box: Box) -> None:
    if box.x + box.width > template.width_dots or box.y + box.height > template.height_dots:
        raise LabelRenderError(
            f"field {number} ({kind}) is {box.width}x{box.height} dots at {box.x},{box.y}: it runs off the "
            f"{template.width_dots}x{template.height_dots}-dot label (smaller module size, or move it)"
        )


def _quiet(x: int, y: int, size_w: int, size_h: int, margin: int) -> Box:
    """A symbol's box grown by its quiet zone (clipped at the label's top left edge)."""
    left, top = max(0, x - margin), max(0, y - margin)
    return Box(left, top, x + size_w + margin - left, y + size_h + margin - top)


def render_zpl(template: LabelTemplate, values: LabelValues) -> bytes:
    """The label's ZPL bytes; LabelRenderError if a value cannot be placed (missing code, too big).

    A symbol must fit the label, and its quiet zone must stay clear of every other field: a text
    running into a code makes it unreadable, so such a label is refused rather than printed.
    """
    lines = [
        "^XA",
        "^CI28",  # LABELS.md: UTF-8 field data
        f"^PW{template.width_dots}",
        f"^LL{template.height_dots}",
        "^LH0,0",
    ]
    boxes: list[tuple[int, str, Box, bool]] = []  # field number, kind, box, is a symbol
    for number, item in enumerate(template.fields, 1):
        data = values.fill(item.value)
        origin = f"^FO{item.x_dots},{item.y_dots}"
        if isinstance(item, TextField):
            width = item.width_dots or item.height_dots
            length = min(text_width_dots(data, item.height_dots, width), template.width_dots - item.x_dots)
            boxes.append((number, "text", Box(item.x_dots, item.y_dots, length, item.height_dots), False))
            lines.append(f"{origin}^A0N,{item.height_dots},{width}^FH^FD{escape_field_data(data)}^FS")
        elif isinstance(item, QrField):
            if not data:
                raise LabelRenderError(f"field {number} (qr) has no data for device {values.device_id!r}")
            size = len(qr_matrix(data, item.error)) * item.magnification
            _check_box(template, number, "qr", Box(item.x_dots, item.y_dots, size, size))
            margin = QR_QUIET_MODULES * item.magnification
            boxes.append((number, "qr", _quiet(item.x_dots, item.y_dots, size, size, margin), True))
            # LABELS.md: ^FD starts with the switches (error level, A = automatic input), a comma, then data.
            lines.append(
                f"{origin}^BQN,{QR_MODEL},{item.magnification},{item.error},{QR_MASK}"
                f"^FH^FD{item.error}A,{escape_field_data(data)}^FS"
            )
        elif isinstance(item, DataMatrixField):
            matrix = datamatrix_matrix(data.encode("utf-8"))
            width, height = len(matrix[0]) * item.module_dots, len(matrix) * item.module_dots
            _check_box(template, number, "datamatrix", Box(item.x_dots, item.y_dots, width, height))
            margin = DATAMATRIX_QUIET_MODULES * item.module_dots
            boxes.append(
                (number, "datamatrix", _quiet(item.x_dots, item.y_dots, width, height, margin), True)
            )
            doubled = data.replace(DATAMATRIX_ESCAPE, DATAMATRIX_ESCAPE * 2)
            lines.append(
                f"{origin}^BXN,{item.module_dots},{DATAMATRIX_QUALITY},0,0,1,{DATAMATRIX_ESCAPE},"
                f"{DATAMATRIX_ASPECT}^FH^FD{escape_field_data(doubled)}^FS"
            )
    for number, kind, box, symbol in boxes:
        if not symbol:
            continue
        for other, other_kind, other_box, _ in boxes:
            if other != number and box.overlaps(other_box):
                raise LabelRenderError(
                    f"field {number} ({kind}, {box.width}x{box.height} dots with its quiet zone) overlaps "
                    f"field {other} ({other_kind}) for device {values.device_id!r}: move one of them"
                )
    lines += ["^PQ1", "^XZ"]
    return ("\n".join(lines) + "\n").encode("ascii")
