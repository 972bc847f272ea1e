"""What a board profile's job sequence gets from the pipeline, and what it gives back.

The pipeline (``jobs/pipeline.py``) owns everything shared: power, enumeration, job retries, the
ledger binding (start job, set serial, claim, reserve) and recording. A profile's job module
(``jobs/native.py``, ``jobs/arduino.py``) implements ``BoardSession`` for one attempt on one tty:

1. ``identify()`` returns the hardware serial the ID is bound to (run as step ``identify_step``);
2. ``existing(host)`` is the re-check hook, called once the job is bound to that serial and
   before an ID is reserved: ``None`` goes on to reserve, a ``Finished`` ends the job
   (re-checked, or completed from what the board holds), an exception refuses or fails it;
3. ``provision(host, device_id)`` runs the board steps and returns the certificate the board
   now holds, which the pipeline records.

A session that can attest its new key (``AttestingSession``, optional) is asked to, between
``existing()`` and the reservation, when the lot's profile says ``attestation = required``: the
pipeline verifies the evidence (``pki/attestation.py``) and the session's ``provision`` then uses
the attested key instead of generating another.

A session whose board names its own ID (``ChosenIdSession``, optional; the IMEI of an nRF91) is
asked for it when the lot's profile says ``device_id_from = imei``: the pipeline reserves exactly
that ID, and refuses the board when the customer's list does not hold it (or another board does).

``link_stats()`` hands the pipeline the ``LinkStats`` telemetry event of the link the session
opened, which the pipeline emits when the session closes (every profile reports its link).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, Self, TypeVar, cast, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.errors import (
    CsrRejectedError,
    InputError,
    ReadbackMismatchError,
    RefusedBoardError,
    VerificationError,
)
from factoryd.jobs.steps import Step
from factoryd.ledger.model import DeviceState
from factoryd.matter.dac import matter_ids
from factoryd.matter.device import new_device_secrets, parse_commissioning
from factoryd.pki.attestation import AttestationEvidence, check_csr_key
from factoryd.pki.challenge import verify_challenge
from factoryd.pki.issuer import IssuedCertificate, Issuer
from factoryd.protocol.messages import IDENTITY_SLOT, ObjectId
from factoryd.signer.client import RemoteRequest
from factoryd.signer.wire import KeyOrigin
from factoryd.telemetry.events import LinkStats

if TYPE_CHECKING:
    from factoryd.hub.base import Hub
    from factoryd.jobs.lots import LotContext
    from factoryd.jobs.pipeline import PipelineSettings
    from factoryd.ledger import AsyncLedger
    from factoryd.pki.attestation import AttestationResult
    from factoryd.protocol.engine import RequestStats
    from factoryd.transport.serial_link import SerialLink

T = TypeVar("T")


class StepRunner(Protocol):
    """Runs one step (the pipeline's runner retries transient errors and records telemetry)."""

    async def __call__(self, step: Step, action: Callable[[], Awaitable[T]]) -> T:
        """Run ``action`` as ``step``."""
        ...


class JobHost(Protocol):
    """The pipeline's side of one bound job, as a profile's job sees it."""

    @property
    def lot(self) -> LotContext:
        """The lot being provisioned."""
        ...

    @property
    def port(self) -> str:
        """The hub port."""
        ...

    @property
    def hw_serial(self) -> str:
        """The serial the job is bound to."""
        ...

    @property
    def job_id(self) -> int:
        """The ledger's job id."""
        ...

    @property
    def device_fields(self) -> Mapping[str, str]:
        """The reserved device's metadata (its ID-list columns) for the lot's subject template."""
        ...

    @property
    def ledger(self) -> AsyncLedger:
        """The ledger (for look-ups; the pipeline does the binding writes)."""
        ...

    async def step(self, step: Step, action: Callable[[], Awaitable[T]]) -> T:
        """Run one step of the job."""
        ...

    async def audit(self, action: str, subject: str, details: dict[str, Any]) -> None:
        """Append an audit entry in the station's name."""
        ...

    async def audit_issued(self, device_id: str, issued: IssuedCertificate) -> None:
        """Audit a certificate before anything of it is written to the board."""
        ...

    @property
    def attestation_evidence(self) -> AttestationEvidence | None:
        """The evidence the board's attested key was verified with (None unless it attested)."""
        ...

    def hold(self, reason: str) -> None:
        """Show that the job waits at a safe point (the line's signer is unreachable) and why."""
        ...


@dataclass(frozen=True)
class Finished:
    """A job the re-check hook ended: the board already holds ``device_id``."""

    outcome: Literal["rechecked", "provisioned"]
    device_id: str
    # Set when the job is completed from the board (it still has to be recorded).
    issued: IssuedCertificate | None = None


def closed_link_stats(port: str, link: SerialLink[Any], stats: RequestStats) -> LinkStats:
    """The telemetry event for a closed link: its frame counters and its client engine's."""
    decoder = link.decoder.stats
    return LinkStats(
        port=port,
        frames_sent=link.stats.frames_sent,
        frames_received=decoder.frames,
        resends=stats.resends,
        crc_errors=decoder.crc_errors,
        at=datetime.now(UTC),
    )


class SessionClient(Protocol):
    """What a profile's client gives the session around it: its link, its engine's counters, close."""

    link: SerialLink[Any]

    @property
    def stats(self) -> RequestStats:
        """The request engine's counters."""
        ...

    async def close(self) -> None:
        """Close the link."""
        ...


ClientT = TypeVar("ClientT", bound=SessionClient)


class ClientSession(abc.ABC, Generic[ClientT]):
    """A session that opens one client on the tty for the attempt: open, close, the link's statistics.

    A profile's session subclasses it and says how its client is opened (``_open``); the rest of the
    ``BoardSession`` contract (identify, existing, provision) is the profile's own.
    """

    def __init__(self, hub: Hub, port: str, path: str, settings: PipelineSettings) -> None:
        self._hub = hub
        self._port = port
        self._path = path
        self._settings = settings
        self._client: ClientT | None = None

    @abc.abstractmethod
    async def _open(self) -> ClientT:
        """Open the profile's client on ``self._path``."""

    async def __aenter__(self) -> Self:
        self._client = await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> ClientT:
        """The open client."""
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} used outside its async with block")
        return self._client

    def link_stats(self) -> LinkStats | None:
        """Traffic of the session's link (None when it never opened)."""
        client = self._client
        return None if client is None else closed_link_stats(self._port, client.link, client.stats)


