"""The read API for applications: Clerk's list and get calls answered from the mirror.

Shapes follow Clerk's Backend API (snake_case, epoch milliseconds) so code written against
Clerk's SDK reads the same fields. Tombstoned rows never show. Invitation status ``expired``
is never stored: a pending invitation whose ``expires_at`` has passed reads as expired.
An organization is addressed by id or slug, as Clerk's ``/organizations/{id_or_slug}``;
an unknown or deleted one yields ``None`` or an empty page, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from models import clock
from models.errors import PermanentError
from models.events import normalize_role_key
from models.tables import Invitation, Membership, Organization, Permission, Role

T = TypeVar("T")

MAX_PAGE_SIZE = 500
INVITATION_STATUSES = ("pending", "accepted", "revoked", "expired")


class InvalidQueryError(PermanentError, ValueError):
    """A read call with arguments out of range; also a ``ValueError`` for callers' convenience."""


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, with the total across all pages, as Clerk's ``{data, total_count}``."""

    data: list[T]
    total_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": [item.to_dict() if hasattr(item, "to_dict") else item for item in self.data],
            "total_count": self.total_count,
        }


@dataclass(frozen=True)
class OrganizationView:
    id: str
    name: str | None
    slug: str | None
    image_url: str | None
    has_image: bool
    max_allowed_memberships: int | None
    admin_delete_enabled: bool | None
    members_count: int
    created_by: str | None
    public_metadata: dict[str, Any]
    private_metadata: dict[str, Any]
    created_at: int | None
    updated_at: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "organization",
            "id": self.id,
            "name": self.name,
            "slug": self.slug,
            "image_url": self.image_url,
            "has_image": self.has_image,
            "members_count": self.members_count,
            "max_allowed_memberships": self.max_allowed_memberships,
            "admin_delete_enabled": self.admin_delete_enabled,
            "public_metadata": dict(self.public_metadata),
            "private_metadata": dict(self.private_metadata),
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class MembershipView:
    id: str
    organization_id: str
    user_id: str
    role: str
    role_name: str | None
    permissions: list[str]
    public_metadata: dict[str, Any]
    private_metadata: dict[str, Any]
    public_user_data: dict[str, Any]
    created_at: int | None
    updated_at: int | None
    organization: OrganizationView | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "organization_membership",
            "id": self.id,
            "role": self.role,
            "role_name": self.role_name,
            "permissions": list(self.permissions),
            "public_metadata": dict(self.public_metadata),
            "private_metadata": dict(self.private_metadata),
            "organization_id": self.organization_id,
            "organization": None if self.organization is None else self.organization.to_dict(),
            "public_user_data": dict(self.public_user_data),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class InvitationView:
    id: str
    organization_id: str
    email_address: str | None
    role: str | None
    role_name: str | None
    status: str
    user_id: str | None
    inviter_id: str | None
    url: str | None
    public_metadata: dict[str, Any]
    private_metadata: dict[str, Any]
    expires_at: int | None
    created_at: int | None
    updated_at: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "organization_invitation",
            "id": self.id,
            "email_address": self.email_address,
            "role": self.role,
            "role_name": self.role_name,
            "organization_id": self.organization_id,
            "status": self.status,
            "user_id": self.user_id,
            "inviter_id": self.inviter_id,
            "url": self.url,
            "public_metadata": dict(self.public_metadata),
            "private_metadata": dict(self.private_metadata),
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class PermissionView:
    key: str
    id: str | None = None
    name: str | None = None
    description: str | None = None
    type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "permission",
            "id": self.id,
            "key": self.key,
            "name": self.name,
            "description": self.description,
            "type": self.type,
        }


@dataclass(frozen=True)
class RoleView:
    id: str
    key: str | None
    name: str | None
    description: str | None
    is_creator_eligible: bool | None
    permissions: list[PermissionView]
    created_at: int | None
    updated_at: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "role",
            "id": self.id,
            "key": self.key,
            "name": self.name,
            "description": self.description,
            "is_creator_eligible": self.is_creator_eligible,
            "permissions": [permission.to_dict() for permission in self.permissions],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def check_paging(page: int, page_size: int) -> None:
    """Raise ``InvalidQueryError`` unless ``page >= 1`` and ``1 <= page_size <= 500``."""
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise InvalidQueryError(f"page must be a whole number >= 1, got {page!r}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidQueryError(
            f"page_size must be a whole number from 1 to {MAX_PAGE_SIZE}, got {page_size!r}"
        )


def _now(now_ms: int | None) -> int:
    return clock.now_ms() if now_ms is None else now_ms


