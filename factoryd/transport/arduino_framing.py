"""The arduino-v1 framer: the frames of Arduino's provisioning sketch (ARDUINO_V1.md), no I/O.

``ArduinoFrame`` encodes; ``ArduinoDecoder.feed(bytes) -> list[ArduinoFrame]`` resynchronises on
the 0x55 0xAA start marker, tells "too short" (wait) from "invalid" (skip) and caps its buffer.
The command ids and what the replies mean are the client's (``factoryd.protocol.arduino``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from factoryd.transport.decoding import DecoderStats

START = b"\x55\xaa"
END = b"\xaa\x55"
# 0x55 0xAA | type | length (2, BE) -- then payload, CRC (2, BE), 0xAA 0x55.
HEADER_BYTES = 5
CRC_BYTES = 2
TRAILER_BYTES = CRC_BYTES + len(END)
# An empty payload: header + CRC + end marker.
MIN_FRAME_BYTES = HEADER_BYTES + TRAILER_BYTES
# The sketch's receive buffer (ARDUINO_V1.md); a longer host frame is garbage to it.
BOARD_BUFFER_BYTES = 132
# The sketch looks at its buffer only once this many bytes are in it (ARDUINO_V1.md).
BOARD_ACT_BYTES = 10
# Board-to-host frames can be longer than the board's buffer (the PEM CSR is ~500 bytes); the
# host's cap bounds what a garbled length field or a hostile board can make it buffer.
HOST_MAX_FRAME_BYTES = 4096
# The sketch's serial speed (arduino-cloud-cli opens the port at 57600 baud).
ARDUINO_BAUDRATE = 57600

_CRC_X25_POLY_REFLECTED = 0x8408


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC_X25_POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_x25(data: bytes) -> int:
    """CRC-16/X-25 (reflected 0x1021, init and xorout 0xFFFF); b'123456789' gives 0x906E."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFF


class FrameType(IntEnum):
    """What a frame carries; frames of other types are dropped by the decoder."""

    COMMAND = 1
    DATA = 2
    RESPONSE = 3


class ResponseCode(IntEnum):
    """The one-byte payload of a response frame; unknown values map to UNKNOWN."""

    UNKNOWN = 0
    NONE = 1
    ACK = 2
    NACK = 3
    ERROR = 4

    @classmethod
    def _missing_(cls, value: object) -> ResponseCode:
        return cls.UNKNOWN


_FRAME_TYPES = frozenset(int(kind) for kind in FrameType)


@dataclass(frozen=True, slots=True)
class ArduinoFrame:
    """One v1 frame: its type and payload."""

    kind: FrameType
    payload: bytes = b""

    @classmethod
    def command(cls, command: int, args: bytes = b"") -> ArduinoFrame:
        """A command frame: ``[command id][arguments]`` (ids: ``protocol.arduino.ArduinoCommand``)."""
        return cls(FrameType.COMMAND, bytes([command]) + args)

    @classmethod
    def response(cls, code: ResponseCode) -> ArduinoFrame:
        """A response frame with one status byte."""
        return cls(FrameType.RESPONSE, bytes([code]))

    @classmethod
    def data(cls, payload: bytes) -> ArduinoFrame:
        """A data frame (the CSR)."""
        return cls(FrameType.DATA, payload)

    @property
    def response_code(self) -> ResponseCode | None:
        """The status of a well-formed response frame, else None."""
        if self.kind is not FrameType.RESPONSE or len(self.payload) != 1:
            return None
        return ResponseCode(self.payload[0])

    def encode(self) -> bytes:
        """The frame as it goes on the wire."""
        length = len(self.payload) + CRC_BYTES
        if length > 0xFFFF:
            raise ValueError(f"payload of {len(self.payload)} bytes does not fit the 16-bit length field")
        return (
            START
            + bytes([self.kind])
            + length.to_bytes(2, "big")
            + self.payload
            + crc16_x25(self.payload).to_bytes(2, "big")
            + END
        )


@dataclass
class ArduinoDecoderStats:
    """Counters of what the decoder returned and what it had to discard."""

    frames: int = 0
    crc_errors: int = 0
    malformed: int = 0
    oversize: int = 0
    garbage_bytes: int = 0


@dataclass
class ArduinoDecoder:
    """Turns a byte stream into frames, resynchronising on the 0x55 0xAA start marker.

    "Too short" (the length field asks for more bytes) waits; "invalid" (bad length, end marker,
    CRC, type) discards and searches for the next start marker. The buffer never holds more than
    ``max_frame`` bytes: a length field asking for more is invalid at once. ``act_at`` models the
    sketch, which looks at its buffer only once that many bytes are in it.
    """

    max_frame: int = HOST_MAX_FRAME_BYTES
    act_at: int = MIN_FRAME_BYTES
    stats: DecoderStats = field(default_factory=DecoderStats)
    _buffer: bytearray = field(default_factory=bytearray)
    _errors_seen: int = 0

    def feed(self, data: bytes) -> list[ArduinoFrame]:
        """Add received bytes; return every frame completed by them, in order."""
        self._buffer += data
        frames: list[ArduinoFrame] = []
        buf = self._buffer
        while len(buf) >= self.act_at:
            start = buf.find(START)
            if start < 0:
                # Keep a trailing 0x55: it may be the first half of the next start marker.
                keep = 1 if buf[-1:] == START[:1] else 0
                self._discard(len(buf) - keep)
                break
            if start:
                self._discard(start)
                continue
            if len(buf) < HEADER_BYTES:
                break
            length = int.from_bytes(buf[3:5], "big")
            total = HEADER_BYTES + length + len(END)
            if length < CRC_BYTES or total > self.max_frame:
                if length < CRC_BYTES:
                    self.stats.malformed += 1
                else:
                    self.stats.oversize += 1
                self._invalid(len(START))
                continue
            if len(buf) < total:
                break
            if buf[total - len(END) : total] != END:
                self.stats.malformed += 1
                self._invalid(len(START))
                continue
            payload = bytes(buf[HEADER_BYTES : total - TRAILER_BYTES])
            crc = int.from_bytes(buf[total - TRAILER_BYTES : total - len(END)], "big")
            if crc16_x25(payload) != crc:
                self.stats.crc_errors += 1
                self._invalid(total)
                continue
            kind = buf[2]
            if kind not in _FRAME_TYPES:
                self.stats.malformed += 1
                self._invalid(total)
                continue
            del buf[:total]
            self.stats.frames += 1
            frames.append(ArduinoFrame(FrameType(kind), payload))
        return frames

    def take_errors(self) -> int:
        """Return and reset how many invalid frames arrived (the board NACKs each)."""
        count, self._errors_seen = self._errors_seen, 0
        return count

    def flush(self) -> int:
        """Drop a half-received frame (the line went quiet: it will never complete); return its size."""
        dropped = len(self._buffer)
        self._discard(dropped)
        return dropped

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self._buffer)

    def _discard(self, count: int) -> None:
        self.stats.garbage_bytes += count
        del self._buffer[:count]

    def _invalid(self, skip: int) -> None:
        self._errors_seen += 1
        self._discard(skip)
