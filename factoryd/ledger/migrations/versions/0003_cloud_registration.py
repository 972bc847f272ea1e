"""Cloud registration state: how far each certificate of a lot got with each cloud account.

Revision ID: 0003_cloud_registration
Revises: 0002_api_tokens
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003_cloud_registration"
down_revision: str | None = "0002_api_tokens"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the cloud_registration table."""
    op.create_table(
        "cloud_registration",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_cloud_registration_lot"), nullable=False
        ),
        sa.Column("cloud", sa.String(16), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("cert_sha256", sa.String(64), nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("cloud_cert_id", sa.String(128), nullable=True),
        sa.Column("cloud_cert_arn", sa.Text, nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.UniqueConstraint("lot_id", "cloud", "target", "cert_sha256", name="uq_cloud_registration_cert"),
    )


def downgrade() -> None:
    """Drop the cloud_registration table."""
    op.drop_table("cloud_registration")
