"""Prometheus metrics of the signing service (``factoryd_signer_`` prefix; its own ``/metrics`` endpoint).

``docs/metrics.md`` lists each metric. Labels are the lot, the station (from its client certificate:
a line has tens of stations) and the refusal code (a fixed vocabulary); never a device ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import start_http_server as _start_http_server

from factoryd.errors import ConfigError

# One request is a ledger transaction and a signature: ms in software, tens of ms on a token.
REQUEST_DURATION_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Label values kept per label before new ones fold into "other" (bounded series count).
MAX_LABEL_VALUES = 256
OTHER_LABEL = "other"
HTTP_SERVER_JOIN_TIMEOUT_S = 5.0


class _Bounded:
    """Folds label values past a cap into ``other``."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = value[:64] or "unknown"
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= MAX_LABEL_VALUES:
                return OTHER_LABEL
            self._seen.add(value)
            return value


class SignerMetrics:
    """Requests, refusals by reason, latency and quota remaining, in a registry of its own."""

    def __init__(self, *, signer: str, version: str) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated
        self.registry = CollectorRegistry(auto_describe=True)
        self._lot = _Bounded()
        self._station = _Bounded()
        self._reason = _Bounded()
        info = Gauge(
            "factoryd_signer_info",
            "The signing service (always 1).",
            ["signer", "version"],
            registry=self.registry,
        )
        info.labels(signer=signer, version=version).set(1)
        self.requests = Counter(
            "factoryd_signer_requests_total",
            "Certificate requests by outcome (issued, replayed, refused, error).",
            ["lot", "station", "outcome"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "factoryd_signer_refusals_total",
            "Refused certificate requests by reason (not_reserved, wrong_station, quota_exhausted, …).",
            ["lot", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "factoryd_signer_request_duration_seconds",
            "Time from a request's arrival to its answer (ledger checks, CSR checks, signing, commit).",
            ["outcome"],
            buckets=REQUEST_DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.quota_remaining = Gauge(
            "factoryd_signer_quota_remaining",
            "Certificates the lot's customer quota still allows (absent: no quota installed).",
            ["lot"],
            registry=self.registry,
        )
        self.superseded = Counter(
            "factoryd_signer_superseded_total",
            "Certificates superseded by a re-issue for the same reservation (never deployed; revoked).",
            ["lot"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "factoryd_signer_requests_in_flight",
            "Requests being checked or signed now.",
            registry=self.registry,
        )

    def issued(
        self,
        *,
        lot: str,
        station: str,
        replayed: bool,
        superseded: bool,
        duration_s: float,
        remaining: int | None,
    ) -> None:
        """Count a signed (or replayed) certificate."""
        outcome = "replayed" if replayed else "issued"
        self.requests.labels(lot=self._lot(lot), station=self._station(station), outcome=outcome).inc()
        self.duration.labels(outcome=outcome).observe(duration_s)
        if superseded:
            self.superseded.labels(lot=self._lot(lot)).inc()
        if remaining is not None:
            self.quota_remaining.labels(lot=self._lot(lot)).set(remaining)

    def refused(self, *, lot: str, station: str, reason: str, duration_s: float, error: bool = False) -> None:
        """Count a refusal (``error``: the signer could not decide, e.g. its ledger is down)."""
        outcome = "error" if error else "refused"
        self.requests.labels(lot=self._lot(lot), station=self._station(station), outcome=outcome).inc()
        self.refusals.labels(lot=self._lot(lot), reason=self._reason(reason)).inc()
        self.duration.labels(outcome=outcome).observe(duration_s)

    def quota(self, lot: str, remaining: int | None) -> None:
        """Set (or, with None, drop) a lot's quota gauge."""
        if remaining is None:
            with contextlib.suppress(KeyError):
                self.quota_remaining.remove(self._lot(lot))
        else:
            self.quota_remaining.labels(lot=self._lot(lot)).set(remaining)

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int) -> AsyncIterator[int]:
        """Serve ``/metrics`` on host:port from a thread; yields the bound port (0 = any free one)."""
        try:
            server, thread = await asyncio.to_thread(_start_http_server, port, host, self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot listen for signer metrics on {host}:{port}: {exc}") from exc
        try:
            yield int(server.server_port)
        finally:

            def stop() -> None:
                server.shutdown()
                server.server_close()
                thread.join(HTTP_SERVER_JOIN_TIMEOUT_S)

            await asyncio.to_thread(stop)
