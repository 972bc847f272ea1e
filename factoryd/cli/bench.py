"""`factoryd bench`: link, line, overhead, ledger, PKI and attestation benchmarks (results as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from factoryd.cli.opts import command_group, event_loop_for, fail, guard, run_async
from factoryd.errors import ConfigError
from factoryd.log import configure_logging

app = command_group("Benchmarks (results as JSON).")

OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON result here too.")]


def _write_json(result: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark result and write it to a file."""
    text = json.dumps(result, indent=2, sort_keys=True)
    if out is not None:
        out.write_text(text + "\n")
    typer.echo(text)


@app.command("link")
def bench_link(
    seconds: Annotated[float, typer.Option(help="Duration per measurement.")] = 3.0,
    out: OutOption = None,
) -> None:
    """Round trips per second to a simulated board over a real PTY."""
    from factoryd.bench.link import run_link_bench  # noqa: PLC0415 - keep `factoryd --help` fast

    _write_json(run_async(run_link_bench(seconds)), out)


@app.command("line")
def bench_line(
    ports: Annotated[int, typer.Option(min=1, max=1024, help="Ports on the line.")] = 16,
    devices: Annotated[int, typer.Option(min=1, help="Boards to provision.")] = 256,
    timing: Annotated[str, typer.Option(help="realistic or zero.")] = "realistic",
    flash: Annotated[bool, typer.Option(help="Include the signed firmware update.")] = False,
    profile: Annotated[
        str, typer.Option(help="Board profile: factoryd-v1, arduino-v1, mcumgr or nrf91-at.")
    ] = "factoryd-v1",
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON only (the default output is JSON too).")
    ] = True,
    out: OutOption = None,
) -> None:
    """Line throughput against the physical limit and against one board at a time."""
    from factoryd.bench.line import run_line_bench  # noqa: PLC0415
    from factoryd.demo import DEMO_PROFILES  # noqa: PLC0415

    if timing not in ("zero", "realistic"):
        fail(f"--timing must be 'zero' or 'realistic', not {timing!r}")
    if profile not in DEMO_PROFILES:
        fail(f"--profile must be one of {', '.join(DEMO_PROFILES)}, not {profile!r}")
    configure_logging("error", "console")
    result = run_async(
        run_line_bench(ports, devices, timing=timing, flash=flash, profile=profile)  # type: ignore[arg-type]
    )
    _write_json(result, out)


@app.command("signer")
def bench_signer(
    stations: Annotated[int, typer.Option(min=1, max=64, help="Stations sending at once.")] = 8,
    per_station: Annotated[int, typer.Option(min=1, help="Certificate requests per station.")] = 50,
    ledger_url: Annotated[
        str | None, typer.Option(help="Ledger to run on (PostgreSQL for the shared-ledger figure).")
    ] = None,
    latency_samples: Annotated[int, typer.Option(min=1, help="Boards timed one at a time.")] = 60,
    out: OutOption = None,
) -> None:
    """Certificates per second through the line's signer, and the latency it adds per board."""
    from factoryd.bench.signer import run_signer_bench  # noqa: PLC0415

    configure_logging("error", "console")
    bench = run_signer_bench(
        stations=stations, per_station=per_station, ledger_url=ledger_url, latency_samples=latency_samples
    )
    result = run_async(bench)
    _write_json(result, out)


def _event_loop_name(name: str) -> str:
    """The loop a ``--loop`` value runs: ``auto`` resolves as ``[station] event_loop = "auto"`` does."""
    if name not in ("auto", "asyncio", "uvloop"):
        fail(f"--loop must be auto, asyncio or uvloop, not {name!r}")
    try:
        return event_loop_for(name)
    except ConfigError as exc:
        fail(f"--loop {name}: {exc}")


@app.command("overhead")
def bench_overhead(
    ports: Annotated[list[int] | None, typer.Option(help="Port counts (repeatable).")] = None,
    single: Annotated[bool, typer.Option(hidden=True, help="Run one port count in this process.")] = False,
    profile: Annotated[
        bool, typer.Option(help="Also profile the window by layer (cProfile, /proc).")
    ] = False,
    repeat: Annotated[int, typer.Option(min=1, help="Runs per port count, interleaved.")] = 1,
    loop: Annotated[
        list[str] | None,
        typer.Option(
            help="Event loop(s): auto (the daemon's default: uvloop when installed), asyncio, uvloop "
            "(repeatable: runs alternate, A/B)."
        ),
    ] = None,
    affinity: Annotated[
        list[str] | None,
        typer.Option(
            help="[station] cpu_affinity: auto (the daemon's default: one CPU) or all (repeatable: A/B)."
        ),
    ] = None,
    out: OutOption = None,
) -> None:
    """Daemon CPU per device against the floor (same run), devices per second, RSS per port."""
    from factoryd.bench.overhead import DEFAULT_PORTS, run_overhead_bench, single_main  # noqa: PLC0415

    loops = tuple(_event_loop_name(name) for name in loop or ["auto"])
    affinities = tuple(affinity or ["auto"])
    for name in affinities:
        if name not in ("auto", "all"):
            fail(f"--affinity must be auto or all, not {name!r}")
    configure_logging("error", "console")
    if single:
        result = guard(
            lambda: single_main((ports or [8])[0], profile=profile, loop=loops[0], affinity=affinities[0])
        )
        typer.echo(json.dumps(result))
        return
    result = guard(
        lambda: run_overhead_bench(
            tuple(ports or DEFAULT_PORTS), profile=profile, repeat=repeat, loops=loops, affinities=affinities
        )
    )
    _write_json(result, out)


