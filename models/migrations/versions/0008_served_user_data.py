"""memberships.user_data_complete: public user data served as stored

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 17:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from models.userdata import mark_served_copies

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("user_data_complete", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    mark_served_copies(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.drop_column("user_data_complete")
