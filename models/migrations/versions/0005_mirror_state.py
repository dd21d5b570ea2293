"""mirror state: a generation counter for readers' caches

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 03:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mirror_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mirror_state")),
    )


def downgrade() -> None:
    op.drop_table("mirror_state")
