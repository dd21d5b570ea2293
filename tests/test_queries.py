"""The read API: Clerk-shaped pages from the mirror, tombstones hidden, expiry derived."""

from __future__ import annotations

from typing import Any

import pytest
from histories import T0, make_event
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from emulator.payloads import deleted as deleted_stub
from emulator.payloads import invitation_data, membership_data, organization_data, permission_data, role_data
from models.db import make_session_factory, session_scope
from models.errors import PermanentError
from models.events import Event
from models.mirror import apply_events
from models.queries import (
    InvalidQueryError,
    Page,
    get_memberships,
    get_pending_invitations,
    get_user_memberships,
    list_invitations,
    list_organizations,
    list_roles,
    resolve_organization,
)

NOW = 1_800_000_000_000
ACME = organization_data("org_acme", slug="acme", name="Acme", created_at=T0)
GLOBEX = organization_data("org_globex", slug="globex", name="Globex", created_at=T0 + 1)


def apply(engine: Engine, events: list[Event]) -> None:
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, events, now_ms=NOW)


def join(org: dict[str, Any], user: str, at: int, role: str = "org:member") -> Event:
    return make_event(
        "organizationMembership.created",
        membership_data(f"orgmem_{org['id']}_{user}", org, user, role=role, created_at=at),
        at,
    )


@pytest.fixture
def seeded(engine: Engine) -> Engine:
    events = [
        make_event("organization.created", ACME, T0),
        make_event("organization.created", GLOBEX, T0 + 1),
    ]
    # Twelve members of acme, joined in a shuffled order; every third one an admin.
    for i in [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]:
        events.append(
            join(ACME, f"user_{i:02d}", T0 + 100 + i, "org:admin" if i % 3 == 0 else "basic_member")
        )
    events.append(join(GLOBEX, "user_00", T0 + 50, "org:admin"))
    # Two members joined at the same instant: user_id breaks the tie.
    events.append(join(GLOBEX, "user_b", T0 + 60))
    events.append(join(GLOBEX, "user_a", T0 + 60))
    removed = membership_data("orgmem_gone", ACME, "user_gone", created_at=T0 + 90)
    events.append(make_event("organizationMembership.created", removed, T0 + 90))
    events.append(make_event("organizationMembership.deleted", removed, T0 + 95))
    events += [
        make_event("organization.created", organization_data("org_dead", slug="dead"), T0),
        join(organization_data("org_dead", slug="dead"), "user_00", T0 + 5),
        make_event("organization.deleted", deleted_stub("organization", "org_dead", slug="dead"), T0 + 6),
    ]
    apply(engine, events)
    return engine


def test_resolve_organization_by_id_or_slug(seeded: Engine) -> None:
    with Session(seeded) as session:
        by_id = resolve_organization(session, "org_acme")
        by_slug = resolve_organization(session, "acme")
        assert by_id is not None and by_id == by_slug
        assert by_id.members_count == 12
        shape = by_id.to_dict()
        assert shape["object"] == "organization"
        assert (shape["id"], shape["name"], shape["slug"], shape["members_count"]) == (
            "org_acme",
            "Acme",
            "acme",
            12,
        )
        assert resolve_organization(session, "nope") is None
        assert resolve_organization(session, "org_dead") is None
        assert resolve_organization(session, "dead") is None


def test_list_organizations_hides_tombstones_and_pages(seeded: Engine) -> None:
    with Session(seeded) as session:
        first = list_organizations(session, page=1, page_size=1)
        second = list_organizations(session, page=2, page_size=1)
        beyond = list_organizations(session, page=3, page_size=1)
    assert first.total_count == second.total_count == beyond.total_count == 2
    assert [org.id for org in first.data + second.data] == ["org_acme", "org_globex"]
    assert beyond.data == []
    assert [org.members_count for org in first.data + second.data] == [12, 3]


