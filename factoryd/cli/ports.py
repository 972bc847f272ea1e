"""`factoryd ports`: hub ports of the running daemon, over its HTTP API on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from factoryd.cli.opts import ConfigOption, TokenFileOption, api_client, command_group, echo_json, guard

app = command_group("Hub ports of the running daemon (over its HTTP API).")


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


@app.command("list")
def ports_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    token_file: TokenFileOption = None,
    config: ConfigOption = None,
) -> None:
    """List the daemon's ports with their state."""
    client = api_client(config, token_file)
    ports = guard(lambda: client.get("/ports"))
    if as_json:
        echo_json(ports)
        return
    for port in ports:
        typer.echo(_port_line(port))


def _port_action(port: str, action: str, config: Path | None, token_file: Path | None) -> None:
    from urllib.parse import quote  # noqa: PLC0415 - keep `factoryd --help` fast

    client = api_client(config, token_file)
    result = guard(lambda: client.post(f"/ports/{quote(port, safe='')}/{action}"))
    typer.echo(_port_line(result))


@app.command("enable")
def ports_enable(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Let a port take boards again."""
    _port_action(port, "enable", config, token_file)


@app.command("disable")
def ports_disable(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Stop a port after its current board."""
    _port_action(port, "disable", config, token_file)


@app.command("retry")
def ports_retry(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Run a port again now, even with the same board in it (clears ATTENTION)."""
    _port_action(port, "retry", config, token_file)


@app.command("ack")
def ports_ack(port: str, token_file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Acknowledge a port's ATTENTION state."""
    _port_action(port, "ack", config, token_file)
