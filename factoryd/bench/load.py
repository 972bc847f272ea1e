"""`factoryd bench load`: provisioning throughput with and without a flood on the station's HTTP side.

Two runs of the same line (the real daemon, boards in a `factoryd sim hub` process): one unloaded,
one while a load generator in another process hammers ``/metrics``, the station page's event
stream (more streams than the cap) and the customer API (reads, plus oversized uploads). Reported:
the provisioning rate of both runs, every endpoint's p50/p99 latency and status counts, requests
that timed out, and the daemon's memory. The generator is bounded in requests and time and talks
to 127.0.0.1 only; it speaks HTTP/1.1 over plain sockets so it needs nothing but the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from factoryd.api.tokens import Role, TokenStore
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.demo import DEMO_LOT, DemoOptions, demo_settings, prepare_lot
from factoryd.jobs.scheduler import Station
from factoryd.sim.remote import CONNECTION_POOL, RemoteSimHub

# The generator's hard limits (it stops at whichever comes first, or when told to).
DEFAULT_DURATION_S = 60.0
DEFAULT_MAX_REQUESTS = 500_000
# A request not answered within this counts as a timeout (the limits must answer much sooner).
REQUEST_TIMEOUT_S = 5.0
# A response body is read and dropped up to this size (a /metrics page is ~100 KiB).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# An event stream that was accepted is held this long, then reconnected (a page reloading).
STREAM_HOLD_S = 3.0
# An oversized upload declares this much (the JSON cap is 64 KiB): refused before it is read.
OVERSIZE_BYTES = 8 * 1024 * 1024
STATUS_POLL_S = 0.1
HUB_START_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LoadPlan:
    """What the generator does, and its bounds."""

    duration_s: float = DEFAULT_DURATION_S
    max_requests: int = DEFAULT_MAX_REQUESTS
    metrics_workers: int = 4
    api_workers: int = 8
    # More than api/limits.py's cap of 16, so some are refused.
    event_streams: int = 24
    # Every Nth API call of a worker (from its first) is an oversized upload (413 expected).
    oversize_every: int = 20
    request_timeout_s: float = REQUEST_TIMEOUT_S


@dataclass(frozen=True)
class Target:
    """Where the station listens and the credentials the generator uses."""

    api_port: int
    metrics_port: int
    lot: str
    customer_token: str
    reader_token: str
    operator_token: str


@dataclass
class _Kind:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "requests": sum(self.statuses.values()),
            "statuses": dict(sorted(self.statuses.items())),
            "p50_ms": round(_quantile(lat, 0.50) * 1000, 2) if lat else None,
            "p99_ms": round(_quantile(lat, 0.99) * 1000, 2) if lat else None,
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
        }


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class _Generator:
    """The load generator's workers and what they saw."""

    def __init__(self, target: Target, plan: LoadPlan, stop_file: Path | None) -> None:
        self.target = target
        self.plan = plan
        self.stop_file = stop_file
        self.kinds: dict[str, _Kind] = {k: _Kind() for k in ("metrics", "api", "upload", "events")}
        self.sent = 0
        self.started = time.monotonic()

    def done(self) -> bool:
        """True once the time, request budget or stop file says so."""
        if time.monotonic() - self.started >= self.plan.duration_s or self.sent >= self.plan.max_requests:
            return True
        return self.stop_file is not None and self.stop_file.exists()

    async def request(
        self, kind: str, port: int, method: str, path: str, headers: dict[str, str], *, body: bytes = b""
    ) -> None:
        """One request on a fresh connection; its status (or ``timeout``/``error``) and latency."""
        self.sent += 1
        started = time.monotonic()
        status = "error"
        try:
            async with asyncio.timeout(self.plan.request_timeout_s):
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                try:
                    writer.write(_head(method, path, headers, len(body)) + body)
                    await writer.drain()
                    line = await reader.readline()
                    status = line.split(b" ", 2)[1].decode() if line.startswith(b"HTTP/") else "error"
                    latency = time.monotonic() - started
                    remaining = MAX_RESPONSE_BYTES
                    while remaining > 0 and (chunk := await reader.read(65536)):
                        remaining -= len(chunk)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            status, latency = "timeout", time.monotonic() - started
        except OSError as exc:
            status, latency = f"error:{type(exc).__name__}", time.monotonic() - started
        self.kinds[kind].statuses[status] += 1
        self.kinds[kind].latencies_s.append(latency)

    async def stream(self, headers: dict[str, str]) -> None:
        """Open the page's event stream, hold it (read and drop), reconnect; refusals retry at once."""
        port = self.target.api_port
        while not self.done():
            self.sent += 1
            started = time.monotonic()
            status = "error"
            try:
                async with asyncio.timeout(self.plan.request_timeout_s):
                    reader, writer = await asyncio.open_connection(LOOPBACK, port)
                    writer.write(_head("GET", "/station/events", headers, 0))
                    await writer.drain()
                    line = await reader.readline()
                status = line.split(b" ", 2)[1].decode() if line.startswith(b"HTTP/") else "error"
                self.kinds["events"].latencies_s.append(time.monotonic() - started)
                held_until = time.monotonic() + STREAM_HOLD_S
                while status == "200" and time.monotonic() < held_until and not self.done():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            if not await reader.read(65536):
                                break
                writer.close()
            except TimeoutError:
                status = "timeout"
                self.kinds["events"].latencies_s.append(time.monotonic() - started)
            except OSError as exc:
                status = f"error:{type(exc).__name__}"
            self.kinds["events"].statuses[status] += 1
            if status != "200":
                await asyncio.sleep(0.05)

    async def metrics_worker(self) -> None:
        """Scrape /metrics back to back."""
        while not self.done():
            await self.request("metrics", self.target.metrics_port, "GET", "/metrics", {})

    async def api_worker(self) -> None:
        """The customer's reads back to back, with an oversized upload now and then."""
        t = self.target
        customer = {"Authorization": f"Bearer {t.customer_token}"}
        operator = {"Authorization": f"Bearer {t.operator_token}", "Content-Type": "application/json"}
        n = 0
        while not self.done():
            n += 1
            if n % self.plan.oversize_every == 1:  # the first call too, while the budget is full
                # Declares 8 MiB, sends a few bytes: refused (413) from the header, nothing buffered.
                await self.request("upload", t.api_port, "POST", "/lots", operator, body=b"{}")
                continue
            path = "/lots" if n % 2 else f"/lots/{t.lot}/progress"
            await self.request("api", t.api_port, "GET", path, customer)

    async def run(self) -> dict[str, Any]:
        """Run every worker until done; the summary."""
        reader = {"Authorization": f"Bearer {self.target.reader_token}"}
        async with asyncio.TaskGroup() as tg:
            for _ in range(self.plan.metrics_workers):
                tg.create_task(self.metrics_worker())
            for _ in range(self.plan.api_workers):
                tg.create_task(self.api_worker())
            for _ in range(self.plan.event_streams):
                tg.create_task(self.stream(reader))
        elapsed = time.monotonic() - self.started
        kinds = {k: v.summary() for k, v in self.kinds.items()}
        timeouts = sum(v.statuses.get("timeout", 0) for v in self.kinds.values())
        return {
            "elapsed_s": round(elapsed, 2),
            "requests": self.sent,
            "timeouts": timeouts,
            # The generator's own CPU: on a small machine it competes with the station for cores.
            "generator_cpu_s": round(time.process_time(), 2),
            "kinds": kinds,
        }