def test_get_memberships_pages_in_a_stable_order(seeded: Engine) -> None:
    with Session(seeded) as session:
        pages = [get_memberships(session, "acme", page=n, page_size=5) for n in (1, 2, 3)]
    assert [page.total_count for page in pages] == [12, 12, 12]
    users = [m.user_id for page in pages for m in page.data]
    assert users == [f"user_{i:02d}" for i in range(12)]
    assert [len(page.data) for page in pages] == [5, 5, 2]


def test_get_memberships_ties_break_on_user_id(seeded: Engine) -> None:
    with Session(seeded) as session:
        page = get_memberships(session, "org_globex")
    assert [m.user_id for m in page.data] == ["user_00", "user_a", "user_b"]


def test_get_memberships_role_filter(seeded: Engine) -> None:
    with Session(seeded) as session:
        admins = get_memberships(session, "acme", role="org:admin", page_size=100)
        members = get_memberships(session, "acme", role=["basic_member"], page_size=100)
        both = get_memberships(session, "acme", role=("org:admin", "org:member"), page_size=100)
    assert [m.user_id for m in admins.data] == ["user_00", "user_03", "user_06", "user_09"]
    assert admins.total_count == 4
    assert members.total_count == 8
    assert both.total_count == 12


def test_membership_shape_is_clerks(seeded: Engine) -> None:
    with Session(seeded) as session:
        membership = get_memberships(session, "acme", page_size=1).data[0]
    shape = membership.to_dict()
    assert shape["object"] == "organization_membership"
    assert shape["id"] == "orgmem_org_acme_user_00"
    assert shape["role"] == "org:admin"
    assert shape["organization_id"] == "org_acme"
    assert shape["organization"]["slug"] == "acme"
    assert shape["public_user_data"]["user_id"] == "user_00"
    assert shape["public_user_data"]["identifier"] == "user_00@example.com"
    assert shape["permissions"] == ["org:sys_memberships:read"]
    assert shape["created_at"] == T0 + 100


def test_tombstones_never_show(seeded: Engine) -> None:
    with Session(seeded) as session:
        assert "user_gone" not in {m.user_id for m in get_memberships(session, "acme", page_size=100).data}
        dead = get_memberships(session, "org_dead")
        assert (dead.data, dead.total_count) == ([], 0)
        user_orgs = get_user_memberships(session, "user_00")
    assert [m.organization_id for m in user_orgs.data] == ["org_globex", "org_acme"]
    assert user_orgs.total_count == 2
    assert user_orgs.data[0].organization is not None
    assert user_orgs.data[0].organization.members_count == 3


def test_unknown_organization_gives_an_empty_page(seeded: Engine) -> None:
    with Session(seeded) as session:
        assert get_memberships(session, "missing") == Page([], 0)
        assert list_invitations(session, "missing") == Page([], 0)


