"""Prometheus metrics of one station (``factoryd_`` prefix, base units, no device-ID labels).

Every metric lives in the :class:`Metrics` instance's own :class:`CollectorRegistry`, so tests and
tools can create as many as they like. ``docs/metrics.md`` lists each metric, its labels and the
PromQL of the Grafana panels. Label values that come from events (step, reason, outcome, lot, port)
are cleaned and capped per label so that a bug upstream cannot explode the series count.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client import make_asgi_app as _make_asgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from factoryd.errors import ConfigError
from factoryd.telemetry.events import (
    JobEvent,
    LinkStats,
    LotProgressUpdate,
    PortState,
    PortUpdate,
    TelemetrySink,
)
from factoryd.telemetry.limits import TokenBuckets, retry_after_header

__all__ = [
    "JOB_DURATION_BUCKETS_S",
    "LOT_ID_STATES",
    "STEP_DURATION_BUCKETS_S",
    "Metrics",
]

_log = structlog.get_logger(__name__)

# A whole job is seconds (native sim) to minutes (firmware flash over 115200 baud); 10 min is the
# pipeline's outer limit, anything longer lands in +Inf.
JOB_DURATION_BUCKETS_S = (2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
# Steps range from a HELLO round trip (ms) to key generation on an ECC608 (~1 s) and firmware chunks.
STEP_DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Per-board ledger writes that shared one SQLite commit (group commit, ledger/aio.py), and how long
# the worker held that transaction (the fdatasync dominates: a slow disk shows here first).
LEDGER_GROUP_WRITES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LEDGER_GROUP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

LOT_ID_STATES = ("available", "reserved", "provisioned", "void")
FAILED_JOB_OUTCOMES = frozenset({"failed", "aborted", "refused"})

# Distinct values kept per label before new ones are folded into "other". Steps and reasons are
# enum-like (pipeline steps, FactorydError.reason) so real values stay far below these caps.
MAX_STEP_LABELS = 64
MAX_REASON_LABELS = 128
MAX_PORT_LABELS = 512
MAX_LOT_LABELS = 256
LABEL_VALUE_MAX_CHARS = 64
OTHER_LABEL = "other"
NO_REASON_LABEL = "none"
UNKNOWN_LABEL = "unknown"
# /metrics: Prometheus scrapes every 15 s, plus a dashboard or two; a flood of scrapes must not take the
# interpreter from provisioning (each renders every series under the GIL). Past the rate per client:
# 429; past the concurrent scrapes: 503. Both answered at once.
METRICS_SCRAPES_PER_S = 1.0
METRICS_SCRAPE_BURST = 5
METRICS_MAX_CONCURRENT = 4
# Scrapes this close together share one rendering (Prometheus' resolution is the scrape interval).
METRICS_CACHE_S = 1.0
METRICS_CACHE_VARIANTS = 8
# A refused scrape's request is read (briefly, once) before the 429 goes back.
METRICS_REFUSE_READ_S = 0.2
METRICS_REFUSE_READ_BYTES = 8192

_LABEL_UNSAFE = re.compile(r"[^a-z0-9_.:-]+")


class _LabelGuard:
    """Cleans label values and folds values past the cap into ``other`` (bounded cardinality)."""

    def __init__(self, limit: int, *, lowercase: bool = True) -> None:
        self._limit = limit
        self._lowercase = lowercase
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None, default: str) -> str:
        if value is None:
            return default
        text = value.lower() if self._lowercase else value
        if self._lowercase:
            text = _LABEL_UNSAFE.sub("_", text).strip("_")
        text = text[:LABEL_VALUE_MAX_CHARS]
        if not text:
            return default
        if text in self._seen:
            return text
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) >= self._limit:
                return OTHER_LABEL
            self._seen.add(text)
        return text


class Metrics(TelemetrySink):
    """The station's Prometheus metrics; also a :class:`TelemetrySink`."""

    def __init__(self, *, station: str, line: str, version: str) -> None:
        # The *_created series double the exposition for no use on a dashboard (process-wide switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated
        self._port_children: dict[str, dict[PortState | None, Gauge]] = {}
        self._port_current: dict[str, PortState] = {}
        self._step_children: dict[tuple[str, str], Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._steps = _LabelGuard(MAX_STEP_LABELS)
        self._reasons = _LabelGuard(MAX_REASON_LABELS)
        self._outcomes = _LabelGuard(16)
        self._ports = _LabelGuard(MAX_PORT_LABELS, lowercase=False)
        self._lots = _LabelGuard(MAX_LOT_LABELS, lowercase=False)

        self.build_info = Gauge(
            "factoryd_build_info",
            "Always 1; labels carry the factoryd version and the station identity.",
            ["version", "station", "line"],
            registry=r,
        )
        self.build_info.labels(version=version, station=station, line=line).set(1)

        self.jobs = Counter(
            "factoryd_jobs",
            "Finished provisioning jobs by outcome (ok, failed, aborted, refused) and reason code.",
            ["outcome", "reason"],
            registry=r,
        )
        self.provisioned = Counter(
            "factoryd_provisioned",
            "Devices this station provisioned (jobs that ended in a new device; factoryd.telemetry.figures).",
            registry=r,
        )
        self.jobs_first_pass = Counter(
            "factoryd_jobs_first_pass",
            "Finished jobs for first-pass yield: outcome=pass if it ended ok on attempt 1, else fail.",
            ["outcome"],
            registry=r,
        )
        self.job_failures = Counter(
            "factoryd_job_failures",
            "Failed jobs by the step that failed last and the reason code.",
            ["step", "reason"],
            registry=r,
        )
        self.job_duration = Histogram(
            "factoryd_job_duration_seconds",
            "Duration of finished jobs from power-on to the final outcome.",
            ["outcome"],
            buckets=JOB_DURATION_BUCKETS_S,
            registry=r,
        )
        self.step_duration = Histogram(
            "factoryd_step_duration_seconds",
            "Duration of pipeline steps by step and outcome.",
            ["step", "outcome"],
            buckets=STEP_DURATION_BUCKETS_S,
            registry=r,
        )
        self.ledger_group_writes = Histogram(
            "factoryd_ledger_group_writes",
            "Per-board ledger writes committed together in one SQLite transaction (group commit).",
            buckets=LEDGER_GROUP_WRITES_BUCKETS,
            registry=r,
        )
        self.ledger_group_seconds = Histogram(
            "factoryd_ledger_group_seconds",
            "Time the ledger's worker held one group transaction, its first write to its COMMIT.",
            buckets=LEDGER_GROUP_SECONDS_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "factoryd_retries",
            "Retries (step-level and job-level) by the step that was retried.",
            ["step"],
            registry=r,
        )
        self.port_state = Gauge(
            "factoryd_port_state",
            "One-hot state of each hub port: 1 for the current state, 0 for the others.",
            ["port", "state"],
            registry=r,
        )
        self.port_state_since = Gauge(
            "factoryd_port_state_since_timestamp_seconds",
            "Unix time at which the port entered its current state.",
            ["port"],
            registry=r,
        )
        self.lot_ids = Gauge(
            "factoryd_lot_ids",
            "Device IDs of a lot by ledger state (available, reserved, provisioned, void).",
            ["lot", "state"],
            registry=r,
        )
        self.frames_sent = Counter(
            "factoryd_frames_sent", "Protocol frames written to boards.", ["port"], registry=r
        )
        self.frames_received = Counter(
            "factoryd_frames_received", "Protocol frames decoded from boards.", ["port"], registry=r
        )
        self.frame_crc_errors = Counter(
            "factoryd_frame_crc_errors", "Frames from boards dropped for a bad CRC.", ["port"], registry=r
        )
        self.frame_resends = Counter(
            "factoryd_frame_resends",
            "Requests resent after a CRC error, NACK or timeout.",
            ["port"],
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "factoryd_mqtt_connected", "1 while connected to the MQTT broker, else 0.", registry=r
        )
        self.mqtt_queue_depth = Gauge(
            "factoryd_mqtt_queue_depth", "MQTT events waiting to be published.", registry=r
        )
        self.mqtt_dropped = Counter(
            "factoryd_mqtt_dropped",
            "MQTT events dropped because the bounded queue was full (oldest first).",
            registry=r,
        )
        self.intake_paused = Gauge(
            "factoryd_intake_paused",
            "1 while the station takes no new boards for this reason (e.g. hub_disconnected), else 0.",
            ["reason"],
            registry=r,
        )
        self.mqtt_healthy = Gauge(
            "factoryd_mqtt_healthy",
            "1 while the MQTT broker acknowledges publishes (connected and PUBACKs arrive), else 0.",
            registry=r,
        )
        self.http_rejected = Counter(
            "factoryd_http_rejected",
            "HTTP requests refused for load (429 rate, 503 too many streams or scrapes) by endpoint.",
            ["endpoint", "status"],
            registry=r,
        )
        self.mqtt_connected.set(0)
        self.mqtt_healthy.set(0)
        # Series that rates and ratios divide by exist from the start, so panels and alerts see 0, not
        # "no data", before the first job of the day.
        self.jobs.labels(outcome="ok", reason=NO_REASON_LABEL)
        for outcome in ("pass", "fail"):
            self.jobs_first_pass.labels(outcome=outcome)

    # -- direct instrumentation ---------------------------------------------------------------

    def observe_step(self, step: str, duration_s: float, outcome: str) -> None:
        """Record one pipeline step's duration and outcome."""
        child = self._step_children.get((step, outcome))
        if child is None:
            # labels() is a locked lookup; a (step, outcome) pair maps to one child for good.
            child = self.step_duration.labels(
                step=self._steps(step, UNKNOWN_LABEL), outcome=self._outcomes(outcome, UNKNOWN_LABEL)
            )
            self._step_children[(step, outcome)] = child
        child.observe(max(duration_s, 0.0))

    def frame_sent(self, port: str = UNKNOWN_LABEL, count: int = 1) -> None:
        """Count frames written to a board."""
        self.frames_sent.labels(port=self._ports(port, UNKNOWN_LABEL)).inc(count)

    def frame_received(self, port: str = UNKNOWN_LABEL, count: int = 1) -> None:
        """Count frames decoded from a board."""
        self.frames_received.labels(port=self._ports(port, UNKNOWN_LABEL)).inc(count)

    def crc_error(self, port: str = UNKNOWN_LABEL, count: int = 1) -> None:
        """Count frames dropped for a bad CRC."""
        self.frame_crc_errors.labels(port=self._ports(port, UNKNOWN_LABEL)).inc(count)

    def resend(self, port: str = UNKNOWN_LABEL, count: int = 1) -> None:
        """Count resent requests."""
        self.frame_resends.labels(port=self._ports(port, UNKNOWN_LABEL)).inc(count)

    def http_rejected_request(self, endpoint: str, status: int) -> None:
        """Count one request refused for load (api/limits.py, the /metrics server)."""
        self.http_rejected.labels(endpoint=endpoint, status=str(status)).inc()

    def intake_pause(self, reason: str, paused: bool) -> None:
        """Set the paused-intake gauge for one reason code (the scheduler's pause and resume)."""
        self.intake_paused.labels(reason=self._reasons(reason, UNKNOWN_LABEL)).set(1 if paused else 0)

    def ledger_group_committed(self, writes: int, seconds: float) -> None:
        """One group commit landed: how many writes it held and how long its transaction took.

        Called on the ledger's worker thread (prometheus-client is thread-safe); never raises.
        """
        try:
            self.ledger_group_writes.observe(writes)
            self.ledger_group_seconds.observe(max(seconds, 0.0))
        except Exception:  # a sink never raises (TelemetrySink contract)
            _log.exception("metrics_ledger_group_failed", writes=writes)

    def mqtt_state(
        self,
        connected: bool,
        queue_depth: int,
        dropped_total_increment: int = 0,
        *,
        healthy: bool | None = None,
    ) -> None:
        """Record the MQTT publisher's connection state, health, queue depth and new drops."""
        self.mqtt_connected.set(1 if connected else 0)
        self.mqtt_healthy.set(1 if (connected if healthy is None else healthy) else 0)
        self.mqtt_queue_depth.set(queue_depth)
        if dropped_total_increment > 0:
            self.mqtt_dropped.inc(dropped_total_increment)

    # -- TelemetrySink --------------------------------------------------------------------------

    def port_update(self, update: PortUpdate) -> None:
        """Set the port's one-hot state gauge and its since-timestamp."""
        try:
            port = self._ports(update.port, UNKNOWN_LABEL)
            children = self._port_children.get(port)
            if children is None:
                # labels() is a locked dict lookup per call; a port's children never change: keep them.
                children = {
                    state: self.port_state.labels(port=port, state=state.value) for state in PortState
                }
                children[None] = self.port_state_since.labels(port=port)
                self._port_children[port] = children
            previous = self._port_current.get(port)
            if previous is not update.state:
                if previous is not None:
                    children[previous].set(0)
                else:
                    for state in PortState:
                        children[state].set(0)
                children[update.state].set(1)
                self._port_current[port] = update.state
            children[None].set(update.since.timestamp())
        except Exception:  # a sink never raises (TelemetrySink contract)
            _log.exception("metrics_port_update_failed", port=update.port)

    def job_event(self, event: JobEvent) -> None:
        """Update job, step, retry and first-pass metrics from a job event."""
        try:
            self._job_event(event)
        except Exception:  # a sink never raises (TelemetrySink contract)
            _log.exception("metrics_job_event_failed", kind=event.kind, port=event.port)

    def _job_event(self, event: JobEvent) -> None:
        if event.kind == "step":
            if event.step is not None and event.duration_s is not None:
                self.observe_step(event.step, event.duration_s, event.outcome or UNKNOWN_LABEL)
        elif event.kind == "retry":
            self.retries.labels(step=self._steps(event.step, UNKNOWN_LABEL)).inc()
        elif event.kind in ("job_finished", "job_failed"):
            if event.kind == "job_finished":
                outcome, reason = "ok", NO_REASON_LABEL
                if event.outcome == "provisioned":
                    self.provisioned.inc()
            else:
                outcome = event.outcome if event.outcome in FAILED_JOB_OUTCOMES else "failed"
                reason = self._reasons(event.reason, UNKNOWN_LABEL)
                self.job_failures.labels(step=self._steps(event.step, UNKNOWN_LABEL), reason=reason).inc()
            self.jobs.labels(outcome=outcome, reason=reason).inc()
            first_pass = event.kind == "job_finished" and event.attempt <= 1
            self.jobs_first_pass.labels(outcome="pass" if first_pass else "fail").inc()
            if event.duration_s is not None:
                self.job_duration.labels(outcome=outcome).observe(event.duration_s)

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Set the lot's ID counts by ledger state."""
        try:
            lot = self._lots(update.lot, UNKNOWN_LABEL)
            for state in LOT_ID_STATES:
                self.lot_ids.labels(lot=lot, state=state).set(getattr(update, state))
        except Exception:  # a sink never raises (TelemetrySink contract)
            _log.exception("metrics_lot_progress_failed", lot=update.lot)

    def link_stats(self, stats: LinkStats) -> None:
        """Fold one closed board link's frame counters into the per-port counters."""
        try:
            self.frame_sent(stats.port, stats.frames_sent)
            self.frame_received(stats.port, stats.frames_received)
            self.crc_error(stats.port, stats.crc_errors)
            self.resend(stats.port, stats.resends)
        except Exception:  # a sink never raises (TelemetrySink contract)
            _log.exception("metrics_link_stats_failed", port=stats.port)

    # -- exposition -----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this registry (mount it at ``/metrics`` in FastAPI)."""
        return make_asgi_app(self.registry)

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int) -> AsyncIterator[int]:
        """Serve ``/metrics`` on host:port from a thread; yields the bound port (use 0 for any)."""
        try:
            server, thread = await asyncio.to_thread(_start_metrics_server, host, port, self)
        except OSError as exc:
            raise ConfigError(f"cannot listen for metrics on {host}:{port}: {exc}") from exc
        try:
            yield int(server.server_port)
        finally:
            await asyncio.to_thread(_stop_http_server, server, thread)


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (a scrape every 15 s is no news)."""

    def log_message(self, format: str, *args: Any) -> None:
        """Drop the line."""


def _limited(app: Callable[..., Iterable[bytes]], metrics: Metrics) -> Callable[..., Iterable[bytes]]:
    """The exposition app behind a concurrency limit (503 at once) and a one-second rendering cache."""
    slots = threading.BoundedSemaphore(METRICS_MAX_CONCURRENT)
    # Renderings by what the scraper accepts (text or OpenMetrics, gzip or not): (at, status, headers, body).
    cache: dict[tuple[str, str], tuple[float, str, list[tuple[str, str]], bytes]] = {}
    cache_lock = threading.Lock()

    def refuse(start_response: Callable[..., Any], status: str, wait_s: float) -> list[bytes]:
        metrics.http_rejected_request("metrics", int(status[:3]))
        start_response(status, [("Content-Type", "text/plain"), ("Retry-After", retry_after_header(wait_s))])
        return [b"too many scrapes; slow down\n"]

    def render(environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        captured: list[Any] = []

        def keep(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            captured[:] = [status, headers]

        body = b"".join(app(environ, keep))
        return captured[0], captured[1], body

    def limited(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # The rate was checked when the connection was accepted (Server.process_request).
        if not slots.acquire(blocking=False):
            return refuse(start_response, "503 Service Unavailable", 1.0)
        try:
            if environ.get("QUERY_STRING"):  # name[] filters: rendered for that caller alone
                status, headers, body = render(environ)
            else:
                key = (str(environ.get("HTTP_ACCEPT", "")), str(environ.get("HTTP_ACCEPT_ENCODING", "")))
                with cache_lock:
                    now = time.monotonic()
                    hit = cache.get(key)
                    if hit is None or now - hit[0] >= METRICS_CACHE_S:
                        if len(cache) >= METRICS_CACHE_VARIANTS:
                            cache.clear()
                        hit = cache[key] = (now, *render(environ))
                _, status, headers, body = hit
            start_response(status, headers)
            return [body]
        finally:
            slots.release()

    return limited


def _start_metrics_server(host: str, port: int, metrics: Metrics) -> tuple[WSGIServer, threading.Thread]:
    """prometheus_client's threaded WSGI server on host:port, with the scrape limits in front."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    scrapes = TokenBuckets(METRICS_SCRAPES_PER_S, METRICS_SCRAPE_BURST)

    class Server(ThreadingWSGIServer):
        address_family = family

        def process_request(self, request: Any, client_address: Any) -> None:
            """A client past its rate is answered 429 on the accepting thread: no thread, no parsing."""
            wait_s = scrapes.take(str(client_address[0]))
            if not wait_s:
                super().process_request(request, client_address)
                return
            metrics.http_rejected_request("metrics", 429)
            with contextlib.suppress(OSError):
                # Read what the client sent first: closing on unread bytes would reset the connection.
                request.settimeout(METRICS_REFUSE_READ_S)
                request.recv(METRICS_REFUSE_READ_BYTES)
                request.sendall(
                    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: "
                    + retry_after_header(wait_s).encode()
                    + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            self.shutdown_request(request)

    app = _limited(make_wsgi_app(metrics.registry), metrics)
    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread


def make_asgi_app(registry: CollectorRegistry) -> Callable[..., Any]:
    """An ASGI app serving ``registry`` in the Prometheus text format."""
    app: Callable[..., Any] = _make_asgi_app(registry=registry)
    return app


# serve_forever polls its shutdown flag every 0.5 s; joining for longer only waits on a stuck scrape.
HTTP_SERVER_JOIN_TIMEOUT_S = 5.0


def _stop_http_server(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(HTTP_SERVER_JOIN_TIMEOUT_S)
