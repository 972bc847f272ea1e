"""Initial ledger schema: lots, device IDs, jobs, attempts, hash-chained audit trail.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create every ledger table and the audit chain's genesis head."""
    op.create_table(
        "lot",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("customer", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("profile", sa.JSON, nullable=False),
        sa.Column("target_quantity", sa.Integer, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_lot_name"),
    )
    op.create_table(
        "device",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_device_lot"), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("hw_serial", sa.String(128), nullable=True),
        sa.Column("station", sa.String(128), nullable=True),
        sa.Column("port", sa.String(128), nullable=True),
        sa.Column("job_id", sa.Integer, nullable=True),
        sa.Column("reserved_at", _TS, nullable=True),
        sa.Column("provisioned_at", _TS, nullable=True),
        sa.Column("cert_der", sa.LargeBinary, nullable=True),
        sa.Column("cert_serial", sa.String(64), nullable=True),
        sa.Column("cert_fingerprint_sha256", sa.String(64), nullable=True),
        sa.Column("void_reason", sa.Text, nullable=True),
        sa.UniqueConstraint("device_id", name="uq_device_device_id"),
        sa.UniqueConstraint("lot_id", "hw_serial", name="uq_device_lot_serial"),
    )
    op.create_index("ix_device_lot_state", "device", ["lot_id", "state", "id"])
    op.create_table(
        "job",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lot_id", sa.Integer, sa.ForeignKey("lot.id", name="fk_job_lot"), nullable=False),
        sa.Column("station", sa.String(128), nullable=False),
        sa.Column("port", sa.String(128), nullable=False),
        sa.Column("hw_serial", sa.String(128), nullable=True),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
    )
    op.create_index("ix_job_lot_id", "job", ["lot_id"])
    op.create_table(
        "attempt",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id", name="fk_attempt_job"), nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("at", _TS, nullable=False),
    )
    op.create_index("ix_attempt_job_id", "attempt", ["job_id"])
    op.create_table(
        "audit_entry",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(192), nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": "0" * 64}])


def downgrade() -> None:
    """Drop the whole ledger schema."""
    for table in ("audit_head", "audit_entry", "attempt", "job", "device", "lot"):
        op.drop_table(table)
