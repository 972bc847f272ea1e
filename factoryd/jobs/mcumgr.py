"""The mcumgr job: a Zephyr/MCUboot board over SMP, with its image update and the provisioning group.

identify: MCUmgr params (the board's buffer size), then the provisioning group's identity (the
secure-element serial). Once the pipeline has bound the job to it, the re-check hook runs the
firmware step when the lot names an image (``LotProfile.firmware_sha256``, the MCUboot hash):

    read image state → the active image is the lot's and confirmed? done.
    → upload the lot's image to the secondary slot (from the offset the board reports; after a
      reset mid-upload the board is waited for and the upload goes on from its offset again)
    → mark it for a test boot → reset → wait for the board to answer again (a UART bridge keeps the
      tty; a USB CDC board takes it away and re-enumerates: the hub is asked for the tty again)
    → read state: the lot's image must be active, else MCUboot refused or reverted it
      (``FirmwareRevertedError``, permanent, with the reason) → confirm → read state back: the lot's
      hash active and confirmed.

Then what the board already holds is looked at and provisioning runs as for factoryd-v1 (the
shared steps of ``jobs/board.py``): KEYGEN → CSR (CN of the lot's template) → verify CSR (its key
is the generated one) → issue → WRITE + read back each object → challenge → (LOCK, then identity
must report the board locked).

A lot with ``attestation = required`` has the pipeline call ``attest`` before the reservation: the
provisioning group's attest command (key + statement over the station's nonce, then the chain) and
a sign of a second fresh challenge with the new key; provisioning then skips KEYGEN.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import fields, replace
from types import TracebackType
from typing import TYPE_CHECKING, Self

import structlog

from factoryd.errors import (
    BoardTimeoutError,
    EnumerationTimeoutError,
    FirmwareRejectedError,
    IdentityMismatchError,
    LinkClosedError,
    LinkOpenError,
    VerificationError,
)
from factoryd.jobs.board import (
    Finished,
    JobHost,
    attestation_evidence,
    closed_link_stats,
    provision_secure_element,
    recheck_board,
)
from factoryd.jobs.steps import Step
from factoryd.pki.attestation import AttestationError, AttestationEvidence, AttestationResult
from factoryd.pki.issuer import IssuedCertificate
from factoryd.protocol.mcumgr import (
    ImageSlot,
    McumgrClient,
    McumgrTimeouts,
    SmpIdentity,
    SmpNoKeyError,
    SmpNotSupportedError,
)
from factoryd.protocol.messages import ObjectId
from factoryd.protocol.native import Timeouts
from factoryd.telemetry.events import LinkStats

if TYPE_CHECKING:
    from factoryd.firmware import LotFirmware
    from factoryd.hub.base import Hub
    from factoryd.jobs.pipeline import PipelineSettings

log = structlog.get_logger(__name__)

# Resets mid-upload one firmware step rides out (the board reports its offset after each).
MAX_UPLOAD_RESUMES = 5
# What the liveness probe after a reset sends.
ECHO_TEXT = "factoryd"
# Fields of McumgrTimeouts the pipeline's reply_timeout_scale does not shorten: they bound how long
# a board takes to boot (after power-on, after a reset with an MCUboot swap), not a reply.
_UNSCALED_TIMEOUTS = frozenset({"boot_s", "first_answer_s"})


class FirmwareRevertedError(FirmwareRejectedError):
    """After the test boot the board runs its old image: MCUboot refused or reverted the new one."""


def _timeouts(settings: PipelineSettings) -> McumgrTimeouts:
    """The SMP timeouts, scaled as the pipeline's native ones are (``jobs.reply_timeout_scale``)."""
    scale = settings.timeouts.hello_s / Timeouts().hello_s
    base = McumgrTimeouts()
    return replace(
        base,
        **{f.name: getattr(base, f.name) * scale for f in fields(base) if f.name not in _UNSCALED_TIMEOUTS},
    )


def active_image(slots: list[ImageSlot]) -> ImageSlot | None:
    """The running image (image 0)."""
    return next((s for s in slots if s.active and s.image == 0), None)