class BoardSession(Protocol):
    """One attempt of a profile's job on one tty (see the module docstring); an async context manager."""

    @property
    def identify_step(self) -> Step:
        """The step ``identify`` runs as."""
        ...

    async def __aenter__(self) -> Self:
        """Open what the session needs first."""
        ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close every link the session opened."""
        ...

    async def identify(self) -> str:
        """The hardware serial the device ID is bound to."""
        ...

    async def existing(self, host: JobHost) -> Finished | None:
        """Re-check hook before reserving; None continues with a reservation."""
        ...

    async def provision(self, host: JobHost, device_id: str) -> IssuedCertificate:
        """Run the board steps; return the certificate the board now holds."""
        ...

    def link_stats(self) -> LinkStats | None:
        """Traffic of the link this session opened, once closed (None when it opened none)."""
        ...


@runtime_checkable
class AttestingSession(Protocol):
    """A session whose board can generate a key and attest it (``BoardProfile.attests``)."""

    async def attest(self, host: JobHost, nonce: bytes) -> AttestationEvidence:
        """Generate the identity key with an attestation over ``nonce``; prove possession of it."""
        ...

    def attested(self, result: AttestationResult) -> None:
        """The pipeline verified the evidence: provision with this key, do not generate another."""
        ...


@runtime_checkable
class ChosenIdSession(Protocol):
    """A session whose board names its own device ID (a lot with ``device_id_from = imei``)."""

    def wanted_device_id(self, host: JobHost) -> str | None:
        """The ID this board must get (from its IMEI and the lot's template), or None for the next one."""
        ...


@runtime_checkable
class RegisteredKeySession(Protocol):
    """A session whose board keeps a vendor-registered identity key (a parts-manifest lot)."""

    async def prove_key(self, host: JobHost, challenge: bytes) -> bytes:
        """The raw r||s signature of ``challenge`` by the identity slot's existing key (no new key)."""
        ...

    def use_key(self, public_key: bytes) -> None:
        """Provision with this (registered) key: no GENKEY."""
        ...


class SessionFactory(Protocol):
    """Opens a profile's session for one attempt."""

    def __call__(self, hub: Hub, port: str, path: str, settings: PipelineSettings) -> BoardSession:
        """A session on the tty at ``path`` (opened by ``async with``)."""
        ...


async def issue_certificate(
    issuer: Issuer,
    csr: x509.CertificateSigningRequest,
    device_id: str,
    fields: Mapping[str, str] | None = None,
) -> IssuedCertificate:
    """Issue a device certificate; a signer that blocks (a PKCS#11 token) signs off the event loop."""
    if issuer.signer.blocking:
        # A token signs in ms to 100s of ms: never on the event loop.
        return await asyncio.to_thread(functools.partial(issuer.issue, csr, device_id, fields=fields))
    return issuer.issue(csr, device_id, fields=fields)  # well under a millisecond: no thread hop


# Board steps shared by the profiles whose firmware exposes the secure element object by object
# (factoryd-v1 and mcumgr): the same verification rules, written once. ---------------------------

CHALLENGE_BYTES = 32

# Their job's steps in order (the station page's progress scale; BoardProfile.steps): identified by
# the secure element, the image brought up to the lot's, attested when the lot asks, then bound to
# an ID and provisioned object by object.
SECURE_ELEMENT_STEPS = (
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


class SecureElementClient(Protocol):
    """What a profile's client offers for the shared board steps (BoardClient, McumgrClient)."""

    async def genkey(self) -> bytes:
        """Make a new key in the identity slot; return its uncompressed public point."""
        ...

    async def get_csr(self, common_name: str) -> bytes:
        """A DER CSR of the identity key with subject CN=common_name."""
        ...

    async def write(self, obj: ObjectId, data: bytes) -> None:
        """Store an object (the board's digest of it checked)."""
        ...

    async def read(self, obj: ObjectId) -> bytes:
        """Read an object back (empty when absent)."""
        ...

    async def sign(self, challenge: bytes) -> bytes:
        """The raw r||s signature of SHA-256(challenge) by the identity key."""
        ...


def board_objects(lot: LotContext, device_id: str, cert_der: bytes) -> list[tuple[ObjectId, bytes]]:
    """What a provisioned board holds, object by object."""
    endpoint = json.dumps({"endpoint": lot.profile.endpoint, "device_id": device_id}, sort_keys=True)
    return [
        (ObjectId.DEVICE_ID, device_id.encode()),
        (ObjectId.DEVICE_CERT, cert_der),
        (ObjectId.CA_CHAIN, lot.chain_pem),
        (ObjectId.ENDPOINT, endpoint.encode()),
        *(
            [(ObjectId.MATTER_PAI, lot.matter.pai_der), (ObjectId.MATTER_CD, lot.matter.cd.der)]
            if lot.matter is not None
            else []
        ),
    ]


async def matter_commissioning(host: JobHost, device_id: str, issued: IssuedCertificate) -> bytes:
    """A fresh passcode's commissioning object for the board; its onboarding codes sealed in the ledger first.

    The codes are durable before the board gets the verifier (a crash after the write leaves codes
    that match the board); a retry makes a new passcode and replaces them. The passcode itself is
    dropped when this returns: only the verifier goes to the board.
    """
    lot = host.lot
    profile = lot.profile.matter
    if profile is None:
        raise RuntimeError("matter_commissioning() for a lot without a matter profile")
    product_id = matter_ids(issued.cert).product_id
    if product_id is None:
        raise VerificationError(f"{device_id}: the issued DAC carries no Matter PID")
    # PBKDF2 with up to 100000 rounds takes tens of ms: off the event loop, like a token's signature.
    device = await asyncio.to_thread(new_device_secrets, profile, product_id)
    await host.ledger.record_onboarding_codes(
        lot.name,
        device_id,
        device.codes,
        discriminator=device.commissioning.discriminator,
        product_id=product_id,
    )
    return device.commissioning.encode()


async def issue_for_key(
    host: JobHost, device_id: str, csr_der: bytes, point: bytes, *, attested: bool = False
) -> IssuedCertificate:
    """Verify the CSR (subject, signature, its key the one just generated or attested); issue; audit.

    With the line's signer (``host.lot.remote``) the signer checks all of it again against the
    ledger and records and audits the certificate itself; the station only sends and checks the reply.
    """
    issuer, fields = host.lot.issuer, host.device_fields
    csr = issuer.verify_csr(csr_der, device_id, fields=fields)
    public = csr.public_key()
    if attested:
        check_csr_key(point, csr)
    elif not isinstance(public, ec.EllipticCurvePublicKey) or (
        public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) != point
    ):
        raise CsrRejectedError("CSR key is not the key the secure element just generated (replayed CSR?)")
    if host.lot.remote is not None:
        evidence = host.attestation_evidence if attested else None
        return await issue_remote(
            host,
            device_id,
            csr.public_bytes(Encoding.DER),
            point,
            key_origin="attested" if evidence is not None else "registered" if attested else "generated",
            evidence=evidence,
        )
    issued = await issue_certificate(issuer, csr, device_id, fields)
    await host.audit_issued(device_id, issued)
    return issued


async def issue_remote(
    host: JobHost,
    device_id: str,
    csr_der: bytes,
    point: bytes,
    *,
    key_origin: KeyOrigin = "generated",
    evidence: AttestationEvidence | None = None,
    keygen_attestation: bytes | None = None,
) -> IssuedCertificate:
    """Have the line's signer sign a CSR the profile's rules accepted here (it checks them again).

    ``csr_der`` goes as the board sent it (the nRF91's attestation names the SHA-256 of those bytes);
    ``point`` is the key the station reports: the one its secure element generated or attested.
    The signer records and audits the certificate; the reply is checked before it is returned.
    """
    remote = host.lot.remote
    if remote is None:
        raise RuntimeError("issue_remote() for a lot without the line's signer")
    request = RemoteRequest(
        lot=host.lot.name,
        device_id=device_id,
        hw_serial=host.hw_serial,
        job_id=host.job_id,
        csr_der=csr_der,
        key=point,
        key_origin=key_origin,
        evidence=evidence,
        keygen_attestation=keygen_attestation,
    )
    return await remote.issue(request, host.lot.issuer.chain[0], on_hold=host.hold)


def csr_key_point(csr: x509.CertificateSigningRequest) -> bytes:
    """The uncompressed point of a CSR's key (verify_csr checked it is P-256)."""
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CsrRejectedError("CSR key is not an EC key")
    return public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


class ReadBackWriter(Protocol):
    """A client that knows whether its board's WRITE digest is over the object read back (native rev. 2)."""

    @property
    def write_reply_reads_back(self) -> bool:
        """True when the digest the write checked was computed over what the board reads back."""
        ...


class PipelinedWriter(Protocol):
    """A client that can send every WRITE and the challenge's SIGN in one burst (native revision 3)."""

    @property
    def pipelines(self) -> bool:
        """True when the board takes requests back to back and answers them in order."""
        ...

    async def write_all_and_sign(self, objects: Sequence[tuple[ObjectId, bytes]], challenge: bytes) -> bytes:
        """WRITE each object (digest checked) and SIGN the challenge; the raw r||s signature."""
        ...


@functools.cache
def _offers(cls: type, protocol: type) -> bool:
    """Whether instances of ``cls`` have every public member ``protocol`` declares (once per class).

    Not ``isinstance`` against a runtime-checkable protocol: that collects the protocol's members
    anew on every call, tens of µs a board on the hot path.
    """
    return all(hasattr(cls, name) for name in vars(protocol) if not name.startswith("_"))


def reads_back_on_write(client: SecureElementClient) -> bool:
    """Whether the client's WRITE digest already proves the read-back."""
    return _offers(type(client), ReadBackWriter) and cast(ReadBackWriter, client).write_reply_reads_back


def pipelines(client: SecureElementClient) -> PipelinedWriter | None:
    """The client as a PipelinedWriter when its board takes the WRITEs and SIGN in one burst."""
    if _offers(type(client), PipelinedWriter) and cast(PipelinedWriter, client).pipelines:
        return cast(PipelinedWriter, client)
    return None


async def write_verified(
    client: SecureElementClient, obj: ObjectId, data: bytes, *, read_back: bool = True
) -> None:
    """Write an object and read it back; ReadbackMismatchError when the board keeps something else.

    ``read_back=False`` for a board whose WRITE digest is over the object read back from its store
    (``reads_back_on_write``, docs/protocol.md §4.2): it has done the read-back itself, and the
    digest ``write`` checks is the proof.
    """
    await client.write(obj, data)
    if not read_back:
        return
    if await client.read(obj) != data:
        raise ReadbackMismatchError(f"{obj.name} read back from the board differs from what was written")


async def provision_secure_element(
    host: JobHost, client: SecureElementClient, device_id: str, *, attested_point: bytes | None = None
) -> IssuedCertificate:
    """KEYGEN (unless the key was attested), CSR (the lot's CN), issue, write + read back, challenge."""
    lot = host.lot
    attested = attested_point is not None
    point = attested_point if attested_point is not None else await host.step(Step.KEYGEN, client.genkey)
    common_name = lot.issuer.common_name(device_id, host.device_fields)
    csr_der = await host.step(Step.CSR, lambda: client.get_csr(common_name))
    issued = await host.step(
        Step.ISSUE, lambda: issue_for_key(host, device_id, csr_der, point, attested=attested)
    )
    read_back = not reads_back_on_write(client)
    objects = board_objects(lot, device_id, issued.der)
    if lot.matter is not None:
        objects.append((ObjectId.MATTER_COMMISSIONING, await matter_commissioning(host, device_id, issued)))
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    burst = None if read_back else pipelines(client)
    if burst is not None:
        # One burst: every WRITE (digest over the read-back) and the challenge's SIGN (§4.3).
        signature = await host.step(Step.WRITE, lambda: burst.write_all_and_sign(objects, challenge))
    else:
        for obj, data in objects:
            await host.step(
                Step.WRITE, functools.partial(write_verified, client, obj, data, read_back=read_back)
            )
        signature = await host.step(Step.CHALLENGE, lambda: client.sign(challenge))
    verify_challenge(issued.cert, challenge, signature)
    return issued


class AttestedKey(Protocol):
    """What a profile's attest command answers (native ``AttestedKeyReply``, mcumgr ``SmpAttestation``)."""

    @property
    def nonce(self) -> bytes:
        """The nonce the statement covers."""
        ...

    @property
    def public_key(self) -> bytes:
        """The new key's uncompressed point."""
        ...

    @property
    def signature(self) -> bytes:
        """The statement signature (DER) by the attestation key."""
        ...

    @property
    def chain(self) -> tuple[bytes, ...]:
        """The attestation certificate chain, DER, leaf first."""
        ...


async def attestation_evidence(client: SecureElementClient, reply: AttestedKey) -> AttestationEvidence:
    """The attest reply as evidence, plus a fresh challenge the new key signs (it is in the slot)."""
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


async def recheck_board(
    host: JobHost, client: SecureElementClient, serial: str, *, locked: bool
) -> Finished | None:
    """A board that already holds an identity: re-check it, resume it, rework it, or refuse it."""
    lot = host.lot
    reserved = await host.ledger.find_by_serial(lot.name, serial)
    if reserved is not None and reserved.state is DeviceState.RESERVED:
        if not locked:
            return None  # an interrupted job on this very board: resume with its reservation
        # Interrupted between LOCK and the ledger record: the board can no longer be written, so
        # finish the job from what it holds, after proving it is exactly what we issued.
        return await complete_locked_board(host, client, reserved.device_id, reserved.metadata)
    raw_id = await client.read(ObjectId.DEVICE_ID)
    stored_id = raw_id.decode("utf-8", errors="replace").rstrip("\x00")
    record = await host.ledger.find_device(stored_id) if stored_id else None
    ours = record is not None and record.lot == lot.name and record.hw_serial == serial
    if ours and record is not None and record.state is DeviceState.PROVISIONED:
        cert_der = await client.read(ObjectId.DEVICE_CERT)
        if hashlib.sha256(cert_der).hexdigest() != record.fingerprint_sha256:
            raise ReadbackMismatchError(f"{stored_id}: certificate on the board differs from the ledger's")
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        signature = await host.step(Step.RECHECK, lambda: client.sign(challenge))
        verify_challenge(x509.load_der_x509_certificate(cert_der), challenge, signature)
        await host.audit(
            "device.rechecked", stored_id, {"hw_serial": serial, "port": host.port, "job_id": host.job_id}
        )
        return Finished("rechecked", stored_id)
    if lot.profile.allow_rework and not locked:
        await host.audit(
            "device.rework",
            stored_id or serial,
            {"hw_serial": serial, "port": host.port, "previous_lot": record.lot if record else None},
        )
        return None
    where = f"ID {stored_id!r}" if stored_id else "a certificate"
    state = "locked, " if locked else ""
    raise RefusedBoardError(
        f"board {serial} is {state}already provisioned with {where}; lot does not allow rework"
    )


async def complete_locked_board(
    host: JobHost, client: SecureElementClient, device_id: str, fields: Mapping[str, str]
) -> Finished:
    """Finish a job interrupted after LOCK from what the board holds, once it proves to be ours."""
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
    if host.lot.matter is not None:
        # Its passcode is sealed in the ledger; the board must at least hold a well-formed verifier.
        try:
            parse_commissioning(await client.read(ObjectId.MATTER_COMMISSIONING))
        except InputError as exc:
            raise ReadbackMismatchError(
                f"{device_id}: Matter commissioning data on the locked board: {exc}"
            ) from exc
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    signature = await host.step(Step.CHALLENGE, lambda: client.sign(challenge))
    verify_challenge(cert, challenge, signature)
    issued = IssuedCertificate.from_certificate(cert)
    if issued.serial_hex.lower() in await host.ledger.published_revoked_serials(host.lot.name):
        # Its job failed and a CRL has since said so: a published revocation is never taken back.
        raise RefusedBoardError(
            f"{device_id}: the certificate on this locked board (serial {issued.serial_hex}) was revoked "
            "in a CRL already published for the lot; it cannot stand again and the board cannot be "
            "re-written: put it aside and void the ID"
        )
    return Finished("provisioned", device_id, issued)
