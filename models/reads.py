"""The one read layer: Clerk's list and get calls over the mirror, for every entry point.

HTTP (``api``), the Python API (``orgsync.api``), the command line and the submission
service all read through here. Each function takes a session and the filters of the
matching Backend API endpoint, with Clerk's paging (``limit`` 1..500, ``offset`` >= 0) and
ordering (``order_by``: a field, optionally prefixed by ``+`` or ``-``; ties broken by
``created_at`` then id, in the same direction, as Clerk's listings). Each list costs a fixed
number of queries whatever the page size: rows, total, then one query per kind of related
data (organizations, counts, inviters), never one per row.

Shapes follow Clerk's (snake_case, epoch milliseconds). Tombstoned rows never show.
Invitation status ``expired`` is never stored: a pending invitation whose ``expires_at`` has
passed reads as expired. An organization is addressed by id or slug, as Clerk's
``/organizations/{id_or_slug}``. An unknown organization or user yields ``None`` from the
call that needs it, so that the HTTP layer can answer Clerk's 404; bad filters raise
``InvalidParameterError`` naming the parameter. Fields the mirror does not hold are left out
here and listed in ``models.render``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
from psycopg.types.json import set_json_loads
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
    event,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from models import clock
from models.db import make_session_factory
from models.errors import PermanentError
from models.tables import (
    ApiCall,
    Invitation,
    Membership,
    Notification,
    Organization,
    OrganizationDomain,
    Permission,
    Role,
    RoleSet,
    User,
)

T = TypeVar("T")

MAX_PAGE_SIZE = 500
MAX_FILTER_VALUES = 100
INVITATION_STATUSES = ("pending", "accepted", "revoked", "expired")
ORGANIZATION_ORDER = ("created_at", "name", "members_count")
MEMBERSHIP_ORDER = ("created_at", "email_address", "first_name", "last_name", "username", "phone_number")
INVITATION_ORDER = ("created_at", "email_address")
ROLE_ORDER = ("created_at", "name", "key")
PERMISSION_ORDER = ("created_at", "name", "key")
ROLE_SET_ORDER = ("created_at", "name", "key")
DOMAIN_ORDER = ("created_at", "name")
ENROLLMENT_MODES = ("manual_invitation", "automatic_invitation", "automatic_suggestion", "enterprise_sso")
USER_ORDER = ("created_at", "updated_at", "email_address", "first_name", "last_name", "username")


class InvalidQueryError(PermanentError, ValueError):
    """A read call with arguments out of range; also a ``ValueError`` for callers' convenience."""


