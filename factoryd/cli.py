"""The `factoryd` command line: run the station, the demo, lot administration, audits, benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from factoryd import __version__
from factoryd.config import Settings, load_settings
from factoryd.errors import FactorydError
from factoryd.log import configure_logging

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Factory bulk-provisioning line daemon.")
lots_app = typer.Typer(no_args_is_help=True, help="Customer lots: create, import IDs and bundles, activate.")
audit_app = typer.Typer(no_args_is_help=True, help="The ledger's audit trail.")
manifest_app = typer.Typer(no_args_is_help=True, help="Signed manifests of provisioned devices.")
sim_app = typer.Typer(no_args_is_help=True, help="The board simulator.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (results as JSON).")
hubs_app = typer.Typer(no_args_is_help=True, help="USB hubs on this machine.")
app.add_typer(lots_app, name="lots")
app.add_typer(audit_app, name="audit")
app.add_typer(manifest_app, name="manifest")
app.add_typer(sim_app, name="sim")
app.add_typer(bench_app, name="bench")
app.add_typer(hubs_app, name="hubs")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file.", envvar="FACTORYD_CONFIG", exists=False),
]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except FactorydError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body; FactorydError becomes a one-line error and exit code 2."""
    try:
        return fn()
    except FactorydError as exc:
        _fail(str(exc))
        raise


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    return _guard(lambda: asyncio.run(coro))


def _read(path: Path) -> bytes:
    """Read an input file; a missing or unreadable file is a one-line error."""
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
        raise


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the station daemon (what systemd starts)."""
    from factoryd.daemon import Daemon  # noqa: PLC0415 - keep `factoryd --help` fast

    settings = _settings(config)
    configure_logging(settings.log.level, settings.log.format)
    _run_async(Daemon(settings).run())


@app.command()
def demo(
    ports: Annotated[int, typer.Option(min=1, max=512, help="Simulated hub ports.")] = 8,
    boards: Annotated[
        int, typer.Option("--boards", "--devices", min=1, help="Boards the simulated operator feeds in.")
    ] = 24,
    fault_rate: Annotated[
        float,
        typer.Option("--fault-rate", "--faults", min=0.0, max=1.0, help="Chance per fault kind per board."),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Fault seed (runs are reproducible).")] = 1,
    timing: Annotated[str, typer.Option(help="zero or realistic.")] = "zero",
    timing_scale: Annotated[float, typer.Option(min=0.0, help="Multiply every simulated delay.")] = 1.0,
    profile: Annotated[str, typer.Option(help="factoryd-v1 or arduino-v1.")] = "factoryd-v1",
    state_dir: Annotated[Path | None, typer.Option(help="Keep ledger, bundles, manifest here.")] = None,
    ledger_url: Annotated[str | None, typer.Option(help="Ledger URL (default SQLite in state dir).")] = None,
    no_lock: Annotated[bool, typer.Option("--no-lock", help="Do not lock secure elements.")] = False,
    no_flash: Annotated[bool, typer.Option("--no-flash", help="Skip the signed firmware update.")] = False,
    metrics: Annotated[bool, typer.Option(help="Serve /metrics on 127.0.0.1:9464.")] = False,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Provision a simulated line end to end (no hardware, no broker, SQLite)."""
    from factoryd.demo import DemoOptions, run_demo  # noqa: PLC0415

    if timing not in ("zero", "realistic"):
        _fail(f"--timing must be 'zero' or 'realistic', not {timing!r}")
    if profile not in ("factoryd-v1", "arduino-v1"):
        _fail(f"--profile must be 'factoryd-v1' or 'arduino-v1', not {profile!r}")
    configure_logging(log_level, "console")
    options = DemoOptions(
        ports=ports,
        boards=boards,
        fault_rate=fault_rate,
        seed=seed,
        timing=timing,  # type: ignore[arg-type]
        timing_scale=timing_scale,
        profile=profile,  # type: ignore[arg-type]
        lock=not no_lock,
        flash=not no_flash,
        state_dir=state_dir,
        ledger_url=ledger_url,
        metrics=metrics,
        log_level=log_level,
        live_view=not as_json and sys.stdout.isatty(),
    )
    result = _run_async(run_demo(options))
    if as_json:
        # One JSON object on the last line of stdout, for scripts.
        typer.echo(json.dumps(result.as_dict(), sort_keys=True))
        return
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items())) or "none"
    typer.echo(f"factoryd demo: {boards} boards on {ports} simulated ports ({profile}, timing {timing})")
    typer.echo(f"  outcomes            {outcomes}")
    if result.failures:
        typer.echo(
            "  failure reasons     " + ", ".join(f"{k} {v}" for k, v in sorted(result.failures.items()))
        )
    typer.echo(
        f"  provisioned         {result.provisioned} (certificates checked: {result.certificates_verified})"
    )
    typer.echo(f"  duplicate IDs       {result.duplicate_ids}")
    typer.echo(f"  audit chain         verified, {result.audit_entries} entries")
    typer.echo(f"  manifest            {result.manifest_path} ({result.manifest_count} devices)")
    typer.echo(f"  signature           {result.signature_path}")
    typer.echo(f"  elapsed             {result.elapsed_s:.2f} s ({result.devices_per_hour:,.0f} devices/h)")
    typer.echo(f"  state directory     {result.state_dir}")


