"""Alembic environment: always driven programmatically with a connection from ``Ledger.open``."""

from __future__ import annotations

from alembic import context


def _run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        # Offline/CLI use would bypass the ledger's locking and pragmas; refuse it.
        raise RuntimeError("ledger migrations run only through factoryd.ledger (Ledger.open)")
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


_run()
