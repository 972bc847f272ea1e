"""The mcumgr client: SMP (MCUmgr) over a serial console, on the shared request engine.

Packets are ``factoryd.transport.smp_framing``'s; the stock message bodies are the ``smp``
package's models (OS group: echo, reset, MCUmgr parameters; image group: state read/write,
upload), and the factoryd provisioning group (``PROVISIONING_GROUP``, spec ``docs/protocol-smp.md``)
is defined here on the same base classes, so the simulated board decodes the same table.

Why not ``smpclient``'s serial transport: it polls a pyserial ``Serial`` (``read_all`` through
``select()``, which fails for descriptors >= 1024) every 5 ms from a coroutine and has one
request in flight per transport with no typed link-loss handling; a station runs hundreds of
ports on one event loop. The house's ``SerialLink`` (event-driven reads, no ``select``) and
``RequestEngine`` (waiters keyed by SMP seq, timer resends, link loss fails all) already give
what the daemon needs, so the SMP framer plugs into them like the other profiles' framers.
``smpclient`` is the third-party check in the tests instead.

Errors: SMP v2 ``{"err": {"group", "rc"}}`` and v1 ``{"rc", "rsn"?}`` become typed errors
(``BoardStatusError`` and its subclasses); a reply that does not decode or validate is a
``ProtocolViolationError``. Zephyr's SMP server keeps no reply cache, so a resend runs a command
again: every request here is safe to repeat except key generation, which is not resent on a
timeout (a late first reply would carry a key the second one replaced).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Self, TypeVar

import cbor2
from pydantic import ValidationError
from smp import header as smpheader
from smp import message as smpmsg
from smp.error import MGMT_ERR
from smp.image_management import (
    IMG_MGMT_ERR,
    ImageStatesReadRequest,
    ImageStatesReadResponse,
    ImageStatesWriteRequest,
    ImageStatesWriteResponse,
    ImageUploadWriteRequest,
    ImageUploadWriteResponse,
)
from smp.os_management import (
    EchoWriteRequest,
    EchoWriteResponse,
    MCUMgrParametersReadRequest,
    MCUMgrParametersReadResponse,
    ResetWriteRequest,
    ResetWriteResponse,
)

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
from factoryd.protocol.messages import IDENTITY_SLOT, ObjectId
from factoryd.transport.serial_link import LinkState, SerialLink
from factoryd.transport.smp_framing import (
    HEADER_BYTES,
    SmpDecoder,
    SmpPacket,
    console_bytes,
    max_packet_for,
)

# The factoryd provisioning group: a user-defined SMP group (>= 64; 64 itself is Intercreate's).
# 0x4644 is "FD" in ASCII.
PROVISIONING_GROUP = 0x4644
# Zephyr's default MCUMGR_TRANSPORT_NETBUF_SIZE: what a board that does not answer the params
# command is assumed to take.
DEFAULT_BUF_SIZE = 384
# The smallest buffer the provisioning group needs: a CSR (~300 bytes) must fit one reply.
MIN_BUF_SIZE = 384
MAX_SEQ = 0xFF
SHA256_BYTES = 32
RAW_SIGNATURE_BYTES = 64
P256_POINT_BYTES = 65
# The largest object this host writes or reads (a certificate chain of a few certificates).
MAX_OBJECT_BYTES = 16 * 1024
# Bytes of CBOR a chunk request spends on keys and integers beyond its data (upper bound for the
# data's bstr header growing from 1 to 3 bytes as the chunk grows).
BSTR_HEADER_GROWTH_BYTES = 2
# Times a board may answer "offset 0" in the middle of one upload (it reset and lost its progress)
# before the upload gives up: a board that keeps resetting will not take the image.
MAX_UPLOAD_RESTARTS = 3
# Wire allowance for the reply of an ordinary request (its header, a small CBOR map, framing).
REPLY_ALLOWANCE_BYTES = 96
# The station's nonce an attest request carries.
ATTEST_NONCE_BYTES = 32
# Certificates an attestation chain may hold (pki.attestation.MAX_ATTESTATION_CHAIN) and the size
# of one (a vendor's P-256/P-384/RSA-2048 certificate is 0.4-1.5 KiB): larger ones are not read.
MAX_ATTESTATION_CERTS = 4
MAX_ATTESTATION_CERT_BYTES = 4096


class McumgrCommand(IntEnum):
    """Every command this client sends: ``group << 8 | command id`` (the engine's command key)."""

    ECHO = 0x0000
    RESET = 0x0005
    PARAMS = 0x0006
    IMAGE_STATE = 0x0100
    IMAGE_UPLOAD = 0x0101
    IDENTITY = PROVISIONING_GROUP << 8 | 0
    KEYGEN = PROVISIONING_GROUP << 8 | 1
    CSR = PROVISIONING_GROUP << 8 | 2
    WRITE_OBJECT = PROVISIONING_GROUP << 8 | 3
    READ_OBJECT = PROVISIONING_GROUP << 8 | 4
    SIGN = PROVISIONING_GROUP << 8 | 5
    LOCK = PROVISIONING_GROUP << 8 | 6
    ATTEST = PROVISIONING_GROUP << 8 | 7
    ATTESTATION_CERT = PROVISIONING_GROUP << 8 | 8

    @property
    def group(self) -> int:
        """The SMP group id."""
        return int(self) >> 8

    @property
    def command_id(self) -> int:
        """The SMP command id within its group."""
        return int(self) & 0xFF


# Replies that carry up to a whole buffer of data (the wire time of a full packet is allowed for).
_DATA_REPLIES = frozenset(
    {McumgrCommand.READ_OBJECT, McumgrCommand.CSR, McumgrCommand.ATTEST, McumgrCommand.ATTESTATION_CERT}
)


class ProvCommand(IntEnum):
    """Command ids of the provisioning group (docs/protocol-smp.md)."""

    IDENTITY = 0
    KEYGEN = 1
    CSR = 2
    WRITE_OBJECT = 3
    READ_OBJECT = 4
    SIGN = 5
    LOCK = 6
    ATTEST = 7
    ATTESTATION_CERT = 8


class ProvError(IntEnum):
    """``rc`` values of the provisioning group's ``err`` (docs/protocol-smp.md); unknown → UNKNOWN."""

    OK = 0
    UNKNOWN = 1
    LOCKED = 2  # the secure element is locked: nothing can be generated or written
    NO_KEY = 3  # the slot holds no key
    BAD_SLOT = 4  # no such key slot
    BAD_OBJECT = 5  # no such object id
    TOO_LARGE = 6  # the object exceeds what the board can store
    BAD_OFFSET = 7  # a chunk at another offset than the board expects (reply carries "off")
    SE_BUSY = 8  # the secure element is busy: try again
    SE_FAILURE = 9  # the secure element failed the operation (I2C error, ...): may pass again
    BAD_CN = 10  # the common name is empty, too long or not UTF-8
    SERIAL_MISMATCH = 11  # LOCK named another serial than this board's

    @classmethod
    def _missing_(cls, value: object) -> ProvError:
        return cls.UNKNOWN


# Provisioning errors after which the same request may pass when tried again.
TRANSIENT_PROV_ERRORS = frozenset({ProvError.SE_BUSY, ProvError.SE_FAILURE})
# SMP-level (v1 rc / MGMT_ERR) codes after which the same request may pass when tried again.
TRANSIENT_MGMT_ERRORS = frozenset({MGMT_ERR.EBUSY, MGMT_ERR.ENOMEM, MGMT_ERR.ETIMEOUT})


# The provisioning group's messages, on the smp package's base classes -----------------------


class _Prov:
    _GROUP_ID: ClassVar[int] = PROVISIONING_GROUP


class IdentityReadRequest(_Prov, smpmsg.ReadRequest):
    """Identity: secure-element serial, model, lock state, stored objects."""

    _COMMAND_ID = ProvCommand.IDENTITY


class IdentityReadResponse(_Prov, smpmsg.ReadResponse):
    """The board's identity."""

    _COMMAND_ID = ProvCommand.IDENTITY
    serial: bytes
    model: str
    locked: bool
    objects: list[int]
    keys: list[int]


class KeygenWriteRequest(_Prov, smpmsg.WriteRequest):
    """Make a new P-256 key in a slot (replacing the old one)."""

    _COMMAND_ID = ProvCommand.KEYGEN
    slot: int


class KeygenWriteResponse(_Prov, smpmsg.WriteResponse):
    """The new key's uncompressed public point."""

    _COMMAND_ID = ProvCommand.KEYGEN
    pub: bytes


class CsrReadRequest(_Prov, smpmsg.ReadRequest):
    """A DER CSR of the slot key for subject CN=cn."""

    _COMMAND_ID = ProvCommand.CSR
    slot: int
    cn: str


class CsrReadResponse(_Prov, smpmsg.ReadResponse):
    """The DER CSR."""

    _COMMAND_ID = ProvCommand.CSR
    csr: bytes


class ObjectWriteRequest(_Prov, smpmsg.WriteRequest):
    """One chunk of an object; ``len`` (total bytes) on the first chunk only."""

    _COMMAND_ID = ProvCommand.WRITE_OBJECT
    obj: int
    off: int
    data: bytes
    len: int | None = None


class ObjectWriteResponse(_Prov, smpmsg.WriteResponse):
    """The next offset; ``sha`` (SHA-256 of what is stored) once the object is complete."""

    _COMMAND_ID = ProvCommand.WRITE_OBJECT
    off: int
    sha: bytes | None = None


class ObjectReadRequest(_Prov, smpmsg.ReadRequest):
    """Read an object from an offset."""

    _COMMAND_ID = ProvCommand.READ_OBJECT
    obj: int
    off: int


class ObjectReadResponse(_Prov, smpmsg.ReadResponse):
    """A chunk of the object; ``len`` (total bytes) on the chunk at offset 0."""

    _COMMAND_ID = ProvCommand.READ_OBJECT
    off: int
    data: bytes
    len: int | None = None


class SignWriteRequest(_Prov, smpmsg.WriteRequest):
    """Sign SHA-256(challenge) with the slot key."""

    _COMMAND_ID = ProvCommand.SIGN
    slot: int
    challenge: bytes


class SignWriteResponse(_Prov, smpmsg.WriteResponse):
    """The raw r||s signature."""

    _COMMAND_ID = ProvCommand.SIGN
    sig: bytes


class LockWriteRequest(_Prov, smpmsg.WriteRequest):
    """Lock the secure element for good; names the serial so a confused host cannot lock another board."""

    _COMMAND_ID = ProvCommand.LOCK
    serial: bytes


class LockWriteResponse(_Prov, smpmsg.WriteResponse):
    """Locked."""

    _COMMAND_ID = ProvCommand.LOCK


class AttestWriteRequest(_Prov, smpmsg.WriteRequest):
    """Make a new key in a slot and attest it over the station's 32-byte nonce."""

    _COMMAND_ID = ProvCommand.ATTEST
    slot: int
    nonce: bytes


class AttestWriteResponse(_Prov, smpmsg.WriteResponse):
    """The echoed nonce, the new key's point, the statement's DER signature, the chain's length."""

    _COMMAND_ID = ProvCommand.ATTEST
    nonce: bytes
    pub: bytes
    sig: bytes
    certs: int


class AttestationCertReadRequest(_Prov, smpmsg.ReadRequest):
    """Read certificate ``cert`` (0 = leaf) of the attestation chain from an offset."""

    _COMMAND_ID = ProvCommand.ATTESTATION_CERT
    cert: int
    off: int


class AttestationCertReadResponse(_Prov, smpmsg.ReadResponse):
    """A chunk of the certificate; ``len`` (its total bytes) on the chunk at offset 0."""

    _COMMAND_ID = ProvCommand.ATTESTATION_CERT
    cert: int
    off: int
    data: bytes
    len: int | None = None


# Each command's request and reply models (the simulated board reads this table too).
MESSAGES: dict[McumgrCommand, tuple[type[smpmsg.Request], type[smpmsg.Response]]] = {
    McumgrCommand.ECHO: (EchoWriteRequest, EchoWriteResponse),
    McumgrCommand.RESET: (ResetWriteRequest, ResetWriteResponse),
    McumgrCommand.PARAMS: (MCUMgrParametersReadRequest, MCUMgrParametersReadResponse),
    McumgrCommand.IMAGE_STATE: (ImageStatesReadRequest, ImageStatesReadResponse),
    McumgrCommand.IMAGE_UPLOAD: (ImageUploadWriteRequest, ImageUploadWriteResponse),
    McumgrCommand.IDENTITY: (IdentityReadRequest, IdentityReadResponse),
    McumgrCommand.KEYGEN: (KeygenWriteRequest, KeygenWriteResponse),
    McumgrCommand.CSR: (CsrReadRequest, CsrReadResponse),
    McumgrCommand.WRITE_OBJECT: (ObjectWriteRequest, ObjectWriteResponse),
    McumgrCommand.READ_OBJECT: (ObjectReadRequest, ObjectReadResponse),
    McumgrCommand.SIGN: (SignWriteRequest, SignWriteResponse),
    McumgrCommand.LOCK: (LockWriteRequest, LockWriteResponse),
    McumgrCommand.ATTEST: (AttestWriteRequest, AttestWriteResponse),
    McumgrCommand.ATTESTATION_CERT: (AttestationCertReadRequest, AttestationCertReadResponse),
}
# The image-state write shares IMAGE_STATE's key (same group and id; op WRITE).
IMAGE_STATE_WRITE = (ImageStatesWriteRequest, ImageStatesWriteResponse)

Rsp = TypeVar("Rsp", bound=smpmsg.Response)


def command_of(group: int, command_id: int) -> McumgrCommand | None:
    """The command a header names, None for one this table does not know."""
    try:
        return McumgrCommand(group << 8 | command_id)
    except ValueError:
        return None


def encode_request(request: smpmsg.Request) -> SmpPacket:
    """An smp request model as a packet of the framer."""
    return SmpPacket.decode(bytes(request))


def decode_body(packet: SmpPacket) -> dict[str, Any]:
    """The CBOR body of a packet as a map; ProtocolViolationError otherwise."""
    try:
        body = cbor2.loads(packet.payload) if packet.payload else {}
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise ProtocolViolationError(f"SMP body is not CBOR: {exc}") from None
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise ProtocolViolationError(f"SMP body is not a CBOR map with text keys: {type(body).__name__}")
    return body


def load_model(model: type[Rsp], packet: SmpPacket, body: dict[str, Any]) -> Rsp:
    """Validate a body against an smp model, ignoring fields the model does not know.

    Zephyr adds fields between releases (``splitStatus``, ...); a board's extra field is no
    reason to refuse its reply, a missing or mistyped one is.
    """
    known = {k: v for k, v in body.items() if k in model.model_fields}
    raw = packet.encode()
    try:
        header = smpheader.Header.loads(raw[:HEADER_BYTES])
        return model(header=header, smp_data=raw, **known)
    except (ValidationError, ValueError) as exc:
        raise ProtocolViolationError(f"{model.__name__}: {exc}") from None


@dataclass(frozen=True)
class ImageSlot:
    """One entry of the image group's state list."""

    image: int
    slot: int
    version: str
    hash: bytes
    bootable: bool
    pending: bool
    confirmed: bool
    active: bool
    permanent: bool


@dataclass(frozen=True)
class McumgrParams:
    """What the params command reports: the reassembly buffer size and how many there are."""

    buf_size: int
    buf_count: int

    @property
    def max_packet(self) -> int:
        """The largest SMP packet the board takes."""
        return max_packet_for(self.buf_size)


@dataclass(frozen=True)
class SmpIdentity:
    """The provisioning group's identity: what the native protocol's HELLO gives."""

    serial: bytes
    model: str
    locked: bool
    objects: frozenset[int]
    keys: frozenset[int]

    @property
    def serial_hex(self) -> str:
        """The secure-element serial as the ledger stores it."""
        return self.serial.hex()


@dataclass(frozen=True)
class SmpAttestation:
    """What the attest command returned: the statement's fields and the whole chain, leaf first."""

    nonce: bytes
    public_key: bytes
    signature: bytes
    chain: tuple[bytes, ...]


class SmpNoKeyError(BoardStatusError):
    """The provisioning group's ``NO_KEY``: for attest, the part has no attestation key."""


class SmpNotSupportedError(BoardStatusError):
    """``MGMT_ERR_ENOTSUP``: the board's firmware does not implement the command."""


@dataclass(frozen=True)
class McumgrTimeouts:
    """Per-command reply timeouts in seconds (wire time both ways is added on top)."""

    # Answered from RAM; 1 s covers USB CDC latency on a loaded hub.
    echo_s: float = 1.0
    params_s: float = 1.0
    identity_s: float = 1.0
    # The reply precedes the reset (Zephyr schedules the reset ~250 ms later).
    reset_s: float = 2.0
    # Reading the slots' headers and TLVs from flash.
    image_state_s: float = 3.0
    # The first chunk may erase the whole secondary slot first (CONFIG_IMG_ERASE_PROGRESSIVELY=n);
    # smpclient waits 40 s for it.
    upload_first_s: float = 40.0
    # A later chunk is one flash write of a few hundred bytes (plus a sector erase at most).
    upload_chunk_s: float = 3.0
    # ATECC608-class key generation ~115 ms plus firmware overhead.
    keygen_s: float = 5.0
    csr_s: float = 5.0
    write_s: float = 3.0
    read_s: float = 2.0
    sign_s: float = 3.0
    lock_s: float = 3.0
    # Key generation plus one signature by the attestation key (~115 ms + ~60 ms on an ATECC608).
    attest_s: float = 5.0
    # After a reset: how long the board may take to boot (MCUboot's swap of a large slot takes
    # seconds per 100 KiB) and answer again.
    boot_s: float = 60.0
    # A board that is booting drops what it is sent: while waiting for it, an echo is sent this often.
    probe_s: float = 0.2
    # How long a board whose tty has just appeared may take to answer at all (its application's boot).
    first_answer_s: float = 5.0

    def for_command(self, command: McumgrCommand, *, first_chunk: bool = False) -> float:
        """Timeout for one command."""
        if command is McumgrCommand.IMAGE_UPLOAD:
            return self.upload_first_s if first_chunk else self.upload_chunk_s
        value: float = getattr(self, _TIMEOUT_FIELDS[command])
        return value


_TIMEOUT_FIELDS: dict[McumgrCommand, str] = {
    McumgrCommand.ECHO: "echo_s",
    McumgrCommand.RESET: "reset_s",
    McumgrCommand.PARAMS: "params_s",
    McumgrCommand.IMAGE_STATE: "image_state_s",
    McumgrCommand.IDENTITY: "identity_s",
    McumgrCommand.KEYGEN: "keygen_s",
    McumgrCommand.CSR: "csr_s",
    McumgrCommand.WRITE_OBJECT: "write_s",
    McumgrCommand.READ_OBJECT: "read_s",
    McumgrCommand.SIGN: "sign_s",
    McumgrCommand.LOCK: "lock_s",
    McumgrCommand.ATTEST: "attest_s",
    McumgrCommand.ATTESTATION_CERT: "read_s",
}


class _SmpReplies:
    """How SMP packets answer: a response op, keyed by the request's seq."""

    def route(self, packet: SmpPacket) -> Route:
        """Responses are replies; a request from the board is nothing we wait for."""
        return Route.REPLY if packet.op.is_response else Route.UNMATCHED

    def reply_key(self, packet: SmpPacket) -> int:
        """Replies echo the request's seq."""
        return packet.seq

    def mismatch(self, command: McumgrCommand, packet: SmpPacket) -> str | None:
        """A reply must name the group and command id it answers."""
        if packet.group == command.group and packet.command == command.command_id:
            return None
        return f"SMP reply for group {packet.group} command {packet.command} to a {command.name} request"

    def nack_exhausted(self, attempts: int) -> None:
        """SMP has no NACK."""

    def resend_on_timeout(self, command: McumgrCommand) -> bool:
        """Not KEYGEN/ATTEST (a late first reply would carry a replaced key), not RESET (it may reboot)."""
        return command not in (McumgrCommand.KEYGEN, McumgrCommand.ATTEST, McumgrCommand.RESET)

    def event(self, packet: SmpPacket) -> None:
        """SMP sends no events."""


_REPLIES = _SmpReplies()


class McumgrClient(EngineClient[SmpPacket, McumgrCommand]):
    """Typed SMP access to one board; one instance per open link."""

    def __init__(
        self,
        link: SerialLink[SmpDecoder],
        *,
        timeouts: McumgrTimeouts | None = None,
        resends: int = 3,
    ) -> None:
        self.link = link
        self.timeouts = timeouts or McumgrTimeouts()
        self.resends = resends
        # Until the params command answers: Zephyr's default buffer.
        self.params = McumgrParams(DEFAULT_BUF_SIZE, 1)
        self._seq = 0
        self._in_flight: set[int] = set()
        super().__init__(RequestEngine(link, _REPLIES, resends=resends))

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        baudrate: int = 115200,
        timeouts: McumgrTimeouts | None = None,
        resends: int = 3,
    ) -> Self:
        """Open the tty at path and return a client on it."""
        link = await SerialLink.open(path, SmpDecoder(), baudrate=baudrate)
        return cls(link, timeouts=timeouts, resends=resends)

    @property
    def closed(self) -> bool:
        """Whether the link is gone (a USB CDC board that resets takes its tty with it)."""
        return self.link.state is LinkState.CLOSED

    # Requests ------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        for _ in range(MAX_SEQ + 1):
            self._seq = (self._seq + 1) & MAX_SEQ
            if self._seq not in self._in_flight:
                return self._seq
        raise ProtocolViolationError(f"all {MAX_SEQ + 1} SMP sequence numbers are in flight")

    async def request(
        self,
        command: McumgrCommand,
        build: Callable[[int], smpmsg.Request],
        reply: type[Rsp],
        *,
        first_chunk: bool = False,
        timeout_s: float | None = None,
    ) -> Rsp:
        """Send one request (built for its seq) and return its validated reply; typed errors otherwise."""
        seq = self._next_seq()
        packet = encode_request(build(seq))
        if len(packet.encode()) > self.params.max_packet:
            raise ValueError(
                f"{command.name} packet of {len(packet.encode())} bytes exceeds the board's "
                f"{self.params.max_packet}-byte limit"
            )
        wire = console_bytes(len(packet.encode())) + REPLY_ALLOWANCE_BYTES
        if command in _DATA_REPLIES:
            wire += console_bytes(self.params.max_packet)  # the reply carries the data
        if timeout_s is None:
            timeout_s = self.timeouts.for_command(command, first_chunk=first_chunk)
        timeout_s += self.link.wire_time_s(wire)
        self._in_flight.add(seq)
        try:
            answer = await self._engine.call(seq, command, packet.lines(), timeout_s)
        finally:
            self._in_flight.discard(seq)
        body = decode_body(answer)
        _raise_error(command, body)
        return load_model(reply, answer, body)

    # OS group ------------------------------------------------------------------------------

    async def echo(self, text: str, *, timeout_s: float | None = None) -> str:
        """Echo: the board answers with the same text (a liveness probe; ``timeout_s`` per attempt)."""
        rsp = await self.request(
            McumgrCommand.ECHO,
            lambda s: EchoWriteRequest(d=text, sequence=s),
            EchoWriteResponse,
            timeout_s=timeout_s,
        )
        if rsp.r != text:
            raise ProtocolViolationError(f"echo of {text!r} answered {rsp.r!r}")
        return rsp.r

    async def read_params(self) -> McumgrParams:
        """The board's MCUmgr buffer size (Zephyr's default when it does not support the command)."""
        try:
            rsp = await self.request(
                McumgrCommand.PARAMS,
                lambda s: MCUMgrParametersReadRequest(sequence=s),
                MCUMgrParametersReadResponse,
            )
        except BoardStatusError as exc:
            if exc.status != MGMT_ERR.ENOTSUP:
                raise
            self.params = McumgrParams(DEFAULT_BUF_SIZE, 1)
        else:
            if rsp.buf_size < MIN_BUF_SIZE:
                raise ProtocolViolationError(
                    f"board's MCUmgr buffer is {rsp.buf_size} bytes; the provisioning group needs "
                    f"{MIN_BUF_SIZE} (CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE)"
                )
            self.params = McumgrParams(rsp.buf_size, rsp.buf_count)
        return self.params

    async def reset(self) -> None:
        """Reset the board (its reply comes before the reset)."""
        await self.request(McumgrCommand.RESET, lambda s: ResetWriteRequest(sequence=s), ResetWriteResponse)

    # Image group ---------------------------------------------------------------------------

    async def image_state(self) -> list[ImageSlot]:
        """The images in the board's slots."""
        rsp = await self.request(
            McumgrCommand.IMAGE_STATE, lambda s: ImageStatesReadRequest(sequence=s), ImageStatesReadResponse
        )
        return _slots(rsp)

    async def image_test(self, image_hash: bytes) -> list[ImageSlot]:
        """Mark the secondary-slot image with this hash for a test boot at the next reset."""
        return await self._state_write(image_hash, confirm=False)

    async def image_confirm(self, image_hash: bytes | None = None) -> list[ImageSlot]:
        """Make the running image (or the one with this hash) permanent."""
        return await self._state_write(image_hash, confirm=True)

    async def _state_write(self, image_hash: bytes | None, *, confirm: bool) -> list[ImageSlot]:
        rsp = await self.request(
            McumgrCommand.IMAGE_STATE,
            lambda s: ImageStatesWriteRequest(hash=image_hash, confirm=confirm, sequence=s),
            ImageStatesWriteResponse,
        )
        return _slots(rsp)

    async def upload(
        self, image: bytes, *, on_progress: Callable[[int], None] | None = None, image_number: int = 0
    ) -> int:
        """Upload an image to the secondary slot, from the offset the board reports; return the offset.

        The first request (offset 0) carries the length and SHA-256 of the whole file; a board that
        already holds part of this very image answers with the offset to go on from (resume).
        Every later chunk starts where the board's last reply says.
        """
        if not image:
            raise ValueError("cannot upload an empty image")
        sha = hashlib.sha256(image).digest()
        offset = 0
        first = True
        restarts = 0
        while True:
            chunk = self._upload_chunk_size(first)
            data = image[offset : offset + chunk]

            def build(s: int, off: int = offset, d: bytes = data, first_: bool = first) -> smpmsg.Request:
                if first_:
                    return ImageUploadWriteRequest(
                        off=off,
                        data=d,
                        image=image_number,
                        len=len(image),
                        sha=sha,
                        upgrade=False,
                        sequence=s,
                    )
                return ImageUploadWriteRequest(off=off, data=d, sequence=s)

            rsp = await self.request(
                McumgrCommand.IMAGE_UPLOAD, build, ImageUploadWriteResponse, first_chunk=first
            )
            if rsp.rc not in (None, 0):
                _raise_error(McumgrCommand.IMAGE_UPLOAD, {"rc": rsp.rc})
            if rsp.off is None or not 0 <= rsp.off <= len(image):
                raise ProtocolViolationError(f"image upload: board reported offset {rsp.off} of {len(image)}")
            first = rsp.off == 0 and offset != 0  # the board restarted the upload: send len and sha again
            if first:
                restarts += 1
                if restarts > MAX_UPLOAD_RESTARTS:
                    raise BoardResetError(
                        f"image upload: the board restarted the upload {restarts} times (it keeps resetting)"
                    )
            offset = rsp.off
            if on_progress is not None:
                on_progress(offset)
            if offset == len(image):
                if rsp.match is False:
                    raise FirmwareRejectedError(
                        "image upload: the board's SHA-256 of the received image differs from the file's",
                        int(IMG_MGMT_ERR.INVALID_HASH),
                    )
                return offset

    def _upload_chunk_size(self, first: bool) -> int:
        """Data bytes that fit one upload request with its keys (first: plus len, image, sha, upgrade)."""
        probe = ImageUploadWriteRequest(
            off=0xFFFF_FFFF,
            data=b"",
            sequence=0,
            **(
                {"image": 0, "len": 0xFFFF_FFFF, "sha": bytes(SHA256_BYTES), "upgrade": False}
                if first
                else {}
            ),
        )
        room = self.params.max_packet - len(bytes(probe)) - BSTR_HEADER_GROWTH_BYTES
        if room <= 0:
            raise ProtocolViolationError(f"board's {self.params.buf_size}-byte buffer fits no upload data")
        return room

    # Provisioning group --------------------------------------------------------------------

    async def identity(self) -> SmpIdentity:
        """The secure element's serial, the model, lock state, stored objects and key slots."""
        rsp = await self.request(
            McumgrCommand.IDENTITY, lambda s: IdentityReadRequest(sequence=s), IdentityReadResponse
        )
        if not rsp.serial:
            raise ProtocolViolationError("identity: the board reports an empty secure-element serial")
        return SmpIdentity(rsp.serial, rsp.model, rsp.locked, frozenset(rsp.objects), frozenset(rsp.keys))

    async def genkey(self, slot: int = IDENTITY_SLOT) -> bytes:
        """Make a new key in the slot; return its uncompressed public point."""
        rsp = await self.request(
            McumgrCommand.KEYGEN, lambda s: KeygenWriteRequest(slot=slot, sequence=s), KeygenWriteResponse
        )
        if len(rsp.pub) != P256_POINT_BYTES or rsp.pub[0] != 0x04:
            raise ProtocolViolationError(
                f"keygen: {len(rsp.pub)}-byte public key is not an uncompressed P-256 point"
            )
        return rsp.pub

    async def get_csr(self, common_name: str, slot: int = IDENTITY_SLOT) -> bytes:
        """A DER CSR for the slot key with subject CN=common_name."""
        rsp = await self.request(
            McumgrCommand.CSR,
            lambda s: CsrReadRequest(slot=slot, cn=common_name, sequence=s),
            CsrReadResponse,
        )
        return rsp.csr

    async def write(self, obj: ObjectId, data: bytes) -> None:
        """Store an object in chunks; fail unless the board's SHA-256 of what it stored matches."""
        if len(data) > MAX_OBJECT_BYTES:
            raise ValueError(f"{obj.name} of {len(data)} bytes exceeds {MAX_OBJECT_BYTES}")
        offset = 0
        while True:
            first = offset == 0
            probe = ObjectWriteRequest(
                obj=int(obj), off=offset, data=b"", len=len(data) if first else None, sequence=0
            )
            room = self.params.max_packet - len(bytes(probe)) - BSTR_HEADER_GROWTH_BYTES
            piece = data[offset : offset + room]

            def build(s: int, off: int = offset, d: bytes = piece, first_: bool = first) -> smpmsg.Request:
                return ObjectWriteRequest(
                    obj=int(obj), off=off, data=d, len=len(data) if first_ else None, sequence=s
                )

            rsp = await self.request(McumgrCommand.WRITE_OBJECT, build, ObjectWriteResponse)
            if not 0 <= rsp.off <= len(data) or (rsp.off <= offset and rsp.off != 0):
                raise ProtocolViolationError(
                    f"write {obj.name}: board reported offset {rsp.off} after {offset}"
                )
            offset = rsp.off
            if offset == len(data) and (rsp.sha is not None or not data):
                if rsp.sha != hashlib.sha256(data).digest():
                    raise ReadbackMismatchError(
                        f"board stored a different {obj.name} than was sent (digest differs)"
                    )
                return

    async def read(self, obj: ObjectId) -> bytes:
        """Read an object back, chunk by chunk (empty when the board holds none)."""
        out = bytearray()
        total: int | None = None
        while True:
            off = len(out)
            rsp = await self.request(
                McumgrCommand.READ_OBJECT,
                lambda s, o=off: ObjectReadRequest(obj=int(obj), off=o, sequence=s),  # type: ignore[misc]
                ObjectReadResponse,
            )
            if rsp.off != off:
                raise ProtocolViolationError(f"read {obj.name}: asked offset {off}, got {rsp.off}")
            if total is None:
                if rsp.len is None or not 0 <= rsp.len <= MAX_OBJECT_BYTES:
                    raise ProtocolViolationError(
                        f"read {obj.name}: first chunk carries no valid len ({rsp.len})"
                    )
                total = rsp.len
            out += rsp.data
            if len(out) > total or (not rsp.data and len(out) < total):
                raise ProtocolViolationError(f"read {obj.name}: {len(out)} bytes of a {total}-byte object")
            if len(out) == total:
                return bytes(out)

    async def sign(self, challenge: bytes, slot: int = IDENTITY_SLOT) -> bytes:
        """The raw r||s signature of SHA-256(challenge) by the slot key."""
        rsp = await self.request(
            McumgrCommand.SIGN,
            lambda s: SignWriteRequest(slot=slot, challenge=challenge, sequence=s),
            SignWriteResponse,
        )
        if len(rsp.sig) != RAW_SIGNATURE_BYTES:
            raise ProtocolViolationError(f"sign: {len(rsp.sig)}-byte signature, expected raw r||s of 64")
        return rsp.sig

    async def attest(self, nonce: bytes, slot: int = IDENTITY_SLOT) -> SmpAttestation:
        """Attest: a new key in the slot and the statement over ``nonce``; then the chain, cert by cert."""
        if len(nonce) != ATTEST_NONCE_BYTES:
            raise ValueError(f"attest nonce of {len(nonce)} bytes, expected {ATTEST_NONCE_BYTES}")
        rsp = await self.request(
            McumgrCommand.ATTEST,
            lambda s: AttestWriteRequest(slot=slot, nonce=nonce, sequence=s),
            AttestWriteResponse,
        )
        if len(rsp.pub) != P256_POINT_BYTES or rsp.pub[0] != 0x04:
            raise ProtocolViolationError(
                f"attest: {len(rsp.pub)}-byte public key is not an uncompressed P-256 point"
            )
        if not 0 <= rsp.certs <= MAX_ATTESTATION_CERTS:
            raise ProtocolViolationError(
                f"attest: a chain of {rsp.certs} certificates (limit {MAX_ATTESTATION_CERTS})"
            )
        chain = tuple([await self.attestation_cert(i) for i in range(rsp.certs)])
        return SmpAttestation(rsp.nonce, rsp.pub, rsp.sig, chain)

    async def attestation_cert(self, index: int) -> bytes:
        """Certificate ``index`` (0 = leaf) of the attestation chain, DER, read chunk by chunk."""
        out = bytearray()
        total: int | None = None
        while True:
            off = len(out)
            rsp = await self.request(
                McumgrCommand.ATTESTATION_CERT,
                lambda s, o=off: AttestationCertReadRequest(cert=index, off=o, sequence=s),  # type: ignore[misc]
                AttestationCertReadResponse,
            )
            if rsp.cert != index or rsp.off != off:
                raise ProtocolViolationError(
                    f"attestation cert: asked cert {index} offset {off}, got cert {rsp.cert} offset {rsp.off}"
                )
            if total is None:
                if rsp.len is None or not 0 < rsp.len <= MAX_ATTESTATION_CERT_BYTES:
                    raise ProtocolViolationError(
                        f"attestation cert {index}: first chunk carries no valid len ({rsp.len})"
                    )
                total = rsp.len
            out += rsp.data
            if len(out) > total or (not rsp.data and len(out) < total):
                raise ProtocolViolationError(
                    f"attestation cert {index}: {len(out)} bytes of a {total}-byte certificate"
                )
            if len(out) == total:
                return bytes(out)

    async def lock(self, serial: bytes) -> None:
        """Lock the secure element of the board with this serial, irreversibly."""
        await self.request(
            McumgrCommand.LOCK, lambda s: LockWriteRequest(serial=serial, sequence=s), LockWriteResponse
        )


