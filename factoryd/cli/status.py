"""`factoryd status`: the running station at a glance, over its HTTP API on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from factoryd.cli.opts import ConfigOption, TokenFileOption, api_client, echo_json, guard


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    token_file: TokenFileOption = None,
    config: ConfigOption = None,
) -> None:
    """The running station at a glance: ports, outcomes, throughput, lots."""
    client = api_client(config, token_file)
    data = guard(lambda: client.get("/status"))
    if as_json:
        echo_json(data)
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