def _head(method: str, path: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if method == "POST":
        # The oversized upload declares far more than it sends: the limit must act on the header.
        lines.append(f"Content-Length: {OVERSIZE_BYTES if length else 0}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _decoy(stop_file: Path, port_file: Path) -> None:
    """An HTTP server that answers 429 to everything (the control run: the generator's own cost)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ValueError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, LOOPBACK, 0)
    async with server:
        await asyncio.to_thread(port_file.write_text, str(server.sockets[0].getsockname()[1]))
        while not await asyncio.to_thread(stop_file.exists):  # noqa: ASYNC110 - another process says when
            await asyncio.sleep(STATUS_POLL_S)


def generator_main(argv: list[str]) -> int:
    """``python -m factoryd.bench.load TARGET_JSON PLAN_JSON [STOP_FILE]``: run, print the summary as JSON.

    ``python -m factoryd.bench.load --decoy STOP_FILE PORT_FILE`` serves the control run's decoy.
    """
    if argv[0] == "--decoy":
        asyncio.run(_decoy(Path(argv[1]), Path(argv[2])))
        return 0
    target = Target(**json.loads(argv[0]))
    plan = LoadPlan(**json.loads(argv[1]))
    stop_file = Path(argv[2]) if len(argv) > 2 else None
    result = asyncio.run(_Generator(target, plan, stop_file).run())
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# The line under test ------------------------------------------------------------------------------


@dataclass
class LineRun:
    """One run of the line: its rate, outcomes, memory and (when loaded) what the generator saw."""

    mode: Literal["unloaded", "loaded", "decoy"]
    devices: int
    provisioned: int
    outcomes: dict[str, int]
    window_s: float
    rate_per_s: float
    rss_before_bytes: int
    rss_after_bytes: int
    peak_rss_bytes: int
    streams_refused: int = 0
    load: dict[str, Any] | None = None
    ledger_url: str = field(default="", repr=False)
    inventory: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly figures (without the inventory)."""
        data = asdict(self)
        data.pop("inventory")
        data.pop("ledger_url")
        data["window_s"] = round(self.window_s, 3)
        data["rate_per_s"] = round(self.rate_per_s, 3)
        return data


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


async def _start_decoy(workdir: Path, stop_file: Path, helpers: list[subprocess.Popen[bytes]]) -> int:
    """Start the decoy server process; its port."""
    port_file = workdir / "decoy.port"
    argv = [sys.executable, "-m", "factoryd.bench.load", "--decoy", str(stop_file), str(port_file)]
    helpers.append(subprocess.Popen(argv))  # noqa: S603, ASYNC220
    deadline = time.monotonic() + HUB_START_TIMEOUT_S
    while not await asyncio.to_thread(port_file.exists):
        if time.monotonic() > deadline:
            raise TimeoutError("the decoy server did not start")
        await asyncio.sleep(STATUS_POLL_S)
    return int(await asyncio.to_thread(port_file.read_text))


async def _finish(
    generator: subprocess.Popen[bytes] | None, stop_file: Path, results: dict[str, Any], plan: LoadPlan | None
) -> None:
    """Tell the generator to end and keep its summary (as ``results["load"]``)."""
    await asyncio.to_thread(stop_file.touch)
    if generator is None or plan is None:
        return
    out, _ = await asyncio.to_thread(generator.communicate, None, plan.request_timeout_s + 30)
    if out.strip():
        results["load"] = json.loads(out)


def _make_tokens(url: str) -> dict[str, str]:
    with TokenStore.open(url) as store:
        suffix = secrets.token_hex(3)
        _, customer = store.create(f"load-customer-{suffix}", Role.CUSTOMER, customer="demo-customer")
        _, reader = store.create(f"load-supervisor-{suffix}", Role.SUPERVISOR)
        _, operator = store.create(f"load-operator-{suffix}", Role.OPERATOR)
    return {"customer_token": customer, "reader_token": reader, "operator_token": operator}


async def run_line(
    workdir: Path,
    *,
    ports: int,
    devices: int,
    timing: Literal["zero", "realistic"],
    plan: LoadPlan | None,
    decoy: bool = False,
    timing_scale: float = 1.0,
) -> LineRun:
    """Prepare a lot, start a sim hub process, run the daemon (API, /metrics) until the supply is used."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    options = DemoOptions(
        ports=ports, boards=devices, timing=timing, timing_scale=timing_scale, flash=False, log_level="error",
        api_port=0, metrics_port=0, state_dir=workdir,
    )  # fmt: skip
    settings = demo_settings(options, workdir)
    settings = settings.model_copy(
        update={
            "hub": settings.hub.model_copy(update={"max_powered": ports, "power_cycle_off_s": 0.0}),
            "jobs": settings.jobs.model_copy(update={"reply_timeout_scale": 1.0}),
            "api": settings.api.model_copy(update={"host": LOOPBACK}),
            "metrics": settings.metrics.model_copy(update={"host": LOOPBACK}),
        }
    )
    passphrase = secrets.token_urlsafe(16).encode()
    await asyncio.to_thread(prepare_lot, options, settings, passphrase)
    tokens = await asyncio.to_thread(_make_tokens, settings.ledger_url)
    socket = workdir / "hub.sock"
    args = [
        sys.executable, "-m", "factoryd", "sim", "hub", "--socket", str(socket), "--ports", str(ports),
        "--boards", str(devices), "--timing", timing, "--timing-scale", str(timing_scale),
    ]  # fmt: skip
    stop_file = workdir / "load.stop"
    generator: subprocess.Popen[bytes] | None = None
    helpers: list[subprocess.Popen[bytes]] = []
    with (workdir / "sim-hub.log").open("wb") as log:
        hub_proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603, ASYNC220
    try:
        hub = RemoteSimHub(socket, pool=CONNECTION_POOL, connect_timeout_s=HUB_START_TIMEOUT_S)
        daemon: Daemon | None = None

        async def watch(station: Station) -> None:
            nonlocal generator
            if plan is not None and daemon is not None and daemon.api_port and daemon.metrics_port:
                api_port, metrics_port = daemon.api_port, daemon.metrics_port
                if decoy:
                    api_port = metrics_port = await _start_decoy(workdir, stop_file, helpers)
                target = Target(api_port, metrics_port, DEMO_LOT, **tokens)
                argv = [sys.executable, "-m", "factoryd.bench.load"]
                argv += [json.dumps(asdict(target)), json.dumps(asdict(plan)), str(stop_file)]
                generator = subprocess.Popen(argv, stdout=subprocess.PIPE)  # noqa: S603, ASYNC220
            while not (await hub.status())["exhausted"]:  # noqa: ASYNC110 - the supply is in another process
                await asyncio.sleep(STATUS_POLL_S)
            # The generator ends while the station still serves: every request it made met the limits.
            await _finish(generator, stop_file, results, plan)
            station.stop()

        results: dict[str, Any] = {}
        rss_before = _rss_now()
        daemon = Daemon(settings, DaemonHooks(hub=hub, passphrase=passphrase, on_ready=watch))
        station = await daemon.run()
        rss_after = _rss_now()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        refused = daemon.metrics.registry.get_sample_value(
            "factoryd_http_rejected_total", {"endpoint": "events", "status": "503"}
        )
        inventory = await hub.inventory()
        hub.close()
    finally:
        if generator is not None and generator.poll() is None:
            generator.kill()  # the run failed before the generator was told to end
        stop_file.touch()
        for helper in helpers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(helper.wait, 10)
            if helper.poll() is None:
                helper.kill()
        hub_proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(hub_proc.wait, 10)
        if hub_proc.poll() is None:
            hub_proc.kill()
    window = (
        station.last_job_at - station.first_job_at
        if station.first_job_at is not None and station.last_job_at is not None
        else 0.0
    )
    provisioned = station.outcomes.get("provisioned", 0)
    return LineRun(
        mode="unloaded" if plan is None else "decoy" if decoy else "loaded",
        devices=devices,
        provisioned=provisioned,
        outcomes=dict(station.outcomes),
        window_s=window,
        rate_per_s=provisioned / window if window > 0 else 0.0,
        rss_before_bytes=rss_before,
        rss_after_bytes=rss_after,
        peak_rss_bytes=peak,
        streams_refused=int(refused or 0),
        load=results.get("load"),
        ledger_url=settings.ledger_url,
        inventory=inventory,
    )


async def run_load_bench(
    workdir: Path,
    *,
    ports: int,
    devices: int,
    timing: Literal["zero", "realistic"] = "realistic",
    timing_scale: float = 1.0,
    plan: LoadPlan | None = None,
) -> dict[str, Any]:
    """The unloaded run, then the loaded one; both summaries and the throughput ratio."""
    plan = plan or LoadPlan()
    line: dict[str, Any] = {
        "ports": ports,
        "devices": devices,
        "timing": timing,
        "timing_scale": timing_scale,
    }
    unloaded = await run_line(workdir / "unloaded", plan=None, **line)
    loaded = await run_line(workdir / "loaded", plan=plan, **line)
    # The same flood at a decoy server beside the station: what the generator's own CPU costs the line.
    decoy = await run_line(workdir / "decoy", plan=plan, decoy=True, **line)
    ratio = loaded.rate_per_s / unloaded.rate_per_s if unloaded.rate_per_s else 0.0
    return {
        "benchmark": "load",
        "ports": ports,
        "devices": devices,
        "timing": timing,
        "timing_scale": timing_scale,
        "plan": asdict(plan),
        "unloaded": unloaded.summary(),
        "loaded": loaded.summary(),
        "decoy": decoy.summary(),
        "decoy_throughput_ratio": round(decoy.rate_per_s / unloaded.rate_per_s, 4)
        if unloaded.rate_per_s
        else 0.0,
        "throughput_ratio": round(ratio, 4),
        "within_10_percent": ratio >= 0.9,
    }


if __name__ == "__main__":
    sys.exit(generator_main(sys.argv[1:]))
