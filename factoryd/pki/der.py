"""A minimal strict DER reader and writer, enough for CMS SignedData and certificates.

cryptography builds CMS signatures but cannot verify them nor take a signature made
elsewhere (a PKCS#11 token); these few helpers fill that gap. Only low tag numbers
(< 31) and definite lengths are accepted, as DER requires.
"""

from __future__ import annotations

from dataclasses import dataclass

TAG_INTEGER = 0x02
TAG_BIT_STRING = 0x03
TAG_OCTET_STRING = 0x04
TAG_NULL = 0x05
TAG_OID = 0x06
TAG_UTC_TIME = 0x17
TAG_GENERALIZED_TIME = 0x18
TAG_SEQUENCE = 0x30
TAG_SET = 0x31
TAG_CONTEXT_0 = 0xA0  # [0] constructed
TAG_CONTEXT_1 = 0xA1  # [1] constructed

# No structure we read nests deeper than this; a bound stops hostile recursion.
MAX_DEPTH = 32


class DerError(ValueError):
    """The bytes are not the DER structure expected."""


@dataclass(frozen=True)
class Tlv:
    """One DER element: its tag, its content bytes and its whole encoding."""

    tag: int
    content: bytes
    raw: bytes

    @property
    def constructed(self) -> bool:
        """True when the element holds further elements."""
        return bool(self.tag & 0x20)

    def children(self) -> list[Tlv]:
        """The elements inside a constructed element."""
        if not self.constructed:
            raise DerError(f"tag 0x{self.tag:02x} is not constructed")
        return read_all(self.content)


def read_one(data: bytes, offset: int = 0) -> tuple[Tlv, int]:
    """Read the element at ``offset``; return it and the offset after it."""
    if offset + 2 > len(data):
        raise DerError("truncated element header")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError("high tag numbers are not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DerError("indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > 4 or pos + count > len(data):
            raise DerError("bad length field")
        length_bytes = data[pos : pos + count]
        if length_bytes[0] == 0:
            raise DerError("non-minimal length encoding")
        length = int.from_bytes(length_bytes, "big")
        if length < 0x80:
            raise DerError("non-minimal length encoding")
        pos += count
    end = pos + length
    if end > len(data):
        raise DerError("element runs past the end of the data")
    return Tlv(tag, data[pos:end], data[offset:end]), end


def read_all(data: bytes) -> list[Tlv]:
    """Read consecutive elements filling ``data`` exactly."""
    out: list[Tlv] = []
    offset = 0
    while offset < len(data):
        tlv, offset = read_one(data, offset)
        out.append(tlv)
    return out


def read_single(data: bytes) -> Tlv:
    """Read exactly one element that fills ``data``."""
    tlv, end = read_one(data)
    if end != len(data):
        raise DerError("trailing bytes after the element")
    return tlv


def expect(tlv: Tlv, tag: int, what: str) -> Tlv:
    """Return ``tlv`` if it has ``tag``, else raise naming ``what``."""
    if tlv.tag != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, got 0x{tlv.tag:02x}")
    return tlv


def decode_oid(tlv: Tlv) -> str:
    """Dotted form of an OBJECT IDENTIFIER element."""
    expect(tlv, TAG_OID, "object identifier")
    if not tlv.content or tlv.content[-1] & 0x80:
        raise DerError("malformed object identifier")
    arcs: list[int] = []
    value = 0
    for byte in tlv.content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def decode_integer(tlv: Tlv) -> int:
    """Value of an INTEGER element."""
    expect(tlv, TAG_INTEGER, "integer")
    if not tlv.content:
        raise DerError("empty integer")
    return int.from_bytes(tlv.content, "big", signed=True)


def encode(tag: int, content: bytes) -> bytes:
    """DER-encode one element."""
    length = len(content)
    if length < 0x80:
        header = bytes([tag, length])
    else:
        length_bytes = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([tag, 0x80 | len(length_bytes), *length_bytes])
    return header + content


def encode_integer(value: int) -> bytes:
    """DER-encode a non-negative INTEGER."""
    if value < 0:
        raise DerError("negative integers are not needed here")
    return encode(TAG_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))
