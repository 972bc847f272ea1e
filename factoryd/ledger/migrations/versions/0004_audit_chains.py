"""Audit trail chains per actor (issue #20): one hash chain and head row per station, CLI, token….

The single chain of older ledgers becomes the chain ``ledger`` (its links keep their hashes and
all-zero genesis): ``audit_entry`` gains ``chain`` and ``chain_seq`` (= the old ``seq``), and ``seq``
becomes the database-assigned order of the whole trail; ``audit_head`` is keyed by chain.

Revision ID: 0004_audit_chains
Revises: 0003_cloud_registration
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004_audit_chains"
down_revision: str | None = "0003_cloud_registration"
branch_labels: str | None = None
depends_on: str | None = None

# The pre-0004 chain's name (factoryd.ledger.tables.LEGACY_CHAIN; a migration keeps its own copy).
LEGACY_CHAIN = "ledger"
CHAIN_CHARS = 128
OLD_HEAD_ROW_ID = 1
GENESIS_HASH = "0" * 64


def upgrade() -> None:
    """Add the chain columns, make seq database-assigned, key the heads by chain."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.add_column(
            "audit_entry",
            sa.Column("chain", sa.String(CHAIN_CHARS), nullable=False, server_default=LEGACY_CHAIN),
        )
        op.alter_column("audit_entry", "chain", server_default=None)
        op.add_column("audit_entry", sa.Column("chain_seq", sa.BigInteger, nullable=True))
        op.execute("UPDATE audit_entry SET chain_seq = seq")
        op.alter_column("audit_entry", "chain_seq", nullable=False)
        # What BIGSERIAL would have made: a sequence owned by the column, continuing after the old seqs.
        op.execute("CREATE SEQUENCE audit_entry_seq_seq OWNED BY audit_entry.seq")
        op.execute(
            "SELECT setval('audit_entry_seq_seq', COALESCE((SELECT max(seq) FROM audit_entry), 0) + 1, false)"
        )
        op.execute("ALTER TABLE audit_entry ALTER COLUMN seq SET DEFAULT nextval('audit_entry_seq_seq')")
        op.create_unique_constraint("uq_audit_entry_chain_seq", "audit_entry", ["chain", "chain_seq"])
    else:
        # SQLite cannot alter columns: batch mode copies the table. INTEGER PRIMARY KEY is the rowid,
        # assigned on insert after the largest one (the old seqs are kept as they are).
        with op.batch_alter_table("audit_entry", recreate="always") as batch:
            batch.alter_column(
                "seq",
                existing_type=sa.BigInteger,
                type_=sa.Integer,
                autoincrement=True,
                existing_nullable=False,
            )
            batch.add_column(
                sa.Column("chain", sa.String(CHAIN_CHARS), nullable=False, server_default=LEGACY_CHAIN)
            )
            batch.add_column(sa.Column("chain_seq", sa.BigInteger, nullable=True))
        op.execute("UPDATE audit_entry SET chain_seq = seq")
        with op.batch_alter_table("audit_entry", recreate="always") as batch:
            batch.alter_column("chain", existing_type=sa.String(CHAIN_CHARS), server_default=None)
            batch.alter_column("chain_seq", existing_type=sa.BigInteger, nullable=False)
            batch.create_unique_constraint("uq_audit_entry_chain_seq", ["chain", "chain_seq"])
    heads = op.create_table(
        "audit_head_0004",
        sa.Column("chain", sa.String(CHAIN_CHARS), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    old = bind.execute(sa.text("SELECT seq, hash FROM audit_head WHERE id = :id"), {"id": OLD_HEAD_ROW_ID})
    row = old.first()
    if row is not None and row.seq > 0:  # an empty old chain needs no head: chains start on first use
        op.bulk_insert(heads, [{"chain": LEGACY_CHAIN, "seq": row.seq, "hash": row.hash}])
    op.drop_table("audit_head")
    op.rename_table("audit_head_0004", "audit_head")


def downgrade() -> None:
    """Back to one chain; refused when entries of other chains exist (their hashes cannot be rechained)."""
    bind = op.get_bind()
    others = bind.execute(
        sa.text("SELECT count(*) FROM audit_entry WHERE chain <> :legacy"), {"legacy": LEGACY_CHAIN}
    ).scalar_one()
    if others:
        raise RuntimeError(
            f"cannot downgrade below 0004: {others} audit entries are on chains other than "
            f"{LEGACY_CHAIN!r}, and one chain cannot hold them without rewriting their hashes"
        )
    legacy = bind.execute(
        sa.text("SELECT seq, hash FROM audit_head WHERE chain = :legacy"), {"legacy": LEGACY_CHAIN}
    ).first()
    head = op.create_table(
        "audit_head_0003",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(
        head,
        [
            {
                "id": OLD_HEAD_ROW_ID,
                "seq": legacy.seq if legacy else 0,
                "hash": legacy.hash if legacy else GENESIS_HASH,
            }
        ],
    )
    op.drop_table("audit_head")
    op.rename_table("audit_head_0003", "audit_head")
    if bind.dialect.name == "postgresql":
        op.drop_constraint("uq_audit_entry_chain_seq", "audit_entry", type_="unique")
        op.execute("ALTER TABLE audit_entry ALTER COLUMN seq DROP DEFAULT")
        op.execute("DROP SEQUENCE IF EXISTS audit_entry_seq_seq")
        op.drop_column("audit_entry", "chain_seq")
        op.drop_column("audit_entry", "chain")
    else:
        with op.batch_alter_table("audit_entry", recreate="always") as batch:
            batch.drop_constraint("uq_audit_entry_chain_seq", type_="unique")
            batch.drop_column("chain_seq")
            batch.drop_column("chain")
            batch.alter_column("seq", existing_type=sa.Integer, type_=sa.BigInteger, autoincrement=False)
