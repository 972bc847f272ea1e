"""`factoryd manifest`: signed manifests of provisioned devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from factoryd.cli.opts import ConfigOption, command_group, guard, open_ledger, state_dir_settings

app = command_group("Signed manifests of provisioned devices.")


@app.command("export")
def manifest_export(
    lot: str,
    out: Annotated[Path | None, typer.Option(help="Directory for the manifest and signature.")] = None,
    config: ConfigOption = None,
) -> None:
    """Write the signed manifest (JSON + detached CMS signature) of a lot."""
    from factoryd.service import StationPaths, export_manifest, station_passphrase, write_manifest  # noqa: PLC0415

    settings = state_dir_settings(config)
    paths = StationPaths(settings.station.state_dir)
    with open_ledger(config) as ledger:
        manifest = guard(lambda: export_manifest(ledger, paths, station_passphrase(settings), lot))
    json_path, sig_path = write_manifest(manifest, out or paths.manifests)
    typer.echo(f"manifest of {manifest.count} devices: {json_path}\nsignature: {sig_path}")
