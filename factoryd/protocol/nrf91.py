"""The nrf91-at client: Nordic nRF91 modems on stock firmware, over AT commands (NRF91_AT.md).

Responses are ``factoryd.transport.at_codec``'s; requests go through the shared ``RequestEngine``
in its exclusive mode (AT has no sequence numbers: one command in flight per port). Nothing is
resent by the engine: a second ``AT%KEYGEN`` would replace the key the first one's late answer
certified, and a second ``AT%CMNG=0`` may land on a modem that already stored the first. Retries
are the job's (a step, or a power cycle). Every final result code other than ``OK`` raises an
``AtCommandError`` whose ``transient`` follows the CME code; ``Ready`` from the modem while a
command is out fails it with ``BoardResetError`` (the modem rebooted and lost what it had not saved).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Self

import structlog

from factoryd.errors import BoardResetError, BoardStatusError, BoardTimeoutError, ProtocolViolationError
from factoryd.protocol.engine import EXCLUSIVE_KEY, EngineClient, RequestEngine, Route
from factoryd.transport.at_codec import (
    AT_HOST_MAX_LINE_BYTES,
    AtDecoder,
    AtFrame,
    AtResponse,
    AtUrc,
    ResultCode,
    encode_command,
    quote,
    split_params,
)
from factoryd.transport.serial_link import SerialLink

log = structlog.get_logger(__name__)

NRF91_BAUDRATE = 115200
IMEI_DIGITS = 15
# sec_tag 0..2147483647 is the application's; higher ones belong to the modem (NRF91_AT.md).
MAX_SEC_TAG = 2_147_483_647
# nRF Cloud's security tag (0x01010001), the lot profile's default (LotProfile.sec_tag).
NRF_CLOUD_SEC_TAG = 16_842_753
_MFW_VERSION = re.compile(r"(?:^|[_-])(\d+)\.(\d+)\.(\d+)(?=$|[_-])")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")


class AtCommand(IntEnum):
    """The commands this client sends (names show in timeouts and errors)."""

    CMEE = 1
    CFUN_SET = 2
    CFUN_READ = 3
    CGSN = 4
    CGMR = 5
    CMNG_LIST = 6
    CMNG_WRITE = 7
    CMNG_DELETE = 8
    KEYGEN = 9
    ATTESTTOKEN = 10


class CredentialType(IntEnum):
    """``%CMNG`` credential types (NRF91_AT.md); higher values are not confirmed."""

    ROOT_CA = 0
    CLIENT_CERT = 1
    CLIENT_KEY = 2
    PSK = 3
    PSK_IDENTITY = 4
    PUBLIC_KEY = 5
    DEVICE_IDENTITY_KEY = 6


class CmeError(IntEnum):
    """``+CME ERROR`` codes of ``%CMNG`` and ``%KEYGEN`` (NRF91_AT.md); others map to UNKNOWN."""

    UNKNOWN = -1
    NOT_FOUND = 513
    NO_ACCESS = 514
    MEMORY_FULL = 515
    ACTIVE = 518
    EXISTS = 519
    KEYGEN_FAILED = 523
    POWER_OFF_WARNING = 528

    @classmethod
    def _missing_(cls, value: object) -> CmeError:
        return cls.UNKNOWN


# Codes worth doing the step again: the modem was online (the job sets it offline again), key
# generation failed inside the modem, a power-off warning passed; plain ERROR too (it is what a
# modem without AT+CMEE=1 says for everything, and what a command garbled on the line gets).
TRANSIENT_CME = frozenset({CmeError.ACTIVE, CmeError.KEYGEN_FAILED, CmeError.POWER_OFF_WARNING})


class AtCommandError(BoardStatusError):
    """The modem answered ERROR or +CME/+CMS ERROR; ``cme`` is the code (None for plain ERROR)."""

    cme: CmeError | None = None

    def __init__(self, message: str, cme: int | None) -> None:
        code = CmeError(cme) if cme is not None else None
        super().__init__(message, cme or 0, transient=code is None or code in TRANSIENT_CME)
        self.cme = code

    @property
    def reason(self) -> str:
        """``at_error`` for plain ERROR, ``cme_<name>`` for a known code."""
        return "at_error" if self.cme is None else f"cme_{self.cme.name.lower()}"


@dataclass(frozen=True)
class ModemFirmware:
    """``AT+CGMR``: the modem firmware string and its x.y.z version."""

    text: str
    version: tuple[int, int, int]

    @classmethod
    def parse(cls, text: str) -> ModemFirmware:
        """``mfw_nrf9160_1.3.5`` → (1, 3, 5); ProtocolViolationError without exactly one x.y.z."""
        found = _MFW_VERSION.findall(text)
        if len(found) != 1:
            raise ProtocolViolationError(f"modem firmware {text!r} does not name exactly one x.y.z version")
        major, minor, patch = (int(part) for part in found[0])
        return cls(text, (major, minor, patch))

    @property
    def version_text(self) -> str:
        """The version as x.y.z."""
        return ".".join(str(part) for part in self.version)


def parse_version(text: str) -> tuple[int, int, int]:
    """``1.3.2`` → (1, 3, 2); ValueError otherwise."""
    parts = text.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a modem firmware version is x.y.z, not {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


@dataclass(frozen=True)
class Credential:
    """One ``%CMNG`` list entry: its tag, type and the SHA-256 of the stored bytes (upper hex)."""

    sec_tag: int
    type: int
    sha256: str


@dataclass(frozen=True)
class KeygenReply:
    """``%KEYGEN``: the CSR (DER, as the modem sent it) and its COSE_Sign1 attestation."""

    csr_der: bytes
    cose: bytes


def luhn_ok(digits: str) -> bool:
    """The Luhn check an IMEI's 15th digit is."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def check_sec_tag(sec_tag: int) -> int:
    """ValueError unless sec_tag is an application security tag (0..2147483647)."""
    if not 0 <= sec_tag <= MAX_SEC_TAG:
        raise ValueError(f"security tag must be within 0..{MAX_SEC_TAG}, got {sec_tag}")
    return sec_tag


