"""BoardClient: typed requests to one board over a SerialLink.

Every request registers its waiter (keyed by seq) before the frame is sent and removes it in
``finally``. A NACK or a garbled reply triggers an immediate resend with the same seq (the board
answers resends from its reply cache, so nothing runs twice); a silent board is resent to when a
loop timer for its command's timeout fires, so a request costs no extra task. When the link
drops or the board reboots every waiter fails with a typed error instead of being cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import structlog

from factoryd.errors import (
    BoardBusyError,
    BoardFloodError,
    BoardLockedError,
    BoardResetError,
    BoardStatusError,
    BoardTimeoutError,
    FirmwareRejectedError,
    LinkClosedError,
    ProtocolViolationError,
    ReadbackMismatchError,
)
from factoryd.protocol.messages import (
    IDENTITY_SLOT,
    MAX_FW_CHUNK,
    BoardInfo,
    Command,
    CsrReply,
    DataReply,
    DigestReply,
    FwBegin,
    FwChunk,
    FwEnd,
    GenKey,
    GetCsr,
    Hello,
    Lock,
    ObjectId,
    PublicKeyReply,
    Read,
    Reboot,
    Request,
    Sign,
    SignatureReply,
    Status,
    Write,
    expect_empty,
)
from factoryd.transport.framing import Frame, FrameDecoder, FrameKind
from factoryd.transport.serial_link import SerialLink

log = structlog.get_logger(__name__)

# Status codes after which the same request may succeed when tried again later.
TRANSIENT_STATUSES = frozenset({Status.BUSY, Status.STORAGE, Status.INTERNAL})
# Undecodable frames one link may deliver before the board is declared broken: line noise
# costs a handful, a board that sprays garbage costs hundreds.
MAX_FRAME_ERRORS = 64
# Requests that change nothing on the board: after a BOOT they are simply asked again; any other
# pending request fails with BoardResetError, since the reset may have undone it.
RESEND_AFTER_BOOT = frozenset({Command.HELLO, Command.READ})


@dataclass(frozen=True)
class Timeouts:
    """Per-command reply timeouts in seconds (wire time for the frame is added on top)."""

    # A board answers HELLO from RAM; 1 s covers USB CDC latency on a loaded hub.
    hello_s: float = 1.0
    # ATECC608 key generation takes ~100 ms; real boards add firmware overhead, so 5 s.
    keygen_s: float = 5.0
    csr_s: float = 5.0
    # EEPROM/secure-element data zone writes of a few KiB take up to ~1 s.
    write_s: float = 3.0
    read_s: float = 2.0
    sign_s: float = 3.0
    lock_s: float = 3.0
    reboot_s: float = 2.0
    fw_chunk_s: float = 3.0
    # Verifying the image signature in the bootloader.
    fw_end_s: float = 10.0

    def for_command(self, command: Command) -> float:
        """Timeout for one command."""
        return {
            Command.HELLO: self.hello_s,
            Command.GENKEY: self.keygen_s,
            Command.GET_CSR: self.csr_s,
            Command.WRITE: self.write_s,
            Command.READ: self.read_s,
            Command.SIGN: self.sign_s,
            Command.LOCK: self.lock_s,
            Command.REBOOT: self.reboot_s,
            Command.FW_BEGIN: self.fw_chunk_s,
            Command.FW_CHUNK: self.fw_chunk_s,
            Command.FW_END: self.fw_end_s,
        }.get(command, self.hello_s)


@dataclass
class ClientStats:
    """Counters of one client, exported as metrics by the daemon."""

    requests: int = 0
    replies: int = 0
    resends: int = 0
    nacks: int = 0
    frame_errors: int = 0
    unmatched: int = 0
    timeouts: int = 0
    boots: int = 0


@dataclass
class _Waiter:
    command: Command
    frame: Frame
    future: asyncio.Future[Frame]
    resends_left: int
    timeout_s: float
    # The encoded frame: resends send the same bytes without encoding again.
    data: bytes = b""
    timer: asyncio.TimerHandle | None = None


class BoardClient:
    """Typed access to one board; one instance per open link."""

    def __init__(
        self,
        link: SerialLink[FrameDecoder],
        *,
        timeouts: Timeouts | None = None,
        resends: int = 3,
        on_resend: Callable[[Command], None] | None = None,
    ) -> None:
        self.link = link
        self.timeouts = timeouts or Timeouts()
        self.resends = resends
        self.stats = ClientStats()
        self.last_boot: BoardInfo | None = None
        self.booted = asyncio.Event()
        self._on_resend = on_resend
        self._waiters: dict[int, _Waiter] = {}
        self._seq = 0
        self._lost: BaseException | None = None
        link.attach(self)

    @classmethod
    async def open(cls, path: str, *, baudrate: int = 115200, **kwargs: object) -> Self:
        """Open the tty at path and return a client on it."""
        link = await SerialLink.open_native(path, baudrate=baudrate)
        return cls(link, **kwargs)  # type: ignore[arg-type]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the link; pending requests fail with LinkClosedError."""
        await self.link.close()
        self._fail_all(LinkClosedError(f"link {self.link.path} closed by the host"))

    @property
    def pending(self) -> int:
        """Requests waiting for a reply (0 when idle; tests check nothing is left behind)."""
        return len(self._waiters)

    # Commands -----------------------------------------------------------------------------

    async def hello(self) -> BoardInfo:
        """Identify the board."""
        return BoardInfo.decode(await self._call(Hello()))

    async def genkey(self, slot: int = IDENTITY_SLOT) -> bytes:
        """Generate a key in the secure element; return the public key point."""
        return PublicKeyReply.decode(await self._call(GenKey(slot))).public_key

    async def get_csr(self, common_name: str, slot: int = IDENTITY_SLOT) -> bytes:
        """Return a DER CSR for the slot key with subject CN=common_name."""
        return CsrReply.decode(await self._call(GetCsr(slot, common_name))).csr_der

    async def write(self, obj: ObjectId, data: bytes) -> None:
        """Store an object; fail if the board's digest of what it stored differs."""
        digest = DigestReply.decode(await self._call(Write(obj, data))).sha256
        if digest != hashlib.sha256(data).digest():
            raise ReadbackMismatchError(f"board stored a different {obj.name} than was sent (digest differs)")

    async def read(self, obj: ObjectId) -> bytes:
        """Read an object back."""
        return DataReply.decode(await self._call(Read(obj))).data

    async def sign(self, challenge: bytes, slot: int = IDENTITY_SLOT) -> bytes:
        """Return the raw r||s signature of SHA-256(challenge) by the slot key."""
        return SignatureReply.decode(await self._call(Sign(slot, challenge))).signature

    async def lock(self) -> None:
        """Lock the secure element irreversibly."""
        expect_empty(await self._call(Lock()), "LOCK reply")

    async def reboot(self) -> None:
        """Reset the board (it sends BOOT afterwards)."""
        self.booted.clear()
        expect_empty(await self._call(Reboot()), "REBOOT reply")

    async def update_firmware(self, image: bytes, version: str, signature: bytes) -> bytes:
        """Send a signed image to the bootloader; return the installed image's SHA-256."""
        expect_empty(await self._call(FwBegin(len(image), version)), "FW_BEGIN reply")
        for offset in range(0, len(image), MAX_FW_CHUNK):
            chunk = image[offset : offset + MAX_FW_CHUNK]
            expect_empty(await self._call(FwChunk(offset, chunk)), "FW_CHUNK reply")
        digest = DigestReply.decode(await self._call(FwEnd(signature))).sha256
        if digest != hashlib.sha256(image).digest():
            raise FirmwareRejectedError("bootloader installed an image with another digest", Status.FW_STATE)
        return digest

    # Request machinery -------------------------------------------------------------------

    def _next_seq(self) -> int:
        while True:
            self._seq = self._seq % 0xFFFF + 1
            if self._seq not in self._waiters:
                return self._seq

    async def _call(self, request: Request) -> bytes:
        if isinstance(self._lost, BoardFloodError):
            raise self._lost
        if self._lost is not None:
            raise LinkClosedError(f"link {self.link.path} is closed") from self._lost
        command = request.command
        frame = Frame(FrameKind.REQUEST, self._next_seq(), command, 0, request.encode())
        # Wire time both ways for the frame, so slow baud rates do not look like timeouts.
        timeout_s = self.timeouts.for_command(command) + 2 * self.link.wire_time_s(len(frame.payload) + 64)
        waiter = _Waiter(
            command,
            frame,
            asyncio.get_running_loop().create_future(),
            self.resends,
            timeout_s,
            frame.encode(),
        )
        self._waiters[frame.seq] = waiter
        self.stats.requests += 1
        try:
            self.link.send(waiter.data)
            self._arm(waiter)
            reply = await waiter.future
        finally:
            del self._waiters[frame.seq]
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.cancel()
        return self._check_status(command, reply)

    def _arm(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiter.timer = asyncio.get_running_loop().call_later(waiter.timeout_s, self._timed_out, waiter)

    def _timed_out(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        if waiter.resends_left > 0:
            self._resend(waiter)
            return
        self.stats.timeouts += 1
        waiter.future.set_exception(
            BoardTimeoutError(
                f"{waiter.command.name} to {self.link.path}: no reply after {self.resends} resends "
                f"({waiter.timeout_s:.2f} s each)"
            )
        )

    def _resend(self, waiter: _Waiter) -> None:
        waiter.resends_left -= 1
        self.stats.resends += 1
        if self._on_resend is not None:
            self._on_resend(waiter.command)
        log.debug("resend", command=waiter.command.name, seq=waiter.frame.seq, path=self.link.path)
        try:
            self.link.send(waiter.data)
        except LinkClosedError as exc:
            waiter.future.set_exception(exc)
            return
        self._arm(waiter)

    def _check_status(self, command: Command, reply: Frame) -> bytes:
        status = Status(reply.status)
        if status is Status.OK:
            return reply.payload
        message = f"{command.name} refused by board: {status.name}"
        if status is Status.BUSY:
            raise BoardBusyError(message, status)
        if status is Status.LOCKED:
            raise BoardLockedError(message, status)
        if status in (Status.FW_SIGNATURE, Status.FW_STATE):
            raise FirmwareRejectedError(message, status)
        raise BoardStatusError(message, status, transient=status in TRANSIENT_STATUSES)

    def _fail_all(self, exc: BaseException) -> None:
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    # LinkListener -----------------------------------------------------------------------

    def frame_received(self, frame: Frame) -> None:
        """Route a frame from the link to its waiter."""
        if frame.kind is FrameKind.RESPONSE:
            waiter = self._waiters.get(frame.seq)
            if waiter is None or waiter.future.done():
                self.stats.unmatched += 1
                return
            if frame.command != waiter.command:
                waiter.future.set_exception(
                    ProtocolViolationError(
                        f"reply for command 0x{frame.command:02X} to a {waiter.command.name} request"
                    )
                )
                return
            self.stats.replies += 1
            waiter.future.set_result(frame)
        elif frame.kind is FrameKind.NACK:
            self.stats.nacks += 1
            self._kick_all()
        elif frame.kind is FrameKind.EVENT and frame.command == Command.BOOT:
            self._board_booted(frame)
        else:
            self.stats.unmatched += 1

    def frame_errors(self, count: int) -> None:
        """A garbled frame arrived: most likely our reply, so ask again at once."""
        self.stats.frame_errors += count
        if self.stats.frame_errors > MAX_FRAME_ERRORS:
            if self._lost is None:
                error = BoardFloodError(
                    f"board on {self.link.path} sent {self.stats.frame_errors} undecodable frames; "
                    "refusing to talk to it"
                )
                self._lost = error
                self._fail_all(error)
            return
        self._kick_all()

    def link_lost(self, exc: BaseException | None) -> None:
        """Fail every waiter: the tty is gone."""
        self._lost = exc or LinkClosedError("link closed")
        error = LinkClosedError(f"serial device {self.link.path} vanished")
        if exc is not None:
            error.__cause__ = exc
        self._fail_all(error)

    def _kick_all(self) -> None:
        for waiter in list(self._waiters.values()):
            if not waiter.future.done() and waiter.resends_left > 0:
                self._resend(waiter)

    def _board_booted(self, frame: Frame) -> None:
        self.stats.boots += 1
        try:
            self.last_boot = BoardInfo.decode(frame.payload)
        except ProtocolViolationError as exc:
            log.warning("bad boot event", error=str(exc), path=self.link.path)
            self.last_boot = None
        self.booted.set()
        for waiter in list(self._waiters.values()):
            if waiter.future.done() or waiter.command is Command.REBOOT:
                continue
            fresh = self.stats.replies == 0
            if (fresh or waiter.command in RESEND_AFTER_BOOT) and waiter.resends_left > 0:
                # Sent while the board was still starting up (nothing answered on this link yet), or
                # harmless to repeat: ask again now that it listens.
                self._resend(waiter)
            else:
                waiter.future.set_exception(
                    BoardResetError(f"board on {self.link.path} rebooted during {waiter.command.name}")
                )
