"""API tokens: hashed bearer tokens with a role (and a customer for customer tokens).

Revision ID: 0002_api_tokens
Revises: 0001_initial
Create Date: 2025-01-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002_api_tokens"
down_revision: str | None = "0001_initial"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the api_tokens table."""
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("customer", sa.String(128), nullable=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=True),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.Column("last_used_at", _TS, nullable=True),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
    )


def downgrade() -> None:
    """Drop the api_tokens table."""
    op.drop_table("api_tokens")