def b64url_decode(text: str, what: str) -> bytes:
    """Unpadded base64url → bytes; ProtocolViolationError naming ``what``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ProtocolViolationError(f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ProtocolViolationError(f"{what} does not decode: {exc}") from None


def cmng_write_command(sec_tag: int, cred_type: int, content: str) -> str:
    """The ``AT%CMNG=0`` line that writes content (the caller checks it fits the line limit)."""
    return f"AT%CMNG=0,{check_sec_tag(sec_tag)},{int(cred_type)},{quote(content)}"


@dataclass(frozen=True)
class Nrf91Timeouts:
    """Per-command reply timeouts in seconds (wire time for request and reply is added on top)."""

    # Reads answered from RAM.
    default_s: float = 2.0
    # CFUN=4 detaches from the network first: a few seconds on a registered modem.
    cfun_s: float = 10.0
    # %KEYGEN makes a P-256 key in the modem's KMU and signs a CSR and a COSE token: seconds.
    keygen_s: float = 15.0
    # %CMNG writes and deletes go to the modem's flash.
    cmng_write_s: float = 5.0
    # After a timeout, how long the line is listened to (and what arrives dropped) before the next
    # command, so a late answer is not taken for the next command's.
    late_reply_s: float = 0.5

    def for_command(self, command: AtCommand) -> float:
        """Timeout for one command."""
        if command is AtCommand.KEYGEN:
            return self.keygen_s
        if command is AtCommand.CFUN_SET:
            return self.cfun_s
        if command in (AtCommand.CMNG_WRITE, AtCommand.CMNG_DELETE):
            return self.cmng_write_s
        return self.default_s


# Commands asked again once when their answer does not come: asking twice changes nothing.
IDEMPOTENT_COMMANDS = frozenset(
    {
        AtCommand.CMEE,
        AtCommand.CFUN_SET,
        AtCommand.CFUN_READ,
        AtCommand.CGSN,
        AtCommand.CGMR,
        AtCommand.CMNG_LIST,
    }
)
# Bytes of a %KEYGEN answer (CSR ~ 400 B + COSE ~ 150 B, base64url) for the wire-time allowance.
KEYGEN_REPLY_ALLOWANCE_BYTES = 1000
LIST_REPLY_ALLOWANCE_BYTES = 2000


class _AtReplies:
    """How AT frames answer: a response answers the one command out; URCs are events."""

    def __init__(self) -> None:
        self.engine: RequestEngine[AtFrame, AtCommand] | None = None
        self.boots = 0
        self.urcs: list[str] = []
        # Until the modem has answered once, Ready is its boot banner (it was still starting when the
        # tty opened): a command it missed then times out and, being a read, is asked again.
        self.answered = False

    def route(self, frame: AtFrame) -> Route:
        """URCs are events, responses replies."""
        if isinstance(frame, AtUrc):
            return Route.EVENT
        self.answered = True
        return Route.REPLY

    def reply_key(self, frame: AtFrame) -> int:
        """There is one command at a time."""
        return EXCLUSIVE_KEY

    def mismatch(self, command: AtCommand, frame: AtFrame) -> str | None:
        """Responses name no command: the client checks the lines."""
        return None

    def nack_exhausted(self, attempts: int) -> str | None:
        """AT has no NACK."""
        return None

    def resend_on_timeout(self, command: AtCommand) -> bool:
        """Never: see the module docstring."""
        return False

    def event(self, frame: AtFrame) -> None:
        """Log URCs; ``Ready`` fails what is pending with BoardResetError."""
        if not isinstance(frame, AtUrc):
            return
        if not frame.is_ready:
            if len(self.urcs) < 100:
                self.urcs.append(frame.line)
            log.debug("nrf91 urc", urc=frame.line)
            return
        self.boots += 1
        engine = self.engine
        if engine is None or not self.answered:
            return
        engine.stats.boots += 1
        for waiter in engine.waiters():
            engine.fail(
                waiter,
                BoardResetError(f"modem on {engine.link.path} rebooted during {waiter.command.name}"),
            )


class Nrf91Client(EngineClient[AtFrame, AtCommand]):
    """Typed AT access to one nRF91 modem; one command at a time."""

    def __init__(
        self,
        link: SerialLink[AtDecoder],
        *,
        timeouts: Nrf91Timeouts | None = None,
        max_line: int = AT_HOST_MAX_LINE_BYTES,
        read_retries: int = 1,
    ) -> None:
        self.link = link
        self.read_retries = read_retries
        self.timeouts = timeouts or Nrf91Timeouts()
        self.max_line = max_line
        self._replies = _AtReplies()
        engine: RequestEngine[AtFrame, AtCommand] = RequestEngine(
            link, self._replies, resends=0, exclusive=True, late_reply_s=self.timeouts.late_reply_s
        )
        self._replies.engine = engine
        super().__init__(engine)

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        baudrate: int = NRF91_BAUDRATE,
        timeouts: Nrf91Timeouts | None = None,
        max_line: int = AT_HOST_MAX_LINE_BYTES,
    ) -> Self:
        """Open the tty at path and return a client on it."""
        link = await SerialLink.open(path, AtDecoder(), baudrate=baudrate)
        return cls(link, timeouts=timeouts, max_line=max_line)

    @property
    def boots_seen(self) -> int:
        """``Ready`` lines seen (reboots of the modem while this client was attached)."""
        return self._replies.boots

    @property
    def urcs(self) -> tuple[str, ...]:
        """The first URCs seen (logged, never answers)."""
        return tuple(self._replies.urcs)

    # Commands -----------------------------------------------------------------------------

    async def enable_error_codes(self) -> None:
        """``AT+CMEE=1``: numeric +CME ERROR codes instead of a bare ERROR."""
        await self.command(AtCommand.CMEE, "AT+CMEE=1")

    async def set_function_mode(self, mode: int) -> None:
        """``AT+CFUN=<mode>`` (4: offline, which %CMNG writes and %KEYGEN need)."""
        await self.command(AtCommand.CFUN_SET, f"AT+CFUN={int(mode)}")

    async def function_mode(self) -> int:
        """``AT+CFUN?`` → the mode."""
        response = await self.command(AtCommand.CFUN_READ, "AT+CFUN?")
        value = _prefixed(response, "+CFUN:", AtCommand.CFUN_READ, self.link.path)
        if not value.isdigit():
            raise ProtocolViolationError(f"AT+CFUN? on {self.link.path}: {value!r} is not a mode")
        return int(value)

    async def imei(self) -> str:
        """``AT+CGSN``: the 15-digit IMEI (Luhn-checked)."""
        response = await self.command(AtCommand.CGSN, "AT+CGSN")
        found = [line for line in response.lines if line.isdigit() and len(line) == IMEI_DIGITS]
        if len(found) != 1:
            raise ProtocolViolationError(
                f"AT+CGSN on {self.link.path}: expected one {IMEI_DIGITS}-digit IMEI line, "
                f"got {response.lines!r}"
            )
        if not luhn_ok(found[0]):
            raise ProtocolViolationError(
                f"AT+CGSN on {self.link.path}: IMEI {found[0]} fails its check digit"
            )
        return found[0]

    async def modem_firmware(self) -> ModemFirmware:
        """``AT+CGMR``: the modem firmware, e.g. ``mfw_nrf9160_1.3.5``."""
        response = await self.command(AtCommand.CGMR, "AT+CGMR")
        found = [line for line in response.lines if line.lower().startswith("mfw")]
        if len(found) != 1:
            raise ProtocolViolationError(
                f"AT+CGMR on {self.link.path}: expected one mfw_... line, got {response.lines!r}"
            )
        return ModemFirmware.parse(found[0])

    async def list_credentials(
        self, sec_tag: int | None = None, cred_type: int | None = None
    ) -> list[Credential]:
        """``AT%CMNG=1[,<tag>[,<type>]]``: the stored credentials with their SHA-256."""
        text = "AT%CMNG=1"
        if sec_tag is not None:
            text += f",{check_sec_tag(sec_tag)}"
            if cred_type is not None:
                text += f",{int(cred_type)}"
        elif cred_type is not None:
            raise ValueError("listing by type needs a security tag")
        response = await self.command(AtCommand.CMNG_LIST, text)
        return [_credential(line, self.link.path) for line in response.lines if line.startswith("%CMNG:")]

    async def write_credential(self, sec_tag: int, cred_type: int, content: str) -> None:
        """``AT%CMNG=0,<tag>,<type>,"<content>"`` (content exactly as stored: its SHA-256 is listed)."""
        await self.command(AtCommand.CMNG_WRITE, cmng_write_command(sec_tag, cred_type, content))

    async def delete_credential(self, sec_tag: int, cred_type: int, *, missing_ok: bool = False) -> bool:
        """``AT%CMNG=3,<tag>,<type>``; False when there was none and ``missing_ok``."""
        try:
            await self.command(AtCommand.CMNG_DELETE, f"AT%CMNG=3,{check_sec_tag(sec_tag)},{int(cred_type)}")
        except AtCommandError as exc:
            if missing_ok and exc.cme is CmeError.NOT_FOUND:
                return False
            raise
        return True

    async def keygen(self, sec_tag: int, attributes: str | None = None) -> KeygenReply:
        """``AT%KEYGEN=<tag>,2,0[,"<attributes>"]``: a new P-256 key in the tag, its CSR and COSE token."""
        text = f"AT%KEYGEN={check_sec_tag(sec_tag)},2,0"
        if attributes is not None:
            text += f",{quote(attributes)}"
        response = await self.command(AtCommand.KEYGEN, text)
        blob = _prefixed(response, "%KEYGEN:", AtCommand.KEYGEN, self.link.path)
        parts = split_params(blob)
        if len(parts) != 1 or parts[0].count(".") != 1:
            raise ProtocolViolationError(
                f'AT%KEYGEN on {self.link.path}: expected "<csr>.<cose>", got {blob[:40]!r}'
            )
        csr_b64, cose_b64 = parts[0].split(".")
        return KeygenReply(
            b64url_decode(csr_b64, "the %KEYGEN CSR"), b64url_decode(cose_b64, "the %KEYGEN COSE")
        )

    async def attestation_token(self) -> tuple[bytes, bytes]:
        """``AT%ATTESTTOKEN`` → (body, COSE_Sign1), both decoded."""
        response = await self.command(AtCommand.ATTESTTOKEN, "AT%ATTESTTOKEN")
        blob = split_params(_prefixed(response, "%ATTESTTOKEN:", AtCommand.ATTESTTOKEN, self.link.path))[0]
        if blob.count(".") != 1:
            raise ProtocolViolationError(f'AT%ATTESTTOKEN on {self.link.path}: not "<body>.<cose>"')
        body, cose = blob.split(".")
        return b64url_decode(body, "the attestation body"), b64url_decode(cose, "the attestation COSE")

    # Requests ------------------------------------------------------------------------------

    async def command(self, command: AtCommand, text: str) -> AtResponse:
        """Send one command line and return its OK response; AtCommandError for any other result."""
        data = encode_command(text, max_line=self.max_line)
        allowance = (
            KEYGEN_REPLY_ALLOWANCE_BYTES
            if command is AtCommand.KEYGEN
            else LIST_REPLY_ALLOWANCE_BYTES
            if command is AtCommand.CMNG_LIST
            else 64
        )
        # With echo on the modem sends the line back too.
        timeout_s = self.timeouts.for_command(command) + self.link.wire_time_s(2 * len(data) + allowance)
        attempts = 1 + (self.read_retries if command in IDEMPOTENT_COMMANDS else 0)
        for attempt in range(1, attempts + 1):
            try:
                frame = await self._engine.call(EXCLUSIVE_KEY, command, data, timeout_s)
                break
            except BoardTimeoutError:
                # A truncated or lost answer: asking again is harmless for these (the engine first
                # listens out the late-reply window, so a late first answer is dropped, not taken).
                if attempt == attempts:
                    raise
                log.debug("nrf91 command asked again", command=command.name, path=self.link.path)
        if not isinstance(frame, AtResponse):
            raise ProtocolViolationError(f"{command.name} on {self.link.path}: got {frame!r}")
        result = frame.result
        if result.ok:
            return frame
        shown = text if len(text) <= 40 else text[:40] + "..."
        if result.code is ResultCode.ERROR:
            raise AtCommandError(f"{shown} refused by the modem on {self.link.path}: ERROR", None)
        code = CmeError(result.error if result.error is not None else CmeError.UNKNOWN)
        label = code.name if code is not CmeError.UNKNOWN else "unknown"
        raise AtCommandError(
            f"{shown} refused by the modem on {self.link.path}: "
            f"{result.code.value}: {result.error} ({label})",
            result.error,
        )


def _prefixed(response: AtResponse, prefix: str, command: AtCommand, path: str) -> str:
    values = [line[len(prefix) :].strip() for line in response.lines if line.startswith(prefix)]
    if len(values) != 1:
        raise ProtocolViolationError(
            f"{command.name} on {path}: expected one {prefix} line, got {len(values)} ({response.lines!r})"
        )
    return values[0]


def _credential(line: str, path: str) -> Credential:
    try:
        params = split_params(line.removeprefix("%CMNG:").strip())
        tag, kind, sha = int(params[0]), int(params[1]), params[2]
    except (ValueError, IndexError) as exc:
        raise ProtocolViolationError(f"AT%CMNG=1 on {path}: cannot parse {line!r} ({exc})") from None
    if not _HEX64.fullmatch(sha):
        raise ProtocolViolationError(f"AT%CMNG=1 on {path}: {sha!r} is not a SHA-256 (mfw < 1.3.2?)")
    return Credential(tag, kind, sha.upper())


def credential_map(credentials: Iterable[Credential], sec_tag: int) -> dict[int, str]:
    """The credentials of one tag: type → SHA-256."""
    return {c.type: c.sha256 for c in credentials if c.sec_tag == sec_tag}
