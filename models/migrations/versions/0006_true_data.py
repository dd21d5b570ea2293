"""organization and user fields, organization domains, role sets, delivery instance

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 03:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_invitations_count", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("missing_member_with_elevated_permissions", sa.Boolean(), nullable=True)
        )
        batch_op.add_column(sa.Column("role_set_key", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("last_active_at", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("external_id", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("email_addresses", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("banned", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("locked", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("last_active_at", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_users_external_id"), ["external_id"], unique=False)
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance_id", sa.String(length=128), nullable=True))
    op.create_table(
        "organization_domains",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("enrollment_mode", sa.String(length=64), nullable=True),
        sa.Column("affiliation_email_address", sa.String(length=320), nullable=True),
        sa.Column("verification_status", sa.String(length=32), nullable=True),
        sa.Column("total_pending_invitations", sa.Integer(), nullable=True),
        sa.Column("total_pending_suggestions", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=True),
        sa.Column("version", sa.String(length=80), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("synced_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organization_domains")),
    )
    with op.batch_alter_table("organization_domains", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_organization_domains_name"), ["name"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_organization_domains_organization_id"), ["organization_id"], unique=False
        )
    op.create_table(
        "role_sets",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=True),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("type", sa.String(length=32), nullable=True),
        sa.Column("role_keys", sa.JSON(), nullable=True),
        sa.Column("default_role_key", sa.String(length=128), nullable=True),
        sa.Column("creator_role_key", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=True),
        sa.Column("version", sa.String(length=80), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("synced_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_role_sets")),
    )
    with op.batch_alter_table("role_sets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_role_sets_key"), ["key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("role_sets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_role_sets_key"))
    op.drop_table("role_sets")
    with op.batch_alter_table("organization_domains", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_organization_domains_organization_id"))
        batch_op.drop_index(batch_op.f("ix_organization_domains_name"))
    op.drop_table("organization_domains")
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.drop_column("instance_id")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_external_id"))
        batch_op.drop_column("last_active_at")
        batch_op.drop_column("locked")
        batch_op.drop_column("banned")
        batch_op.drop_column("email_addresses")
        batch_op.drop_column("external_id")
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.drop_column("last_active_at")
        batch_op.drop_column("role_set_key")
        batch_op.drop_column("missing_member_with_elevated_permissions")
        batch_op.drop_column("pending_invitations_count")
