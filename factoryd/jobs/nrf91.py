"""The nrf91-at job: a cellular modem on stock firmware, provisioned over AT commands (docs/nrf91.md).

identify: ``AT+CMEE=1``, ``AT+CFUN=4`` (offline: %CMNG and %KEYGEN refuse while online), the IMEI
(``AT+CGSN``; the job is bound to ``imei:<IMEI>``) and the modem firmware (``AT+CGMR``).
existing (before an ID is reserved): the firmware must be at least the lot's ``modem_fw_min`` and
this job's floor; credentials already in the lot's security tag are this job's own from an
interrupted attempt (deleted, resumed), or exactly what the ledger recorded for this IMEI
(re-checked), or the board is refused, or — when the lot allows rework — deleted and provisioned
again.

provision: ``AT%KEYGEN`` in the tag with the templated CN, and the COSE attestation's CSR digest
checked against the CSR bytes (a mismatch is line corruption: the step makes a new key) → the CSR
verified as in every profile, and the attestation's signature when the lot has
``nrf91_identity_keys`` → issue → ``AT%CMNG=0`` the lot's CA chain (type 0) and the certificate
(type 1) → ``AT%CMNG=1`` list, the SHA-256 of each compared with what was written, the key
(type 2) present.

The modem cannot sign a challenge: the write-back check proves what the modem stored, not that
the key is the one certified (docs/nrf91.md says what each check proves).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509.oid import ExtensionOID

from factoryd.errors import (
    BundleError,
    CsrRejectedError,
    IssuanceError,
    ProtocolViolationError,
    ReadbackMismatchError,
    RefusedBoardError,
)
from factoryd.jobs.board import (
    ClientSession,
    Finished,
    JobHost,
    csr_key_point,
    issue_certificate,
    issue_remote,
)
from factoryd.jobs.steps import Step
from factoryd.ledger.model import DeviceRecord, DeviceState
from factoryd.pki import der
from factoryd.pki.issuer import IssuedCertificate, verify_csr
from factoryd.protocol.native import Timeouts
from factoryd.protocol.nrf91 import (
    AtCommandError,
    CmeError,
    CredentialType,
    KeygenReply,
    ModemFirmware,
    Nrf91Client,
    Nrf91Timeouts,
    cmng_write_command,
    credential_map,
    parse_version,
)
from factoryd.transport.at_codec import COMMAND_TERMINATOR, encode_command

if TYPE_CHECKING:
    from factoryd.hub.base import Hub
    from factoryd.jobs.lots import LotContext
    from factoryd.jobs.pipeline import PipelineSettings
    from factoryd.ledger.profile import LotProfile

# The job's steps in order (the station page's progress scale; BoardProfile.steps). HELLO is the
# AT identification (offline, IMEI, firmware); KEYGEN includes the COSE digest check, CSR the CSR's.
NRF91_STEPS = (
    Step.POWER,
    Step.ENUMERATE,
    Step.HELLO,
    Step.RESERVE,
    Step.KEYGEN,
    Step.CSR,
    Step.ISSUE,
    Step.WRITE,
    Step.RECORD,
)
# %KEYGEN needs mfw 1.3.0; %CMNG lists SHA-256 values from 1.3.2, which the write-back check needs.
JOB_FW_FLOOR = (1, 3, 2)
OFFLINE_MODE = 4
# The credentials a provisioned tag holds: the CA chain, the certificate, the modem's key.
OWNED_TYPES = (CredentialType.ROOT_CA, CredentialType.CLIENT_CERT, CredentialType.CLIENT_KEY)
# COSE_Sign1 and the %KEYGEN payload (NRF91_AT.md).
COSE_SIGN1_TAG = 18
CBOR_SELF_DESCRIBE_TAG = 55799
CSR_MESSAGE_V1 = 9
IDENTITY_MESSAGE_V1 = 1
ES256 = -7
UUID_BYTES = 16
SHA256_BYTES = 32
P256_SIGNATURE_BYTES = 64


def lot_fw_floor(profile: LotProfile) -> tuple[int, int, int]:
    """The lowest modem firmware a lot accepts: its ``modem_fw_min``, never below the job's floor."""
    wanted = parse_version(profile.modem_fw_min) if profile.modem_fw_min else JOB_FW_FLOOR
    return max(wanted, JOB_FW_FLOOR)


