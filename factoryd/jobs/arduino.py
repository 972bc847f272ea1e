"""The arduino-v1 job: CSR, verify, issue, store every field, have the board rebuild it.

The pipeline owns the ledger binding; the board is identified by its USB serial number (the sketch
cannot report its secure-element serial), so ``ArduinoSession.identify`` refuses a board without
one, and a board the ledger already records as provisioned is refused: the sketch cannot prove
its key by challenge. ``provision_arduino`` is the board-facing sequence. Every reply is
checked (``ArduinoClient``); the last proof is ReconstructCert, which fails on a board that
ACKed EndStorage but stored nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from cryptography.hazmat.primitives.serialization import Encoding

from factoryd.errors import BoardStatusError, IssuanceError, RefusedBoardError, VerificationError
from factoryd.jobs.board import (
    Finished,
    JobHost,
    StepRunner,
    closed_link_stats,
    csr_key_point,
    issue_certificate,
    issue_remote,
)
from factoryd.jobs.steps import Step
from factoryd.ledger.model import DeviceState
from factoryd.pki.arduino import ArduinoCertFields, arduino_template_fields
from factoryd.pki.issuer import IssuedCertificate, Issuer
from factoryd.protocol.arduino import ArduinoClient, device_id_bytes
from factoryd.telemetry.events import LinkStats

if TYPE_CHECKING:
    from cryptography import x509

    from factoryd.hub.base import Hub
    from factoryd.jobs.pipeline import PipelineSettings


# The job's steps in order (the station page's progress scale; BoardProfile.steps): the USB serial
# identifies the board at enumeration, so there is no HELLO, and no firmware or lock step.
ARDUINO_STEPS = (
    Step.POWER,
    Step.ENUMERATE,
    Step.RESERVE,
    Step.CSR,
    Step.ISSUE,
    Step.STORE,
    Step.RECONSTRUCT,
    Step.RECORD,
)


class CertificateNotStoredError(VerificationError):
    """The board ACKed every storage command but cannot rebuild the certificate (ReconstructCert ERROR).

    Not retried within the step (reading back again does not help); transient for the job, which
    starts over with a fresh key and certificate on the same reserved ID.
    """

    transient = True


def check_arduino_lot(issuer: Issuer, device_id: str) -> None:
    """IssuanceError unless the lot's certificates are arduino-v1 and the ID fits the sketch's slot."""
    if issuer.profile.kind != "arduino-v1":
        raise IssuanceError(
            f"the lot's certificate profile is {issuer.profile.kind!r}; Arduino boards need arduino-v1"
        )
    try:
        device_id_bytes(device_id)
    except ValueError as exc:
        raise IssuanceError(str(exc)) from None


def verify_arduino_csr(issuer: Issuer, csr_data: bytes, device_id: str) -> x509.CertificateSigningRequest:
    """The arduino-v1 CSR rules, of the station and of the line's signer alike.

    The lot and ID as ``check_arduino_lot``; the CSR as every profile's (signature, subject exactly
    the lot's CN for the ID, EC P-256, no extensions: the sketch requests none).
    """
    check_arduino_lot(issuer, device_id)
    return issuer.verify_csr(csr_data, device_id)


async def provision_arduino(
    client: ArduinoClient,
    *,
    device_id: str,
    issuer: Issuer,
    step: StepRunner,
    on_issued: Callable[[IssuedCertificate], Awaitable[None]] | None = None,
    sign: Callable[[x509.CertificateSigningRequest], Awaitable[IssuedCertificate]] | None = None,
) -> IssuedCertificate:
    """Provision one board running Arduino's sketch; return the certificate it now holds.

    ``on_issued`` runs after issuing and before anything is written to the board (the pipeline
    records the certificate in its audit trail there). ``sign`` signs elsewhere (the line's
    signer, which records and audits the certificate itself) instead of with ``issuer``'s CA key.
    """
    check_arduino_lot(issuer, device_id)

    csr_pem = await step(Step.CSR, lambda: client.get_csr(device_id))

    async def issue() -> tuple[IssuedCertificate, ArduinoCertFields]:
        csr = verify_arduino_csr(issuer, csr_pem, device_id)
        issued = await (sign(csr) if sign is not None else issue_certificate(issuer, csr, device_id))
        # Refuses a certificate the board's template could not rebuild, before anything is written.
        return issued, arduino_template_fields(issued.cert, device_id)

    issued, fields = await step(Step.ISSUE, issue)
    if on_issued is not None:
        await on_issued(issued)

    async def store() -> None:
        # One step: a retry must run the whole sequence again from BeginStorage.
        await client.begin_storage()
        await client.set_year(fields.year)
        await client.set_month(fields.month)
        await client.set_day(fields.day)
        await client.set_hour(fields.hour)
        await client.set_validity(fields.years)
        await client.set_cert_serial(fields.serial16)
        await client.set_auth_key(fields.aki20)
        await client.set_signature(fields.signature64)
        await client.end_storage()

    await step(Step.STORE, store)

    async def reconstruct() -> None:
        try:
            await client.reconstruct_cert()
        except BoardStatusError as exc:
            raise CertificateNotStoredError(
                f"board on {client.link.path} ACKed the certificate for {device_id} but cannot rebuild "
                "it from its slots (ReconstructCert answered ERROR): the certificate was not stored"
            ) from exc

    await step(Step.RECONSTRUCT, reconstruct)
    return issued


class ArduinoSession:
    """One attempt of the arduino-v1 job: identity from the hub, a link only for the board steps."""

    identify_step = Step.ENUMERATE

    def __init__(self, hub: Hub, port: str, path: str, settings: PipelineSettings) -> None:
        self._hub = hub
        self._port = port
        self._path = path
        self._resends = settings.resends
        self._link_stats: LinkStats | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def link_stats(self) -> LinkStats | None:
        """Traffic of the link the board steps used (None before they ran)."""
        return self._link_stats

    async def identify(self) -> str:
        """The board's USB serial number; refused when it has none (or all zeros)."""
        usb_serial = await self._hub.device_serial(self._port, self._path)
        if not usb_serial or set(usb_serial) <= {"0"}:
            raise RefusedBoardError(
                f"board on port {self._port} reports no USB serial number: without one its ID cannot be "
                "bound to it exactly once (the sketch cannot report its secure-element serial)"
            )
        return f"usb:{usb_serial.lower()}"

    async def existing(self, host: JobHost) -> Finished | None:
        """A board already provisioned is refused: the sketch cannot prove its key by challenge."""
        record = await host.ledger.find_by_serial(host.lot.name, host.hw_serial)
        if record is not None and record.state is DeviceState.PROVISIONED:
            raise RefusedBoardError(
                f"board {host.hw_serial} is already provisioned with {record.device_id}; the sketch cannot "
                "prove its key by challenge, so re-checking is impossible: rework is an operator decision"
            )
        return None

    async def provision(self, host: JobHost, device_id: str) -> IssuedCertificate:
        """Open the sketch's link and run the board sequence."""

        async def audit_issued(issued: IssuedCertificate) -> None:
            await host.audit_issued(device_id, issued)

        async def sign_remote(csr: x509.CertificateSigningRequest) -> IssuedCertificate:
            # The sketch's GET_CSR makes the key and answers only the CSR: its key is the one reported.
            return await issue_remote(host, device_id, csr.public_bytes(Encoding.DER), csr_key_point(csr))

        remote = host.lot.remote is not None
        client = await ArduinoClient.open(self._path, resends=self._resends)
        try:
            return await provision_arduino(
                client,
                device_id=device_id,
                issuer=host.lot.issuer,
                step=host.step,
                on_issued=None if remote else audit_issued,
                sign=sign_remote if remote else None,
            )
        finally:
            await client.close()
            self._link_stats = closed_link_stats(self._port, client.link, client.stats)
