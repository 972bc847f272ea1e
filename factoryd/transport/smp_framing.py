"""SMP (MCUmgr) over a serial console: the 8-byte SMP header and Zephyr's line framing, no I/O.

An SMP packet is an 8-byte big-endian header and a CBOR map (``docs/protocol-smp.md``)::

    byte 0  (version << 3) | op        op 0 read, 1 read rsp, 2 write, 3 write rsp; version 1 = SMP v2
    byte 1  flags (0)
    2..3    u16 length of the CBOR body
    4..5    u16 group id
    6       u8 sequence number (echoed by the reply)
    7       u8 command id

On a serial line (Zephyr's "SMP over console", ``CONFIG_MCUMGR_TRANSPORT_UART``) a packet travels
as ``base64(u16 BE (len + 2) ‖ packet ‖ CRC-16/XMODEM BE of the packet)`` cut into lines: the first
starts ``06 09``, every further one ``04 14``, each ends with LF and is at most 127 bytes, so each
carries at most 124 base64 characters, cut at a multiple of 4. Log lines may come between frames,
and between the lines of one frame; the decoder skips them, and resynchronises on the markers.

``SmpDecoder.feed(bytes) -> list[SmpPacket]`` never raises on line noise: "too short" (a frame
whose lines have not all arrived) waits; "invalid" (bad base64, a length that does not add up, a
CRC mismatch, a line over the cap) drops the frame, counts it, and looks for the next start
marker. The message definitions (groups, command ids, CBOR bodies) are the client's
(``factoryd.protocol.mcumgr``), on the ``smp`` package's models.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from factoryd.errors import CrcError, FrameError
from factoryd.transport.decoding import DecoderStats

HEADER = struct.Struct(">BBHHBB")
HEADER_BYTES = HEADER.size
START_MARKER = b"\x06\x09"
CONTINUE_MARKER = b"\x04\x14"
MARKER_BYTES = 2
LF = b"\n"
# Zephyr's console line buffers are 128 bytes (MCUMGR_TRANSPORT_UART line bufs); a line is at most
# 127 bytes with its marker and LF, so 124 base64 characters (a multiple of 4) per line.
MAX_LINE_BYTES = 127
LENGTH = struct.Struct(">H")
CRC = struct.Struct(">H")
# The largest SMP packet this host takes from a board. Zephyr's default netbuf is 384 bytes and
# MCUboot's serial recovery takes 1024; 8 KiB leaves room for boards configured with more while
# bounding what a garbled length or a hostile board can make the host buffer.
MAX_PACKET_BYTES = 8192
# A line the decoder holds before its LF arrives. Frame lines are <= 127 bytes; a log line may be
# longer, and is dropped whole once it passes this many bytes.
MAX_PENDING_LINE_BYTES = 1024
SMP_V2 = 1


def crc16_xmodem(data: bytes) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0, no reflection); b'123456789' gives 0x31C3."""
    return binascii.crc_hqx(data, 0)


class SmpOp(IntEnum):
    """The op field: what a packet is."""

    READ = 0
    READ_RSP = 1
    WRITE = 2
    WRITE_RSP = 3
    UNKNOWN = 7

    @classmethod
    def _missing_(cls, value: object) -> SmpOp:
        return cls.UNKNOWN

    @property
    def is_response(self) -> bool:
        """Whether a packet with this op answers a request."""
        return self in (SmpOp.READ_RSP, SmpOp.WRITE_RSP)

    def response(self) -> SmpOp:
        """The op of the reply to a request with this op."""
        if self is SmpOp.READ:
            return SmpOp.READ_RSP
        if self is SmpOp.WRITE:
            return SmpOp.WRITE_RSP
        raise ValueError(f"op {self.name} is not a request")


class SmpFramingError(FrameError):
    """An SMP packet or console frame that cannot be decoded (the defect named)."""


