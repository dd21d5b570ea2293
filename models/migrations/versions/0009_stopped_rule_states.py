"""rule_states: a partial index of the stopped ones

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 17:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

STOPPED = sa.text("stopped_at IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("rule_states", schema=None) as batch_op:
        batch_op.create_index(
            "ix_rule_states_stopped",
            ["rule_name", "stopped_at"],
            unique=False,
            postgresql_where=STOPPED,
            sqlite_where=STOPPED,
        )


def downgrade() -> None:
    with op.batch_alter_table("rule_states", schema=None) as batch_op:
        batch_op.drop_index("ix_rule_states_stopped")