def test_invitations_status_and_expiry(engine: Engine) -> None:
    def invite(inv_id: str, at: int, expires: int, **extra: Any) -> dict[str, Any]:
        return invitation_data(inv_id, "org_acme", created_at=at, expires_at=expires, **extra)

    apply(
        engine,
        [
            make_event("organization.created", ACME, T0),
            make_event("organizationInvitation.created", invite("orginv_live", T0 + 1, NOW + 1000), T0 + 1),
            make_event("organizationInvitation.created", invite("orginv_old", T0 + 2, NOW - 1000), T0 + 2),
            make_event(
                "organizationInvitation.accepted",
                invite("orginv_acc", T0 + 3, NOW - 1000, status="accepted", user_id="user_1"),
                T0 + 3,
            ),
            make_event(
                "organizationInvitation.revoked",
                invite("orginv_rev", T0 + 4, NOW + 1000, status="revoked"),
                T0 + 4,
            ),
            make_event("organizationInvitation.created", invite("orginv_edge", T0 + 5, NOW), T0 + 5),
        ],
    )
    with Session(engine) as session:
        pending = get_pending_invitations(session, "acme", now_ms=NOW)
        assert [i.id for i in pending.data] == ["orginv_live"]
        assert pending.total_count == 1
        everything = list_invitations(session, "acme", now_ms=NOW)
        statuses = {i.id: i.status for i in everything.data}
        assert statuses == {
            "orginv_live": "pending",
            "orginv_old": "expired",
            "orginv_acc": "accepted",
            "orginv_rev": "revoked",
            "orginv_edge": "expired",
        }
        # Newest first, as Clerk lists invitations.
        assert [i.id for i in everything.data][:2] == ["orginv_edge", "orginv_rev"]
        expired = list_invitations(session, "org_acme", status="expired", now_ms=NOW)
        assert sorted(i.id for i in expired.data) == ["orginv_edge", "orginv_old"]
        assert [i.id for i in list_invitations(session, "acme", status="accepted", now_ms=NOW).data] == [
            "orginv_acc"
        ]
        # The same invitation, read before it expired.
        earlier = list_invitations(session, "acme", status="pending", now_ms=NOW - 2000, page_size=10)
        assert sorted(i.id for i in earlier.data) == ["orginv_edge", "orginv_live", "orginv_old"]
        shape = pending.data[0].to_dict()
        assert shape["object"] == "organization_invitation"
        assert (shape["status"], shape["organization_id"], shape["expires_at"]) == (
            "pending",
            "org_acme",
            NOW + 1000,
        )


def test_invitations_of_a_deleted_organization_are_hidden(engine: Engine) -> None:
    apply(
        engine,
        [
            make_event("organization.created", ACME, T0),
            make_event(
                "organizationInvitation.created",
                invitation_data("orginv_1", "org_acme", expires_at=NOW + 1),
                T0 + 1,
            ),
            make_event("organization.deleted", deleted_stub("organization", "org_acme"), T0 + 2),
        ],
    )
    with Session(engine) as session:
        assert get_pending_invitations(session, "org_acme", now_ms=NOW).total_count == 0


def test_list_roles_with_permission_objects(engine: Engine) -> None:
    apply(
        engine,
        [
            make_event("permission.created", permission_data("perm_edit", "org:posts:edit"), T0),
            make_event(
                "role.created",
                role_data("role_b", "org:editor", name="Editor", permissions=["org:posts:edit", "org:x:y"]),
                T0,
            ),
            make_event("role.created", role_data("role_a", "org:admin", name="Admin"), T0),
            make_event("role.created", role_data("role_c", "org:gone", name="Gone"), T0),
            make_event("role.deleted", deleted_stub("role", "role_c"), T0 + 1),
        ],
    )
    with Session(engine) as session:
        roles = list_roles(session)
    assert [r.key for r in roles.data] == ["org:admin", "org:editor"]
    assert roles.total_count == 2
    editor = roles.data[1].to_dict()
    assert editor["object"] == "role"
    assert editor["permissions"][0]["id"] == "perm_edit"
    assert editor["permissions"][0]["name"] == "Edit"
    assert editor["permissions"][1] == {
        "object": "permission",
        "id": None,
        "key": "org:x:y",
        "name": None,
        "description": None,
        "type": None,
    }
    assert roles.to_dict()["total_count"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page": 0}, "page must be a whole number >= 1"),
        ({"page_size": 0}, "page_size must be a whole number from 1 to 500"),
        ({"page_size": 501}, "page_size must be a whole number from 1 to 500"),
        ({"role": []}, "role must be a role key"),
    ],
)
def test_bad_arguments_are_clear_errors(engine: Engine, kwargs: dict[str, Any], message: str) -> None:
    with Session(engine) as session, pytest.raises(InvalidQueryError, match=message) as caught:
        get_memberships(session, "acme", **kwargs)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PermanentError)


def test_unknown_invitation_status_is_refused(engine: Engine) -> None:
    with Session(engine) as session, pytest.raises(InvalidQueryError, match="status must be one of"):
        list_invitations(session, "acme", status="lost")