@dataclass(frozen=True, slots=True)
class SmpPacket:
    """One SMP packet: header fields and the CBOR body as bytes."""

    op: SmpOp
    group: int
    seq: int
    command: int
    payload: bytes = b""
    version: int = SMP_V2
    flags: int = 0

    def encode(self) -> bytes:
        """The packet: 8-byte header and CBOR body."""
        if len(self.payload) > 0xFFFF:
            raise SmpFramingError(f"SMP body of {len(self.payload)} bytes does not fit the u16 length")
        if not 0 <= self.seq <= 0xFF or not 0 <= self.command <= 0xFF or not 0 <= self.group <= 0xFFFF:
            raise SmpFramingError(
                f"SMP header out of range: group {self.group}, seq {self.seq}, command {self.command}"
            )
        first = (self.version & 0b11) << 3 | (int(self.op) & 0b111)
        head = HEADER.pack(first, self.flags, len(self.payload), self.group, self.seq, self.command)
        return head + self.payload

    @classmethod
    def decode(cls, data: bytes) -> SmpPacket:
        """One packet from its bytes; SmpFramingError when the length field does not match."""
        if len(data) < HEADER_BYTES:
            raise SmpFramingError(f"SMP packet of {len(data)} bytes is shorter than its 8-byte header")
        first, flags, length, group, seq, command = HEADER.unpack_from(data)
        if length != len(data) - HEADER_BYTES:
            raise SmpFramingError(
                f"SMP header says {length} body bytes, the packet carries {len(data) - HEADER_BYTES}"
            )
        return cls(
            SmpOp(first & 0b111), group, seq, command, bytes(data[HEADER_BYTES:]), first >> 3 & 0b11, flags
        )

    def lines(self, max_line_bytes: int = MAX_LINE_BYTES) -> bytes:
        """The packet as console lines, ready for the wire."""
        return encode_console(self.encode(), max_line_bytes)


def encode_console(packet: bytes, max_line_bytes: int = MAX_LINE_BYTES) -> bytes:
    """``packet`` framed for a serial console: base64 lines with markers, each ≤ max_line_bytes."""
    chars = (max_line_bytes - MARKER_BYTES - len(LF)) // 4 * 4
    if chars <= 0:
        raise ValueError(f"a {max_line_bytes}-byte line cannot carry a base64 quantum")
    if len(packet) > 0xFFFF - CRC.size:
        raise SmpFramingError(f"SMP packet of {len(packet)} bytes does not fit the u16 frame length")
    raw = LENGTH.pack(len(packet) + CRC.size) + packet + CRC.pack(crc16_xmodem(packet))
    text = base64.b64encode(raw)
    out = bytearray()
    for i in range(0, len(text), chars):
        out += START_MARKER if i == 0 else CONTINUE_MARKER
        out += text[i : i + chars]
        out += LF
    return bytes(out)


