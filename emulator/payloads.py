"""Clerk-shaped objects: the one set of builders for API responses, webhook bodies, tests and the benchmark.

The keyword builders (``organization_data``, ``membership_data``, ...) take every field as a
keyword argument with a plausible default, so that a test names only what it varies; a field
given as ``OMIT`` is left out of the payload (Clerk leaves out, for instance, ``members_count``
unless asked; ``BARE_ORGANIZATION`` and ``BARE_MEMBERSHIP`` leave out every optional field).
``event_envelope`` wraps an object in a webhook event, ``webhook_body`` as its JSON text. The
record builders (``organization``, ``membership``, ...) are the emulator's:
they fill every field from its records, with every field that the Backend API spec marks
required (the official SDK rejects a response missing one) and the optional ones a mirror reads.
Metadata dicts are copied so that a payload is a snapshot, never a live view of the state.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

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
# The default object timestamp of the keyword builders (2024-05-28T08:00:00Z, in ms).
T0: Final = 1_716_883_200_000
DEFAULT_IMAGE_URL = "https://img.clerk.com/u"
DEFAULT_ORG_IMAGE_URL = "https://img.clerk.com/org"
DEFAULT_INVITATION_URL = "https://accounts.acme.com/accept-invitation?token=abc123"
DEFAULT_INSTANCE_ID = "ins_test"
EMULATOR_EVENT_ATTRIBUTES: Final[Json] = {
    "http_request": {"client_ip": "127.0.0.1", "user_agent": "orgsync-emulator"}
}


class _Omit:
    """The type of ``OMIT``: a field given this value is not in the payload at all."""

    def __repr__(self) -> str:
        return "OMIT"


OMIT: Final[Any] = _Omit()
# The default of a field derived from other fields (None is a value Clerk sends, not "unset").
_DERIVED: Final[Any] = object()


# Spread into organization_data / membership_data for a payload with only identity, role and
# timestamps (what many tests and the benchmark need): a mirror stores the fields left out as null.
BARE_ORGANIZATION: Final[Mapping[str, Any]] = MappingProxyType(
    {
        name: OMIT
        for name in (
            "image_url",
            "has_image",
            "members_count",
            "missing_member_with_elevated_permissions",
            "pending_invitations_count",
            "max_allowed_memberships",
            "admin_delete_enabled",
            "public_metadata",
            "private_metadata",
            "created_by",
        )
    }
)
BARE_MEMBERSHIP: Final[Mapping[str, Any]] = MappingProxyType(
    {name: OMIT for name in ("role_name", "permissions", "public_metadata", "private_metadata")}
)


def _meta(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if value is None else copy.deepcopy(dict(value))


def _present(data: Json) -> Json:
    return {key: value for key, value in data.items() if value is not OMIT}


def user_image_url(user_id: str) -> str:
    return f"{IMAGE_BASE}/user/{user_id}"


# -- keyword builders ------------------------------------------------------------------------


def organization_data(
    org_id: str,
    *,
    name: str = "Acme Corp",
    slug: str | None = None,
    image_url: Any = DEFAULT_ORG_IMAGE_URL,
    has_image: Any = True,
    members_count: Any = 1,
    missing_member_with_elevated_permissions: Any = False,
    pending_invitations_count: Any = 0,
    max_allowed_memberships: Any = 5,
    admin_delete_enabled: Any = True,
    public_metadata: Any = None,
    private_metadata: Any = None,
    created_by: Any = "user_creator",
    created_at: int = T0,
    updated_at: int | None = None,
    role_set_key: Any = OMIT,
    **extra: Any,
) -> Json:
    """An ``organization`` (``slug`` defaults to the id with dashes, ``updated_at`` to ``created_at``)."""
    data: Json = {
        "object": "organization",
        "id": org_id,
        "name": name,
        "slug": slug if slug is not None else org_id.replace("_", "-"),
        "image_url": image_url,
        "has_image": has_image,
        "members_count": members_count,
        "missing_member_with_elevated_permissions": missing_member_with_elevated_permissions,
        "pending_invitations_count": pending_invitations_count,
        "max_allowed_memberships": max_allowed_memberships,
        "admin_delete_enabled": admin_delete_enabled,
        "public_metadata": public_metadata if public_metadata is OMIT else _meta(public_metadata),
        "private_metadata": private_metadata if private_metadata is OMIT else _meta(private_metadata),
        "created_by": created_by,
        "created_at": created_at,
        "updated_at": created_at if updated_at is None else updated_at,
        "role_set_key": role_set_key,
    }
    data.update(extra)
    return _present(data)


def user_public_data(
    user_id: str,
    *,
    first_name: Any = "Jane",
    last_name: Any = "Doe",
    identifier: str | None = None,
    image_url: Any = DEFAULT_IMAGE_URL,
    profile_image_url: Any = None,
    has_image: Any = True,
    username: Any = OMIT,
    banned: Any = OMIT,
    deprovisioned: Any = OMIT,
    **extra: Any,
) -> Json:
    """A membership's ``public_user_data`` (``identifier`` defaults to ``<user_id>@example.com``)."""
    data: Json = {
        "user_id": user_id,
        "first_name": first_name,
        "last_name": last_name,
        "profile_image_url": image_url if profile_image_url is None else profile_image_url,
        "image_url": image_url,
        "has_image": has_image,
        "identifier": identifier or f"{user_id}@example.com",
        "username": username,
        "banned": banned,
        "deprovisioned": deprovisioned,
    }
    data.update(extra)
    return _present(data)


