"""The arduino-v1 client: Arduino's provisioning-sketch protocol (ARDUINO_V1.md), checked at every step.

Frames are ``factoryd.transport.arduino_framing``'s; requests and replies go through the shared
``RequestEngine`` in its exclusive mode, since the sketch has no sequence numbers: one request at
a time, and after a timeout the line is listened to for a while before the next request, so a late
reply is not taken for the next request's. GET_CSR is not resent on a timeout (a late first reply
would carry a key the second call replaced). Arduino's own host tool never reads the storage
replies; this client raises a typed error for every reply that is not the expected ACK.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Self

from factoryd.errors import BoardStatusError, ProtocolViolationError
from factoryd.protocol.engine import EXCLUSIVE_KEY, EngineClient, RequestEngine, Route
from factoryd.transport.arduino_framing import (
    ARDUINO_BAUDRATE,
    BOARD_BUFFER_BYTES,
    MIN_FRAME_BYTES,
    ArduinoDecoder,
    ArduinoFrame,
    FrameType,
    ResponseCode,
)
from factoryd.transport.serial_link import SerialLink

# The sketch takes the device ID as 36 ASCII bytes: a UUID in text form, no NUL.
DEVICE_ID_BYTES = 36
CERT_SERIAL_BYTES = 16
AUTH_KEY_BYTES = 20
SIGNATURE_BYTES = 64
PEM_CSR_BEGIN = b"-----BEGIN CERTIFICATE REQUEST-----"
PEM_CSR_END = b"-----END CERTIFICATE REQUEST-----"


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


class _ArduinoReplies:
    """How the sketch's frames answer: whatever arrives answers the one pending request."""

    def route(self, frame: ArduinoFrame) -> Route:
        """A NACK response, else the reply."""
        return Route.NACK if frame.response_code is ResponseCode.NACK else Route.REPLY

    def reply_key(self, frame: ArduinoFrame) -> int:
        """There is one request at a time."""
        return EXCLUSIVE_KEY

    def mismatch(self, command: ArduinoCommand, frame: ArduinoFrame) -> str | None:
        """Frames name no command: the client checks the reply's kind."""
        return None

    def nack_exhausted(self, attempts: int) -> str:
        """The sketch NACKs a frame that failed its CRC: it did not run the command."""
        return f"NACKed {attempts} times (the board cannot decode our frames)"

    def resend_on_timeout(self, command: ArduinoCommand) -> bool:
        """GET_CSR is not: a late first reply would carry a key the second call replaced."""
        return command is not ArduinoCommand.GET_CSR

    def event(self, frame: ArduinoFrame) -> None:
        """The sketch sends no events."""


_REPLIES = _ArduinoReplies()


class ArduinoClient(EngineClient[ArduinoFrame, ArduinoCommand]):
    """Typed access to one board running Arduino's provisioning sketch; one request at a time."""

    def __init__(
        self,
        link: SerialLink[ArduinoDecoder],
        *,
        timeouts: ArduinoTimeouts | None = None,
        resends: int = 3,
    ) -> None:
        self.link = link
        self.timeouts = timeouts or ArduinoTimeouts()
        self.resends = resends
        super().__init__(
            RequestEngine(
                link, _REPLIES, resends=resends, exclusive=True, late_reply_s=self.timeouts.late_reply_s
            )
        )

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        baudrate: int = ARDUINO_BAUDRATE,
        timeouts: ArduinoTimeouts | None = None,
        resends: int = 3,
    ) -> Self:
        """Open the tty at path and return a client on it."""
        link = await SerialLink.open(path, ArduinoDecoder(), baudrate=baudrate)
        return cls(link, timeouts=timeouts, resends=resends)

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

    # Requests ------------------------------------------------------------------------------

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
        reply_bytes = CSR_REPLY_ALLOWANCE_BYTES if command is ArduinoCommand.GET_CSR else MIN_FRAME_BYTES
        timeout_s = self.timeouts.for_command(command) + self.link.wire_time_s(len(data) + reply_bytes)
        return await self._engine.call(EXCLUSIVE_KEY, command, data, timeout_s)