def secondary_image(slots: list[ImageSlot]) -> ImageSlot | None:
    """The image in image 0's secondary slot."""
    return next((s for s in slots if s.slot == 1 and s.image == 0), None)


class McumgrSession:
    """One attempt of the mcumgr job on one tty."""

    identify_step = Step.HELLO

    def __init__(self, hub: Hub, port: str, path: str, settings: PipelineSettings) -> None:
        self._hub = hub
        self._port = port
        self._path = path
        self._settings = settings
        self._timeouts = _timeouts(settings)
        self._client: McumgrClient | None = None
        self._identity: SmpIdentity | None = None
        # The attested identity key (set once the pipeline verified the attestation): no KEYGEN.
        self._attested_point: bytes | None = None

    async def __aenter__(self) -> Self:
        self._client = await self._open(self._path)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()

    async def _open(self, path: str) -> McumgrClient:
        settings = self._settings
        return await McumgrClient.open(
            path, baudrate=settings.baudrate, timeouts=self._timeouts, resends=settings.resends
        )

    @property
    def client(self) -> McumgrClient:
        """The open client."""
        if self._client is None:
            raise RuntimeError("McumgrSession used outside its async with block")
        return self._client

    def link_stats(self) -> LinkStats | None:
        """Traffic of the session's (last) link."""
        client = self._client
        return None if client is None else closed_link_stats(self._port, client.link, client.stats)

    async def identify(self) -> str:
        """Wait for the board to answer, MCUmgr params (buffer size), then identity: the SE serial."""
        # Behind a UART bridge the tty is there before the application has booted: what is sent
        # meanwhile is lost, so ask often rather than wait out a whole reply timeout.
        await self._wait_back(self._timeouts.first_answer_s)
        await self.client.read_params()
        self._identity = identity = await self.client.identity()
        return identity.serial_hex

    async def existing(self, host: JobHost) -> Finished | None:
        """The firmware step when the lot names an image; then re-check a board that holds an identity."""
        identity = self._identity
        if identity is None:
            raise RuntimeError("McumgrSession.existing() before identify()")
        if host.lot.profile.firmware_sha256 is not None:
            await self._ensure_firmware(host)
        if identity.locked or identity.objects & {ObjectId.DEVICE_ID, ObjectId.DEVICE_CERT}:
            return await recheck_board(host, self.client, identity.serial_hex, locked=identity.locked)
        return None

    async def attest(self, host: JobHost, nonce: bytes) -> AttestationEvidence:
        """The attest command over the station's nonce, then the new key signs a second fresh challenge."""
        client = self.client
        try:
            reply = await client.attest(nonce)
        except (SmpNoKeyError, SmpNotSupportedError) as exc:
            raise AttestationError("attestation_missing", f"board cannot attest its key: {exc}") from exc
        return await attestation_evidence(client, reply)

    def attested(self, result: AttestationResult) -> None:
        """Provision with the attested key."""
        self._attested_point = result.public_key

    async def provision(self, host: JobHost, device_id: str) -> IssuedCertificate:
        """KEYGEN (unless attested), CSR, issue, write + read back, challenge (jobs/board.py), then (LOCK)."""
        issued = await provision_secure_element(
            host, self.client, device_id, attested_point=self._attested_point
        )
        if host.lot.profile.lock:
            serial = self._identity.serial if self._identity is not None else b""
            await host.step(Step.LOCK, lambda: self.client.lock(serial))
            after = await self.client.identity()
            if after.serial_hex != host.hw_serial:
                # The job is bound to the serial the board first gave: another one now is a clone or a swap.
                raise IdentityMismatchError(
                    f"board reports serial {after.serial_hex} after LOCK, the job holds {host.hw_serial}"
                )
            if not after.locked:
                raise VerificationError("board acknowledged LOCK but reports itself unlocked")
        return issued

    # Firmware ------------------------------------------------------------------------------

    async def _ensure_firmware(self, host: JobHost) -> None:
        lot = host.lot
        wanted = lot.profile.firmware_sha256
        slots = await self.client.image_state()
        active = active_image(slots)
        if active is not None and active.hash.hex() == wanted and active.confirmed:
            return
        firmware = lot.firmware
        if firmware is None or firmware.image.hash != wanted:
            raise FirmwareRejectedError(
                f"lot {lot.name} asks for firmware {str(wanted)[:12]}… but the station has no MCUboot image "
                "for it",
                0,
            )
        await host.step(Step.FIRMWARE, lambda: self._update(firmware, slots))

    async def _update(self, firmware: LotFirmware, slots: list[ImageSlot]) -> None:
        """Upload (resuming), test, reset, wait, check, confirm, check: the MCUboot update."""
        wanted = firmware.sha256
        active = active_image(slots)
        if active is None or active.hash != wanted:
            secondary = secondary_image(slots)
            if secondary is None or secondary.hash != wanted:
                await self._upload(firmware.data)
                secondary = secondary_image(await self.client.image_state())
                if secondary is None or secondary.hash != wanted:
                    got = "nothing" if secondary is None else f"hash {secondary.hash.hex()[:12]}…"
                    raise FirmwareRejectedError(
                        f"after the upload the board's secondary slot holds {got}, not the lot's image "
                        f"{wanted.hex()[:12]}…",
                        0,
                    )
            if not secondary.pending:
                await self.client.image_test(wanted)
            old = active.version if active is not None else "no image"
            await self._reset_and_wait()
            slots = await self.client.image_state()
            active = active_image(slots)
            if active is None or active.hash != wanted:
                raise FirmwareRevertedError(self._revert_reason(slots, wanted, old), 0)
        await self.client.image_confirm()
        active = active_image(await self.client.image_state())
        if active is None or active.hash != wanted or not active.confirmed:
            raise FirmwareRejectedError(
                f"the board does not report the lot's image {wanted.hex()[:12]}… active and confirmed "
                "after the confirm",
                0,
            )

    @staticmethod
    def _revert_reason(slots: list[ImageSlot], wanted: bytes, old: str) -> str:
        active = active_image(slots)
        running = f"{active.version} ({active.hash.hex()[:12]}…)" if active is not None else "no image"
        secondary = secondary_image(slots)
        if secondary is not None and secondary.hash == wanted:
            return (
                f"image {wanted.hex()[:12]}… did not boot: MCUboot reverted to {running} "
                "(the application crashed or reset before confirming)"
            )
        return (
            f"MCUboot refused image {wanted.hex()[:12]}… at boot and erased it (its signature, signing "
            f"key or security counter is not what the bootloader accepts); the board runs {running}, "
            f"as before the update ({old})"
        )

    async def _upload(self, image: bytes) -> None:
        """Upload, riding out resets mid-upload: the board reports where to go on from."""
        for attempt in range(MAX_UPLOAD_RESUMES + 1):
            try:
                await self.client.upload(image)
            except (BoardTimeoutError, LinkClosedError) as exc:
                if attempt == MAX_UPLOAD_RESUMES:
                    raise
                log.info("upload interrupted; resuming from the board's offset", error=str(exc))
                await self._wait_back()
            else:
                return

    async def _reset_and_wait(self) -> None:
        # The reply may be lost to the reset itself; the board is waited for below either way.
        with contextlib.suppress(BoardTimeoutError, LinkClosedError):
            await self.client.reset()
        await self._wait_back()

    async def _wait_back(self, within_s: float | None = None) -> None:
        """Wait until the board answers an echo again, re-opening its tty if the reset took it away."""
        loop = asyncio.get_running_loop()
        within_s = self._timeouts.boot_s if within_s is None else within_s
        deadline = loop.time() + within_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BoardTimeoutError(f"board on port {self._port} did not answer within {within_s:.1f} s")
            client = self.client
            if client.closed:
                # USB CDC: the tty vanished with the reset; the board re-enumerates (maybe elsewhere).
                await client.close()
                self._client = None
                try:
                    path = await self._hub.wait_for_tty(self._port, remaining)
                    self._client = await self._open(path)
                except (EnumerationTimeoutError, LinkOpenError) as exc:
                    raise BoardTimeoutError(f"board on port {self._port} did not come back: {exc}") from exc
                await self.client.read_params()
                continue
            with contextlib.suppress(BoardTimeoutError, LinkClosedError):
                await self.client.echo(ECHO_TEXT, timeout_s=min(self._timeouts.probe_s, remaining))
                return