def membership_data(
    membership_id: str,
    org: Json,
    user_id: str,
    *,
    role: str = "org:member",
    role_name: Any = _DERIVED,
    permissions: Any = None,
    public_metadata: Any = None,
    private_metadata: Any = None,
    public_user_data: Json | None = None,
    created_at: int = T0,
    updated_at: int | None = None,
    **extra: Any,
) -> Json:
    """An ``organization_membership`` of ``user_id`` in ``org`` (an organization object).

    ``role_name`` defaults to the role key's title ("org:billing_manager" -> "Billing Manager"),
    ``permissions`` to member-level ones, ``public_user_data`` to ``user_public_data(user_id)``.
    """
    data: Json = {
        "object": "organization_membership",
        "id": membership_id,
        "role": role,
        "role_name": (
            role.removeprefix("org:").replace("_", " ").title() if role_name is _DERIVED else role_name
        ),
        "permissions": ["org:sys_memberships:read"] if permissions is None else permissions,
        "public_metadata": public_metadata if public_metadata is OMIT else _meta(public_metadata),
        "private_metadata": private_metadata if private_metadata is OMIT else _meta(private_metadata),
        "organization": org,
        "public_user_data": user_public_data(user_id) if public_user_data is None else public_user_data,
        "created_at": created_at,
        "updated_at": created_at if updated_at is None else updated_at,
    }
    data.update(extra)
    return _present(data)


def invitation_data(
    invitation_id: str,
    org_id: str,
    *,
    email: str = "jane.doe@acme.com",
    role: str = "org:member",
    role_name: Any = "Member",
    inviter_id: Any = OMIT,
    public_inviter_data: Any = OMIT,
    status: str = "pending",
    public_metadata: Any = None,
    private_metadata: Any = None,
    url: Any = DEFAULT_INVITATION_URL,
    created_at: int = T0,
    updated_at: int | None = None,
    expires_at: Any = _DERIVED,
    user_id: Any = OMIT,
    **extra: Any,
) -> Json:
    """An ``organization_invitation`` (``expires_at`` defaults to seven days after ``created_at``)."""
    data: Json = {
        "object": "organization_invitation",
        "id": invitation_id,
        "email_address": email,
        "role": role,
        "role_name": role_name,
        "organization_id": org_id,
        "inviter_id": inviter_id,
        "public_inviter_data": public_inviter_data,
        "status": status,
        "public_metadata": public_metadata if public_metadata is OMIT else _meta(public_metadata),
        "private_metadata": private_metadata if private_metadata is OMIT else _meta(private_metadata),
        "url": url,
        "expires_at": created_at + 7 * 86_400_000 if expires_at is _DERIVED else expires_at,
        "created_at": created_at,
        "updated_at": created_at if updated_at is None else updated_at,
    }
    # Clerk sends user_id only once an invitation is accepted.
    data["user_id"] = OMIT if user_id is None else user_id
    data.update(extra)
    return _present(data)


