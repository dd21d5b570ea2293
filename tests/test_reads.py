"""The read layer (``models.reads``): Clerk-shaped pages from the mirror, tombstones hidden, expiry derived.

Filters and orders of every endpoint are in ``test_read_api.py``; these are the basics.
"""

from __future__ import annotations

from typing import Any

import pytest
from histories import T0, make_event
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from emulator.payloads import deleted as deleted_stub
from emulator.payloads import invitation_data, membership_data, organization_data, permission_data, role_data
from models import reads, render
from models.db import make_session_factory, session_scope
from models.errors import PermanentError
from models.events import Event
from models.mirror import apply_events
from models.reads import (
    InvalidQueryError,
    Listing,
    MembershipView,
    get_organization,
    list_invitations,
    list_organizations,
    list_roles,
    organization_id,
    page_window,
    read_sessions,
)
from models.reads import list_memberships as _list_memberships

NOW = 1_800_000_000_000
ACME = organization_data("org_acme", slug="acme", name="Acme", created_at=T0)
GLOBEX = organization_data("org_globex", slug="globex", name="Globex", created_at=T0 + 1)


def apply(engine: Engine, events: list[Event]) -> None:
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, events, now_ms=NOW)


def memberships(session: Session, organization: str, **filters: Any) -> Listing[MembershipView]:
    """An organization's members oldest first (an unknown organization: an empty page)."""
    found = _list_memberships(session, organization=organization, order_by="created_at", **filters)
    return found or Listing([], 0)


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
        by_id = get_organization(session, "org_acme")
        by_slug = get_organization(session, "acme")
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
        assert organization_id(session, "acme") == "org_acme"
        for missing in ("nope", "org_dead", "dead"):
            assert get_organization(session, missing) is None
            assert organization_id(session, missing) is None


def test_list_organizations_hides_tombstones_and_pages(seeded: Engine) -> None:
    with Session(seeded) as session:
        first, second, beyond = (
            list_organizations(session, limit=1, offset=offset, order_by="created_at") for offset in (0, 1, 2)
        )
    assert first.total_count == second.total_count == beyond.total_count == 2
    assert [org.id for org in first.data + second.data] == ["org_acme", "org_globex"]
    assert beyond.data == []
    assert [org.members_count for org in first.data + second.data] == [12, 3]


def test_get_memberships_pages_in_a_stable_order(seeded: Engine) -> None:
    with Session(seeded) as session:
        pages = [memberships(session, "acme", limit=5, offset=offset) for offset in (0, 5, 10)]
    assert [page.total_count for page in pages] == [12, 12, 12]
    users = [m.user_id for page in pages for m in page.data]
    assert users == [f"user_{i:02d}" for i in range(12)]
    assert [len(page.data) for page in pages] == [5, 5, 2]


def test_get_memberships_ties_break_on_id(seeded: Engine) -> None:
    with Session(seeded) as session:
        page = memberships(session, "org_globex")
    assert [m.user_id for m in page.data] == ["user_00", "user_a", "user_b"]


def test_get_memberships_role_filter(seeded: Engine) -> None:
    with Session(seeded) as session:
        admins = memberships(session, "acme", roles=["org:admin"], limit=100)
        members = memberships(session, "acme", roles=["org:member"], limit=100)
        both = memberships(session, "acme", roles=("org:admin", "org:member"), limit=100)
    assert [m.user_id for m in admins.data] == ["user_00", "user_03", "user_06", "user_09"]
    assert admins.total_count == 4
    assert members.total_count == 8
    assert both.total_count == 12


def test_membership_shape_is_clerks(seeded: Engine) -> None:
    with Session(seeded) as session:
        membership = memberships(session, "acme", limit=1).data[0]
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
        assert "user_gone" not in {m.user_id for m in memberships(session, "acme", limit=100).data}
        assert _list_memberships(session, organization="org_dead") is None
        user_orgs = _list_memberships(session, user="user_00", order_by="created_at")
        assert user_orgs is not None
    assert [m.organization_id for m in user_orgs.data] == ["org_globex", "org_acme"]
    assert user_orgs.total_count == 2
    assert user_orgs.data[0].organization is not None
    assert user_orgs.data[0].organization.members_count == 3


