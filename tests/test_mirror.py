"""Targeted mirror cases: duplicates, late updates, re-adds, cascades, sticky deletions."""

from __future__ import annotations

from typing import Any

import pytest
from histories import T0, make_event
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from emulator.payloads import deleted as deleted_stub
from emulator.payloads import (
    invitation_data,
    membership_data,
    organization_data,
    permission_data,
    role_data,
    user_data,
)
from models.db import make_session_factory, session_scope
from models.errors import PayloadError
from models.events import Event
from models.mirror import apply_events
from models.tables import Invitation, Membership, Organization, Permission, Role, User

NOW = 1_800_000_000_000
ORG = organization_data("org_1", slug="acme", name="Acme")


def apply(engine: Engine, *batches: list[Event]) -> None:
    factory = make_session_factory(engine)
    for batch in batches:
        with session_scope(factory) as session:
            apply_events(session, batch, now_ms=NOW)


def row(engine: Engine, model: Any, *key: str) -> Any:
    with Session(engine) as session:
        return session.get(model, key if len(key) > 1 else key[0])


def member(
    mem_id: str,
    user: str = "user_1",
    *,
    role: str = "org:member",
    created: int = T0,
    updated: int | None = None,
    org: dict[str, Any] = ORG,
) -> dict[str, Any]:
    return membership_data(mem_id, org, user, role=role, created_at=created, updated_at=updated)


def test_duplicates_apply_once(engine: Engine) -> None:
    created = make_event("organizationMembership.created", member("orgmem_1"), T0)
    apply(engine, [created, created], [created])
    stored = row(engine, Membership, "org_1", "user_1")
    assert (stored.id, stored.role, stored.deleted, stored.synced_at) == (
        "orgmem_1",
        "org:member",
        False,
        NOW,
    )
    assert row(engine, Organization, "org_1").name == "Acme"


@pytest.mark.parametrize("order", ["in_order", "reversed", "one_batch"])
def test_late_update_after_delete_does_not_resurrect(engine: Engine, order: str) -> None:
    events = [
        make_event("organizationMembership.created", member("orgmem_1"), T0),
        make_event(
            "organizationMembership.updated", member("orgmem_1", role="org:admin", updated=T0 + 10), T0 + 10
        ),
        make_event(
            "organizationMembership.deleted", member("orgmem_1", role="org:admin", updated=T0 + 10), T0 + 20
        ),
    ]
    if order == "in_order":
        apply(engine, *[[event] for event in events])
    elif order == "reversed":
        apply(engine, *[[event] for event in reversed(events)])
    else:
        apply(engine, [events[2], events[0], events[1]])
    stored = row(engine, Membership, "org_1", "user_1")
    assert stored.deleted
    assert stored.role == "org:admin"


def test_genuine_re_add_outranks_the_old_tombstone(engine: Engine) -> None:
    old_deleted = make_event("organizationMembership.deleted", member("orgmem_1", updated=T0 + 10), T0 + 20)
    readded = make_event("organizationMembership.created", member("orgmem_2", created=T0 + 30), T0 + 30)
    late_old_update = make_event(
        "organizationMembership.updated", member("orgmem_1", role="org:admin", updated=T0 + 10), T0 + 10
    )
    apply(engine, [readded], [old_deleted], [late_old_update])
    stored = row(engine, Membership, "org_1", "user_1")
    assert (stored.id, stored.role, stored.deleted) == ("orgmem_2", "org:member", False)


def test_old_generation_never_outranks_a_re_add_even_with_clock_skew(engine: Engine) -> None:
    readded = make_event("organizationMembership.created", member("orgmem_2", created=T0 + 30), T0 + 30)
    # Stamped after the re-add by a skewed clock, yet it belongs to the removed generation.
    skewed_old = make_event(
        "organizationMembership.updated", member("orgmem_1", role="org:admin", updated=T0 + 40), T0 + 40
    )
    apply(engine, [readded], [skewed_old])
    stored = row(engine, Membership, "org_1", "user_1")
    assert (stored.id, stored.role, stored.deleted) == ("orgmem_2", "org:member", False)