def _slots(rsp: ImageStatesReadResponse) -> list[ImageSlot]:
    slots = []
    for entry in rsp.images:
        if entry.hash is None or len(entry.hash) != SHA256_BYTES:
            raise ProtocolViolationError(f"image state: slot {entry.slot} has no 32-byte hash")
        slots.append(
            ImageSlot(
                image=entry.image or 0,
                slot=entry.slot,
                version=entry.version,
                hash=bytes(entry.hash),
                bootable=bool(entry.bootable),
                pending=bool(entry.pending),
                confirmed=bool(entry.confirmed),
                active=bool(entry.active),
                permanent=bool(entry.permanent),
            )
        )
    return slots


def _raise_error(command: McumgrCommand, body: dict[str, Any]) -> None:
    """Raise the typed error an SMP v2 ``err`` or v1 ``rc`` names; nothing on success."""
    err = body.get("err")
    if err is not None:
        if (
            not isinstance(err, dict)
            or not isinstance(err.get("rc"), int)
            or not isinstance(err.get("group"), int)
        ):
            raise ProtocolViolationError(f"{command.name}: malformed SMP v2 err {err!r}")
        group, rc = err["group"], err["rc"]
        if rc == 0:
            return
        if group == PROVISIONING_GROUP:
            _raise_prov(command, ProvError(rc), rc)
        if group == smpheader.GroupId.IMAGE_MANAGEMENT:
            name = IMG_MGMT_ERR(rc).name if rc in IMG_MGMT_ERR._value2member_map_ else str(rc)
            raise FirmwareRejectedError(f"{command.name} refused by the board's image manager: {name}", rc)
        raise BoardStatusError(f"{command.name} refused by the board: group {group} rc {rc}", rc)
    rc = body.get("rc")
    if rc is None or rc == 0:
        return
    if not isinstance(rc, int):
        raise ProtocolViolationError(f"{command.name}: SMP rc {rc!r} is not an integer")
    try:
        mgmt = MGMT_ERR(rc)
    except ValueError:
        raise BoardStatusError(
            f"{command.name} refused by the board: rc {rc} {body.get('rsn', '')}", rc
        ) from None
    if mgmt is MGMT_ERR.ENOTSUP and command.group == PROVISIONING_GROUP:
        raise SmpNotSupportedError(f"{command.name}: the board's firmware does not implement it", rc)
    message = f"{command.name} refused by the board: {mgmt.name}" + (
        f" ({body['rsn']})" if "rsn" in body else ""
    )
    if mgmt is MGMT_ERR.EBUSY:
        raise BoardBusyError(message, rc)
    if command is McumgrCommand.IMAGE_UPLOAD or (
        command is McumgrCommand.IMAGE_STATE and mgmt is not MGMT_ERR.ENOTSUP
    ):
        raise FirmwareRejectedError(message, rc)
    raise BoardStatusError(message, rc, transient=mgmt in TRANSIENT_MGMT_ERRORS)


def _raise_prov(command: McumgrCommand, error: ProvError, rc: int) -> None:
    message = f"{command.name} refused by the board: {error.name}"
    if error is ProvError.SE_BUSY:
        raise BoardBusyError(message, rc)
    if error is ProvError.LOCKED:
        raise BoardLockedError(message, rc)
    if error is ProvError.NO_KEY:
        raise SmpNoKeyError(message, rc)
    raise BoardStatusError(message, rc, transient=error in TRANSIENT_PROV_ERRORS)
