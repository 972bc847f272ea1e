"""`factoryd labels`: lot templates, the print queue, reprints and PNG previews (docs/labels.md)."""

from __future__ import annotations

import dataclasses
import getpass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from factoryd.cli.opts import (
    ConfigOption,
    command_group,
    echo_json,
    fail,
    format_table,
    get_settings,
    guard,
    open_ledger,
    read_input,
    write_public,
)

if TYPE_CHECKING:
    from factoryd.config import Settings
    from factoryd.ledger import Ledger

app = command_group("Device labels: lot templates, the print queue, reprints, previews.")

LIST_COLUMNS = ("id", "device_id", "lot", "port", "kind", "state", "attempts", "condition", "updated")


def _actor() -> str:
    """Who asked, for the audit trail: the CLI and the OS user running it."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "cli"


def _make_label(settings: Settings, ledger: Ledger, device_id: str) -> tuple[str, bytes]:
    """The lot and ZPL of a device's label, made as the station makes it (codes opened if Matter)."""
    from factoryd.labels.queue import load_template_file, make_label  # noqa: PLC0415
    from factoryd.ledger.errors import DeviceNotFoundError  # noqa: PLC0415 - keep `factoryd --help` fast
    from factoryd.service import station_passphrase  # noqa: PLC0415

    record = ledger.find_device(device_id)
    if record is None:
        raise DeviceNotFoundError(f"no device {device_id!r} in any lot")
    if ledger.is_matter_lot(record.lot):
        ledger.use_onboarding_secret(station_passphrase(settings))
    default = load_template_file(settings.labels.template) if settings.labels.template else None
    return record.lot, make_label(ledger, record.lot, device_id, default)


@app.command("template")
def labels_template(
    lot: str,
    template: Annotated[Path, typer.Argument(help="TOML label template (docs/labels.md).")],
    config: ConfigOption = None,
) -> None:
    """Check a label template and make it the lot's (audited); a malformed one is refused whole."""
    from factoryd.labels.template import LabelTemplate  # noqa: PLC0415

    data = read_input(template)
    with open_ledger(config) as ledger:

        def store() -> str:
            LabelTemplate.parse(data, source=f"label template {template}")  # names the file, not the lot
            return ledger.set_label_template(lot, data.decode(), actor=_actor()).sha256

        digest = guard(store)
    typer.echo(f"lot {lot}: label template {template} stored (sha256 {digest})")


@app.command("check")
def labels_check(
    template: Annotated[Path, typer.Argument(help="TOML label template (docs/labels.md).")],
    preview: Annotated[
        Path | None, typer.Option("--preview", help="Write a PNG preview with sample values.")
    ] = None,
) -> None:
    """Check a label template without storing it; optionally preview it with sample values."""
    from factoryd.labels.preview import render_png  # noqa: PLC0415
    from factoryd.labels.template import LabelTemplate, LabelValues  # noqa: PLC0415
    from factoryd.labels.zpl import render_zpl  # noqa: PLC0415

    parsed = guard(lambda: LabelTemplate.parse(read_input(template), source=f"label template {template}"))
    placeholders = ", ".join(sorted(parsed.placeholders)) or "none"
    typer.echo(
        f"{template}: ok, {parsed.width_dots}x{parsed.height_dots} dots at {parsed.dpi} dpi, "
        f"{len(parsed.fields)} fields, placeholders: {placeholders}"
    )
    if preview is not None:
        png = guard(lambda: render_png(render_zpl(parsed, LabelValues.sample())))
        write_public(preview, png)
        typer.echo(f"preview written to {preview}")


@app.command("list")
def labels_list(
    device_id: Annotated[str | None, typer.Option("--device", help="Only this device's labels.")] = None,
    state: Annotated[str | None, typer.Option("--state", help="queued, printed or failed.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """This station's label jobs, newest first: what printed, what waits and why."""
    from factoryd.ledger.labels import LabelState  # noqa: PLC0415

    settings = get_settings(config)
    wanted = None
    if state is not None:
        try:
            wanted = LabelState(state)
        except ValueError:
            fail(f"--state must be one of {', '.join(s.value for s in LabelState)}, got {state!r}")
    with open_ledger(config) as ledger:
        jobs = guard(
            lambda: ledger.label_jobs(
                station=settings.station.name, device_id=device_id, state=wanted, limit=limit
            )
        )
    if as_json:
        echo_json([{**dataclasses.asdict(j), "kind": str(j.kind), "state": str(j.state)} for j in jobs])
        return
    if not jobs:
        typer.echo("no labels yet")
        return
    rows = [
        {
            "id": j.id,
            "device_id": j.device_id,
            "lot": j.lot,
            "port": j.port,
            "kind": str(j.kind),
            "state": str(j.state),
            "attempts": j.attempts,
            "condition": j.condition or "",
            "updated": j.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for j in jobs
    ]
    for line in format_table(LIST_COLUMNS, rows):
        typer.echo(line)


@app.command("reprint")
def labels_reprint(
    device_id: str,
    port: Annotated[
        str | None, typer.Option("--port", help="Print on this port's printer (default: the board's port).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Queue a reprint of a provisioned device's label (audited); the running station prints it."""
    from factoryd.errors import InputError  # noqa: PLC0415
    from factoryd.ledger.errors import DeviceNotFoundError  # noqa: PLC0415
    from factoryd.ledger.labels import LabelKind  # noqa: PLC0415

    settings = get_settings(config)
    with open_ledger(config) as ledger:

        def queue() -> str:
            record = ledger.find_device(device_id)
            if record is None:
                raise DeviceNotFoundError(f"no device {device_id!r} in any lot")
            where = port or record.port
            if where is None:
                raise InputError(f"device {device_id!r} has no port on record: give --port")
            job = ledger.queue_label(
                record.lot,
                device_id,
                station=settings.station.name,
                port=where,
                kind=LabelKind.REPRINT,
                actor=_actor(),
            )
            return f"reprint of {device_id} queued as label job {job.id} for port {where}"

        typer.echo(guard(queue))
    if not settings.labels.enabled:
        typer.echo("note: labels are disabled in this station's config ([labels] enabled = false)")


@app.command("preview")
def labels_preview(
    device_id: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")],
    zpl: Annotated[
        Path | None, typer.Option("--zpl", help="Also write the ZPL the printer gets (codes in clear!).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write a PNG preview of a device's label, drawn from the ZPL the printer would get."""
    from factoryd.files import write_private  # noqa: PLC0415
    from factoryd.labels.preview import render_png  # noqa: PLC0415

    settings = get_settings(config)
    with open_ledger(config) as ledger:
        lot, data = guard(lambda: _make_label(settings, ledger, device_id))
    png = guard(lambda: render_png(data))
    # A Matter label carries the setup passcode: the files are the caller's only (0600).
    try:
        write_private(output, png)
        if zpl is not None:
            write_private(zpl, data)
    except OSError as exc:
        fail(f"cannot write the preview: {exc.strerror or exc}")
    typer.echo(f"label of {device_id} (lot {lot}) written to {output}")
