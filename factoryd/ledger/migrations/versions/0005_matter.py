"""Matter onboarding data per device (issue #21): sealed onboarding codes and each lot's KDF salt.

Revision ID: 0005_matter
Revises: 0004_audit_chains
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005_matter"
down_revision: str | None = "0004_audit_chains"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the matter_lot and matter_device tables."""
    op.create_table(
        "matter_lot",
        sa.Column("lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_matter_lot_lot"), primary_key=True),
        sa.Column("kdf_salt", sa.LargeBinary, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "matter_device",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_matter_device_lot"), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("sealed_codes", sa.LargeBinary, nullable=False),
        sa.Column("discriminator", sa.Integer, nullable=False),
        sa.Column("product_id", sa.Integer, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.UniqueConstraint("lot_id", "device_id", name="uq_matter_device_lot_device"),
    )


def downgrade() -> None:
    """Drop the Matter tables."""
    op.drop_table("matter_device")
    op.drop_table("matter_lot")