def pem_text(pem: bytes | str) -> str:
    """A PEM as the job writes it: CRLF line ends (as Nordic's installer), no trailing line end."""
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    return "\r\n".join(line.rstrip("\r") for line in text.strip().split("\n"))


def sha256_upper(text: str) -> str:
    """The SHA-256 the modem lists for stored text."""
    return hashlib.sha256(text.encode("ascii")).hexdigest().upper()


def check_chain_fits(profile: LotProfile, chain_pem: bytes, lot: str = "the lot") -> None:
    """Refuse a CA chain whose ``AT%CMNG`` write cannot fit the lot's line limit (BundleError).

    The limit is the smallest line buffer of every hop to the modem (``at_line_max_bytes``; the
    modem's AT host holds 4096): a longer line makes a bridge hang or the modem answer ERROR, on
    every board. Called when a bundle is stored for an nrf91-at lot, and again before KEYGEN.
    """
    line = cmng_write_command(profile.sec_tag, CredentialType.ROOT_CA, pem_text(chain_pem))
    try:
        encode_command(line, max_line=profile.at_line_max_bytes)
    except ValueError:
        raise BundleError(
            f"{lot}: the CA chain's AT%CMNG write is {len(line) + 2} bytes, more than the "
            f"{profile.at_line_max_bytes}-byte AT line every hop to the modem buffers "
            "(at_line_max_bytes); write fewer certificates into the modem's trust store"
        ) from None


