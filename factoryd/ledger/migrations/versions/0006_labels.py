"""Label print queue and reprints (issue #21).

Revision ID: 0006_labels
Revises: 0005_matter
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006_labels"
down_revision: str | None = "0005_matter"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the label_template and label_job tables."""
    op.create_table(
        "label_template",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_label_template_lot"), nullable=False
        ),
        sa.Column("template", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("set_by", sa.String(128), nullable=False),
        sa.Column("set_at", _TS, nullable=False),
        sa.UniqueConstraint("lot_id", name="uq_label_template_lot"),
    )
    op.create_table(
        "label_job",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_label_job_lot"), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("station", sa.String(128), nullable=False),
        sa.Column("port", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("condition", sa.String(32), nullable=True),
        sa.Column("printer", sa.String(128), nullable=True),
        # The device ID for a board's own label (one per board), NULL for reprints (NULLs never collide).
        sa.Column("dedupe_key", sa.String(128), nullable=True),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("printed_at", _TS, nullable=True),
        sa.UniqueConstraint("dedupe_key", name="uq_label_job_dedupe"),
    )
    op.create_index("ix_label_job_station_state", "label_job", ["station", "state", "id"])
    op.create_index("ix_label_job_device", "label_job", ["device_id"])


def downgrade() -> None:
    """Drop the label tables."""
    op.drop_index("ix_label_job_device", table_name="label_job")
    op.drop_index("ix_label_job_station_state", table_name="label_job")
    op.drop_table("label_job")
    op.drop_table("label_template")
