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

``link_stats()`` hands the pipeline the ``LinkStats`` telemetry event of the link the session
opened, which the pipeline emits when the session closes (every profile reports its link).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar

from factoryd.jobs.steps import Step
from factoryd.pki.issuer import IssuedCertificate, Issuer
from factoryd.telemetry.events import LinkStats

if TYPE_CHECKING:
    from cryptography import x509

    from factoryd.hub.base import Hub
    from factoryd.jobs.lots import LotContext
    from factoryd.jobs.pipeline import PipelineSettings
    from factoryd.ledger import AsyncLedger
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
