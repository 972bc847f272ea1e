"""Signing service: issuance requests and customer quotas (issue #23).

Revision ID: 0007_signer
Revises: 0006_labels
Create Date: 2026-12-01
"""

from __future__ import annotations

revision: str = "0007_signer"
down_revision: str | None = "0006_labels"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Nothing yet: this revision's tables land with its issue."""


def downgrade() -> None:
    """Nothing to undo."""
