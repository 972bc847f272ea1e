"""Matter onboarding payloads: the QR-code payload (``MT:…``) and the manual pairing code.

Both are written from the Matter Core Specification (§5.1, "Onboarding Payload") and checked
against the connectedhomeip SDK's published test vectors (``tests/test_matter_payload.py``):

- QR code: ``MT:`` + base-38 of 88 bits packed least significant bit first: version (3),
  vendor ID (16), product ID (16), commissioning flow (2), rendezvous capabilities (8),
  discriminator (12), passcode (27), padding (4). The 11 bytes go out in little-endian chunks of
  3 bytes (5 characters), the last 2 bytes in 4 characters; the least significant digit comes first.
- Manual code: digit 1 = (flow != standard) << 2 | short discriminator >> 2, digits 2-6 =
  (short & 3) << 14 | passcode & 0x3FFF, digits 7-10 = passcode >> 14, then VID and PID (5 digits
  each) when the flow is not standard, then a Verhoeff check digit: 11 or 21 digits.

The passcode policy (range, forbidden values) and the discriminator range are here too: every
passcode the station makes goes through :func:`check_passcode`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from factoryd.errors import InputError

QR_PREFIX = "MT:"
BASE38_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-."
_BASE38_INDEX = {ch: i for i, ch in enumerate(BASE38_ALPHABET)}
# Characters per chunk of 1, 2 and 3 bytes (38^2 > 2^8, 38^4 > 2^16, 38^5 > 2^24).
_BASE38_CHARS_PER_BYTES = {1: 2, 2: 4, 3: 5}
_BYTES_PER_BASE38_CHARS = {2: 1, 4: 2, 5: 3}

# Field widths of the packed QR payload, in bits (spec §5.1.3, table "Packed Binary Data Structure").
VERSION_BITS = 3
VID_BITS = 16
PID_BITS = 16
FLOW_BITS = 2
RENDEZVOUS_BITS = 8
DISCRIMINATOR_BITS = 12
PASSCODE_BITS = 27
PAYLOAD_BYTES = 11  # 88 bits: the fields above, then 4 padding bits that must be zero
QR_BASE_CHARS = 19  # 3 chunks of 5 characters + one of 4

# Passcode policy (spec §5.1.7.1): 1..99999998 and none of the trivially guessable values.
PASSCODE_MIN = 1
PASSCODE_MAX = 99_999_998
FORBIDDEN_PASSCODES = frozenset(
    {0, 11111111, 22222222, 33333333, 44444444, 55555555, 66666666, 77777777, 88888888, 99999999}
    | {12345678, 87654321}
)
DISCRIMINATOR_MAX = (1 << DISCRIMINATOR_BITS) - 1  # 4095
SHORT_DISCRIMINATOR_SHIFT = 8  # the manual code carries the upper 4 of the 12 bits

MANUAL_SHORT_DIGITS = 11
MANUAL_LONG_DIGITS = 21


class CommissioningFlow(IntEnum):
    """How the device enters commissioning mode (spec §5.1.3)."""

    STANDARD = 0
    USER_ACTION = 1
    CUSTOM = 2


class Rendezvous(IntFlag):
    """Discovery capabilities bitmap of the QR payload (spec §5.1.3; b3 Wi-Fi PAF since 1.4)."""

    NONE = 0
    SOFT_AP = 1
    BLE = 2
    ON_NETWORK = 4
    WIFI_PAF = 8


@dataclass(frozen=True, slots=True)
class OnboardingCodes:
    """What a Matter device's label carries: its QR-code payload and its manual pairing code."""

    qr_payload: str
    manual_code: str

    def __repr__(self) -> str:
        # Both strings contain the setup passcode: never let a repr put them in a log line.
        return "OnboardingCodes(qr_payload='MT:***', manual_code='***')"


@dataclass(frozen=True, slots=True)
class SetupPayload:
    """The fields of a Matter onboarding payload (no optional TLV data)."""

    discriminator: int
    passcode: int
    vendor_id: int = 0
    product_id: int = 0
    flow: CommissioningFlow = CommissioningFlow.STANDARD
    rendezvous: Rendezvous = Rendezvous.ON_NETWORK
    version: int = 0
    # A manual code carries only the upper 4 discriminator bits; a decoded one says so.
    short_discriminator: bool = False

    def __post_init__(self) -> None:
        _check_width("version", self.version, VERSION_BITS)
        _check_width("vendor_id", self.vendor_id, VID_BITS)
        _check_width("product_id", self.product_id, PID_BITS)
        _check_width("discriminator", self.discriminator, DISCRIMINATOR_BITS)
        _check_width("passcode", self.passcode, PASSCODE_BITS)
        _check_width("rendezvous", int(self.rendezvous), RENDEZVOUS_BITS)
        if self.flow not in set(CommissioningFlow):
            raise InputError(f"commissioning flow {self.flow!r} is not 0, 1 or 2")

    def __repr__(self) -> str:
        return (
            f"SetupPayload(discriminator={self.discriminator}, passcode=***, "
            f"vendor_id=0x{self.vendor_id:04X}, "
            f"product_id=0x{self.product_id:04X}, flow={self.flow.name}, rendezvous={int(self.rendezvous)})"
        )

    def codes(self) -> OnboardingCodes:
        """Both onboarding codes of this payload."""
        return OnboardingCodes(qr_payload=qr_payload(self), manual_code=manual_code(self))


