"""The arduino-v1 provisioning job: CSR, verify, issue, store every field, have the board rebuild it.

The pipeline owns the ledger (reservation keyed on the board's USB serial, since the sketch cannot
report its secure-element serial) and passes its retrying step runner in; this module is the
board-facing sequence only. Every reply is checked (``ArduinoClient``); the last proof is
ReconstructCert, which fails on a board that ACKed EndStorage but stored nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from factoryd.errors import BoardStatusError, IssuanceError, VerificationError
from factoryd.pki.arduino import ArduinoCertFields, arduino_compressed_fields
from factoryd.pki.issuer import IssuedCertificate, Issuer
from factoryd.pki.signer import SoftwareSigner
from factoryd.protocol.arduino import ArduinoClient, device_id_bytes

T = TypeVar("T")

# Step names (telemetry labels).
STEP_CSR = "csr"
STEP_ISSUE = "issue"
STEP_STORE = "store"
STEP_RECONSTRUCT = "reconstruct"


class StepRunner(Protocol):
    """Runs one named step (the pipeline's runner retries transient errors and records telemetry)."""

    async def __call__(self, name: str, action: Callable[[], Awaitable[T]]) -> T:
        """Run ``action`` as step ``name``."""
        ...


class CertificateNotStoredError(VerificationError):
    """The board ACKed every storage command but cannot rebuild the certificate (ReconstructCert ERROR).

    Not retried within the step (reading back again does not help); transient for the job, which
    starts over with a fresh key and certificate on the same reserved ID.
    """

    transient = True


async def provision_arduino(
    client: ArduinoClient,
    *,
    device_id: str,
    issuer: Issuer,
    step: StepRunner,
    on_issued: Callable[[IssuedCertificate], Awaitable[None]] | None = None,
) -> IssuedCertificate:
    """Provision one board running Arduino's sketch; return the certificate it now holds.

    ``on_issued`` runs after issuing and before anything is written to the board (the pipeline
    records the certificate in its audit trail there).
    """
    if issuer.profile.kind != "arduino-v1":
        raise IssuanceError(
            f"the lot's certificate profile is {issuer.profile.kind!r}; Arduino boards need arduino-v1"
        )
    try:
        device_id_bytes(device_id)
    except ValueError as exc:
        raise IssuanceError(str(exc)) from None

    csr_pem = await step(STEP_CSR, lambda: client.get_csr(device_id))

    async def issue() -> tuple[IssuedCertificate, ArduinoCertFields]:
        csr = issuer.verify_csr(csr_pem, device_id)
        if isinstance(issuer.signer, SoftwareSigner):
            issued = issuer.issue(csr, device_id)
        else:  # a PKCS#11 token may take many milliseconds: off the event loop
            issued = await asyncio.to_thread(issuer.issue, csr, device_id)
        # Refuses a certificate the board's template could not rebuild, before anything is written.
        return issued, arduino_compressed_fields(issued.cert)

    issued, fields = await step(STEP_ISSUE, issue)
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

    await step(STEP_STORE, store)

    async def reconstruct() -> None:
        try:
            await client.reconstruct_cert()
        except BoardStatusError as exc:
            raise CertificateNotStoredError(
                f"board on {client.link.path} ACKed the certificate for {device_id} but cannot rebuild "
                "it from its slots (ReconstructCert answered ERROR): the certificate was not stored"
            ) from exc

    await step(STEP_RECONSTRUCT, reconstruct)
    return issued
