"""`factoryd manifest`: signed manifests of provisioned devices."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from factoryd.cli.opts import (
    ConfigOption,
    command_group,
    fail,
    guard,
    open_ledger,
    read_input,
    state_dir_settings,
    write_public,
)

if TYPE_CHECKING:
    from factoryd.ledger import Ledger
    from factoryd.service import StationPaths

app = command_group("Signed manifests of provisioned devices, the lot's CRL, customer-side checks.")


@app.command("export")
def manifest_export(
    lot: str,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="json (the signed manifest), csv, aws-bulk (AWS bulk registration JSON lines), "
            "nrfcloud (onboarding CSVs) or azure-dps (an enrollment group); see docs/clouds.md.",
        ),
    ] = "json",
    out: Annotated[
        Path | None, typer.Option(help="Directory to write into (default: the manifests dir).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write a lot's provisioned devices: the signed manifest (JSON + CMS signature) or a cloud's format."""
    from factoryd.cloud.formats import ExportFormat  # noqa: PLC0415
    from factoryd.service import StationPaths, export_manifest, station_passphrase, write_manifest  # noqa: PLC0415

    try:
        export_format = ExportFormat(fmt)
    except ValueError:
        fail(f"unknown export format {fmt!r} (use {', '.join(ExportFormat)})")
    settings = state_dir_settings(config)
    paths = StationPaths(settings.station.state_dir)
    if export_format is not ExportFormat.JSON:
        from factoryd.cloud.exports import build_export, lot_ca_chain, write_export  # noqa: PLC0415

        with open_ledger(config) as ledger:
            devices = guard(lambda: ledger.provisioned_devices(lot))
        azure = export_format is ExportFormat.AZURE_DPS
        chain = guard(lambda: lot_ca_chain(paths.bundles, lot)) if azure else ()
        export = guard(lambda: build_export(export_format, lot, devices, chain=chain))
        try:
            written = write_export(export, out or paths.manifests)
        except OSError as exc:
            fail(f"cannot write the export into {out or paths.manifests}: {exc.strerror or exc}")
        typer.echo(f"{export_format} export of {export.count} devices: {written}")
        return
    with open_ledger(config) as ledger:
        manifest = guard(lambda: export_manifest(ledger, paths, station_passphrase(settings), lot))
        onboarding = guard(lambda: _matter_onboarding(ledger, paths, station_passphrase(settings), lot))
    json_path, sig_path = write_manifest(manifest, out or paths.manifests)
    typer.echo(f"manifest of {manifest.count} devices: {json_path}\nsignature: {sig_path}")
    if onboarding is not None:
        # A Matter lot with a stored customer certificate: its onboarding codes go with the manifest.
        from factoryd.matter.onboarding import FILE_SUFFIX  # noqa: PLC0415

        codes_path = (out or paths.manifests) / f"{lot}{FILE_SUFFIX}"
        write_public(codes_path, onboarding)
        typer.echo(f"onboarding codes (encrypted to the customer): {codes_path}")


def _matter_onboarding(ledger: Ledger, paths: StationPaths, passphrase: bytes, lot: str) -> bytes | None:
    """The encrypted onboarding codes of a Matter lot whose customer certificate is stored, else None."""
    from factoryd.matter.admin import export_onboarding_codes  # noqa: PLC0415
    from factoryd.matter.lot import MatterStore  # noqa: PLC0415

    if ledger.get_lot(lot).profile.matter is None or MatterStore(paths.matter).recipient(lot) is None:
        return None
    return export_onboarding_codes(ledger, paths, passphrase, lot, actor="cli").der


@app.command("crl")
def manifest_crl(
    lot: str,
    out: Annotated[Path | None, typer.Option(help="File for the CRL (PEM); default: stdout.")] = None,
    next_update_days: Annotated[int, typer.Option(help="Days until nextUpdate (1..3660).")] = 30,
    config: ConfigOption = None,
) -> None:
    """Sign the lot's CRL: every certificate issued that does not stand (failed, voided, superseded)."""
    from factoryd.service import StationPaths, export_crl, station_passphrase  # noqa: PLC0415

    settings = state_dir_settings(config)
    paths = StationPaths(settings.station.state_dir)
    with open_ledger(config) as ledger:
        crl = guard(
            lambda: export_crl(
                ledger,
                paths,
                station_passphrase(settings),
                lot,
                next_update_days=next_update_days,
                actor="cli",
            )
        )
    count = len(list(crl.crl))
    if out is None:
        typer.echo(crl.pem.decode("ascii"), nl=False)
        typer.echo(f"CRL number {crl.number} of {lot}: {count} revoked certificate(s)", err=True)
        return
    write_public(out, crl.pem)
    typer.echo(f"CRL number {crl.number} of {lot}: {count} revoked certificate(s) in {out}")


@app.command("verify")
def manifest_verify(
    manifest: Annotated[Path, typer.Argument(help="The manifest JSON.")],
    signature: Annotated[Path, typer.Argument(help="Its detached CMS signature (DER, .p7s).")],
    ca: Annotated[Path, typer.Option("--ca", help="The customer's CA chain (PEM): root, and issuing CA.")],
) -> None:
    """Check a manifest as a customer would, without a station: signature, chains, duplicates, counts."""
    from factoryd.pki.manifest_check import check_manifest, load_chain  # noqa: PLC0415

    json_bytes, sig_der, ca_pem = read_input(manifest), read_input(signature), read_input(ca)
    chain = guard(lambda: load_chain(ca_pem))
    report = check_manifest(json_bytes, sig_der, chain)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)
