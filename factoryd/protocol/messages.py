"""Typed messages of the native board protocol (payload layouts of docs/protocol.md §4).

Frozen dataclasses, one per request and reply, each with ``encode()`` and a ``decode()``
classmethod that consumes the payload exactly. Decoding raises ProtocolViolationError naming
the field; unknown status codes map to Status.INTERNAL instead of crashing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Protocol, Self, TypeVar

from factoryd.errors import ProtocolViolationError

HOST_PROTOCOL_VERSION = 1
# The board's protocol revision, the `version` of its HELLO reply (docs/protocol.md §7). From
# revision 2 a WRITE reply's digest is computed over the object as read back from the store, and a
# LOCK reply carries the lock state read back from the secure element: the host then needs no READ
# of what it wrote and no HELLO after LOCK. Revision 1 firmware keeps both round trips.
READBACK_REVISION = 2
# From revision 3 the firmware takes requests sent back to back without waiting for each reply: its
# receive path queues them and it answers each in the order received (docs/protocol.md §4.3). The
# host then sends the four WRITEs and the challenge's SIGN in one burst: 5 round trips become 1.
PIPELINE_REVISION = 3
SHA256_LEN = 32
RAW_SIGNATURE_LEN = 64
P256_POINT_LEN = 65
MAX_OBJECT = 4000
MAX_FW_CHUNK = 2048
MAX_CHALLENGE = 64
IDENTITY_SLOT = 0
# GENKEY_ATTESTED: the station's nonce, and the most certificates an attestation chain may carry.
ATTEST_NONCE_LEN = 32
MAX_ATTEST_CHAIN = 4


class Command(IntEnum):
    """Command ids (docs/protocol.md §4)."""

    HELLO = 0x01
    GENKEY = 0x02
    GET_CSR = 0x03
    WRITE = 0x04
    READ = 0x05
    SIGN = 0x06
    LOCK = 0x07
    REBOOT = 0x08
    GENKEY_ATTESTED = 0x09
    FW_BEGIN = 0x10
    FW_CHUNK = 0x11
    FW_END = 0x12
    BOOT = 0x80


class Status(IntEnum):
    """Response status codes (docs/protocol.md §3)."""

    OK = 0
    BUSY = 1
    UNKNOWN_COMMAND = 2
    BAD_ARGUMENT = 3
    NO_KEY = 4
    LOCKED = 5
    STORAGE = 6
    FW_SIGNATURE = 7
    FW_STATE = 8
    TOO_LARGE = 9
    INTERNAL = 10
    VERSION = 11

    @classmethod
    def _missing_(cls, value: object) -> Status:
        # A newer board may send a code we do not know: treat it as a firmware fault.
        return cls.INTERNAL


class ObjectId(IntEnum):
    """Storage objects on the board."""

    DEVICE_ID = 1
    DEVICE_CERT = 2
    CA_CHAIN = 3
    ENDPOINT = 4
    # Matter factory data (docs/matter.md): the PAI (DER), the Certification Declaration (DER) and
    # the commissioning data (Matter TLV: discriminator, SPAKE2+ iterations, salt, verifier,
    # rotating-device-ID unique ID; never the passcode). The DAC is DEVICE_CERT.
    MATTER_PAI = 5
    MATTER_CD = 6
    MATTER_COMMISSIONING = 7


class Reader:
    """Bounds-checked cursor over a payload."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int, field: str) -> bytes:
        """Return the next n bytes or fail naming the field."""
        if self._pos + n > len(self._data):
            raise ProtocolViolationError(
                f"{self._what}: truncated at field {field!r} (need {n} bytes at offset {self._pos}, "
                f"payload has {len(self._data)})"
            )
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self, field: str) -> int:
        """Read an unsigned byte."""
        return self.take(1, field)[0]

    def u32(self, field: str) -> int:
        """Read a big-endian u32."""
        value: int = struct.unpack(">I", self.take(4, field))[0]
        return value

    def str8(self, field: str) -> str:
        """Read a u8-length-prefixed UTF-8 string."""
        raw = self.take(self.u8(field), field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolationError(f"{self._what}: field {field!r} is not UTF-8") from exc

    def bytes16(self, field: str) -> bytes:
        """Read u16-length-prefixed bytes."""
        (length,) = struct.unpack(">H", self.take(2, field))
        return self.take(length, field)

    def end(self) -> None:
        """Fail if bytes are left over."""
        if self._pos != len(self._data):
            raise ProtocolViolationError(
                f"{self._what}: {len(self._data) - self._pos} trailing bytes after the last field"
            )


def str8(value: str) -> bytes:
    """Encode a u8-length-prefixed UTF-8 string."""
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"string of {len(raw)} bytes does not fit a str8 field")
    return bytes([len(raw)]) + raw


