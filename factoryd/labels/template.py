"""Per-lot label templates: a small TOML format, validated whole before a lot may use it.

A template is the label's size in dots and a list of fields placed in dots from the top left:
text lines, a QR code and a DataMatrix code, each with a value made from placeholders. Values are
data, never ZPL: :mod:`factoryd.labels.zpl` hex-escapes every byte a printer could read as a
command, so neither a device ID nor a template can add printer commands. ``docs/labels.md`` has the
format; :data:`DEFAULT_TEMPLATE_TOML` is the one a lot gets when it has none of its own.
"""

from __future__ import annotations

import hashlib
import string
import tomllib
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factoryd.labels.errors import LabelRenderError, LabelTemplateError

# A label printer's print width tops out at 4 inches (812 dots at 203 dpi, 1248 at 300 dpi, 2400 at
# 600 dpi); lengths are allowed up to ~ 20 inches. Anything bigger is a typo.
MAX_LABEL_DOTS = 12_000
# ZPL ^A0 heights are 10..32000 dots; a label line below 10 dots is unreadable anyway.
MIN_TEXT_DOTS = 10
MAX_TEXT_DOTS = 1_000
# LABELS.md: ^BQ magnification 1..10; ^BX module size in dots (Zebra allows 1..label height).
MAX_QR_MAGNIFICATION = 10
MAX_DATAMATRIX_MODULE_DOTS = 40
MAX_FIELDS = 32
MAX_VALUE_CHARS = 256
MAX_TEMPLATE_BYTES = 64 * 1024
DPI_VALUES = (152, 203, 300, 600)

# The placeholders a value may use; docs/labels.md says where each comes from.
PLACEHOLDERS = ("device_id", "serial", "lot", "qr_payload", "manual_code", "manual_code_digits")
# Placeholders only a Matter lot (one with onboarding codes) can fill.
MATTER_PLACEHOLDERS = frozenset({"qr_payload", "manual_code", "manual_code_digits"})

