"""Jobs wait out a ledger outage at their safe point, with the station's intake paused meanwhile.

A job's ledger call that finds the database unreachable (PostgreSQL restarting, the network to it
cut, SQLite's disk full) changed nothing (``ledger/aio.py``, ``ledger/engine.py``), so it can simply
be made again once the ledger is back. Until then the job waits where it is: before its reservation,
before the certificate is written to the board, or with the certificate on the board before it is
recorded. The station takes no new board meanwhile (``Station.pause`` with key ``ledger`` and the
probe below, which resumes intake by itself), and the job fails cleanly, its reservation kept, if the
outage outlasts the hold; the board stays in its port and resumes with the same ID.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

import structlog

from factoryd.ledger import AsyncLedger
from factoryd.ledger.errors import LedgerUnavailableError
from factoryd.telemetry.events import PortState, PortUpdate, TelemetrySink

log = structlog.get_logger(__name__)

# The pause key of ledger outages (Station.pause); the reason codes are the errors' own
# (ledger_unavailable, ledger_storage_full) with their operator sentences in telemetry/reasons.py.
LEDGER_PAUSE_KEY = "ledger"
# How long a job waits at its safe point for the ledger before it fails cleanly (reservation kept).
# Five minutes covers a PostgreSQL restart or failover and a network blip with room to spare; a board
# waiting longer is better released to the operator with a reason than held without one.
LEDGER_HOLD_S = 300.0
# How often a held job looks whether the pause was lifted (the probe itself backs off: scheduler.py).
HOLD_POLL_S = 0.1
# What the probe writes when the ledger is back: the outage is on record in the audit trail.
RECOVERED_ACTION = "ledger.recovered"


class PauseInfo(Protocol):
    """What the station knows of one pause (``factoryd.jobs.scheduler.IntakePause``)."""

    @property
    def reason(self) -> str:
        """The reason code."""

    @property
    def message(self) -> str:
        """The detail (the error's message)."""

    @property
    def since(self) -> datetime:
        """When the pause began."""


class Pauser(Protocol):
    """The part of the station a hold needs (``factoryd.jobs.scheduler.Station``)."""

    def pause(
        self, key: str, reason: str, message: str, *, probe: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Stop intake under ``key`` until ``probe`` succeeds (or ``resume(key)``)."""

    @property
    def pauses(self) -> Mapping[str, PauseInfo]:
        """The pauses in force, by key."""

    @property
    def stopping(self) -> bool:
        """True once the station was asked to stop."""


class LedgerHold:
    """The outage handler of the jobs' ledger view (``ledger.aio.held_ledger``)."""

    def __init__(
        self,
        ledger: AsyncLedger,
        *,
        actor: str,
        hold_s: float = LEDGER_HOLD_S,
        telemetry: TelemetrySink | None = None,
    ) -> None:
        self._ledger = ledger.direct  # the probe must fail at once, never hold itself
        self._actor = actor
        self._telemetry = telemetry
        self.hold_s = hold_s
        self._pauser: Pauser | None = None
        self.held_calls = 0
        self.recoveries = 0

    def bind(self, pauser: Pauser) -> None:
        """Attach the station whose intake an outage pauses (built after the pipeline)."""
        self._pauser = pauser

    async def __call__(self, exc: LedgerUnavailableError, waited_s: float) -> bool:
        """Pause intake and wait for the ledger; True: retry the call, False: give up (hold ran out)."""
        pauser = self._pauser
        remaining_s = self.hold_s - waited_s
        if pauser is None or remaining_s <= 0:
            return False
        pauser.pause(LEDGER_PAUSE_KEY, exc.reason, str(exc), probe=self.probe)
        self.held_calls += 1
        self._show_held(exc.reason)
        log.warning(
            "ledger unavailable: job held at its safe point", reason=exc.reason, error=str(exc),
            hold_s=round(remaining_s, 1),
        )  # fmt: skip
        deadline = time.monotonic() + remaining_s
        while LEDGER_PAUSE_KEY in pauser.pauses:
            if pauser.stopping:
                # Shutting down: the job ends here, its reservation kept (the next start closes its record).
                return False
            if time.monotonic() >= deadline:
                log.warning("ledger still unavailable: the held job fails, its reservation kept")
                return False
            await asyncio.sleep(HOLD_POLL_S)
        return True

    def _show_held(self, reason: str) -> None:
        """The held job's port shows the reason (port, lot, device: the job's bound log context)."""
        bound = structlog.contextvars.get_contextvars()
        port = bound.get("port")
        if self._telemetry is None or not isinstance(port, str) or not port:
            return
        lot, device_id = bound.get("lot"), bound.get("device_id")
        self._telemetry.port_update(
            PortUpdate(
                port=port,
                state=PortState.PROVISIONING,
                step=None,
                lot=lot if isinstance(lot, str) else None,
                device_id=device_id if isinstance(device_id, str) else None,
                attempt=0,
                since=datetime.now(UTC),
                reason=reason,
            )
        )

    async def probe(self) -> None:
        """Raise while the ledger cannot commit; when it can, one audit entry records the outage."""
        now = datetime.now(UTC)
        pause = self._pauser.pauses.get(LEDGER_PAUSE_KEY) if self._pauser is not None else None
        reason, message, since = (
            (pause.reason, pause.message, pause.since) if pause else ("ledger_unavailable", "", now)
        )
        await self._ledger.audit(
            actor=self._actor,
            action=RECOVERED_ACTION,
            subject=self._actor,
            details={
                "reason": reason,
                "message": message[:300],
                "since": since.isoformat(),
                "down_s": round((now - since).total_seconds(), 3),
            },
        )
        self.recoveries += 1
        log.info("ledger reachable again", reason=reason, down_s=round((now - since).total_seconds(), 3))
