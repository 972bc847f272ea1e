"""Alembic migration scripts of the ledger schema, run programmatically by ``Ledger.open``."""
