"""Signing service: the certificates it signed (one standing per device ID) and each lot's count (#23).

Revision ID: 0007_signer
Revises: 0006_labels
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007_signer"
down_revision: str | None = "0006_labels"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the signer_lot and signer_issuance tables."""
    op.create_table(
        "signer_lot",
        sa.Column(
            "lot_id",
            sa.Integer,
            sa.ForeignKey("lot.id", name="fk_signer_lot_lot"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("signed", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "signer_issuance",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column(
            "lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_signer_issuance_lot"), nullable=False
        ),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("hw_serial", sa.String(128), nullable=False),
        sa.Column("station", sa.String(128), nullable=False),
        sa.Column("job_id", sa.Integer, nullable=True),
        sa.Column("csr_sha256", sa.String(64), nullable=False),
        sa.Column("cert_der", sa.LargeBinary, nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        sa.Column("cert_fingerprint_sha256", sa.String(64), nullable=False),
        sa.Column("current", sa.Integer, nullable=True),
        sa.Column("issued_at", _TS, nullable=False),
        sa.Column("superseded_at", _TS, nullable=True),
        sa.UniqueConstraint("request_id", name="uq_signer_issuance_request"),
        sa.UniqueConstraint("device_id", "current", name="uq_signer_issuance_current"),
    )
    op.create_index("ix_signer_issuance_lot", "signer_issuance", ["lot_id"])


def downgrade() -> None:
    """Drop the signer_issuance and signer_lot tables."""
    op.drop_index("ix_signer_issuance_lot", table_name="signer_issuance")
    op.drop_table("signer_issuance")
    op.drop_table("signer_lot")