def bytes16(value: bytes) -> bytes:
    """Encode u16-length-prefixed bytes."""
    if len(value) > 0xFFFF:
        raise ValueError(f"{len(value)} bytes do not fit a bytes16 field")
    return struct.pack(">H", len(value)) + value


def _bits(values: frozenset[int]) -> int:
    mask = 0
    for v in values:
        mask |= 1 << v
    return mask


def _unbits(mask: int) -> frozenset[int]:
    return frozenset(i for i in range(8) if mask & (1 << i))


# Replies --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BoardInfo:
    """HELLO reply (and BOOT event payload): who the board is and what it holds."""

    version: int
    model: str
    fw_version: str
    fw_sha256: bytes
    se_serial: bytes
    locked: bool
    objects: frozenset[ObjectId]
    key_slots: frozenset[int]

    @property
    def serial_hex(self) -> str:
        """The secure-element serial as lowercase hex (the ledger's hw_serial)."""
        return self.se_serial.hex()

    def encode(self) -> bytes:
        """Return the reply payload."""
        return (
            bytes([self.version])
            + str8(self.model)
            + str8(self.fw_version)
            + _fixed(self.fw_sha256, SHA256_LEN, "fw_sha256")
            + bytes16(self.se_serial)
            + bytes([int(self.locked), _bits(frozenset(int(o) for o in self.objects)), _bits(self.key_slots)])
        )

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        r = Reader(payload, "HELLO reply")
        version = r.u8("version")
        model = r.str8("model")
        fw_version = r.str8("fw_version")
        fw_sha256 = r.take(SHA256_LEN, "fw_sha256")
        se_serial = r.bytes16("se_serial")
        locked = r.u8("locked")
        objects = r.u8("objects")
        slots = r.u8("key_slots")
        r.end()
        if not se_serial:
            raise ProtocolViolationError("HELLO reply: empty secure-element serial")
        if locked not in (0, 1):
            raise ProtocolViolationError(f"HELLO reply: locked flag {locked} is neither 0 nor 1")
        known = {int(o) for o in ObjectId}
        return cls(
            version,
            model,
            fw_version,
            fw_sha256,
            se_serial,
            bool(locked),
            frozenset(ObjectId(o) for o in _unbits(objects) if o in known),
            _unbits(slots),
        )


