"""`factoryd hubs`: USB hubs on this machine."""

from __future__ import annotations

import typer

from factoryd.cli.opts import command_group, run_async

app = command_group("USB hubs on this machine.")


@app.command("detect")
def hubs_detect() -> None:
    """List switchable hubs, their ports and what is plugged in."""
    from factoryd.hub.detect import detect_hubs, format_report  # noqa: PLC0415 - keep `factoryd --help` fast

    report = run_async(detect_hubs())
    typer.echo(format_report(report))
