"""`factoryd demo`: a simulated line provisioned end to end (no hardware, no broker, SQLite)."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import structlog
import typer

from factoryd.cli.opts import fail, run_async
from factoryd.log import configure_logging

if TYPE_CHECKING:
    from factoryd.daemon import Daemon
    from factoryd.demo import DemoResult, DemoStarted


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _echo_started(info: DemoStarted) -> None:
    """Where the running demo is: on stderr, so stdout keeps the summary (or the JSON) alone."""
    lines = [f"factoryd demo: state directory {info.state_dir}" + (" (temporary)" if info.temporary else "")]
    if info.page_url is not None:
        lines.append(f"  station page   {info.page_url}  (log in with operator token {info.operator_token})")
    if info.supervisor_token_file is not None:
        lines.append(
            f"  status         factoryd status -c {_q(info.config_path)} "
            f"--token-file {_q(info.supervisor_token_file)}"
        )
    if info.metrics_url is not None:
        lines.append(f"  metrics        {info.metrics_url}")
    if info.passphrase_file is not None:
        lines.append(f"  CA passphrase  {info.passphrase_file} (0600)")
    typer.echo("\n".join(lines), err=True)


def _keeps_serving(asked: bool | None, api_port: int | None, metrics_port: int | None) -> bool:
    if asked is not None:
        return asked
    # Without a person at a terminal nobody would press Ctrl-C: scripts get the demo's end as before.
    return api_port is not None and sys.stdin.isatty() and sys.stderr.isatty()


async def _serve_until_stopped(daemon: Daemon) -> None:
    """After the last board: keep the page, API and /metrics up until a signal (Ctrl-C, SIGTERM, hangup)."""
    where = f" at http://127.0.0.1:{daemon.api_port}/station" if daemon.api_port is not None else ""
    typer.echo(f"all boards done; the station page keeps serving{where}: Ctrl-C ends the demo", err=True)
    await daemon.signalled.wait()


def next_steps(result: DemoResult) -> list[str]:
    """The three commands most worth trying after a demo, with its real paths."""
    if not result.state_dir_kept:
        return [
            "factoryd demo --state-dir ./demo-line      # keep the ledger, bundles and manifest",
            "factoryd demo --api-port 8080 --state-dir ./demo-line   # watch the station page",
            "factoryd demo --devices 100 --ports 16 --faults 0.1 --seed 1   # faults, reproducibly",
        ]
    config = _q(result.config_path)
    env = ""
    passphrase_file = result.state_dir / "ca-passphrase"
    if passphrase_file.exists():
        env = f'FACTORYD_CA_PASSPHRASE="$(cat {_q(passphrase_file)})" '
    return [
        f"factoryd lots show {result.lot} -c {config}",
        f"{env}factoryd manifest export {result.lot} -c {config}",
        f"factoryd audit verify -c {config}",
    ]


def _echo_summary(result: DemoResult, boards: int, ports: int, profile: str, timing: str) -> None:
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items())) or "none"
    typer.echo(f"factoryd demo: {boards} boards on {ports} simulated ports ({profile}, timing {timing})")
    if not result.complete:
        typer.echo(f"  stopped early       by {result.stopped_by}, {result.devices} boards done")
    typer.echo(f"  jobs                {outcomes}")
    if result.failures:
        typer.echo(
            "  failure reasons     " + ", ".join(f"{k} {v}" for k, v in sorted(result.failures.items()))
        )
    not_genuine = sum(n for reason, n in result.failures.items() if reason.startswith("attestation_"))
    if not_genuine:
        typer.echo(f"  not genuine         {not_genuine} boards refused before an ID was reserved")
    typer.echo(
        f"  faults injected     {result.faults_injected}: {result.faults_recovered} recovered by retries, "
        f"{result.boards_failed} boards failed"
    )
    in_lot = (
        f"lot {result.lot}: {result.lot_provisioned} with earlier runs; "
        if result.lot_provisioned != result.provisioned
        else ""
    )
    typer.echo(
        f"  provisioned         {result.provisioned} "
        f"({in_lot}certificates checked: {result.certificates_verified})"
    )
    typer.echo(f"  duplicate IDs       {result.duplicate_ids}")
    if result.labels_printed or result.labels_failed:
        failed = f", {result.labels_failed} could not be made (see the log)" if result.labels_failed else ""
        typer.echo(f"  labels              {result.labels_printed} printed on the simulated printers{failed}")
    typer.echo(f"  audit chain         verified, {result.audit_entries} entries")
    if result.state_dir_kept:
        typer.echo(f"  manifest            {result.manifest_path} ({result.manifest_count} devices)")
        typer.echo(f"  signature           {result.signature_path}")
    typer.echo(f"  elapsed             {result.elapsed_s:.2f} s")
    typer.echo(f"  rate                {result.rate.describe()}")
    if result.state_dir_kept:
        typer.echo(f"  state directory     {result.state_dir} (config {result.config_path})")
    else:
        typer.echo("  state directory     removed (a temporary one; --state-dir DIR keeps it)")
    typer.echo("")
    typer.echo("Try next:")
    for command in next_steps(result):
        typer.echo(f"  {command}")


def demo(
    ports: Annotated[int, typer.Option(min=1, max=512, help="Simulated hub ports.")] = 8,
    boards: Annotated[
        int, typer.Option("--boards", "--devices", min=1, help="Boards the simulated operator feeds in.")
    ] = 24,
    fault_rate: Annotated[
        float,
        typer.Option("--fault-rate", "--faults", min=0.0, max=1.0, help="Chance per fault kind per board."),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Fault seed: same seed, same boards, faults and outcomes.")] = 1,
    timing: Annotated[str, typer.Option(help="zero or realistic.")] = "zero",
    timing_scale: Annotated[float, typer.Option(min=0.0, help="Multiply every simulated delay.")] = 1.0,
    profile: Annotated[
        str, typer.Option(help="factoryd-v1, arduino-v1, mcumgr, nrf91-at or matter.")
    ] = "factoryd-v1",
    state_dir: Annotated[
        Path | None, typer.Option(help="Keep ledger, bundles, manifest and a config here (default: temp).")
    ] = None,
    lot: Annotated[str, typer.Option(help="Lot name (a new one to run again in the same state dir).")] = (
        "demo-lot"
    ),
    resume: Annotated[
        bool, typer.Option("--resume", help="Feed more boards into the lot if the state dir has it.")
    ] = False,
    ledger_url: Annotated[str | None, typer.Option(help="Ledger URL (default SQLite in state dir).")] = None,
    no_lock: Annotated[bool, typer.Option("--no-lock", help="Do not lock secure elements.")] = False,
    no_flash: Annotated[bool, typer.Option("--no-flash", help="Skip the signed firmware update.")] = False,
    attestation: Annotated[
        bool, typer.Option("--attestation", help="Genuine parts only: boards attest keys (factoryd-v1).")
    ] = False,
    impostor_rate: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="With --attestation: share of impostor boards (default 0.1)."),
    ] = 0.1,
    labels: Annotated[
        bool,
        typer.Option("--labels", help="Print a label per board on simulated printers (always for matter)."),
    ] = False,
    metrics: Annotated[bool, typer.Option(help="Serve /metrics on 127.0.0.1:9464.")] = False,
    metrics_port: Annotated[int | None, typer.Option(help="Serve /metrics on 127.0.0.1:PORT.")] = None,
    api_port: Annotated[
        int | None, typer.Option(help="Serve the HTTP API and the station page on 127.0.0.1:PORT.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
    keep_serving: Annotated[
        bool | None,
        typer.Option(
            "--keep-serving/--no-keep-serving",
            help="Keep the page and API up after the last board until Ctrl-C "
            "(default: with --api-port on a terminal).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Provision a simulated line end to end (no hardware, no broker, SQLite)."""
    from factoryd.demo import DEMO_PROFILES, DemoOptions, run_demo  # noqa: PLC0415 - keep --help fast

    if timing not in ("zero", "realistic"):
        fail(f"--timing must be 'zero' or 'realistic', not {timing!r}")
    if profile not in DEMO_PROFILES:
        fail(f"--profile must be one of {', '.join(DEMO_PROFILES)}, not {profile!r}")
    configure_logging(log_level, "console")
    # Warnings and logs go to stderr: stdout carries the summary or the JSON alone. The logger is
    # made per call, so a replaced stderr (CLI runners) is never written to after it was closed.
    structlog.configure(logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr))
    options = DemoOptions(
        ports=ports,
        boards=boards,
        fault_rate=fault_rate,
        seed=seed,
        timing=timing,  # type: ignore[arg-type]
        timing_scale=timing_scale,
        profile=profile,
        lock=not no_lock,
        flash=not no_flash,
        attestation=attestation,
        impostor_rate=impostor_rate if attestation else 0.0,
        labels=labels,
        state_dir=state_dir,
        ledger_url=ledger_url,
        lot=lot,
        resume=resume,
        metrics=metrics,
        metrics_port=metrics_port,
        api_port=api_port,
        log_level=log_level,
        live_view=not as_json and sys.stdout.isatty(),
        on_started=_echo_started,
        on_finished=_serve_until_stopped if _keeps_serving(keep_serving, api_port, metrics_port) else None,
    )
    result = run_async(run_demo(options))
    if result.stopped_by == signal.SIGHUP.name:
        # The terminal is gone: nobody to print the summary to. Exit as a shell would on SIGHUP.
        raise typer.Exit(128 + signal.SIGHUP)
    if as_json:
        # One JSON object on the last line of stdout, for scripts.
        typer.echo(json.dumps(result.as_dict(), sort_keys=True))
        return
    _echo_summary(result, boards, ports, profile, timing)