@pytest.mark.parametrize("deletion_first", [True, False])
def test_organization_deleted_cascades_in_both_orders(engine: Engine, deletion_first: bool) -> None:
    members = [
        make_event("organizationMembership.created", member(f"orgmem_{i}", f"user_{i}"), T0 + i)
        for i in range(3)
    ]
    invitation = make_event("organizationInvitation.created", invitation_data("orginv_1", "org_1"), T0 + 5)
    deletion = make_event("organization.deleted", deleted_stub("organization", "org_1", slug="acme"), T0 + 50)
    if deletion_first:
        apply(engine, [deletion], [*members, invitation])
    else:
        apply(engine, [*members, invitation], [deletion])
    with Session(engine) as session:
        assert session.scalars(select(Membership.deleted)).all() == [True, True, True]
        assert session.scalars(select(Invitation.deleted)).all() == [True]
        org = session.get(Organization, "org_1")
        assert org is not None and org.deleted


def test_membership_snapshot_never_undeletes_its_organization(engine: Engine) -> None:
    deletion = make_event("organization.deleted", deleted_stub("organization", "org_1"), T0 + 1)
    newer_snapshot = make_event(
        "organizationMembership.created", member("orgmem_1", org={**ORG, "updated_at": T0 + 99}), T0 + 99
    )
    apply(engine, [deletion], [newer_snapshot])
    org = row(engine, Organization, "org_1")
    # Data follows the newest version, the tombstone stays.
    assert org.deleted
    assert org.name == "Acme"
    assert row(engine, Membership, "org_1", "user_1").deleted


def test_user_deleted_cascades_to_memberships_and_accepted_invitations(engine: Engine) -> None:
    other_org = organization_data("org_2")
    events = [
        make_event("user.created", user_data("user_1"), T0),
        make_event("organizationMembership.created", member("orgmem_1"), T0 + 1),
        make_event("organizationMembership.created", member("orgmem_2", org=other_org), T0 + 2),
        make_event("organizationMembership.created", member("orgmem_3", "user_2"), T0 + 3),
        make_event(
            "organizationInvitation.accepted",
            invitation_data("orginv_1", "org_2", status="accepted", user_id="user_1", updated_at=T0 + 4),
            T0 + 4,
        ),
        make_event("organizationInvitation.created", invitation_data("orginv_2", "org_1"), T0 + 5),
    ]
    deletion = make_event("user.deleted", deleted_stub("user", "user_1"), T0 + 10)
    apply(engine, events[:2], [deletion], events[2:])
    with Session(engine) as session:
        memberships = {(m.user_id, m.organization_id): m.deleted for m in session.scalars(select(Membership))}
        assert memberships == {
            ("user_1", "org_1"): True,
            ("user_1", "org_2"): True,
            ("user_2", "org_1"): False,
        }
        invitations = {i.id: (i.status, i.deleted) for i in session.scalars(select(Invitation))}
        assert invitations == {"orginv_1": ("accepted", True), "orginv_2": ("pending", False)}
        user = session.get(User, "user_1")
        assert user is not None and user.deleted


def test_user_deletion_is_sticky_against_newer_updates(engine: Engine) -> None:
    deletion = make_event("user.deleted", deleted_stub("user", "user_1"), T0 + 10)
    # A clock-skewed update stamped after the deletion arrives late: data moves, the tombstone stays.
    skewed = make_event("user.updated", user_data("user_1", first_name="Late", updated_at=T0 + 20), T0 + 20)
    older = make_event("user.created", user_data("user_1"), T0)
    apply(engine, [deletion], [skewed], [older])
    stored = row(engine, User, "user_1")
    assert stored.deleted
    assert stored.first_name == "Late"
    assert stored.identifier == "user_1@example.com"


@pytest.mark.parametrize("final", ["accepted", "revoked"])
def test_invitation_final_status_beats_a_late_pending(engine: Engine, final: str) -> None:
    pending = make_event("organizationInvitation.created", invitation_data("orginv_1", "org_1"), T0)
    closed = make_event(
        f"organizationInvitation.{final}",
        invitation_data(
            "orginv_1",
            "org_1",
            status=final,
            updated_at=T0 + 5,
            user_id="user_1" if final == "accepted" else None,
        ),
        T0 + 5,
    )
    apply(engine, [closed], [pending])
    stored = row(engine, Invitation, "orginv_1")
    assert (stored.status, stored.deleted) == (final, False)
    assert stored.user_id == ("user_1" if final == "accepted" else None)


