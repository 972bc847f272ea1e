"""`factoryd audit`: the ledger's audit trail."""

from __future__ import annotations

from typing import Annotated

import typer

from factoryd.cli.opts import ConfigOption, command_group, fail, get_settings
from factoryd.errors import FactorydError

app = command_group("The ledger's audit trail.")


@app.command("verify")
def audit_verify(
    config: ConfigOption = None,
    url: Annotated[str | None, typer.Option(help="Ledger URL (instead of the config's).")] = None,
) -> None:
    """Recompute the audit hash chain; exit 1 naming the first bad entry if it was tampered with."""
    from factoryd.errors import AuditChainError  # noqa: PLC0415
    from factoryd.ledger import verify_audit  # noqa: PLC0415

    ledger_url = url or get_settings(config).ledger_url
    try:
        count = verify_audit(ledger_url)
    except AuditChainError as exc:
        fail(str(exc), code=1)
    except FactorydError as exc:
        fail(str(exc))
    typer.echo(f"audit chain verified: {count} entries")