def _check_width(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise InputError(f"{name} {value!r} does not fit in {bits} bits")


# -- passcode and discriminator policy ---------------------------------------------------------------


def passcode_problem(passcode: int) -> str | None:
    """Why ``passcode`` may not be a Matter setup passcode, or None when it may."""
    if not isinstance(passcode, int) or isinstance(passcode, bool):
        return f"the setup passcode must be an integer, not {type(passcode).__name__}"
    if passcode in FORBIDDEN_PASSCODES:
        # The value itself is not repeated: the message may reach a log.
        return "the setup passcode is one of the forbidden trivial values (spec 5.1.7.1)"
    if not PASSCODE_MIN <= passcode <= PASSCODE_MAX:
        return f"the setup passcode must be in {PASSCODE_MIN}..{PASSCODE_MAX}"
    return None


def check_passcode(passcode: int) -> int:
    """``passcode`` if it is a valid setup passcode; InputError naming the rule otherwise."""
    problem = passcode_problem(passcode)
    if problem is not None:
        raise InputError(problem)
    return passcode


def check_discriminator(discriminator: int) -> int:
    """``discriminator`` if it fits the 12 bits; InputError otherwise."""
    if not isinstance(discriminator, int) or not 0 <= discriminator <= DISCRIMINATOR_MAX:
        raise InputError(f"the discriminator must be in 0..{DISCRIMINATOR_MAX}, got {discriminator!r}")
    return discriminator


def random_passcode() -> int:
    """A fresh setup passcode from the OS CSPRNG, never a forbidden one."""
    while True:
        candidate = PASSCODE_MIN + secrets.randbelow(PASSCODE_MAX - PASSCODE_MIN + 1)
        if candidate not in FORBIDDEN_PASSCODES:
            return candidate


def random_discriminator(low: int = 0, high: int = DISCRIMINATOR_MAX) -> int:
    """A discriminator drawn uniformly from ``low..high`` (inclusive)."""
    check_discriminator(low)
    check_discriminator(high)
    if low > high:
        raise InputError(f"discriminator range {low}..{high} is empty")
    return low + secrets.randbelow(high - low + 1)


# -- base-38 --------------------------------------------------------------------------------------


def base38_encode(data: bytes) -> str:
    """Base-38 of ``data`` in chunks of 3 little-endian bytes, least significant digit first."""
    out: list[str] = []
    for start in range(0, len(data), 3):
        chunk = data[start : start + 3]
        value = int.from_bytes(chunk, "little")
        for _ in range(_BASE38_CHARS_PER_BYTES[len(chunk)]):
            value, digit = divmod(value, 38)
            out.append(BASE38_ALPHABET[digit])
    return "".join(out)


def base38_decode(text: str) -> bytes:
    """The bytes of a base-38 string; InputError on a bad character, length or chunk value."""
    out = bytearray()
    for start in range(0, len(text), 5):
        chunk = text[start : start + 5]
        size = _BYTES_PER_BASE38_CHARS.get(len(chunk))
        if size is None:
            raise InputError(f"base-38 text of {len(text)} characters has a bad final chunk")
        value = 0
        for ch in reversed(chunk):
            digit = _BASE38_INDEX.get(ch)
            if digit is None:
                raise InputError(f"{ch!r} is not a base-38 character")
            value = value * 38 + digit
        if value >= 1 << (8 * size):
            raise InputError(f"base-38 chunk {chunk!r} does not fit in {size} bytes")
        out += value.to_bytes(size, "little")
    return bytes(out)


# -- QR-code payload ---------------------------------------------------------------------------------

_QR_FIELDS = (
    ("version", VERSION_BITS),
    ("vendor_id", VID_BITS),
    ("product_id", PID_BITS),
    ("flow", FLOW_BITS),
    ("rendezvous", RENDEZVOUS_BITS),
    ("discriminator", DISCRIMINATOR_BITS),
    ("passcode", PASSCODE_BITS),
)


def qr_payload(payload: SetupPayload) -> str:
    """The ``MT:`` QR-code payload string (base payload, no optional TLV data)."""
    if payload.short_discriminator:
        raise InputError("a QR payload needs the full 12-bit discriminator, not the short one")
    bits = 0
    offset = 0
    values = {
        "version": payload.version,
        "vendor_id": payload.vendor_id,
        "product_id": payload.product_id,
        "flow": int(payload.flow),
        "rendezvous": int(payload.rendezvous),
        "discriminator": payload.discriminator,
        "passcode": payload.passcode,
    }
    for name, width in _QR_FIELDS:
        bits |= values[name] << offset
        offset += width
    return QR_PREFIX + base38_encode(bits.to_bytes(PAYLOAD_BYTES, "little"))


def parse_qr_payload(text: str) -> SetupPayload:
    """Decode an ``MT:`` payload (optional TLV data after the 19 characters is ignored)."""
    if not text.startswith(QR_PREFIX):
        raise InputError(f"a Matter QR payload starts with {QR_PREFIX!r}")
    body = text[len(QR_PREFIX) :]
    if len(body) < QR_BASE_CHARS:
        raise InputError(f"a Matter QR payload has at least {QR_BASE_CHARS} characters after MT:")
    raw = base38_decode(body)
    bits = int.from_bytes(raw[:PAYLOAD_BYTES], "little")
    fields: dict[str, int] = {}
    offset = 0
    for name, width in _QR_FIELDS:
        fields[name] = (bits >> offset) & ((1 << width) - 1)
        offset += width
    if bits >> offset:
        raise InputError("the QR payload's padding bits are not zero")
    try:
        flow = CommissioningFlow(fields["flow"])
    except ValueError:
        raise InputError(f"the QR payload's commissioning flow {fields['flow']} is reserved") from None
    return SetupPayload(
        discriminator=fields["discriminator"],
        passcode=fields["passcode"],
        vendor_id=fields["vendor_id"],
        product_id=fields["product_id"],
        flow=flow,
        rendezvous=Rendezvous(fields["rendezvous"]),
        version=fields["version"],
    )


# -- manual pairing code --------------------------------------------------------------------------

# Verhoeff's dihedral-group tables (D5 multiplication, permutation, inverse).
_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)
_VERHOEFF_INV = (0, 4, 3, 2, 1, 5, 6, 7, 8, 9)