def test_accepting_emits_invitation_and_membership_in_any_order(engine: Engine) -> None:
    accepted = make_event(
        "organizationInvitation.accepted",
        invitation_data("orginv_1", "org_1", status="accepted", updated_at=T0 + 5, user_id="user_1"),
        T0 + 5,
    )
    created = make_event("organizationMembership.created", member("orgmem_1", created=T0 + 5), T0 + 5)
    apply(engine, [created, accepted])
    assert row(engine, Invitation, "orginv_1").status == "accepted"
    assert not row(engine, Membership, "org_1", "user_1").deleted


def test_legacy_roles_are_stored_normalised(engine: Engine) -> None:
    apply(
        engine,
        [
            make_event("organizationMembership.created", member("orgmem_1", role="basic_member"), T0),
            make_event("organizationMembership.created", member("orgmem_2", "user_2", role="admin"), T0),
            make_event(
                "organizationMembership.created", member("orgmem_3", "user_3", role="guest_member"), T0
            ),
        ],
    )
    with Session(engine) as session:
        roles = {user: role for user, role in session.execute(select(Membership.user_id, Membership.role))}
    assert roles == {"user_1": "org:member", "user_2": "org:admin", "user_3": "org:guest_member"}


def test_membership_snapshot_upserts_the_organization_newer_only(engine: Engine) -> None:
    updated = make_event("organization.updated", {**ORG, "name": "Renamed", "updated_at": T0 + 10}, T0 + 10)
    stale_snapshot = make_event(
        "organizationMembership.created", member("orgmem_1", created=T0 + 20), T0 + 20
    )
    apply(engine, [updated], [stale_snapshot])
    assert row(engine, Organization, "org_1").name == "Renamed"
    fresh = make_event(
        "organizationMembership.updated",
        member(
            "orgmem_1", created=T0 + 20, updated=T0 + 40, org={**ORG, "name": "Newest", "updated_at": T0 + 30}
        ),
        T0 + 40,
    )
    apply(engine, [fresh])
    assert row(engine, Organization, "org_1").name == "Newest"


@pytest.mark.parametrize("form", ["stub", "full"])
def test_role_deleted_stub_or_full(engine: Engine, form: str) -> None:
    created = make_event("role.created", role_data("role_1", "org:editor"), T0)
    data = (
        deleted_stub("role", "role_1", slug=None)
        if form == "stub"
        else {**role_data("role_1", "org:editor"), "deleted": True}
    )
    deletion = make_event("role.deleted", data, T0 + 10)
    late_update = make_event(
        "role.updated", role_data("role_1", "org:editor", name="Late", updated_at=T0 + 5), T0 + 5
    )
    apply(engine, [deletion], [created, late_update])
    stored = row(engine, Role, "role_1")
    assert stored.deleted
    assert stored.key == (None if form == "stub" else "org:editor")


def test_permissions_are_mirrored(engine: Engine) -> None:
    apply(
        engine,
        [make_event("permission.created", permission_data("perm_1", "org:posts:edit"), T0)],
        [
            make_event(
                "permission.updated", permission_data("perm_1", "org:posts:edit", updated_at=T0 + 1), T0 + 1
            )
        ],
        [make_event("permission.deleted", deleted_stub("permission", "perm_1"), T0 + 2)],
    )
    stored = row(engine, Permission, "perm_1")
    assert stored.deleted


def test_an_uninterpretable_event_fails_the_whole_batch(engine: Engine) -> None:
    bad = Event("msg_bad", "organizationMembership.created", T0, {"id": "orgmem_1"})
    good = make_event("organization.created", ORG, T0)
    with pytest.raises(PayloadError, match=r"data\.organization\.id missing"):
        apply(engine, [good, bad])
    assert row(engine, Organization, "org_1") is None


def test_empty_batch_is_a_no_op(engine: Engine) -> None:
    apply(engine, [])
    assert row(engine, Organization, "org_1") is None
