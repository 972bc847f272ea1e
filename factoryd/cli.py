"""The `factoryd` command line: run the station, the demo, lot administration, audits, benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
jobs_app = typer.Typer(no_args_is_help=True, help="Provisioning jobs in the ledger.")
ledger_app = typer.Typer(no_args_is_help=True, help="Device IDs in the ledger.")
app.add_typer(lots_app, name="lots")
app.add_typer(audit_app, name="audit")
app.add_typer(manifest_app, name="manifest")
app.add_typer(sim_app, name="sim")
app.add_typer(bench_app, name="bench")
app.add_typer(hubs_app, name="hubs")
app.add_typer(jobs_app, name="jobs")
app.add_typer(ledger_app, name="ledger")

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
    api_port: Annotated[
        int | None, typer.Option(help="Serve the HTTP API and the station page on 127.0.0.1:PORT.")
    ] = None,
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
        api_port=api_port,
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
            rows.append(
                {"lot": lot.name, "customer": lot.customer, "state": str(lot.state), **dataclasses.asdict(p)}
            )
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


@lots_app.command("key-to-token")
def lots_key_to_token(
    name: str,
    module: Annotated[str, typer.Option(help="PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.")],
    token: Annotated[str, typer.Option(help="Token label.")],
    key_label: Annotated[str, typer.Option(help="Label for the key in the token.")],
    keep_software_key: Annotated[bool, typer.Option(help="Keep the encrypted key file too.")] = False,
    config: ConfigOption = None,
) -> None:
    """Move a lot's CA key into a PKCS#11 token (PIN from credential factoryd-pkcs11-pin or env)."""
    from factoryd.pki.pkcs11 import import_key_to_token, load_pkcs11_pin  # noqa: PLC0415
    from factoryd.pki.store import BundleStore  # noqa: PLC0415
    from factoryd.service import StationPaths, station_passphrase  # noqa: PLC0415

    settings = _settings(config)

    def move() -> str:
        store = BundleStore(StationPaths(settings.station.state_dir).bundles, station_passphrase(settings))
        bundle = store.load(name)
        import_key_to_token(
            bundle,
            module,
            token,
            load_pkcs11_pin(),
            key_label,
            lot_dir=store.path(name),
            remove_software_key=not keep_software_key,
        )
        return str(store.path(name))

    where = _guard(move)
    with _ledger(config) as ledger:
        ledger.audit(
            actor="cli", action="lot.key_to_token", subject=name, details={"token": token, "key": key_label}
        )
    typer.echo(f"CA key of {name} is now in token {token!r} as {key_label!r} (reference in {where})")


@lots_app.command("progress")
def lots_progress(name: str, config: ConfigOption = None) -> None:
    """Counts of a lot's IDs by state."""
    with _ledger(config) as ledger:
        progress = _guard(lambda: ledger.progress(name))
    _echo_json(dataclasses.asdict(progress))


@ledger_app.command("void")
def ledger_void(
    device_id: Annotated[str, typer.Option("--id", help="The device ID an operator confirms lost.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger and the audit trail).")],
    config: ConfigOption = None,
) -> None:
    """Void a device ID for good (a board confirmed lost or destroyed); it is never reused."""
    with _ledger(config) as ledger:
        record = _guard(lambda: ledger.find_device(device_id))
        if record is None:
            _fail(f"no device ID {device_id!r} in any lot")
        _guard(lambda: ledger.void(record.lot, device_id, reason, actor="cli"))
    typer.echo(f"voided {device_id} in lot {record.lot}: {reason}")


@lots_app.command("show")
def lots_show(name: str, config: ConfigOption = None) -> None:
    """A lot's profile, state and counts per ID state."""
    with _ledger(config) as ledger:
        info = _guard(lambda: ledger.get_lot(name))
        progress = ledger.progress(name)
    _echo_json(
        {
            "lot": info.name,
            "customer": info.customer,
            "state": str(info.state),
            "target_quantity": info.target_quantity,
            "created_at": info.created_at.isoformat(),
            "profile": info.profile.model_dump(),
            "ids": dataclasses.asdict(progress),
        }
    )