def permission_data(
    perm_id: str,
    key: str,
    *,
    name: Any = _DERIVED,
    description: Any = _DERIVED,
    type: Any = "custom",
    created_at: Any = T0,
    updated_at: Any = None,
    **extra: Any,
) -> Json:
    """A ``permission`` (``name`` defaults to the key's last part, titled; ``description`` to a sentence)."""
    data: Json = {
        "object": "permission",
        "id": perm_id,
        "name": key.rpartition(":")[2].title() if name is _DERIVED else name,
        "key": key,
        "description": f"Ability to {key}" if description is _DERIVED else description,
        "type": type,
        "created_at": created_at,
        "updated_at": created_at if updated_at is None else updated_at,
    }
    data.update(extra)
    return _present(data)


def role_data(
    role_id: str,
    key: str,
    *,
    name: str = "Editor",
    description: Any = _DERIVED,
    is_creator_eligible: Any = False,
    permissions: Sequence[str | Json] | None = None,
    created_at: int = T0,
    updated_at: int | None = None,
    **extra: Any,
) -> Json:
    """A ``role``; each permission given as a key becomes ``permission_data("perm_<key>", key)``."""
    data: Json = {
        "object": "role",
        "id": role_id,
        "name": name,
        "key": key,
        "description": f"The {name} role" if description is _DERIVED else description,
        "is_creator_eligible": is_creator_eligible,
        "permissions": [
            permission_data(f"perm_{item}", item) if isinstance(item, str) else item
            for item in (["org:posts:edit"] if permissions is None else permissions)
        ],
        "created_at": created_at,
        "updated_at": created_at if updated_at is None else updated_at,
    }
    data.update(extra)
    return _present(data)


def user_data(
    user_id: str,
    *,
    first_name: Any = "John",
    last_name: Any = "Doe",
    username: Any = None,
    emails: Sequence[str] | None = None,
    primary: int = 0,
    email_addresses: list[Json] | None = None,
    primary_email_address_id: Any = None,
    image_url: Any = DEFAULT_IMAGE_URL,
    has_image: Any = True,
    public_metadata: Any = None,
    private_metadata: Any = None,
    phone_numbers: Any = None,
    created_at: int = T0,
    updated_at: int | None = None,
    **extra: Any,
) -> Json:
    """A ``user``: ``emails`` become minimal email address objects (``email_addresses`` replaces them).

    ``primary_email_address_id`` defaults to the id of ``primary``'s address; ``private_metadata``
    to a private value that a mirror must never store; ``phone_numbers`` to one number.
    """
    if email_addresses is None:
        email_addresses = [
            {"object": "email_address", "id": f"idn_{user_id}_{i}", "email_address": email}
            for i, email in enumerate(emails if emails is not None else [f"{user_id}@example.com"])
        ]
    if primary_email_address_id is None and email_addresses:
        primary_email_address_id = email_addresses[primary]["id"]
    data: Json = {
        "object": "user",
        "id": user_id,
        "external_id": None,
        "primary_email_address_id": primary_email_address_id,
        "username": username,
        "first_name": first_name,
        "last_name": last_name,
        "image_url": image_url,
        "has_image": has_image,
        "public_metadata": _meta(public_metadata),
        "private_metadata": {"secret": "never mirrored"}
        if private_metadata is None
        else _meta(private_metadata),
        "unsafe_metadata": {},
        "email_addresses": email_addresses,
        "phone_numbers": (
            [{"id": "idn_phone", "phone_number": "+15555550100"}] if phone_numbers is None else phone_numbers
        ),
        "created_at": created_at,
        "updated_at": created_at if updated_at is None else updated_at,
    }
    data.update(extra)
    return _present(data)


