"""A simulated nRF91 modem on stock firmware: its AT interface behind a real PTY (NRF91_AT.md).

``SimNrf91Modem`` keeps what a modem keeps across resets (its IMEI, firmware, device UUID and
identity key, the credential store per security tag) and answers command lines with the lines
a modem sends. ``Nrf91PtyModem`` serves it on a pseudo-terminal with the production codec's
command decoder (``AtCommandDecoder``): CR/LF outside quotes end a line, a line longer than the AT
host's buffer is answered with ERROR.

What it models: ``AT+CFUN`` (writes and key generation refused with 518 while online), ``AT+CMEE``
(numeric codes only after ``AT+CMEE=1``), ``ATE0``/``ATE1`` echo, ``AT+CGSN``, ``AT+CGMR``,
``AT%CMNG`` write/list/read/delete with the SHA-256 of the stored bytes, ``AT%KEYGEN`` (a P-256
key into (tag, 2), a CSR with the default keyUsage request, a COSE_Sign1 over its digest signed
with the device identity key) and ``AT%ATTESTTOKEN``; URCs at random moments, between lines of an
answer too; ``Ready`` after a reset.

Faults (``FaultPlan`` kinds, as the AT link shows them): ``corrupt_byte`` changes one character of
an answer line (AT has no CRC: the station's digest and hash checks must catch it),
``drop_reply`` sends half a line and nothing more (a truncated line), ``hang``, ``reset_mid_write``
(reboots during ``%CMNG=0``: the write is lost, CFUN/CMEE/echo go back to their boot values),
``wrong_cn``, ``bad_csr_signature``, ``weak_key`` (a P-384 CSR), ``oversize_frame`` (a long junk
line), ``boot_garbage``, ``readback_differs`` (stores one byte other than written). Beyond them:
``cme_error`` (a command answered with a transient error: 523 for %KEYGEN, ERROR otherwise) and
``null_param`` (the CSR's ecdsa-with-SHA256 carries a NULL parameter, as some modem firmware does).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import secrets
import uuid
from dataclasses import dataclass

import cbor2
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from factoryd.pki import der
from factoryd.protocol.nrf91 import NRF_CLOUD_SEC_TAG
from factoryd.sim.board import NO_FAULTS, ZERO_TIMING, BoardHang, Fault, FaultPlan, SimBoard, Timing
from factoryd.sim.pty import PtyEndpoint, serve_pty
from factoryd.sim.secure_element import SimSecureElement
from factoryd.transport.at_codec import (
    AT_HOST_MAX_LINE_BYTES,
    OVERFLOW,
    READY_URC,
    AtCommandDecoder,
    split_params,
)

log = structlog.get_logger(__name__)

DEFAULT_MODEM_FW = "mfw_nrf9160_1.3.5"
NRF91_SIM_MODEL = "nrf9160-sim"
# Function modes AT+CFUN accepts; in these %CMNG writes/deletes and %KEYGEN answer 518.
CFUN_MODES = frozenset({0, 1, 2, 4, 20, 21, 30, 31, 40, 41, 44})
CFUN_ACTIVE = frozenset({1, 2, 21})
MAX_APP_SEC_TAG = 2_147_483_647
KEY_TYPE = 2
CLIENT_CERT_TYPE = 1
# COSE: ES256 in the protected header, kid -2 (the device identity key) unprotected.
COSE_SIGN1_TAG = 18
CBOR_SELF_DESCRIBE_TAG = 55799
CSR_MESSAGE_V1 = 9
IDENTITY_MESSAGE_V1 = 1
NRF9160_SIAA = 1
KID_DEVICE_IDENTITY = b"\x21"  # CBOR for -2
# URCs a registered modem sends now and then.
SAMPLE_URCS = (
    '+CEREG: 2,"76C1","0102DA04",7',
    "%XSIM: 1",
    '+CEREG: 1,"76C1","0102DA04",7,,,"11100000"',
    "+CSCON: 0",
    "%MDMEV: PRACH CE-LEVEL 0",
)
# One line of modem noise at boot (a debug UART sharing the bridge, say).
_BOOT_NOISE_BYTES = 40
# A junk line longer than the host's line cap.
_OVERSIZE_BYTES = 9000


def nrf91_timing() -> Timing:
    """A timing model of an nRF9160 behind its interface MCU's USB bridge.

    115200 baud; %KEYGEN ~2.5 s (key generation in the modem's KMU plus CSR and COSE signing,
    nRF Cloud provisioning logs); a %CMNG write ~0.15 s (modem flash) and AT+CFUN=4 about as long;
    modem boot ~1 s; USB enumeration ~1 s after power-on; ±20 % between boards.
    """
    return Timing(baudrate=115200, boot_s=1.0, keygen_s=2.5, write_s=0.15, enumerate_s=1.0, jitter=0.2)


def imei_for(serial: bytes) -> str:
    """A valid 15-digit IMEI (TAC 35xxxxxx, Luhn check digit) derived from a board serial."""
    body = "35" + str(int.from_bytes(hashlib.sha256(serial).digest()[:8], "big"))[-12:].zfill(12)
    total = 0
    for i, char in enumerate(reversed(body)):
        value = int(char) * (1 if i % 2 else 2)
        total += value - 9 if value > 9 else value
    return body + str((10 - total % 10) % 10)


def b64url(data: bytes) -> str:
    """Unpadded base64url, as the modem sends it."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def cose_sign1(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """A COSE_Sign1 (tag 18) over payload: ES256, kid -2, 64-byte r||s signature."""
    protected = cbor2.dumps({1: -7})
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return cbor2.dumps(
        cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {4: KID_DEVICE_IDENTITY}, payload, signature])
    )


def sec_tag_bstr(sec_tag: int) -> bytes:
    """The sec_tag as the COSE payload carries it: a CBOR int (as int32) inside a bstr."""
    return cbor2.dumps(sec_tag - (1 << 32) if sec_tag >= 1 << 31 else sec_tag)


def with_null_parameter(csr_der: bytes) -> bytes:
    """The CSR with a NULL parameter in its ecdsa-with-SHA256 (what some modem firmware sends)."""
    outer = der.read_single(csr_der)
    info, algorithm, signature = der.read_all(outer.content)
    algorithm_with_null = der.encode(der.TAG_SEQUENCE, algorithm.content + der.encode(der.TAG_NULL, b""))
    return der.encode(der.TAG_SEQUENCE, info.raw + algorithm_with_null + signature.raw)


def _subject(attributes: str | None, default_cn: str) -> x509.Name:
    if attributes is None:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, default_cn)])
    oids = {
        "CN": NameOID.COMMON_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "C": NameOID.COUNTRY_NAME,
        "L": NameOID.LOCALITY_NAME,
        "ST": NameOID.STATE_OR_PROVINCE_NAME,
    }
    names = []
    for part in attributes.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip().upper() not in oids or not value:
            raise ValueError(f"attribute {part!r}")
        names.append(x509.NameAttribute(oids[key.strip().upper()], value))
    return x509.Name(names)


# The modem's default keyUsage request: digitalSignature, nonRepudiation, keyEncipherment, keyAgreement.
DEFAULT_CSR_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=True,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


class _Error(Exception):
    """Answer the command with this CME code (or plain ERROR for None)."""

    def __init__(self, cme: int | None = None) -> None:
        super().__init__(cme)
        self.cme = cme


class ModemReset(Exception):  # noqa: N818 - control flow inside the simulator
    """The modem reboots now, losing what it had not saved."""


@dataclass(frozen=True)
class ModemAnswer:
    """Lines to send back (without terminators), then the final result code line."""

    lines: tuple[str, ...]
    final: str


class SimNrf91Modem(SimBoard):
    """An nRF91 modem's AT behaviour; the credential store and identity survive resets."""

    def __init__(
        self,
        *,
        se: SimSecureElement | None = None,
        faults: FaultPlan = NO_FAULTS,
        timing: Timing = ZERO_TIMING,
        modem_fw: str = DEFAULT_MODEM_FW,
        imei: str | None = None,
        echo: bool = False,
        urc_rate: float = 0.0,
        cme_error: float = 0.0,
        null_param: bool = False,
        max_line: int = AT_HOST_MAX_LINE_BYTES,
    ) -> None:
        super().__init__(se=se, model=NRF91_SIM_MODEL, faults=faults, timing=timing)
        self.imei = imei or imei_for(self.se.serial)
        self.modem_fw = modem_fw
        self.device_uuid = hashlib.sha256(b"uuid" + self.se.serial).digest()[:16]
        # The identity key made at Nordic production; its public half is only in Nordic's database.
        self.identity_key = ec.generate_private_key(ec.SECP256R1())
        self.echo_at_boot = echo
        self.urc_rate = urc_rate
        self.cme_error = cme_error
        self.null_param = null_param
        self.max_line = max_line
        # (sec_tag, type) -> the stored bytes, exactly as written.
        self.store: dict[tuple[int, int], bytes] = {}
        self.keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        self.keygen_count = 0
        self.resets = 0
        self._urc_rng = random.Random(self.rng.random())  # noqa: S311 - simulation
        self.cfun = 0
        self.cmee = False
        self.echo = echo

    # State ---------------------------------------------------------------------------------

    def power_on(self) -> None:
        """Boot values: CFUN 0, no numeric errors, echo as built; arm this period's faults."""
        super().power_on()
        self.cfun = 0
        self.cmee = False
        self.echo = self.echo_at_boot

    @property
    def serial_text(self) -> str:
        """The serial the station binds the ID to."""
        return f"imei:{self.imei}"

    def open_pty(self) -> Nrf91PtyModem:
        """Serve this modem behind a fresh pseudo-terminal (the simulated hub calls this)."""
        return Nrf91PtyModem(self)

    def credential(self, sec_tag: int, cred_type: int) -> bytes | None:
        """What the store holds at (tag, type)."""
        return self.store.get((sec_tag, cred_type))

    def key_public_point(self, sec_tag: int) -> bytes | None:
        """The public point of the key in a tag (tests compare it with the certificate)."""
        key = self.keys.get(sec_tag)
        if key is None:
            return None
        return key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def stored_certificate(self, sec_tag: int = NRF_CLOUD_SEC_TAG) -> bytes | None:
        """The DER of the client certificate in a tag (the demo's end-to-end check), or None."""
        pem = self.store.get((sec_tag, CLIENT_CERT_TYPE))
        if pem is None:
            return None
        try:
            return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        except ValueError:
            return None

    def stored_device_id(self, sec_tag: int = NRF_CLOUD_SEC_TAG) -> str | None:
        """The CN of the client certificate in a tag: the device ID the modem was given, or None."""
        cert_der = self.stored_certificate(sec_tag)
        if cert_der is None:
            return None
        names = x509.load_der_x509_certificate(cert_der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    def urc(self) -> str | None:
        """A URC now, or None (drawn at ``urc_rate``)."""
        if self.urc_rate > 0 and self._urc_rng.random() < self.urc_rate:
            return self._urc_rng.choice(SAMPLE_URCS)
        return None

    # Commands ------------------------------------------------------------------------------

    async def execute(self, line: str) -> ModemAnswer:
        """Answer one command line. Raises BoardHang / ModemReset."""
        self.commands_handled += 1
        if self.fault(Fault.HANG):
            raise BoardHang
        try:
            lines = await self._dispatch(line.strip())
        except _Error as error:
            if error.cme is not None and self.cmee:
                return ModemAnswer((), f"+CME ERROR: {error.cme}")
            return ModemAnswer((), "ERROR")
        return ModemAnswer(tuple(lines), "OK")

    async def _dispatch(self, line: str) -> list[str]:
        if line == OVERFLOW:
            raise _Error()
        upper = line.upper()
        if not upper.startswith("AT"):
            raise _Error()
        if self.cme_error and self.rng.random() < self.cme_error:
            raise _Error(523 if upper.startswith("AT%KEYGEN") else None)
        if upper == "AT":
            return []
        if upper in ("ATE0", "ATE1"):
            self.echo = upper == "ATE1"
            return []
        if upper in ("AT+CMEE=0", "AT+CMEE=1"):
            self.cmee = upper.endswith("1")
            return []
        if upper == "AT+CFUN?":
            return [f"+CFUN: {self.cfun}"]
        if upper.startswith("AT+CFUN="):
            value = upper.removeprefix("AT+CFUN=")
            if not value.isdigit() or int(value) not in CFUN_MODES:
                raise _Error()
            await self.spend(self.timing.write_s)
            self.cfun = int(value)
            return []
        if upper == "AT+CGSN":
            return [self.imei]
        if upper == "AT+CGSN=1":
            return [f'+CGSN: "{self.imei}"']
        if upper == "AT+CGMR":
            return [self.modem_fw]
        if upper.startswith("AT%CMNG="):
            return await self._cmng(line[len("AT%CMNG=") :])
        if upper.startswith("AT%KEYGEN="):
            return await self._keygen(line[len("AT%KEYGEN=") :])
        if upper == "AT%ATTESTTOKEN":
            return [self._attest_token()]
        raise _Error()

    @staticmethod
    def _params(text: str) -> list[str]:
        try:
            return split_params(text)
        except ValueError:
            raise _Error() from None

    @staticmethod
    def _int(text: str, low: int, high: int) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise _Error()
        return int(text)

    async def _cmng(self, args: str) -> list[str]:
        params = self._params(args)
        op = self._int(params[0], 0, 3)
        if op == 1:
            tag = self._int(params[1], 0, 0xFFFF_FFFF) if len(params) > 1 else None
            kind = self._int(params[2], 0, 15) if len(params) > 2 else None
            return [
                f'%CMNG: {t},{k},"{hashlib.sha256(v).hexdigest().upper()}"'
                for (t, k), v in sorted(self.store.items())
                if (tag is None or t == tag) and (kind is None or k == kind)
            ]
        if len(params) < 3:
            raise _Error()
        tag, kind = self._int(params[1], 0, 0xFFFF_FFFF), self._int(params[2], 0, 15)
        if op == 2:
            stored = self.store.get((tag, kind))
            if stored is None or kind == KEY_TYPE:
                raise _Error(513 if stored is None else 514)
            return [f'%CMNG: {tag},{kind},"{hashlib.sha256(stored).hexdigest().upper()}","{stored.decode()}"']
        if self.cfun in CFUN_ACTIVE:
            raise _Error(518)
        if tag > MAX_APP_SEC_TAG:
            raise _Error(514)
        if op == 3:
            if (tag, kind) not in self.store:
                raise _Error(513)
            await self.spend(self.timing.write_s)
            del self.store[(tag, kind)]
            if kind == KEY_TYPE:
                self.keys.pop(tag, None)
            return []
        if len(params) < 4 or kind > 6 or (kind == KEY_TYPE and len(params[3]) == 0):
            raise _Error()
        content = params[3].encode("ascii")
        await self.spend(self.timing.write_s)
        if self.fault(Fault.RESET_MID_WRITE):
            raise ModemReset
        if self.fault(Fault.READBACK_DIFFERS):
            i = self.rng.randrange(len(content))
            content = content[:i] + (b"A" if content[i : i + 1] != b"A" else b"B") + content[i + 1 :]
        self.store[(tag, kind)] = content
        return []

    async def _keygen(self, args: str) -> list[str]:
        params = self._params(args)
        if len(params) < 3:
            raise _Error()
        tag = self._int(params[0], 0, 0xFFFF_FFFF)
        key_type, content = self._int(params[1], 0, 15), self._int(params[2], 0, 1)
        if key_type != KEY_TYPE or content != 0:
            raise _Error()  # endorsement keys and public-key messages are not modelled
        if self.cfun in CFUN_ACTIVE:
            raise _Error(518)
        if tag > MAX_APP_SEC_TAG:
            raise _Error(514)
        if (tag, KEY_TYPE) in self.store:
            raise _Error(519)
        attributes = params[3] if len(params) > 3 and params[3] else None
        default_cn = str(uuid.UUID(bytes=self.device_uuid))
        try:
            subject = _subject(attributes, default_cn)
        except ValueError:
            raise _Error() from None
        await self.spend(self.timing.keygen_s)
        key: ec.EllipticCurvePrivateKey = ec.generate_private_key(ec.SECP256R1())
        self.keys[tag] = key
        self.store[(tag, KEY_TYPE)] = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.keygen_count += 1
        csr_der = self._modem_csr(key, subject)
        nonce = secrets.token_bytes(16)
        payload = cbor2.dumps(
            cbor2.CBORTag(
                CBOR_SELF_DESCRIBE_TAG,
                [
                    CSR_MESSAGE_V1,
                    self.device_uuid,
                    sec_tag_bstr(tag),
                    hashlib.sha256(csr_der).digest(),
                    nonce,
                ],
            )
        )
        return [f'%KEYGEN: "{b64url(csr_der)}.{b64url(cose_sign1(self.identity_key, payload))}"']

    def _modem_csr(self, key: ec.EllipticCurvePrivateKey, subject: x509.Name) -> bytes:
        if self.fault(Fault.WRONG_CN):
            cn = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            subject = x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, str(cn[0].value)[::-1] if cn else "x")]
            )
        signing_key: ec.EllipticCurvePrivateKey = key
        if self.fault(Fault.WEAK_KEY):
            signing_key = ec.generate_private_key(ec.SECP384R1())
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        builder = builder.add_extension(DEFAULT_CSR_KEY_USAGE, critical=False)
        csr_der = builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        if self.fault(Fault.BAD_CSR_SIGNATURE):
            csr_der = csr_der[:-1] + bytes([csr_der[-1] ^ 0x01])
        if self.null_param:
            csr_der = with_null_parameter(csr_der)
        return csr_der

    def _attest_token(self) -> str:
        body = cbor2.dumps(
            cbor2.CBORTag(
                CBOR_SELF_DESCRIBE_TAG,
                [
                    IDENTITY_MESSAGE_V1,
                    self.device_uuid,
                    NRF9160_SIAA,
                    hashlib.sha256(self.modem_fw.encode()).digest()[:16],
                    secrets.token_bytes(16),
                ],
            )
        )
        protected = cbor2.dumps({1: -7})
        to_sign = cbor2.dumps(["Signature1", protected, b"", body])
        r, s = decode_dss_signature(self.identity_key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
        cose = cbor2.dumps(
            cbor2.CBORTag(
                COSE_SIGN1_TAG,
                [protected, {4: KID_DEVICE_IDENTITY}, None, r.to_bytes(32, "big") + s.to_bytes(32, "big")],
            )
        )
        return f'%ATTESTTOKEN: "{b64url(body)}.{b64url(cose)}"'


class Nrf91PtyModem(PtyEndpoint):
    """Serves one SimNrf91Modem on a fresh pseudo-terminal until closed (one power-on period)."""

    board: SimNrf91Modem

    def __init__(self, board: SimNrf91Modem) -> None:
        super().__init__(board)
        self._decoder = AtCommandDecoder(max_line=board.max_line)

    async def _boot(self) -> None:
        board = self.board
        board.power_on()
        await board.spend(board.jittered(board.timing.boot_s))
        if board.fault(Fault.BOOT_GARBAGE):
            noise = bytes(board.rng.randrange(0x80, 0x100) for _ in range(_BOOT_NOISE_BYTES))
            await self._send(b"\r\n" + noise + b"\r\n")
        await self._line(READY_URC)

    async def _line(self, text: str) -> None:
        await self._send(text.encode("ascii") + b"\r\n")

    async def _handle(self, item: object) -> None:
        if not isinstance(item, str):
            return
        board = self.board
        await board.spend(board.wire_s(len(item) + 2))
        if board.echo and item != OVERFLOW:
            await self._line(item)
        try:
            answer = await board.execute(item)
        except BoardHang:
            self.hung = True
            log.debug("sim modem hangs", imei=board.imei)
            return
        except ModemReset:
            board.resets += 1
            self._drain()
            await self._boot()
            return
        lines = [*answer.lines, answer.final]
        if board.fault(Fault.OVERSIZE_FRAME):
            await self._send(b"~" * _OVERSIZE_BYTES + b"\r\n")
        if answer.lines and board.fault(Fault.CORRUPT_BYTE):
            # One character of a data line changes into another printable one: nothing on the line notices.
            i = board.rng.randrange(len(answer.lines))
            text = answer.lines[i]
            at = board.rng.randrange(len(text))
            swapped = "B" if text[at] != "B" else "C"
            lines[i] = text[:at] + swapped + text[at + 1 :]
        if board.fault(Fault.DROP_REPLY):
            data = "\r\n".join(lines).encode("ascii")
            await self._send(data[: max(1, len(data) // 2)])  # a truncated line; the rest never comes
            return
        for line in lines:
            urc = board.urc()
            if urc is not None:
                await self._line(urc)
            await self._line(line)

    def _drain(self) -> None:
        while not self._inbox.empty():
            self._inbox.get_nowait()

    def _received(self, data: bytes) -> None:
        for command in self._decoder.feed(data):
            self._inbox.put_nowait(command)


def serve_nrf91_pty(modem: SimNrf91Modem) -> contextlib.AbstractAsyncContextManager[PtyEndpoint]:
    """Run a modem behind a pty for the duration of the block (see factoryd.sim.pty.serve_pty)."""
    return serve_pty(modem)
