"""A simulated Arduino board running the provisioning sketch (ARDUINO_V1.md), quirks included.

``SimArduinoBoard`` turns command frames into replies on the production codec
(``factoryd.transport.arduino_framing``); ``ArduinoPtyBoard`` serves it behind a real pseudo-terminal with
the same public surface as ``PtyBoard``. What the sketch does and this model keeps:

- no HELLO and no boot frame: the host cannot read the secure-element serial, only the USB
  serial number the board enumerates with (``usb_serial``);
- GetCSR makes a NEW P-256 key in slot 0 every time; on failure it never answers;
- the sketch looks at its buffer only once 10 bytes are in it, NACKs a frame that fails its CRC,
  and has a 132-byte buffer (a longer host frame is garbage to it);
- EndStorage rebuilds nothing visible: it stores slot 10 = signature || packed dates || 5 spare and
  slot 11 = serial || AKI; ReconstructCert rebuilds the DER from the slots and the slot-0 key.
  It cannot check the CA's signature (it has no CA key).

Quirks to inject beyond ``FaultPlan``: ``store_nothing`` (ACKs EndStorage, stores nothing) and
``csr_never_answers``.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
from dataclasses import dataclass

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factoryd.pki.arduino import (
    AKI_BYTES,
    SERIAL_BYTES,
    SIGNATURE_BYTES,
    ArduinoCertFields,
    arduino_pack_dates,
    arduino_reconstruct_certificate,
    arduino_unpack_dates,
    public_key_raw64,
)
from factoryd.protocol.arduino import DEVICE_ID_BYTES, ArduinoCommand
from factoryd.sim.board import NO_FAULTS, ZERO_TIMING, BoardHang, Fault, FaultPlan, SimBoard, Timing
from factoryd.sim.pty import PtyEndpoint, serve_pty
from factoryd.sim.secure_element import SimSecureElement, make_csr
from factoryd.transport.arduino_framing import (
    BOARD_ACT_BYTES,
    BOARD_BUFFER_BYTES,
    HEADER_BYTES,
    START,
    TRAILER_BYTES,
    ArduinoDecoder,
    ArduinoFrame,
    FrameType,
    ResponseCode,
)

log = structlog.get_logger(__name__)

ARDUINO_SIM_MODEL = "arduino-sim-mkrwifi1010"
# Secure-element slots the sketch uses (ARDUINO_V1.md).
KEY_SLOT = 0
COMPRESSED_CERT_SLOT = 10
SERIAL_AKI_SLOT = 11
DEVICE_ID_SLOT = 12
DEVICE_ID_SLOT_BYTES = 72
PACKED_DATES_BYTES = 3
SPARE_BYTES = 5
# A SAMD21's 128-bit chip serial, as USB ID_SERIAL_SHORT shows it: 32 hex digits.
USB_SERIAL_BYTES = 16
_NACK = object()


def arduino_timing() -> Timing:
    """The realistic timing model at the sketch's 57600 baud."""
    realistic = Timing.realistic()
    return Timing(
        baudrate=57600,
        boot_s=realistic.boot_s,
        keygen_s=realistic.keygen_s,
        csr_s=realistic.csr_s,
        sign_s=realistic.sign_s,
        write_s=realistic.write_s,
        lock_s=realistic.lock_s,
        fw_chunk_s=realistic.fw_chunk_s,
        enumerate_s=realistic.enumerate_s,
        jitter=realistic.jitter,
    )


def new_usb_serial() -> str:
    """A random SAMD-style USB serial number (32 upper-case hex digits)."""
    return secrets.token_hex(USB_SERIAL_BYTES).upper()


def pem_csr(der: bytes) -> bytes:
    """PEM armour around DER bytes, even bytes that do not parse (a corrupted CSR stays a PEM)."""
    b64 = base64.b64encode(der).decode("ascii")
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}\n-----END CERTIFICATE REQUEST-----\n".encode()