def domain_data(
    domain_id: str,
    org_id: str,
    *,
    name: Any = "acme.com",
    enrollment_mode: Any = "automatic_invitation",
    verification_status: Any = "verified",
    total_pending_invitations: Any = 2,
    created_at: int = T0,
    updated_at: int | None = None,
    **extra: Any,
) -> Json:
    """An ``organization_domain`` as ``organizationDomain.*`` events carry it."""
    verification = (
        None
        if verification_status is None
        else {
            "status": verification_status,
            "strategy": "email_code",
            "attempts": 1,
            "expire_at": None,
            "verified_at": None,
        }
    )
    data: Json = {
        "object": "organization_domain",
        "id": domain_id,
        "organization_id": org_id,
        "name": name,
        "enrollment_mode": enrollment_mode,
        "affiliation_email_address": None,
        "affiliation_verification": verification,
        "ownership_verification": None,
        "verification": verification,
        "total_pending_invitations": total_pending_invitations,
        "total_pending_suggestions": 0,
        "public_organization_data": {"id": org_id, "name": "Acme", "slug": "acme"},
        "created_at": created_at,
        "updated_at": created_at if updated_at is None else updated_at,
    }
    data.update(extra)
    return _present(data)


def deleted(object_name: str, ident: str, **extra: Any) -> Json:
    """The stub Clerk sends for a deletion, with ``extra`` fields (an organization's carries its slug)."""
    return {"object": object_name, "id": ident, "deleted": True, **extra}


def event_envelope(
    event_type: str,
    data: Json,
    timestamp: int,
    *,
    instance_id: Any = DEFAULT_INSTANCE_ID,
    event_attributes: Any = OMIT,
    **extra: Any,
) -> Json:
    """A webhook event: ``{"data", "object": "event", "type", "timestamp", "instance_id"}`` (ms timestamp)."""
    body: Json = {
        "data": data,
        "object": "event",
        "type": event_type,
        "timestamp": timestamp,
        "instance_id": instance_id,
        "event_attributes": event_attributes,
    }
    body.update(extra)
    return _present(body)


def webhook_body(
    event_type: str,
    data: Json,
    timestamp: int,
    *,
    instance_id: Any = DEFAULT_INSTANCE_ID,
    event_attributes: Any = OMIT,
    **extra: Any,
) -> str:
    """``event_envelope(...)`` as the JSON text a webhook request carries."""
    return json.dumps(
        event_envelope(
            event_type, data, timestamp, instance_id=instance_id, event_attributes=event_attributes, **extra
        )
    )


# -- the emulator's record builders -----------------------------------------------------------


def organization(
    org: OrganizationRecord, *, members_count: int | None = None, pending_invitations_count: int | None = None
) -> Json:
    return organization_data(
        org.id,
        name=org.name,
        slug=org.slug,
        image_url=f"{IMAGE_BASE}/organization/{org.id}",
        has_image=False,
        members_count=OMIT if members_count is None else members_count,
        missing_member_with_elevated_permissions=OMIT,
        pending_invitations_count=OMIT if pending_invitations_count is None else pending_invitations_count,
        max_allowed_memberships=org.max_allowed_memberships,
        admin_delete_enabled=org.admin_delete_enabled,
        public_metadata=org.public_metadata,
        private_metadata=org.private_metadata,
        created_by=OMIT if org.created_by is None else org.created_by,
        created_at=org.created_at,
        updated_at=org.updated_at,
        role_set_key=None,
    )


def public_user_data(user: UserRecord) -> Json:
    return user_public_data(
        user.id,
        first_name=user.first_name,
        last_name=user.last_name,
        identifier=user.email_address,
        image_url=user_image_url(user.id),
        has_image=False,
        username=user.username,
        banned=False,
        deprovisioned=False,
    )


def membership(
    mem: MembershipRecord, *, org: Json, user: UserRecord, role: RoleRecord, permission_keys: list[str]
) -> Json:
    return membership_data(
        mem.id,
        org,
        user.id,
        role=mem.role,
        role_name=role.name,
        permissions=list(permission_keys),
        public_metadata=mem.public_metadata,
        private_metadata=mem.private_metadata,
        public_user_data=public_user_data(user),
        created_at=mem.created_at,
        updated_at=mem.updated_at,
    )


