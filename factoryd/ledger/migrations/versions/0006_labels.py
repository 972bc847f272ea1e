"""Label print queue and reprints (issue #21).

Revision ID: 0006_labels
Revises: 0005_matter
Create Date: 2026-12-01
"""

from __future__ import annotations

revision: str = "0006_labels"
down_revision: str | None = "0005_matter"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Nothing yet: this revision's tables land with its issue."""


def downgrade() -> None:
    """Nothing to undo."""
