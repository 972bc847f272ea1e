"""`factoryd jobs`: provisioning jobs in the ledger."""

from __future__ import annotations

from typing import Annotated

import typer

from factoryd.cli.opts import ConfigOption, command_group, guard, open_ledger

app = command_group("Provisioning jobs in the ledger.")


@app.command("abandon")
def jobs_abandon(
    station: Annotated[str, typer.Option(help="The station whose open jobs to close (it is down for good).")],
    config: ConfigOption = None,
) -> None:
    """Close the jobs a dead station left open, so its boards may be provisioned elsewhere."""
    with open_ledger(config) as ledger:
        count = guard(lambda: ledger.abandon_open_jobs(station, reason="abandoned by an operator"))
        ledger.audit(actor="cli", action="jobs.abandoned", subject=station, details={"jobs": count})
    typer.echo(f"closed {count} open job(s) of station {station}")