@app.command("ledger")
def bench_ledger(
    url: Annotated[str | None, typer.Option(help="Ledger URL (default: a temporary SQLite file).")] = None,
    pg_admin_url: Annotated[
        str | None,
        typer.Option(
            help="A PostgreSQL admin URL: run on a scratch database created there and dropped after."
        ),
    ] = None,
    n: Annotated[int, typer.Option(help="Claims to make.")] = 2000,
    threads: Annotated[int, typer.Option(help="Concurrent claimers in one process (one station).")] = 4,
    stations: Annotated[
        int, typer.Option(min=0, help="Concurrent stations, one process each (overrides --threads).")
    ] = 0,
    warm: Annotated[
        int, typer.Option(min=0, help="Claims made first, untimed, so the run meets a ledger in service.")
    ] = 0,
    out: OutOption = None,
) -> None:
    """Durable claims (reserve + mark provisioned) per second."""
    import contextlib  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from factoryd.ledger.bench import run_ledger_bench  # noqa: PLC0415
    from factoryd.ledger.testing import throwaway_postgres_database  # noqa: PLC0415

    if url and pg_admin_url:
        fail("give --url or --pg-admin-url, not both")
    with contextlib.ExitStack() as stack:
        if pg_admin_url:
            ledger_url = stack.enter_context(
                throwaway_postgres_database(pg_admin_url, prefix="factoryd_bench")
            )
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            ledger_url = url or f"sqlite:///{tmp}/bench.db"
        _write_json(
            guard(lambda: run_ledger_bench(ledger_url, n, threads, stations=stations, warm=warm)), out
        )


@app.command("pki")
def bench_pki(
    n: Annotated[int, typer.Option(help="Certificates to issue.")] = 500,
    out: OutOption = None,
) -> None:
    """CSR verification plus certificate issuing per second."""
    from factoryd.pki.bench import run_pki_bench  # noqa: PLC0415

    _write_json(guard(lambda: run_pki_bench(n)), out)


@app.command("attestation")
def bench_attestation(
    rounds: Annotated[int, typer.Option(min=1, help="Attestations to verify.")] = 200,
    out: OutOption = None,
) -> None:
    """What key attestation costs per board: station CPU and extra bytes on the wire."""
    from factoryd.bench.attestation import run_attestation_bench  # noqa: PLC0415

    _write_json(run_attestation_bench(rounds), out)


@app.command("tools")
def bench_tools(
    runs: Annotated[int, typer.Option(min=5, help="Tool runs each way.")] = 100,
    rss_mib: Annotated[int, typer.Option(min=1, help="Grow this process to a daemon's size first.")] = 150,
    loop: Annotated[str, typer.Option(help="auto (the daemon's: uvloop), asyncio or uvloop.")] = "auto",
    out: OutOption = None,
) -> None:
    """What one external tool run (uhubctl, a flasher) costs the daemon's process and its loop."""
    from factoryd.bench.tools import run_tools_bench  # noqa: PLC0415

    _write_json(guard(lambda: run_tools_bench(runs, rss_mib=rss_mib, loop=_event_loop_name(loop))), out)


@app.command("load")
def bench_load(
    ports: Annotated[int, typer.Option(min=1, max=256, help="Ports on the line.")] = 8,
    devices: Annotated[int, typer.Option(min=1, help="Boards to provision per run.")] = 120,
    timing: Annotated[str, typer.Option(help="realistic or zero.")] = "realistic",
    timing_scale: Annotated[float, typer.Option(min=0.0, help="Scale the realistic board timing.")] = 0.25,
    duration: Annotated[float, typer.Option(min=1.0, help="Upper bound of the load, seconds.")] = 120.0,
    max_requests: Annotated[int, typer.Option(min=1, help="Upper bound of the load, requests.")] = 500_000,
    out: OutOption = None,
) -> None:
    """Provisioning rate unloaded and under an HTTP flood (/metrics, page streams, customer API)."""
    import tempfile  # noqa: PLC0415

    from factoryd.bench.load import LoadPlan, run_load_bench  # noqa: PLC0415

    if timing not in ("zero", "realistic"):
        fail(f"--timing must be 'zero' or 'realistic', not {timing!r}")
    configure_logging("error", "console")
    plan = LoadPlan(duration_s=duration, max_requests=max_requests)
    mode: Literal["zero", "realistic"] = "zero" if timing == "zero" else "realistic"
    with tempfile.TemporaryDirectory() as tmp:
        result = run_async(
            run_load_bench(
                Path(tmp),
                ports=ports,
                devices=devices,
                timing=mode,
                timing_scale=timing_scale,
                plan=plan,
            )
        )
    _write_json(result, out)
