"""Matter onboarding data per device (issue #21).

Revision ID: 0005_matter
Revises: 0004_audit_chains
Create Date: 2026-12-01
"""

from __future__ import annotations

revision: str = "0005_matter"
down_revision: str | None = "0004_audit_chains"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Nothing yet: this revision's tables land with its issue."""


def downgrade() -> None:
    """Nothing to undo."""
