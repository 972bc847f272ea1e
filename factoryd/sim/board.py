"""The simulated board: provisioning firmware + bootloader + secure element, on the production codec.

``SimBoard`` holds what survives a power cycle (secure element, bootloader slots) and turns
request frames into reply frames. It does no I/O: ``factoryd.sim.pty`` puts it behind a real
pseudo-terminal. Faults are drawn from a seeded RNG so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import random
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factoryd.errors import ProtocolViolationError
from factoryd.pki.attestation import statement_bytes
from factoryd.protocol.messages import (
    HOST_PROTOCOL_VERSION,
    MAX_FW_CHUNK,
    MAX_OBJECT,
    PIPELINE_REVISION,
    READBACK_REVISION,
    REQUEST_TYPES,
    AttestedKeyReply,
    BoardInfo,
    Command,
    CsrReply,
    DataReply,
    DigestReply,
    FwBegin,
    FwChunk,
    FwEnd,
    GenKey,
    GenKeyAttested,
    GetCsr,
    Hello,
    Lock,
    LockReply,
    ObjectId,
    PublicKeyReply,
    Read,
    Reboot,
    Request,
    Sign,
    SignatureReply,
    Status,
    Write,
)
from factoryd.sim.bootloader import BootRefusal, SimBootloader
from factoryd.sim.secure_element import (
    SeRefusal,
    SimSecureElement,
    SimVendorCa,
    attestation_certificate,
    make_csr,
    new_se_serial,
)
from factoryd.transport.framing import Frame, FrameKind

DEFAULT_MODEL = "factoryd-sim-m0"
FACTORY_FW_VERSION = "1.0.0-factory"
# What a board that left the board maker runs: a fixed placeholder image.
FACTORY_FW_IMAGE = b"factoryd-sim provisioning firmware " + FACTORY_FW_VERSION.encode()
# Lateness of a wake-up still treated as part of the same chain of delays (event-loop timer jitter).
TIMER_SLACK_S = 0.002
# A fault armed for a power-on period fires at one of this many first opportunities.
FAULT_WINDOW = 4


class Fault(StrEnum):
    """Fault kinds the simulator can inject."""

    CORRUPT_BYTE = "corrupt_byte"  # flip one byte of a reply on the wire
    DROP_REPLY = "drop_reply"  # say nothing (the host resends; the reply cache answers)
    HANG = "hang"  # stop answering until the next power cycle
    RESET_MID_WRITE = "reset_mid_write"  # reboot during WRITE without storing
    WRONG_CN = "wrong_cn"  # CSR for another subject
    BAD_CSR_SIGNATURE = "bad_csr_signature"  # CSR whose signature does not verify
    WEAK_KEY = "weak_key"  # CSR with a non-P-256 key
    OVERSIZE_FRAME = "oversize_frame"  # a run of bytes longer than any frame before the reply
    BOOT_GARBAGE = "boot_garbage"  # noise on the line at boot
    READBACK_DIFFERS = "readback_differs"  # the object store keeps something else than it acknowledged


class AttestMode(StrEnum):
    """How the board's firmware answers GENKEY_ATTESTED (hostile modes test the station's checks).

    Whether the part *can* attest is its secure element's (a clone has no attestation key; an expired
    or foreign-vendor certificate is what the SE was provisioned with, ``SimVendorCa.provision``).
    """

    GENUINE = "genuine"  # what the secure element says
    FORGED = "forged"  # a self-signed attestation certificate over a key of the firmware's own
    REPLAY = "replay"  # the first statement it ever made, again (an old nonce and key)
    OTHER_KEY = "other_key"  # a genuine statement about a key other than the one in the slot
    COPIED_CHAIN = "copied_chain"  # the SE's chain, but the statement signed by another key


@dataclass(frozen=True)
class FaultPlan:
    """Probability of each fault kind (0..1); ``seed`` makes a run reproducible.

    By default a probability applies at every opportunity (every reply, every WRITE, ...).
    With ``per_power_on`` it is the chance that a board shows the fault once during one
    power-on period, at one of its first few opportunities: "10 % of boards hang" rather
    than "every command hangs 10 % of the time".
    """

    corrupt_byte: float = 0.0
    drop_reply: float = 0.0
    hang: float = 0.0
    reset_mid_write: float = 0.0
    wrong_cn: float = 0.0
    bad_csr_signature: float = 0.0
    weak_key: float = 0.0
    oversize_frame: float = 0.0
    boot_garbage: float = 0.0
    readback_differs: float = 0.0
    seed: int = 0
    per_power_on: bool = False

    @classmethod
    def uniform(cls, probability: float, *, seed: int = 0, per_power_on: bool = False) -> FaultPlan:
        """Every fault kind at the same probability."""
        p = probability
        return cls(
            corrupt_byte=p, drop_reply=p, hang=p, reset_mid_write=p, wrong_cn=p, bad_csr_signature=p,
            weak_key=p, oversize_frame=p, boot_garbage=p, readback_differs=p,
            seed=seed, per_power_on=per_power_on,
        )  # fmt: skip

    @classmethod
    def only(cls, fault: Fault, probability: float = 1.0, *, seed: int = 0) -> FaultPlan:
        """One fault kind only."""
        changes: dict[str, Any] = {fault.value: probability}
        return replace(cls(seed=seed), **changes)

    def probability(self, fault: Fault) -> float:
        """Probability of one fault kind."""
        value: float = getattr(self, fault.value)
        return value

    def active(self) -> list[Fault]:
        """The fault kinds with a non-zero probability."""
        return [f for f in Fault if self.probability(f) > 0]


NO_FAULTS = FaultPlan()


@dataclass(frozen=True)
class Timing:
    """How long the simulated hardware takes (all zero by default)."""

    # None = no baud-rate limit; otherwise bytes take 10 bits each at this rate.
    baudrate: int | None = None
    boot_s: float = 0.0
    keygen_s: float = 0.0
    csr_s: float = 0.0
    sign_s: float = 0.0
    write_s: float = 0.0
    lock_s: float = 0.0
    fw_chunk_s: float = 0.0
    # USB enumeration after port power-on, before the tty appears (used by the simulated hub).
    enumerate_s: float = 0.0
    # Relative spread of enumeration and boot times between boards and power-ons (0.2 = ±20 %).
    jitter: float = 0.0

    @classmethod
    def realistic(cls) -> Timing:
        """A timing model of a real board.

        115200 baud CDC-ACM bridge; ATECC608 keygen ~115 ms and ECDSA sign ~50 ms (Microchip
        datasheet, plus firmware overhead); data-zone writes ~30 ms per object; bootloader +
        sketch start ~0.5 s; USB enumeration ~1 s after power-on (hub power-good, debounce, reset,
        CDC probe; HUBS.md); enumeration and boot vary by ±20 % between boards and power-ons.
        """
        return cls(
            baudrate=115200,
            boot_s=0.5,
            keygen_s=0.115,
            csr_s=0.06,
            sign_s=0.05,
            write_s=0.03,
            lock_s=0.02,
            fw_chunk_s=0.01,
            enumerate_s=1.0,
            jitter=0.2,
        )

    def scaled(self, factor: float) -> Timing:
        """Every delay multiplied by factor (the baud rate divided)."""
        values = {
            f.name: getattr(self, f.name) * factor
            for f in fields(self)
            if f.name not in ("baudrate", "jitter")
        }
        baud = None if self.baudrate is None or factor == 0 else int(self.baudrate / factor)
        return Timing(baudrate=baud, jitter=self.jitter, **values)


ZERO_TIMING = Timing()


@dataclass
class _FwUpdate:
    size: int
    image: bytearray = field(default_factory=bytearray)


class BoardReset(Exception):  # noqa: N818 - control flow inside the simulator, not an error
    """The board resets now (REBOOT or an injected reset)."""


class BoardHang(Exception):  # noqa: N818 - control flow inside the simulator, not an error
    """The board stops answering until its next power cycle."""


class SimBoard:
    """A board's firmware logic; state survives power cycles, the reply cache does not."""

    def __init__(
        self,
        *,
        firmware_key: ec.EllipticCurvePublicKey | None = None,
        se: SimSecureElement | None = None,
        model: str = DEFAULT_MODEL,
        faults: FaultPlan = NO_FAULTS,
        timing: Timing = ZERO_TIMING,
    ) -> None:
        self.se = se or SimSecureElement()
        self.model = model
        # MCUboot, built with the lot's firmware-signing key; it validates images at FW_END.
        self.bootloader = SimBootloader(firmware_key)
        self.fw_version = FACTORY_FW_VERSION
        self.fw_sha256 = hashlib.sha256(FACTORY_FW_IMAGE).digest()
        self.faults = faults
        self.timing = timing
        # Reproducible fault draws, not cryptography: a seeded PRNG is the point.
        self.rng = random.Random(faults.seed ^ int.from_bytes(self.se.serial, "big"))  # noqa: S311
        self.injected: dict[Fault, int] = {}
        self.commands_handled = 0
        # Modelled physical time this board has taken (enumeration, boot, crypto, wire), in seconds.
        self.physical_s = 0.0
        self._due = 0.0
        # Order in which the simulated operator fed this board in (0 = not fed by a hub).
        self.sequence = 0
        # Hostile behaviours (tests of the station's defences), all off by default:
        # report another board's serial; answer GET_CSR with a CSR of an earlier key; spray this
        # many bytes of frame-like garbage before every reply.
        self.claimed_serial: bytes | None = None
        # A board fresh from the board maker: no provisioning firmware yet, so it ignores frames
        # until an external tool flashes it (see FLASH_MAGIC in factoryd.sim.pty).
        self.blank = False
        self.replay_csr = False
        self.flood_bytes = 0
        # The protocol revision the firmware implements (HELLO's version): 1 is older firmware whose
        # WRITE digest is over the received bytes and whose LOCK reply is empty; 2 reads back itself;
        # 3 (the latest) also takes requests back to back (docs/protocol.md §4.3).
        self.revision = PIPELINE_REVISION
        # The most requests that were queued in the board's receive path at once (PtyBoard counts).
        self.max_queued_requests = 0
        self.attest_mode = AttestMode.GENUINE
        self._first_attestation: bytes | None = None
        self._first_csr: dict[int, bytes] = {}
        self._timing_rng = random.Random(self.rng.random())  # noqa: S311 - simulation timing
        self._fw: _FwUpdate | None = None
        self._armed: dict[Fault, int] = {}
        self._last_reply: tuple[int, int, Frame] | None = None

    @property
    def firmware_key(self) -> ec.EllipticCurvePublicKey | None:
        """The image-signing key the board's bootloader was built with."""
        key = self.bootloader.key
        return key if isinstance(key, ec.EllipticCurvePublicKey) else None

    async def spend(self, seconds: float) -> None:
        """Take a modelled amount of physical time (and count it: the benchmarks' limit model).

        Back-to-back delays are scheduled against a running deadline, so the event loop's timer
        granularity (~1 ms per sleep) does not add up over the dozens of delays of one command.
        """
        if seconds <= 0:
            return
        self.physical_s += seconds
        now = asyncio.get_running_loop().time()
        # Continuing a chain of delays: schedule from where the last one should have ended.
        start = self._due if 0 <= now - self._due < TIMER_SLACK_S else now
        self._due = start + seconds
        await asyncio.sleep(max(0.0, self._due - now))

    def jittered(self, seconds: float) -> float:
        """A nominal delay varied by the timing model's jitter (its own RNG: faults stay reproducible)."""
        spread = self.timing.jitter
        return seconds * (1 + self._timing_rng.uniform(-spread, spread)) if spread else seconds

    def wire_s(self, nbytes: int) -> float:
        """Seconds nbytes take on the serial line (0 without a baud-rate limit)."""
        baud = self.timing.baudrate
        return nbytes * 10 / baud if baud else 0.0

    @property
    def serial_hex(self) -> str:
        """The secure-element serial as the ledger stores it."""
        return self.se.serial.hex()

    def info(self) -> BoardInfo:
        """What HELLO and BOOT report."""
        return BoardInfo(
            version=self.revision,
            model=self.model,
            fw_version=self.fw_version,
            fw_sha256=self.fw_sha256,
            se_serial=self.claimed_serial or self.se.serial,
            locked=self.se.locked,
            objects=frozenset(self.se.objects),
            key_slots=frozenset(s for s in range(2) if self.se.has_key(s)),
        )

    def fault(self, kind: Fault) -> bool:
        """Draw whether a fault happens at this opportunity, and count it."""
        if self.faults.per_power_on:
            countdown = self._armed.get(kind)
            if countdown is None:
                return False
            if countdown > 0:
                self._armed[kind] = countdown - 1
                return False
            del self._armed[kind]
        else:
            p = self.faults.probability(kind)
            if p <= 0 or self.rng.random() >= p:
                return False
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return True

    def power_on(self) -> None:
        """Reset volatile state (reply cache, unfinished firmware update); arm this period's faults."""
        self._last_reply = None
        self._fw = None
        if self.faults.per_power_on:
            self._armed = {
                kind: self.rng.randrange(FAULT_WINDOW)
                for kind in Fault
                if self.rng.random() < self.faults.probability(kind)
            }

    def boot_frame(self) -> Frame:
        """The BOOT event the board sends after reset."""
        return Frame(FrameKind.EVENT, 0, Command.BOOT, 0, self.info().encode())

    def nack_frame(self) -> Frame:
        """What the board sends after an undecodable frame."""
        seq = self._last_reply[0] if self._last_reply else 0
        return Frame(FrameKind.NACK, seq, 0, 0, b"")

    async def handle(self, frame: Frame) -> Frame | None:
        """Answer one frame; None for frames that get no answer.

        Raises BoardReset or BoardHang for the transport to act on.
        """
        if frame.kind is not FrameKind.REQUEST:
            return None
        cached = self._last_reply
        if cached is not None and cached[0] == frame.seq and cached[1] == frame.command:
            return cached[2]  # a resend: answer again without running the command twice
        self.commands_handled += 1
        if self.fault(Fault.HANG):
            raise BoardHang
        request: Request | None = None
        try:
            command = Command(frame.command)
            request = REQUEST_TYPES[command].decode(frame.payload)
        except (ValueError, KeyError):
            reply = self._reply(frame, Status.UNKNOWN_COMMAND)
        except ProtocolViolationError:
            reply = self._reply(frame, Status.BAD_ARGUMENT)
        else:
            try:
                status, payload = await self._execute(request)
            except SeRefusal as refusal:
                status, payload = Status[refusal.status], b""
            reply = self._reply(frame, status, payload)
        self._last_reply = (frame.seq, frame.command, reply)
        if isinstance(request, Reboot):
            raise BoardReset(reply)
        return reply

    @staticmethod
    def _reply(frame: Frame, status: Status, payload: bytes = b"") -> Frame:
        return Frame(FrameKind.RESPONSE, frame.seq, frame.command, status, payload)

    async def _execute(self, request: Request) -> tuple[Status, bytes]:
        match request:
            case Hello(host_version=v):
                if v != HOST_PROTOCOL_VERSION:
                    return Status.VERSION, b""
                return Status.OK, self.info().encode()
            case GenKey(slot=slot):
                await self.spend(self.timing.keygen_s)
                return Status.OK, PublicKeyReply(self.se.genkey(slot)).encode()
            case GenKeyAttested(slot=slot, nonce=nonce):
                # Key generation, then one signature by the attestation key.
                await self.spend(self.timing.keygen_s + self.timing.sign_s)
                return Status.OK, self._attest(slot, nonce)
            case GetCsr(slot=slot, common_name=cn):
                await self.spend(self.timing.csr_s)
                return Status.OK, CsrReply(self._csr(slot, cn)).encode()
            case Write(obj=obj, data=data):
                return await self._write(obj, data)
            case Read(obj=obj):
                return Status.OK, DataReply(self.se.objects.get(obj, b"")).encode()
            case Sign(slot=slot, challenge=challenge):
                await self.spend(self.timing.sign_s)
                return Status.OK, SignatureReply(self.se.sign(slot, challenge)).encode()
            case Lock():
                await self.spend(self.timing.lock_s)
                self.se.lock()
                if self.revision < READBACK_REVISION:
                    return Status.OK, b""
                return Status.OK, LockReply(self.se.locked).encode()
            case Reboot():
                return Status.OK, b""
            case FwBegin() | FwChunk() | FwEnd():
                return await self._firmware(request)

    def _attest(self, slot: int, nonce: bytes) -> bytes:
        se, mode = self.se, self.attest_mode
        if mode is AttestMode.REPLAY:
            if self._first_attestation is None:
                # A statement recorded earlier (another station, another day): an old nonce.
                old_nonce = self.rng.randbytes(len(nonce))
                point, signature = se.attest(slot, old_nonce)
                self._first_attestation = AttestedKeyReply(
                    old_nonce, point, signature, se.attestation_chain
                ).encode()
            return self._first_attestation
        point, signature = se.attest(slot, nonce)
        chain = se.attestation_chain
        if mode is AttestMode.FORGED:
            key = ec.generate_private_key(ec.SECP256R1())
            now = dt.datetime.now(dt.UTC)
            cert = attestation_certificate(
                se.serial_text,
                key.public_key(),
                None,
                key,
                not_before=now - dt.timedelta(days=1),
                not_after=now + dt.timedelta(days=9),
            )
            chain = (cert.public_bytes(serialization.Encoding.DER),)
            signature = key.sign(
                statement_bytes(slot, nonce, se.serial_text, point), ec.ECDSA(hashes.SHA256())
            )
        elif mode is AttestMode.OTHER_KEY and se.attestation_key is not None:
            point = (
                ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            )
            message = statement_bytes(slot, nonce, se.serial_text, point)
            signature = se.attestation_key.sign(message, ec.ECDSA(hashes.SHA256()))
        elif mode is AttestMode.COPIED_CHAIN:
            other = ec.generate_private_key(ec.SECP256R1())
            signature = other.sign(
                statement_bytes(slot, nonce, se.serial_text, point), ec.ECDSA(hashes.SHA256())
            )
        return AttestedKeyReply(nonce, point, signature, chain).encode()

    def _csr(self, slot: int, common_name: str) -> bytes:
        if not self.se.has_key(slot):
            raise SeRefusal("NO_KEY")
        if self.fault(Fault.WRONG_CN):
            return self.se.csr(slot, common_name[::-1])
        if self.fault(Fault.WEAK_KEY):
            # The fault is a weak key on purpose: the station must refuse it.
            weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
            return make_csr(weak, common_name)
        csr = self.se.csr(slot, common_name)
        first = self._first_csr.setdefault(slot, csr)
        if self.replay_csr:
            return first
        if self.fault(Fault.BAD_CSR_SIGNATURE):
            # The DER signature ends the CSR: flipping its last byte keeps it parseable but invalid.
            csr = csr[:-1] + bytes([csr[-1] ^ 0x01])
        return csr

    async def _write(self, obj: ObjectId, data: bytes) -> tuple[Status, bytes]:
        if len(data) > MAX_OBJECT:
            return Status.TOO_LARGE, b""
        await self.spend(self.timing.write_s)
        if self.fault(Fault.RESET_MID_WRITE):
            raise BoardReset(None)
        digest = self.se.store(obj, data)
        if self.fault(Fault.READBACK_DIFFERS) and data:
            self.se.objects[obj] = data[:-1] + bytes([data[-1] ^ 0x55])
        if self.revision >= READBACK_REVISION:
            # Revision 2: the digest of what the store gives back, so a bad store shows in the reply.
            digest = hashlib.sha256(self.se.objects.get(obj, b"")).digest()
        return Status.OK, DigestReply(digest).encode()

    async def _firmware(self, request: FwBegin | FwChunk | FwEnd) -> tuple[Status, bytes]:
        if isinstance(request, FwBegin):
            if request.size + self.bootloader.trailer_bytes > self.bootloader.slot_bytes or request.size == 0:
                return Status.TOO_LARGE, b""
            self._fw = _FwUpdate(request.size)  # the version is in the image header
            return Status.OK, b""
        fw = self._fw
        if fw is None:
            return Status.FW_STATE, b""
        if isinstance(request, FwChunk):
            if request.offset != len(fw.image) or len(request.data) > MAX_FW_CHUNK:
                return Status.FW_STATE, b""
            if len(fw.image) + len(request.data) > fw.size:
                return Status.FW_STATE, b""
            await self.spend(self.timing.fw_chunk_s)
            fw.image += request.data
            return Status.OK, b""
        self._fw = None
        if len(fw.image) != fw.size:
            return Status.FW_STATE, b""
        # FW_END's 64-byte field is reserved: the signature is inside the MCUboot image.
        try:
            image = self.bootloader.install(bytes(fw.image))
        except BootRefusal:
            return Status.FW_SIGNATURE, b""
        self.fw_version = image.version
        self.fw_sha256 = bytes.fromhex(image.hash)  # the SHA256 TLV, as MCUboot and SMP report it
        return Status.OK, DigestReply(self.fw_sha256).encode()