# Lots -------------------------------------------------------------------------------------------


def _ledger(config: Path | None) -> Any:
    from factoryd.ledger import Ledger  # noqa: PLC0415

    settings = _settings(config)
    return _guard(lambda: Ledger.open(settings.ledger_url))


@lots_app.command("list")
def lots_list(config: ConfigOption = None) -> None:
    """List lots with their state and counts."""
    with _ledger(config) as ledger:
        rows = []
        for lot in ledger.list_lots():
            p = ledger.progress(lot.name)
            rows.append({"lot": lot.name, "customer": lot.customer, "state": str(lot.state), **p.__dict__})
    _echo_json(rows)


@lots_app.command("create")
def lots_create(
    name: str,
    customer: Annotated[str, typer.Option(help="Customer the lot belongs to.")],
    profile_file: Annotated[Path | None, typer.Option(help="Lot profile as JSON.")] = None,
    target: Annotated[int | None, typer.Option(help="Target quantity.")] = None,
    config: ConfigOption = None,
) -> None:
    """Create a lot (state draft)."""
    from pydantic import ValidationError  # noqa: PLC0415

    from factoryd.ledger import LotProfile  # noqa: PLC0415

    try:
        profile = LotProfile.model_validate_json(profile_file.read_bytes()) if profile_file else LotProfile()
    except (OSError, ValidationError) as exc:
        _fail(f"lot profile {profile_file}: {exc}")
        raise
    with _ledger(config) as ledger:
        info = _guard(
            lambda: ledger.create_lot(
                name, customer=customer, profile=profile, target_quantity=target, actor="cli"
            )
        )
    typer.echo(f"created lot {info.name} ({info.state})")


@lots_app.command("import")
def lots_import(name: str, id_file: Path, config: ConfigOption = None) -> None:
    """Import a customer ID list (CSV, JSON or text); refused whole on any problem."""
    data = _read(id_file)
    with _ledger(config) as ledger:
        count = _guard(lambda: ledger.import_ids(name, data, filename=id_file.name, actor="cli"))
    typer.echo(f"imported {count} IDs into {name}")


@lots_app.command("bundle")
def lots_bundle(
    name: str,
    bundle_file: Annotated[Path, typer.Argument(help="PKCS#12 file, or PEM chain (with --key).")],
    key: Annotated[Path | None, typer.Option(help="Encrypted PKCS#8 key (PEM bundles).")] = None,
    anchors: Annotated[Path | None, typer.Option(help="Trust anchors to install on devices (PEM).")] = None,
    passphrase_env: Annotated[str, typer.Option(help="Env variable holding the bundle's passphrase.")] = (
        "FACTORYD_BUNDLE_PASSPHRASE"  # noqa: S107 - the name of a variable, not a passphrase
    ),
    config: ConfigOption = None,
) -> None:
    """Validate a customer CA bundle and store it encrypted for the lot."""
    from factoryd.service import StationPaths, parse_bundle, station_passphrase, store_bundle  # noqa: PLC0415

    settings = _settings(config)
    upload_pass = os.environ.get(passphrase_env)
    if upload_pass is None:
        upload_pass = typer.prompt("bundle passphrase", hide_input=True)
    data = _read(bundle_file)
    key_pem = _read(key) if key else None
    anchors_pem = _read(anchors) if anchors else None
    with _ledger(config) as ledger:
        lot = _guard(lambda: ledger.get_lot(name))

        def store() -> Path:
            bundle = parse_bundle(data, upload_pass.encode(), lot, key_pem=key_pem, trust_anchors=anchors_pem)
            path = store_bundle(
                StationPaths(settings.station.state_dir), station_passphrase(settings), name, bundle
            )
            ledger.audit(actor="cli", action="lot.bundle_stored", subject=name, details={"path": str(path)})
            return path

        path = _guard(store)
    typer.echo(f"stored CA bundle for {name} in {path}")