def verhoeff_check_digit(digits: str) -> str:
    """The Verhoeff check digit to append to the decimal string ``digits``."""
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[(i + 1) % 8][int(ch)]]
    return str(_VERHOEFF_INV[check])


def manual_code(payload: SetupPayload) -> str:
    """The 11-digit (standard flow) or 21-digit (VID/PID included) manual pairing code."""
    full = payload.discriminator
    short = full if payload.short_discriminator else full >> SHORT_DISCRIMINATOR_SHIFT
    pin = payload.passcode
    long_code = payload.flow is not CommissioningFlow.STANDARD
    first = (int(long_code) << 2) | (short >> 2)
    digits = f"{first}{((short & 3) << 14) | (pin & 0x3FFF):05d}{pin >> 14:04d}"
    if long_code:
        digits += f"{payload.vendor_id:05d}{payload.product_id:05d}"
    return digits + verhoeff_check_digit(digits)


def parse_manual_code(text: str) -> SetupPayload:
    """Decode a manual pairing code (dashes and spaces allowed); the discriminator comes back short."""
    digits = text.replace("-", "").replace(" ", "")
    if not digits.isascii() or not digits.isdigit():
        raise InputError("a manual pairing code has only decimal digits")
    if len(digits) not in (MANUAL_SHORT_DIGITS, MANUAL_LONG_DIGITS):
        raise InputError(f"a manual pairing code has {MANUAL_SHORT_DIGITS} or {MANUAL_LONG_DIGITS} digits")
    body, check = digits[:-1], digits[-1]
    if verhoeff_check_digit(body) != check:
        raise InputError("the manual pairing code's check digit is wrong (a typo?)")
    first = int(body[0])
    long_code = bool(first & 4)
    if long_code != (len(digits) == MANUAL_LONG_DIGITS):
        raise InputError("the manual pairing code's length does not match its VID/PID flag")
    if first > 7:
        raise InputError("the manual pairing code's first digit is above 7")
    chunk2, chunk3 = int(body[1:6]), int(body[6:10])
    if chunk2 >= 1 << 16 or chunk3 >= 1 << 13:
        raise InputError("the manual pairing code's digits do not form a passcode")
    short = ((first & 3) << 2) | (chunk2 >> 14)
    pin = (chunk3 << 14) | (chunk2 & 0x3FFF)
    if pin == 0:
        raise InputError("the manual pairing code holds no passcode")
    vid = int(body[10:15]) if long_code else 0
    pid = int(body[15:20]) if long_code else 0
    return SetupPayload(
        discriminator=short,
        passcode=pin,
        vendor_id=vid,
        product_id=pid,
        # The code says only "not standard"; custom is what the SDK's parser reports.
        flow=CommissioningFlow.CUSTOM if long_code else CommissioningFlow.STANDARD,
        rendezvous=Rendezvous.NONE,
        short_discriminator=True,
    )