@dataclass(frozen=True)
class KeygenAttestation:
    """The COSE_Sign1 that comes with a %KEYGEN CSR, decoded (NRF91_AT.md)."""

    device_uuid: bytes
    sec_tag: int
    csr_sha256: bytes
    nonce: bytes
    kid: bytes | None
    # What the identity key signed (the COSE Sig_structure) and its r||s signature.
    signed: bytes
    signature: bytes

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> bool:
        """Whether the signature verifies with a device identity key."""
        r = int.from_bytes(self.signature[:32], "big")
        s = int.from_bytes(self.signature[32:], "big")
        try:
            public_key.verify(encode_dss_signature(r, s), self.signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


def _violation(what: str) -> ProtocolViolationError:
    return ProtocolViolationError(f"the %KEYGEN attestation {what}")


def parse_keygen_cose(cose: bytes) -> KeygenAttestation:
    """Decode the COSE_Sign1 of a %KEYGEN answer; ProtocolViolationError naming what is wrong."""
    try:
        outer = cbor2.loads(cose)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as exc:
        raise _violation(f"is not CBOR ({exc})") from None
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise _violation("is not a COSE_Sign1 (CBOR tag 18)")
    value = outer.value
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise _violation("is not a 4-element COSE_Sign1")
    protected, unprotected, payload, signature = value
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise _violation("has fields of the wrong type")
    try:
        header = cbor2.loads(protected)
        body: Any = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as exc:
        raise _violation(f"header or payload is not CBOR ({exc})") from None
    if not isinstance(header, Mapping) or header.get(1) != ES256:
        raise _violation(f"is not ES256 (protected header {header!r})")
    if len(signature) != P256_SIGNATURE_BYTES:
        raise _violation(f"signature is {len(signature)} bytes, not {P256_SIGNATURE_BYTES}")
    if isinstance(body, cbor2.CBORTag) and body.tag == CBOR_SELF_DESCRIBE_TAG:
        body = body.value
    if not isinstance(body, list | tuple) or len(body) != 5 or body[0] != CSR_MESSAGE_V1:
        raise _violation("payload is not a CSR message v1 (type 9)")
    _, device_uuid, tag_bstr, digest, nonce = body
    if not (isinstance(device_uuid, bytes) and len(device_uuid) == UUID_BYTES):
        raise _violation("has no 16-byte device UUID")
    if not (isinstance(digest, bytes) and len(digest) == SHA256_BYTES) or not isinstance(nonce, bytes):
        raise _violation("has no SHA-256 digest or nonce")
    try:
        sec_tag = cbor2.loads(tag_bstr) if isinstance(tag_bstr, bytes) else None
    except (cbor2.CBORDecodeError, ValueError):
        sec_tag = None
    if not isinstance(sec_tag, int):
        raise _violation("has no security tag")
    kid = unprotected.get(4) if isinstance(unprotected, Mapping) else None
    signed = cbor2.dumps(["Signature1", protected, b"", payload])
    return KeygenAttestation(
        device_uuid=device_uuid,
        sec_tag=sec_tag + (1 << 32) if sec_tag < 0 else sec_tag,
        csr_sha256=digest,
        nonce=nonce,
        kid=kid if isinstance(kid, bytes) else None,
        signed=signed,
        signature=signature,
    )


def parse_attestation_token(body: bytes, cose: bytes) -> KeygenAttestation:
    """Decode ``AT%ATTESTTOKEN`` (identity message v1 and its detached-payload COSE_Sign1).

    Returned in the shape of a KeygenAttestation (no CSR digest, no tag) so one ``verify`` serves both.
    """
    try:
        message: Any = cbor2.loads(body)
        outer = cbor2.loads(cose)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as exc:
        raise ProtocolViolationError(f"the attestation token is not CBOR ({exc})") from None
    if isinstance(message, cbor2.CBORTag) and message.tag == CBOR_SELF_DESCRIBE_TAG:
        message = message.value
    if not isinstance(message, list | tuple) or len(message) != 5 or message[0] != IDENTITY_MESSAGE_V1:
        raise ProtocolViolationError("the attestation token is not an identity message v1")
    device_uuid = message[1]
    if not (isinstance(device_uuid, bytes) and len(device_uuid) == UUID_BYTES):
        raise ProtocolViolationError("the attestation token has no 16-byte device UUID")
    value = outer.value if isinstance(outer, cbor2.CBORTag) and outer.tag == COSE_SIGN1_TAG else None
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise ProtocolViolationError("the attestation token's COSE is not a COSE_Sign1")
    protected, _, _, signature = value
    if not isinstance(protected, bytes) or not isinstance(signature, bytes):
        raise ProtocolViolationError("the attestation token's COSE has fields of the wrong type")
    if len(signature) != P256_SIGNATURE_BYTES:
        raise ProtocolViolationError(f"the attestation token's signature is {len(signature)} bytes")
    return KeygenAttestation(
        device_uuid=device_uuid,
        sec_tag=-1,
        csr_sha256=b"",
        nonce=b"",
        kid=None,
        signed=cbor2.dumps(["Signature1", protected, b"", body]),
        signature=signature,
    )


def identity_key(profile: LotProfile, device_uuid: bytes) -> ec.EllipticCurvePublicKey | None:
    """The lot's device identity key for a modem (None when the lot lists none for it)."""
    pem = profile.nrf91_identity_keys.get(device_uuid.hex())
    if pem is None:
        return None
    key = load_pem_public_key(pem.encode("ascii"))
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def csr_without_null_parameter(csr_der: bytes) -> bytes:
    """The CSR re-encoded without a NULL parameter in its signature algorithm (as nrfcloud-utils does).

    Some modem firmware sends ecdsa-with-SHA256 with a NULL parameter, which RFC 5758 forbids and
    Python's cryptography refuses; the signature covers only the request info, so it still holds.
    """
    try:
        outer = der.expect(der.read_single(csr_der), der.TAG_SEQUENCE, "CSR")
        parts = der.read_all(outer.content)
        if len(parts) != 3:
            return csr_der
        info, algorithm, signature = parts
        inner = der.read_all(algorithm.content)
    except der.DerError:
        return csr_der  # not ours to judge: verify_csr refuses what does not parse
    if len(inner) != 2 or inner[1].tag != der.TAG_NULL or inner[1].content:
        return csr_der
    return der.encode(der.TAG_SEQUENCE, info.raw + der.encode(der.TAG_SEQUENCE, inner[0].raw) + signature.raw)


def check_keygen(reply: KeygenReply, sec_tag: int) -> KeygenAttestation:
    """Decode the attestation; the CSR bytes must be those it names, in the tag asked for."""
    attestation = parse_keygen_cose(reply.cose)
    if attestation.csr_sha256 != hashlib.sha256(reply.csr_der).digest():
        # The modem hashed the CSR it made: different bytes here were changed on the line.
        raise ProtocolViolationError(
            "the CSR's SHA-256 is not the one the modem's attestation names: changed on the line"
        )
    if attestation.sec_tag != sec_tag:
        # KEYGEN named the lot's tag; an attestation naming another was most likely changed on the
        # line (the CSR digest covers the CSR, not this field): the step makes a new key. A modem
        # that keeps doing it runs out of step attempts and fails with this reason.
        raise ProtocolViolationError(
            f"the modem's attestation names security tag {attestation.sec_tag}, not the lot's {sec_tag}"
        )
    return attestation


def verify_nrf91_csr(
    lot: LotContext,
    device_id: str,
    fields: Mapping[str, str],
    csr_der: bytes,
    *,
    attestation: KeygenAttestation | None,
    hw_serial: str,
) -> x509.CertificateSigningRequest:
    """The nrf91-at CSR rules, of the station and of the line's signer alike.

    ``csr_der`` as the modem sent it; ``attestation`` its %KEYGEN COSE, already bound to those bytes
    and the lot's tag (``check_keygen``). With the lot's ``nrf91_identity_keys`` the attestation is
    required and must verify with the identity key of the device it names.
    """
    issuer = lot.issuer
    # The modem always asks for its default keyUsage; the certificate gets the lot's own, so the
    # request is tolerated (and ignored) like the extensions the lot's profile allows.
    allowed = issuer.profile.allowed_csr_extensions | {ExtensionOID.KEY_USAGE}
    csr = verify_csr(
        csr_without_null_parameter(csr_der),
        issuer.common_name(device_id, fields),
        allowed_extensions=frozenset(allowed),
    )
    if lot.profile.nrf91_identity_keys:
        if attestation is None:
            raise CsrRejectedError(
                f"the CSR of modem {hw_serial} comes without its %KEYGEN attestation, and the lot lists "
                "its modems' identity keys"
            )
        # The token was checked before the reservation; the CSR's attestation must come from a
        # listed identity key too.
        key = identity_key(lot.profile, attestation.device_uuid)
        if key is None or not attestation.verify(key):
            raise CsrRejectedError(
                f"the %KEYGEN attestation of modem {hw_serial} does not verify with the identity "
                f"key of device {attestation.device_uuid.hex()}"
            )
    return csr


def verify_nrf91_request(
    lot: LotContext,
    device_id: str,
    fields: Mapping[str, str],
    csr_der: bytes,
    *,
    cose: bytes | None,
    hw_serial: str,
) -> x509.CertificateSigningRequest:
    """``verify_nrf91_csr`` on the line's signer: the COSE first bound to the CSR as KEYGEN binds it."""
    attestation = None
    if cose is not None:
        try:
            attestation = check_keygen(KeygenReply(csr_der=csr_der, cose=cose), lot.profile.sec_tag)
        except ProtocolViolationError as exc:
            raise CsrRejectedError(str(exc)) from None
    return verify_nrf91_csr(lot, device_id, fields, csr_der, attestation=attestation, hw_serial=hw_serial)


def _timeouts(settings: PipelineSettings) -> Nrf91Timeouts:
    """The AT timeouts, scaled as the pipeline's native ones are (``jobs.reply_timeout_scale``)."""
    scale = settings.timeouts.hello_s / Timeouts().hello_s
    base = Nrf91Timeouts()
    return replace(base, **{f.name: getattr(base, f.name) * scale for f in fields(base)})


class Nrf91Session(ClientSession[Nrf91Client]):
    """One attempt of the nrf91-at job on one tty."""

    identify_step = Step.HELLO

    def __init__(self, hub: Hub, port: str, path: str, settings: PipelineSettings) -> None:
        super().__init__(hub, port, path, settings)
        self._firmware: ModemFirmware | None = None
        self._imei: str | None = None
        self.attestation: KeygenAttestation | None = None

    async def _open(self) -> Nrf91Client:
        return await Nrf91Client.open(
            self._path, baudrate=self._settings.baudrate, timeouts=_timeouts(self._settings)
        )

    async def _offline(self) -> None:
        client = self.client
        await client.enable_error_codes()
        await client.set_function_mode(OFFLINE_MODE)
        mode = await client.function_mode()
        if mode != OFFLINE_MODE:
            raise ProtocolViolationError(f"modem on {self._path} reports CFUN {mode} after AT+CFUN=4")

    async def identify(self) -> str:
        """Offline, then the IMEI (the serial the ID is bound to) and the modem firmware."""
        await self._offline()
        self._imei = await self.client.imei()
        self._firmware = await self.client.modem_firmware()
        return f"imei:{self._imei}"

    def wanted_device_id(self, host: JobHost) -> str | None:
        """With ``device_id_from = imei``: the lot's template applied to this modem's IMEI."""
        if host.lot.profile.device_id_from != "imei":
            return None
        if self._imei is None:
            raise RuntimeError("Nrf91Session.wanted_device_id() before identify()")
        return host.lot.profile.derived_device_id(self._imei)

    async def existing(self, host: JobHost) -> Finished | None:
        """Refuse old modem firmware; handle credentials already in the lot's tag (see the module doc)."""
        firmware, lot = self._firmware, host.lot
        if firmware is None:
            raise RuntimeError("Nrf91Session.existing() before identify()")
        floor = lot_fw_floor(lot.profile)
        if firmware.version < floor:
            raise RefusedBoardError(
                f"modem {host.hw_serial} runs {firmware.text} ({firmware.version_text}); "
                f"lot {lot.name} needs "
                f"modem firmware {'.'.join(map(str, floor))} or later: update it before provisioning"
            )
        if lot.profile.nrf91_identity_keys:
            await self._check_identity(host)
        # Refused before an ID is reserved: a chain the line cannot carry would fail every board
        # (a backstop: the bundle is checked when it is stored).
        check_chain_fits(lot.profile, lot.chain_pem, lot=f"lot {lot.name}")
        # Every line to this modem, the certificate's too, must fit the lot's smallest hop.
        self.client.max_line = min(self.client.max_line, lot.profile.at_line_max_bytes)
        tag = lot.profile.sec_tag
        held = credential_map(await self.client.list_credentials(tag), tag)
        if not held.keys() & set(OWNED_TYPES):
            return None
        record = await host.ledger.find_by_serial(lot.name, host.hw_serial)
        if record is not None and record.state is DeviceState.RESERVED:
            # An interrupted attempt of this very job left them: start the board steps again.
            await self._clear_tag(tag)
            return None
        if (
            record is not None
            and record.state is DeviceState.PROVISIONED
            and self._holds_record(lot, held, record)
        ):
            # Reinserted: it holds exactly what the ledger recorded (as strong as the write-back check).
            await host.audit(
                "device.rechecked",
                record.device_id,
                {"hw_serial": host.hw_serial, "port": host.port, "job_id": host.job_id, "sec_tag": tag},
            )
            return Finished("rechecked", record.device_id)
        if not lot.profile.allow_rework:
            what = ", ".join(CredentialType(t).name for t in sorted(held) if t in OWNED_TYPES)
            state = f"provisioned as {record.device_id}" if record is not None else "holding credentials"
            raise RefusedBoardError(
                f"modem {host.hw_serial} is {state}: security tag {tag} has {what}; the modem cannot prove "
                "its key by challenge and the lot does not allow rework"
            )
        await host.audit(
            "device.rework",
            record.device_id if record is not None else host.hw_serial,
            {"hw_serial": host.hw_serial, "port": host.port, "sec_tag": tag, "types": sorted(held)},
        )
        await self._clear_tag(tag)
        return None

    async def _check_identity(self, host: JobHost) -> None:
        """The lot lists its modems' identity keys: this one must be listed and sign with its key."""
        token = parse_attestation_token(*await self.client.attestation_token())
        key = identity_key(host.lot.profile, token.device_uuid)
        if key is None:
            raise RefusedBoardError(
                f"modem {host.hw_serial} (device UUID {token.device_uuid.hex()}) is not among the lot's "
                f"{len(host.lot.profile.nrf91_identity_keys)} modems with a device identity key"
            )
        if not token.verify(key):
            raise RefusedBoardError(
                f"the attestation token of modem {host.hw_serial} does not verify with the identity key of "
                f"device {token.device_uuid.hex()}: not the modem Nordic registered"
            )

    @staticmethod
    def _holds_record(lot: LotContext, held: Mapping[int, str], record: DeviceRecord) -> bool:
        """Whether the tag lists the recorded certificate, the lot's chain and a key."""
        if record.cert_der is None or CredentialType.CLIENT_KEY not in held:
            return False
        cert_pem = IssuedCertificate.from_certificate(x509.load_der_x509_certificate(record.cert_der)).pem
        return held.get(CredentialType.CLIENT_CERT) == sha256_upper(pem_text(cert_pem)) and held.get(
            CredentialType.ROOT_CA
        ) == sha256_upper(pem_text(lot.chain_pem))

    async def _clear_tag(self, tag: int) -> None:
        for kind in OWNED_TYPES:
            await self.client.delete_credential(tag, kind, missing_ok=True)

    async def provision(self, host: JobHost, device_id: str) -> IssuedCertificate:
        """KEYGEN + attestation digest, CSR, issue, write CA chain and certificate, list and compare."""
        lot, client = host.lot, self.client
        tag = lot.profile.sec_tag
        issuer = lot.issuer
        common_name = issuer.common_name(device_id, host.device_fields)

        async def keygen() -> KeygenReply:
            try:
                reply = await client.keygen(tag, f"CN={common_name}")
            except AtCommandError as exc:
                if exc.cme is not CmeError.EXISTS:
                    raise
                # A key of an earlier try of this step (its answer was lost or corrupted): replace it.
                await client.delete_credential(tag, CredentialType.CLIENT_KEY, missing_ok=True)
                reply = await client.keygen(tag, f"CN={common_name}")
            self.attestation = check_keygen(reply, tag)
            return reply

        reply = await host.step(Step.KEYGEN, keygen)
        csr = await host.step(Step.CSR, lambda: self._verify_csr(host, device_id, reply))

        async def issue() -> IssuedCertificate:
            if lot.remote is not None:
                # The modem answers a CSR, not a key: the key reported is the CSR's. The signer gets
                # the CSR as the modem sent it and its %KEYGEN attestation, and applies the same rules.
                return await issue_remote(
                    host, device_id, reply.csr_der, csr_key_point(csr), keygen_attestation=reply.cose
                )
            issued = await issue_certificate(issuer, csr, device_id, host.device_fields)
            await host.audit_issued(device_id, issued)
            return issued

        issued = await host.step(Step.ISSUE, issue)
        contents = {
            CredentialType.ROOT_CA: pem_text(lot.chain_pem),
            CredentialType.CLIENT_CERT: pem_text(issued.pem),
        }
        await host.step(Step.WRITE, lambda: self._write_verified(tag, contents))
        return issued

    async def _verify_csr(
        self, host: JobHost, device_id: str, reply: KeygenReply
    ) -> x509.CertificateSigningRequest:
        return verify_nrf91_csr(
            host.lot,
            device_id,
            host.device_fields,
            reply.csr_der,
            attestation=self.attestation,
            hw_serial=host.hw_serial,
        )

    async def _write_verified(self, tag: int, contents: Mapping[CredentialType, str]) -> None:
        client = self.client
        if client.boots_seen:
            await self._offline()  # a reset put the modem back to CFUN 0 and plain ERRORs
        for kind, text in contents.items():
            line = cmng_write_command(tag, kind, text)
            if len(line) + len(COMMAND_TERMINATOR) > client.max_line:
                raise IssuanceError(
                    f"the AT%CMNG write of {kind.name} is {len(line) + len(COMMAND_TERMINATOR)} bytes, more "
                    f"than the {client.max_line}-byte line limit (at_line_max_bytes): nothing was written"
                )
        for kind, text in contents.items():
            await client.delete_credential(tag, kind, missing_ok=True)
            await client.write_credential(tag, kind, text)
        listed = credential_map(await client.list_credentials(tag), tag)
        for kind, text in contents.items():
            got = listed.get(kind)
            if got != sha256_upper(text):
                raise ReadbackMismatchError(
                    f"security tag {tag} type {kind.name}: the modem lists SHA-256 {got or 'nothing'}, "
                    f"not {sha256_upper(text)} of what was written"
                )
        if CredentialType.CLIENT_KEY not in listed:
            # Transient like a hash mismatch: a list line changed on the line looks the same.
            raise ReadbackMismatchError(f"security tag {tag} lists no private key after the write")