# Worst-case values a template is tried with at set-up: a UUID device ID, a 32-character serial, the
# longest lot name, a Matter base payload and the 21-digit manual code.
SAMPLE_VALUES: dict[str, str] = {
    "device_id": "8c1f0d5e-0b7a-4c53-9d0a-3f6e2b1a9c77",
    "serial": "0123456789ABCDEF0123456789ABCDEF",
    "lot": "L" * 64,
    "qr_payload": "MT:KSNK4SIC13-JPR4UY00",
    "manual_code": "7028-712-6450-4387-000-18-7",
    "manual_code_digits": "702871264504387000187",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def placeholders_of(value: str) -> frozenset[str]:
    """The placeholders ``value`` uses; ValueError for unknown ones, format specs or bad braces."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise ValueError(f"{value!r}: unknown placeholder {{{name}}}; known: {', '.join(PLACEHOLDERS)}")
        if spec or conversion:
            raise ValueError(f"{value!r}: placeholder {{{name}}} takes no format spec or conversion")
        names.add(name)
    return frozenset(names)


class _Field(_Model):
    x_dots: int = Field(ge=0, le=MAX_LABEL_DOTS)
    y_dots: int = Field(ge=0, le=MAX_LABEL_DOTS)
    value: str = Field(min_length=1, max_length=MAX_VALUE_CHARS)

    @field_validator("value")
    @classmethod
    def _check_value(cls, value: str) -> str:
        if any(not ch.isprintable() for ch in value):
            raise ValueError(f"{value!r}: only printable characters (no tabs or newlines)")
        placeholders_of(value)
        return value


class TextField(_Field):
    """A line of text in the printer's scalable font 0 (``^A0``)."""

    kind: Literal["text"]
    height_dots: int = Field(ge=MIN_TEXT_DOTS, le=MAX_TEXT_DOTS)
    # Character width; None = same as the height (the font's own proportions).
    width_dots: int | None = Field(default=None, ge=MIN_TEXT_DOTS, le=MAX_TEXT_DOTS)


class QrField(_Field):
    """A QR code, model 2 (``^BQ``); LABELS.md: Matter payloads want level M or Q."""

    kind: Literal["qr"]
    magnification: int = Field(ge=1, le=MAX_QR_MAGNIFICATION)
    error: Literal["L", "M", "Q", "H"] = "Q"


class DataMatrixField(_Field):
    """An ECC 200 DataMatrix code (``^BX``)."""

    kind: Literal["datamatrix"]
    module_dots: int = Field(ge=1, le=MAX_DATAMATRIX_MODULE_DOTS)


LabelField = Annotated[TextField | QrField | DataMatrixField, Field(discriminator="kind")]


class LabelTemplate(_Model):
    """A validated label template (``LabelTemplate.parse`` is the only way in from text)."""

    format: Literal[1]  # the template format version; a future format gets its own number
    dpi: int
    width_dots: int = Field(ge=1, le=MAX_LABEL_DOTS)
    height_dots: int = Field(ge=1, le=MAX_LABEL_DOTS)
    fields: tuple[LabelField, ...] = Field(alias="field", min_length=1, max_length=MAX_FIELDS)

    @field_validator("dpi")
    @classmethod
    def _check_dpi(cls, dpi: int) -> int:
        if dpi not in DPI_VALUES:
            raise ValueError(
                f"dpi must be one of {', '.join(map(str, DPI_VALUES))} (a printhead's), got {dpi}"
            )
        return dpi

    @model_validator(mode="after")
    def _check_origins(self) -> LabelTemplate:
        for number, item in enumerate(self.fields, 1):
            if item.x_dots >= self.width_dots or item.y_dots >= self.height_dots:
                raise ValueError(
                    f"field {number} ({item.kind}) starts at {item.x_dots},{item.y_dots}, outside the "
                    f"{self.width_dots}x{self.height_dots}-dot label"
                )
            if isinstance(item, TextField) and item.y_dots + item.height_dots > self.height_dots:
                raise ValueError(
                    f"field {number} (text) is {item.height_dots} dots high from y={item.y_dots}: it runs "
                    f"off the {self.height_dots}-dot label"
                )
        return self

    @classmethod
    def parse(cls, text: str | bytes, *, source: str = "label template") -> LabelTemplate:
        """Parse and validate a TOML template, with a trial render; LabelTemplateError names the problem."""
        raw = text.encode() if isinstance(text, str) else text
        if len(raw) > MAX_TEMPLATE_BYTES:
            raise LabelTemplateError(f"{source} is {len(raw)} bytes; at most {MAX_TEMPLATE_BYTES}")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise LabelTemplateError(f"{source} is not UTF-8 text: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise LabelTemplateError(f"{source} is not valid TOML: {exc}") from None
        try:
            template = cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
            )
            raise LabelTemplateError(f"{source} refused: {problems}") from None
        template.check_fits(source=source)
        return template

    @property
    def placeholders(self) -> frozenset[str]:
        """Every placeholder the template's fields use."""
        return frozenset().union(*(placeholders_of(item.value) for item in self.fields))

    @property
    def needs_onboarding_codes(self) -> bool:
        """True when the template prints Matter onboarding codes (only a Matter lot can fill it)."""
        return bool(self.placeholders & MATTER_PLACEHOLDERS)

    def check_fits(self, *, source: str = "label template") -> None:
        """Render with worst-case sample values; LabelTemplateError if a code runs off the label."""
        from factoryd.labels.zpl import render_zpl  # noqa: PLC0415 - zpl imports this module

        try:
            render_zpl(self, LabelValues.sample())
        except LabelRenderError as exc:
            raise LabelTemplateError(f"{source} refused with sample values: {exc}") from None


@dataclass(frozen=True, slots=True)
class LabelValues:
    """What one label's placeholders are filled with; codes only for a Matter lot."""

    device_id: str
    serial: str
    lot: str
    qr_payload: str | None = None
    manual_code: str | None = None

    @classmethod
    def sample(cls) -> LabelValues:
        """Worst-case values for a trial render."""
        return cls(
            device_id=SAMPLE_VALUES["device_id"],
            serial=SAMPLE_VALUES["serial"],
            lot=SAMPLE_VALUES["lot"],
            qr_payload=SAMPLE_VALUES["qr_payload"],
            manual_code=SAMPLE_VALUES["manual_code_digits"],
        )

    def __repr__(self) -> str:
        # The onboarding codes hold the setup passcode: never in a repr, a log line or a traceback.
        codes = "present" if self.qr_payload is not None else "none"
        return f"LabelValues(device_id={self.device_id!r}, lot={self.lot!r}, codes={codes})"

    def fill(self, value: str) -> str:
        """``value`` with its placeholders filled; LabelRenderError when a code is missing."""
        needed = placeholders_of(value)
        missing = sorted(needed & MATTER_PLACEHOLDERS) if self.qr_payload is None else []
        if missing:
            raise LabelRenderError(
                f"the template prints {', '.join('{' + m + '}' for m in missing)} but device "
                f"{self.device_id!r} has no onboarding codes (not a Matter lot?)"
            )
        digits = self.manual_code or ""
        return value.format(
            device_id=self.device_id,
            serial=self.serial,
            lot=self.lot,
            qr_payload=self.qr_payload or "",
            manual_code=group_manual_code(digits) if digits else "",
            manual_code_digits=digits,
        )


def group_manual_code(digits: str) -> str:
    """A Matter manual code as esp-matter-mfg-tool prints it: 4-3-4 (11 digits), 4-3-4-4-3-2-1 (21)."""
    if not digits.isdigit() or len(digits) not in (11, 21):
        raise LabelRenderError(f"a manual pairing code has 11 or 21 digits, got {len(digits)} characters")
    groups = (4, 3, 4) if len(digits) == 11 else (4, 3, 4, 4, 3, 2, 1)
    parts, at = [], 0
    for size in groups:
        parts.append(digits[at : at + size])
        at += size
    return "-".join(parts)


def template_sha256(text: str) -> str:
    """The SHA-256 (hex) of a template's text, for audit entries and the label list."""
    return hashlib.sha256(text.encode()).hexdigest()


# 50 x 30 mm at 203 dpi (8 dots/mm): the device ID as a DataMatrix (room for a 128-character ID:
# 40x40 modules of 4 dots), beside it the serial and lot, below it the ID in text.
DEFAULT_TEMPLATE_TOML = """\
# factoryd label template (docs/labels.md): 50 x 30 mm at 203 dpi
format = 1
dpi = 203
width_dots = 400
height_dots = 240

[[field]]
kind = "datamatrix"
x_dots = 16
y_dots = 16
module_dots = 4
value = "{device_id}"

[[field]]
kind = "text"
x_dots = 200
y_dots = 24
height_dots = 20
value = "SN {serial}"

[[field]]
kind = "text"
x_dots = 200
y_dots = 56
height_dots = 20
value = "Lot {lot}"

[[field]]
kind = "text"
x_dots = 16
y_dots = 204
height_dots = 18
value = "{device_id}"
"""

# A Matter lot's label: the onboarding QR code (the MT: payload) and the manual pairing code.
MATTER_TEMPLATE_TOML = """\
# factoryd Matter label template (docs/labels.md): 50 x 30 mm at 203 dpi
format = 1
dpi = 203
width_dots = 400
height_dots = 240

[[field]]
kind = "qr"
x_dots = 16
y_dots = 16
magnification = 5
error = "Q"
value = "{qr_payload}"

[[field]]
kind = "text"
x_dots = 190
y_dots = 40
height_dots = 26
value = "{manual_code}"

[[field]]
kind = "text"
x_dots = 190
y_dots = 90
height_dots = 18
value = "{device_id}"

[[field]]
kind = "text"
x_dots = 16
y_dots = 200
height_dots = 20
value = "SN {serial}  Lot {lot}"
"""