def _page(session: Session, query: Select[Any], page: int, page_size: int) -> tuple[list[Any], int]:
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    rows = list(session.scalars(query.limit(page_size).offset((page - 1) * page_size)))
    return rows, int(total)


def _members_counts(session: Session, organization_ids: Sequence[str]) -> dict[str, int]:
    # Counted from the mirror rather than read from the stored snapshot: a membership event
    # does not bump the organization's updated_at, so the stored count can lag behind.
    if not organization_ids:
        return {}
    rows = session.execute(
        select(Membership.organization_id, func.count())
        .where(Membership.organization_id.in_(organization_ids), Membership.deleted.is_(False))
        .group_by(Membership.organization_id)
    )
    return {organization_id: int(count) for organization_id, count in rows}


def _organization_view(row: Organization, members_count: int) -> OrganizationView:
    return OrganizationView(
        id=row.id,
        name=row.name,
        slug=row.slug,
        image_url=row.image_url,
        has_image=bool(row.has_image),
        max_allowed_memberships=row.max_allowed_memberships,
        admin_delete_enabled=row.admin_delete_enabled,
        members_count=members_count,
        created_by=row.created_by,
        public_metadata=dict(row.public_metadata or {}),
        private_metadata=dict(row.private_metadata or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _live_organization(session: Session, id_or_slug: str) -> Organization | None:
    live = Organization.deleted.is_(False)
    row = session.scalars(select(Organization).where(Organization.id == id_or_slug, live)).first()
    if row is None:
        # Clerk keeps slugs unique among live organizations; the newest wins if a stale row lingers.
        row = session.scalars(
            select(Organization)
            .where(Organization.slug == id_or_slug, live)
            .order_by(Organization.created_at.desc(), Organization.id)
        ).first()
    return row


def resolve_organization(session: Session, id_or_slug: str) -> OrganizationView | None:
    """The live organization with this id or slug, or None."""
    row = _live_organization(session, id_or_slug)
    if row is None:
        return None
    return _organization_view(row, _members_counts(session, [row.id]).get(row.id, 0))


def list_organizations(session: Session, *, page: int = 1, page_size: int = 10) -> Page[OrganizationView]:
    """Live organizations, oldest first (created_at, then id) for stable paging."""
    check_paging(page, page_size)
    query = (
        select(Organization)
        .where(Organization.deleted.is_(False))
        .order_by(Organization.created_at, Organization.id)
    )
    rows, total = _page(session, query, page, page_size)
    counts = _members_counts(session, [row.id for row in rows])
    return Page([_organization_view(row, counts.get(row.id, 0)) for row in rows], total)


def _membership_view(row: Membership, organization: OrganizationView | None) -> MembershipView:
    user_data = dict(row.public_user_data or {})
    user_data["user_id"] = row.user_id
    user_data.setdefault("identifier", row.identifier)
    return MembershipView(
        id=row.id,
        organization_id=row.organization_id,
        user_id=row.user_id,
        role=row.role,
        role_name=row.role_name,
        permissions=list(row.permissions or []),
        public_metadata=dict(row.public_metadata or {}),
        private_metadata=dict(row.private_metadata or {}),
        public_user_data=user_data,
        created_at=row.created_at,
        updated_at=row.updated_at,
        organization=organization,
    )


def _role_filter(role: str | Sequence[str] | None) -> ColumnElement[bool] | None:
    if role is None:
        return None
    roles = [role] if isinstance(role, str) else list(role)
    if not roles or not all(isinstance(item, str) and item for item in roles):
        raise InvalidQueryError("role must be a role key or a non-empty list of role keys")
    return Membership.role.in_(sorted({normalize_role_key(item) for item in roles}))


def get_memberships(
    session: Session,
    organization: str,
    *,
    page: int = 1,
    page_size: int = 10,
    role: str | Sequence[str] | None = None,
) -> Page[MembershipView]:
    """Live members of the organization (id or slug), by created_at then user_id."""
    check_paging(page, page_size)
    role_clause = _role_filter(role)
    org = _live_organization(session, organization)
    if org is None:
        return Page([], 0)
    conditions = [Membership.organization_id == org.id, Membership.deleted.is_(False)]
    if role_clause is not None:
        conditions.append(role_clause)
    query = select(Membership).where(*conditions).order_by(Membership.created_at, Membership.user_id)
    rows, total = _page(session, query, page, page_size)
    view = _organization_view(org, _members_counts(session, [org.id]).get(org.id, 0))
    return Page([_membership_view(row, view) for row in rows], total)


def get_user_memberships(
    session: Session, user_id: str, *, page: int = 1, page_size: int = 10
) -> Page[MembershipView]:
    """The user's live memberships, by created_at then organization id."""
    check_paging(page, page_size)
    # No join on organizations: a deleted organization's memberships are tombstoned already.
    query = (
        select(Membership)
        .where(Membership.user_id == user_id, Membership.deleted.is_(False))
        .order_by(Membership.created_at, Membership.organization_id)
    )
    rows, total = _page(session, query, page, page_size)
    org_ids = sorted({row.organization_id for row in rows})
    orgs = {org.id: org for org in session.scalars(select(Organization).where(Organization.id.in_(org_ids)))}
    counts = _members_counts(session, org_ids)
    views = {org_id: _organization_view(org, counts.get(org_id, 0)) for org_id, org in orgs.items()}
    return Page([_membership_view(row, views.get(row.organization_id)) for row in rows], total)


def _invitation_view(row: Invitation, now_ms: int) -> InvitationView:
    return InvitationView(
        id=row.id,
        organization_id=row.organization_id,
        email_address=row.email_address,
        role=row.role,
        role_name=row.role_name,
        status=invitation_status(row.status, row.expires_at, now_ms),
        user_id=row.user_id,
        inviter_id=row.inviter_id,
        url=row.url,
        public_metadata=dict(row.public_metadata or {}),
        private_metadata=dict(row.private_metadata or {}),
        expires_at=row.expires_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def invitation_status(stored: str, expires_at: int | None, now_ms: int) -> str:
    """Clerk sends no expiry event: a pending invitation past ``expires_at`` reads as expired."""
    if stored == "pending" and expires_at is not None and expires_at <= now_ms:
        return "expired"
    return stored


def _status_clause(status: str, now_ms: int) -> ColumnElement[bool]:
    not_expired = or_(Invitation.expires_at.is_(None), Invitation.expires_at > now_ms)
    if status == "pending":
        return and_(Invitation.status == "pending", not_expired)
    if status == "expired":
        return and_(Invitation.status == "pending", Invitation.expires_at <= now_ms)
    return Invitation.status == status


def list_invitations(
    session: Session,
    organization: str,
    *,
    status: str | None = None,
    page: int = 1,
    page_size: int = 10,
    now_ms: int | None = None,
) -> Page[InvitationView]:
    """Invitations of the organization (id or slug), newest first; ``status`` may be ``expired``."""
    check_paging(page, page_size)
    if status is not None and status not in INVITATION_STATUSES:
        raise InvalidQueryError(f"status must be one of {', '.join(INVITATION_STATUSES)}, got {status!r}")
    now = _now(now_ms)
    org = _live_organization(session, organization)
    if org is None:
        return Page([], 0)
    conditions = [Invitation.organization_id == org.id, Invitation.deleted.is_(False)]
    if status is not None:
        conditions.append(_status_clause(status, now))
    query = select(Invitation).where(*conditions).order_by(Invitation.created_at.desc(), Invitation.id)
    rows, total = _page(session, query, page, page_size)
    return Page([_invitation_view(row, now) for row in rows], total)


def get_pending_invitations(
    session: Session,
    organization: str,
    *,
    page: int = 1,
    page_size: int = 10,
    now_ms: int | None = None,
) -> Page[InvitationView]:
    """Pending, unexpired invitations of the organization (id or slug), newest first."""
    return list_invitations(
        session, organization, status="pending", page=page, page_size=page_size, now_ms=now_ms
    )


def list_roles(session: Session, *, page: int = 1, page_size: int = 100) -> Page[RoleView]:
    """Live roles by key, each with its permissions as Permission objects where they are known."""
    check_paging(page, page_size)
    query = select(Role).where(Role.deleted.is_(False)).order_by(Role.key, Role.id)
    rows, total = _page(session, query, page, page_size)
    keys = sorted({key for row in rows for key in row.permissions or []})
    known = {
        permission.key: permission
        for permission in session.scalars(
            select(Permission).where(Permission.key.in_(keys), Permission.deleted.is_(False))
        )
        if permission.key is not None
    }

    def permission_view(key: str) -> PermissionView:
        found = known.get(key)
        if found is None:
            return PermissionView(key=key)
        return PermissionView(
            key=key, id=found.id, name=found.name, description=found.description, type=found.type
        )

    views = [
        RoleView(
            id=row.id,
            key=row.key,
            name=row.name,
            description=row.description,
            is_creator_eligible=row.is_creator_eligible,
            permissions=[permission_view(key) for key in row.permissions or []],
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for row in rows
    ]
    return Page(views, total)
