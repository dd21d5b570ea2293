"""Data that stays true: user and role copies, new organization and user fields, domains, instances."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import truncate_all
from helpers import new_msg_id, signed_headers
from histories import T0, make_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from emulator.payloads import (
    OMIT,
    domain_data,
    invitation_data,
    membership_data,
    organization_data,
    permission_data,
    role_data,
    user_data,
    user_public_data,
)
from emulator.payloads import deleted as deleted_stub
from models import render
from models.db import make_session_factory, session_scope
from models.errors import ConfigError, PermanentError
from models.events import Event
from models.inbox import reset_for_replay, store_delivery
from models.mirror import apply_events
from models.reads import MembershipQuery, read_sessions
from models.settings import Settings
from models.tables import (
    InboxEvent,
    InboxStatus,
    Invitation,
    Membership,
    Organization,
    OrganizationDomain,
    User,
)
from orgsync.web import create_app, get_state

NOW = 1_800_000_000_000
ORG = organization_data("org_1", slug="acme", name="Acme")


def apply(engine: Engine, *batches: list[Event]) -> None:
    factory = make_session_factory(engine)
    for batch in batches:
        with session_scope(factory) as session:
            apply_events(session, batch, now_ms=NOW)


def get(engine: Engine, model: Any, *key: str) -> Any:
    with Session(engine) as session:
        return session.get(model, key if len(key) > 1 else key[0])


def joined(first_name: str, *, at: int = T0, role: str = "org:member", **extra: Any) -> Event:
    data = membership_data(
        "orgmem_1",
        ORG,
        "user_1",
        role=role,
        updated_at=at,
        public_user_data=user_public_data("user_1", first_name=first_name),
        **extra,
    )
    return make_event(
        "organizationMembership.updated" if at > T0 else "organizationMembership.created", data, at
    )


def renamed(first_name: str, at: int, *, email: str = "user_1@example.com") -> Event:
    data = user_data("user_1", first_name=first_name, updated_at=at, emails=[email])
    return make_event("user.updated", data, at)


# ------------------------------------------------------------------ user copies


def test_user_updated_reaches_the_memberships_of_the_user(engine: Engine) -> None:
    apply(engine, [joined("Jane")], [renamed("Janet", T0 + 50, email="janet@new.io")])
    stored = get(engine, Membership, "org_1", "user_1")
    assert stored.public_user_data["first_name"] == "Janet"
    assert stored.identifier == "janet@new.io"
    assert stored.public_user_data["identifier"] == "janet@new.io"


def test_writers_record_whether_the_user_data_is_served_as_stored(engine: Engine) -> None:
    # As Clerk sends it: served as stored. Without a field the read path adds: completed on
    # every read, until a user update's copy brings the missing field.
    apply(engine, [joined("Jane")])
    assert get(engine, Membership, "org_1", "user_1").user_data_complete is True
    partial = user_public_data("user_2", last_name=OMIT)
    data = membership_data("orgmem_2", ORG, "user_2", updated_at=T0, public_user_data=partial)
    apply(engine, [make_event("organizationMembership.created", data, T0)])
    stored = get(engine, Membership, "org_1", "user_2")
    assert "last_name" not in stored.public_user_data and stored.user_data_complete is False
    update = make_event("user.updated", user_data("user_2", last_name="Roe", updated_at=T0 + 50), T0 + 50)
    apply(engine, [update])
    stored = get(engine, Membership, "org_1", "user_2")
    assert stored.public_user_data["last_name"] == "Roe" and stored.user_data_complete is True
    with read_sessions(engine)() as session:
        page = json.loads(render.membership_page(session, MembershipQuery(organization="org_1")) or b"")
    by_user = {item["public_user_data"]["user_id"]: item["public_user_data"] for item in page["data"]}
    assert by_user["user_2"]["last_name"] == "Roe" and by_user["user_1"]["first_name"] == "Jane"


def test_a_late_membership_event_with_stale_user_data_keeps_the_newer_user(engine: Engine) -> None:
    # The membership's own update is newer than its first event, but embeds the old name.
    apply(engine, [renamed("Janet", T0 + 50)], [joined("Jane", at=T0 + 90)], [joined("Jane")])
    stored = get(engine, Membership, "org_1", "user_1")
    assert stored.updated_at == T0 + 90
    assert stored.public_user_data["first_name"] == "Janet"


def test_without_a_user_row_the_membership_keeps_its_embedded_data(engine: Engine) -> None:
    apply(engine, [joined("Jane")])
    assert get(engine, Membership, "org_1", "user_1").public_user_data["first_name"] == "Jane"


def test_a_deleted_user_keeps_its_data_for_the_copies(engine: Engine) -> None:
    deletion = make_event("user.deleted", deleted_stub("user", "user_1"), T0 + 100)
    apply(engine, [deletion], [joined("Jane")], [renamed("Janet", T0 + 50)])
    user = get(engine, User, "user_1")
    assert user.deleted and user.first_name == "Janet"
    stored = get(engine, Membership, "org_1", "user_1")
    assert stored.deleted and stored.public_user_data["first_name"] == "Janet"


# ------------------------------------------------------------------ role copies


def editor(name: str, permissions: list[str], at: int) -> Event:
    data = role_data("role_1", "org:editor", name=name, permissions=permissions, updated_at=at)
    return make_event("role.updated" if at > T0 else "role.created", data, at)


def test_role_updated_reaches_the_memberships_holding_it(engine: Engine) -> None:
    apply(
        engine,
        [editor("Editor", ["org:posts:edit"], T0), joined("Jane", role="org:editor")],
        [editor("Chief editor", ["org:posts:edit", "org:posts:publish"], T0 + 10)],
    )
    stored = get(engine, Membership, "org_1", "user_1")
    assert (stored.role_name, stored.permissions) == ("Chief editor", ["org:posts:edit", "org:posts:publish"])


def test_a_membership_arriving_after_the_role_change_follows_the_role(engine: Engine) -> None:
    apply(
        engine,
        [editor("Chief editor", ["org:posts:publish"], T0 + 10)],
        [joined("Jane", role="org:editor", permissions=["org:posts:edit"], role_name="Editor")],
    )
    stored = get(engine, Membership, "org_1", "user_1")
    assert (stored.role_name, stored.permissions) == ("Chief editor", ["org:posts:publish"])


def test_a_deleted_permission_leaves_the_memberships_grants(engine: Engine) -> None:
    apply(
        engine,
        [editor("Editor", ["org:posts:edit", "org:posts:publish"], T0), joined("Jane", role="org:editor")],
        [make_event("permission.deleted", deleted_stub("permission", "perm_p"), T0 + 5)],
    )
    # The stub names no key: once the permission's data arrives, in any order, its key is dropped.
    apply(engine, [make_event("permission.created", permission_data("perm_p", "org:posts:publish"), T0)])
    assert get(engine, Membership, "org_1", "user_1").permissions == ["org:posts:edit"]


def test_invitation_role_name_follows_the_role(engine: Engine) -> None:
    invited = make_event(
        "organizationInvitation.created", invitation_data("orginv_1", "org_1", role="org:editor"), T0
    )
    apply(engine, [invited], [editor("Chief editor", ["org:posts:edit"], T0 + 10)])
    assert get(engine, Invitation, "orginv_1").role_name == "Chief editor"


# ------------------------------------------------------------------ new fields and objects


def test_organization_keeps_the_fields_apps_use(engine: Engine) -> None:
    data = {
        **ORG,
        "max_allowed_memberships": 20,
        "pending_invitations_count": 3,
        "members_count": 7,
        "missing_member_with_elevated_permissions": True,
        "role_set_key": "role_set:default",
        "last_active_at": T0 + 5,
    }
    apply(engine, [make_event("organization.updated", data, T0)])
    stored = get(engine, Organization, "org_1")
    assert (
        stored.max_allowed_memberships,
        stored.pending_invitations_count,
        stored.members_count,
        stored.missing_member_with_elevated_permissions,
        stored.role_set_key,
        stored.last_active_at,
    ) == (20, 3, 7, True, "role_set:default", T0 + 5)


def test_user_keeps_external_id_all_emails_and_state(engine: Engine) -> None:
    data = {
        **user_data("user_1", emails=["second@x.io", "main@x.io"], primary=1),
        "external_id": "emp-42",
        "banned": False,
        "locked": True,
        "last_active_at": T0 + 9,
    }
    apply(engine, [make_event("user.created", data, T0)])
    stored = get(engine, User, "user_1")
    assert (
        stored.external_id,
        stored.email_addresses,
        stored.banned,
        stored.locked,
        stored.last_active_at,
    ) == (
        "emp-42",
        ["main@x.io", "second@x.io"],
        False,
        True,
        T0 + 9,
    )


def domain(at: int, **extra: Any) -> dict[str, Any]:
    return domain_data("orgdmn_1", "org_1", updated_at=at, **extra)


def test_organization_domains_are_mirrored_and_deletion_is_sticky(engine: Engine) -> None:
    created = make_event("organizationDomain.created", domain(T0), T0)
    updated = make_event(
        "organizationDomain.updated", domain(T0 + 10, enrollment_mode="manual_invitation"), T0 + 10
    )
    apply(engine, [updated], [created])
    stored = get(engine, OrganizationDomain, "orgdmn_1")
    assert (stored.organization_id, stored.name, stored.enrollment_mode, stored.verification_status) == (
        "org_1",
        "acme.com",
        "manual_invitation",
        "verified",
    )
    apply(
        engine,
        [make_event("organizationDomain.deleted", deleted_stub("organization_domain", "orgdmn_1"), T0 + 5)],
    )
    assert get(engine, OrganizationDomain, "orgdmn_1").deleted


# ------------------------------------------------------------------ instance id


def envelope(instance_id: str | None) -> str:
    body: dict[str, Any] = {
        "type": "user.created",
        "object": "event",
        "data": user_data("user_1"),
        "timestamp": T0,
    }
    if instance_id is not None:
        body["instance_id"] = instance_id
    return json.dumps(body)


def test_the_instance_is_recorded_and_another_instance_rejected(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        plain = store_delivery(session, svix_id=new_msg_id(), body=envelope("ins_dev"), received_at=T0)
        expected = store_delivery(
            session,
            svix_id=new_msg_id(),
            body=envelope("ins_prod"),
            received_at=T0,
            expected_instance="ins_prod",
        )
        other = store_delivery(
            session,
            svix_id=new_msg_id(),
            body=envelope("ins_dev"),
            received_at=T0,
            expected_instance="ins_prod",
        )
        unnamed = store_delivery(
            session, svix_id=new_msg_id(), body=envelope(None), received_at=T0, expected_instance="ins_prod"
        )
    assert (plain.status, expected.status) == (InboxStatus.PENDING, InboxStatus.PENDING)
    assert other.status == InboxStatus.REJECTED
    assert other.reason is not None and "ins_dev" in other.reason and "ins_prod" in other.reason
    assert unnamed.status == InboxStatus.REJECTED
    with Session(engine) as session:
        rows = {row.id: row for row in session.scalars(select(InboxEvent))}
    assert rows[plain.inbox_id].instance_id == "ins_dev"
    assert rows[other.inbox_id].instance_id == "ins_dev"
    assert rows[other.inbox_id].last_error == other.reason
    with session_scope(factory) as session, pytest.raises(PermanentError, match="another Clerk instance"):
        reset_for_replay(session, [str(other.inbox_id)])


# ------------------------------------------------------------------ any order converges


def _history(user_steps: int, role_steps: int, member_steps: int) -> tuple[list[Event], dict[str, Any]]:
    """User renames and role changes interleaved with membership updates embedding stale copies."""
    events = [
        make_event("organization.created", ORG, T0),
        make_event("user.created", user_data("user_1", first_name="Name0"), T0),
        editor("Role0", ["org:p0"], T0),
    ]
    for i in range(1, user_steps + 1):
        events.append(renamed(f"Name{i}", T0 + 10 * i))
    for i in range(1, role_steps + 1):
        events.append(editor(f"Role{i}", [f"org:p{i}"], T0 + 10 * i))
    events.append(joined("Stale", role="org:editor", permissions=["org:old"], role_name="Old"))
    for i in range(1, member_steps + 1):
        stale = {"permissions": ["org:old"], "role_name": "Old"}
        events.append(joined(f"Stale{i}", at=T0 + 7 * i, role="org:editor", **stale))
    expected = {
        "first_name": f"Name{user_steps}",
        "role_name": f"Role{role_steps}",
        "permissions": [f"org:p{role_steps}"],
    }
    return events, expected


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)),
    data=st.data(),
)
def test_user_and_role_changes_in_any_order_converge(
    engine: Engine, steps: tuple[int, int, int], data: st.DataObject
) -> None:
    events, expected = _history(*steps)
    order = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(order) - 1), max_size=4)))
    batches = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    truncate_all(engine)
    apply(engine, *batches)
    stored = get(engine, Membership, "org_1", "user_1")
    assert stored.public_user_data["first_name"] == expected["first_name"]
    assert (stored.role_name, stored.permissions) == (expected["role_name"], expected["permissions"])


def test_the_instance_setting(tmp_path: Path) -> None:
    assert Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path)}).instance_id is None
    found = Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path), "CLERK_INSTANCE_ID": " ins_prod "})
    assert found.instance_id == "ins_prod"
    with pytest.raises(ConfigError, match="CLERK_INSTANCE_ID must look like ins_"):
        Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path), "CLERK_INSTANCE_ID": "prod"})


def test_the_intake_acknowledges_another_instance_and_never_applies_it(
    tmp_path: Path, sqlite_url: str, sqlite_engine: Engine, signing_secret: str
) -> None:
    settings = Settings(
        database_url=sqlite_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=(signing_secret,),
        instance_id="ins_prod",
    )
    sent: list[list[int]] = []
    app = create_app(settings, engine=sqlite_engine, send=sent.append, broker_check=lambda: None)
    try:
        body = envelope("ins_dev")
        response = app.test_client().post(
            "/webhooks/clerk", data=body, headers=signed_headers(signing_secret, body)
        )
    finally:
        get_state(app).close()
    assert response.status_code == 200, response.get_data(as_text=True)
    payload = response.get_json()
    assert payload["status"] == InboxStatus.REJECTED and "wrong_instance" in payload["reason"]
    assert sent == []
    with Session(sqlite_engine) as session:
        (row,) = session.scalars(select(InboxEvent))
        assert (row.status, row.instance_id) == (InboxStatus.REJECTED, "ins_dev")
        assert session.get(User, "user_1") is None
