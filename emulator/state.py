"""The emulator's truth: organizations, users, memberships, invitations and roles, with Clerk's rules.

Every public method takes the one lock, checks Clerk's rules (raising ``ClerkError`` with
Clerk's codes), changes the records and emits the matching webhook events, all before the
lock is released: the emitted history is therefore in exactly the order the state changed,
and a snapshot taken under the lock always equals the sum of the events emitted so far.
The HTTP layer and the scenario generator both drive the state through these methods only.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emulator import payloads
from emulator.errors import (
    ClerkError,
    identifier_exists,
    not_found,
    param_format,
    param_invalid,
    param_missing,
)
from emulator.records import (
    Clock,
    DomainRecord,
    IdGenerator,
    InvitationRecord,
    Json,
    MembershipRecord,
    OrganizationRecord,
    PermissionRecord,
    RoleRecord,
    UserRecord,
)

ADMIN_LEVEL_PERMISSION = "org:sys_memberships:manage"
ADMIN_ROLE = "org:admin"
MEMBER_ROLE = "org:member"
MAX_LIMIT = 500
DAY_MS = 86_400_000

# (key, name, description) of Clerk's system permissions; org:admin holds all of them.
SYSTEM_PERMISSIONS: tuple[tuple[str, str, str], ...] = (
    ("org:sys_profile:manage", "Manage organization", "Permission to manage an organization."),
    ("org:sys_profile:delete", "Delete organization", "Permission to delete an organization."),
    ("org:sys_memberships:read", "Read members", "Permission to read the members of an organization."),
    ("org:sys_memberships:manage", "Manage members", "Permission to manage the members of an organization."),
    ("org:sys_domains:read", "Read domains", "Permission to read the domains of an organization."),
    ("org:sys_domains:manage", "Manage domains", "Permission to manage the domains of an organization."),
    ("org:sys_billing:read", "Read billing", "Permission to read the billing of an organization."),
    ("org:sys_billing:manage", "Manage billing", "Permission to manage the billing of an organization."),
    ("org:sys_entconns:manage", "Manage enterprise connections", "Permission to manage SSO connections."),
)
MEMBER_PERMISSIONS = ("org:sys_memberships:read",)

INVITATION_STATUSES = ("pending", "accepted", "revoked", "expired")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ROLE_KEY_RE = re.compile(r"^org:[a-z0-9_]+$")
_PERMISSION_KEY_RE = re.compile(r"^org:[a-z0-9_]+:[a-z0-9_]+$")
_ENROLLMENT_MODES = ("manual_invitation", "automatic_invitation", "automatic_suggestion")
# Lists filter on Clerk's every mode, enterprise SSO included, though no domain here has it.
_LISTED_ENROLLMENT_MODES = (*_ENROLLMENT_MODES, "enterprise_sso")
DEFAULT_ROLE_SET = "role_set:default"
_SLUG_RE = re.compile(r"^[a-z0-9-]+$")

EventSink = Callable[[str, Json, int], None]
"""Receives (event type, data, envelope timestamp in ms) for every change, under the state lock."""


@dataclass(frozen=True)
class ListedPage:
    data: list[Json]
    total_count: int

    def body(self) -> Json:
        return {"data": self.data, "total_count": self.total_count}


def parse_order(order_by: str | None, allowed: Sequence[str], default: str) -> tuple[str, bool]:
    """Clerk's ``order_by``: a field name, optionally prefixed by ``+`` (ascending) or ``-``."""
    value = (order_by or default).strip()
    descending = value.startswith("-")
    name = value.lstrip("+-")
    if name not in allowed:
        raise param_invalid(
            "order_by", f"must be one of {', '.join(allowed)} (optionally prefixed by + or -)"
        )
    return name, descending


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise param_invalid("limit", f"must be between 1 and {MAX_LIMIT}")
    if offset < 0:
        raise param_invalid("offset", "must be greater than or equal to 0")


def _signed(values: Sequence[str]) -> tuple[set[str], set[str]]:
    """Clerk's ``+id`` (include, also the default) and ``-id`` (exclude) list filters."""
    include = {v.removeprefix("+") for v in values if not v.startswith("-")}
    exclude = {v[1:] for v in values if v.startswith("-")}
    return include, exclude


def _partial(query: str, *fields: str | None) -> bool:
    """Clerk's partial match: case-insensitive containment in any of the fields."""
    q = query.lower()
    return any(f is not None and q in f.lower() for f in fields)


def _sort_key(value: Any) -> tuple[int, Any]:
    # None sorts first in either direction's base order, like a database's NULLS FIRST.
    return (0, "") if value is None else (1, value)


