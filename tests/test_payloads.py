"""The shared Clerk payload builders: defaults, left-out fields, explicit nulls, envelopes."""

from __future__ import annotations

import json

from emulator.payloads import (
    BARE_MEMBERSHIP,
    BARE_ORGANIZATION,
    OMIT,
    T0,
    deleted,
    event_envelope,
    invitation_data,
    membership_data,
    organization_data,
    role_data,
    webhook_body,
)
from models.events import event_writes, parse_event


def test_defaults_make_a_complete_membership_that_the_mirror_reads() -> None:
    org = organization_data("org_1")
    data = membership_data("orgmem_1", org, "user_1", role="org:billing_manager")
    assert data["role_name"] == "Billing Manager"
    assert data["updated_at"] == data["created_at"] == T0
    assert data["public_user_data"]["identifier"] == "user_1@example.com"
    membership, organization = event_writes(
        parse_event("msg_1", webhook_body("organizationMembership.created", data, T0))
    )
    assert (membership.values["organization_id"], membership.values["user_id"]) == ("org_1", "user_1")
    assert organization.values["slug"] == "org-1"


def test_omit_leaves_a_field_out_and_bare_sets_leave_out_every_optional_one() -> None:
    org = organization_data("org_1", name="Acme", slug="acme", members_count=OMIT)
    assert "members_count" not in org
    assert "role_set_key" not in org
    bare = organization_data("org_1", name="Acme", slug="acme", **BARE_ORGANIZATION)
    assert set(bare) == {"object", "id", "name", "slug", "created_at", "updated_at"}
    member = membership_data("orgmem_1", bare, "user_1", **BARE_MEMBERSHIP)
    assert set(member) == {
        "object",
        "id",
        "role",
        "organization",
        "public_user_data",
        "created_at",
        "updated_at",
    }


def test_an_explicit_null_is_kept_where_the_default_is_derived() -> None:
    assert role_data("role_1", "org:viewer", description=None)["description"] is None
    assert role_data("role_1", "org:viewer", name="Viewer")["description"] == "The Viewer role"
    assert invitation_data("orginv_1", "org_1", expires_at=None)["expires_at"] is None
    assert invitation_data("orginv_1", "org_1", created_at=0)["expires_at"] == 7 * 86_400_000
    # user_id is sent only once an invitation is accepted.
    assert "user_id" not in invitation_data("orginv_1", "org_1", user_id=None)


def test_envelope_and_deletion_stub() -> None:
    stub = deleted("organization", "org_1", slug="acme")
    assert stub == {"object": "organization", "id": "org_1", "deleted": True, "slug": "acme"}
    envelope = event_envelope("organization.deleted", stub, 5)
    assert envelope == {
        "data": stub,
        "object": "event",
        "type": "organization.deleted",
        "timestamp": 5,
        "instance_id": "ins_test",
    }
    assert "instance_id" not in json.loads(webhook_body("organization.deleted", stub, 5, instance_id=OMIT))
