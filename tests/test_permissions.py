"""Permission checks from the mirror: role, permissions, a user's organizations, and the cache."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from helpers import wait_until
from histories import T0, deleted_stub, make_event, membership_data, organization_data, role_data
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.db import make_session_factory, session_scope
from models.events import Event
from models.mirror import apply_events
from models.permissions import (
    SYSTEM_PERMISSIONS,
    AccessCache,
    access_of,
    has_permission,
    mirror_generation,
    organizations_of,
    role_of,
)

NOW = 1_800_000_000_000
MANAGE = "org:sys_memberships:manage"
READ = "org:sys_memberships:read"
ACME = organization_data("org_acme", slug="acme", name="Acme", created_at=T0)
GLOBEX = organization_data("org_globex", slug="globex", name="Globex", created_at=T0 + 1)


def apply(factory: sessionmaker[Session], events: list[Event]) -> None:
    with session_scope(factory) as session:
        apply_events(session, events, now_ms=NOW)


def member(org: dict[str, Any], user: str, at: int, role: str = "org:member", **extra: Any) -> dict[str, Any]:
    null_permissions = "permissions" in extra and extra["permissions"] is None
    data = membership_data(f"orgmem_{org['id']}_{user}", org, user, role=role, created_at=at, **extra)
    if null_permissions:  # Clerk may send null; the builder fills in member-level ones instead
        data["permissions"] = None
    return data


def joined(org: dict[str, Any], user: str, at: int, role: str = "org:member", **extra: Any) -> Event:
    return make_event("organizationMembership.created", member(org, user, at, role, **extra), at)


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    factory = make_session_factory(engine)
    apply(
        factory,
        [
            make_event("organization.created", ACME, T0),
            make_event("organization.created", GLOBEX, T0 + 1),
            joined(ACME, "user_ada", T0 + 10, "org:admin", permissions=[MANAGE, READ]),
            joined(ACME, "user_bob", T0 + 11),
            joined(GLOBEX, "user_bob", T0 + 12, "admin", permissions=None),
            joined(GLOBEX, "user_eve", T0 + 13, "org:editor", permissions=None),
        ],
    )
    return factory


def test_permission_role_and_organizations_from_the_mirror(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        assert has_permission(session, "user_ada", "org_acme", MANAGE)
        assert has_permission(session, "user_ada", "acme", MANAGE)  # by slug too
        assert not has_permission(session, "user_bob", "acme", MANAGE)
        assert has_permission(session, "user_bob", "acme", READ)
        assert not has_permission(session, "user_ada", "globex", READ)  # not a member
        assert not has_permission(session, "user_ada", "org_nowhere", READ)
        assert role_of(session, "user_ada", "acme") == "org:admin"
        assert role_of(session, "user_nobody", "acme") is None
        # A legacy key reads as today's, and with no list of its own Clerk's admin defaults apply.
        assert role_of(session, "user_bob", "globex") == "org:admin"
        assert has_permission(session, "user_bob", "globex", MANAGE)
        # A custom role the mirror does not know, and no list on the membership: nothing granted.
        assert not has_permission(session, "user_eve", "globex", "org:posts:edit")
        orgs = organizations_of(session, "user_bob")
        assert [(a.organization_id, a.organization_slug, a.role) for a in orgs] == [
            ("org_acme", "acme", "org:member"),
            ("org_globex", "globex", "org:admin"),
        ]
        assert organizations_of(session, "user_nobody") == []
    assert set(SYSTEM_PERMISSIONS) >= {MANAGE, READ}


def test_the_mirrored_role_decides_over_the_membership_list(factory: sessionmaker[Session]) -> None:
    apply(factory, [make_event("role.created", role_data("role_ed", "org:editor"), T0 + 20)])
    with factory() as session:
        assert has_permission(session, "user_eve", "globex", "org:posts:edit")
    later = role_data("role_ed", "org:editor", permissions=["org:posts:read"], updated_at=T0 + 30)
    apply(factory, [make_event("role.updated", later, T0 + 30)])
    with factory() as session:
        assert not has_permission(session, "user_eve", "globex", "org:posts:edit")
        assert has_permission(session, "user_eve", "globex", "org:posts:read")


def test_removed_members_and_deleted_organizations_have_no_access(factory: sessionmaker[Session]) -> None:
    gone = member(ACME, "user_bob", T0 + 11, updated_at=T0 + 40)
    apply(
        factory,
        [
            make_event("organizationMembership.deleted", gone, T0 + 40),
            make_event("organization.deleted", deleted_stub("organization", "org_globex"), T0 + 41),
        ],
    )
    with factory() as session:
        assert access_of(session, "user_bob", "acme") is None
        assert organizations_of(session, "user_bob") == []
        assert role_of(session, "user_ada", "acme") == "org:admin"


def test_every_mirror_write_moves_the_generation(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        before = mirror_generation(session)
    assert before > 0
    apply(factory, [joined(GLOBEX, "user_ada", T0 + 50)])
    with factory() as session:
        assert mirror_generation(session) > before


def test_a_mirror_change_changes_a_cached_answer(factory: sessionmaker[Session]) -> None:
    cache = AccessCache(recheck_s=0)
    with factory() as session:
        first = cache.access_of(session, "user_bob", "acme")
        assert first is not None and first.role == "org:member"
        assert cache.access_of(session, "user_bob", "acme") == first
    assert (cache.hits, cache.misses) == (1, 1)
    promoted = member(ACME, "user_bob", T0 + 11, "org:admin", updated_at=T0 + 60, permissions=[MANAGE])
    apply(factory, [make_event("organizationMembership.updated", promoted, T0 + 60)])
    with factory() as session:
        after = cache.access_of(session, "user_bob", "acme")
    assert after is not None and after.role == "org:admin" and after.allows(MANAGE)
    assert cache.misses == 2


def test_the_cache_trusts_the_generation_for_recheck_s_then_reads_it_again(
    factory: sessionmaker[Session],
) -> None:
    now = [100.0]
    cache = AccessCache(recheck_s=1.0, clock=lambda: now[0])
    with factory() as session:
        assert cache.access_of(session, "user_ada", "globex") is None
    apply(factory, [joined(GLOBEX, "user_ada", T0 + 70)])
    with factory() as session:
        assert cache.access_of(session, "user_ada", "globex") is None  # within recheck_s: cached
        now[0] += 1.0
        found = cache.access_of(session, "user_ada", "globex")
    assert found is not None and found.role == "org:member"


def test_by_default_answers_come_from_memory_and_a_change_is_seen_soon(
    factory: sessionmaker[Session],
) -> None:
    by_lookups: list[int] = []  # sessions opened by lookups (the watcher thread opens its own)
    main = threading.current_thread()

    def sessions() -> Session:
        if threading.current_thread() is main:
            by_lookups.append(1)
        return factory()

    def from_memory() -> bool | None:
        hits, opened = cache.hits, len(by_lookups)
        answer = cache.access_of(sessions, "user_ada", "globex")
        return (answer is None and cache.hits == hits + 1 and len(by_lookups) == opened) or None

    cache = AccessCache(recheck_s=0.05)
    try:
        assert cache.access_of(sessions, "user_ada", "globex") is None
        assert len(by_lookups) == 1
        # Answered from memory: no session, no query, while the generation is current.
        wait_until("an answer from memory", from_memory)
        apply(factory, [joined(GLOBEX, "user_ada", T0 + 70)])
        # The watcher notices the write and the next lookup reads the new membership.
        found = wait_until("the new membership", lambda: cache.access_of(sessions, "user_ada", "globex"))
        assert found.role == "org:member"
    finally:
        cache.close()


def test_the_cache_is_bounded() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        AccessCache(max_entries=0)
    with pytest.raises(ValueError, match="recheck_s"):
        AccessCache(recheck_s=-1)


def test_the_cache_drops_the_least_recently_used(factory: sessionmaker[Session]) -> None:
    cache = AccessCache(max_entries=2)
    with factory() as session:
        for user in ("user_ada", "user_bob", "user_eve"):
            cache.access_of(session, user, "acme")
        cache.access_of(session, "user_ada", "acme")
    assert cache.misses == 4
