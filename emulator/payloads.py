"""Clerk-shaped objects: one builder per object, used for API responses and webhook ``data`` alike.

Each builder carries every field that the Backend API spec marks required (the official SDK
rejects a response missing one) and the optional ones a mirror reads. Metadata dicts are
copied so that a payload is a snapshot, never a live view of the state.
"""

from __future__ import annotations

import copy
from typing import Any

from emulator.records import (
    DomainRecord,
    InvitationRecord,
    Json,
    MembershipRecord,
    OrganizationRecord,
    PermissionRecord,
    RoleRecord,
    UserRecord,
)

IMAGE_BASE = "https://img.clerk.com/emulator"


def _meta(value: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(value)


def user_image_url(user_id: str) -> str:
    return f"{IMAGE_BASE}/user/{user_id}"


def organization(
    org: OrganizationRecord, *, members_count: int | None = None, pending_invitations_count: int | None = None
) -> Json:
    data: Json = {
        "object": "organization",
        "id": org.id,
        "name": org.name,
        "slug": org.slug,
        "image_url": f"{IMAGE_BASE}/organization/{org.id}",
        "has_image": False,
        "max_allowed_memberships": org.max_allowed_memberships,
        "admin_delete_enabled": org.admin_delete_enabled,
        "public_metadata": _meta(org.public_metadata),
        "private_metadata": _meta(org.private_metadata),
        "created_at": org.created_at,
        "updated_at": org.updated_at,
        "role_set_key": None,
    }
    if org.created_by is not None:
        data["created_by"] = org.created_by
    if members_count is not None:
        data["members_count"] = members_count
    if pending_invitations_count is not None:
        data["pending_invitations_count"] = pending_invitations_count
    return data


def public_user_data(user: UserRecord) -> Json:
    image = user_image_url(user.id)
    return {
        "user_id": user.id,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "profile_image_url": image,
        "image_url": image,
        "has_image": False,
        "identifier": user.email_address,
        "username": user.username,
        "banned": False,
        "deprovisioned": False,
    }


def membership(
    mem: MembershipRecord, *, org: Json, user: UserRecord, role: RoleRecord, permission_keys: list[str]
) -> Json:
    return {
        "object": "organization_membership",
        "id": mem.id,
        "role": mem.role,
        "role_name": role.name,
        "permissions": list(permission_keys),
        "public_metadata": _meta(mem.public_metadata),
        "private_metadata": _meta(mem.private_metadata),
        "organization": org,
        "public_user_data": public_user_data(user),
        "created_at": mem.created_at,
        "updated_at": mem.updated_at,
    }


def invitation(inv: InvitationRecord, *, role_name: str, inviter: UserRecord | None) -> Json:
    inviter_data: Json | None = None
    if inviter is not None:
        inviter_data = {
            "user_id": inviter.id,
            "first_name": inviter.first_name,
            "last_name": inviter.last_name,
            "image_url": user_image_url(inviter.id),
            "has_image": False,
            "identifier": inviter.email_address,
        }
    data: Json = {
        "object": "organization_invitation",
        "id": inv.id,
        "email_address": inv.email_address,
        "role": inv.role,
        "role_name": role_name,
        "organization_id": inv.organization_id,
        "inviter_id": inv.inviter_id,
        "public_inviter_data": inviter_data,
        "status": inv.status,
        "public_metadata": _meta(inv.public_metadata),
        "private_metadata": _meta(inv.private_metadata),
        "url": inv.url,
        "expires_at": inv.expires_at,
        "created_at": inv.created_at,
        "updated_at": inv.updated_at,
    }
    if inv.user_id is not None:
        data["user_id"] = inv.user_id
    return data


def permission(perm: PermissionRecord) -> Json:
    return {
        "object": "permission",
        "id": perm.id,
        "name": perm.name,
        "key": perm.key,
        "description": perm.description,
        "type": perm.type,
        "created_at": perm.created_at,
        "updated_at": perm.updated_at,
    }


def role(rec: RoleRecord, permissions: list[PermissionRecord]) -> Json:
    return {
        "object": "role",
        "id": rec.id,
        "name": rec.name,
        "key": rec.key,
        "description": rec.description,
        "is_creator_eligible": rec.is_creator_eligible,
        "permissions": [permission(p) for p in permissions],
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def user(rec: UserRecord) -> Json:
    image = user_image_url(rec.id)
    return {
        "object": "user",
        "id": rec.id,
        "external_id": None,
        "primary_email_address_id": rec.email_id,
        "primary_phone_number_id": None,
        "primary_web3_wallet_id": None,
        "username": rec.username,
        "first_name": rec.first_name,
        "last_name": rec.last_name,
        "image_url": image,
        "profile_image_url": image,
        "has_image": False,
        "public_metadata": _meta(rec.public_metadata),
        "private_metadata": _meta(rec.private_metadata),
        "unsafe_metadata": {},
        "email_addresses": [
            {
                "object": "email_address",
                "id": rec.email_id,
                "email_address": rec.email_address,
                "reserved": False,
                "verification": {
                    "object": "verification_admin",
                    "status": "verified",
                    "strategy": "admin",
                    "attempts": None,
                    "expire_at": None,
                },
                "linked_to": [],
                "created_at": rec.created_at,
                "updated_at": rec.created_at,
            }
        ],
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
        "banned": False,
        "locked": False,
        "lockout_expires_in_seconds": None,
        "verification_attempts_remaining": 100,
        "delete_self_enabled": True,
        "create_organization_enabled": True,
        "last_active_at": None,
        "legal_accepted_at": None,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def domain(rec: DomainRecord, org: OrganizationRecord, *, pending_invitations: int = 0) -> Json:
    verification = (
        {
            "status": "verified",
            "strategy": "email_code",
            "attempts": 1,
            "expire_at": None,
            "verified_at": None,
        }
        if rec.verified
        else None
    )
    return {
        "object": "organization_domain",
        "id": rec.id,
        "organization_id": rec.organization_id,
        "name": rec.name,
        "enrollment_mode": rec.enrollment_mode,
        "affiliation_email_address": None,
        "affiliation_verification": verification,
        "ownership_verification": None,
        "verification": verification,
        "total_pending_invitations": pending_invitations,
        "total_pending_suggestions": 0,
        "public_organization_data": {
            "id": org.id,
            "name": org.name,
            "slug": org.slug,
            "image_url": f"{IMAGE_BASE}/organization/{org.id}",
            "has_image": False,
        },
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def role_set(key: str, roles: list[RoleRecord], *, default_key: str, creator_key: str) -> Json:
    """The instance's one role set: every role, with the default and creator roles named."""

    def item(role: RoleRecord) -> Json:
        return {
            "object": "role_set_item",
            "id": role.id,
            "name": role.name,
            "key": role.key,
            "description": role.description,
            "created_at": role.created_at,
            "updated_at": role.updated_at,
        }

    by_key = {role.key: role for role in roles}
    return {
        "object": "role_set",
        "id": "rs_default",
        "name": "Default",
        "key": key,
        "description": None,
        "roles": [item(role) for role in roles],
        "default_role": item(by_key[default_key]) if default_key in by_key else None,
        "creator_role": item(by_key[creator_key]) if creator_key in by_key else None,
        "type": "initial",
        "role_set_migration": None,
        "created_at": min((role.created_at for role in roles), default=0),
        "updated_at": max((role.updated_at for role in roles), default=0),
    }


def deleted(object_name: str, ident: str, *, slug: str | None = None) -> Json:
    data: Json = {"object": object_name, "id": ident, "deleted": True}
    if slug is not None:
        data["slug"] = slug
    return data


def envelope(event_type: str, data: Json, *, timestamp: int, instance_id: str) -> Json:
    return {
        "data": data,
        "object": "event",
        "type": event_type,
        "timestamp": timestamp,
        "instance_id": instance_id,
        "event_attributes": {"http_request": {"client_ip": "127.0.0.1", "user_agent": "orgsync-emulator"}},
    }
