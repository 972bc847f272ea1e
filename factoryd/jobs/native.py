"""The factoryd-v1 job: the board steps between "bound to an ID" and "recorded".

HELLO identifies the board by its secure-element serial. Once the pipeline has bound the job to
it, the re-check hook updates the firmware when the lot asks for another image, then looks at what
the board already holds: an interrupted job resumes, a locked board interrupted before its record
is completed from what it holds, a board of ours is re-checked by challenge, a foreign one is
reworked (when the lot allows it) or refused. Provisioning is GENKEY → GET_CSR → verify CSR →
issue → WRITE + READ back each object (the WRITE digest alone from revision 2 firmware, which
computes it over what it reads back) → SIGN challenge → (LOCK).

A lot with ``attestation = required`` has the pipeline call ``attest`` before the reservation:
GENKEY_ATTESTED (the key and the secure element's statement over the station's nonce) then SIGN of
a second fresh challenge with the new key (possession). Provisioning then skips GENKEY and checks
that the CSR carries the attested key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from factoryd.errors import (
    BoardStatusError,
    FirmwareRejectedError,
    VerificationError,
)
from factoryd.jobs.board import (
    ClientSession,
    Finished,
    JobHost,
    attestation_evidence,
    provision_secure_element,
    recheck_board,
)
from factoryd.jobs.steps import Step
from factoryd.pki.attestation import AttestationError, AttestationEvidence, AttestationResult
from factoryd.pki.issuer import IssuedCertificate
from factoryd.protocol.messages import BoardInfo, ObjectId, Status
from factoryd.protocol.native import BoardClient

if TYPE_CHECKING:
    from factoryd.hub.base import Hub
    from factoryd.jobs.pipeline import PipelineSettings


class NativeSession(ClientSession[BoardClient]):
    """One attempt of the factoryd-v1 job on one tty."""

    identify_step = Step.HELLO

    def __init__(self, hub: Hub, port: str, path: str, settings: PipelineSettings) -> None:
        super().__init__(hub, port, path, settings)
        self._info: BoardInfo | None = None
        # The attested identity key (set once the pipeline verified the attestation): no new GENKEY.
        self._attested_point: bytes | None = None

    async def _open(self) -> BoardClient:
        settings = self._settings
        return await BoardClient.open(
            self._path, baudrate=settings.baudrate, timeouts=settings.timeouts, resends=settings.resends
        )

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
            return await recheck_board(host, self.client, info.serial_hex, locked=info.locked)
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
        return await attestation_evidence(client, reply)

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
        client = self.client
        issued = await provision_secure_element(host, client, device_id, attested_point=self._attested_point)
        if host.lot.profile.lock:
            locked = await host.step(Step.LOCK, client.lock)
            if locked is None:  # revision 1 firmware: its LOCK reply is empty, ask HELLO
                locked = (await client.hello()).locked
            if not locked:
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
