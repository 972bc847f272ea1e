"""The root `factoryd` command: version, run, and the command groups of this package."""

from __future__ import annotations

import typer

from factoryd import __version__
from factoryd.cli import (
    audit,
    bench,
    cloud,
    demo,
    hubs,
    jobs,
    labels,
    ledger,
    lots,
    manifest,
    ports,
    signer,
    sim,
    status,
    tokens,
)
from factoryd.cli.opts import (
    ConfigOption,
    command_group,
    fail,
    get_settings,
    guard,
    run_event_loop,
)
from factoryd.errors import SchemaVersionError
from factoryd.limits import apply_cpu_affinity, yield_helper_threads
from factoryd.log import configure_logging

app = command_group("Factory bulk-provisioning line daemon.", add_completion=False)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# EX_CONFIG (sysexits.h): the ledger was written by a newer factoryd.
SCHEMA_TOO_NEW_EXIT = 78


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the station daemon (what systemd starts)."""
    from factoryd.daemon import Daemon  # noqa: PLC0415 - keep `factoryd --help` fast

    settings = get_settings(config)
    configure_logging(settings.log.level, settings.log.format)

    def start() -> None:
        # Before the loop and the ledger's worker thread exist: they inherit the CPUs; sharing the
        # loop's, its helper threads yield to it.
        yield_helper_threads(apply_cpu_affinity(settings.station.cpu_affinity) is not None)
        try:
            run_event_loop(lambda: Daemon(settings).run(), settings.station.event_loop)
        except SchemaVersionError as exc:
            # Restarting cannot help; systemd/factoryd.service lists this code in RestartPreventExitStatus.
            fail(str(exc), code=SCHEMA_TOO_NEW_EXIT)

    guard(start)


app.command("demo")(demo.demo)
app.command("status")(status.status)
app.add_typer(lots.app, name="lots")
app.add_typer(audit.app, name="audit")
app.add_typer(manifest.app, name="manifest")
app.add_typer(sim.app, name="sim")
app.add_typer(bench.app, name="bench")
app.add_typer(hubs.app, name="hubs")
app.add_typer(jobs.app, name="jobs")
app.add_typer(ledger.app, name="ledger")
app.add_typer(tokens.app, name="tokens")
app.add_typer(ports.app, name="ports")
app.add_typer(cloud.app, name="cloud")
app.add_typer(labels.app, name="labels")
app.add_typer(signer.app, name="signer")


def main() -> None:
    """Console entry point."""
    app()