class Impostor(StrEnum):
    """Boards that are not genuine parts, each caught by its own check of ``pki/attestation.py``."""

    CLONE = "clone"  # copies a genuine board's serial, has no attestation key
    FORGED = "forged"  # a self-signed attestation certificate
    REPLAY = "replay"  # replays a statement made for an old nonce
    OTHER_KEY = "other_key"  # attests a key other than the one its slot holds
    COPIED_CHAIN = "copied_chain"  # a genuine part's chain, its own signing key
    EXPIRED = "expired"  # a genuine part whose attestation certificate has expired
    FOREIGN_VENDOR = "foreign_vendor"  # a genuine part of a vendor the lot does not trust
    WRONG_SERIAL = "wrong_serial"  # a genuine part that reports another serial than its certificate's


# The reason each impostor is refused with (tests and the demo check it).
IMPOSTOR_REASONS: dict[Impostor, str] = {
    Impostor.CLONE: "attestation_missing",
    Impostor.FORGED: "attestation_chain",
    Impostor.REPLAY: "attestation_nonce",
    Impostor.OTHER_KEY: "attestation_key",
    Impostor.COPIED_CHAIN: "attestation_signature",
    Impostor.EXPIRED: "attestation_expired",
    Impostor.FOREIGN_VENDOR: "attestation_chain",
    Impostor.WRONG_SERIAL: "attestation_serial",
}


def equip_attestation(
    board: SimBoard,
    vendor: SimVendorCa,
    impostor: Impostor | None = None,
    *,
    foreign: SimVendorCa | None = None,
    copied_serial: bytes | None = None,
) -> SimBoard:
    """Give a board the attestation its kind has: a genuine part's from ``vendor``, or an impostor's."""
    se = board.se
    if impostor is Impostor.CLONE:
        # No attestation key at all; it reports a genuine board's serial when given one.
        board.claimed_serial = copied_serial
        return board
    if impostor is Impostor.FOREIGN_VENDOR:
        (foreign or SimVendorCa.make("factoryd Other SE Vendor")).provision(se)
        return board
    vendor.provision(se, expired=impostor is Impostor.EXPIRED)
    modes = {
        Impostor.FORGED: AttestMode.FORGED,
        Impostor.REPLAY: AttestMode.REPLAY,
        Impostor.OTHER_KEY: AttestMode.OTHER_KEY,
        Impostor.COPIED_CHAIN: AttestMode.COPIED_CHAIN,
    }
    if impostor in modes:
        board.attest_mode = modes[impostor]
    if impostor is Impostor.WRONG_SERIAL:
        board.claimed_serial = copied_serial or new_se_serial()
    return board
