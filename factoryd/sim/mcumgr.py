"""A simulated Zephyr/MCUboot board speaking SMP (MCUmgr) over a serial console, behind a real PTY.

``SimMcumgrBoard`` is the application and its bootloader, on the production codec
(``factoryd.transport.smp_framing``) and the client's message table (``factoryd.protocol.mcumgr``):

- OS group: echo, reset (the reply goes out first), MCUmgr params (``buf_size``/``buf_count``);
- image group as Zephyr's img_mgmt: state read, upload to the secondary slot (offset-driven: a
  chunk at another offset than expected is answered with the expected one; the first chunk's
  ``len``/``sha`` name the upload, and a board holding part of the same image answers with the
  offset to resume from, also after a reset when ``resume_after_reset``), state write test /
  confirm;
- an MCUboot model at every reset: a secondary image marked for test or permanent is verified as
  MCUboot does (``factoryd.mcuboot.verify_image`` with the lot's firmware key, then the hardware
  security counter: lower is refused) and swapped in, else erased; a test image that is not
  confirmed before the next reset is swapped back (revert); a permanent image raises the stored
  security counter. ``crashing_images`` names images whose application never comes up (the
  watchdog resets the board, MCUboot reverts);
- the factoryd provisioning group (docs/protocol-smp.md) on the simulated secure element.

The tty survives a reset, as with a UART bridge (a DK's interface MCU, an FTDI cable); what
arrives while the board reboots is lost. With ``usb_cdc`` the tty is the application's USB CDC ACM
device instead, and a reset closes it: the board comes back on whatever PTY serves it next.
Timing: every byte of the console framing at the baud rate, flash write and erase per KiB, the
swap per KiB, the application's boot. Faults are the
``FaultPlan`` kinds: corrupt byte, dropped reply, hang, reset mid-upload (``reset_mid_write``),
boot log noise, a long log line (``oversize_frame``), and the CSR / read-back faults.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass, field, fields
from typing import Any

import cbor2
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from factoryd.errors import FactorydError
from factoryd.mcuboot import HEADER_BYTES as IMAGE_HEADER_BYTES
from factoryd.mcuboot import IMAGE_MAGIC, TLV_INFO_MAGIC, TLV_PROT_INFO_MAGIC, TlvType
from factoryd.protocol.mcumgr import (
    DEFAULT_BUF_SIZE,
    IMAGE_STATE_WRITE,
    MESSAGES,
    PROVISIONING_GROUP,
    McumgrCommand,
    ProvError,
    command_of,
    decode_body,
)
from factoryd.protocol.messages import AttestedKeyReply, ObjectId
from factoryd.sim.board import (
    NO_FAULTS,
    ZERO_TIMING,
    BoardHang,
    BoardReset,
    Fault,
    FaultPlan,
    SimBoard,
    Timing,
)
from factoryd.sim.bootloader import DEFAULT_SLOT_BYTES, BootRefusal
from factoryd.sim.mcuboot_signer import sign_image
from factoryd.sim.pty import PtyEndpoint
from factoryd.sim.secure_element import SeRefusal, SimSecureElement, make_csr
from factoryd.transport.smp_framing import (
    MAX_LINE_BYTES,
    SmpDecoder,
    SmpOp,
    SmpPacket,
    max_packet_for,
)

log = structlog.get_logger(__name__)

MCUMGR_SIM_MODEL = "zephyr-sim-nrf52840"
FACTORY_IMAGE_VERSION = "1.0.0"
# The image the board maker flashed (signed by its own throwaway key: MCUboot does not re-verify
# the primary slot in this model, as with CONFIG_BOOT_VALIDATE_SLOT0=n).
FACTORY_PAYLOAD = b"zephyr-sim factory application " + bytes(range(256)) * 8
# Zephyr's MCUMGR_TRANSPORT_NETBUF_COUNT default.
DEFAULT_BUF_COUNT = 4
# The largest object the simulated secure element stores.
MAX_OBJECT_BYTES = 4096
KEY_SLOTS = 2
# A read reply beyond its data: 8-byte header, map, "off"/"data"/"len" keys, u32 integers, bstr header.
READ_REPLY_OVERHEAD_BYTES = 40
# SMP v1 rc values (MGMT_ERR) the board sends.
RC_EINVAL = 3
RC_EBADSTATE = 6
RC_ENOTSUP = 8
# img_mgmt's v2 error codes (IMG_MGMT_ERR) the board sends.
IMG_NO_IMAGE = 3
IMG_HASH_NOT_FOUND = 8
IMG_INVALID_LENGTH = 21
IMG_INVALID_HEADER_MAGIC = 23
IMG_IMAGE_ALREADY_PENDING = 28
IMG_TOO_LARGE = 30
IMG_DATA_OVERRUN = 31
# Zephyr's boot banner and a log line: what a console shows between SMP frames.
BOOT_BANNER = (
    b"*** Booting Zephyr OS build v3.7.0 ***\r\n[00:00:00.004,000] <inf> app: factoryd provisioning\r\n"
)
LONG_LOG_LINE = b"[00:00:01.000,000] <dbg> flash: " + b"x" * 1500 + b"\r\n"
_SEREFUSAL_ERRORS = {
    "LOCKED": ProvError.LOCKED,
    "NO_KEY": ProvError.NO_KEY,
    "BAD_ARGUMENT": ProvError.BAD_SLOT,
}


@dataclass(frozen=True)
class McumgrTiming(Timing):
    """Timing of an MCUboot board: the ``Timing`` fields plus flash and swap rates."""

    # nRF52840 NVMC: 41 µs per 32-bit word written ≈ 10.5 ms per KiB; page erase 85 ms per 4 KiB.
    flash_write_s_per_kib: float = 0.0
    flash_erase_s_per_kib: float = 0.0
    # MCUboot's swap (move or scratch) reads, erases and writes every sector of both images:
    # about three erase+write passes per KiB of the larger image.
    swap_s_per_kib: float = 0.0
    # How long a crashing application runs before the watchdog resets the board.
    watchdog_s: float = 0.0

    @classmethod
    def realistic(cls) -> McumgrTiming:
        """An nRF52840 DK at 115200 baud: the house's realistic timing plus flash, swap and watchdog."""
        base = Timing.realistic()
        values = {f.name: getattr(base, f.name) for f in fields(Timing)}
        return cls(
            **values,
            flash_write_s_per_kib=0.0105,
            flash_erase_s_per_kib=0.021,
            swap_s_per_kib=0.095,
            watchdog_s=2.0,
        )

    @classmethod
    def for_timing(cls, timing: Timing) -> McumgrTiming:
        """The MCUboot timing for a line's ``Timing``: zero stays zero, realistic keeps its scale."""
        if isinstance(timing, McumgrTiming):
            return timing
        values = {f.name: getattr(timing, f.name) for f in fields(Timing)}
        realistic = Timing.realistic()
        if timing.baudrate is None or not timing.boot_s:
            return cls(**values)
        factor = timing.boot_s / realistic.boot_s
        flash = cls.realistic().scaled(factor)
        return cls(
            **values,
            flash_write_s_per_kib=flash.flash_write_s_per_kib,
            flash_erase_s_per_kib=flash.flash_erase_s_per_kib,
            swap_s_per_kib=flash.swap_s_per_kib,
            watchdog_s=flash.watchdog_s,
        )

    def scaled(self, factor: float) -> McumgrTiming:
        """Every delay multiplied by factor (the baud rate divided)."""
        values = {
            f.name: getattr(self, f.name) * factor
            for f in fields(self)
            if f.name not in ("baudrate", "jitter")
        }
        baud = None if self.baudrate is None or factor == 0 else int(self.baudrate / factor)
        return McumgrTiming(baudrate=baud, jitter=self.jitter, **values)