@dataclass
class _Staging:
    """What the Set* commands put into the sketch's RAM before EndStorage."""

    year: int | None = None
    month: int | None = None
    day: int | None = None
    hour: int | None = None
    years: int | None = None
    serial16: bytes | None = None
    aki20: bytes | None = None
    signature64: bytes | None = None


def _ascii_int(args: bytes) -> int | None:
    if not 1 <= len(args) <= 4 or not args.isdigit():
        return None
    return int(args)


class SimArduinoBoard(SimBoard):
    """The provisioning sketch's logic; slots and keys survive power cycles, RAM does not."""

    def __init__(
        self,
        *,
        se: SimSecureElement | None = None,
        model: str = ARDUINO_SIM_MODEL,
        faults: FaultPlan = NO_FAULTS,
        timing: Timing = ZERO_TIMING,
        usb_serial: str | None = None,
        store_nothing: bool = False,
        csr_never_answers: bool = False,
    ) -> None:
        super().__init__(se=se, model=model, faults=faults, timing=timing)
        # "" models a board that enumerates without a serial number (the station must refuse it).
        self.usb_serial = new_usb_serial() if usb_serial is None else usb_serial
        self.store_nothing = store_nothing
        self.csr_never_answers = csr_never_answers
        # The secure element's data zone: slot number -> contents.
        self.data_slots: dict[int, bytes] = {}
        self.config_locked = False
        # This many next host frames arrive corrupted on the board's side (it NACKs each).
        self.garble_requests = 0
        self.csr_count = 0
        self._device_id: str | None = None
        self._staging = _Staging()

    def power_on(self) -> None:
        """Reset RAM (the ID from GetCSR, staged certificate fields); arm this period's faults."""
        super().power_on()
        self._device_id = None
        self._staging = _Staging()

    def boot(self) -> None:
        """What the sketch does in setup(): lock the config zone (no effect on provisioning)."""
        self.config_locked = True

    def open_pty(self) -> ArduinoPtyBoard:
        """Serve this board behind a fresh pseudo-terminal (the simulated hub calls this)."""
        return ArduinoPtyBoard(self)

    def stored_device_id(self) -> str | None:
        """The device ID in slot 12, or None."""
        raw = self.data_slots.get(DEVICE_ID_SLOT)
        if raw is None or len(raw) != DEVICE_ID_SLOT_BYTES:
            return None
        try:
            return raw.rstrip(b"\x00").decode("ascii")
        except UnicodeDecodeError:
            return None

    def rebuilt_certificate(self) -> bytes | None:
        """The DER the sketch rebuilds now from slots 10-12 and the slot-0 key, or None if it cannot."""
        compressed = self.data_slots.get(COMPRESSED_CERT_SLOT)
        serial_aki = self.data_slots.get(SERIAL_AKI_SLOT)
        device_id = self.stored_device_id()
        if compressed is None or serial_aki is None or device_id is None or not self.se.has_key(KEY_SLOT):
            return None
        if len(compressed) != SIGNATURE_BYTES + PACKED_DATES_BYTES + SPARE_BYTES:
            return None
        if len(serial_aki) != SERIAL_BYTES + AKI_BYTES:
            return None
        packed = compressed[SIGNATURE_BYTES : SIGNATURE_BYTES + PACKED_DATES_BYTES]
        year, month, day, hour, years = arduino_unpack_dates(packed)
        fields = ArduinoCertFields(
            serial16=serial_aki[:SERIAL_BYTES],
            aki20=serial_aki[SERIAL_BYTES:],
            signature64=compressed[:SIGNATURE_BYTES],
            year=year,
            month=month,
            day=day,
            hour=hour,
            years=years,
        )
        slot_key = self.se.public_point(KEY_SLOT)[1:]
        try:
            der = arduino_reconstruct_certificate(fields, device_id, slot_key)
            rebuilt_key = x509.load_der_x509_certificate(der).public_key()
        except ValueError:
            return None
        if (
            not isinstance(rebuilt_key, ec.EllipticCurvePublicKey)
            or public_key_raw64(rebuilt_key) != slot_key
        ):
            return None
        return der

    async def answer(self, frame: ArduinoFrame) -> ArduinoFrame | None:
        """Answer one frame as the sketch does; None for frames it never answers.

        Raises BoardHang for the transport to act on.
        """
        if frame.kind is not FrameType.COMMAND or not frame.payload:
            return None
        self.commands_handled += 1
        if self.fault(Fault.HANG):
            raise BoardHang
        try:
            command = ArduinoCommand(frame.payload[0])
        except ValueError:
            return None
        args = frame.payload[1:]
        if command is ArduinoCommand.GET_CSR:
            return await self._get_csr(args)
        code = await self._run_command(command, args)
        return None if code is None else ArduinoFrame.response(code)

    async def _get_csr(self, args: bytes) -> ArduinoFrame | None:
        if self.csr_never_answers or len(args) != DEVICE_ID_BYTES or not args.isascii():
            return None
        device_id = args.decode("ascii")
        await self.spend(self.timing.keygen_s + self.timing.csr_s)
        self.se.genkey(KEY_SLOT)
        self.csr_count += 1
        self._device_id = device_id
        if self.fault(Fault.WRONG_CN):
            der = self.se.csr(KEY_SLOT, device_id[::-1])
        elif self.fault(Fault.WEAK_KEY):
            # The fault is a weak key on purpose: the station must refuse it.
            weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
            der = make_csr(weak, device_id)
        else:
            der = self.se.csr(KEY_SLOT, device_id)
            if self.fault(Fault.BAD_CSR_SIGNATURE):
                # The DER signature ends the CSR: flipping its last byte keeps it parseable but invalid.
                der = der[:-1] + bytes([der[-1] ^ 0x01])
        return ArduinoFrame.data(pem_csr(der))

    async def _run_command(self, command: ArduinoCommand, args: bytes) -> ResponseCode | None:
        staging = self._staging
        match command:
            case ArduinoCommand.SKETCH_INFO:
                return ResponseCode.ACK
            case ArduinoCommand.BEGIN_STORAGE:
                if self._device_id is None:
                    return ResponseCode.ERROR
                await self.spend(self.timing.write_s)
                self.data_slots[DEVICE_ID_SLOT] = self._device_id.encode("ascii").ljust(
                    DEVICE_ID_SLOT_BYTES, b"\x00"
                )
                self._staging = _Staging()
                return ResponseCode.ACK
            case (
                ArduinoCommand.SET_YEAR
                | ArduinoCommand.SET_MONTH
                | ArduinoCommand.SET_DAY
                | ArduinoCommand.SET_HOUR
                | ArduinoCommand.SET_VALIDITY
            ):
                value = _ascii_int(args)
                if value is None:
                    return ResponseCode.ERROR
                name = {
                    ArduinoCommand.SET_YEAR: "year",
                    ArduinoCommand.SET_MONTH: "month",
                    ArduinoCommand.SET_DAY: "day",
                    ArduinoCommand.SET_HOUR: "hour",
                    ArduinoCommand.SET_VALIDITY: "years",
                }[command]
                setattr(staging, name, value)
                return ResponseCode.ACK
            case ArduinoCommand.SET_CERT_SERIAL:
                return self._stage_bytes("serial16", args, SERIAL_BYTES)
            case ArduinoCommand.SET_AUTH_KEY:
                return self._stage_bytes("aki20", args, AKI_BYTES)
            case ArduinoCommand.SET_SIGNATURE:
                return self._stage_bytes("signature64", args, SIGNATURE_BYTES)
            case ArduinoCommand.END_STORAGE:
                return await self._end_storage()
            case ArduinoCommand.RECONSTRUCT_CERT:
                await self.spend(self.timing.write_s)
                return ResponseCode.ACK if self.rebuilt_certificate() is not None else ResponseCode.ERROR
            case _:
                # SET_LOCKED, GET_LOCKED, WRITE_CRYPTO, SET_DEVICE_ID: defined, never answered.
                return None

    def _stage_bytes(self, name: str, args: bytes, size: int) -> ResponseCode:
        if len(args) != size:
            return ResponseCode.ERROR
        setattr(self._staging, name, bytes(args))
        return ResponseCode.ACK

    async def _end_storage(self) -> ResponseCode:
        s = self._staging
        if (
            s.year is None
            or s.month is None
            or s.day is None
            or s.hour is None
            or s.years is None
            or s.serial16 is None
            or s.aki20 is None
            or s.signature64 is None
            or DEVICE_ID_SLOT not in self.data_slots
        ):
            return ResponseCode.ERROR
        try:
            packed = arduino_pack_dates(s.year, s.month, s.day, s.hour, s.years)
        except ValueError:
            return ResponseCode.ERROR
        await self.spend(2 * self.timing.write_s)
        if self.store_nothing:
            # The quirk: the write failed silently, yet the sketch says ACK.
            return ResponseCode.ACK
        self.data_slots[COMPRESSED_CERT_SLOT] = s.signature64 + packed + bytes(SPARE_BYTES)
        self.data_slots[SERIAL_AKI_SLOT] = s.serial16 + s.aki20
        return ResponseCode.ACK


