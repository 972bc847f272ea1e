"""Native protocol frames: COBS + CRC-16/CCITT-FALSE, with an I/O-free decoder.

Layout and rationale are in docs/protocol.md. The decoder never raises on line noise: it
returns the frames it could decode and counts what it had to throw away, so a link
resynchronises by itself after boot garbage or a corrupted byte.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from cobs import cobs

from factoryd.errors import CrcError, FrameError
from factoryd.transport.decoding import DecoderStats

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BBHBB")
CRC = struct.Struct(">H")
DELIMITER = b"\x00"
MAX_PAYLOAD = 4096
MIN_FRAME = HEADER.size + CRC.size
MAX_FRAME = HEADER.size + MAX_PAYLOAD + CRC.size
# COBS adds one byte per 254 plus one; the cap leaves slack for that.
MAX_ENCODED_FRAME = 4400


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF); check value of b'123456789' is 0x29B1."""
    return binascii.crc_hqx(data, 0xFFFF)


class FrameKind(IntEnum):
    """What a frame is; unknown values are dropped by the decoder."""

    REQUEST = 0x01
    RESPONSE = 0x02
    EVENT = 0x03
    NACK = 0x04


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    kind: FrameKind
    seq: int
    command: int
    status: int = 0
    payload: bytes = b""
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        """Return the frame as it goes on the wire (COBS + delimiter)."""
        if len(self.payload) > MAX_PAYLOAD:
            raise FrameError(f"payload of {len(self.payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
        body = HEADER.pack(self.version, self.kind, self.seq, self.command, self.status) + self.payload
        return bytes(cobs.encode(body + CRC.pack(crc16(body)))) + DELIMITER


def decode_frame(raw: bytes) -> Frame:
    """Decode one COBS-decoded frame body; raise FrameError naming the defect."""
    if len(raw) < MIN_FRAME:
        raise FrameError(f"frame of {len(raw)} bytes is shorter than the {MIN_FRAME}-byte minimum")
    if len(raw) > MAX_FRAME:
        raise FrameError(f"frame of {len(raw)} bytes exceeds MAX_FRAME={MAX_FRAME}")
    body, (crc,) = raw[:-2], CRC.unpack(raw[-2:])
    if crc16(body) != crc:
        raise CrcError(f"CRC mismatch: got 0x{crc:04X}, computed 0x{crc16(body):04X}")
    version, kind, seq, command, status = HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        raise FrameError(f"unsupported frame version {version}")
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind 0x{kind:02X}") from None
    return Frame(frame_kind, seq, command, status, bytes(body[HEADER.size :]), version)


@dataclass
class FrameDecoder:
    """Turns a byte stream into frames; resynchronises on the 0x00 delimiter.

    "Too short" (no delimiter yet) waits for more bytes; "invalid" (bad COBS, CRC,
    header) discards up to the delimiter. An unfinished frame longer than
    ``max_encoded`` is dropped so a flooding board cannot grow the buffer.
    """

    max_encoded: int = MAX_ENCODED_FRAME
    stats: DecoderStats = field(default_factory=DecoderStats)
    _buffer: bytearray = field(default_factory=bytearray)
    _discarding: bool = False
    # Undecodable frames since the last take_errors(): the board answers each with a NACK.
    _errors_seen: int = 0

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame completed by them, in order."""
        frames: list[Frame] = []
        start = 0
        while True:
            end = data.find(DELIMITER, start)
            if end < 0:
                self._append(data[start:])
                return frames
            self._append(data[start:end])
            chunk, discarding = bytes(self._buffer), self._discarding
            self._buffer.clear()
            self._discarding = False
            start = end + 1
            if discarding or not chunk:
                continue
            frame = self._decode_chunk(chunk)
            if frame is not None:
                frames.append(frame)

    def take_errors(self) -> int:
        """Return and reset how many undecodable frames arrived (a NACK trigger)."""
        count, self._errors_seen = self._errors_seen, 0
        return count

    def flush(self) -> int:
        """Drop a half-received frame (the line went quiet: it will never complete); return its size."""
        dropped = len(self._buffer)
        self.stats.garbage_bytes += dropped
        self._buffer.clear()
        self._discarding = False
        return dropped

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self._buffer)

    def _append(self, data: bytes) -> None:
        if self._discarding:
            self.stats.garbage_bytes += len(data)
            return
        self._buffer += data
        if len(self._buffer) > self.max_encoded:
            self.stats.oversize += 1
            self.stats.garbage_bytes += len(self._buffer)
            self._errors_seen += 1
            self._buffer.clear()
            self._discarding = True

    def _decode_chunk(self, chunk: bytes) -> Frame | None:
        try:
            raw = bytes(cobs.decode(chunk))
        except cobs.DecodeError:
            self.stats.malformed += 1
            self.stats.garbage_bytes += len(chunk)
            self._errors_seen += 1
            return None
        try:
            frame = decode_frame(raw)
        except CrcError:
            self.stats.crc_errors += 1
            self.stats.garbage_bytes += len(chunk)
            self._errors_seen += 1
            return None
        except FrameError:
            self.stats.malformed += 1
            self.stats.garbage_bytes += len(chunk)
            self._errors_seen += 1
            return None
        self.stats.frames += 1
        return frame
