"""2-D symbols as module matrices, made by real encoders: segno (QR) and libdmtx (DataMatrix).

The ZPL renderer uses them to check that a symbol fits the label before it is sent; the preview
draws them. Both see the same data the printer gets, so a preview decodes like the printed label.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import segno
from PIL import ImageFont

from factoryd.labels.errors import LabelRenderError


def _libdmtx() -> Any:
    """pylibdmtx, imported when the first DataMatrix is made: a station without labels needs no libdmtx."""
    with warnings.catch_warnings():
        # pylibdmtx 0.1.10 (its last release, 2022) checks libdmtx's version with distutils' deprecated
        # LooseVersion at import; the wrapper itself is a thin ctypes layer over Debian's libdmtx0b.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from pylibdmtx import pylibdmtx  # noqa: PLC0415
        except ImportError as exc:
            raise LabelRenderError(
                f"DataMatrix codes need the libdmtx library ({exc}): apt-get install libdmtx0b"
            ) from None
    return pylibdmtx


QrErrorLevel = Literal["L", "M", "Q", "H"]
Matrix = tuple[tuple[bool, ...], ...]

# LABELS.md: a QR quiet zone is 4 modules; ISO 16022 asks 1 module around a DataMatrix, and
# libdmtx's decoder wants a little more, so previews and fit checks keep 2.
QR_QUIET_MODULES = 4
DATAMATRIX_QUIET_MODULES = 2
# LABELS.md: quality-200 input is truncated at 3072 bytes by the printer.
DATAMATRIX_MAX_BYTES = 3072
# libdmtx's encoder draws each module as this many pixels inside this margin (its defaults).
_DMTX_MODULE_PX = 5
_DMTX_MARGIN_PX = 10


def qr_matrix(data: str, error: QrErrorLevel) -> Matrix:
    """The QR modules (no quiet zone) a printer makes for ``data`` at error level ``error``."""
    try:
        # boost_error=False: the printer keeps the level it is given (LABELS.md: segno raises M to Q).
        code = segno.make(data, error=error.lower(), boost_error=False, micro=False)
    except (segno.DataOverflowError, ValueError) as exc:
        raise LabelRenderError(
            f"{len(data)} characters do not fit a QR code at level {error}: {exc}"
        ) from exc
    return tuple(tuple(bool(m) for m in row) for row in code.matrix_iter(border=0))


def datamatrix_matrix(data: bytes) -> Matrix:
    """The ECC 200 DataMatrix modules (no quiet zone) for ``data``, square, size chosen by libdmtx."""
    if not data:
        raise LabelRenderError("a DataMatrix code needs data")
    if len(data) > DATAMATRIX_MAX_BYTES:
        raise LabelRenderError(
            f"a DataMatrix code holds at most {DATAMATRIX_MAX_BYTES} bytes, not {len(data)}"
        )
    try:
        encoded = _libdmtx().encode(data, scheme="Ascii", size="SquareAuto")
    except Exception as exc:  # pylibdmtx raises PyLibDMTXError or ValueError for data it cannot encode
        raise LabelRenderError(f"libdmtx cannot encode {len(data)} bytes as DataMatrix: {exc}") from exc
    inner_w = encoded.width - 2 * _DMTX_MARGIN_PX
    inner_h = encoded.height - 2 * _DMTX_MARGIN_PX
    if inner_w <= 0 or inner_h <= 0 or inner_w % _DMTX_MODULE_PX or inner_h % _DMTX_MODULE_PX:
        raise LabelRenderError(f"libdmtx returned an unexpected {encoded.width}x{encoded.height} image")
    bytes_per_px = encoded.bpp // 8
    stride = encoded.width * bytes_per_px
    half = _DMTX_MODULE_PX // 2

    def dark(col: int, row: int) -> bool:
        x = _DMTX_MARGIN_PX + col * _DMTX_MODULE_PX + half
        y = _DMTX_MARGIN_PX + row * _DMTX_MODULE_PX + half
        value: int = encoded.pixels[y * stride + x * bytes_per_px]
        return value < 128

    return tuple(
        tuple(dark(c, r) for c in range(inner_w // _DMTX_MODULE_PX))
        for r in range(inner_h // _DMTX_MODULE_PX)
    )


def text_width_dots(text: str, height_dots: int, width_dots: int) -> int:
    """How wide a ``^A0`` text is drawn in the preview (Pillow's scalable font), in dots."""
    font = ImageFont.load_default(size=height_dots)
    return max(1, round(font.getlength(text) * width_dots / height_dots))
