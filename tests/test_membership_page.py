"""A page of memberships as the read API serves it is, value for value, each membership's view
rendered: whatever the stored row holds (JSON nulls, SQL NULLs, values of the wrong kind,
integers beyond 64 bits, partial public user data, or complete public user data that goes
into the page as the text it is stored as)."""

from __future__ import annotations

import json
from typing import Any

from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, null

from models import reads, render
from models.tables import Membership, Organization
from models.userdata import SERVED_FIELDS, served_as_stored

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
USER_DATA_FIELDS = {
    "first_name": st.none() | TEXT,
    "last_name": st.none() | TEXT,
    "image_url": st.none() | TEXT,
    "profile_image_url": st.none() | TEXT,
    "has_image": st.booleans(),
    "identifier": st.none() | TEXT,
    "username": st.none() | TEXT,
    "user_id": TEXT,
    "extra": VALUES,
}
# A column's value: SQL NULL, JSON null, or a value of either kind.
NULLS = st.sampled_from([null(), None])
USER_DATA = st.one_of(
    NULLS,
    st.fixed_dictionaries({}, optional=USER_DATA_FIELDS),
    st.lists(TEXT, max_size=2),
)
METADATA = st.one_of(NULLS, st.dictionaries(TEXT, VALUES, max_size=4), st.lists(SCALARS, max_size=2))
PERMISSIONS = st.one_of(NULLS, st.lists(TEXT, max_size=3), st.dictionaries(TEXT, SCALARS, max_size=1))


def complete_user_data(user_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """Public user data with every field the read path would add, as Clerk sends it."""
    required = {name: strategy for name, strategy in USER_DATA_FIELDS.items() if name in SERVED_FIELDS}
    optional = {name: strategy for name, strategy in USER_DATA_FIELDS.items() if name not in SERVED_FIELDS}
    return st.fixed_dictionaries({**required, "user_id": st.just(user_id)}, optional=optional)


@st.composite
def membership_rows(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(min_value=0, max_value=6))
    rows = [
        {
            "organization_id": "org_page",
            "user_id": f"user_{n}",
            "id": f"orgmem_{n}",
            "role": draw(st.sampled_from(["org:admin", "org:member"])),
            "role_name": draw(st.none() | TEXT),
            "permissions": draw(PERMISSIONS),
            "identifier": draw(st.none() | TEXT),
            "public_user_data": draw(USER_DATA | complete_user_data(f"user_{n}")),
            "public_metadata": draw(METADATA),
            "private_metadata": draw(METADATA),
            "created_at": draw(st.none() | st.integers(min_value=0, max_value=2**53)),
            "updated_at": draw(st.none() | st.integers(min_value=0, max_value=2**53)),
            "version": "1",
            "deleted": False,
            "synced_at": 1,
        }
        for n in range(count)
    ]
    for row in rows:  # as the mirror's writers record it
        data = row["public_user_data"]
        row["user_data_complete"] = served_as_stored(None if data is null() else data, row["user_id"])
    return rows


def only_organization(engine: Engine, org_id: str, slug: str, memberships: list[dict[str, Any]]) -> None:
    """The mirror holding one organization, ``org_id`` (``slug``), and ``memberships``."""
    with engine.begin() as connection:
        connection.execute(delete(Membership))
        connection.execute(delete(Organization))
        connection.execute(
            insert(Organization).values(
                id=org_id, name=slug.title(), slug=slug, version="1", deleted=False, synced_at=1
            )
        )
        for row in memberships:
            connection.execute(insert(Membership).values(**row))


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=membership_rows(), order_by=st.sampled_from([None, "created_at", "-email_address", "+first_name"])
)
def test_a_page_is_each_membership_view_rendered(
    engine: Engine, rows: list[dict[str, Any]], order_by: str | None
) -> None:
    only_organization(engine, "org_page", "page", rows)
    query = reads.MembershipQuery(organization="page", limit=500, order_by=order_by)
    with reads.read_sessions(engine)() as session:
        listing = reads.membership_listing(session, query)
        body = render.membership_page(session, query)
    assert listing is not None and body is not None
    assert json.loads(body) == {
        "data": [render.membership(m) for m in listing.data],
        "total_count": len(rows),
    }


def test_the_organization_on_a_page_counts_its_live_members_whatever_the_page_holds(engine: Engine) -> None:
    # A page of all its memberships takes the count from the page's own total; a filtered
    # page counts them apart. Either way: live members only, past the end and at the start.
    rows = [
        {
            "organization_id": "org_c",
            "user_id": f"user_{n}",
            "id": f"orgmem_{n}",
            "role": "org:admin" if n < 2 else "org:member",
            "created_at": n,
            "updated_at": n,
            "version": "1",
            "deleted": n == 6,
            "synced_at": 1,
        }
        for n in range(7)
    ]
    only_organization(engine, "org_c", "c", rows)
    cases = [
        (reads.MembershipQuery(organization="org_c", limit=2), 2, 6),
        (reads.MembershipQuery(organization="c", limit=10, offset=4), 2, 6),
        (reads.MembershipQuery(organization="org_c", limit=10, offset=50), 0, 6),
        (reads.MembershipQuery(organization="org_c", limit=1, roles=("org:admin",)), 1, 2),
        (reads.MembershipQuery(organization="org_c", limit=5, offset=9, roles=("org:member",)), 0, 4),
    ]
    with reads.read_sessions(engine)() as session:
        for query, rows, total in cases:
            body = render.membership_page(session, query)
            assert body is not None
            page = json.loads(body)
            assert (len(page["data"]), page["total_count"]) == (rows, total), query
            listing = reads.membership_listing(session, query)
            assert listing is not None
            for membership in [*page["data"], *(render.membership(m) for m in listing.data)]:
                assert membership["organization"]["members_count"] == 6