def console_bytes(packet_bytes: int, max_line_bytes: int = MAX_LINE_BYTES) -> int:
    """Bytes on the wire for a packet of this size (base64, markers, LFs): the wire-time model."""
    chars = (max_line_bytes - MARKER_BYTES - len(LF)) // 4 * 4
    text = (packet_bytes + LENGTH.size + CRC.size + 2) // 3 * 4
    lines = -(-text // chars)
    return text + lines * (MARKER_BYTES + len(LF))


def max_packet_for(buf_size: int) -> int:
    """The largest SMP packet a board with MCUmgr ``buf_size`` takes (its length and CRC share it)."""
    return buf_size - LENGTH.size - CRC.size


@dataclass
class SmpDecoder:
    """Turns console bytes into SMP packets, skipping log lines and resynchronising on markers."""

    max_packet: int = MAX_PACKET_BYTES
    stats: DecoderStats = field(default_factory=DecoderStats)
    _line: bytearray = field(default_factory=bytearray)
    # The frame being assembled: decoded bytes so far, and the total its length field asks for.
    _frame: bytearray | None = None
    _frame_total: int = 0
    _errors_seen: int = 0
    # The pending line passed the cap: drop everything up to its LF.
    _skipping: bool = False

    def feed(self, data: bytes) -> list[SmpPacket]:
        """Add received bytes; return every packet completed by them, in order."""
        packets: list[SmpPacket] = []
        start = 0
        while True:
            end = data.find(LF, start)
            if end < 0:
                self._hold(data[start:])
                return packets
            piece = data[start:end]
            start = end + 1
            if self._skipping:
                self._skipping = False
                self._discard(len(piece) + 1)
                continue
            if self._line:
                self._line += piece
                line = bytes(self._line)
                self._line.clear()
            else:
                line = piece
            packet = self._line_received(line)
            if packet is not None:
                packets.append(packet)

    def take_errors(self) -> int:
        """Return and reset how many frames could not be decoded."""
        count, self._errors_seen = self._errors_seen, 0
        return count

    def flush(self) -> int:
        """Drop a half-received frame and line (the line went quiet); return the bytes dropped."""
        dropped = len(self._line) + (len(self._frame) if self._frame is not None else 0)
        self.stats.garbage_bytes += len(self._line)
        self._line.clear()
        self._frame = None
        self._skipping = False
        return dropped

    @property
    def in_frame(self) -> bool:
        """Whether a frame has started and not yet completed."""
        return self._frame is not None

    def _hold(self, rest: bytes) -> None:
        if self._skipping:
            self._discard(len(rest))
            return
        self._line += rest
        if len(self._line) > MAX_PENDING_LINE_BYTES:
            # A frame line is never this long: a log line, or noise without LF. Keep a marker, if any,
            # that starts the tail: a frame may follow noise that never ended with LF.
            cut = self._line.rfind(START_MARKER)
            tail = len(self._line) - cut if cut >= 0 else 0
            if 0 < tail <= MAX_LINE_BYTES:
                self._discard(cut)
            else:
                if self._frame is not None:
                    self._invalid("malformed")
                self._discard(len(self._line))
                self._skipping = True

    def _discard(self, count: int) -> None:
        self.stats.garbage_bytes += count
        del self._line[:count]

    def _invalid(self, counter: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self._errors_seen += 1
        self._frame = None

    def _line_received(self, line: bytes) -> SmpPacket | None:
        """One complete line (without its LF): a frame's first line, a continuation, or a log line."""
        line = line.rstrip(b"\r")  # a console that sends CR LF
        at = line.rfind(START_MARKER)
        if at >= 0:
            # A start marker after log text on the same line: the text is garbage, the frame is new.
            self.stats.garbage_bytes += at
            if self._frame is not None:
                self._invalid("malformed")  # the previous frame never completed
            return self._first_line(line[at + MARKER_BYTES :])
        if line.startswith(CONTINUE_MARKER) and self._frame is not None:
            return self._continuation(line[MARKER_BYTES:])
        # A log line (or a stray continuation): not ours. A frame in progress waits on.
        self.stats.garbage_bytes += len(line) + 1
        return None

    def _first_line(self, text: bytes) -> SmpPacket | None:
        raw = self._b64(text)
        if raw is None:
            return None
        if len(raw) < LENGTH.size:
            self._invalid("malformed")
            return None
        (length,) = LENGTH.unpack_from(raw)
        if length < HEADER_BYTES + CRC.size:
            self._invalid("malformed")
            return None
        if length - CRC.size > self.max_packet:
            self._invalid("oversize")
            return None
        self._frame = bytearray(raw[LENGTH.size :])
        self._frame_total = length
        return self._maybe_complete()

    def _continuation(self, text: bytes) -> SmpPacket | None:
        raw = self._b64(text)
        if raw is None or self._frame is None:
            return None
        self._frame += raw
        return self._maybe_complete()

    def _b64(self, text: bytes) -> bytes | None:
        if len(text) % 4:
            self._invalid("malformed")  # lines are cut at multiples of 4 characters
            return None
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            self._invalid("malformed")
            return None

    def _maybe_complete(self) -> SmpPacket | None:
        frame = self._frame
        if frame is None or len(frame) < self._frame_total:
            return None  # too short: more lines to come
        self._frame = None
        if len(frame) > self._frame_total:
            self._invalid("malformed")
            return None
        body, (crc,) = bytes(frame[: -CRC.size]), CRC.unpack_from(frame, len(frame) - CRC.size)
        if crc16_xmodem(body) != crc:
            self._invalid("crc_errors")
            return None
        try:
            packet = SmpPacket.decode(body)
        except SmpFramingError:
            self._invalid("malformed")
            return None
        self.stats.frames += 1
        return packet


def decode_console(data: bytes) -> SmpPacket:
    """Exactly one packet from console bytes; raise SmpFramingError (CrcError on a bad CRC) otherwise."""
    decoder = SmpDecoder()
    packets = decoder.feed(data)
    if decoder.stats.crc_errors:
        raise CrcError("SMP console frame failed its CRC-16/XMODEM")
    if len(packets) != 1:
        raise SmpFramingError(f"expected one SMP frame, decoded {len(packets)}")
    return packets[0]