@dataclass(frozen=True, slots=True)
class PublicKeyReply:
    """GENKEY reply."""

    public_key: bytes

    def encode(self) -> bytes:
        """Return the reply payload."""
        return bytes16(self.public_key)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        r = Reader(payload, "GENKEY reply")
        msg = cls(r.bytes16("public_key"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class CsrReply:
    """GET_CSR reply."""

    csr_der: bytes

    def encode(self) -> bytes:
        """Return the reply payload."""
        return bytes16(self.csr_der)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        r = Reader(payload, "GET_CSR reply")
        msg = cls(r.bytes16("csr"))
        r.end()
        if not msg.csr_der:
            raise ProtocolViolationError("GET_CSR reply: empty CSR")
        return msg


@dataclass(frozen=True, slots=True)
class DigestReply:
    """WRITE and FW_END reply: SHA-256 of what the board stored."""

    sha256: bytes

    def encode(self) -> bytes:
        """Return the reply payload."""
        return _fixed(self.sha256, SHA256_LEN, "sha256")

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        r = Reader(payload, "digest reply")
        msg = cls(r.take(SHA256_LEN, "sha256"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class DataReply:
    """READ reply."""

    data: bytes

    def encode(self) -> bytes:
        """Return the reply payload."""
        return bytes16(self.data)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        r = Reader(payload, "READ reply")
        msg = cls(r.bytes16("data"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class SignatureReply:
    """SIGN reply: raw r||s."""

    signature: bytes

    def encode(self) -> bytes:
        """Return the reply payload."""
        return _fixed(self.signature, RAW_SIGNATURE_LEN, "signature")

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        r = Reader(payload, "SIGN reply")
        msg = cls(r.take(RAW_SIGNATURE_LEN, "signature"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class AttestedKeyReply:
    """GENKEY_ATTESTED reply: the new key and the secure element's statement about it (§4.10)."""

    nonce: bytes
    public_key: bytes
    signature: bytes
    chain: tuple[bytes, ...]  # attestation certificate chain, DER, leaf first

    def encode(self) -> bytes:
        """Return the reply payload."""
        if not 1 <= len(self.chain) <= MAX_ATTEST_CHAIN:
            raise ValueError(f"attestation chain of {len(self.chain)} certificates")
        return (
            _fixed(self.nonce, ATTEST_NONCE_LEN, "nonce")
            + bytes16(self.public_key)
            + bytes16(self.signature)
            + bytes([len(self.chain)])
            + b"".join(bytes16(c) for c in self.chain)
        )

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        r = Reader(payload, "GENKEY_ATTESTED reply")
        nonce = r.take(ATTEST_NONCE_LEN, "nonce")
        public_key = r.bytes16("public_key")
        signature = r.bytes16("signature")
        count = r.u8("chain_count")
        if not 1 <= count <= MAX_ATTEST_CHAIN:
            raise ProtocolViolationError(f"GENKEY_ATTESTED reply: chain of {count} certificates")
        chain = tuple(r.bytes16(f"chain[{i}]") for i in range(count))
        r.end()
        if len(public_key) != P256_POINT_LEN or not signature or not all(chain):
            raise ProtocolViolationError("GENKEY_ATTESTED reply: empty or malformed field")
        return cls(nonce, public_key, signature, chain)


@dataclass(frozen=True, slots=True)
class LockReply:
    """LOCK reply: empty from revision 1 firmware; from revision 2 ``locked u8`` read back after locking."""

    locked: bool | None = None

    def encode(self) -> bytes:
        """Return the reply payload."""
        return b"" if self.locked is None else bytes([int(self.locked)])

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        if not payload:
            return cls(None)
        r = Reader(payload, "LOCK reply")
        locked = r.u8("locked")
        r.end()
        if locked not in (0, 1):
            raise ProtocolViolationError(f"LOCK reply: locked flag {locked} is neither 0 nor 1")
        return cls(bool(locked))


@dataclass(frozen=True, slots=True)
class EmptyReply:
    """The reply of REBOOT, FW_BEGIN and FW_CHUNK: no payload."""

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload (which must be empty)."""
        Reader(payload, "empty reply").end()
        return cls()


class Reply(Protocol):
    """A reply message: decoded from a payload."""

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a reply payload."""
        ...


R_co = TypeVar("R_co", bound=Reply, covariant=True)


class RequestFor(Protocol[R_co]):
    """A request that names its reply type (zigpy-znp's ``Req.Rsp``): ``client.request(req) -> reply``."""

    @property
    def command(self) -> Command:
        """The command id."""
        ...

    @property
    def reply(self) -> type[R_co]:
        """The reply message type."""
        ...

    def encode(self) -> bytes:
        """The request payload."""
        ...


# Requests -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Ask the board who it is."""

    command: ClassVar[Command] = Command.HELLO
    reply: ClassVar[type[BoardInfo]] = BoardInfo
    host_version: int = HOST_PROTOCOL_VERSION

    def encode(self) -> bytes:
        """Return the request payload."""
        return bytes([self.host_version])

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "HELLO request")
        msg = cls(r.u8("host_version"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class GenKey:
    """Generate a new key pair inside the secure element."""

    command: ClassVar[Command] = Command.GENKEY
    reply: ClassVar[type[PublicKeyReply]] = PublicKeyReply
    slot: int = IDENTITY_SLOT

    def encode(self) -> bytes:
        """Return the request payload."""
        return bytes([self.slot])

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "GENKEY request")
        msg = cls(r.u8("slot"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class GenKeyAttested:
    """Generate a new key pair and have the secure element attest it, over the station's nonce."""

    command: ClassVar[Command] = Command.GENKEY_ATTESTED
    reply: ClassVar[type[AttestedKeyReply]] = AttestedKeyReply
    slot: int
    nonce: bytes

    def encode(self) -> bytes:
        """Return the request payload."""
        return bytes([self.slot]) + _fixed(self.nonce, ATTEST_NONCE_LEN, "nonce")

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "GENKEY_ATTESTED request")
        msg = cls(r.u8("slot"), r.take(ATTEST_NONCE_LEN, "nonce"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class GetCsr:
    """Ask for a CSR signed by a slot key with the given subject CN."""

    command: ClassVar[Command] = Command.GET_CSR
    reply: ClassVar[type[CsrReply]] = CsrReply
    slot: int
    common_name: str

    def encode(self) -> bytes:
        """Return the request payload."""
        return bytes([self.slot]) + str8(self.common_name)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "GET_CSR request")
        msg = cls(r.u8("slot"), r.str8("common_name"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class Write:
    """Store an object on the board."""

    command: ClassVar[Command] = Command.WRITE
    reply: ClassVar[type[DigestReply]] = DigestReply
    obj: ObjectId
    data: bytes

    def encode(self) -> bytes:
        """Return the request payload."""
        return bytes([self.obj]) + bytes16(self.data)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "WRITE request")
        msg = cls(_object_id(r.u8("object")), r.bytes16("data"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class Read:
    """Read an object back."""

    command: ClassVar[Command] = Command.READ
    reply: ClassVar[type[DataReply]] = DataReply
    obj: ObjectId

    def encode(self) -> bytes:
        """Return the request payload."""
        return bytes([self.obj])

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "READ request")
        msg = cls(_object_id(r.u8("object")))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class Sign:
    """Sign a challenge with a slot key."""

    command: ClassVar[Command] = Command.SIGN
    reply: ClassVar[type[SignatureReply]] = SignatureReply
    slot: int
    challenge: bytes

    def encode(self) -> bytes:
        """Return the request payload."""
        return bytes([self.slot]) + bytes16(self.challenge)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "SIGN request")
        msg = cls(r.u8("slot"), r.bytes16("challenge"))
        r.end()
        if not 1 <= len(msg.challenge) <= MAX_CHALLENGE:
            raise ProtocolViolationError(f"SIGN request: challenge of {len(msg.challenge)} bytes")
        return msg


@dataclass(frozen=True, slots=True)
class Lock:
    """Lock the secure element irreversibly."""

    command: ClassVar[Command] = Command.LOCK
    reply: ClassVar[type[LockReply]] = LockReply

    def encode(self) -> bytes:
        """Return the request payload."""
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        Reader(payload, "LOCK request").end()
        return cls()


@dataclass(frozen=True, slots=True)
class Reboot:
    """Reset the board."""

    command: ClassVar[Command] = Command.REBOOT
    reply: ClassVar[type[EmptyReply]] = EmptyReply

    def encode(self) -> bytes:
        """Return the request payload."""
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        Reader(payload, "REBOOT request").end()
        return cls()


@dataclass(frozen=True, slots=True)
class FwBegin:
    """Start a firmware update."""

    command: ClassVar[Command] = Command.FW_BEGIN
    reply: ClassVar[type[EmptyReply]] = EmptyReply
    size: int
    version: str

    def encode(self) -> bytes:
        """Return the request payload."""
        return struct.pack(">I", self.size) + str8(self.version)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "FW_BEGIN request")
        msg = cls(r.u32("size"), r.str8("version"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class FwChunk:
    """One piece of a firmware image."""

    command: ClassVar[Command] = Command.FW_CHUNK
    reply: ClassVar[type[EmptyReply]] = EmptyReply
    offset: int
    data: bytes

    def encode(self) -> bytes:
        """Return the request payload."""
        return struct.pack(">I", self.offset) + bytes16(self.data)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "FW_CHUNK request")
        msg = cls(r.u32("offset"), r.bytes16("data"))
        r.end()
        return msg


@dataclass(frozen=True, slots=True)
class FwEnd:
    """Finish a firmware update with the image signature."""

    command: ClassVar[Command] = Command.FW_END
    reply: ClassVar[type[DigestReply]] = DigestReply
    signature: bytes

    def encode(self) -> bytes:
        """Return the request payload."""
        return _fixed(self.signature, RAW_SIGNATURE_LEN, "signature")

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a request payload."""
        r = Reader(payload, "FW_END request")
        msg = cls(r.take(RAW_SIGNATURE_LEN, "signature"))
        r.end()
        return msg


Request = (
    Hello | GenKey | GenKeyAttested | GetCsr | Write | Read | Sign | Lock | Reboot | FwBegin | FwChunk | FwEnd
)

REQUEST_TYPES: dict[Command, type[Request]] = {
    t.command: t
    for t in (Hello, GenKey, GenKeyAttested, GetCsr, Write, Read, Sign, Lock, Reboot, FwBegin, FwChunk, FwEnd)
}


def _fixed(value: bytes, length: int, field: str) -> bytes:
    if len(value) != length:
        raise ValueError(f"{field} must be {length} bytes, got {len(value)}")
    return value


def _object_id(value: int) -> ObjectId:
    try:
        return ObjectId(value)
    except ValueError:
        raise ProtocolViolationError(f"unknown object id {value}") from None