@jobs_app.command("abandon")
def jobs_abandon(
    station: Annotated[str, typer.Option(help="The station whose open jobs to close (it is down for good).")],
    config: ConfigOption = None,
) -> None:
    """Close the jobs a dead station left open, so its boards may be provisioned elsewhere."""
    with _ledger(config) as ledger:
        count = _guard(lambda: ledger.abandon_open_jobs(station, reason="abandoned by an operator"))
        ledger.audit(actor="cli", action="jobs.abandoned", subject=station, details={"jobs": count})
    typer.echo(f"closed {count} open job(s) of station {station}")


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

    from factoryd.sim.board import FaultPlan, SimBoard, Timing  # noqa: PLC0415
    from factoryd.sim.hub import SimHub  # noqa: PLC0415
    from factoryd.sim.remote import SimHubServer  # noqa: PLC0415

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


@bench_app.command("line")
def bench_line(
    ports: Annotated[int, typer.Option(min=1, max=1024, help="Ports on the line.")] = 16,
    devices: Annotated[int, typer.Option(min=1, help="Boards to provision.")] = 256,
    timing: Annotated[str, typer.Option(help="realistic or zero.")] = "realistic",
    flash: Annotated[bool, typer.Option(help="Include the signed firmware update.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON only (the default output is JSON too).")
    ] = True,
    out: OutOption = None,
) -> None:
    """Line throughput against the physical limit and against one board at a time."""
    from factoryd.bench.line import run_line_bench  # noqa: PLC0415

    if timing not in ("zero", "realistic"):
        _fail(f"--timing must be 'zero' or 'realistic', not {timing!r}")
    configure_logging("error", "console")
    result = _run_async(run_line_bench(ports, devices, timing=timing, flash=flash))  # type: ignore[arg-type]
    _write_json(result, out)


@bench_app.command("overhead")
def bench_overhead(
    ports: Annotated[list[int] | None, typer.Option(help="Port counts (repeatable).")] = None,
    single: Annotated[bool, typer.Option(hidden=True, help="Run one port count in this process.")] = False,
    out: OutOption = None,
) -> None:
    """Daemon CPU per device, devices per second and RSS per port with zero-latency boards."""
    from factoryd.bench.overhead import DEFAULT_PORTS, run_overhead_bench, single_main  # noqa: PLC0415

    configure_logging("error", "console")
    if single:
        typer.echo(json.dumps(_guard(lambda: single_main((ports or [8])[0]))))
        return
    _write_json(_guard(lambda: run_overhead_bench(tuple(ports or DEFAULT_PORTS))), out)


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


# API tokens, ports and status (issue 7) ----------------------------------------------------------
# `tokens` works on the ledger database directly (it makes the first admin token); `ports` and
# `status` talk to the running daemon over its HTTP API on this machine, with an API token.

tokens_app = typer.Typer(no_args_is_help=True, help="API tokens: create (shown once), list, revoke.")
ports_app = typer.Typer(no_args_is_help=True, help="Hub ports of the running daemon (over its HTTP API).")
app.add_typer(tokens_app, name="tokens")
app.add_typer(ports_app, name="ports")

TokenFileOption = Annotated[
    Path | None,
    typer.Option("--token-file", help="File holding the API token (default: $FACTORYD_TOKEN)."),
]


def _token_store_call(config: Path | None, action: str | None, subject: str, call: Callable[[Any], T]) -> T:
    """Run ``call(store)`` on the ledger's token store; audit it as the CLI when ``action`` is set."""
    from factoryd.api.tokens import TokenStore  # noqa: PLC0415
    from factoryd.ledger import Ledger  # noqa: PLC0415

    settings = _settings(config)

    def body() -> T:
        # Opening the ledger migrates its schema (the api_tokens table) before the store uses it.
        with Ledger.open(settings.ledger_url) as ledger, TokenStore.open(settings.ledger_url) as store:
            result = call(store)
            if action is not None:
                ledger.audit(actor="cli", action=action, subject=subject, details={})
            return result

    return _guard(body)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="Token name (the actor in the audit trail); never reused.")],
    role: Annotated[str, typer.Option(help="customer, supervisor, operator or admin.")],
    customer: Annotated[str | None, typer.Option(help="The customer (customer tokens only).")] = None,
    expires_days: Annotated[int | None, typer.Option(min=1, help="Expire after this many days.")] = None,
    config: ConfigOption = None,
) -> None:
    """Create an API token and print it once (stdout: the token alone, for a file or a pipe)."""
    info, secret = _token_store_call(
        config,
        "token.created",
        name,
        lambda store: store.create(name, role, customer=customer, expires_days=expires_days),
    )
    typer.echo(secret)
    expiry = f", expires {info.expires_at.isoformat()}" if info.expires_at else ""
    typer.echo(f"created {info.role} token {info.name!r}{expiry}; it is not shown again", err=True)