@dataclass(frozen=True)
class SlotHeader:
    """What the bootloader reads from an image header and its TLVs (unverified)."""

    data: bytes
    hash: bytes
    version: str
    security_counter: int


def read_image(data: bytes) -> SlotHeader | None:
    """The header, version, SHA256 and SEC_CNT TLVs of an image, as img_mgmt reads them; None if none."""
    if len(data) < IMAGE_HEADER_BYTES:
        return None
    magic, _load, hdr_size, prot_size, img_size, _flags, major, minor, rev, build = struct.unpack_from(
        "<IIHHIIBBHI", data
    )
    if magic != IMAGE_MAGIC:
        return None
    found: dict[int, bytes] = {}
    off = hdr_size + img_size
    for expected in (TLV_PROT_INFO_MAGIC, TLV_INFO_MAGIC):
        if off + 4 > len(data):
            break
        area_magic, area_len = struct.unpack_from("<HH", data, off)
        if area_magic != expected:
            if expected == TLV_PROT_INFO_MAGIC and not prot_size:
                continue
            break
        end = min(off + area_len, len(data))
        pos = off + 4
        while pos + 4 <= end:
            tlv_type, tlv_len = struct.unpack_from("<HH", data, pos)
            found.setdefault(tlv_type, data[pos + 4 : pos + 4 + tlv_len])
            pos += 4 + tlv_len
        off = end
    digest = found.get(TlvType.SHA256)
    if digest is None or len(digest) != hashlib.sha256().digest_size:
        return None
    counter_raw = found.get(TlvType.SEC_CNT, b"\0\0\0\0")
    counter = struct.unpack("<I", counter_raw)[0] if len(counter_raw) == 4 else 0
    version = f"{major}.{minor}.{rev}" + (f".{build}" if build else "")
    return SlotHeader(data, digest, version, counter)


