"""inbox redaction marker

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 03:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("redacted_at", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_inbox_events_redacted_at_id", ["redacted_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.drop_index("ix_inbox_events_redacted_at_id")
        batch_op.drop_column("redacted_at")
