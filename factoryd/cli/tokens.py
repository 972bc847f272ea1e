"""`factoryd tokens`: API tokens, on the ledger database directly (it makes the first admin token)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from factoryd.cli.opts import ConfigOption, command_group, echo_json, get_settings, guard, prepare_state

T = TypeVar("T")

app = command_group("API tokens: create (shown once), list, revoke.")


def _token_store_call(config: Path | None, action: str | None, subject: str, call: Callable[[Any], T]) -> T:
    """Run ``call(store)`` on the ledger's token store; audit it as the CLI when ``action`` is set."""
    from factoryd.api.tokens import TokenStore  # noqa: PLC0415 - keep `factoryd --help` fast
    from factoryd.ledger import Ledger  # noqa: PLC0415

    settings = get_settings(config)
    if settings.ledger.url is None:
        # The default ledger is a SQLite file in the state directory.
        prepare_state(settings)

    def body() -> T:
        # Opening the ledger migrates its schema (the api_tokens table) before the store uses it.
        with Ledger.open(settings.ledger_url) as ledger, TokenStore.open(settings.ledger_url) as store:
            result = call(store)
            if action is not None:
                ledger.audit(actor="cli", action=action, subject=subject, details={})
            return result

    return guard(body)


@app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="Token name (the actor in the audit trail); never reused.")],
    role: Annotated[str, typer.Option(help="customer, supervisor, operator or admin.")],
    customer: Annotated[str | None, typer.Option(help="The customer (customer tokens only).")] = None,
    expires_days: Annotated[int | None, typer.Option(min=1, help="Expire after this many days.")] = None,
    config: ConfigOption = None,
) -> None:
    """Create an API token and print it once (stdout: the token alone, for a file or a pipe)."""
    info, secret = _token_store_call(
        config,
        "token.created",
        name,
        lambda store: store.create(name, role, customer=customer, expires_days=expires_days),
    )
    typer.echo(secret)
    expiry = f", expires {info.expires_at.isoformat()}" if info.expires_at else ""
    typer.echo(f"created {info.role} token {info.name!r}{expiry}; it is not shown again", err=True)


@app.command("list")
def tokens_list(config: ConfigOption = None) -> None:
    """List tokens (names, roles, expiry, revocation, last use; never secrets)."""
    tokens = _token_store_call(config, None, "", lambda store: store.list_tokens())
    echo_json([t.as_dict() for t in tokens])


@app.command("revoke")
def tokens_revoke(name: str, config: ConfigOption = None) -> None:
    """Revoke a token for good."""
    info = _token_store_call(config, "token.revoked", name, lambda store: store.revoke(name))
    typer.echo(f"token {info.name!r} revoked at {info.revoked_at.isoformat() if info.revoked_at else '?'}")
