"""Audit trail chains per station and lot (issue #20).

Revision ID: 0004_audit_chains
Revises: 0003_cloud_registration
Create Date: 2026-12-01
"""

from __future__ import annotations

revision: str = "0004_audit_chains"
down_revision: str | None = "0003_cloud_registration"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Nothing yet: this revision's tables land with its issue."""


def downgrade() -> None:
    """Nothing to undo."""
