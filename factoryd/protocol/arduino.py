"""The arduino-v1 profile: Arduino's provisioning-sketch protocol (ARDUINO_V1.md), checked at every step.

Three layers in one module, each talking only to the one below:

- codec (no I/O): ``ArduinoFrame``, ``encode``, ``ArduinoDecoder.feed(bytes) -> list[ArduinoFrame]``;
- the tty is a ``factoryd.transport.serial_link.SerialLink`` with an ``ArduinoDecoder``;
- ``ArduinoClient``: one typed request at a time, every reply read and checked.

The sketch has no sequence numbers, so the client serialises requests with a lock and, after a
request timed out, listens to the line for a while before the next one: a late reply must not be
taken for the next request's. Arduino's own host tool never reads the storage replies; this one
raises a typed error for every reply that is not the expected ACK.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from types import TracebackType
from typing import Self

import structlog

from factoryd.errors import (
    BoardFloodError,
    BoardStatusError,
    BoardTimeoutError,
    LinkClosedError,
    ProtocolViolationError,
)
from factoryd.protocol.client import MAX_FRAME_ERRORS
from factoryd.transport.serial_link import SerialLink

log = structlog.get_logger(__name__)

# --- Codec -------------------------------------------------------------------------------------

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
# The sketch takes the device ID as 36 ASCII bytes: a UUID in text form, no NUL.
DEVICE_ID_BYTES = 36
CERT_SERIAL_BYTES = 16
AUTH_KEY_BYTES = 20
SIGNATURE_BYTES = 64
PEM_CSR_BEGIN = b"-----BEGIN CERTIFICATE REQUEST-----"
PEM_CSR_END = b"-----END CERTIFICATE REQUEST-----"

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


class ArduinoCommand(IntEnum):
    """Command ids of the provisioning sketch (ARDUINO_V1.md)."""

    SKETCH_INFO = 1
    GET_CSR = 2
    SET_LOCKED = 3  # defined, never answered: not sent
    GET_LOCKED = 4  # defined, never answered: not sent
    WRITE_CRYPTO = 5  # defined, never answered: not sent
    BEGIN_STORAGE = 6
    SET_DEVICE_ID = 7  # defined, never answered: not sent
    SET_YEAR = 8
    SET_MONTH = 9
    SET_DAY = 10
    SET_HOUR = 11
    SET_VALIDITY = 12
    SET_CERT_SERIAL = 13
    SET_AUTH_KEY = 14
    SET_SIGNATURE = 15
    END_STORAGE = 16
    RECONSTRUCT_CERT = 17


# Commands the sketch defines but never answers: sending one would only ever time out.
UNANSWERED_COMMANDS = frozenset(
    {
        ArduinoCommand.SET_LOCKED,
        ArduinoCommand.GET_LOCKED,
        ArduinoCommand.WRITE_CRYPTO,
        ArduinoCommand.SET_DEVICE_ID,
    }
)


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
    def command(cls, command: ArduinoCommand, args: bytes = b"") -> ArduinoFrame:
        """A command frame: ``[command id][arguments]``."""
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
    stats: ArduinoDecoderStats = field(default_factory=ArduinoDecoderStats)
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


# --- Link --------------------------------------------------------------------------------------


# --- Client ------------------------------------------------------------------------------------

# Bytes of a PEM CSR data frame, for the wire-time allowance of GET_CSR (a P-256 CSR is ~470).
CSR_REPLY_ALLOWANCE_BYTES = 700
# These touch the secure element over I2C: an ERROR there may pass when the step is done again.
TRANSIENT_ERROR_COMMANDS = frozenset(
    {ArduinoCommand.GET_CSR, ArduinoCommand.BEGIN_STORAGE, ArduinoCommand.END_STORAGE}
)


@dataclass(frozen=True)
class ArduinoTimeouts:
    """Per-command reply timeouts in seconds (wire time for request and reply is added on top)."""

    # arduino-cloud-cli reads the CSR with a 2.5 s timeout: keygen + CSR signing in the ECC508/608.
    get_csr_s: float = 2.5
    # BeginStorage writes the ID slot (one data-zone write, ~30 ms) plus USB CDC latency.
    begin_storage_s: float = 1.0
    # SetYear..SetSignature only fill RAM in the sketch.
    set_field_s: float = 1.0
    # EndStorage writes two slots; Arduino's tool waits 1 s before sending it and 2 s after.
    end_storage_s: float = 2.0
    # ReconstructCert reads three slots and the public key, then rebuilds the DER.
    reconstruct_s: float = 2.0
    sketch_info_s: float = 1.0
    # After a timeout, how long the line is listened to (and what arrives dropped) before the
    # next request, so a late reply is not taken for the next request's (there are no seq numbers).
    late_reply_s: float = 0.5

    def for_command(self, command: ArduinoCommand) -> float:
        """Timeout for one command."""
        if command is ArduinoCommand.GET_CSR:
            return self.get_csr_s
        if command is ArduinoCommand.BEGIN_STORAGE:
            return self.begin_storage_s
        if command is ArduinoCommand.END_STORAGE:
            return self.end_storage_s
        if command is ArduinoCommand.RECONSTRUCT_CERT:
            return self.reconstruct_s
        if command is ArduinoCommand.SKETCH_INFO:
            return self.sketch_info_s
        return self.set_field_s


@dataclass
class ArduinoClientStats:
    """Counters of one client."""

    requests: int = 0
    replies: int = 0
    resends: int = 0
    nacks: int = 0
    frame_errors: int = 0
    unmatched: int = 0
    timeouts: int = 0
    late_replies_dropped: int = 0


@dataclass
class _Waiter:
    command: ArduinoCommand
    data: bytes
    future: asyncio.Future[ArduinoFrame]
    resends_left: int
    timeout_s: float
    # GET_CSR is not resent on a timeout: a late first reply would carry a key the second call replaced.
    resend_on_timeout: bool
    timer: asyncio.TimerHandle | None = None
    # Garbled frames that arrived while this request waited (the replies, most likely).
    garbled: int = 0


def _ascii_number(value: int, lowest: int, highest: int, width: int, what: str) -> bytes:
    if not lowest <= value <= highest:
        raise ValueError(f"{what} must be within {lowest}..{highest}, got {value}")
    return f"{value:0{width}d}".encode("ascii")


def _exact(data: bytes, size: int, what: str) -> bytes:
    if len(data) != size:
        raise ValueError(f"{what} must be exactly {size} bytes, got {len(data)}")
    return bytes(data)


def device_id_bytes(device_id: str) -> bytes:
    """The device ID as the sketch takes it; ValueError unless it is 36 printable ASCII characters."""
    if not device_id.isascii() or not device_id.isprintable() or len(device_id) != DEVICE_ID_BYTES:
        raise ValueError(
            f"arduino-v1 device IDs are exactly {DEVICE_ID_BYTES} printable ASCII characters "
            f"(a UUID), got {device_id!r}"
        )
    return device_id.encode("ascii")


class ArduinoClient:
    """Typed access to one board running Arduino's provisioning sketch; one request at a time."""

    def __init__(
        self,
        link: SerialLink[ArduinoDecoder],
        *,
        timeouts: ArduinoTimeouts | None = None,
        resends: int = 3,
        on_resend: Callable[[ArduinoCommand], None] | None = None,
    ) -> None:
        self.link = link
        self.timeouts = timeouts or ArduinoTimeouts()
        self.resends = resends
        self.stats = ArduinoClientStats()
        self._on_resend = on_resend
        self._lock = asyncio.Lock()
        self._waiter: _Waiter | None = None
        self._lost: BaseException | None = None
        self._late_reply_possible = False
        link.attach(self)

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        baudrate: int = ARDUINO_BAUDRATE,
        timeouts: ArduinoTimeouts | None = None,
        resends: int = 3,
        on_resend: Callable[[ArduinoCommand], None] | None = None,
    ) -> Self:
        """Open the tty at path and return a client on it."""
        link = await SerialLink.open(path, ArduinoDecoder(), baudrate=baudrate)
        return cls(link, timeouts=timeouts, resends=resends, on_resend=on_resend)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the link; a pending request fails with LinkClosedError."""
        await self.link.close()
        self._fail(LinkClosedError(f"link {self.link.path} closed by the host"))

    @property
    def pending(self) -> int:
        """Requests waiting for a reply (0 when idle; tests check nothing is left behind)."""
        return 0 if self._waiter is None else 1

    # Commands -----------------------------------------------------------------------------

    async def sketch_info(self) -> None:
        """Ask the sketch to answer (it ACKs); a cheap liveness probe."""
        await self._ack(ArduinoCommand.SKETCH_INFO)

    async def get_csr(self, device_id: str) -> bytes:
        """Have the board make a NEW key in slot 0 and return its PEM CSR with CN=device_id."""
        reply = await self._request(ArduinoCommand.GET_CSR, device_id_bytes(device_id))
        if reply.kind is not FrameType.DATA:
            self._unexpected(ArduinoCommand.GET_CSR, reply, "a data frame with the PEM CSR")
        pem = reply.payload.rstrip(b"\x00")
        body = pem.strip()
        if not pem.isascii() or not body.startswith(PEM_CSR_BEGIN) or not body.endswith(PEM_CSR_END):
            raise ProtocolViolationError(
                f"GET_CSR on {self.link.path}: the data frame is not a PEM certificate request "
                f"({len(reply.payload)} bytes, starting {reply.payload[:24]!r})"
            )
        return pem

    async def begin_storage(self) -> None:
        """Start storing a certificate (the board writes the device ID to slot 12)."""
        await self._ack(ArduinoCommand.BEGIN_STORAGE)

    async def set_year(self, year: int) -> None:
        """Issue year of the certificate (notBefore), 2000..2031."""
        await self._ack(ArduinoCommand.SET_YEAR, _ascii_number(year, 2000, 2031, 4, "year"))

    async def set_month(self, month: int) -> None:
        """Issue month, 1..12."""
        await self._ack(ArduinoCommand.SET_MONTH, _ascii_number(month, 1, 12, 2, "month"))

    async def set_day(self, day: int) -> None:
        """Issue day of month, 1..31."""
        await self._ack(ArduinoCommand.SET_DAY, _ascii_number(day, 1, 31, 2, "day"))

    async def set_hour(self, hour: int) -> None:
        """Issue hour, 0..23."""
        await self._ack(ArduinoCommand.SET_HOUR, _ascii_number(hour, 0, 23, 2, "hour"))

    async def set_validity(self, years: int) -> None:
        """Validity in whole years, 1..31."""
        await self._ack(ArduinoCommand.SET_VALIDITY, _ascii_number(years, 1, 31, 2, "validity years"))

    async def set_cert_serial(self, serial16: bytes) -> None:
        """The certificate serial number, exactly 16 bytes."""
        await self._ack(ArduinoCommand.SET_CERT_SERIAL, _exact(serial16, CERT_SERIAL_BYTES, "serial"))

    async def set_auth_key(self, aki20: bytes) -> None:
        """The authority key identifier, exactly 20 bytes."""
        await self._ack(ArduinoCommand.SET_AUTH_KEY, _exact(aki20, AUTH_KEY_BYTES, "authority key id"))

    async def set_signature(self, signature64: bytes) -> None:
        """The CA's signature as raw r||s, exactly 64 bytes."""
        await self._ack(ArduinoCommand.SET_SIGNATURE, _exact(signature64, SIGNATURE_BYTES, "signature"))

    async def end_storage(self) -> None:
        """Have the board rebuild the certificate from its template and store it (slots 10 and 11)."""
        await self._ack(ArduinoCommand.END_STORAGE)

    async def reconstruct_cert(self) -> None:
        """Have the board read the stored certificate back and rebuild it."""
        await self._ack(ArduinoCommand.RECONSTRUCT_CERT)

    # Request machinery -------------------------------------------------------------------

    async def _ack(self, command: ArduinoCommand, args: bytes = b"") -> None:
        reply = await self._request(command, args)
        code = reply.response_code
        if code is ResponseCode.ACK:
            return
        if code is ResponseCode.ERROR:
            raise BoardStatusError(
                f"{command.name} refused by the board on {self.link.path}: ERROR",
                int(code),
                transient=command in TRANSIENT_ERROR_COMMANDS,
            )
        self._unexpected(command, reply, "ACK")

    def _unexpected(self, command: ArduinoCommand, reply: ArduinoFrame, wanted: str) -> None:
        code = reply.response_code
        got = f"response {code.name}" if code is not None else f"{reply.kind.name} frame"
        raise ProtocolViolationError(
            f"{command.name} on {self.link.path}: expected {wanted}, got {got} "
            f"({len(reply.payload)}-byte payload)"
        )

    async def _request(self, command: ArduinoCommand, args: bytes) -> ArduinoFrame:
        if command in UNANSWERED_COMMANDS:
            raise ValueError(f"{command.name} is never answered by the sketch; not sent")
        data = ArduinoFrame.command(command, args).encode()
        if len(data) > BOARD_BUFFER_BYTES:
            raise ValueError(f"{command.name} frame of {len(data)} bytes overflows the board's buffer")
        async with self._lock:
            self._check_open()
            if self._late_reply_possible:
                await self._drop_late_replies()
                self._check_open()
            reply_bytes = CSR_REPLY_ALLOWANCE_BYTES if command is ArduinoCommand.GET_CSR else MIN_FRAME_BYTES
            timeout_s = self.timeouts.for_command(command) + self.link.wire_time_s(len(data) + reply_bytes)
            waiter = _Waiter(
                command,
                data,
                asyncio.get_running_loop().create_future(),
                self.resends,
                timeout_s,
                resend_on_timeout=command is not ArduinoCommand.GET_CSR,
            )
            self._waiter = waiter
            self.stats.requests += 1
            try:
                self.link.send(data)
                self._arm(waiter)
                return await waiter.future
            finally:
                self._waiter = None
                if waiter.timer is not None:
                    waiter.timer.cancel()
                if not waiter.future.done():
                    # Cancelled from outside: its reply may still come and must not answer the next one.
                    self._late_reply_possible = True
                    waiter.future.cancel()

    def _check_open(self) -> None:
        if isinstance(self._lost, BoardFloodError):
            raise self._lost
        if self._lost is not None:
            raise LinkClosedError(f"link {self.link.path} is closed") from self._lost

    async def _drop_late_replies(self) -> None:
        before = self.stats.unmatched
        await asyncio.sleep(self.timeouts.late_reply_s)
        self.stats.late_replies_dropped += self.stats.unmatched - before
        self.link.decoder.flush()
        self._late_reply_possible = False

    def _arm(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiter.timer = asyncio.get_running_loop().call_later(waiter.timeout_s, self._timed_out, waiter)

    def _timed_out(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        # A reply may still be on its way; and a half-received frame will never complete.
        self._late_reply_possible = True
        self.link.decoder.flush()
        if waiter.resend_on_timeout and waiter.resends_left > 0:
            self._resend(waiter)
            return
        tries = 1 + self.resends - waiter.resends_left
        if waiter.garbled:
            waiter.future.set_exception(
                ProtocolViolationError(
                    f"{waiter.command.name} to {self.link.path}: {waiter.garbled} garbled replies and "
                    f"no valid one after {tries} attempts"
                )
            )
            return
        self.stats.timeouts += 1
        waiter.future.set_exception(
            BoardTimeoutError(
                f"{waiter.command.name} to {self.link.path}: no reply after {tries} "
                f"attempt{'s' if tries > 1 else ''} ({waiter.timeout_s:.2f} s each)"
            )
        )

    def _resend(self, waiter: _Waiter) -> None:
        waiter.resends_left -= 1
        self.stats.resends += 1
        if self._on_resend is not None:
            self._on_resend(waiter.command)
        log.debug("resend", command=waiter.command.name, path=self.link.path)
        try:
            self.link.send(waiter.data)
        except LinkClosedError as exc:
            waiter.future.set_exception(exc)
            return
        self._arm(waiter)

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.future.done():
            waiter.future.set_exception(exc)

    # LinkListener ----------------------------------------------------------------------

    def frame_received(self, frame: ArduinoFrame) -> None:
        """Route a frame from the link to the pending request."""
        waiter = self._waiter
        if waiter is None or waiter.future.done():
            self.stats.unmatched += 1
            return
        if frame.response_code is ResponseCode.NACK:
            # The sketch NACKs a frame that failed its CRC: it did not run the command.
            self.stats.nacks += 1
            if waiter.resends_left > 0:
                self._resend(waiter)
            else:
                waiter.future.set_exception(
                    ProtocolViolationError(
                        f"{waiter.command.name} to {self.link.path}: NACKed {self.resends + 1} times "
                        "(the board cannot decode our frames)"
                    )
                )
            return
        self.stats.replies += 1
        waiter.future.set_result(frame)

    def frame_errors(self, count: int) -> None:
        """A garbled frame arrived: most likely the reply, so ask again at once."""
        self.stats.frame_errors += count
        if self.stats.frame_errors > MAX_FRAME_ERRORS:
            if self._lost is None:
                error = BoardFloodError(
                    f"board on {self.link.path} sent {self.stats.frame_errors} invalid frames; "
                    "refusing to talk to it"
                )
                self._lost = error
                self._fail(error)
            return
        waiter = self._waiter
        if waiter is None or waiter.future.done():
            return
        waiter.garbled += count
        if waiter.resends_left > 0:
            self._resend(waiter)

    def link_lost(self, exc: BaseException | None) -> None:
        """Fail the pending request: the tty is gone."""
        if self._lost is None:
            self._lost = exc or LinkClosedError("link closed")
        error = LinkClosedError(f"serial device {self.link.path} vanished")
        if exc is not None:
            error.__cause__ = exc
        self._fail(error)
