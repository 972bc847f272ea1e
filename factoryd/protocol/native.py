"""The factoryd-v1 client: typed requests to one board running factoryd firmware (docs/protocol.md).

Frames are ``factoryd.transport.framing``'s; requests and replies go through the shared
``RequestEngine``, keyed by seq, so many may be in flight. Each request names its reply type
(``messages.RequestFor``): ``request(req)`` sends it and decodes the reply, and the typed methods
(``hello``, ``genkey``, ...) are one line each. The board answers resends from its reply cache, so a
resend never runs a command twice. A BOOT event answers the pending requests itself: harmless
ones are asked again, any other fails with ``BoardResetError`` (the reset may have undone it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import structlog

from factoryd.errors import (
    BoardBusyError,
    BoardLockedError,
    BoardResetError,
    BoardStatusError,
    FirmwareRejectedError,
    ProtocolViolationError,
    ReadbackMismatchError,
)
from factoryd.protocol.engine import EngineClient, RequestEngine, Route
from factoryd.protocol.messages import (
    IDENTITY_SLOT,
    MAX_FW_CHUNK,
    PIPELINE_REVISION,
    READBACK_REVISION,
    AttestedKeyReply,
    BoardInfo,
    Command,
    DigestReply,
    FwBegin,
    FwChunk,
    FwEnd,
    GenKey,
    GenKeyAttested,
    GetCsr,
    Hello,
    Lock,
    ObjectId,
    Read,
    Reboot,
    Reply,
    RequestFor,
    Sign,
    SignatureReply,
    Status,
    Write,
)
from factoryd.transport.framing import Frame, FrameDecoder, FrameKind
from factoryd.transport.serial_link import SerialLink

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=Reply)
# Wire-time allowance per request for the frame header, CRC, COBS overhead and the reply's.
FRAME_ALLOWANCE_BYTES = 64

# Status codes after which the same request may succeed when tried again later.
TRANSIENT_STATUSES = frozenset({Status.BUSY, Status.STORAGE, Status.INTERNAL})
# Requests that change nothing on the board: after a BOOT they are simply asked again; any other
# pending request fails with BoardResetError, since the reset may have undone it.
RESEND_AFTER_BOOT = frozenset({Command.HELLO, Command.READ})
# FW_END's 64-byte field, reserved since images are MCUboot images with the signature inside.
FW_END_RESERVED = bytes(64)


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
        field_name: str = _TIMEOUT_FIELDS.get(command, "hello_s")
        value: float = getattr(self, field_name)
        return value


# Which Timeouts field bounds each command (a table, not a dict built per request).
_TIMEOUT_FIELDS: dict[Command, str] = {
    Command.HELLO: "hello_s",
    Command.GENKEY: "keygen_s",
    # Key generation plus one signature by the attestation key: the same allowance as GENKEY.
    Command.GENKEY_ATTESTED: "keygen_s",
    Command.GET_CSR: "csr_s",
    Command.WRITE: "write_s",
    Command.READ: "read_s",
    Command.SIGN: "sign_s",
    Command.LOCK: "lock_s",
    Command.REBOOT: "reboot_s",
    Command.FW_BEGIN: "fw_chunk_s",
    Command.FW_CHUNK: "fw_chunk_s",
    Command.FW_END: "fw_end_s",
}


class _NativeReplies:
    """How factoryd-v1 frames answer: RESPONSE by seq, NACK resends, BOOT goes to the client."""

    def __init__(self, client: BoardClient) -> None:
        self._client = client

    def route(self, frame: Frame) -> Route:
        """Classify by frame kind."""
        kind = frame.kind
        if kind is FrameKind.RESPONSE:
            return Route.REPLY
        if kind is FrameKind.NACK:
            return Route.NACK
        if kind is FrameKind.EVENT and frame.command == Command.BOOT:
            return Route.EVENT
        return Route.UNMATCHED

    def reply_key(self, frame: Frame) -> int:
        """Replies carry the request's seq."""
        return frame.seq

    def mismatch(self, command: Command, frame: Frame) -> str | None:
        """A reply must name the command it answers."""
        if frame.command == command:
            return None
        return f"reply for command 0x{frame.command:02X} to a {command.name} request"

    def nack_exhausted(self, attempts: int) -> None:
        """A NACK after the last resend: the request's timer decides."""

    def resend_on_timeout(self, command: Command) -> bool:
        """Always: the board answers a resend from its reply cache, so nothing runs twice."""
        return True

    def event(self, frame: Frame) -> None:
        """A BOOT event."""
        self._client._board_booted(frame)