def _set_state(name: str, state: str, config: Path | None) -> None:
    from factoryd.ledger import LotState  # noqa: PLC0415

    with _ledger(config) as ledger:
        info = _guard(lambda: ledger.set_lot_state(name, LotState(state), actor="cli"))
    typer.echo(f"lot {info.name} is {info.state}")


@lots_app.command("activate")
def lots_activate(name: str, config: ConfigOption = None) -> None:
    """Start (or resume) provisioning a lot."""
    _set_state(name, "active", config)


@lots_app.command("pause")
def lots_pause(name: str, config: ConfigOption = None) -> None:
    """Pause a lot: ports finish their current board and wait."""
    _set_state(name, "paused", config)


@lots_app.command("close")
def lots_close(name: str, config: ConfigOption = None) -> None:
    """Close a lot for good."""
    _set_state(name, "closed", config)


@lots_app.command("progress")
def lots_progress(name: str, config: ConfigOption = None) -> None:
    """Counts of a lot's IDs by state."""
    with _ledger(config) as ledger:
        progress = _guard(lambda: ledger.progress(name))
    _echo_json(progress.__dict__)


@audit_app.command("verify")
def audit_verify(
    config: ConfigOption = None,
    url: Annotated[str | None, typer.Option(help="Ledger URL (instead of the config's).")] = None,
) -> None:
    """Recompute the audit hash chain; exit 1 naming the first bad entry if it was tampered with."""
    from factoryd.errors import AuditChainError  # noqa: PLC0415
    from factoryd.ledger import verify_audit  # noqa: PLC0415

    ledger_url = url or _settings(config).ledger_url
    try:
        count = verify_audit(ledger_url)
    except AuditChainError as exc:
        _fail(str(exc), code=1)
        raise
    except FactorydError as exc:
        _fail(str(exc))
        raise
    typer.echo(f"audit chain verified: {count} entries")


@manifest_app.command("export")
def manifest_export(
    lot: str,
    out: Annotated[Path | None, typer.Option(help="Directory for the manifest and signature.")] = None,
    config: ConfigOption = None,
) -> None:
    """Write the signed manifest (JSON + detached CMS signature) of a lot."""
    from factoryd.service import StationPaths, export_manifest, station_passphrase, write_manifest  # noqa: PLC0415

    settings = _settings(config)
    paths = StationPaths(settings.station.state_dir)
    with _ledger(config) as ledger:
        manifest = _guard(lambda: export_manifest(ledger, paths, station_passphrase(settings), lot))
    json_path, sig_path = write_manifest(manifest, out or paths.manifests)
    typer.echo(f"manifest of {manifest.count} devices: {json_path}\nsignature: {sig_path}")


# Simulator ----------------------------------------------------------------------------------------


@sim_app.command("board")
def sim_board(
    fault_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Per-opportunity fault chance.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Fault seed.")] = 0,
    timing: Annotated[str, typer.Option(help="zero or realistic.")] = "zero",
) -> None:
    """Run one simulated board behind a PTY and print its tty path (Ctrl-C to stop)."""
    from factoryd.sim.board import FaultPlan, SimBoard, Timing  # noqa: PLC0415
    from factoryd.sim.pty import serve_pty  # noqa: PLC0415

    async def serve() -> None:
        board = SimBoard(
            faults=FaultPlan.uniform(fault_rate, seed=seed),
            timing=Timing.realistic() if timing == "realistic" else Timing(),
        )
        async with serve_pty(board) as pty:
            typer.echo(pty.path)
            typer.echo(f"secure-element serial {board.serial_hex}; Ctrl-C to stop", err=True)
            sys.stdout.flush()
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