class InvalidParameterError(InvalidQueryError):
    """A filter or paging argument out of range; ``param`` names it as Clerk's API does."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param
        self.detail = message


@dataclass(frozen=True)
class Listing(Generic[T]):
    """One page of a list and the number of matches across all pages (Clerk's ``total_count``)."""

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


@dataclass(frozen=True)
class Order:
    field: str
    descending: bool


@dataclass(frozen=True)
class CountedOrganizationView(OrganizationView):
    """An organization with the counts Clerk adds on request and inside memberships."""

    pending_invitations_count: int = 0


@dataclass(frozen=True)
class TimedPermissionView(PermissionView):
    created_at: int | None = None
    updated_at: int | None = None


@dataclass(frozen=True)
class InvitationDetailView(InvitationView):
    """An invitation with its inviter's public data (from the mirrored users) and its organization's."""

    public_inviter_data: dict[str, Any] | None = None
    public_organization_data: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class UserView:
    """A user as the mirror holds it: public data, external id, every email address (primary
    first), ban and lock state and last activity; no phones, no private metadata."""

    id: str
    identifier: str | None
    external_id: str | None
    email_addresses: list[str]
    banned: bool
    locked: bool
    last_active_at: int | None
    username: str | None
    first_name: str | None
    last_name: str | None
    image_url: str | None
    has_image: bool
    public_metadata: dict[str, Any]
    created_at: int | None
    updated_at: int | None


@dataclass(frozen=True)
class RoleSetItemView:
    """A role of a role set, with the role's fields where the mirror holds a live role of that key."""

    key: str
    id: str | None = None
    name: str | None = None
    description: str | None = None
    created_at: int | None = None
    updated_at: int | None = None


@dataclass(frozen=True)
class RoleSetView:
    id: str
    key: str | None
    name: str | None
    description: str | None
    type: str | None
    roles: list[RoleSetItemView]
    default_role: RoleSetItemView | None
    creator_role: RoleSetItemView | None
    created_at: int | None
    updated_at: int | None


@dataclass(frozen=True)
class DomainView:
    """An organization domain; of its verification the mirror holds the status only."""

    id: str
    organization_id: str
    name: str | None
    enrollment_mode: str | None
    affiliation_email_address: str | None
    verification_status: str | None
    total_pending_invitations: int
    total_pending_suggestions: int
    public_organization_data: dict[str, Any] | None
    created_at: int | None
    updated_at: int | None


# What a JSON object's values are when it holds no float and nothing to walk into.
_JSON_SCALARS = frozenset((str, int, bool, type(None)))


def _holds_float(value: Any) -> bool:
    """Whether a parsed JSON value holds a float anywhere (walked without recursion)."""
    if type(value) is dict and _JSON_SCALARS.issuperset(map(type, value.values())):
        return False  # the usual flat object, judged without a walk
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is float:
            return True
        if kind is dict:
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
    return False


def _loads(data: bytes | str) -> Any:
    """JSON columns as psycopg hands them over, or as text: orjson, a fraction of the standard
    library's time (a page of 100 memberships holds 400 JSON values). orjson reads an integer
    beyond 64 bits as a float: a value holding a float is read again by the standard library,
    which keeps every number exact (rare, and cheaper than searching every text for digits)."""
    value = orjson.loads(data)
    if _holds_float(value):
        return json.loads(data)
    return value


def _fast_json(dbapi_connection: Any, _record: Any) -> None:
    set_json_loads(_loads, dbapi_connection)


def _read_engine(engine: Engine) -> Engine:
    """The engine reads go through: on PostgreSQL in autocommit, so that a request costs one
    round trip per statement, without BEGIN and ROLLBACK around them. Each statement sees the
    latest commit; a page's rows and its total come from one statement, so they always agree.
    Its connections parse JSON columns with ``_loads``."""
    if engine.dialect.name != "postgresql":
        return engine
    if not event.contains(engine, "connect", _fast_json):
        event.listen(engine, "connect", _fast_json)
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def read_sessions(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reads, on ``_read_engine``."""
    return make_session_factory(_read_engine(engine))


def read_connections(engine: Engine) -> Callable[[], Connection]:
    """Connections for the hottest reads (``models.render.membership_page``), on ``_read_engine``
    without a session around them, which costs about as much as one of their statements."""
    return _read_engine(engine).connect


# ------------------------------------------------------------------ arguments
def check_window(limit: int, offset: int) -> None:
    """Clerk's paging: ``1 <= limit <= 500`` and ``offset >= 0``."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidParameterError("limit", f"must be a whole number from 1 to {MAX_PAGE_SIZE}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidParameterError("offset", "must be a whole number greater than or equal to 0")


def page_window(page: int, page_size: int) -> tuple[int, int]:
    """``(limit, offset)`` of page ``page`` (from 1) of ``page_size`` rows, for page-numbered callers."""
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise InvalidParameterError("page", "must be a whole number greater than or equal to 1")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidParameterError("page_size", f"must be a whole number from 1 to {MAX_PAGE_SIZE}")
    return page_size, (page - 1) * page_size


def parse_order(order_by: str | None, allowed: Sequence[str], default: str = "-created_at") -> Order:
    """``name``, ``+name`` (ascending) or ``-name`` (descending), ``name`` one of ``allowed``."""
    value = (order_by or default).strip()
    descending = value.startswith("-")
    name = value[1:] if value[:1] in "+-" and value else value
    if name not in allowed:
        raise InvalidParameterError(
            "order_by", f"must be one of {', '.join(allowed)}, optionally prefixed by + or -"
        )
    return Order(name, descending)


def _values(param: str, values: Iterable[str]) -> list[str]:
    items = [value for value in values if value]
    if len(items) > MAX_FILTER_VALUES:
        raise InvalidParameterError(param, f"accepts at most {MAX_FILTER_VALUES} values")
    return items


def _split_signed(param: str, values: Iterable[str]) -> tuple[list[str], list[str]]:
    """Clerk's ``+id`` (include, also the default) and ``-id`` (exclude) lists."""
    include: list[str] = []
    exclude: list[str] = []
    for value in _values(param, values):
        if value.startswith("-"):
            exclude.append(value[1:])
        else:
            include.append(value.removeprefix("+"))
    return include, exclude


def _contains(column: Any, text: str) -> ColumnElement[bool]:
    result: ColumnElement[bool] = func.lower(column).contains(text.lower(), autoescape=True)
    return result


def _ordered(query: Select[Any], order: Order, key: Any, created_at: Any, ident: Any) -> Select[Any]:
    # Clerk's order: NULLs first ascending (last descending), then created_at and id the same way.
    if order.descending:
        return query.order_by(key.desc().nulls_last(), created_at.desc().nulls_last(), ident.desc())
    return query.order_by(key.asc().nulls_first(), created_at.asc().nulls_first(), ident.asc())


def _window(session: Session, query: Select[Any], limit: int, offset: int) -> tuple[list[Any], int]:
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    rows = list(session.scalars(query.limit(limit).offset(offset))) if total > offset else []
    return rows, int(total)


# -------------------------------------------------------------- organizations
def _live_org_row(session: Session, id_or_slug: str) -> Organization | None:
    live = Organization.deleted.is_(False)
    row = session.scalars(select(Organization).where(Organization.id == id_or_slug, live)).first()
    if row is None:
        row = session.scalars(
            select(Organization)
            .where(Organization.slug == id_or_slug, live)
            .order_by(Organization.created_at.desc(), Organization.id)
        ).first()
    return row


def _counts(session: Session, org_ids: Sequence[str], now_ms: int) -> tuple[dict[str, int], dict[str, int]]:
    """Live members and pending (unexpired) invitations of each organization: one round trip."""
    if not org_ids:
        return {}, {}
    members = (
        select(Membership.organization_id, literal("m").label("kind"), func.count())
        .where(Membership.organization_id.in_(org_ids), Membership.deleted.is_(False))
        .group_by(Membership.organization_id)
    )
    pending = (
        select(Invitation.organization_id, literal("p").label("kind"), func.count())
        .where(
            Invitation.organization_id.in_(org_ids),
            Invitation.deleted.is_(False),
            Invitation.status == "pending",
            or_(Invitation.expires_at.is_(None), Invitation.expires_at > now_ms),
        )
        .group_by(Invitation.organization_id)
    )
    found: dict[str, dict[str, int]] = {"m": {}, "p": {}}
    for org_id, kind, count in session.execute(union_all(members, pending)):
        found[kind][org_id] = int(count)
    return found["m"], found["p"]


def organization_records(
    session: Session, rows: Sequence[Organization], now_ms: int
) -> dict[str, CountedOrganizationView]:
    """Views of organization rows by id, with their member and pending-invitation counts."""
    ids = [row.id for row in rows]
    members, pending = _counts(session, ids, now_ms)
    return {row.id: counted_view(row, members.get(row.id, 0), pending.get(row.id, 0)) for row in rows}


def counted_view(row: Any, members: int, pending: int) -> CountedOrganizationView:
    """The view of an organization row (ORM object or plain row) with its live counts."""
    return CountedOrganizationView(
        id=row.id,
        name=row.name,
        slug=row.slug,
        image_url=row.image_url,
        has_image=bool(row.has_image),
        max_allowed_memberships=row.max_allowed_memberships,
        admin_delete_enabled=row.admin_delete_enabled,
        members_count=int(members),
        created_by=row.created_by,
        public_metadata=dict(row.public_metadata or {}),
        private_metadata=dict(row.private_metadata or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
        pending_invitations_count=int(pending),
    )


def _now(now_ms: int | None) -> int:
    return clock.now_ms() if now_ms is None else now_ms


def invitation_status(stored: str, expires_at: int | None, now_ms: int) -> str:
    """Clerk sends no expiry event: a pending invitation past ``expires_at`` reads as expired."""
    if stored == "pending" and expires_at is not None and expires_at <= now_ms:
        return "expired"
    return stored


def organization_id(session: Session, id_or_slug: str) -> str | None:
    """The id of the live organization with this id or slug, or None: no counts, one small query."""
    row = _live_org_row(session, id_or_slug)
    return None if row is None else row.id


def get_organization(
    session: Session, id_or_slug: str, *, now_ms: int | None = None
) -> CountedOrganizationView | None:
    """The live organization with this id or slug, or None."""
    row = _live_org_row(session, id_or_slug)
    if row is None:
        return None
    return organization_records(session, [row], _now(now_ms))[row.id]


def list_organizations(
    session: Session,
    *,
    limit: int = 10,
    offset: int = 0,
    order_by: str | None = None,
    query: str | None = None,
    user_ids: Sequence[str] = (),
    organization_ids: Sequence[str] = (),
    now_ms: int | None = None,
) -> Listing[CountedOrganizationView]:
    """Live organizations; ``query`` matches the id exactly or the name or slug in part."""
    check_window(limit, offset)
    order = parse_order(order_by, ORGANIZATION_ORDER)
    include_users, exclude_users = _split_signed("user_id", user_ids)
    include_orgs, exclude_orgs = _split_signed("organization_id", organization_ids)
    conditions: list[ColumnElement[bool]] = [Organization.deleted.is_(False)]
    if query:
        conditions.append(
            or_(
                Organization.id == query,
                _contains(Organization.name, query),
                _contains(Organization.slug, query),
            )
        )

    def with_member(users: list[str]) -> Select[Any]:
        return select(Membership.organization_id).where(
            Membership.user_id.in_(users), Membership.deleted.is_(False)
        )

    if include_users:
        conditions.append(Organization.id.in_(with_member(include_users)))
    if exclude_users:
        conditions.append(Organization.id.not_in(with_member(exclude_users)))
    if include_orgs:
        conditions.append(Organization.id.in_(include_orgs))
    if exclude_orgs:
        conditions.append(Organization.id.not_in(exclude_orgs))
    statement = select(Organization).where(*conditions)
    key: Any
    if order.field == "members_count":
        counts = (
            select(Membership.organization_id.label("org_id"), func.count().label("n"))
            .where(Membership.deleted.is_(False))
            .group_by(Membership.organization_id)
            .subquery()
        )
        statement = statement.outerjoin(counts, counts.c.org_id == Organization.id)
        key = func.coalesce(counts.c.n, 0)
    else:
        key = getattr(Organization, order.field)
    statement = _ordered(statement, order, key, Organization.created_at, Organization.id)
    rows, total = _window(session, statement, limit, offset)
    records = organization_records(session, rows, _now(now_ms))
    return Listing([records[row.id] for row in rows], total)


# ---------------------------------------------------------------- memberships
# A membership row as the views read it: every column of the table.
MEMBERSHIP_COLUMNS: tuple[ColumnElement[Any], ...] = tuple(Membership.__table__.c)
# Their names, then the selection's total that rides on each row.
MEMBERSHIP_COLUMN_NAMES = (*(column.name for column in Membership.__table__.c), "total_count")


def _user_data_field(name: str) -> Any:
    return Membership.public_user_data[name].as_string()


def stored_object(value: Any) -> dict[str, Any]:
    """A JSON column that should hold an object: a copy of it, or empty for anything else."""
    return dict(value) if isinstance(value, dict) else {}


def membership_user_data(
    stored: dict[str, Any] | str | None, user_id: str, identifier: str | None
) -> dict[str, Any]:
    """A membership's public user data: as stored (a dict, or its JSON text), with the user's id
    and, when the stored data has none, the membership's identifier."""
    # Text is parsed into a dict of its own; a dict handed over is copied, never changed.
    parsed = _loads(stored) if isinstance(stored, str) else stored
    user_data = parsed if isinstance(stored, str) and isinstance(parsed, dict) else stored_object(parsed)
    user_data["user_id"] = user_id
    user_data.setdefault("identifier", identifier)
    return user_data


def membership_views(
    session: Session,
    rows: Sequence[Any],
    now_ms: int,
    organizations: dict[str, CountedOrganizationView] | None = None,
) -> list[MembershipView]:
    """Views of membership rows: ORM objects or plain rows with the same column names;
    ``organizations`` are theirs when already read (else they are read here)."""
    orgs = organizations
    if orgs is None:
        orgs = counted_organizations(session.connection(), {row.organization_id for row in rows}, now_ms)
    views = []
    for row in rows:
        user_data = membership_user_data(row.public_user_data, row.user_id, row.identifier)
        views.append(
            MembershipView(
                id=row.id,
                organization_id=row.organization_id,
                user_id=row.user_id,
                role=row.role,
                role_name=row.role_name,
                permissions=list(row.permissions) if isinstance(row.permissions, list) else [],
                public_metadata=stored_object(row.public_metadata),
                private_metadata=stored_object(row.private_metadata),
                public_user_data=user_data,
                created_at=row.created_at,
                updated_at=row.updated_at,
                organization=orgs.get(row.organization_id),
            )
        )
    return views


def _user_exists(session: Session | Connection, user_id: str) -> bool:
    live_user = select(User.id).where(User.id == user_id, User.deleted.is_(False))
    if session.scalar(live_user) is not None:
        return True
    member = select(Membership.user_id).where(Membership.user_id == user_id, Membership.deleted.is_(False))
    return session.scalar(member.limit(1)) is not None


@dataclass(frozen=True)
class MembershipQuery:
    """The filters of Clerk's membership listings: of one organization (id or slug), of one
    user, or of the whole instance. ``created_at_before``/``_after`` are about the user's
    creation, as Clerk's, so they match only users the mirror holds."""

    organization: str | None = None
    user: str | None = None
    limit: int = 10
    offset: int = 0
    order_by: str | None = None
    roles: Sequence[str] = ()
    user_ids: Sequence[str] = ()
    email_addresses: Sequence[str] = ()
    usernames: Sequence[str] = ()
    query: str | None = None
    email_address_query: str | None = None
    username_query: str | None = None
    name_query: str | None = None
    created_at_before: int | None = None
    created_at_after: int | None = None


@dataclass(frozen=True)
class MembershipRows:
    """One page of a membership selection: its rows (plain tuples: the columns asked for, then
    the selection's total), the selection's total, and the page's organizations by id, with
    their counts."""

    rows: Sequence[Any]
    total_count: int
    organizations: dict[str, CountedOrganizationView]


# What a membership's ``query`` matches besides the user id and email; ``name_query`` the last two.
_NAME_FIELDS = ("username", "first_name", "last_name")


def _like_pattern(text: str) -> str:
    """``text`` anywhere, case-insensitively, for ``LIKE ... ESCAPE '/'`` on a lowered column."""
    escaped = text.lower().replace("/", "//").replace("%", "/%").replace("_", "/_")
    return f"%{escaped}%"


def _like(column: Any, param: str) -> ColumnElement[bool]:
    result: ColumnElement[bool] = func.lower(column).like(bindparam(param), escape="/")
    return result


@dataclass(frozen=True)
class _MembershipShape:
    """The form of a membership query's statement: the names of the values it binds (which
    filters it uses) and its order.

    A statement is built once per shape and columns and kept (SQLAlchemy then finds its
    compiled form at once); a query's values go in as bound parameters."""

    bound: frozenset[str]
    order: Order


def _membership_statements(
    shape: _MembershipShape, columns: Sequence[ColumnElement[Any]]
) -> tuple[Select[Any], Select[Any]]:
    """The page statement (with the selection's total on each row) and the count statement."""
    conditions: list[ColumnElement[bool]] = [Membership.deleted.is_(False)]
    if "org_id" in shape.bound:
        conditions.append(Membership.organization_id == bindparam("org_id"))
    if "user" in shape.bound:
        conditions.append(Membership.user_id == bindparam("user"))
    if "roles" in shape.bound:
        conditions.append(Membership.role.in_(bindparam("roles", expanding=True)))
    if "include_users" in shape.bound:
        conditions.append(Membership.user_id.in_(bindparam("include_users", expanding=True)))
    if "exclude_users" in shape.bound:
        conditions.append(Membership.user_id.not_in(bindparam("exclude_users", expanding=True)))
    if "emails" in shape.bound:
        conditions.append(func.lower(Membership.identifier).in_(bindparam("emails", expanding=True)))
    if "usernames" in shape.bound:
        conditions.append(_user_data_field("username").in_(bindparam("usernames", expanding=True)))
    if "query" in shape.bound:
        conditions.append(
            or_(
                Membership.user_id == bindparam("query"),
                _like(Membership.identifier, "query_like"),
                *(_like(_user_data_field(name), "query_like") for name in _NAME_FIELDS),
            )
        )
    if "email_address_like" in shape.bound:
        conditions.append(_like(Membership.identifier, "email_address_like"))
    if "username_like" in shape.bound:
        conditions.append(_like(_user_data_field("username"), "username_like"))
    if "name_like" in shape.bound:
        conditions.append(or_(*(_like(_user_data_field(name), "name_like") for name in _NAME_FIELDS[1:])))
    statement: Select[Any] = select(*columns, func.count().over().label("total_count"))
    if shape.bound & {"created_at_before", "created_at_after"}:
        statement = statement.join(User, and_(User.id == Membership.user_id, User.deleted.is_(False)))
        if "created_at_before" in shape.bound:
            conditions.append(User.created_at < bindparam("created_at_before"))
        if "created_at_after" in shape.bound:
            conditions.append(User.created_at > bindparam("created_at_after"))
    key: Any
    if shape.order.field == "created_at":
        key = Membership.created_at
    elif shape.order.field == "email_address":
        key = Membership.identifier
    elif shape.order.field == "phone_number":
        key = null()  # the mirror holds no phone numbers: all tie
    else:
        key = _user_data_field(shape.order.field)
    statement = _ordered(statement.where(*conditions), shape.order, key, Membership.created_at, Membership.id)
    count: Select[Any] = select(func.count()).select_from(statement.subquery())
    return statement.limit(bindparam("limit")).offset(bindparam("offset")), count


# Statements by (id of the columns, shape), each with its columns: an entry is used only when
# its columns are the very object asked for. Shapes are few (filters present x orders).
_MEMBERSHIP_STATEMENTS: dict[
    tuple[int, _MembershipShape], tuple[Sequence[ColumnElement[Any]], Select[Any], Select[Any]]
] = {}
_MAX_CACHED_STATEMENTS = 512


def _cached_membership_statements(
    shape: _MembershipShape, columns: Sequence[ColumnElement[Any]]
) -> tuple[Select[Any], Select[Any]]:
    found = _MEMBERSHIP_STATEMENTS.get((id(columns), shape))
    if found is not None and found[0] is columns:
        return found[1], found[2]
    page, count = _membership_statements(shape, columns)
    if len(_MEMBERSHIP_STATEMENTS) < _MAX_CACHED_STATEMENTS:
        _MEMBERSHIP_STATEMENTS[(id(columns), shape)] = (columns, page, count)
    return page, count


def _counted_organizations(*, members: bool = True) -> Select[Any]:
    """Organization rows with their live members (unless ``members`` is false: the caller
    counts them itself) and pending, unexpired invitations (as of the ``now_ms`` parameter):
    a page's organizations and their counts in one round trip."""
    counted = select(func.count()).where(
        Membership.organization_id == Organization.id, Membership.deleted.is_(False)
    )
    pending = select(func.count()).where(
        Invitation.organization_id == Organization.id,
        Invitation.deleted.is_(False),
        Invitation.status == "pending",
        or_(Invitation.expires_at.is_(None), Invitation.expires_at > bindparam("now_ms")),
    )
    return select(
        *Organization.__table__.c,
        *([counted.scalar_subquery().label("live_members_count")] if members else []),
        pending.scalar_subquery().label("live_pending_invitations_count"),
    )


def _organization_by_key(statement: Select[Any]) -> Select[Any]:
    """``statement`` narrowed to the live organization whose id or slug is the ``key`` parameter:
    the id first; else the newest organization with that slug, as ``_live_org_row``."""
    return (
        statement.where(
            or_(Organization.id == bindparam("key"), Organization.slug == bindparam("key")),
            Organization.deleted.is_(False),
        )
        .order_by(
            (Organization.id == bindparam("key")).desc(), Organization.created_at.desc(), Organization.id
        )
        .limit(1)
    )


_COUNTED_ORGANIZATION = _organization_by_key(_counted_organizations())
# For a page of all its live memberships, whose total is their count.
_PAGED_ORGANIZATION = _organization_by_key(_counted_organizations(members=False))
_COUNTED_ORGANIZATIONS = _counted_organizations().where(Organization.id.in_(bindparam("ids", expanding=True)))


def counted_organizations(
    connection: Connection, ids: Iterable[str], now_ms: int
) -> dict[str, CountedOrganizationView]:
    """Organizations by id, live or not (a membership row names it, so it is shown), with their
    live counts as of ``now_ms``: one statement, none when ``ids`` is empty."""
    wanted = sorted(ids)
    if not wanted:
        return {}
    found = connection.execute(_COUNTED_ORGANIZATIONS, {"ids": wanted, "now_ms": now_ms})
    return {
        org.id: counted_view(org, org.live_members_count, org.live_pending_invitations_count) for org in found
    }


@dataclass(frozen=True)
class _DriverStatement:
    """A statement as the driver takes it: its SQL, the values it binds itself (literals), and
    its columns' names."""

    sql: str
    literals: dict[str, Any]
    names: tuple[str, ...]


# Per statement object (kept alive by the entry) and kind of dialect: its driver form, or None
# when it needs SQLAlchemy's processing (a value or column type with a processor, an expanding
# parameter) or the database is not PostgreSQL.
_DRIVER_STATEMENTS: dict[tuple[int, type], tuple[Select[Any], _DriverStatement | None]] = {}


def _driver_statement(statement: Select[Any], dialect: Any) -> _DriverStatement | None:
    key = (id(statement), type(dialect))
    found = _DRIVER_STATEMENTS.get(key)
    if found is not None and found[0] is statement:
        return found[1]
    compiled: Any = statement.compile(dialect=dialect)
    plain = (
        dialect.name == "postgresql"
        and dialect.paramstyle == "pyformat"
        and not compiled.post_compile_params
        and all(
            bind.type.dialect_impl(dialect).bind_processor(dialect) is None
            for bind in compiled.binds.values()
        )
        and all(
            column.type.dialect_impl(dialect).result_processor(dialect, None) is None
            for column in statement.selected_columns
        )
    )
    driver = None
    if plain:
        literals = {
            compiled.bind_names[bind]: bind.value
            for bind in compiled.binds.values()
            if not bind.required and bind.callable is None
        }
        driver = _DriverStatement(compiled.string, literals, tuple(statement.selected_columns.keys()))
    if len(_DRIVER_STATEMENTS) < _MAX_CACHED_STATEMENTS:
        _DRIVER_STATEMENTS[key] = (statement, driver)
    return driver


class _Record:
    """A row fetched straight from the driver, its columns read by name as a ``Row``'s."""

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        self.__dict__.update(zip(names, values, strict=True))


def _fetch(connection: Connection, statement: Select[Any], values: dict[str, Any]) -> Sequence[Any]:
    """The rows of ``statement`` as plain tuples, in the order of its columns.

    On PostgreSQL a statement that needs no processing by SQLAlchemy (the values and columns
    go to and from the driver as they are) runs on the driver's own cursor: SQLAlchemy's
    execution and result machinery cost more CPU than the statement itself on the hot reads.
    Driver errors are raised as SQLAlchemy's, the connection invalidated on a disconnect, as
    ``Connection.execute`` does."""
    dialect = connection.dialect
    driver = _driver_statement(statement, dialect)
    if driver is None:
        return [tuple(row) for row in connection.execute(statement, values)]
    dbapi_connection: Any = connection.connection.dbapi_connection
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(driver.sql, {**driver.literals, **values})
        rows: list[tuple[Any, ...]] = cursor.fetchall()
    except dialect.loaded_dbapi.Error as exc:
        disconnected = bool(dialect.is_disconnect(exc, dbapi_connection, cursor))
        if disconnected:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            driver.sql,
            values,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=disconnected,
            dialect=dialect,
        ) from exc
    finally:
        cursor.close()
    return rows


def _fetch_record(connection: Connection, statement: Select[Any], values: dict[str, Any]) -> Any:
    """The first row of ``statement`` with its columns by name, or None."""
    driver = _driver_statement(statement, connection.dialect)
    if driver is None:
        return connection.execute(statement, values).first()
    rows = _fetch(connection, statement, values)
    return _Record(driver.names, rows[0]) if rows else None


def select_memberships(
    session: Session | Connection,
    q: MembershipQuery,
    columns: Sequence[ColumnElement[Any]],
    *,
    now_ms: int | None = None,
) -> MembershipRows | None:
    """The page of live memberships ``q`` selects, each row holding ``columns`` (pass the same
    sequence object each time: statements are kept per object), with its organizations.

    None when the organization or user named is unknown. The rows and the total come from one
    statement (the total rides on each row), so they always agree; on a page of all of one
    organization's live memberships that total is also the organization's members count,
    which is then not counted a second time."""
    check_window(q.limit, q.offset)
    order = parse_order(q.order_by, MEMBERSHIP_ORDER)
    now = _now(now_ms)
    connection = session if isinstance(session, Connection) else session.connection()
    values: dict[str, Any] = {"limit": q.limit, "offset": q.offset}
    include_users, exclude_users = _split_signed("user_id", q.user_ids)
    optional: dict[str, Any] = {
        "roles": _values("role", q.roles),
        "include_users": include_users,
        "exclude_users": exclude_users,
        "emails": [email.lower() for email in _values("email_address", q.email_addresses)],
        "usernames": _values("username", q.usernames),
        "query": q.query or None,
        "email_address_like": _like_pattern(q.email_address_query) if q.email_address_query else None,
        "username_like": _like_pattern(q.username_query) if q.username_query else None,
        "name_like": _like_pattern(q.name_query) if q.name_query else None,
        "created_at_before": q.created_at_before,
        "created_at_after": q.created_at_after,
    }
    values.update((name, value) for name, value in optional.items() if value is not None and value != [])
    if q.query:
        values["query_like"] = _like_pattern(q.query)
    organizations: dict[str, CountedOrganizationView] = {}
    # All of one organization's live memberships: the page's total is its members count.
    whole = q.organization is not None and q.user is None and values.keys() == {"limit", "offset"}
    org: Any = None
    if q.organization is not None:
        statement = _PAGED_ORGANIZATION if whole else _COUNTED_ORGANIZATION
        org = _fetch_record(connection, statement, {"key": q.organization, "now_ms": now})
        if org is None:
            return None
        if not whole:
            counts = (org.live_members_count, org.live_pending_invitations_count)
            organizations[org.id] = counted_view(org, *counts)
        values["org_id"] = org.id
    if q.user is not None:
        if not _user_exists(session, q.user):
            return None
        values["user"] = q.user
    shape = _MembershipShape(frozenset(values), order)
    page, count = _cached_membership_statements(shape, columns)
    rows = _fetch(connection, page, values)
    if rows:
        total = int(rows[0][-1])
    elif q.offset == 0:
        total = 0
    else:  # past the end: the rows that would carry the total are not there
        total = int(_fetch(connection, count, values)[0][0] or 0)
    if whole:
        organizations[org.id] = counted_view(org, total, org.live_pending_invitations_count)
    if "org_id" in values:  # every row is of that organization
        others: set[str] = set()
    else:
        at = list(page.selected_columns.keys()).index("organization_id")
        others = {row[at] for row in rows} - organizations.keys()
    organizations.update(counted_organizations(connection, others, now))
    return MembershipRows(rows, total, organizations)


def membership_listing(
    session: Session, q: MembershipQuery, *, now_ms: int | None = None
) -> Listing[MembershipView] | None:
    """The memberships ``q`` selects, as views; None when its organization or user is unknown."""
    found = select_memberships(session, q, MEMBERSHIP_COLUMNS, now_ms=now_ms)
    if found is None:
        return None
    names = MEMBERSHIP_COLUMN_NAMES
    rows = [_Record(names, row) for row in found.rows]
    return Listing(membership_views(session, rows, _now(now_ms), found.organizations), found.total_count)


def list_memberships(
    session: Session, *, now_ms: int | None = None, **filters: Any
) -> Listing[MembershipView] | None:
    """``membership_listing`` with the fields of ``MembershipQuery`` as keywords."""
    return membership_listing(session, MembershipQuery(**filters), now_ms=now_ms)


# ---------------------------------------------------------------- invitations
def _status_condition(status: str, now_ms: int) -> ColumnElement[bool]:
    not_expired = or_(Invitation.expires_at.is_(None), Invitation.expires_at > now_ms)
    if status == "pending":
        return and_(Invitation.status == "pending", not_expired)
    if status == "expired":
        return and_(Invitation.status == "pending", Invitation.expires_at <= now_ms)
    return Invitation.status == status


def _public_users(session: Session, user_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    ids = sorted(set(user_ids))
    if not ids:
        return {}
    rows = session.scalars(select(User).where(User.id.in_(ids), User.deleted.is_(False)))
    return {
        row.id: {
            "user_id": row.id,
            "first_name": row.first_name,
            "last_name": row.last_name,
            "image_url": row.image_url,
            "has_image": bool(row.has_image),
            "identifier": row.identifier,
        }
        for row in rows
    }


def _public_organizations(session: Session, org_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    ids = sorted(set(org_ids))
    if not ids:
        return {}
    return {
        org.id: {
            "id": org.id,
            "name": org.name,
            "slug": org.slug,
            "image_url": org.image_url,
            "has_image": bool(org.has_image),
        }
        for org in session.scalars(select(Organization).where(Organization.id.in_(ids)))
    }


def invitation_records(
    session: Session, rows: Sequence[Invitation], now_ms: int
) -> list[InvitationDetailView]:
    """Views of invitation rows in order, with their status at ``now_ms`` and their organization."""
    inviters = _public_users(session, (row.inviter_id for row in rows if row.inviter_id))
    orgs = _public_organizations(session, (row.organization_id for row in rows))
    return [
        InvitationDetailView(
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
            public_inviter_data=inviters.get(row.inviter_id) if row.inviter_id else None,
            public_organization_data=orgs.get(row.organization_id),
        )
        for row in rows
    ]


def _user_emails(session: Session, user_id: str) -> list[str]:
    found = session.scalar(select(User.identifier).where(User.id == user_id, User.deleted.is_(False)))
    emails = {found.lower()} if found else set()
    emails.update(
        identifier.lower()
        for identifier in session.scalars(
            select(Membership.identifier).where(Membership.user_id == user_id, Membership.deleted.is_(False))
        )
        if identifier
    )
    return sorted(emails)


def list_invitations(
    session: Session,
    *,
    organization: str | None = None,
    user: str | None = None,
    limit: int = 10,
    offset: int = 0,
    order_by: str | None = None,
    status: str | Sequence[str] | None = None,
    email_address: str | None = None,
    query: str | None = None,
    now_ms: int | None = None,
) -> Listing[InvitationDetailView] | None:
    """Invitations of one organization (id or slug), of one user, or of the whole instance.

    A user's invitations are those sent to the user's email or accepted by the user. None when
    the organization or user named is unknown. ``status`` is one or several statuses (any
    matches); ``expired`` is derived from ``expires_at``.
    """
    check_window(limit, offset)
    order = parse_order(order_by, INVITATION_ORDER)
    statuses = _values("status", [status] if isinstance(status, str) else status or ())
    if any(item not in INVITATION_STATUSES for item in statuses):
        raise InvalidParameterError("status", f"must be one of {', '.join(INVITATION_STATUSES)}")
    now = _now(now_ms)
    conditions: list[ColumnElement[bool]] = [Invitation.deleted.is_(False)]
    if organization is not None:
        org = _live_org_row(session, organization)
        if org is None:
            return None
        conditions.append(Invitation.organization_id == org.id)
    if user is not None:
        if not _user_exists(session, user):
            return None
        emails = _user_emails(session, user)
        mine = Invitation.user_id == user
        conditions.append(or_(mine, func.lower(Invitation.email_address).in_(emails)) if emails else mine)
    if statuses:
        conditions.append(or_(*(_status_condition(item, now) for item in statuses)))
    if email_address:
        conditions.append(func.lower(Invitation.email_address) == email_address.lower())
    if query:
        conditions.append(_contains(Invitation.email_address, query))
    key = getattr(Invitation, order.field)
    statement = _ordered(
        select(Invitation).where(*conditions), order, key, Invitation.created_at, Invitation.id
    )
    rows, total = _window(session, statement, limit, offset)
    return Listing(invitation_records(session, rows, now), total)


def get_invitation(
    session: Session, organization: str, invitation_id: str, *, now_ms: int | None = None
) -> InvitationDetailView | None:
    """One invitation of the live organization (id or slug), or None."""
    org = _live_org_row(session, organization)
    if org is None:
        return None
    row = session.scalars(
        select(Invitation).where(
            Invitation.id == invitation_id,
            Invitation.organization_id == org.id,
            Invitation.deleted.is_(False),
        )
    ).first()
    return None if row is None else invitation_records(session, [row], _now(now_ms))[0]


# ------------------------------------------------------- roles and permissions
def _permission_record(row: Permission) -> TimedPermissionView:
    return TimedPermissionView(
        key=row.key or "",
        id=row.id,
        name=row.name,
        description=row.description,
        type=row.type,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _catalogue_query(table: type[Role] | type[Permission], order: Order, query: str | None) -> Select[Any]:
    conditions: list[ColumnElement[bool]] = [table.deleted.is_(False)]
    if query:
        conditions.append(or_(table.id == query, _contains(table.name, query), _contains(table.key, query)))
    column: Any = getattr(table, order.field)
    return _ordered(select(table).where(*conditions), order, column, table.created_at, table.id)


def _role_views(session: Session, rows: Sequence[Role]) -> list[RoleView]:
    keys = sorted({key for row in rows for key in row.permissions or []})
    known = {
        row.key: _permission_record(row)
        for row in (
            session.scalars(select(Permission).where(Permission.key.in_(keys), Permission.deleted.is_(False)))
            if keys
            else []
        )
        if row.key is not None
    }
    return [
        RoleView(
            id=row.id,
            key=row.key,
            name=row.name,
            description=row.description,
            is_creator_eligible=row.is_creator_eligible,
            permissions=[known.get(key) or PermissionView(key=key) for key in row.permissions or []],
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for row in rows
    ]


def get_role(session: Session, role_id: str) -> RoleView | None:
    """The live role with this id, or None."""
    row = session.scalars(select(Role).where(Role.id == role_id, Role.deleted.is_(False))).first()
    return None if row is None else _role_views(session, [row])[0]


def get_permission(session: Session, permission_id: str) -> TimedPermissionView | None:
    """The live permission with this id, or None."""
    row = session.scalars(
        select(Permission).where(Permission.id == permission_id, Permission.deleted.is_(False))
    ).first()
    return None if row is None else _permission_record(row)


def list_roles(
    session: Session,
    *,
    limit: int = 10,
    offset: int = 0,
    order_by: str | None = None,
    query: str | None = None,
) -> Listing[RoleView]:
    """Live roles, each with its permissions as full Permission objects where the mirror knows them."""
    check_window(limit, offset)
    order = parse_order(order_by, ROLE_ORDER)
    rows, total = _window(session, _catalogue_query(Role, order, query), limit, offset)
    return Listing(_role_views(session, rows), total)


def list_permissions(
    session: Session,
    *,
    limit: int = 10,
    offset: int = 0,
    order_by: str | None = None,
    query: str | None = None,
) -> Listing[TimedPermissionView]:
    """Live permissions; ``query`` matches the id exactly or the name or key in part."""
    check_window(limit, offset)
    order = parse_order(order_by, PERMISSION_ORDER)
    rows, total = _window(session, _catalogue_query(Permission, order, query), limit, offset)
    return Listing([_permission_record(row) for row in rows], total)


# ------------------------------------------------------------------ role sets
def _role_set_views(session: Session, rows: Sequence[RoleSet]) -> list[RoleSetView]:
    keys = sorted(
        {key for row in rows for key in row.role_keys or []}
        | {key for row in rows for key in (row.default_role_key, row.creator_role_key) if key}
    )
    known = {
        role.key: RoleSetItemView(
            key=role.key,
            id=role.id,
            name=role.name,
            description=role.description,
            created_at=role.created_at,
            updated_at=role.updated_at,
        )
        for role in (
            session.scalars(select(Role).where(Role.key.in_(keys), Role.deleted.is_(False))) if keys else []
        )
        if role.key is not None
    }

    def item(key: str | None) -> RoleSetItemView | None:
        return None if key is None else known.get(key) or RoleSetItemView(key=key)

    views = []
    for row in rows:
        roles = [found for found in (item(key) for key in row.role_keys or []) if found is not None]
        views.append(
            RoleSetView(
                id=row.id,
                key=row.key,
                name=row.name,
                description=row.description,
                type=row.type,
                roles=roles,
                default_role=item(row.default_role_key),
                creator_role=item(row.creator_role_key),
                created_at=row.created_at,
                updated_at=row.updated_at,
            )
        )
    return views


def get_role_set(session: Session, key_or_id: str) -> RoleSetView | None:
    """The live role set with this key or id, or None."""
    live = RoleSet.deleted.is_(False)
    row = session.scalars(select(RoleSet).where(RoleSet.id == key_or_id, live)).first()
    if row is None:
        row = session.scalars(
            select(RoleSet).where(RoleSet.key == key_or_id, live).order_by(RoleSet.created_at.desc())
        ).first()
    return None if row is None else _role_set_views(session, [row])[0]


def list_role_sets(
    session: Session,
    *,
    limit: int = 10,
    offset: int = 0,
    order_by: str | None = None,
    query: str | None = None,
) -> Listing[RoleSetView]:
    """Live role sets; ``query`` matches the id exactly or the name or key in part."""
    check_window(limit, offset)
    order = parse_order(order_by, ROLE_SET_ORDER)
    conditions: list[ColumnElement[bool]] = [RoleSet.deleted.is_(False)]
    if query:
        conditions.append(
            or_(RoleSet.id == query, _contains(RoleSet.name, query), _contains(RoleSet.key, query))
        )
    key: Any = getattr(RoleSet, order.field)
    statement = _ordered(select(RoleSet).where(*conditions), order, key, RoleSet.created_at, RoleSet.id)
    rows, total = _window(session, statement, limit, offset)
    return Listing(_role_set_views(session, rows), total)


# -------------------------------------------------------- organization domains
def _domain_views(session: Session, rows: Sequence[OrganizationDomain]) -> list[DomainView]:
    orgs = _public_organizations(session, (row.organization_id for row in rows))
    return [
        DomainView(
            id=row.id,
            organization_id=row.organization_id,
            name=row.name,
            enrollment_mode=row.enrollment_mode,
            affiliation_email_address=row.affiliation_email_address,
            verification_status=row.verification_status,
            total_pending_invitations=row.total_pending_invitations or 0,
            total_pending_suggestions=row.total_pending_suggestions or 0,
            public_organization_data=orgs.get(row.organization_id),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for row in rows
    ]


def _enrollment_modes(values: Iterable[str]) -> tuple[list[str], list[str]]:
    # Clerk takes one value, a comma-separated list or repeated values, each optionally ``-``.
    items = [part.strip() for value in values for part in value.split(",") if part.strip()]
    include, exclude = _split_signed("enrollment_mode", items)
    if any(mode not in ENROLLMENT_MODES for mode in include + exclude):
        raise InvalidParameterError(
            "enrollment_mode", f"must be one of {', '.join(ENROLLMENT_MODES)}, optionally prefixed by -"
        )
    return include, exclude


def list_domains(
    session: Session,
    *,
    organization: str | None = None,
    limit: int = 10,
    offset: int = 0,
    order_by: str | None = None,
    organization_ids: Sequence[str] = (),
    verified: bool | None = None,
    enrollment_modes: Sequence[str] = (),
    query: str | None = None,
    domains: Sequence[str] = (),
) -> Listing[DomainView] | None:
    """Live domains of one organization (id or slug) or of the whole instance.

    None when the organization named is unknown. ``verified`` is about the affiliation
    verification; ``query`` starting with ``org_`` matches the organization id exactly,
    otherwise the domain name in part (an empty or blank ``query`` is refused, as Clerk's).
    """
    check_window(limit, offset)
    order = parse_order(order_by, DOMAIN_ORDER)
    include_modes, exclude_modes = _enrollment_modes(enrollment_modes)
    names = [name.lower() for name in _values("domains", domains)]
    orgs = _values("organization_id", organization_ids)
    conditions: list[ColumnElement[bool]] = [OrganizationDomain.deleted.is_(False)]
    if organization is not None:
        org = _live_org_row(session, organization)
        if org is None:
            return None
        conditions.append(OrganizationDomain.organization_id == org.id)
    if orgs:
        conditions.append(OrganizationDomain.organization_id.in_(orgs))
    if verified is True:
        conditions.append(OrganizationDomain.verification_status == "verified")
    elif verified is False:
        conditions.append(
            or_(
                OrganizationDomain.verification_status.is_(None),
                OrganizationDomain.verification_status != "verified",
            )
        )
    if include_modes:
        conditions.append(OrganizationDomain.enrollment_mode.in_(include_modes))
    if exclude_modes:
        conditions.append(
            or_(
                OrganizationDomain.enrollment_mode.is_(None),
                OrganizationDomain.enrollment_mode.not_in(exclude_modes),
            )
        )
    if names:
        conditions.append(func.lower(OrganizationDomain.name).in_(names))
    if query is not None:
        text = query.strip()
        if not text:
            raise InvalidParameterError("query", "must not be empty or blank")
        if text.startswith("org_"):
            conditions.append(OrganizationDomain.organization_id == text)
        else:
            conditions.append(_contains(OrganizationDomain.name, text))
    key: Any = getattr(OrganizationDomain, order.field)
    statement = _ordered(
        select(OrganizationDomain).where(*conditions),
        order,
        key,
        OrganizationDomain.created_at,
        OrganizationDomain.id,
    )
    rows, total = _window(session, statement, limit, offset)
    return Listing(_domain_views(session, rows), total)


# ---------------------------------------------------------------------- users
def user_record(row: User) -> UserView:
    """The view of a user row: public data, external id, every email address, primary first."""
    emails = list(row.email_addresses or [])
    if not emails and row.identifier and "@" in row.identifier:
        emails = [row.identifier]  # a row written before every address was kept
    return UserView(
        id=row.id,
        identifier=row.identifier,
        external_id=row.external_id,
        email_addresses=emails,
        banned=bool(row.banned),
        locked=bool(row.locked),
        last_active_at=row.last_active_at,
        username=row.username,
        first_name=row.first_name,
        last_name=row.last_name,
        image_url=row.image_url,
        has_image=bool(row.has_image),
        public_metadata=dict(row.public_metadata or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def get_user(session: Session, user_id: str) -> UserView | None:
    """The live user, or None."""
    row = session.scalars(select(User).where(User.id == user_id, User.deleted.is_(False))).first()
    return None if row is None else user_record(row)


def list_users(
    session: Session,
    *,
    limit: int = 10,
    offset: int = 0,
    order_by: str | None = None,
    user_ids: Sequence[str] = (),
    email_addresses: Sequence[str] = (),
    usernames: Sequence[str] = (),
    organization_ids: Sequence[str] = (),
    query: str | None = None,
    created_at_before: int | None = None,
    created_at_after: int | None = None,
) -> Listing[UserView]:
    """Live users, with the filters of Clerk's user list that the mirror can answer."""
    check_window(limit, offset)
    order = parse_order(order_by, USER_ORDER)
    include_users, exclude_users = _split_signed("user_id", user_ids)
    include_orgs, exclude_orgs = _split_signed("organization_id", organization_ids)
    emails = [email.lower() for email in _values("email_address", email_addresses)]
    names = _values("username", usernames)
    conditions: list[ColumnElement[bool]] = [User.deleted.is_(False)]
    if include_users:
        conditions.append(User.id.in_(include_users))
    if exclude_users:
        conditions.append(User.id.not_in(exclude_users))
    if emails:
        conditions.append(func.lower(User.identifier).in_(emails))
    if names:
        conditions.append(User.username.in_(names))

    def member_of(orgs: list[str]) -> Select[Any]:
        return select(Membership.user_id).where(
            Membership.organization_id.in_(orgs), Membership.deleted.is_(False)
        )

    if include_orgs:
        conditions.append(User.id.in_(member_of(include_orgs)))
    if exclude_orgs:
        conditions.append(User.id.not_in(member_of(exclude_orgs)))
    if query:
        conditions.append(
            or_(
                User.id == query,
                _contains(User.identifier, query),
                _contains(User.username, query),
                _contains(User.first_name, query),
                _contains(User.last_name, query),
            )
        )
    if created_at_before is not None:
        conditions.append(User.created_at < created_at_before)
    if created_at_after is not None:
        conditions.append(User.created_at > created_at_after)
    column = User.identifier if order.field == "email_address" else getattr(User, order.field)
    statement = _ordered(select(User).where(*conditions), order, column, User.created_at, User.id)
    rows, total = _window(session, statement, limit, offset)
    return Listing([user_record(row) for row in rows], total)


# -------------------------------------------------------------------- console
@dataclass(frozen=True)
class AssignableRole:
    """A role an organization may give its members: its key and the name to show."""

    key: str
    name: str | None


def assignable_roles(session: Session, organization: str) -> list[AssignableRole] | None:
    """The roles the live organization (id or slug) may assign, or None when it is unknown.

    Those of the organization's role set when the mirror holds it (Clerk limits an
    organization to them), else every live role of the instance; ordered as the role set
    lists them, or by key.
    """
    org = _live_org_row(session, organization)
    if org is None:
        return None
    role_set = get_role_set(session, org.role_set_key) if org.role_set_key else None
    if role_set is not None and role_set.roles:
        return [AssignableRole(item.key, item.name) for item in role_set.roles]
    rows = session.execute(
        select(Role.key, Role.name).where(Role.deleted.is_(False), Role.key.is_not(None)).order_by(Role.key)
    )
    return [AssignableRole(key, name) for key, name in rows if key]


def api_calls_of(session: Session, command_ids: Sequence[int]) -> dict[int, list[ApiCall]]:
    """The Backend API calls each command made, in the order made: one query for all of them."""
    if not command_ids:
        return {}
    found: dict[int, list[ApiCall]] = {command_id: [] for command_id in command_ids}
    rows = session.scalars(
        select(ApiCall).where(ApiCall.command_id.in_(list(command_ids))).order_by(ApiCall.id)
    )
    for row in rows:
        if row.command_id is not None:
            found[row.command_id].append(row)
    return found


def notification_backlog(session: Session | Connection) -> dict[str, int]:
    """Rows of the notification outbox (``models.notifications``) by state (absent states: none)."""
    rows = session.execute(select(Notification.status, func.count()).group_by(Notification.status))
    return {str(status): int(count) for status, count in rows}