def invitation(inv: InvitationRecord, *, role_name: str, inviter: UserRecord | None) -> Json:
    inviter_data: Json | None = None
    if inviter is not None:
        inviter_data = user_public_data(
            inviter.id,
            first_name=inviter.first_name,
            last_name=inviter.last_name,
            image_url=user_image_url(inviter.id),
            profile_image_url=OMIT,
            has_image=False,
            identifier=inviter.email_address,
        )
    return invitation_data(
        inv.id,
        inv.organization_id,
        email=inv.email_address,
        role=inv.role,
        role_name=role_name,
        inviter_id=inv.inviter_id,
        public_inviter_data=inviter_data,
        status=inv.status,
        public_metadata=inv.public_metadata,
        private_metadata=inv.private_metadata,
        url=inv.url,
        expires_at=inv.expires_at,
        created_at=inv.created_at,
        updated_at=inv.updated_at,
        user_id=inv.user_id,
    )


def permission(perm: PermissionRecord) -> Json:
    return permission_data(
        perm.id,
        perm.key,
        name=perm.name,
        description=perm.description,
        type=perm.type,
        created_at=perm.created_at,
        updated_at=perm.updated_at,
    )


def role(rec: RoleRecord, permissions: list[PermissionRecord]) -> Json:
    return role_data(
        rec.id,
        rec.key,
        name=rec.name,
        description=rec.description,
        is_creator_eligible=rec.is_creator_eligible,
        permissions=[permission(p) for p in permissions],
        created_at=rec.created_at,
        updated_at=rec.updated_at,
    )


def user(rec: UserRecord) -> Json:
    image = user_image_url(rec.id)
    return user_data(
        rec.id,
        first_name=rec.first_name,
        last_name=rec.last_name,
        username=rec.username,
        email_addresses=[
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
        primary_email_address_id=rec.email_id,
        external_id=rec.external_id,
        primary_phone_number_id=None,
        primary_web3_wallet_id=None,
        image_url=image,
        profile_image_url=image,
        has_image=False,
        public_metadata=rec.public_metadata,
        private_metadata=rec.private_metadata,
        phone_numbers=[],
        web3_wallets=[],
        passkeys=[],
        password_enabled=False,
        two_factor_enabled=False,
        totp_enabled=False,
        backup_code_enabled=False,
        mfa_enabled_at=None,
        mfa_disabled_at=None,
        external_accounts=[],
        saml_accounts=[],
        enterprise_accounts=[],
        last_sign_in_at=None,
        banned=False,
        locked=False,
        lockout_expires_in_seconds=None,
        verification_attempts_remaining=100,
        delete_self_enabled=True,
        create_organization_enabled=True,
        last_active_at=None,
        legal_accepted_at=None,
        created_at=rec.created_at,
        updated_at=rec.updated_at,
    )


def domain(rec: DomainRecord, org: OrganizationRecord, *, pending_invitations: int = 0) -> Json:
    payload = domain_data(
        rec.id,
        rec.organization_id,
        name=rec.name,
        enrollment_mode=rec.enrollment_mode,
        verification_status="verified" if rec.verified else None,
        total_pending_invitations=pending_invitations,
        created_at=rec.created_at,
        updated_at=rec.updated_at,
    )
    payload["public_organization_data"] = {
        "id": org.id,
        "name": org.name,
        "slug": org.slug,
        "image_url": f"{IMAGE_BASE}/organization/{org.id}",
        "has_image": False,
    }
    return payload


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


def envelope(event_type: str, data: Json, *, timestamp: int, instance_id: str) -> Json:
    """The envelope of an emulator delivery, with the request attributes Clerk adds."""
    attributes = copy.deepcopy(EMULATOR_EVENT_ATTRIBUTES)
    return event_envelope(event_type, data, timestamp, instance_id=instance_id, event_attributes=attributes)
