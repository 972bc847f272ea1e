"""`factoryd ledger`: device IDs in the ledger."""

from __future__ import annotations

from typing import Annotated

import typer

from factoryd.cli.opts import ConfigOption, command_group, fail, guard, open_ledger

app = command_group("Device IDs in the ledger.")


@app.command("void")
def ledger_void(
    device_id: Annotated[str, typer.Option("--id", help="The device ID an operator confirms lost.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger and the audit trail).")],
    config: ConfigOption = None,
) -> None:
    """Void a device ID for good (a board confirmed lost or destroyed); it is never reused."""
    with open_ledger(config) as ledger:
        record = guard(lambda: ledger.find_device(device_id))
        if record is None:
            fail(f"no device ID {device_id!r} in any lot")
        guard(lambda: ledger.void(record.lot, device_id, reason, actor="cli"))
    typer.echo(f"voided {device_id} in lot {record.lot}: {reason}")
