"""The factoryd-v1 job: the board steps between "bound to an ID" and "recorded".

HELLO identifies the board by its secure-element serial. Once the pipeline has bound the job to
it, the re-check hook updates the firmware when the lot asks for another image, then looks at what
the board already holds: an interrupted job resumes, a locked board interrupted before its record
is completed from what it holds, a board of ours is re-checked by challenge, a foreign one is
reworked (when the lot allows it) or refused. Provisioning is GENKEY → GET_CSR → verify CSR →
issue → WRITE + READ back each object → SIGN challenge → (LOCK).

A lot with ``attestation = required`` has the pipeline call ``attest`` before the reservation:
GENKEY_ATTESTED (the key and the secure element's statement over the station's nonce) then SIGN of
a second fresh challenge with the new key (possession). Provisioning then skips GENKEY and checks
that the CSR carries the attested key.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.errors import (
    BoardStatusError,
    CsrRejectedError,
    FirmwareRejectedError,
    ReadbackMismatchError,
    RefusedBoardError,
    VerificationError,
)
from factoryd.jobs.board import Finished, JobHost, closed_link_stats, issue_certificate
from factoryd.jobs.steps import Step
from factoryd.ledger.model import DeviceRecord, DeviceState
from factoryd.pki.attestation import AttestationError, AttestationEvidence, AttestationResult, check_csr_key
from factoryd.pki.challenge import verify_challenge
from factoryd.pki.issuer import IssuedCertificate
from factoryd.protocol.messages import IDENTITY_SLOT, BoardInfo, ObjectId, Status
from factoryd.protocol.native import BoardClient
from factoryd.telemetry.events import LinkStats

if TYPE_CHECKING:
    from factoryd.hub.base import Hub
    from factoryd.jobs.lots import LotContext
    from factoryd.jobs.pipeline import PipelineSettings

CHALLENGE_BYTES = 32


# The job's steps in order (the station page's progress scale; BoardProfile.steps).
NATIVE_STEPS = (
    Step.POWER,
    Step.ENUMERATE,
    Step.HELLO,
    Step.FIRMWARE,
    Step.ATTEST,
    Step.RESERVE,
    Step.KEYGEN,
    Step.CSR,
    Step.ISSUE,
    Step.WRITE,
    Step.CHALLENGE,
    Step.LOCK,
    Step.RECORD,
)


class NativeSession:
    """One attempt of the factoryd-v1 job on one tty."""

    identify_step = Step.HELLO

    def __init__(self, hub: Hub, port: str, path: str, settings: PipelineSettings) -> None:
        self._port = port
        self._path = path
        self._settings = settings
        self._client: BoardClient | None = None
        self._info: BoardInfo | None = None
        # The attested identity key (set once the pipeline verified the attestation): no new GENKEY.
        self._attested_point: bytes | None = None

    async def __aenter__(self) -> Self:
        settings = self._settings
        self._client = await BoardClient.open(
            self._path, baudrate=settings.baudrate, timeouts=settings.timeouts, resends=settings.resends
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> BoardClient:
        """The open client."""
        if self._client is None:
            raise RuntimeError("NativeSession used outside its async with block")
        return self._client

    def link_stats(self) -> LinkStats | None:
        """Traffic of the session's link."""
        client = self._client
        return None if client is None else closed_link_stats(self._port, client.link, client.stats)

    async def identify(self) -> str:
        """HELLO: the secure-element serial."""
        self._info = info = await self.client.hello()
        return info.serial_hex

    async def existing(self, host: JobHost) -> Finished | None:
        """Firmware update when the lot asks for it; then re-check a board that holds an identity."""
        info = self._info
        if info is None:
            raise RuntimeError("NativeSession.existing() before identify()")
        info = self._info = await self._ensure_firmware(host, info)
        if info.locked or info.objects & {ObjectId.DEVICE_ID, ObjectId.DEVICE_CERT}:
            return await self._recheck(host, info)
        return None

    async def attest(self, host: JobHost, nonce: bytes) -> AttestationEvidence:
        """GENKEY_ATTESTED over the station's nonce, then the new key signs a second fresh challenge."""
        client = self.client
        try:
            reply = await client.genkey_attested(nonce)
        except BoardStatusError as exc:
            if exc.status in (Status.NO_KEY, Status.UNKNOWN_COMMAND):
                raise AttestationError(
                    "attestation_missing", f"board answered GENKEY_ATTESTED with {Status(exc.status).name}"
                ) from exc
            raise
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        possession = await client.sign(challenge)
        return AttestationEvidence(
            slot=IDENTITY_SLOT,
            nonce=reply.nonce,
            public_key=reply.public_key,
            signature=reply.signature,
            chain=reply.chain,
            possession_challenge=challenge,
            possession_signature=possession,
        )

    def attested(self, result: AttestationResult) -> None:
        """Provision with the attested key."""
        self.use_key(result.public_key)

    async def prove_key(self, host: JobHost, challenge: bytes) -> bytes:
        """SIGN with the identity slot's key as it is (a pre-registered part keeps its key)."""
        return await self.client.sign(challenge)

    def use_key(self, public_key: bytes) -> None:
        """Provision with this key instead of generating one."""
        self._attested_point = public_key

    async def provision(self, host: JobHost, device_id: str) -> IssuedCertificate:
        """GENKEY (unless the key was attested), CSR, issue, write + read back, challenge, (lock)."""
        client, lot = self.client, host.lot
        attested = self._attested_point
        point = attested if attested is not None else await host.step(Step.KEYGEN, client.genkey)
        # The board names itself in its CSR with the CN of the lot's subject template.
        common_name = lot.issuer.common_name(device_id, host.device_fields)
        csr_der = await host.step(Step.CSR, lambda: client.get_csr(common_name))
        issued = await host.step(
            Step.ISSUE, lambda: self._issue(host, device_id, csr_der, point, attested=attested is not None)
        )

        for obj, data in board_objects(lot, device_id, issued.der):
            await host.step(Step.WRITE, lambda o=obj, d=data: self._write_verified(o, d))  # type: ignore[misc]

        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        signature = await host.step(Step.CHALLENGE, lambda: client.sign(challenge))
        verify_challenge(issued.cert, challenge, signature)

        if lot.profile.lock:
            await host.step(Step.LOCK, client.lock)
            if not (await client.hello()).locked:
                raise VerificationError("board acknowledged LOCK but reports itself unlocked")
        return issued

    async def _ensure_firmware(self, host: JobHost, info: BoardInfo) -> BoardInfo:
        lot, client = host.lot, self.client
        wanted = lot.profile.firmware_sha256
        if wanted is None or info.fw_sha256.hex() == wanted:
            return info
        firmware = lot.firmware
        if firmware is None or firmware.sha256.hex() != wanted:
            raise FirmwareRejectedError(
                f"lot {lot.name} asks for firmware {wanted[:12]}… but the station has no signed image for it",
                0,
            )
        # The board's bootloader verifies the MCUboot image again; the hash it reports is the image's
        # SHA256 TLV, which must be the lot's firmware_sha256.
        await host.step(
            Step.FIRMWARE,
            lambda: client.update_firmware(firmware.data, firmware.version, firmware.sha256),
        )
        info = await client.hello()
        if info.fw_sha256.hex() != wanted:
            raise FirmwareRejectedError(f"board runs {info.fw_sha256.hex()[:12]}… after the update", 0)
        return info

    async def _recheck(self, host: JobHost, info: BoardInfo) -> Finished | None:
        """A board that already holds an identity: re-check it, resume it, rework it, or refuse it."""
        lot, client = host.lot, self.client
        serial = info.serial_hex
        reserved = await host.ledger.find_by_serial(lot.name, serial)
        if reserved is not None and reserved.state is DeviceState.RESERVED:
            if not info.locked:
                return None  # an interrupted job on this very board: resume with its reservation
            # Interrupted between LOCK and the ledger record: the board can no longer be written, so
            # finish the job from what it holds, after proving it is exactly what we issued.
            return await self._complete_locked(host, reserved.device_id, reserved.metadata)
        raw_id = await client.read(ObjectId.DEVICE_ID)
        stored_id = raw_id.decode("utf-8", errors="replace").rstrip("\x00")
        record: DeviceRecord | None = await host.ledger.find_device(stored_id) if stored_id else None
        ours = record is not None and record.lot == lot.name and record.hw_serial == serial
        if ours and record is not None and record.state is DeviceState.PROVISIONED:
            cert_der = await client.read(ObjectId.DEVICE_CERT)
            if hashlib.sha256(cert_der).hexdigest() != record.fingerprint_sha256:
                raise ReadbackMismatchError(
                    f"{stored_id}: certificate on the board differs from the ledger's"
                )
            challenge = secrets.token_bytes(CHALLENGE_BYTES)
            signature = await host.step(Step.RECHECK, lambda: client.sign(challenge))
            verify_challenge(x509.load_der_x509_certificate(cert_der), challenge, signature)
            await host.audit(
                "device.rechecked", stored_id, {"hw_serial": serial, "port": host.port, "job_id": host.job_id}
            )
            return Finished("rechecked", stored_id)
        if lot.profile.allow_rework and not info.locked:
            await host.audit(
                "device.rework",
                stored_id or serial,
                {"hw_serial": serial, "port": host.port, "previous_lot": record.lot if record else None},
            )
            return None
        where = f"ID {stored_id!r}" if stored_id else "a certificate"
        state = "locked, " if info.locked else ""
        raise RefusedBoardError(
            f"board {serial} is {state}already provisioned with {where}; lot does not allow rework"
        )

    async def _complete_locked(self, host: JobHost, device_id: str, fields: Mapping[str, str]) -> Finished:
        client = self.client
        cert_der = await client.read(ObjectId.DEVICE_CERT)
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            cert.verify_directly_issued_by(host.lot.issuer.chain[0])
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise VerificationError(f"{device_id}: certificate on the locked board is not ours") from exc
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not names or names[0].value != host.lot.issuer.common_name(device_id, fields):
            raise VerificationError(f"{device_id}: certificate on the locked board names another ID")
        for obj, data in board_objects(host.lot, device_id, cert_der):
            if await client.read(obj) != data:
                raise ReadbackMismatchError(f"{device_id}: {obj.name} on the locked board differs")
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        signature = await host.step(Step.CHALLENGE, lambda: client.sign(challenge))
        verify_challenge(cert, challenge, signature)
        return Finished("provisioned", device_id, IssuedCertificate.from_certificate(cert))

    @staticmethod
    async def _issue(
        host: JobHost, device_id: str, csr_der: bytes, point: bytes, *, attested: bool
    ) -> IssuedCertificate:
        issuer, fields = host.lot.issuer, host.device_fields
        csr = issuer.verify_csr(csr_der, device_id, fields=fields)
        public = csr.public_key()
        if attested:
            check_csr_key(point, csr)
        elif not isinstance(public, ec.EllipticCurvePublicKey) or (
            public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) != point
        ):
            raise CsrRejectedError("CSR key is not the key the secure element just generated (replayed CSR?)")
        issued = await issue_certificate(issuer, csr, device_id, fields)
        await host.audit_issued(device_id, issued)
        return issued

    async def _write_verified(self, obj: ObjectId, data: bytes) -> None:
        await self.client.write(obj, data)
        if await self.client.read(obj) != data:
            raise ReadbackMismatchError(f"{obj.name} read back from the board differs from what was written")


def board_objects(lot: LotContext, device_id: str, cert_der: bytes) -> list[tuple[ObjectId, bytes]]:
    """What a provisioned board holds, object by object."""
    endpoint = json.dumps({"endpoint": lot.profile.endpoint, "device_id": device_id}, sort_keys=True)
    return [
        (ObjectId.DEVICE_ID, device_id.encode()),
        (ObjectId.DEVICE_CERT, cert_der),
        (ObjectId.CA_CHAIN, lot.chain_pem),
        (ObjectId.ENDPOINT, endpoint.encode()),
    ]