class BoardClient(EngineClient[Frame, Command]):
    """Typed access to one board; one instance per open link."""

    def __init__(
        self,
        link: SerialLink[FrameDecoder],
        *,
        timeouts: Timeouts | None = None,
        resends: int = 3,
    ) -> None:
        self.link = link
        self.timeouts = timeouts or Timeouts()
        self.resends = resends
        self.last_boot: BoardInfo | None = None
        self.booted = asyncio.Event()
        # The board's protocol revision from its last HELLO or BOOT; 1 (read everything back) until then.
        self.revision = 1
        super().__init__(RequestEngine(link, _NativeReplies(self), resends=resends))

    @classmethod
    async def open(
        cls, path: str, *, baudrate: int = 115200, timeouts: Timeouts | None = None, resends: int = 3
    ) -> Self:
        """Open the tty at path and return a client on it."""
        link = await SerialLink.open(path, FrameDecoder(), baudrate=baudrate)
        return cls(link, timeouts=timeouts, resends=resends)

    def _framed(self, request: RequestFor[Any]) -> tuple[int, Command, bytes, float]:
        """A request as the engine sends it: its seq, command, encoded frame and reply timeout."""
        command = request.command
        seq = self._engine.next_key()
        frame = Frame(FrameKind.REQUEST, seq, command, 0, request.encode())
        # Wire time both ways for the frame, so slow baud rates do not look like timeouts.
        timeout_s = self.timeouts.for_command(command) + 2 * self.link.wire_time_s(
            len(frame.payload) + FRAME_ALLOWANCE_BYTES
        )
        return seq, command, frame.encode(), timeout_s

    async def request(self, request: RequestFor[R]) -> R:
        """Send a request; return its reply, decoded as the type the request names."""
        reply = await self._engine.call(*self._framed(request))
        if reply.status:
            _raise_status(request.command, reply.status)
        return request.reply.decode(reply.payload)

    # Commands -----------------------------------------------------------------------------

    async def hello(self) -> BoardInfo:
        """Identify the board (and learn its protocol revision)."""
        info = await self.request(Hello())
        self.revision = info.version
        return info

    @property
    def write_reply_reads_back(self) -> bool:
        """Whether a WRITE's digest is over the object read back from the board's store (revision 2)."""
        return self.revision >= READBACK_REVISION

    @property
    def pipelines(self) -> bool:
        """Whether the board takes requests back to back, answering them in order (revision 3)."""
        return self.revision >= PIPELINE_REVISION

    async def write_all_and_sign(
        self, objects: Sequence[tuple[ObjectId, bytes]], challenge: bytes, slot: int = IDENTITY_SLOT
    ) -> bytes:
        """WRITE every object and SIGN the challenge in one burst (revision 3); the raw r||s signature.

        Each WRITE's digest is checked as ``write`` checks it (from revision 2 it is over the object
        read back from the store). Every request in the burst may be repeated: a resend or a retried
        burst writes the same bytes again and signs the same challenge again.
        """
        if not self.pipelines:
            raise RuntimeError(f"write_all_and_sign() to a revision {self.revision} board (needs 3)")
        requests: list[RequestFor[Any]] = [Write(obj, data) for obj, data in objects]
        requests.append(Sign(slot, challenge))
        replies = await self._engine.call_many([self._framed(request) for request in requests])
        for request, reply in zip(requests, replies, strict=True):
            if reply.status:
                _raise_status(request.command, reply.status)
        for (obj, data), reply in zip(objects, replies, strict=False):
            _check_stored(obj, data, DigestReply.decode(reply.payload).sha256)
        return SignatureReply.decode(replies[-1].payload).signature

    async def genkey(self, slot: int = IDENTITY_SLOT) -> bytes:
        """Generate a key in the secure element; return the public key point."""
        return (await self.request(GenKey(slot))).public_key

    async def genkey_attested(self, nonce: bytes, slot: int = IDENTITY_SLOT) -> AttestedKeyReply:
        """Generate a key and return it with the secure element's attestation over ``nonce``."""
        return await self.request(GenKeyAttested(slot, nonce))

    async def get_csr(self, common_name: str, slot: int = IDENTITY_SLOT) -> bytes:
        """Return a DER CSR for the slot key with subject CN=common_name."""
        return (await self.request(GetCsr(slot, common_name))).csr_der

    async def write(self, obj: ObjectId, data: bytes) -> None:
        """Store an object; fail if the board's digest of what it stored differs.

        From revision 2 the digest is over the object as the board reads it back from its store.
        """
        _check_stored(obj, data, (await self.request(Write(obj, data))).sha256)

    async def read(self, obj: ObjectId) -> bytes:
        """Read an object back."""
        return (await self.request(Read(obj))).data

    async def sign(self, challenge: bytes, slot: int = IDENTITY_SLOT) -> bytes:
        """Return the raw r||s signature of SHA-256(challenge) by the slot key."""
        return (await self.request(Sign(slot, challenge))).signature

    async def lock(self) -> bool | None:
        """Lock the secure element irreversibly; the lock state it reports (None: revision 1, ask HELLO)."""
        return (await self.request(Lock())).locked

    async def reboot(self) -> None:
        """Reset the board (it sends BOOT afterwards)."""
        self.booted.clear()
        await self.request(Reboot())

    async def update_firmware(self, image: bytes, version: str, image_hash: bytes) -> bytes:
        """Send an MCUboot image to the bootloader; return the installed image's hash (SHA256 TLV).

        The signature is inside the image; the bootloader verifies it at FW_END. ``image_hash`` is
        the MCUboot hash the station verified (not the file's SHA-256): the board must report it.
        """
        await self.request(FwBegin(len(image), version))
        for offset in range(0, len(image), MAX_FW_CHUNK):
            await self.request(FwChunk(offset, image[offset : offset + MAX_FW_CHUNK]))
        digest = (await self.request(FwEnd(FW_END_RESERVED))).sha256
        if digest != image_hash:
            raise FirmwareRejectedError(
                f"bootloader installed an image with hash {digest.hex()[:12]}…, not {image_hash.hex()[:12]}…",
                Status.FW_STATE,
            )
        return digest

    # Events -------------------------------------------------------------------------------

    def _board_booted(self, frame: Frame) -> None:
        engine = self._engine
        engine.stats.boots += 1
        try:
            self.last_boot = BoardInfo.decode(frame.payload)
            self.revision = self.last_boot.version
        except ProtocolViolationError as exc:
            log.warning("bad boot event", error=str(exc), path=self.link.path)
            self.last_boot = None
            self.revision = 1
        self.booted.set()
        fresh = engine.stats.replies == 0
        for waiter in engine.waiters():
            if waiter.command is Command.REBOOT:
                continue
            if (fresh or waiter.command in RESEND_AFTER_BOOT) and waiter.resends_left > 0:
                # Sent while the board was still starting up (nothing answered on this link yet), or
                # harmless to repeat: ask again now that it listens.
                engine.resend(waiter)
            else:
                engine.fail(
                    waiter,
                    BoardResetError(f"board on {self.link.path} rebooted during {waiter.command.name}"),
                )


def _check_stored(obj: ObjectId, data: bytes, digest: bytes) -> None:
    """A WRITE reply's digest must be the SHA-256 of what was sent (ReadbackMismatchError otherwise)."""
    if digest != hashlib.sha256(data).digest():
        raise ReadbackMismatchError(f"board stored a different {obj.name} than was sent (digest differs)")


def _raise_status(command: Command, code: int) -> None:
    status = Status(code)
    message = f"{command.name} refused by board: {status.name}"
    if status is Status.BUSY:
        raise BoardBusyError(message, status)
    if status is Status.LOCKED:
        raise BoardLockedError(message, status)
    if status in (Status.FW_SIGNATURE, Status.FW_STATE):
        raise FirmwareRejectedError(message, status)
    raise BoardStatusError(message, status, transient=status in TRANSIENT_STATUSES)
