"""Tables of the mirror and the webhook inbox. Every time is epoch milliseconds, as Clerk's.

Mirrored rows carry ``version``: a fixed-width string of digits and lowercase hex that sorts
the same under every collation, built by ``models.events`` from the object's timestamps, the
event kind, the envelope timestamp and a hash of the delivery id. A write applies only when
its version is greater; ``deleted`` rows are tombstones that keep the version of the deletion.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT primary keys do not autoincrement on SQLite; INTEGER does (it is the rowid).
BigId = BigInteger().with_variant(Integer(), "sqlite")
Millis = BigInteger
JsonDict = dict[str, Any]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {JsonDict: JSON, list[str]: JSON}


class Versioned:
    """Columns every mirrored table shares."""

    version: Mapped[str] = mapped_column(String(80))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    synced_at: Mapped[int] = mapped_column(Millis)


class Organization(Versioned, Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(256))
    slug: Mapped[str | None] = mapped_column(String(256), index=True)
    image_url: Mapped[str | None] = mapped_column(Text)
    has_image: Mapped[bool | None]
    max_allowed_memberships: Mapped[int | None]
    admin_delete_enabled: Mapped[bool | None]
    members_count: Mapped[int | None]
    created_by: Mapped[str | None] = mapped_column(String(64))
    public_metadata: Mapped[JsonDict | None]
    private_metadata: Mapped[JsonDict | None]
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)


class Membership(Versioned, Base):
    """One user in one organization; Clerk's API addresses it by that pair, not by ``id``."""

    __tablename__ = "memberships"

    organization_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    id: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(128))
    role_name: Mapped[str | None] = mapped_column(String(256))
    permissions: Mapped[list[str] | None]
    identifier: Mapped[str | None] = mapped_column(String(320))
    public_user_data: Mapped[JsonDict | None]
    public_metadata: Mapped[JsonDict | None]
    private_metadata: Mapped[JsonDict | None]
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)

    __table_args__ = (Index("ix_memberships_org_role", "organization_id", "role"),)


class Invitation(Versioned, Base):
    """Status is ``pending``, ``accepted`` or ``revoked``; ``expired`` is derived on read."""

    __tablename__ = "invitations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    email_address: Mapped[str | None] = mapped_column(String(320))
    role: Mapped[str | None] = mapped_column(String(128))
    role_name: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str | None] = mapped_column(String(64), index=True)
    inviter_id: Mapped[str | None] = mapped_column(String(64))
    url: Mapped[str | None] = mapped_column(Text)
    public_metadata: Mapped[JsonDict | None]
    private_metadata: Mapped[JsonDict | None]
    expires_at: Mapped[int | None] = mapped_column(Millis)
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)


class Role(Versioned, Base):
    """Role keys are unique among live roles only: a key may come back under a new id."""

    __tablename__ = "roles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str | None] = mapped_column(String(128), index=True)
    name: Mapped[str | None] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(Text)
    is_creator_eligible: Mapped[bool | None]
    permissions: Mapped[list[str] | None]
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)


class Permission(Versioned, Base):
    __tablename__ = "permissions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str | None] = mapped_column(String(128), index=True)
    name: Mapped[str | None] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)


class User(Versioned, Base):
    """Public data only: no email list, no phone numbers, no private metadata."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    identifier: Mapped[str | None] = mapped_column(String(320), index=True)
    username: Mapped[str | None] = mapped_column(String(256))
    first_name: Mapped[str | None] = mapped_column(String(256))
    last_name: Mapped[str | None] = mapped_column(String(256))
    image_url: Mapped[str | None] = mapped_column(Text)
    has_image: Mapped[bool | None]
    public_metadata: Mapped[JsonDict | None]
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)


class InboxStatus:
    PENDING = "pending"
    APPLIED = "applied"
    IGNORED = "ignored"
    REJECTED = "rejected"
    DEAD = "dead"

    ALL = (PENDING, APPLIED, IGNORED, REJECTED, DEAD)


class InboxEvent(Base):
    """A verified delivery, stored before it is acknowledged; ``svix_id`` deduplicates."""

    __tablename__ = "inbox_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    svix_id: Mapped[str] = mapped_column(String(128), unique=True)
    event_type: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=InboxStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[int] = mapped_column(Millis)
    handled_at: Mapped[int | None] = mapped_column(Millis)
    next_attempt_at: Mapped[int | None] = mapped_column(Millis)

    __table_args__ = (Index("ix_inbox_events_status_id", "status", "id"),)
