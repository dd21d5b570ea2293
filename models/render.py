"""Views of the read layer rendered in Clerk's JSON shapes (snake_case, epoch milliseconds).

Fields the mirror does not hold are left out where Clerk's schema makes them optional
(``role_set_key``, ``last_active_at``, ``missing_member_with_elevated_permissions``) and
given their empty value where it requires them. A user carries what the mirror keeps (public
data, ``external_id``, every email address, ``banned``, ``locked``, ``last_active_at``);
an email address is its address alone (no id, so ``primary_email_address_id`` is null, the
primary address comes first; verification null; the user's timestamps); phone numbers, web3
wallets, passkeys and external accounts are empty lists, the other security flags false and
sign-in times null. Of a domain's
verification the mirror keeps the status: the strategy is given as Clerk's ``email_code``
and the attempts and times as null; a domain's ``ownership_verification`` is null. A role of
a role set whose key no live mirrored role holds is given by its key alone.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from sqlalchemy import JSON, ColumnElement, Connection, Text, cast
from sqlalchemy.orm import Session

from models import reads
from models.reads import (
    CountedOrganizationView,
    DomainView,
    InvitationDetailView,
    MembershipQuery,
    MembershipView,
    OrganizationView,
    PermissionView,
    RoleSetItemView,
    RoleSetView,
    RoleView,
    TimedPermissionView,
    UserView,
)
from models.tables import Membership
from models.userdata import complete_user_data

Json = dict[str, Any]


def organization(org: OrganizationView, *, counts: bool) -> Json:
    data: Json = {
        "object": "organization",
        "id": org.id,
        "name": org.name or "",
        "slug": org.slug or "",
        "has_image": org.has_image,
        # Clerk's defaults when a payload lacked them: no limit, deletion by admins allowed.
        "max_allowed_memberships": org.max_allowed_memberships or 0,
        "admin_delete_enabled": True if org.admin_delete_enabled is None else org.admin_delete_enabled,
        "public_metadata": org.public_metadata,
        "private_metadata": org.private_metadata,
        "created_at": org.created_at,
        "updated_at": org.updated_at,
    }
    if org.image_url is not None:
        data["image_url"] = org.image_url
    if org.created_by is not None:
        data["created_by"] = org.created_by
    if counts:
        data["members_count"] = org.members_count
        if isinstance(org, CountedOrganizationView):
            data["pending_invitations_count"] = org.pending_invitations_count
    return data


def public_user_data(data: Json) -> Json:
    return complete_user_data(dict(data))


def _membership_head(mem: MembershipView) -> Json:
    return {
        "object": "organization_membership",
        "id": mem.id,
        "role": mem.role,
        "role_name": mem.role_name,
        "permissions": mem.permissions,
        "public_metadata": mem.public_metadata,
        "private_metadata": mem.private_metadata,
    }


def _membership_tail(mem: MembershipView) -> Json:
    return {
        "public_user_data": public_user_data(mem.public_user_data),
        "created_at": mem.created_at,
        "updated_at": mem.updated_at,
    }


def membership(mem: MembershipView) -> Json:
    organization_data = None if mem.organization is None else organization(mem.organization, counts=True)
    return {**_membership_head(mem), "organization": organization_data, **_membership_tail(mem)}


def encode(payload: Any) -> str:
    """Compact JSON in the order given (Flask's jsonify sorts every key: a large share of a page).

    orjson does it in a fraction of the time; what it refuses (an integer beyond 64 bits in
    metadata) goes through the standard library instead."""
    try:
        return orjson.dumps(payload).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(payload, separators=(",", ":"))


# A membership row as a page reads it: its JSON columns as stored text, never parsed but the
# public user data that is not served as stored (which gets its defaults); the rest goes into
# the page verbatim.
_PAGE_COLUMNS: tuple[ColumnElement[Any], ...] = (
    *(
        cast(column, Text).label(column.name) if isinstance(column.type, JSON) else column
        for column in (
            Membership.__table__.c[name]
            for name in (
                "id",
                "organization_id",
                "user_id",
                "role",
                "role_name",
                "permissions",
                "public_metadata",
                "private_metadata",
                "public_user_data",
                "user_data_complete",
                "identifier",
                "created_at",
                "updated_at",
            )
        )
    ),
)
_EMPTY_OBJECT = orjson.Fragment(b"{}")
_EMPTY_ARRAY = orjson.Fragment(b"[]")


def _stored(text: str | None, empty: orjson.Fragment, opening: str) -> orjson.Fragment:
    """Stored JSON text of the kind that opens with ``opening``, verbatim; anything else (SQL
    NULL, JSON null, another kind) reads as ``empty``, as ``reads.membership_views`` reads it."""
    if text is not None:
        text = text.lstrip()
        if text.startswith(opening):
            return orjson.Fragment(text)
    return empty


def membership_page(
    session: Session | Connection, query: MembershipQuery, *, now_ms: int | None = None
) -> bytes | None:
    """The memberships ``query`` selects as Clerk's listing body, ``{"data": [...],
    "total_count": n}``, each membership the JSON value ``membership`` gives its view; None
    when the query's organization or user is unknown.

    Stored metadata and permissions go into the body as the text they are stored as, and so
    does public user data its writers found complete (``models.userdata``); each organization
    is encoded once per page: a page costs one encoding, and a parse per row only for public
    user data that gets defaults."""
    found = reads.select_memberships(session, query, _PAGE_COLUMNS, now_ms=now_ms)
    if found is None:
        return None
    orgs = {
        org_id: orjson.Fragment(encode(organization(view, counts=True)))
        for org_id, view in found.organizations.items()
    }
    data = []
    # Stored permissions and metadata repeat across a page (a role's permissions, "{}"): each
    # distinct text is judged once.
    arrays: dict[str | None, orjson.Fragment] = {}
    objects: dict[str | None, orjson.Fragment] = {}
    # Plain tuples in ``_PAGE_COLUMNS`` order (then the total): unpacking beats attribute access.
    for (
        ident,
        org_id,
        user_id,
        role,
        role_name,
        perms,
        public,
        private,
        user_data,
        user_data_complete,
        identifier,
        created,
        updated,
        _,
    ) in found.rows:
        permissions = arrays.get(perms)
        if permissions is None:
            permissions = arrays[perms] = _stored(perms, _EMPTY_ARRAY, "[")
        public_metadata = objects.get(public)
        if public_metadata is None:
            public_metadata = objects[public] = _stored(public, _EMPTY_OBJECT, "{")
        private_metadata = objects.get(private)
        if private_metadata is None:
            private_metadata = objects[private] = _stored(private, _EMPTY_OBJECT, "{")
        user: Json | orjson.Fragment
        if user_data_complete and user_data is not None:
            user = orjson.Fragment(user_data)
        else:
            user = complete_user_data(reads.membership_user_data(user_data, user_id, identifier))
        data.append(
            {
                "object": "organization_membership",
                "id": ident,
                "role": role,
                "role_name": role_name,
                "permissions": permissions,
                "public_metadata": public_metadata,
                "private_metadata": private_metadata,
                "organization": orgs.get(org_id),
                "public_user_data": user,
                "created_at": created,
                "updated_at": updated,
            }
        )
    page = {"data": data, "total_count": found.total_count}
    try:
        return orjson.dumps(page)
    except TypeError:  # an integer beyond 64 bits in some public user data: encoded one by one
        for item in data:
            if not isinstance(item["public_user_data"], orjson.Fragment):
                item["public_user_data"] = orjson.Fragment(encode(item["public_user_data"]))
        return orjson.dumps(page)


def invitation(inv: InvitationDetailView, *, with_organization: bool = False) -> Json:
    data: Json = {
        "object": "organization_invitation",
        "id": inv.id,
        "email_address": inv.email_address,
        "role": inv.role,
        "role_name": inv.role_name,
        "organization_id": inv.organization_id,
        "inviter_id": inv.inviter_id,
        "public_inviter_data": inv.public_inviter_data,
        "status": inv.status,
        "public_metadata": inv.public_metadata,
        "private_metadata": inv.private_metadata,
        "url": inv.url,
        "expires_at": inv.expires_at,
        "created_at": inv.created_at,
        "updated_at": inv.updated_at,
    }
    if inv.user_id is not None:
        data["user_id"] = inv.user_id
    if with_organization and inv.public_organization_data is not None:
        data["public_organization_data"] = inv.public_organization_data
    return data


def permission(perm: PermissionView) -> Json:
    data: Json = {
        "object": "permission",
        "id": perm.id,
        "name": perm.name,
        "key": perm.key,
        "description": perm.description,
        "type": perm.type,
    }
    if isinstance(perm, TimedPermissionView):
        data["created_at"] = perm.created_at
        data["updated_at"] = perm.updated_at
    return data


def role(rec: RoleView) -> Json:
    return {
        "object": "role",
        "id": rec.id,
        "name": rec.name,
        "key": rec.key,
        "description": rec.description,
        "is_creator_eligible": bool(rec.is_creator_eligible),
        "permissions": [permission(p) for p in rec.permissions],
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def role_set_item(item: RoleSetItemView) -> Json:
    return {
        "object": "role_set_item",
        "id": item.id or "",
        "name": item.name or item.key,
        "key": item.key,
        "description": item.description,
        "created_at": item.created_at or 0,
        "updated_at": item.updated_at or 0,
    }


def role_set(rec: RoleSetView) -> Json:
    return {
        "object": "role_set",
        "id": rec.id,
        "name": rec.name or "",
        "key": rec.key or "",
        "description": rec.description,
        "roles": [role_set_item(item) for item in rec.roles],
        "default_role": None if rec.default_role is None else role_set_item(rec.default_role),
        "creator_role": None if rec.creator_role is None else role_set_item(rec.creator_role),
        "type": rec.type or "custom",
        # Migrations between role sets are not mirrored; none is ever shown in progress.
        "role_set_migration": None,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def domain(rec: DomainView) -> Json:
    verification = (
        None
        if rec.verification_status is None
        else {
            "status": rec.verification_status,
            "strategy": "email_code",
            "attempts": None,
            "expire_at": None,
            "verified_at": None,
        }
    )
    return {
        "object": "organization_domain",
        "id": rec.id,
        "organization_id": rec.organization_id,
        "name": rec.name or "",
        "enrollment_mode": rec.enrollment_mode or "manual_invitation",
        "affiliation_email_address": rec.affiliation_email_address,
        "affiliation_verification": verification,
        "ownership_verification": None,
        "verification": None if verification is None else dict(verification),
        "total_pending_invitations": rec.total_pending_invitations,
        "total_pending_suggestions": rec.total_pending_suggestions,
        "public_organization_data": rec.public_organization_data,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def _email_address(address: str, rec: UserView) -> Json:
    # The mirror keeps the address only: no id, verification or timestamps of its own (the
    # user's are given, as Clerk requires them).
    return {
        "object": "email_address",
        "email_address": address,
        "reserved": False,
        "verification": None,
        "linked_to": [],
        "created_at": rec.created_at or 0,
        "updated_at": rec.updated_at or rec.created_at or 0,
    }


def user(rec: UserView) -> Json:
    image = rec.image_url or ""
    return {
        "object": "user",
        "id": rec.id,
        "external_id": rec.external_id,
        "primary_email_address_id": None,
        "primary_phone_number_id": None,
        "primary_web3_wallet_id": None,
        "username": rec.username,
        "first_name": rec.first_name,
        "last_name": rec.last_name,
        "image_url": image,
        "profile_image_url": image,
        "has_image": rec.has_image,
        "public_metadata": rec.public_metadata,
        "email_addresses": [_email_address(address, rec) for address in rec.email_addresses],
        "phone_numbers": [],
        "web3_wallets": [],
        "passkeys": [],
        "password_enabled": False,
        "two_factor_enabled": False,
        "totp_enabled": False,
        "backup_code_enabled": False,
        "mfa_enabled_at": None,
        "mfa_disabled_at": None,
        "external_accounts": [],
        "saml_accounts": [],
        "enterprise_accounts": [],
        "last_sign_in_at": None,
        "banned": rec.banned,
        "locked": rec.locked,
        "lockout_expires_in_seconds": None,
        "verification_attempts_remaining": None,
        "delete_self_enabled": False,
        "create_organization_enabled": False,
        "last_active_at": rec.last_active_at,
        "legal_accepted_at": None,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }
