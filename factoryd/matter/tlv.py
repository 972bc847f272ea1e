"""A small strict reader and writer of Matter TLV (spec appendix A), enough for Certification Declarations.

Why our own: the SDK's Python TLV module ships on PyPI only inside ``home-assistant-chip-core``, a
platform wheel of the whole SDK (its native controller library) for one pure-Python file; no
stand-alone maintained TLV package exists. The subset here is what a CD uses: anonymous and
context tags, integers, booleans, UTF-8 and byte strings, null, structures, arrays and lists.
Profile tags and floats are refused rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

from factoryd.errors import InputError

# Element types (low 5 bits of the control octet).
_SIGNED = range(0x00, 0x04)
_UNSIGNED = range(0x04, 0x08)
_FALSE, _TRUE = 0x08, 0x09
_UTF8 = range(0x0C, 0x10)
_BYTES = range(0x10, 0x14)
_NULL = 0x14
_STRUCT, _ARRAY, _LIST, _END = 0x15, 0x16, 0x17, 0x18
# Tag controls (high 3 bits): anonymous and context-specific are the only ones read here.
_TAG_ANONYMOUS = 0x00
_TAG_CONTEXT = 0x20
# A CD nests two levels; a bound stops hostile recursion.
MAX_DEPTH = 8

TlvValue = int | bool | str | bytes | None | list["TlvElement"]


class TlvError(InputError):
    """The bytes are not the Matter TLV expected."""


@dataclass(frozen=True, slots=True)
class TlvElement:
    """One element: its context tag (None when anonymous), its kind and its value."""

    tag: int | None
    kind: str  # "int", "uint", "bool", "utf8", "bytes", "null", "struct", "array", "list"
    value: TlvValue

    def members(self) -> list[TlvElement]:
        """The elements of a container."""
        if not isinstance(self.value, list):
            raise TlvError(f"element {self.tag} is a {self.kind}, not a container")
        return self.value


def _read(data: bytes, offset: int, depth: int) -> tuple[TlvElement, int]:
    if depth > MAX_DEPTH:
        raise TlvError("TLV nests too deep")
    if offset >= len(data):
        raise TlvError("TLV ends inside an element")
    control = data[offset]
    offset += 1
    tag_control, element_type = control & 0xE0, control & 0x1F
    tag: int | None
    if tag_control == _TAG_ANONYMOUS:
        tag = None
    elif tag_control == _TAG_CONTEXT:
        tag, offset = _take_int(data, offset, 1, signed=False)
    else:
        raise TlvError(f"TLV tag control 0x{tag_control:02x} (profile tags) is not supported")
    if element_type in _SIGNED or element_type in _UNSIGNED:
        signed = element_type in _SIGNED
        width = 1 << (element_type & 0x03)
        value, offset = _take_int(data, offset, width, signed=signed)
        return TlvElement(tag, "int" if signed else "uint", value), offset
    if element_type in (_FALSE, _TRUE):
        return TlvElement(tag, "bool", element_type == _TRUE), offset
    if element_type in _UTF8 or element_type in _BYTES:
        length, offset = _take_int(data, offset, 1 << (element_type & 0x03), signed=False)
        end = offset + length
        if end > len(data):
            raise TlvError("TLV string runs past the end")
        raw = data[offset:end]
        if element_type in _BYTES:
            return TlvElement(tag, "bytes", raw), end
        try:
            return TlvElement(tag, "utf8", raw.decode("utf-8")), end
        except UnicodeDecodeError:
            raise TlvError("TLV UTF-8 string is not valid UTF-8") from None
    if element_type == _NULL:
        return TlvElement(tag, "null", None), offset
    if element_type in (_STRUCT, _ARRAY, _LIST):
        kind = {_STRUCT: "struct", _ARRAY: "array", _LIST: "list"}[element_type]
        members: list[TlvElement] = []
        while True:
            if offset >= len(data):
                raise TlvError(f"TLV {kind} has no end-of-container")
            if data[offset] == _END:
                offset += 1
                break
            member, offset = _read(data, offset, depth + 1)
            if kind == "array" and member.tag is not None:
                raise TlvError("TLV array members must be anonymous")
            if kind == "struct" and member.tag is None:
                raise TlvError("TLV structure members must be tagged")
            members.append(member)
        return TlvElement(tag, kind, members), offset
    raise TlvError(f"TLV element type 0x{element_type:02x} is not supported")


def _take_int(data: bytes, offset: int, width: int, *, signed: bool) -> tuple[int, int]:
    end = offset + width
    if end > len(data):
        raise TlvError("TLV ends inside an integer")
    return int.from_bytes(data[offset:end], "little", signed=signed), end


def decode(data: bytes) -> TlvElement:
    """The single top-level element of ``data``; TlvError on anything else."""
    element, offset = _read(data, 0, 0)
    if offset != len(data):
        raise TlvError(f"{len(data) - offset} bytes follow the TLV element")
    return element


# -- writer ---------------------------------------------------------------------------------------


def _tag_bytes(tag: int | None) -> tuple[int, bytes]:
    if tag is None:
        return _TAG_ANONYMOUS, b""
    if not 0 <= tag <= 0xFF:
        raise TlvError(f"context tag {tag} does not fit a byte")
    return _TAG_CONTEXT, bytes([tag])


def encode_uint(tag: int | None, value: int) -> bytes:
    """An unsigned integer in the smallest width that holds it (as the SDK writes them)."""
    if value < 0:
        raise TlvError("an unsigned TLV integer cannot be negative")
    for code, width in ((0x04, 1), (0x05, 2), (0x06, 4), (0x07, 8)):
        if value < 1 << (8 * width):
            control, tag_raw = _tag_bytes(tag)
            return bytes([control | code]) + tag_raw + value.to_bytes(width, "little")
    raise TlvError(f"{value} does not fit 64 bits")


def _encode_string(tag: int | None, raw: bytes, base: int) -> bytes:
    control, tag_raw = _tag_bytes(tag)
    for offset, width in ((0, 1), (1, 2), (2, 4), (3, 8)):
        if len(raw) < 1 << (8 * width):
            return bytes([control | (base + offset)]) + tag_raw + len(raw).to_bytes(width, "little") + raw
    raise TlvError("TLV string too long")


def encode_utf8(tag: int | None, value: str) -> bytes:
    """A UTF-8 string element."""
    return _encode_string(tag, value.encode("utf-8"), 0x0C)


def encode_bytes(tag: int | None, value: bytes) -> bytes:
    """A byte string element."""
    return _encode_string(tag, value, 0x10)


def encode_container(tag: int | None, kind: str, members: list[bytes]) -> bytes:
    """A structure, array or list of already encoded members."""
    code = {"struct": _STRUCT, "array": _ARRAY, "list": _LIST}[kind]
    control, tag_raw = _tag_bytes(tag)
    return bytes([control | code]) + tag_raw + b"".join(members) + bytes([_END])