def _merge_metadata(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Clerk's deep merge: nested objects merge, a null value removes the key."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_metadata(target[key], value)
        else:
            target[key] = _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _metadata(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise param_format(name, "must be an object")
    result = _plain(value)
    assert isinstance(result, dict)
    return result


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "organization"


class State:
    """The in-memory Clerk instance. Thread-safe: one re-entrant lock guards everything."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        ids: IdGenerator | None = None,
        seed: int | None = None,
        default_max_memberships: int = 0,
        accept_url: str = "https://accounts.emulator.invalid/accept-invitation",
    ) -> None:
        self.lock = threading.RLock()
        self.clock = clock or Clock()
        self.ids = ids or IdGenerator(seed)
        self._rng = random.Random(seed)
        self.default_max_memberships = default_max_memberships
        self._accept_url = accept_url
        self._sinks: list[EventSink] = []
        self._permissions: dict[str, PermissionRecord] = {}
        self._permission_keys: dict[str, str] = {}
        self._roles: dict[str, RoleRecord] = {}
        self._role_keys: dict[str, str] = {}
        self._users: dict[str, UserRecord] = {}
        self._emails: dict[str, str] = {}
        self._orgs: dict[str, OrganizationRecord] = {}
        self._slugs: dict[str, str] = {}
        self._members: dict[str, dict[str, MembershipRecord]] = {}
        self._user_orgs: dict[str, set[str]] = {}
        self._invitations: dict[str, InvitationRecord] = {}
        self._org_invitations: dict[str, dict[str, InvitationRecord]] = {}
        self._domains: dict[str, DomainRecord] = {}
        self._install_defaults()

    # ----------------------------------------------------------------- events
    def subscribe(self, sink: EventSink) -> None:
        with self.lock:
            self._sinks.append(sink)

    def _emit(self, event_type: str, data: Json, timestamp: int | None = None) -> None:
        when = timestamp if timestamp is not None else self.clock.tick()
        for sink in self._sinks:
            sink(event_type, data, when)

    def announce_defaults(self) -> None:
        """Emit ``permission.created`` and ``role.created`` for everything that exists now.

        A fresh Clerk instance has its system permissions and default roles before any webhook
        endpoint exists, so Clerk never sends these: this is for a mirror that wants them anyway.
        """
        with self.lock:
            for perm in sorted(self._permissions.values(), key=lambda p: p.created_at):
                self._emit("permission.created", payloads.permission(perm))
            for role in sorted(self._roles.values(), key=lambda r: r.created_at):
                self._emit("role.created", self._role_json(role))

    # ------------------------------------------------------------- defaults
    def _install_defaults(self) -> None:
        for key, name, description in SYSTEM_PERMISSIONS:
            now = self.clock.tick()
            perm = PermissionRecord(self.ids.new("perm"), key, name, description, "system", now, now)
            self._permissions[perm.id] = perm
            self._permission_keys[key] = perm.id
        all_ids = [self._permission_keys[key] for key, _, _ in SYSTEM_PERMISSIONS]
        member_ids = [self._permission_keys[key] for key in MEMBER_PERMISSIONS]
        for key, name, description, perms, creator in (
            (ADMIN_ROLE, "Admin", "Full access to the organization and its memberships.", all_ids, True),
            (MEMBER_ROLE, "Member", "Can read the members of the organization.", member_ids, False),
        ):
            now = self.clock.tick()
            role = RoleRecord(self.ids.new("role"), key, name, description, list(perms), creator, now, now)
            self._roles[role.id] = role
            self._role_keys[key] = role.id

    # ---------------------------------------------------------------- lookups
    def _role_by_key(self, key: str) -> RoleRecord:
        role_id = self._role_keys.get(key)
        if role_id is None:
            raise not_found("role", key)
        return self._roles[role_id]

    def _role_permission_keys(self, role: RoleRecord) -> list[str]:
        return [self._permissions[pid].key for pid in role.permission_ids if pid in self._permissions]

    def _is_admin_level(self, role_key: str) -> bool:
        role_id = self._role_keys.get(role_key)
        if role_id is None:
            return False
        return ADMIN_LEVEL_PERMISSION in self._role_permission_keys(self._roles[role_id])

    def _org(self, id_or_slug: str) -> OrganizationRecord:
        org = self._orgs.get(id_or_slug)
        if org is None and id_or_slug in self._slugs:
            org = self._orgs[self._slugs[id_or_slug]]
        if org is None:
            raise not_found("organization", id_or_slug)
        return org

    def _user(self, user_id: str) -> UserRecord:
        user = self._users.get(user_id)
        if user is None:
            raise not_found("user", user_id)
        return user

    def _membership(self, org_id: str, user_id: str) -> MembershipRecord:
        org = self._org(org_id)
        mem = self._members[org.id].get(user_id)
        if mem is None:
            raise not_found("organization membership", f"{org.id}/{user_id}")
        return mem

    def _pending_count(self, org_id: str) -> int:
        now = self.clock.peek()
        return sum(
            1
            for inv in self._org_invitations[org_id].values()
            if inv.status == "pending" and (inv.expires_at is None or inv.expires_at > now)
        )

    def _check_quota(self, org: OrganizationRecord, adding: int = 1) -> None:
        limit = org.max_allowed_memberships
        if limit <= 0:
            return
        used = len(self._members[org.id]) + self._pending_count(org.id)
        if used + adding > limit:
            raise ClerkError(
                403,
                "organization_membership_quota_exceeded",
                "Membership quota exceeded",
                f"The organization has reached its limit of {limit} memberships (pending invitations count).",
                meta={"max_allowed_memberships": limit},
            )

    # ------------------------------------------------------------ JSON views
    def _org_json(self, org: OrganizationRecord, *, counts: bool = True) -> Json:
        if not counts:
            return payloads.organization(org)
        return payloads.organization(
            org,
            members_count=len(self._members[org.id]),
            pending_invitations_count=self._pending_count(org.id),
        )

    def _role_json(self, role: RoleRecord) -> Json:
        perms = [self._permissions[pid] for pid in role.permission_ids if pid in self._permissions]
        return payloads.role(role, perms)

    def _membership_json(self, mem: MembershipRecord) -> Json:
        role = self._roles[self._role_keys[mem.role]]
        return payloads.membership(
            mem,
            org=self._org_json(self._orgs[mem.organization_id]),
            user=self._users[mem.user_id],
            role=role,
            permission_keys=self._role_permission_keys(role),
        )

    def _invitation_json(self, inv: InvitationRecord) -> Json:
        role_id = self._role_keys.get(inv.role)
        role_name = self._roles[role_id].name if role_id else inv.role
        inviter = self._users.get(inv.inviter_id) if inv.inviter_id else None
        data = payloads.invitation(inv, role_name=role_name, inviter=inviter)
        # No event marks an expiry, but Clerk's reads show it, as its ``status=expired`` filter.
        data["status"] = _effective_status(inv, self.clock.peek())
        return data

    # ------------------------------------------------------------------ users
    def create_user(
        self,
        *,
        email_address: str,
        first_name: str | None = None,
        last_name: str | None = None,
        username: str | None = None,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
        external_id: str | None = None,
    ) -> Json:
        email = (email_address or "").strip()
        if not email:
            raise param_missing("email_address")
        if not _EMAIL_RE.match(email):
            raise param_format("email_address", "must be a valid email address")
        with self.lock:
            if email.lower() in self._emails:
                raise identifier_exists("email_address", email)
            now = self.clock.tick()
            user = UserRecord(
                id=self.ids.new("user"),
                email_id=self.ids.new("idn"),
                email_address=email,
                first_name=first_name,
                last_name=last_name,
                username=username,
                created_at=now,
                updated_at=now,
                public_metadata=_metadata(public_metadata, "public_metadata"),
                private_metadata=_metadata(private_metadata, "private_metadata"),
                external_id=external_id,
            )
            self._users[user.id] = user
            self._emails[email.lower()] = user.id
            self._user_orgs[user.id] = set()
            data = payloads.user(user)
            self._emit("user.created", data, now)
            self._enroll(user)
            return data

    def get_user(self, user_id: str) -> Json:
        with self.lock:
            return payloads.user(self._user(user_id))

    def list_users(
        self,
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
    ) -> list[Json]:
        """Clerk's user list (a bare array) with the filters about what the emulator holds."""
        check_page(limit, offset)
        field, descending = parse_order(
            order_by,
            ("created_at", "updated_at", "email_address", "first_name", "last_name", "username"),
            "-created_at",
        )
        include, exclude = _signed(user_ids)
        include_orgs, exclude_orgs = _signed(organization_ids)
        with self.lock:
            users = list(self._users.values())
            if include:
                users = [u for u in users if u.id in include]
            if exclude:
                users = [u for u in users if u.id not in exclude]
            if email_addresses:
                emails = {e.lower() for e in email_addresses}
                users = [u for u in users if u.email_address.lower() in emails]
            if usernames:
                names = set(usernames)
                users = [u for u in users if u.username in names]
            if include_orgs:
                users = [u for u in users if include_orgs & self._user_orgs[u.id]]
            if exclude_orgs:
                users = [u for u in users if not exclude_orgs & self._user_orgs[u.id]]
            if query:
                users = [
                    u
                    for u in users
                    if u.id == query
                    or _partial(query, u.email_address, u.username, u.first_name, u.last_name)
                ]
            if created_at_before is not None:
                users = [u for u in users if u.created_at < created_at_before]
            if created_at_after is not None:
                users = [u for u in users if u.created_at > created_at_after]

            def key(user: UserRecord) -> tuple[Any, ...]:
                value = user.email_address if field == "email_address" else getattr(user, field)
                return (_sort_key(value), user.created_at, user.id)

            users.sort(key=key, reverse=descending)
            return [payloads.user(u) for u in users[offset : offset + limit]]

    def find_user_id(self, email_address: str) -> str | None:
        with self.lock:
            return self._emails.get(email_address.strip().lower())

    def delete_user(self, user_id: str) -> Json:
        """Delete a user; each of their memberships goes first, with its own deleted event.

        Clerk does not guard the last admin here: an organization can end up without one.
        """
        with self.lock:
            user = self._user(user_id)
            for org_id in sorted(
                self._user_orgs[user.id], key=lambda o: self._members[o][user.id].created_at
            ):
                data = self._membership_json(self._members[org_id][user.id])
                del self._members[org_id][user.id]
                self._emit("organizationMembership.deleted", data)
            del self._user_orgs[user.id]
            del self._users[user.id]
            del self._emails[user.email_address.lower()]
            data = payloads.deleted("user", user.id)
            self._emit("user.deleted", data)
            return data

    # ---------------------------------------------------------- organizations
    def create_organization(
        self,
        *,
        name: str,
        slug: str | None = None,
        created_by: str | None = None,
        max_allowed_memberships: int | None = None,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
    ) -> Json:
        if not name or not name.strip():
            raise param_missing("name")
        if len(name) > 256:
            raise param_invalid("name", "must be at most 256 characters")
        if max_allowed_memberships is not None and max_allowed_memberships < 0:
            raise param_invalid("max_allowed_memberships", "must be greater than or equal to 0")
        if slug is not None and not _SLUG_RE.match(slug):
            raise param_format("slug", "can contain only lowercase alphanumeric characters and the dash")
        with self.lock:
            creator = self._user(created_by) if created_by else None
            if slug is not None:
                if slug in self._slugs:
                    raise identifier_exists("slug", slug)
            else:
                base = slugify(name)
                slug, n = base, 1
                while slug in self._slugs:
                    n += 1
                    slug = f"{base}-{n}"
            now = self.clock.tick()
            org = OrganizationRecord(
                id=self.ids.new("org"),
                name=name.strip(),
                slug=slug,
                max_allowed_memberships=(
                    self.default_max_memberships
                    if max_allowed_memberships is None
                    else max_allowed_memberships
                ),
                admin_delete_enabled=True,
                created_by=creator.id if creator else None,
                created_at=now,
                updated_at=now,
                public_metadata=_metadata(public_metadata, "public_metadata"),
                private_metadata=_metadata(private_metadata, "private_metadata"),
            )
            self._orgs[org.id] = org
            self._slugs[slug] = org.id
            self._members[org.id] = {}
            self._org_invitations[org.id] = {}
            self._emit("organization.created", self._org_json(org), now)
            if creator is not None:
                # The creator becomes the first member with the creator role.
                self._add_membership(org, creator, ADMIN_ROLE, {}, {})
            return self._org_json(org)

    def get_organization(self, id_or_slug: str, *, include_members_count: bool = False) -> Json:
        with self.lock:
            return self._org_json(self._org(id_or_slug), counts=include_members_count)

    def list_organizations(
        self,
        *,
        limit: int = 10,
        offset: int = 0,
        order_by: str | None = None,
        query: str | None = None,
        include_members_count: bool = False,
        user_ids: Sequence[str] = (),
        organization_ids: Sequence[str] = (),
    ) -> ListedPage:
        check_page(limit, offset)
        field, descending = parse_order(order_by, ("created_at", "name", "members_count"), "-created_at")
        include_users, exclude_users = _signed(user_ids)
        include_orgs, exclude_orgs = _signed(organization_ids)
        with self.lock:
            orgs = list(self._orgs.values())
            if query:
                q = query.lower()
                orgs = [o for o in orgs if o.id == query or q in o.name.lower() or q in o.slug]
            if include_users:
                orgs = [o for o in orgs if include_users & self._members[o.id].keys()]
            if exclude_users:
                orgs = [o for o in orgs if not exclude_users & self._members[o.id].keys()]
            if include_orgs:
                orgs = [o for o in orgs if o.id in include_orgs]
            if exclude_orgs:
                orgs = [o for o in orgs if o.id not in exclude_orgs]

            def key(org: OrganizationRecord) -> tuple[Any, ...]:
                value: Any = len(self._members[org.id]) if field == "members_count" else getattr(org, field)
                return (_sort_key(value), org.created_at, org.id)

            orgs.sort(key=key, reverse=descending)
            page = orgs[offset : offset + limit]
            return ListedPage([self._org_json(o, counts=include_members_count) for o in page], len(orgs))

    def update_organization(
        self,
        org_id: str,
        *,
        name: str | None = None,
        slug: str | None = None,
        max_allowed_memberships: int | None = None,
        admin_delete_enabled: bool | None = None,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
    ) -> Json:
        if name is not None and (not name.strip() or len(name) > 256):
            raise param_invalid("name", "must be between 1 and 256 characters")
        if slug is not None and not _SLUG_RE.match(slug):
            raise param_format("slug", "can contain only lowercase alphanumeric characters and the dash")
        if max_allowed_memberships is not None and max_allowed_memberships < 0:
            raise param_invalid("max_allowed_memberships", "must be greater than or equal to 0")
        with self.lock:
            org = self._org(org_id)
            if slug is not None and slug != org.slug:
                if slug in self._slugs:
                    raise identifier_exists("slug", slug)
                del self._slugs[org.slug]
                self._slugs[slug] = org.id
                org.slug = slug
            if name is not None:
                org.name = name.strip()
            if max_allowed_memberships is not None:
                org.max_allowed_memberships = max_allowed_memberships
            if admin_delete_enabled is not None:
                org.admin_delete_enabled = admin_delete_enabled
            if public_metadata is not None:
                org.public_metadata = _metadata(public_metadata, "public_metadata")
            if private_metadata is not None:
                org.private_metadata = _metadata(private_metadata, "private_metadata")
            org.updated_at = self.clock.tick()
            data = self._org_json(org)
            self._emit("organization.updated", data, org.updated_at)
            return self._org_json(org, counts=False)

    def delete_organization(self, org_id: str) -> Json:
        """Delete an organization with its memberships (one deleted event each) and invitations."""
        with self.lock:
            org = self._org(org_id)
            for mem in sorted(self._members[org.id].values(), key=lambda m: (m.created_at, m.id)):
                self._emit("organizationMembership.deleted", self._membership_json(mem))
                self._user_orgs[mem.user_id].discard(org.id)
            for inv in self._org_invitations.pop(org.id).values():
                del self._invitations[inv.id]
            for dom in [d for d in self._domains.values() if d.organization_id == org.id]:
                del self._domains[dom.id]
                self._emit("organizationDomain.deleted", payloads.deleted("organization_domain", dom.id))
            del self._members[org.id]
            del self._orgs[org.id]
            del self._slugs[org.slug]
            data = payloads.deleted("organization", org.id, slug=org.slug)
            self._emit("organization.deleted", data)
            return data

    # ------------------------------------------------------------ memberships
    def _add_membership(
        self,
        org: OrganizationRecord,
        user: UserRecord,
        role_key: str,
        public_metadata: dict[str, Any],
        private_metadata: dict[str, Any],
    ) -> MembershipRecord:
        now = self.clock.tick()
        mem = MembershipRecord(
            id=self.ids.new("orgmem"),
            organization_id=org.id,
            user_id=user.id,
            role=role_key,
            created_at=now,
            updated_at=now,
            public_metadata=public_metadata,
            private_metadata=private_metadata,
        )
        self._members[org.id][user.id] = mem
        self._user_orgs[user.id].add(org.id)
        self._emit("organizationMembership.created", self._membership_json(mem), now)
        return mem

    def _already_member(self, org: OrganizationRecord, user_id: str) -> ClerkError:
        return ClerkError(
            400,
            "already_a_member_in_organization",
            "Already a member",
            f"User {user_id} is already a member of organization {org.id}.",
            meta={"organization_id": org.id, "user_id": user_id},
        )

    def add_membership(
        self,
        org_id: str,
        *,
        user_id: str,
        role: str,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
    ) -> Json:
        if not user_id:
            raise param_missing("user_id")
        if not role:
            raise param_missing("role")
        with self.lock:
            org = self._org(org_id)
            user = self._user(user_id)
            self._role_by_key(role)
            if user.id in self._members[org.id]:
                raise self._already_member(org, user.id)
            self._check_quota(org)
            mem = self._add_membership(
                org,
                user,
                role,
                _metadata(public_metadata, "public_metadata"),
                _metadata(private_metadata, "private_metadata"),
            )
            return self._membership_json(mem)

    def _guard_last_admin(self, org_id: str, leaving: MembershipRecord) -> None:
        if not self._is_admin_level(leaving.role):
            return
        others = [
            m
            for m in self._members[org_id].values()
            if m.user_id != leaving.user_id and self._is_admin_level(m.role)
        ]
        if not others:
            raise ClerkError(
                400,
                "organization_minimum_permissions_needed",
                "Minimum permissions needed",
                "There has to be at least one member in the organization with the "
                f"'{ADMIN_LEVEL_PERMISSION}' permission.",
                meta={"organization_id": org_id, "user_id": leaving.user_id},
            )

    def update_membership_role(self, org_id: str, user_id: str, *, role: str) -> Json:
        if not role:
            raise param_missing("role")
        with self.lock:
            mem = self._membership(org_id, user_id)
            self._role_by_key(role)
            if not self._is_admin_level(role):
                self._guard_last_admin(mem.organization_id, mem)
            mem.role = role
            mem.updated_at = self.clock.tick()
            data = self._membership_json(mem)
            self._emit("organizationMembership.updated", data, mem.updated_at)
            return data

    def update_membership_metadata(
        self,
        org_id: str,
        user_id: str,
        *,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
    ) -> Json:
        for name, value in (("public_metadata", public_metadata), ("private_metadata", private_metadata)):
            if value is not None and not isinstance(value, Mapping):
                raise param_format(name, "must be an object")
        with self.lock:
            mem = self._membership(org_id, user_id)
            if public_metadata is not None:
                _merge_metadata(mem.public_metadata, public_metadata)
            if private_metadata is not None:
                _merge_metadata(mem.private_metadata, private_metadata)
            mem.updated_at = self.clock.tick()
            data = self._membership_json(mem)
            self._emit("organizationMembership.updated", data, mem.updated_at)
            return data

    def remove_membership(self, org_id: str, user_id: str) -> Json:
        with self.lock:
            mem = self._membership(org_id, user_id)
            self._guard_last_admin(mem.organization_id, mem)
            data = self._membership_json(mem)
            del self._members[mem.organization_id][mem.user_id]
            self._user_orgs[mem.user_id].discard(mem.organization_id)
            # The deleted event carries the full membership as it last was (updated_at unchanged).
            self._emit("organizationMembership.deleted", data)
            return data

    def list_memberships(
        self,
        org_id: str | None,
        *,
        limit: int = 10,
        offset: int = 0,
        order_by: str | None = None,
        roles: Sequence[str] = (),
        user_ids: Sequence[str] = (),
        email_addresses: Sequence[str] = (),
        usernames: Sequence[str] = (),
        query: str | None = None,
        email_address_query: str | None = None,
        username_query: str | None = None,
        name_query: str | None = None,
        created_at_before: int | None = None,
        created_at_after: int | None = None,
    ) -> ListedPage:
        """Memberships of one organization, or of the whole instance when ``org_id`` is None.

        The user filters are Clerk's: ``query`` matches the user id exactly or the email,
        username or names in part; the created-at bounds are about the user's creation.
        """
        check_page(limit, offset)
        field, descending = parse_order(
            order_by,
            ("created_at", "email_address", "first_name", "last_name", "username", "phone_number"),
            "-created_at",
        )
        include, exclude = _signed(user_ids)
        with self.lock:
            if org_id is None:
                members = [m for per_org in self._members.values() for m in per_org.values()]
            else:
                members = list(self._members[self._org(org_id).id].values())
            if roles:
                wanted_roles = set(roles)
                members = [m for m in members if m.role in wanted_roles]
            if include:
                members = [m for m in members if m.user_id in include]
            if exclude:
                members = [m for m in members if m.user_id not in exclude]

            def user_of(mem: MembershipRecord) -> UserRecord:
                return self._users[mem.user_id]

            if email_addresses:
                emails = {e.lower() for e in email_addresses}
                members = [m for m in members if user_of(m).email_address.lower() in emails]
            if usernames:
                names = set(usernames)
                members = [m for m in members if user_of(m).username in names]
            if query:
                members = [
                    m
                    for m in members
                    if m.user_id == query
                    or _partial(
                        query,
                        user_of(m).email_address,
                        user_of(m).username,
                        user_of(m).first_name,
                        user_of(m).last_name,
                    )
                ]
            if email_address_query:
                members = [m for m in members if _partial(email_address_query, user_of(m).email_address)]
            if username_query:
                members = [m for m in members if _partial(username_query, user_of(m).username)]
            if name_query:
                members = [
                    m for m in members if _partial(name_query, user_of(m).first_name, user_of(m).last_name)
                ]
            if created_at_before is not None:
                members = [m for m in members if user_of(m).created_at < created_at_before]
            if created_at_after is not None:
                members = [m for m in members if user_of(m).created_at > created_at_after]

            def key(mem: MembershipRecord) -> tuple[Any, ...]:
                user = self._users[mem.user_id]
                value: Any = {
                    "created_at": mem.created_at,
                    "email_address": user.email_address,
                    "first_name": user.first_name,
                    "last_name": user.last_name,
                    "username": user.username,
                    "phone_number": None,
                }[field]
                return (_sort_key(value), mem.created_at, mem.id)

            members.sort(key=key, reverse=descending)
            page = members[offset : offset + limit]
            return ListedPage([self._membership_json(m) for m in page], len(members))

    def list_user_memberships(self, user_id: str, *, limit: int = 10, offset: int = 0) -> ListedPage:
        check_page(limit, offset)
        with self.lock:
            user = self._user(user_id)
            members = sorted(
                (self._members[o][user.id] for o in self._user_orgs[user.id]),
                key=lambda m: (m.created_at, m.id),
                reverse=True,
            )
            page = members[offset : offset + limit]
            return ListedPage([self._membership_json(m) for m in page], len(members))

    # ------------------------------------------------------------ invitations
    def _validate_invitation(
        self, item: Mapping[str, Any], org: OrganizationRecord
    ) -> tuple[str, RoleRecord]:
        email = item.get("email_address")
        if not email or not isinstance(email, str):
            raise param_missing("email_address")
        if not _EMAIL_RE.match(email.strip()):
            raise param_format("email_address", "must be a valid email address")
        role_key = item.get("role")
        if not role_key or not isinstance(role_key, str):
            raise param_missing("role")
        role = self._role_by_key(role_key)
        days = item.get("expires_in_days")
        if days is not None and (not isinstance(days, int) or not 1 <= days <= 365):
            raise param_invalid("expires_in_days", "must be between 1 and 365")
        inviter = item.get("inviter_user_id")
        if inviter is not None:
            if inviter not in self._members[org.id]:
                raise not_found("inviter user", str(inviter))
            if not self._is_admin_level(self._members[org.id][inviter].role):
                raise ClerkError(
                    403,
                    "not_an_admin_in_organization",
                    "Not an admin",
                    f"User {inviter} is not an administrator in organization {org.id}.",
                )
        email = email.strip()
        user_id = self._emails.get(email.lower())
        if user_id is not None and user_id in self._members[org.id]:
            raise self._already_member(org, user_id)
        return email, role

    def _not_unique(self, email: str) -> ClerkError:
        return ClerkError(
            400,
            "organization_invitation_not_unique",
            "Duplicate invitation",
            f"There is already a pending invitation for {email} in this organization.",
            meta={"email_address": email},
        )

    def _create_invitations(self, org: OrganizationRecord, items: Sequence[Mapping[str, Any]]) -> list[Json]:
        validated = [self._validate_invitation(item, org) for item in items]
        pending = {
            inv.email_address.lower()
            for inv in self._org_invitations[org.id].values()
            if inv.status == "pending"
        }
        seen: set[str] = set()
        for email, _ in validated:
            if email.lower() in pending or email.lower() in seen:
                raise self._not_unique(email)
            seen.add(email.lower())
        self._check_quota(org, adding=len(validated))
        created: list[Json] = []
        for item, (email, role) in zip(items, validated, strict=True):
            now = self.clock.tick()
            days = item.get("expires_in_days") or 30
            inv_id = self.ids.new("orginv")
            inv = InvitationRecord(
                id=inv_id,
                organization_id=org.id,
                email_address=email,
                role=role.key,
                status="pending",
                inviter_id=item.get("inviter_user_id"),
                url=f"{self._accept_url}?invitation={inv_id}",
                expires_at=now + days * DAY_MS,
                created_at=now,
                updated_at=now,
                public_metadata=_metadata(item.get("public_metadata"), "public_metadata"),
                private_metadata=_metadata(item.get("private_metadata"), "private_metadata"),
            )
            self._invitations[inv.id] = inv
            self._org_invitations[org.id][inv.id] = inv
            data = self._invitation_json(inv)
            self._emit("organizationInvitation.created", data, now)
            created.append(data)
        return created

    def create_invitation(
        self,
        org_id: str,
        *,
        email_address: Any,
        role: Any,
        inviter_user_id: Any = None,
        expires_in_days: Any = None,
        public_metadata: Any = None,
        private_metadata: Any = None,
    ) -> Json:
        """Invite an email address; arguments are checked here (they may come straight from JSON)."""
        item = {
            "email_address": email_address,
            "role": role,
            "inviter_user_id": inviter_user_id,
            "expires_in_days": expires_in_days,
            "public_metadata": public_metadata,
            "private_metadata": private_metadata,
        }
        with self.lock:
            return self._create_invitations(self._org(org_id), [item])[0]

    def bulk_create_invitations(self, org_id: str, items: Sequence[Mapping[str, Any]]) -> ListedPage:
        if not isinstance(items, list) or not 1 <= len(items) <= 10:
            raise param_invalid("invitations", "must be a list of 1 to 10 invitations")
        if not all(isinstance(item, Mapping) for item in items):
            raise param_format("invitations", "must be objects")
        with self.lock:
            created = self._create_invitations(self._org(org_id), items)
            return ListedPage(created, len(created))

    def _invitation(self, org_id: str, invitation_id: str) -> InvitationRecord:
        org = self._org(org_id)
        inv = self._org_invitations[org.id].get(invitation_id)
        if inv is None:
            raise not_found("organization invitation", invitation_id)
        return inv

    def get_invitation(self, org_id: str, invitation_id: str) -> Json:
        with self.lock:
            return self._invitation_json(self._invitation(org_id, invitation_id))

    def list_invitations(
        self,
        org_id: str | None,
        *,
        status: str | Sequence[str] | None = None,
        limit: int = 10,
        offset: int = 0,
        order_by: str | None = None,
        email_address: str | None = None,
        query: str | None = None,
        user_id: str | None = None,
    ) -> ListedPage:
        """Invitations of one organization, of one user (sent to their email or accepted by them),
        or of the whole instance; the last two carry ``public_organization_data`` as Clerk's."""
        check_page(limit, offset)
        statuses = {status} if isinstance(status, str) else set(status or ())
        if not statuses <= set(INVITATION_STATUSES):
            raise param_invalid("status", f"must be one of {', '.join(INVITATION_STATUSES)}")
        field, descending = parse_order(order_by, ("created_at", "email_address"), "-created_at")
        with self.lock:
            if org_id is not None:
                invs = list(self._org_invitations[self._org(org_id).id].values())
            else:
                invs = list(self._invitations.values())
            if user_id is not None:
                email = self._user(user_id).email_address.lower()
                invs = [i for i in invs if i.user_id == user_id or i.email_address.lower() == email]
            now = self.clock.peek()
            if statuses:
                invs = [i for i in invs if _effective_status(i, now) in statuses]
            if email_address:
                invs = [i for i in invs if i.email_address.lower() == email_address.lower()]
            if query:
                invs = [i for i in invs if _partial(query, i.email_address)]
            invs.sort(key=lambda i: (getattr(i, field), i.created_at, i.id), reverse=descending)
            page = invs[offset : offset + limit]
            data = [self._invitation_json(i) for i in page]
            if org_id is None:
                for item, inv in zip(data, page, strict=True):
                    org = self._orgs[inv.organization_id]
                    item["public_organization_data"] = {
                        "id": org.id,
                        "name": org.name,
                        "slug": org.slug,
                        "image_url": payloads.organization(org)["image_url"],
                        "has_image": False,
                    }
            return ListedPage(data, len(invs))

    def _not_pending(self, inv: InvitationRecord) -> ClerkError:
        return ClerkError(
            404,
            "organization_invitation_not_pending",
            "Invitation not pending",
            f"Invitation {inv.id} is {inv.status}, only pending invitations can be changed.",
            meta={"status": inv.status},
        )

    def revoke_invitation(
        self, org_id: str, invitation_id: str, *, requesting_user_id: str | None = None
    ) -> Json:
        with self.lock:
            inv = self._invitation(org_id, invitation_id)
            if (
                requesting_user_id is not None
                and requesting_user_id not in self._members[inv.organization_id]
            ):
                raise not_found("requesting user", requesting_user_id)
            if _effective_status(inv, self.clock.peek()) != "pending":
                raise self._not_pending(inv)
            inv.status = "revoked"
            inv.updated_at = self.clock.tick()
            data = self._invitation_json(inv)
            self._emit("organizationInvitation.revoked", data, inv.updated_at)
            return data

    def accept_invitation(
        self,
        invitation_id: str,
        *,
        user_id: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
    ) -> Json:
        """The invitee accepts (test-only: in Clerk the user does it in the browser).

        Without ``user_id`` the user with the invited email is used, created if needed (which
        emits ``user.created``). Emits ``organizationInvitation.accepted`` and
        ``organizationMembership.created``, in a seeded random order as Clerk does not order them.
        Returns the new membership.
        """
        with self.lock:
            inv = self._invitations.get(invitation_id)
            if inv is None:
                raise not_found("organization invitation", invitation_id)
            org = self._orgs[inv.organization_id]
            if _effective_status(inv, self.clock.peek()) != "pending":
                raise self._not_pending(inv)
            if user_id is not None:
                user = self._user(user_id)
            else:
                existing = self._emails.get(inv.email_address.lower())
                if existing is None:
                    self.create_user(
                        email_address=inv.email_address, first_name=first_name, last_name=last_name
                    )
                    existing = self._emails[inv.email_address.lower()]
                user = self._users[existing]
            if user.id in self._members[org.id]:
                raise self._already_member(org, user.id)
            self._role_by_key(inv.role)
            # Emit both events after the changes, in either order, each with its own timestamp.
            inv.status = "accepted"
            inv.user_id = user.id
            inv.updated_at = self.clock.tick()
            inv_data = self._invitation_json(inv)
            now = self.clock.tick()
            mem = MembershipRecord(
                id=self.ids.new("orgmem"),
                organization_id=org.id,
                user_id=user.id,
                role=inv.role,
                created_at=now,
                updated_at=now,
                public_metadata=dict(inv.public_metadata),
                private_metadata=dict(inv.private_metadata),
            )
            self._members[org.id][user.id] = mem
            self._user_orgs[user.id].add(org.id)
            mem_data = self._membership_json(mem)
            events = [
                ("organizationInvitation.accepted", inv_data, inv.updated_at),
                ("organizationMembership.created", mem_data, now),
            ]
            if self._rng.random() < 0.5:
                events.reverse()
            for event_type, data, ts in events:
                self._emit(event_type, data, ts)
            return mem_data

    # ------------------------------------------------------------------ roles
    def list_roles(
        self, *, limit: int = 10, offset: int = 0, order_by: str | None = None, query: str | None = None
    ) -> ListedPage:
        check_page(limit, offset)
        field, descending = parse_order(order_by, ("created_at", "name", "key"), "-created_at")
        with self.lock:
            roles = list(self._roles.values())
            if query:
                q = query.lower()
                roles = [r for r in roles if r.id == query or q in r.name.lower() or q in r.key]
            roles.sort(key=lambda r: (getattr(r, field), r.created_at, r.id), reverse=descending)
            page = roles[offset : offset + limit]
            return ListedPage([self._role_json(r) for r in page], len(roles))

    def list_permissions(
        self, *, limit: int = 10, offset: int = 0, order_by: str | None = None, query: str | None = None
    ) -> ListedPage:
        check_page(limit, offset)
        field, descending = parse_order(order_by, ("created_at", "name", "key"), "-created_at")
        with self.lock:
            perms = list(self._permissions.values())
            if query:
                perms = [p for p in perms if p.id == query or _partial(query, p.name, p.key)]
            perms.sort(key=lambda p: (getattr(p, field), p.created_at, p.id), reverse=descending)
            page = perms[offset : offset + limit]
            return ListedPage([payloads.permission(p) for p in page], len(perms))

    def get_permission(self, permission_id: str) -> Json:
        with self.lock:
            perm = self._permissions.get(permission_id)
            if perm is None:
                raise not_found("permission", permission_id)
            return payloads.permission(perm)

    def get_role(self, role_id: str) -> Json:
        with self.lock:
            role = self._roles.get(role_id)
            if role is None:
                raise not_found("role", role_id)
            return self._role_json(role)

    def create_role(
        self,
        *,
        name: str,
        key: str,
        description: str | None = None,
        permissions: Iterable[str] | None = None,
    ) -> Json:
        if not name:
            raise param_missing("name")
        if not key:
            raise param_missing("key")
        if not _ROLE_KEY_RE.match(key):
            raise param_format(
                "key", "must start with 'org:' followed by lowercase letters, digits or underscores"
            )
        with self.lock:
            if key in self._role_keys:
                raise identifier_exists("key", key)
            perm_ids: list[str] = []
            for ref in permissions or ():
                # Clerk takes permission ids; a key is accepted too for convenience.
                perm_id = ref if ref in self._permissions else self._permission_keys.get(ref)
                if perm_id is None:
                    raise not_found("permission", ref)
                if perm_id not in perm_ids:
                    perm_ids.append(perm_id)
            now = self.clock.tick()
            role = RoleRecord(self.ids.new("role"), key, name, description, perm_ids, False, now, now)
            self._roles[role.id] = role
            self._role_keys[key] = role.id
            data = self._role_json(role)
            self._emit("role.created", data, now)
            return data

    def delete_role(self, role_id: str) -> Json:
        with self.lock:
            role = self._roles.get(role_id)
            if role is None:
                raise not_found("role", role_id)
            if role.key in (ADMIN_ROLE, MEMBER_ROLE):
                raise ClerkError(
                    400,
                    "organization_role_used_as_default",
                    "Role in use",
                    f"Role {role.key} is the creator or default role and cannot be deleted.",
                )
            in_use = any(
                m.role == role.key for members in self._members.values() for m in members.values()
            ) or any(i.role == role.key and i.status == "pending" for i in self._invitations.values())
            if in_use:
                raise ClerkError(
                    400,
                    "organization_role_assigned",
                    "Role in use",
                    f"Role {role.key} is assigned to members or pending invitations and cannot be deleted.",
                )
            del self._roles[role.id]
            del self._role_keys[role.key]
            data = payloads.deleted("role", role.id)
            self._emit("role.deleted", data)
            return data

    def update_role(
        self,
        role_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        permissions: Iterable[str] | None = None,
    ) -> Json:
        """Change what a role is called or grants: ``role.updated`` only, no membership event."""
        if name is not None and not name.strip():
            raise param_invalid("name", "must not be empty")
        with self.lock:
            role = self._roles.get(role_id)
            if role is None:
                raise not_found("role", role_id)
            if permissions is not None:
                perm_ids: list[str] = []
                for ref in permissions:
                    perm_id = ref if ref in self._permissions else self._permission_keys.get(ref)
                    if perm_id is None:
                        raise not_found("permission", ref)
                    if perm_id not in perm_ids:
                        perm_ids.append(perm_id)
                role.permission_ids = perm_ids
            if name is not None:
                role.name = name.strip()
            if description is not None:
                role.description = description
            role.updated_at = self.clock.tick()
            data = self._role_json(role)
            self._emit("role.updated", data, role.updated_at)
            return data

    def create_permission(self, *, name: str, key: str, description: str = "") -> Json:
        if not name:
            raise param_missing("name")
        if not key:
            raise param_missing("key")
        if not _PERMISSION_KEY_RE.match(key):
            raise param_format("key", "must look like 'org:<feature>:<action>'")
        with self.lock:
            if key in self._permission_keys:
                raise identifier_exists("key", key)
            now = self.clock.tick()
            perm = PermissionRecord(self.ids.new("perm"), key, name, description, "user", now, now)
            self._permissions[perm.id] = perm
            self._permission_keys[key] = perm.id
            data = payloads.permission(perm)
            self._emit("permission.created", data, now)
            return data

    def delete_permission(self, permission_id: str) -> Json:
        """Delete a custom permission; the roles granting it stop granting it, without an event."""
        with self.lock:
            perm = self._permissions.get(permission_id)
            if perm is None:
                raise not_found("permission", permission_id)
            if perm.type == "system":
                raise ClerkError(
                    400,
                    "permission_not_deletable",
                    "System permission",
                    f"Permission {perm.key} is a system permission and cannot be deleted.",
                )
            del self._permissions[perm.id]
            del self._permission_keys[perm.key]
            for role in self._roles.values():
                if perm.id in role.permission_ids:
                    role.permission_ids.remove(perm.id)
            data = payloads.deleted("permission", perm.id)
            self._emit("permission.deleted", data)
            return data

    def update_user(
        self,
        user_id: str,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
        username: str | None = None,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
    ) -> Json:
        """Change a user: Clerk sends ``user.updated`` only, never an event of their memberships."""
        with self.lock:
            user = self._user(user_id)
            if first_name is not None:
                user.first_name = first_name
            if last_name is not None:
                user.last_name = last_name
            if username is not None:
                user.username = username
            if public_metadata is not None:
                user.public_metadata = _metadata(public_metadata, "public_metadata")
            if private_metadata is not None:
                user.private_metadata = _metadata(private_metadata, "private_metadata")
            user.updated_at = self.clock.tick()
            data = payloads.user(user)
            self._emit("user.updated", data, user.updated_at)
            return data

    # ------------------------------------------------ domains and role sets
    def _domain_json(self, dom: DomainRecord) -> Json:
        pending = sum(
            1
            for inv in self._org_invitations[dom.organization_id].values()
            if inv.status == "pending" and inv.email_address.lower().endswith("@" + dom.name)
        )
        return payloads.domain(dom, self._orgs[dom.organization_id], pending_invitations=pending)

    def create_domain(
        self, org_id: str, *, name: str, enrollment_mode: str = "manual_invitation", verified: bool = True
    ) -> Json:
        domain_name = (name or "").strip().lower()
        if not domain_name:
            raise param_missing("name")
        if "." not in domain_name or "@" in domain_name:
            raise param_format("name", "must be a domain name such as acme.com")
        if enrollment_mode not in _ENROLLMENT_MODES:
            raise param_invalid("enrollment_mode", f"must be one of {', '.join(_ENROLLMENT_MODES)}")
        with self.lock:
            org = self._org(org_id)
            if any(d.name == domain_name for d in self._domains.values()):
                raise identifier_exists("name", domain_name)
            now = self.clock.tick()
            dom = DomainRecord(
                self.ids.new("orgdmn"), org.id, domain_name, enrollment_mode, verified, now, now
            )
            self._domains[dom.id] = dom
            data = self._domain_json(dom)
            self._emit("organizationDomain.created", data, now)
            return data

    def _domain(self, org_id: str, domain_id: str) -> DomainRecord:
        dom = self._domains.get(domain_id)
        if dom is None or dom.organization_id != self._org(org_id).id:
            raise not_found("organization domain", domain_id)
        return dom

    def update_domain(self, org_id: str, domain_id: str, *, enrollment_mode: str | None = None) -> Json:
        if enrollment_mode is not None and enrollment_mode not in _ENROLLMENT_MODES:
            raise param_invalid("enrollment_mode", f"must be one of {', '.join(_ENROLLMENT_MODES)}")
        with self.lock:
            dom = self._domain(org_id, domain_id)
            if enrollment_mode is not None:
                dom.enrollment_mode = enrollment_mode
            dom.updated_at = self.clock.tick()
            data = self._domain_json(dom)
            self._emit("organizationDomain.updated", data, dom.updated_at)
            return data

    def delete_domain(self, org_id: str, domain_id: str) -> Json:
        with self.lock:
            dom = self._domain(org_id, domain_id)
            del self._domains[dom.id]
            data = payloads.deleted("organization_domain", dom.id)
            self._emit("organizationDomain.deleted", data)
            return data

    def list_domains(
        self,
        *,
        limit: int = 10,
        offset: int = 0,
        organization_id: str | None = None,
        within_organization: str | None = None,
        verified: bool | None = None,
        enrollment_modes: Sequence[str] = (),
        query: str | None = None,
        domains: Sequence[str] = (),
        order_by: str | None = None,
    ) -> ListedPage:
        """Domains, newest first by default; ``within_organization`` (id or slug) must exist.

        ``enrollment_modes`` are modes to include or, prefixed by ``-``, to exclude (both AND);
        ``query`` is an organization id when it starts with ``org_``, else part of a name.
        """
        check_page(limit, offset)
        field, descending = parse_order(order_by, ("created_at", "name"), "-created_at")
        include = [m for m in enrollment_modes if not m.startswith("-")]
        exclude = [m[1:] for m in enrollment_modes if m.startswith("-")]
        if any(m not in _LISTED_ENROLLMENT_MODES for m in include + exclude):
            raise param_invalid(
                "enrollment_mode", f"must be one of {', '.join(_LISTED_ENROLLMENT_MODES)}, optionally after -"
            )
        if query is not None and not query.strip():
            raise param_invalid("query", "must not be empty")
        with self.lock:
            found = list(self._domains.values())
            if within_organization is not None:
                org_id = self._org(within_organization).id
                found = [d for d in found if d.organization_id == org_id]
            if organization_id is not None:
                found = [d for d in found if d.organization_id == organization_id]
            if verified is not None:
                found = [d for d in found if d.verified == verified]
            if include:
                found = [d for d in found if d.enrollment_mode in include]
            if exclude:
                found = [d for d in found if d.enrollment_mode not in exclude]
            if query is not None:
                q = query.strip()
                if q.startswith("org_"):
                    found = [d for d in found if d.organization_id == q]
                else:
                    found = [d for d in found if _partial(q, d.name)]
            if domains:
                wanted = {name.lower() for name in domains}
                found = [d for d in found if d.name in wanted]
            found.sort(key=lambda d: (getattr(d, field), d.created_at, d.id), reverse=descending)
            return ListedPage([self._domain_json(d) for d in found[offset : offset + limit]], len(found))

    def _enroll(self, user: UserRecord) -> None:
        """Domain enrollment: a verified ``automatic_invitation`` domain invites a new user with
        its address, as the default role. No command asked for these invitations."""
        address = user.email_address.lower()
        for dom in sorted(self._domains.values(), key=lambda d: (d.created_at, d.id)):
            if not (dom.verified and dom.enrollment_mode == "automatic_invitation"):
                continue
            if not address.endswith("@" + dom.name):
                continue
            try:
                self._create_invitations(
                    self._orgs[dom.organization_id],
                    [{"email_address": user.email_address, "role": MEMBER_ROLE}],
                )
            except ClerkError:
                # Already invited, or the organization is full: Clerk skips the invitation too.
                continue

    def _default_role_set(self) -> Json:
        roles = sorted(self._roles.values(), key=lambda r: (r.created_at, r.id))
        return payloads.role_set(DEFAULT_ROLE_SET, roles, default_key=MEMBER_ROLE, creator_key=ADMIN_ROLE)

    def list_role_sets(
        self, *, limit: int = 10, offset: int = 0, order_by: str | None = None, query: str | None = None
    ) -> ListedPage:
        """The instance's one role set, as Clerk lists role sets (query, order, paging)."""
        check_page(limit, offset)
        parse_order(order_by, ("created_at", "name", "key"), "-created_at")  # one set: any order is it
        with self.lock:
            sets = [self._default_role_set()]
            if query:
                sets = [rs for rs in sets if rs["id"] == query or _partial(query, rs["name"], rs["key"])]
            return ListedPage(sets[offset : offset + limit], len(sets))

    def get_role_set(self, key_or_id: str) -> Json:
        with self.lock:
            found = self._default_role_set()
            if key_or_id not in (found["id"], found["key"]):
                raise not_found("role set", key_or_id)
            return found

    # -------------------------------------------------------- scenario views
    def organization_ids(self) -> list[str]:
        with self.lock:
            return sorted(self._orgs, key=lambda o: self._orgs[o].created_at)

    def user_ids(self) -> list[str]:
        with self.lock:
            return sorted(self._users, key=lambda u: self._users[u].created_at)

    def role_keys(self) -> list[str]:
        with self.lock:
            return sorted(self._role_keys)

    def admin_role_keys(self) -> list[str]:
        with self.lock:
            return sorted(k for k in self._role_keys if self._is_admin_level(k))

    def members_of(self, org_id: str) -> list[tuple[str, str]]:
        """(user id, role key) of an organization's members, oldest first."""
        with self.lock:
            members = self._members.get(org_id, {})
            return [(m.user_id, m.role) for m in sorted(members.values(), key=lambda m: (m.created_at, m.id))]

    def session_org_claim(self, user_id: str, organization: str) -> Json:
        """The ``o`` claim of a session whose active organization is ``organization``.

        Clerk's version 2 session tokens carry the active organization compactly: its id, its
        slug and the user's role key without the ``org:`` prefix. ``not_found`` when the user
        is not a member, as Clerk refuses to activate an organization a user is not in.
        """
        with self.lock:
            self._user(user_id)
            mem = self._membership(organization, user_id)
            org = self._orgs[mem.organization_id]
            return {"id": org.id, "slg": org.slug, "rol": mem.role.removeprefix("org:")}

    def pending_invitations_of(self, org_id: str) -> list[tuple[str, str]]:
        """(invitation id, email) of an organization's pending invitations, oldest first."""
        with self.lock:
            now = self.clock.peek()
            invs = self._org_invitations.get(org_id, {}).values()
            return [
                (i.id, i.email_address)
                for i in sorted(invs, key=lambda i: (i.created_at, i.id))
                if _effective_status(i, now) == "pending"
            ]

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {
                "organizations": len(self._orgs),
                "users": len(self._users),
                "memberships": sum(len(m) for m in self._members.values()),
                "invitations": len(self._invitations),
                "roles": len(self._roles),
            }

    # --------------------------------------------------------------- snapshot
    def snapshot(self) -> Json:
        """The true state in a stable shape: lists sorted by key, times in ms, no derived counts.

        Rows mirror orgsync's tables: organizations, memberships (keyed by organization and
        user), invitations (every status; those of deleted organizations are gone), roles
        (permission keys), permissions and users (public data).
        """
        with self.lock:
            return {
                "organizations": [
                    {
                        "id": o.id,
                        "name": o.name,
                        "slug": o.slug,
                        "max_allowed_memberships": o.max_allowed_memberships,
                        "admin_delete_enabled": o.admin_delete_enabled,
                        "created_by": o.created_by,
                        "public_metadata": _plain(o.public_metadata),
                        "private_metadata": _plain(o.private_metadata),
                        "created_at": o.created_at,
                        "updated_at": o.updated_at,
                    }
                    for o in sorted(self._orgs.values(), key=lambda o: o.id)
                ],
                "memberships": [
                    {
                        "organization_id": m.organization_id,
                        "user_id": m.user_id,
                        "id": m.id,
                        "role": m.role,
                        "role_name": self._roles[self._role_keys[m.role]].name,
                        "permissions": self._role_permission_keys(self._roles[self._role_keys[m.role]]),
                        "identifier": self._users[m.user_id].email_address,
                        "public_metadata": _plain(m.public_metadata),
                        "private_metadata": _plain(m.private_metadata),
                        "created_at": m.created_at,
                        "updated_at": m.updated_at,
                    }
                    for m in sorted(
                        (m for members in self._members.values() for m in members.values()),
                        key=lambda m: (m.organization_id, m.user_id),
                    )
                ],
                "invitations": [
                    {
                        "id": i.id,
                        "organization_id": i.organization_id,
                        "email_address": i.email_address,
                        "role": i.role,
                        "status": i.status,
                        "user_id": i.user_id,
                        "inviter_id": i.inviter_id,
                        "public_metadata": _plain(i.public_metadata),
                        "private_metadata": _plain(i.private_metadata),
                        "expires_at": i.expires_at,
                        "created_at": i.created_at,
                        "updated_at": i.updated_at,
                    }
                    for i in sorted(self._invitations.values(), key=lambda i: i.id)
                ],
                "roles": [
                    {
                        "id": r.id,
                        "key": r.key,
                        "name": r.name,
                        "description": r.description,
                        "is_creator_eligible": r.is_creator_eligible,
                        "permissions": self._role_permission_keys(r),
                        "created_at": r.created_at,
                        "updated_at": r.updated_at,
                    }
                    for r in sorted(self._roles.values(), key=lambda r: r.id)
                ],
                "permissions": [
                    {
                        "id": p.id,
                        "key": p.key,
                        "name": p.name,
                        "description": p.description,
                        "type": p.type,
                        "created_at": p.created_at,
                        "updated_at": p.updated_at,
                    }
                    for p in sorted(self._permissions.values(), key=lambda p: p.id)
                ],
                "users": [
                    {
                        "id": u.id,
                        "identifier": u.email_address,
                        "username": u.username,
                        "first_name": u.first_name,
                        "last_name": u.last_name,
                        "public_metadata": _plain(u.public_metadata),
                        "created_at": u.created_at,
                        "updated_at": u.updated_at,
                    }
                    for u in sorted(self._users.values(), key=lambda u: u.id)
                ],
            }


def _effective_status(inv: InvitationRecord, now_ms: int) -> str:
    if inv.status == "pending" and inv.expires_at is not None and inv.expires_at <= now_ms:
        return "expired"
    return inv.status