def test_unknown_organization_or_user_gives_none(seeded: Engine) -> None:
    with Session(seeded) as session:
        assert _list_memberships(session, organization="missing") is None
        assert _list_memberships(session, user="user_missing") is None
        assert list_invitations(session, organization="missing") is None


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
        pending = list_invitations(session, organization="acme", status="pending", now_ms=NOW)
        everything = list_invitations(session, organization="acme", now_ms=NOW)
        expired = list_invitations(session, organization="org_acme", status="expired", now_ms=NOW)
        accepted = list_invitations(session, organization="acme", status="accepted", now_ms=NOW)
        # The same invitations, read before they expired.
        earlier = list_invitations(session, organization="acme", status="pending", now_ms=NOW - 2000)
        assert pending and everything and expired and accepted and earlier
        assert [i.id for i in pending.data] == ["orginv_live"]
        assert pending.total_count == 1
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
        assert sorted(i.id for i in expired.data) == ["orginv_edge", "orginv_old"]
        assert [i.id for i in accepted.data] == ["orginv_acc"]
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
        assert list_invitations(session, organization="org_acme", now_ms=NOW) is None
        everywhere = list_invitations(session, status="pending", now_ms=NOW)
        assert everywhere is not None and everywhere.total_count == 0


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
        roles = list_roles(session, order_by="key")
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
        ({"limit": 0}, "limit must be a whole number from 1 to 500"),
        ({"limit": 501}, "limit must be a whole number from 1 to 500"),
        ({"offset": -1}, "offset must be a whole number greater than or equal to 0"),
        ({"order_by": "-role"}, "order_by must be one of created_at"),
    ],
)
def test_bad_arguments_are_clear_errors(engine: Engine, kwargs: dict[str, Any], message: str) -> None:
    with Session(engine) as session, pytest.raises(InvalidQueryError, match=message) as caught:
        _list_memberships(session, organization="acme", **kwargs)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize(
    ("page", "page_size", "message"),
    [(0, 10, "page must be"), (1, 0, "page_size must be"), (1, 501, "page_size must be")],
)
def test_page_numbers_are_checked(page: int, page_size: int, message: str) -> None:
    assert page_window(3, 50) == (50, 100)
    with pytest.raises(InvalidQueryError, match=message):
        page_window(page, page_size)


def test_unknown_invitation_status_is_refused(engine: Engine) -> None:
    with Session(engine) as session, pytest.raises(InvalidQueryError, match="status must be one of"):
        list_invitations(session, organization="acme", status="lost")


def test_read_sessions_keep_every_json_value_exact(engine: Engine) -> None:
    big = 2**70  # beyond 64 bits: must not come back as a float
    data = membership_data("orgmem_big", ACME, "user_big", created_at=T0 + 5)
    data["public_metadata"] = {"big": big, "text": "é", "nested": [1.5, None, True]}
    created = make_event("organizationMembership.created", data, T0 + 5)
    apply(engine, [make_event("organization.created", ACME, T0), created])
    with read_sessions(engine)() as session:
        listing = _list_memberships(session, organization="acme")
    assert listing is not None
    assert listing.data[0].public_metadata == {"big": big, "text": "é", "nested": [1.5, None, True]}


def test_a_flat_json_object_holding_a_big_integer_stays_exact(engine: Engine) -> None:
    big = 2**70  # a flat object: judged by its values' types, not walked
    data = membership_data("orgmem_flat", ACME, "user_flat", created_at=T0 + 5)
    data["public_metadata"] = {"big": big, "small": 1}
    data["public_user_data"] = {**data["public_user_data"], "big": -big}
    created = make_event("organizationMembership.created", data, T0 + 5)
    apply(engine, [make_event("organization.created", ACME, T0), created])
    with read_sessions(engine)() as session:
        listing = _list_memberships(session, organization="acme")
    assert listing is not None
    assert listing.data[0].public_metadata == {"big": big, "small": 1}
    assert listing.data[0].public_user_data["big"] == -big


def test_the_hot_statements_run_on_the_drivers_cursor_on_postgresql(pg_engine: Engine) -> None:
    apply(pg_engine, [make_event("organization.created", ACME, T0), join(ACME, "user_a", T0 + 1)])
    with read_sessions(pg_engine)() as session:
        assert memberships(session, "acme").total_count == 1
        dialect = session.get_bind().dialect
    assert reads._driver_statement(reads._COUNTED_ORGANIZATION, dialect) is not None
    # An expanding parameter needs SQLAlchemy: that statement keeps its usual path.
    assert reads._driver_statement(reads._COUNTED_ORGANIZATIONS, dialect) is None


def test_a_lost_connection_on_the_drivers_cursor_is_sqlalchemys_error_and_is_dropped(
    pg_engine: Engine,
) -> None:
    apply(pg_engine, [make_event("organization.created", ACME, T0), join(ACME, "user_a", T0 + 1)])
    with read_sessions(pg_engine)() as session:
        connection = session.connection()
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with pg_engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(OperationalError) as raised:
            render.membership_page(session, reads.MembershipQuery(organization="acme"))
        assert raised.value.connection_invalidated
    with read_sessions(pg_engine)() as session:  # the pool hands out a live connection again
        assert memberships(session, "acme").total_count == 1


def test_a_statement_the_server_refuses_is_sqlalchemys_error(pg_engine: Engine) -> None:
    apply(pg_engine, [make_event("organization.created", ACME, T0)])
    with read_sessions(pg_engine)() as session:
        session.connection().exec_driver_sql("SELECT set_config('search_path', 'nowhere', false)")
        with pytest.raises(ProgrammingError) as raised:
            render.membership_page(session, reads.MembershipQuery(organization="acme"))
        assert not raised.value.connection_invalidated
        session.connection().invalidate()  # its settings were changed for the test
