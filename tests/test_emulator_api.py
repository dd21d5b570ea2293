"""The emulator's Backend API driven through the official ``clerk_backend_api`` SDK over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from clerk_backend_api import Clerk
from clerk_backend_api.models import ClerkBaseError
from clerk_backend_api.models import CreateOrganizationInvitationBulkRequestBody as Invite
from clerk_backend_api.models import ListOrganizationInvitationsQueryParamStatus as Status
from clerk_backend_api.utils.retries import BackoffStrategy, RetryConfig

from emulator import Emulator, EmulatorConfig

SECRET_KEY = "sk_test_emulator_api"
NO_RETRIES = RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), retry_connection_errors=False)


def start(**overrides: Any) -> Emulator:
    options: dict[str, Any] = {"port": 0, "secret_key": SECRET_KEY, "rate_limit": 0}
    options.update(overrides)
    return Emulator(EmulatorConfig(**options)).start()


def sdk(emu: Emulator, key: str = SECRET_KEY) -> Clerk:
    return Clerk(bearer_auth=key, server_url=emu.api_url, retry_config=NO_RETRIES)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    emulator = start()
    yield emulator
    emulator.stop()


@pytest.fixture
def clerk(emu: Emulator) -> Clerk:
    return sdk(emu)


def error_of(exc: pytest.ExceptionInfo[ClerkBaseError]) -> tuple[int, str, dict[str, Any]]:
    """(status, errors[0].code, body): parsed from the raw body, as some errors arrive as SDKError."""
    body = json.loads(exc.value.body)
    return exc.value.status_code, body["errors"][0]["code"], body


def raw(
    emu: Emulator, method: str, path: str, body: Any = None, key: str = SECRET_KEY
) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{emu.url}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def new_user(clerk: Clerk, name: str) -> str:
    user = clerk.users.create(
        email_address=[f"{name}@example.com"], first_name=name.title(), last_name="Test"
    )
    return user.id


def org_with_admin(clerk: Clerk, name: str = "Acme") -> tuple[str, str]:
    admin = new_user(clerk, f"{name.lower().replace(' ', '-')}-admin")
    org = clerk.organizations.create(request={"name": name, "created_by": admin})
    return org.id, admin


# ------------------------------------------------------------------ organizations
def test_organizations_create_get_list_delete(clerk: Clerk) -> None:
    org_id, admin = org_with_admin(clerk, "Acme Corp")
    other = clerk.organizations.create(
        request={
            "name": "Globex",
            "slug": "globex",
            "max_allowed_memberships": 5,
            "public_metadata": {"tier": 1},
        }
    )
    assert other.slug == "globex" and other.max_allowed_memberships == 5
    assert other.public_metadata == {"tier": 1}

    by_id = clerk.organizations.get(organization_id=org_id, include_members_count=True)
    by_slug = clerk.organizations.get(organization_id="acme-corp")
    assert by_id.id == by_slug.id == org_id
    assert by_id.members_count == 1
    assert by_id.created_by == admin

    page = clerk.organizations.list(limit=1, offset=0, order_by="+created_at")
    assert page.total_count == 2 and [o.id for o in page.data] == [org_id]
    page = clerk.organizations.list(limit=10, order_by="name", query="glob")
    assert [o.slug for o in page.data] == ["globex"]

    deleted = clerk.organizations.delete(organization_id=org_id)
    assert deleted.deleted and deleted.id == org_id and deleted.object == "organization"
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organizations.get(organization_id=org_id)
    assert error_of(exc)[:2] == (404, "resource_not_found")
    assert clerk.organizations.list().total_count == 1


def test_error_body_has_clerk_shape(emu: Emulator) -> None:
    status, _, body = raw(emu, "GET", "/v1/organizations/org_missing")
    assert status == 404
    assert set(body) == {"errors", "meta", "clerk_trace_id"}
    assert set(body["errors"][0]) == {"message", "long_message", "code", "meta"}


def test_secret_key_is_checked(emu: Emulator) -> None:
    with pytest.raises(ClerkBaseError) as exc:
        sdk(emu, "sk_test_wrong").organizations.list()
    assert error_of(exc)[:2] == (401, "authentication_invalid")


# -------------------------------------------------------------------- memberships
def test_memberships_list_paging_ordering_and_filters(clerk: Clerk) -> None:
    org_id, admin = org_with_admin(clerk)
    users = [new_user(clerk, f"user{n}") for n in range(5)]
    for n, user in enumerate(users):
        clerk.organization_memberships.create(
            organization_id=org_id, user_id=user, role="org:admin" if n == 0 else "org:member"
        )
    everyone = clerk.organization_memberships.list(organization_id=org_id, limit=500, order_by="+created_at")
    assert everyone.total_count == 6
    assert [m.public_user_data.user_id for m in everyone.data if m.public_user_data] == [admin, *users]

    first = clerk.organization_memberships.list(
        organization_id=org_id, limit=2, offset=0, order_by="created_at"
    )
    rest = clerk.organization_memberships.list(
        organization_id=org_id, limit=500, offset=2, order_by="created_at"
    )
    assert first.total_count == rest.total_count == 6
    assert [m.id for m in first.data + rest.data] == [m.id for m in everyone.data]

    newest = clerk.organization_memberships.list(organization_id=org_id, order_by="-created_at", limit=1)
    assert newest.data[0].public_user_data is not None
    assert newest.data[0].public_user_data.user_id == users[-1]

    admins = clerk.organization_memberships.list(organization_id=org_id, role=["org:admin"])
    assert admins.total_count == 2
    picked = clerk.organization_memberships.list(organization_id=org_id, user_id=users[1:3])
    assert sorted(m.public_user_data.user_id for m in picked.data if m.public_user_data) == sorted(users[1:3])


@pytest.mark.parametrize("limit", [0, 501])
def test_memberships_list_rejects_bad_limit(clerk: Clerk, limit: int) -> None:
    org_id, _ = org_with_admin(clerk)
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_memberships.list(organization_id=org_id, limit=limit)
    status, code, body = error_of(exc)
    assert (status, code) == (422, "form_param_value_invalid")
    assert body["errors"][0]["meta"]["param_name"] == "limit"


def test_memberships_list_rejects_bad_order_by(clerk: Clerk) -> None:
    org_id, _ = org_with_admin(clerk)
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_memberships.list(organization_id=org_id, order_by="-shoe_size")
    assert error_of(exc)[:2] == (422, "form_param_value_invalid")


def test_membership_add_change_metadata_remove(clerk: Clerk) -> None:
    org_id, _ = org_with_admin(clerk)
    user = new_user(clerk, "bob")
    created = clerk.organization_memberships.create(
        organization_id=org_id, user_id=user, role="org:member", public_metadata={"team": "red"}
    )
    assert created.role == "org:member" and created.permissions == ["org:sys_memberships:read"]
    assert created.organization.id == org_id and created.public_metadata == {"team": "red"}
    assert created.id.startswith("orgmem_")

    updated = clerk.organization_memberships.update(organization_id=org_id, user_id=user, role="org:admin")
    assert updated.role == "org:admin" and updated.role_name == "Admin"
    assert "org:sys_memberships:manage" in (updated.permissions or [])
    assert updated.updated_at > created.updated_at

    merged = clerk.organization_memberships.update_metadata(
        organization_id=org_id,
        user_id=user,
        public_metadata={"team": None, "title": "lead", "nested": {"a": 1}},
        private_metadata={"secret": True},
    )
    assert merged.public_metadata == {"title": "lead", "nested": {"a": 1}}
    assert merged.private_metadata == {"secret": True}

    removed = clerk.organization_memberships.delete(organization_id=org_id, user_id=user)
    assert removed.id == created.id
    again = clerk.organization_memberships.create(organization_id=org_id, user_id=user, role="org:member")
    assert again.id != created.id, "a re-added member gets a new membership id"
    assert clerk.users.get_organization_memberships(user_id=user).total_count == 1


def test_last_admin_cannot_be_demoted_or_removed(clerk: Clerk) -> None:
    org_id, admin = org_with_admin(clerk)
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_memberships.update(organization_id=org_id, user_id=admin, role="org:member")
    assert error_of(exc)[:2] == (400, "organization_minimum_permissions_needed")
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_memberships.delete(organization_id=org_id, user_id=admin)
    assert error_of(exc)[:2] == (400, "organization_minimum_permissions_needed")

    second = new_user(clerk, "second")
    clerk.organization_memberships.create(organization_id=org_id, user_id=second, role="org:admin")
    demoted = clerk.organization_memberships.update(organization_id=org_id, user_id=admin, role="org:member")
    assert demoted.role == "org:member"


def test_adding_an_existing_member_fails(clerk: Clerk) -> None:
    org_id, admin = org_with_admin(clerk)
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_memberships.create(organization_id=org_id, user_id=admin, role="org:member")
    assert error_of(exc)[:2] == (400, "already_a_member_in_organization")


def test_membership_quota_counts_pending_invitations(clerk: Clerk) -> None:
    admin = new_user(clerk, "quota-admin")
    org = clerk.organizations.create(
        request={"name": "Small", "created_by": admin, "max_allowed_memberships": 2}
    )
    clerk.organization_invitations.create(
        organization_id=org.id, email_address="x@example.com", role="org:member"
    )
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_memberships.create(
            organization_id=org.id, user_id=new_user(clerk, "y"), role="org:member"
        )
    assert error_of(exc)[:2] == (403, "organization_membership_quota_exceeded")
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_invitations.create(
            organization_id=org.id, email_address="z@example.com", role="org:member"
        )
    assert error_of(exc)[:2] == (403, "organization_membership_quota_exceeded")


@pytest.mark.parametrize("what", ["organization", "user", "role", "membership"])
def test_unknown_ids_and_roles_are_not_found(clerk: Clerk, what: str) -> None:
    org_id, admin = org_with_admin(clerk)
    with pytest.raises(ClerkBaseError) as exc:
        if what == "organization":
            clerk.organization_memberships.create(
                organization_id="org_nope", user_id=admin, role="org:member"
            )
        elif what == "user":
            clerk.organization_memberships.create(
                organization_id=org_id, user_id="user_nope", role="org:member"
            )
        elif what == "role":
            clerk.organization_memberships.update(organization_id=org_id, user_id=admin, role="org:nope")
        else:
            clerk.organization_memberships.delete(organization_id=org_id, user_id="user_nope")
    assert error_of(exc)[:2] == (404, "resource_not_found")


def test_missing_body_parameters(emu: Emulator, clerk: Clerk) -> None:
    org_id, admin = org_with_admin(clerk)
    status, _, body = raw(emu, "POST", f"/v1/organizations/{org_id}/memberships", {"user_id": admin})
    assert (status, body["errors"][0]["code"]) == (422, "form_param_missing")
    assert body["errors"][0]["meta"]["param_name"] == "role"
    status, _, body = raw(emu, "POST", "/v1/organizations", {"slug": "no-name"})
    assert (status, body["errors"][0]["code"]) == (422, "form_param_missing")
    status, _, body = raw(
        emu, "POST", f"/v1/organizations/{org_id}/invitations", {"email_address": "bad", "role": "x"}
    )
    assert (status, body["errors"][0]["code"]) == (422, "form_param_format_invalid")


# -------------------------------------------------------------------- invitations
def test_invitations_create_list_get_bulk_revoke_accept(emu: Emulator, clerk: Clerk) -> None:
    org_id, admin = org_with_admin(clerk)
    invitation = clerk.organization_invitations.create(
        organization_id=org_id,
        email_address="carol@example.com",
        role="org:member",
        inviter_user_id=admin,
        public_metadata={"source": "test"},
        expires_in_days=7,
    )
    assert invitation.status == "pending" and invitation.inviter_id == admin
    assert invitation.public_inviter_data is not None and invitation.public_inviter_data.user_id == admin
    assert invitation.expires_at == invitation.created_at + 7 * 86_400_000

    bulk = clerk.organization_invitations.bulk_create(
        organization_id=org_id,
        request_body=[
            Invite(email_address="dan@example.com", role="org:member"),
            Invite(email_address="eve@example.com", role="org:admin"),
        ],
    )
    assert bulk.total_count == 2 and {i.email_address for i in bulk.data} == {
        "dan@example.com",
        "eve@example.com",
    }

    fetched = clerk.organization_invitations.get(organization_id=org_id, invitation_id=invitation.id)
    assert fetched.id == invitation.id and fetched.public_metadata == {"source": "test"}

    revoked = clerk.organization_invitations.revoke(
        organization_id=org_id, invitation_id=bulk.data[0].id, requesting_user_id=admin
    )
    assert revoked.status == "revoked"

    status, _, membership = raw(emu, "POST", f"/_emulator/invitations/{invitation.id}/accept", {})
    assert status == 200 and membership["role"] == "org:member"
    assert membership["public_metadata"] == {"source": "test"}, "invitation metadata moves to the membership"

    pending = clerk.organization_invitations.list(organization_id=org_id, status=Status.PENDING)
    accepted = clerk.organization_invitations.list(organization_id=org_id, status=Status.ACCEPTED)
    every = clerk.organization_invitations.list(organization_id=org_id, limit=100, order_by="email_address")
    assert [i.email_address for i in pending.data] == ["eve@example.com"]
    assert [i.id for i in accepted.data] == [invitation.id]
    assert [i.email_address for i in every.data] == [
        "carol@example.com",
        "dan@example.com",
        "eve@example.com",
    ]
    members = clerk.organization_memberships.list(organization_id=org_id, limit=100)
    assert members.total_count == 2


def test_duplicate_pending_invitation_fails(clerk: Clerk) -> None:
    org_id, _ = org_with_admin(clerk)
    clerk.organization_invitations.create(
        organization_id=org_id, email_address="dup@example.com", role="org:member"
    )
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_invitations.create(
            organization_id=org_id, email_address="dup@example.com", role="org:admin"
        )
    assert error_of(exc)[:2] == (400, "organization_invitation_not_unique")
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_invitations.bulk_create(
            organization_id=org_id,
            request_body=[
                Invite(email_address="same@example.com", role="org:member"),
                Invite(email_address="same@example.com", role="org:member"),
            ],
        )
    assert error_of(exc)[:2] == (400, "organization_invitation_not_unique")
    assert clerk.organization_invitations.list(organization_id=org_id).total_count == 1, (
        "bulk is all or nothing"
    )


def test_revoking_a_non_pending_invitation_fails(clerk: Clerk) -> None:
    org_id, _ = org_with_admin(clerk)
    invitation = clerk.organization_invitations.create(
        organization_id=org_id, email_address="gone@example.com", role="org:member"
    )
    clerk.organization_invitations.revoke(organization_id=org_id, invitation_id=invitation.id)
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_invitations.revoke(organization_id=org_id, invitation_id=invitation.id)
    assert error_of(exc)[:2] == (404, "organization_invitation_not_pending")
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_invitations.get(organization_id=org_id, invitation_id="orginv_nope")
    assert error_of(exc)[:2] == (404, "resource_not_found")


# -------------------------------------------------------------------------- roles
def test_roles_list_create_delete(clerk: Clerk) -> None:
    roles = clerk.organization_roles.list(limit=100, order_by="key")
    assert [r.key for r in roles.data] == ["org:admin", "org:member"]
    admin_role = roles.data[0]
    assert {p.key for p in admin_role.permissions} >= {"org:sys_memberships:manage", "org:sys_profile:delete"}

    read = next(p.id for p in admin_role.permissions if p.key == "org:sys_memberships:read")
    manage = next(p.id for p in admin_role.permissions if p.key == "org:sys_memberships:manage")
    editor = clerk.organization_roles.create(name="Editor", key="org:editor", permissions=[read])
    boss = clerk.organization_roles.create(name="Boss", key="org:boss", permissions=[read, manage])
    assert [p.key for p in editor.permissions] == ["org:sys_memberships:read"]
    assert clerk.organization_roles.list().total_count == 4

    org_id, admin = org_with_admin(clerk)
    user = new_user(clerk, "editor")
    clerk.organization_memberships.create(organization_id=org_id, user_id=user, role="org:editor")
    # A custom role holding the manage permission counts as admin-level.
    clerk.organization_memberships.update(organization_id=org_id, user_id=user, role="org:boss")
    clerk.organization_memberships.update(organization_id=org_id, user_id=admin, role="org:editor")
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_roles.delete(organization_role_id=editor.id)
    assert error_of(exc)[0] == 400
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_roles.create(name="Again", key="org:editor")
    assert error_of(exc)[:2] == (422, "form_identifier_exists")

    clerk.organization_memberships.update(organization_id=org_id, user_id=admin, role="org:member")
    deleted = clerk.organization_roles.delete(organization_role_id=editor.id)
    assert deleted.deleted and deleted.id == editor.id
    assert boss.key in {r.key for r in clerk.organization_roles.list().data}
    with pytest.raises(ClerkBaseError) as exc:
        clerk.organization_roles.delete(organization_role_id=editor.id)
    assert error_of(exc)[:2] == (404, "resource_not_found")


# -------------------------------------------------------------------------- users
def test_user_create_and_delete_cascades_memberships(clerk: Clerk) -> None:
    org_id, admin = org_with_admin(clerk)
    user = clerk.users.create(email_address=["frank@example.com"], first_name="Frank", last_name="Zed")
    assert user.first_name == "Frank" and user.email_addresses[0].email_address == "frank@example.com"
    clerk.organization_memberships.create(organization_id=org_id, user_id=user.id, role="org:member")
    deleted = clerk.users.delete(user_id=user.id)
    assert deleted.deleted and deleted.id == user.id
    members = clerk.organization_memberships.list(organization_id=org_id)
    assert [m.public_user_data.user_id for m in members.data if m.public_user_data] == [admin]
    with pytest.raises(ClerkBaseError) as exc:
        clerk.users.create(email_address=["acme-admin@example.com"])
    assert error_of(exc)[:2] == (422, "form_identifier_exists")


# --------------------------------------------------------------------- rate limits
def test_instance_rate_limit_answers_429_with_retry_after() -> None:
    emulator = start(rate_limit=3)
    try:
        clerk = sdk(emulator)
        for _ in range(3):
            clerk.organizations.list()
        with pytest.raises(ClerkBaseError) as exc:
            clerk.organizations.list()
        status, code, _ = error_of(exc)
        assert (status, code) == (429, "too_many_requests")
        assert 1 <= int(exc.value.headers["retry-after"]) <= 10
    finally:
        emulator.stop()


def test_role_changes_per_membership_are_limited() -> None:
    emulator = start(rate_limit=1000)
    try:
        clerk = sdk(emulator)
        org_id, _ = org_with_admin(clerk)
        user = new_user(clerk, "flipper")
        clerk.organization_memberships.create(organization_id=org_id, user_id=user, role="org:member")
        for n in range(10):
            role = "org:admin" if n % 2 == 0 else "org:member"
            clerk.organization_memberships.update(organization_id=org_id, user_id=user, role=role)
        with pytest.raises(ClerkBaseError) as exc:
            clerk.organization_memberships.update(organization_id=org_id, user_id=user, role="org:admin")
        assert error_of(exc)[:2] == (429, "too_many_requests")
        assert int(exc.value.headers["retry-after"]) >= 1
        # Other memberships have their own budget.
        clerk.organization_memberships.create(
            organization_id=org_id, user_id=new_user(clerk, "x"), role="org:member"
        )
    finally:
        emulator.stop()
