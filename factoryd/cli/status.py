"""`factoryd status`: the running station at a glance, over its HTTP API on this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from factoryd.cli.opts import ConfigOption, TokenFileOption, api_client, echo_json, guard

if TYPE_CHECKING:
    from factoryd.telemetry.figures import Rate


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
    # The figures as the demo, the page and /metrics define them (factoryd.telemetry.figures).
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(data["outcomes"].items())) or "none yet"
    typer.echo(f"  jobs      {outcomes} (this station since it started)")
    typer.echo(f"  rate      {_rate(data).describe()}")
    for lot in data["lots"]:
        typer.echo(
            f"  lot {lot['lot']}: {lot['provisioned']} provisioned, {lot['available']} available, "
            f"{lot['reserved']} reserved, {lot['void']} void of {lot['total']} IDs (ledger, all stations)"
        )


def _rate(data: dict[str, Any]) -> Rate:
    """The API's rate with the window it was measured over."""
    from factoryd.telemetry.figures import Rate  # noqa: PLC0415 - keep `factoryd --help` fast

    return Rate(per_hour=float(data["units_per_hour"]), window_s=float(data["rate_window_s"]))