@functools.cache
def factory_image() -> bytes:
    """The image every simulated board leaves the board maker with (signed once per process)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return sign_image(FACTORY_PAYLOAD, key, FACTORY_IMAGE_VERSION)


@dataclass
class _Upload:
    """The upload in progress: what the first chunk announced and how far it got."""

    length: int
    sha: bytes | None
    received: int = 0


@dataclass
class _Staged:
    """An object being written in chunks (RAM: lost at reset)."""

    total: int
    data: bytearray = field(default_factory=bytearray)


class SimMcumgrBoard(SimBoard):
    """A Zephyr application with MCUmgr and the provisioning group, over MCUboot; flash survives resets."""

    def __init__(
        self,
        *,
        firmware_key: ec.EllipticCurvePublicKey | None = None,
        se: SimSecureElement | None = None,
        model: str = MCUMGR_SIM_MODEL,
        faults: FaultPlan = NO_FAULTS,
        timing: Timing = ZERO_TIMING,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        buf_size: int = DEFAULT_BUF_SIZE,
        resume_after_reset: bool = True,
    ) -> None:
        # A line's plain Timing gets the MCUboot fields that go with it (flash, swap, watchdog).
        timing = McumgrTiming.for_timing(timing)
        super().__init__(firmware_key=firmware_key, se=se, model=model, faults=faults, timing=timing)
        self.slot_bytes = slot_bytes
        self.buf_size = buf_size
        self.resume_after_reset = resume_after_reset
        # Flash: the primary slot (running image), the secondary slot's bytes, the trailer flags.
        self.primary = factory_image()
        self.secondary = bytearray()
        self.primary_confirmed = True
        self.secondary_pending = False
        self.secondary_permanent = False
        # The primary runs an image swapped in for a test: unconfirmed, it reverts at the next reset.
        self.testing = False
        # The hardware security counter (MCUboot's rollback protection) is the shared bootloader
        # model's (``self.bootloader.security_counter``), raised by permanent images.
        self.bootloader.slot_bytes = slot_bytes
        # Images (by MCUboot hash) whose application never starts (watchdog reset → revert).
        self.crashing_images: set[bytes] = set()
        # Log lines in the middle of a multi-line reply (a console shared with the logger).
        self.chatty = False
        # The tty is the application's own USB CDC ACM: a reset takes it away (the PTY closes) and
        # the board comes back on a new one (whoever serves it next: a hub, a test).
        self.usb_cdc = False
        # What happened at boots (tests read it): "swapped", "refused: ...", "reverted".
        self.boot_log: list[str] = []
        self.resets = 0
        # Image bytes the board accepted over all uploads (a resumed upload sends each byte once).
        self.upload_bytes_received = 0
        # First chunks answered with the offset of the same image's earlier, unfinished upload.
        self.upload_resumes = 0
        self._upload: _Upload | None = None
        self._staged: dict[int, _Staged] = {}
        # The chain the last attest answered with (the SE's own unless the firmware forges one).
        self._attested_chain: tuple[bytes, ...] | None = None
        image = read_image(self.primary)
        self.fw_sha256 = image.hash if image else b""
        self.fw_version = image.version if image else "none"

    @property
    def mcumgr_timing(self) -> McumgrTiming:
        """The timing model with its flash fields (zero for a plain ``Timing``)."""
        timing = self.timing
        return timing if isinstance(timing, McumgrTiming) else McumgrTiming()

    def open_pty(self) -> McumgrPtyBoard:
        """Serve this board behind a fresh pseudo-terminal (the simulated hub calls this)."""
        return McumgrPtyBoard(self)

    def power_on(self) -> None:
        """Power applied: RAM is lost, this period's faults are armed."""
        super().power_on()
        self.soft_reset()

    def soft_reset(self) -> None:
        """A reset without a power cycle: RAM is lost (staged objects; the upload state unless kept)."""
        self._staged.clear()
        if not self.resume_after_reset:
            self._upload = None

    # MCUboot ------------------------------------------------------------------------------

    def primary_image(self) -> SlotHeader | None:
        """The running image."""
        return read_image(self.primary)

    def secondary_image(self) -> SlotHeader | None:
        """The image in the secondary slot (complete or not: what its header says)."""
        return read_image(bytes(self.secondary))

    async def boot_slots(self) -> None:
        """What MCUboot does at a reset: revert an unconfirmed test, or verify and swap a pending image."""
        timing = self.mcumgr_timing
        while True:
            if self.testing and not self.primary_confirmed:
                await self._swap(timing)
                self.testing = False
                self.primary_confirmed = True
                self.boot_log.append("reverted")
            elif self.secondary_pending:
                problem = self._validate_secondary()
                if problem is not None:
                    self.boot_log.append(f"refused: {problem}")
                    self.secondary = bytearray()  # MCUboot erases an invalid secondary image
                    self._upload = None
                    self.secondary_pending = self.secondary_permanent = False
                else:
                    permanent = self.secondary_permanent
                    await self._swap(timing)
                    self.secondary_pending = self.secondary_permanent = False
                    self.testing = not permanent
                    self.primary_confirmed = permanent
                    if permanent:
                        self._raise_counter()
                    self.boot_log.append("swapped")
            running = self.primary_image()
            self.fw_sha256 = running.hash if running else b""
            self.fw_version = running.version if running else "none"
            if running is None or running.hash not in self.crashing_images:
                return
            # The application crashes before it confirms; the watchdog resets the board.
            await self.spend(timing.watchdog_s)
            self.boot_log.append("watchdog")

    def _validate_secondary(self) -> str | None:
        """MCUboot's checks (the shared simulated bootloader's: fits, key, signature, counter)."""
        try:
            self.bootloader.validate(bytes(self.secondary))
        except BootRefusal as refusal:
            return str(refusal)
        return None

    async def _swap(self, timing: McumgrTiming) -> None:
        size = max(len(self.primary), len(self.secondary))
        await self.spend(size / 1024 * timing.swap_s_per_kib)
        self.primary, self.secondary = bytes(self.secondary), bytearray(self.primary)
        self._upload = None

    def _raise_counter(self) -> None:
        image = self.primary_image()
        if image is not None:
            stored = self.bootloader.security_counter
            self.bootloader.security_counter = max(stored, image.security_counter)

    # SMP ---------------------------------------------------------------------------------

    async def answer(self, packet: SmpPacket) -> SmpPacket | None:
        """Answer one request packet; None for packets that get no answer (responses, say).

        Raises BoardHang, or BoardReset carrying the reply to send before the reset.
        """
        if packet.op not in (SmpOp.READ, SmpOp.WRITE):
            return None
        self.commands_handled += 1
        if self.fault(Fault.HANG):
            raise BoardHang
        body = await self._dispatch(packet)
        reply = SmpPacket(
            packet.op.response(),
            packet.group,
            packet.seq,
            packet.command,
            cbor2.dumps(body, canonical=True),
            version=packet.version,
        )
        command = command_of(packet.group, packet.command)
        if command is McumgrCommand.RESET and packet.op is SmpOp.WRITE and "rc" not in body:
            raise BoardReset(reply)
        return reply

    async def _dispatch(self, packet: SmpPacket) -> dict[str, Any]:
        command = command_of(packet.group, packet.command)
        if command is None:
            return {"rc": RC_ENOTSUP}
        try:
            body = decode_body(packet)
        except FactorydError:
            return {"rc": RC_EINVAL}
        request_model = (
            IMAGE_STATE_WRITE[0]
            if command is McumgrCommand.IMAGE_STATE and packet.op is SmpOp.WRITE
            else MESSAGES[command][0]
        )
        if int(packet.op) != int(request_model._OP):
            return {"rc": RC_ENOTSUP}
        try:
            request = request_model(**{k: v for k, v in body.items() if k in request_model.model_fields})
        except (ValidationError, ValueError):
            return {"rc": RC_EINVAL}
        fields_ = request.model_dump(
            exclude_unset=True, exclude={"header", "version", "sequence", "smp_data"}
        )
        try:
            return await self._smp_execute(command, packet.op, fields_, v2=packet.version == 1)
        except SeRefusal as refusal:
            return _prov_error(_SEREFUSAL_ERRORS.get(refusal.status, ProvError.UNKNOWN))

    async def _smp_execute(
        self, command: McumgrCommand, op: SmpOp, req: dict[str, Any], *, v2: bool
    ) -> dict[str, Any]:
        match command:
            case McumgrCommand.ECHO:
                return {"r": req["d"]}
            case McumgrCommand.RESET:
                return {}
            case McumgrCommand.PARAMS:
                return {"buf_size": self.buf_size, "buf_count": DEFAULT_BUF_COUNT}
            case McumgrCommand.IMAGE_STATE:
                if op is SmpOp.WRITE:
                    problem = self._state_write(req.get("hash"), bool(req.get("confirm", False)))
                    if problem is not None:
                        return _img_error(problem, v2=v2)
                return {"images": self._state()}
            case McumgrCommand.IMAGE_UPLOAD:
                return await self._upload_chunk(req, v2=v2)
            case McumgrCommand.IDENTITY:
                return {
                    "serial": self.claimed_serial or self.se.serial,
                    "model": self.model,
                    "locked": self.se.locked,
                    "objects": sorted(int(o) for o in self.se.objects),
                    "keys": [s for s in range(KEY_SLOTS) if self.se.has_key(s)],
                }
            case McumgrCommand.KEYGEN:
                await self.spend(self.timing.keygen_s)
                return {"pub": self.se.genkey(req["slot"])}
            case McumgrCommand.CSR:
                await self.spend(self.timing.csr_s)
                return self._smp_csr(req["slot"], req["cn"])
            case McumgrCommand.WRITE_OBJECT:
                return await self._write_object(req)
            case McumgrCommand.READ_OBJECT:
                return self._read_object(req)
            case McumgrCommand.SIGN:
                await self.spend(self.timing.sign_s)
                return {"sig": self.se.sign(req["slot"], req["challenge"])}
            case McumgrCommand.ATTEST:
                # The native profile's GENKEY_ATTESTED, impostor modes included: the same statement.
                await self.spend(self.timing.keygen_s + self.timing.sign_s)
                reply = AttestedKeyReply.decode(self._attest(req["slot"], req["nonce"]))
                self._attested_chain = reply.chain
                return {"nonce": reply.nonce, "pub": reply.public_key, "sig": reply.signature,
                        "certs": len(reply.chain)}  # fmt: skip
            case McumgrCommand.ATTESTATION_CERT:
                return self._attestation_cert(req)
            case McumgrCommand.LOCK:
                if req["serial"] != self.se.serial:
                    return _prov_error(ProvError.SERIAL_MISMATCH)
                await self.spend(self.timing.lock_s)
                self.se.lock()
                return {}

    def _state(self) -> list[dict[str, Any]]:
        images: list[dict[str, Any]] = []
        primary = self.primary_image()
        if primary is not None:
            images.append(
                {"image": 0, "slot": 0, "version": primary.version, "hash": primary.hash, "bootable": True,
                 "active": True, "confirmed": self.primary_confirmed, "permanent": False, "pending": False}
            )  # fmt: skip
        secondary = self.secondary_image()
        complete = self._upload is None or self._upload.received == self._upload.length
        if secondary is not None and complete:
            images.append(
                {"image": 0, "slot": 1, "version": secondary.version, "hash": secondary.hash,
                 "bootable": True, "active": False, "confirmed": False, "pending": self.secondary_pending,
                 "permanent": self.secondary_permanent}
            )  # fmt: skip
        return images

    def _state_write(self, image_hash: bytes | None, confirm: bool) -> int | None:
        primary, secondary = self.primary_image(), self.secondary_image()
        if confirm and (image_hash is None or (primary is not None and image_hash == primary.hash)):
            self.primary_confirmed = True
            self.testing = False
            self._raise_counter()
            return None
        if secondary is None or (self._upload is not None and self._upload.received < self._upload.length):
            return IMG_NO_IMAGE
        if image_hash != secondary.hash:
            return IMG_HASH_NOT_FOUND
        self.secondary_pending = True
        self.secondary_permanent = confirm
        return None

    async def _upload_chunk(self, req: dict[str, Any], *, v2: bool) -> dict[str, Any]:
        off, data = req["off"], req["data"]
        timing = self.mcumgr_timing
        upload = self._upload
        if off == 0:
            length, sha = req.get("len"), req.get("sha")
            if not isinstance(length, int) or length <= 0:
                return _img_error(IMG_INVALID_LENGTH, v2=v2)
            if length > self.slot_bytes:
                return _img_error(IMG_TOO_LARGE, v2=v2)
            if self.secondary_pending:
                return _img_error(IMG_IMAGE_ALREADY_PENDING, v2=v2)
            same = upload is not None and sha is not None and upload.sha == sha and upload.length == length
            if same and upload is not None and upload.received > 0:
                self.upload_resumes += 1
                return {"off": upload.received}  # the same image again: go on where it stopped
            if len(data) >= 4 and struct.unpack_from("<I", data)[0] != IMAGE_MAGIC:
                return _img_error(IMG_INVALID_HEADER_MAGIC, v2=v2)
            self._upload = upload = _Upload(length, sha)
            self.secondary = bytearray()
        elif upload is None:
            return {"off": 0}  # Zephyr after a reset: no upload in progress, start again at 0
        if off != upload.received:
            return {"off": upload.received}  # Zephyr answers a misplaced chunk with where it is
        if off + len(data) > upload.length:
            return _img_error(IMG_DATA_OVERRUN, v2=v2)
        kib = len(data) / 1024
        await self.spend(kib * (timing.flash_write_s_per_kib + timing.flash_erase_s_per_kib))
        if off > 0 and self.fault(Fault.RESET_MID_WRITE):
            # A reset mid-upload: this chunk is lost, what was written before stays in flash.
            raise BoardReset(None)
        self.secondary += data
        upload.received += len(data)
        self.upload_bytes_received += len(data)
        reply: dict[str, Any] = {"off": upload.received}
        if upload.received == upload.length and upload.sha is not None:
            reply["match"] = hashlib.sha256(bytes(self.secondary)).digest() == upload.sha
        return reply

    def _smp_csr(self, slot: int, common_name: str) -> dict[str, Any]:
        if not common_name or len(common_name) > 64:
            return _prov_error(ProvError.BAD_CN)
        if not self.se.has_key(slot):
            return _prov_error(ProvError.NO_KEY)
        if self.fault(Fault.WRONG_CN):
            return {"csr": self.se.csr(slot, common_name[::-1])}
        if self.fault(Fault.WEAK_KEY):
            # The fault is a weak key on purpose: the station must refuse it.
            weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
            return {"csr": make_csr(weak, common_name)}
        csr = self.se.csr(slot, common_name)
        if self.fault(Fault.BAD_CSR_SIGNATURE):
            csr = csr[:-1] + bytes([csr[-1] ^ 0x01])
        return {"csr": csr}

    async def _write_object(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            obj = ObjectId(req["obj"])
        except ValueError:
            return _prov_error(ProvError.BAD_OBJECT)
        off, data = req["off"], req["data"]
        if self.se.locked:
            return _prov_error(ProvError.LOCKED)
        staged = self._staged.get(obj)
        if off == 0:
            total = req.get("len")
            if not isinstance(total, int) or total < 0:
                return _prov_error(ProvError.BAD_OFFSET)
            if total > MAX_OBJECT_BYTES:
                return _prov_error(ProvError.TOO_LARGE)
            staged = self._staged[obj] = _Staged(total)
        elif staged is None:
            return {"off": 0}  # nothing staged (a reset lost it): start again
        if off != len(staged.data):
            return {"off": len(staged.data)}
        if off + len(data) > staged.total:
            return _prov_error(ProvError.TOO_LARGE)
        staged.data += data
        if len(staged.data) < staged.total:
            return {"off": len(staged.data)}
        await self.spend(self.timing.write_s)
        if self.fault(Fault.RESET_MID_WRITE):
            raise BoardReset(None)
        del self._staged[obj]
        value = bytes(staged.data)
        digest = self.se.store(obj, value)
        if self.fault(Fault.READBACK_DIFFERS) and value:
            self.se.objects[obj] = value[:-1] + bytes([value[-1] ^ 0x55])
        return {"off": staged.total, "sha": digest}

    def _read_object(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            obj = ObjectId(req["obj"])
        except ValueError:
            return _prov_error(ProvError.BAD_OBJECT)
        value = self.se.objects.get(obj, b"")
        off = req["off"]
        if not 0 <= off <= len(value):
            return _prov_error(ProvError.BAD_OFFSET)
        # Room for the data in one reply: the buffer minus the header, keys and integers.
        room = max_packet_for(self.buf_size) - READ_REPLY_OVERHEAD_BYTES
        reply: dict[str, Any] = {"off": off, "data": value[off : off + room]}
        if off == 0:
            reply["len"] = len(value)
        return reply

    def _attestation_cert(self, req: dict[str, Any]) -> dict[str, Any]:
        chain = self._attested_chain if self._attested_chain is not None else self.se.attestation_chain
        if not chain:
            return _prov_error(ProvError.NO_KEY)
        index, off = req["cert"], req["off"]
        if not 0 <= index < len(chain):
            return _prov_error(ProvError.BAD_OBJECT)
        cert = chain[index]
        if not 0 <= off <= len(cert):
            return _prov_error(ProvError.BAD_OFFSET)
        room = max_packet_for(self.buf_size) - READ_REPLY_OVERHEAD_BYTES
        reply: dict[str, Any] = {"cert": index, "off": off, "data": cert[off : off + room]}
        if off == 0:
            reply["len"] = len(cert)
        return reply


def _prov_error(error: ProvError) -> dict[str, Any]:
    return {"err": {"group": PROVISIONING_GROUP, "rc": int(error)}}


def _img_error(rc: int, *, v2: bool) -> dict[str, Any]:
    # SMP v2 reports group errors as err; a v1 client gets Zephyr's legacy mapping to an rc.
    if v2:
        return {"err": {"group": 1, "rc": rc}}
    return {"rc": RC_EBADSTATE if rc in (IMG_IMAGE_ALREADY_PENDING, IMG_NO_IMAGE) else RC_EINVAL}


class McumgrPtyBoard(PtyEndpoint):
    """Serves one SimMcumgrBoard on a fresh pseudo-terminal until closed (a UART bridge: resets keep it)."""

    board: SimMcumgrBoard

    def __init__(self, board: SimMcumgrBoard) -> None:
        super().__init__(board)
        self._decoder = SmpDecoder()
        self._booting = False

    async def _boot(self, *, power_on: bool = True) -> None:
        board = self.board
        self._booting = True
        try:
            if power_on:
                board.power_on()
            else:
                board.soft_reset()
            await board.boot_slots()
            await board.spend(board.jittered(board.timing.boot_s))
            if board.fault(Fault.BOOT_GARBAGE):
                await self._send(BOOT_BANNER)
        finally:
            self._booting = False
        # What arrived while the board rebooted fell on a UART nobody listened to.
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._decoder.flush()

    async def _handle(self, item: object) -> None:
        if not isinstance(item, SmpPacket):
            return
        board = self.board
        await board.spend(board.wire_s(len(item.lines())))
        try:
            reply = await board.answer(item)
        except BoardHang:
            self.hung = True
            log.debug("sim mcumgr board hangs", serial=board.serial_hex)
            return
        except BoardReset as reset:
            ack = reset.args[0] if reset.args else None
            if isinstance(ack, SmpPacket):
                await self._send(ack.lines())
            board.resets += 1
            if board.usb_cdc:
                self.close()  # the USB device goes away with the reset; it re-enumerates elsewhere
                return
            await self._boot(power_on=False)
            return
        if reply is None or board.fault(Fault.DROP_REPLY):
            return
        if board.fault(Fault.OVERSIZE_FRAME):
            await self._send(LONG_LOG_LINE)
        data = reply.lines(MAX_LINE_BYTES)
        if board.chatty and data.count(b"\n") > 1:
            cut = data.index(b"\n") + 1
            data = data[:cut] + b"[00:00:02.000,000] <inf> app: tick\r\n" + data[cut:]
        if board.fault(Fault.CORRUPT_BYTE):
            i = board.rng.randrange(2, len(data) - 1)
            data = (
                data[:i]
                + bytes([data[i] ^ 0x01 if data[i] not in b"\n\x06\x04" else data[i]])
                + data[i + 1 :]
            )
        await self._send(data)

    def _received(self, data: bytes) -> None:
        if self._booting:
            return
        for packet in self._decoder.feed(data):
            self._inbox.put_nowait(packet)
        self._decoder.take_errors()  # SMP has no NACK: a garbled request just goes unanswered