@sim_app.command("hub")
def sim_hub(
    socket: Annotated[
        Path, typer.Option(help="Control socket path for the daemon (hub.sim.control_socket).")
    ],
    ports: Annotated[int, typer.Option(min=1, max=1024, help="Ports.")] = 8,
    boards: Annotated[
        int | None, typer.Option(help="Boards the simulated operator feeds in (default endless).")
    ] = None,
    fault_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance per fault kind per board.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Fault seed.")] = 1,
    timing: Annotated[str, typer.Option(help="zero or realistic.")] = "zero",
    timing_scale: Annotated[float, typer.Option(min=0.0, help="Multiply every simulated delay.")] = 1.0,
    firmware_key: Annotated[Path | None, typer.Option(help="PEM public key the bootloaders trust.")] = None,
) -> None:
    """Run a simulated hub with boards in this process, controlled over a Unix socket."""
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: PLC0415

    from factoryd.hub.remote import SimHubServer  # noqa: PLC0415
    from factoryd.hub.sim import SimHub  # noqa: PLC0415
    from factoryd.sim.board import FaultPlan, SimBoard, Timing  # noqa: PLC0415

    key = load_pem_public_key(_read(firmware_key)) if firmware_key else None
    if key is not None and not isinstance(key, ec.EllipticCurvePublicKey):
        _fail(f"{firmware_key}: the firmware-signing key must be an EC key")
    base = (Timing.realistic() if timing == "realistic" else Timing()).scaled(timing_scale)
    counter = iter(range(1, 1 << 62))

    def make_board() -> SimBoard:
        plan = FaultPlan.uniform(fault_rate, seed=seed * 1_000_003 + next(counter), per_power_on=True)
        return SimBoard(faults=plan, timing=base, firmware_key=key)  # type: ignore[arg-type]

    async def serve() -> None:
        async with SimHub(ports, make_board, supply=boards) as hub:
            ready = asyncio.Event()
            server = SimHubServer(hub, socket)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(server.serve(ready))
                await ready.wait()
                typer.echo(f"sim hub with {ports} ports listening on {socket}")
                sys.stdout.flush()

    configure_logging("warning", "console")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# Benchmarks -----------------------------------------------------------------------------------------


def _write_json(result: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark result and write it to a file."""
    text = json.dumps(result, indent=2, sort_keys=True)
    if out is not None:
        out.write_text(text + "\n")
    typer.echo(text)


OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON result here too.")]


@bench_app.command("link")
def bench_link(
    seconds: Annotated[float, typer.Option(help="Duration per measurement.")] = 3.0,
    out: OutOption = None,
) -> None:
    """Round trips per second to a simulated board over a real PTY."""
    from factoryd.bench.link import run_link_bench  # noqa: PLC0415

    _write_json(_run_async(run_link_bench(seconds)), out)


@bench_app.command("ledger")
def bench_ledger(
    url: Annotated[str | None, typer.Option(help="Ledger URL (default: a temporary SQLite file).")] = None,
    n: Annotated[int, typer.Option(help="Claims to make.")] = 2000,
    threads: Annotated[int, typer.Option(help="Concurrent claimers.")] = 4,
    out: OutOption = None,
) -> None:
    """Durable claims (reserve + mark provisioned) per second."""
    import tempfile  # noqa: PLC0415

    from factoryd.ledger.bench import run_ledger_bench  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        ledger_url = url or f"sqlite:///{tmp}/bench.db"
        _write_json(_guard(lambda: run_ledger_bench(ledger_url, n, threads)), out)


@bench_app.command("pki")
def bench_pki(
    n: Annotated[int, typer.Option(help="Certificates to issue.")] = 500,
    out: OutOption = None,
) -> None:
    """CSR verification plus certificate issuing per second."""
    from factoryd.pki.bench import run_pki_bench  # noqa: PLC0415

    _write_json(_guard(lambda: run_pki_bench(n)), out)


@hubs_app.command("detect")
def hubs_detect() -> None:
    """List switchable hubs, their ports and what is plugged in."""
    from factoryd.hub.detect import detect_hubs, format_report  # noqa: PLC0415

    report = _run_async(detect_hubs())
    typer.echo(format_report(report))


def main() -> None:
    """Console entry point."""
    app()
