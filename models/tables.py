"""Tables of the mirror and the webhook inbox. Every time is epoch milliseconds, as Clerk's.

Mirrored rows carry ``version``: a fixed-width string of digits and lowercase hex that sorts
the same under every collation, built by ``models.events`` from the object's timestamps, the
event kind, the envelope timestamp and a hash of the delivery id. A write applies only when
its version is greater; ``deleted`` rows are tombstones that keep the version of the deletion.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, MetaData, String, Text, false, text
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
    pending_invitations_count: Mapped[int | None]
    missing_member_with_elevated_permissions: Mapped[bool | None]
    role_set_key: Mapped[str | None] = mapped_column(String(128))
    last_active_at: Mapped[int | None] = mapped_column(Millis)
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
    # Whether ``public_user_data`` is served as stored (``models.userdata.served_as_stored``).
    user_data_complete: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
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
    """Public data plus what joins a user to an app's own table: no phones, no private metadata.

    Memberships' ``public_user_data`` and ``identifier`` are copies of a live user row (see
    ``models.mirror``): this row, by its version, is the one source of a user's public data.
    """

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    identifier: Mapped[str | None] = mapped_column(String(320), index=True)
    external_id: Mapped[str | None] = mapped_column(String(256), index=True)
    email_addresses: Mapped[list[str] | None]
    banned: Mapped[bool | None]
    locked: Mapped[bool | None]
    last_active_at: Mapped[int | None] = mapped_column(Millis)
    username: Mapped[str | None] = mapped_column(String(256))
    first_name: Mapped[str | None] = mapped_column(String(256))
    last_name: Mapped[str | None] = mapped_column(String(256))
    image_url: Mapped[str | None] = mapped_column(Text)
    has_image: Mapped[bool | None]
    public_metadata: Mapped[JsonDict | None]
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)


class OrganizationDomain(Versioned, Base):
    """A domain whose verified users may join an organization (``enrollment_mode`` says how)."""

    __tablename__ = "organization_domains"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(256), index=True)
    enrollment_mode: Mapped[str | None] = mapped_column(String(64))
    affiliation_email_address: Mapped[str | None] = mapped_column(String(320))
    verification_status: Mapped[str | None] = mapped_column(String(32))
    total_pending_invitations: Mapped[int | None]
    total_pending_suggestions: Mapped[int | None]
    created_at: Mapped[int | None] = mapped_column(Millis)
    updated_at: Mapped[int | None] = mapped_column(Millis)


class RoleSet(Versioned, Base):
    """The roles an organization with this ``role_set_key`` may assign; listed, never delivered."""

    __tablename__ = "role_sets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str | None] = mapped_column(String(128), index=True)
    name: Mapped[str | None] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(String(32))
    role_keys: Mapped[list[str] | None]
    default_role_key: Mapped[str | None] = mapped_column(String(128))
    creator_role_key: Mapped[str | None] = mapped_column(String(128))
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
    instance_id: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=InboxStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[int] = mapped_column(Millis)
    handled_at: Mapped[int | None] = mapped_column(Millis)
    next_attempt_at: Mapped[int | None] = mapped_column(Millis)
    # When models.retention masked the personal data in ``body``; NULL while it is intact.
    redacted_at: Mapped[int | None] = mapped_column(Millis)

    __table_args__ = (
        Index("ix_inbox_events_status_id", "status", "id"),
        # Lets redaction start at the first row still intact instead of walking redacted ones.
        Index("ix_inbox_events_redacted_at_id", "redacted_at", "id"),
    )


class CommandKind:
    SET_ROLE = "set_role"
    ADD_MEMBER = "add_member"
    REMOVE_MEMBER = "remove_member"
    INVITE = "invite"
    BULK_INVITE = "bulk_invite"
    REVOKE_INVITATION = "revoke_invitation"

    ALL = (SET_ROLE, ADD_MEMBER, REMOVE_MEMBER, INVITE, BULK_INVITE, REVOKE_INVITATION)


class CommandStatus:
    """pending -> sending -> applied -> confirmed, or -> failed / superseded; planned = dry run."""

    PENDING = "pending"
    SENDING = "sending"
    APPLIED = "applied"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    PLANNED = "planned"

    ALL = (PENDING, SENDING, APPLIED, CONFIRMED, FAILED, SUPERSEDED, PLANNED)
    OPEN = (PENDING, SENDING)


class Command(Base):
    """A change to make in Clerk, recorded before it is sent (an outbox row)."""

    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    organization_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(64))
    email_address: Mapped[str | None] = mapped_column(String(320))
    invitation_id: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[JsonDict | None]
    requested_by: Mapped[str] = mapped_column(String(256))
    rule_name: Mapped[str | None] = mapped_column(String(128))
    idempotency_key: Mapped[str] = mapped_column(String(256), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=CommandStatus.PENDING)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[JsonDict | None]
    superseded_by: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(Millis)
    updated_at: Mapped[int] = mapped_column(Millis)
    sent_at: Mapped[int | None] = mapped_column(Millis)
    applied_at: Mapped[int | None] = mapped_column(Millis)
    confirmed_at: Mapped[int | None] = mapped_column(Millis)
    next_attempt_at: Mapped[int | None] = mapped_column(Millis)
    flagged_at: Mapped[int | None] = mapped_column(Millis)

    __table_args__ = (
        Index("ix_commands_target", "organization_id", "user_id", "status"),
        Index("ix_commands_status_id", "status", "id"),
    )


class ApiCall(Base):
    """The audit trail: every Backend API call orgsync made, with its outcome."""

    __tablename__ = "api_calls"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    command_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    status_code: Mapped[int | None]
    error_code: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    clerk_trace_id: Mapped[str | None] = mapped_column(String(128))
    retry_after: Mapped[float | None]
    duration_ms: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[int] = mapped_column(Millis, index=True)


class RuleState(Base):
    """Per rule and membership: whether ``on_join`` ran for this generation, and reversals."""

    __tablename__ = "rule_states"

    rule_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    membership_id: Mapped[str | None] = mapped_column(String(64))
    on_join_done_at: Mapped[int | None] = mapped_column(Millis)
    reversals: Mapped[int] = mapped_column(Integer, default=0)
    last_reversal_at: Mapped[int | None] = mapped_column(Millis)
    stopped_at: Mapped[int | None] = mapped_column(Millis)
    stopped_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[int] = mapped_column(Millis)

    # A row per rule and membership, few of them stopped: status, metrics and ``rules check``
    # find those without reading the others.
    __table_args__ = (
        Index(
            "ix_rule_states_stopped",
            "rule_name",
            "stopped_at",
            postgresql_where=text("stopped_at IS NOT NULL"),
            sqlite_where=text("stopped_at IS NOT NULL"),
        ),
    )


class SyncStatus:
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    ALL = (RUNNING, COMPLETED, FAILED, INTERRUPTED)


class SyncRun(Base):
    """One reconciliation against the Backend API: its cursor (to resume) and what it repaired."""

    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(16))
    organization_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[int] = mapped_column(Millis)
    heartbeat_at: Mapped[int] = mapped_column(Millis)
    finished_at: Mapped[int | None] = mapped_column(Millis)
    progress: Mapped[JsonDict | None]
    drift: Mapped[JsonDict | None]
    api_calls: Mapped[int] = mapped_column(Integer, default=0)
    rate_limit_waits: Mapped[int] = mapped_column(Integer, default=0)
    rows_seen: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class MirrorState(Base):
    """The mirror's generation is the sum of ``generation`` over the rows: every mirror write
    transaction grows one row no concurrent writer holds (``models.db.lock_mirror_writes``).

    Readers that cache answers compare it with the generation their answers were read at; the
    table may be empty (a fresh or truncated database), which reads as generation 0.
    """

    __tablename__ = "mirror_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class NotificationStatus:
    """pending -> delivered, or -> dead once it failed for ``ORGSYNC_NOTIFY_DEAD_AFTER``."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"

    ALL = (PENDING, DELIVERED, DEAD)


class Notification(Base):
    """A change of the mirror to announce to the outgoing webhook URLs (the notification outbox).

    Written in the transaction of the mirror write it describes (``models.notifications``);
    ``id`` grows in commit order because mirror writes are serialised, and ``ordering_key``
    (the organization, or the user for user events) says which rows must arrive in that order.
    """

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(48))
    ordering_key: Mapped[str] = mapped_column(String(80))
    object_id: Mapped[str] = mapped_column(String(160))
    data: Mapped[JsonDict]
    created_at: Mapped[int] = mapped_column(Millis)
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[int] = mapped_column(Millis)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Digests of the URLs that acknowledged it: a retry goes only to the others.
    delivered_to: Mapped[list[str] | None]
    delivered_at: Mapped[int | None] = mapped_column(Millis)

    __table_args__ = (
        Index("ix_notifications_status_key_id", "status", "ordering_key", "id"),
        Index("ix_notifications_status_id", "status", "id"),
    )