class ArduinoPtyBoard(PtyEndpoint):
    """Serves one SimArduinoBoard on a fresh pseudo-terminal until closed (one power-on period)."""

    board: SimArduinoBoard

    def __init__(self, board: SimArduinoBoard) -> None:
        super().__init__(board)
        self._decoder = ArduinoDecoder(max_frame=BOARD_BUFFER_BYTES, act_at=BOARD_ACT_BYTES)

    async def _handle(self, item: object) -> None:
        if item is _NACK:
            await self._send(ArduinoFrame.response(ResponseCode.NACK).encode())
        elif isinstance(item, ArduinoFrame):
            await self._answer(item)

    async def _boot(self) -> None:
        board = self.board
        board.power_on()
        await board.spend(board.jittered(board.timing.boot_s))
        if board.fault(Fault.BOOT_GARBAGE):
            # Bootloader noise without a start marker (false markers are the decoder tests' job).
            noise = bytes(board.rng.randrange(256) for _ in range(40)).replace(START[:1], b"\x54")
            await self._send(b"\r\nSAMD boot ... " + noise)
        board.boot()

    async def _answer(self, frame: ArduinoFrame) -> None:
        board = self.board
        # The request took its time on the wire from the host too.
        await board.spend(board.wire_s(len(frame.encode())))
        try:
            reply = await board.answer(frame)
        except BoardHang:
            self.hung = True
            log.debug("sim arduino board hangs", usb_serial=board.usb_serial)
            return
        if reply is None or board.fault(Fault.DROP_REPLY):
            return
        data = reply.encode()
        if board.fault(Fault.CORRUPT_BYTE):
            # A bit error inside payload or CRC: the frame's shape survives, its CRC must catch it.
            i = board.rng.randrange(HEADER_BYTES, len(data) - TRAILER_BYTES + 2)
            data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]
        await self._send(data)

    def _received(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            if self.board.garble_requests > 0:
                self.board.garble_requests -= 1
                self._inbox.put_nowait(_NACK)
                continue
            self._inbox.put_nowait(frame)
        for _ in range(self._decoder.take_errors()):
            self._inbox.put_nowait(_NACK)


def serve_arduino_pty(board: SimArduinoBoard) -> contextlib.AbstractAsyncContextManager[PtyEndpoint]:
    """Run a board behind a pty for the duration of the block (see factoryd.sim.pty.serve_pty)."""
    return serve_pty(board)