@tokens_app.command("list")
def tokens_list(config: ConfigOption = None) -> None:
    """List tokens (names, roles, expiry, revocation, last use; never secrets)."""
    tokens = _token_store_call(config, None, "", lambda store: store.list_tokens())
    _echo_json([t.as_dict() for t in tokens])


@tokens_app.command("revoke")
def tokens_revoke(name: str, config: ConfigOption = None) -> None:
    """Revoke a token for good."""
    info = _token_store_call(config, "token.revoked", name, lambda store: store.revoke(name))
    typer.echo(f"token {info.name!r} revoked at {info.revoked_at.isoformat() if info.revoked_at else '?'}")


def _api(config: Path | None, token_file: Path | None) -> Any:
    from factoryd.api.client import ApiClient, read_token  # noqa: PLC0415

    settings = _settings(config)
    return ApiClient.for_settings(settings, _guard(lambda: read_token(token_file)))


def _port_line(port: dict[str, Any]) -> str:
    flags = "enabled" if port.get("enabled") else "DISABLED"
    if port.get("busy"):
        flags += ", busy"
    line = f"{port['port']:>6}  {port.get('state') or '-':<13} {flags}"
    if port.get("attention"):
        line += f"  ATTENTION: {port['attention']}"
    elif port.get("reason"):
        line += f"  ({port['reason']})"
    return line


@ports_app.command("list")
def ports_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    token_file: TokenFileOption = None,
    config: ConfigOption = None,
) -> None:
    """List the daemon's ports with their state."""
    client = _api(config, token_file)
    ports = _guard(lambda: client.get("/ports"))
    if as_json:
        _echo_json(ports)
        return
    for port in ports:
        typer.echo(_port_line(port))


def _port_action(port: str, action: str, config: Path | None, token_file: Path | None) -> None:
    from urllib.parse import quote  # noqa: PLC0415

    client = _api(config, token_file)
    result = _guard(lambda: client.post(f"/ports/{quote(port, safe='')}/{action}"))
    typer.echo(_port_line(result))


@ports_app.command("enable")
def ports_enable(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Let a port take boards again."""
    _port_action(port, "enable", config, token_file)


@ports_app.command("disable")
def ports_disable(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Stop a port after its current board."""
    _port_action(port, "disable", config, token_file)


@ports_app.command("retry")
def ports_retry(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Run a port again now, even with the same board in it (clears ATTENTION)."""
    _port_action(port, "retry", config, token_file)


@ports_app.command("ack")
def ports_ack(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Acknowledge a port's ATTENTION state."""
    _port_action(port, "ack", config, token_file)


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    token_file: TokenFileOption = None,
    config: ConfigOption = None,
) -> None:
    """The running station at a glance: ports, outcomes, throughput, lots."""
    client = _api(config, token_file)
    data = _guard(lambda: client.get("/status"))
    if as_json:
        _echo_json(data)
        return
    state = "running" if data["running"] else "not running"
    typer.echo(f"station {data['station']} on {data['line']} (factoryd {data['version']}): {state}")
    typer.echo(
        f"  ports     {data['ports_total']} total, {data['ports_enabled']} enabled, "
        f"{data['ports_busy']} busy, {data['ports_attention']} need attention"
    )
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(data["outcomes"].items())) or "none yet"
    typer.echo(f"  outcomes  {outcomes}")
    typer.echo(f"  rate      {data['units_per_hour']:.0f} boards/h (last 10 min)")
    for lot in data["lots"]:
        typer.echo(
            f"  lot {lot['lot']}: {lot['provisioned']} provisioned, {lot['available']} available, "
            f"{lot['reserved']} reserved, {lot['void']} void of {lot['total']}"
        )


def main() -> None:
    """Console entry point."""
    app()
