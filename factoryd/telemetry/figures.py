"""The figures every view shows, defined once: the demo's live view and summary, `factoryd status`,
the API's /status, the station page and /metrics all compute them here.

- **Jobs by outcome** (``JobCounts``): jobs this station finished since it started. A board that
  fails and is run again counts once per job; ``provisioned`` jobs are exactly the devices this
  station provisioned (each such job binds a new ID). /metrics: ``factoryd_provisioned_total``
  and ``factoryd_jobs_total{outcome}``.
- **Lot counts**: device IDs of a lot by ledger state (all stations, all runs), read from the ledger
  when shown; a lot's ``provisioned`` equals this station's ``provisioned`` jobs only for a lot that
  this one run started. /metrics: ``factoryd_lot_ids{state}``.
- **Rate** (``Rate``): devices provisioned per hour over the trailing window of ``RATE_WINDOW_S``,
  or since the station started if that is shorter. The same as PromQL
  ``rate(factoryd_provisioned_total[10m]) * 3600`` once the station has run for 10 minutes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

# The rate's trailing window: long enough to smooth one slow board, short enough to show a stall.
RATE_WINDOW_S = 600.0
SECONDS_PER_HOUR = 3600.0
FAILED_OUTCOMES = ("failed", "refused")


@dataclass(frozen=True)
class JobCounts:
    """Jobs finished by this station since it started, by outcome."""

    provisioned: int = 0
    rechecked: int = 0
    failed: int = 0

    @classmethod
    def from_outcomes(cls, outcomes: Mapping[str, int]) -> JobCounts:
        """Fold the station's per-outcome counter (``failed`` includes ``refused``)."""
        return cls(
            provisioned=outcomes.get("provisioned", 0),
            rechecked=outcomes.get("rechecked", 0),
            failed=sum(outcomes.get(k, 0) for k in FAILED_OUTCOMES),
        )

    @property
    def jobs(self) -> int:
        """Every finished job."""
        return self.provisioned + self.rechecked + self.failed


@dataclass(frozen=True)
class Rate:
    """Devices provisioned per hour over ``window_s`` seconds ending now."""

    per_hour: float
    window_s: float

    def describe(self) -> str:
        """E.g. ``6,618 provisioned/h (last 10 min)``."""
        return f"{self.per_hour:,.0f} provisioned/h (last {format_window(self.window_s)})"


def provisioned_rate(provisioned_at: Iterable[datetime], *, now: datetime, since: datetime) -> Rate:
    """The rate at ``now`` of a station that started at ``since``, from its provisioned jobs' end times."""
    window_s = min(RATE_WINDOW_S, (now - since).total_seconds())
    if window_s <= 0:
        return Rate(per_hour=0.0, window_s=0.0)
    count = sum(1 for at in provisioned_at if 0 <= (now - at).total_seconds() <= window_s)
    return Rate(per_hour=count * SECONDS_PER_HOUR / window_s, window_s=window_s)


def format_window(seconds: float) -> str:
    """``10 min``, ``95 s``, ``0.8 s``: how long a window is, for people."""
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    if seconds >= 10:
        return f"{seconds:.0f} s"
    return f"{seconds:.1f} s"
