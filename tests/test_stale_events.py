"""orgsync_events_skipped by reason: stale events (their write lost to a version the mirror or the
batch held) apart from duplicate ones (inbox rows already handled), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from helpers import new_msg_id
from histories import T0, make_event
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from emulator.payloads import deleted as deleted_stub
from emulator.payloads import membership_data, organization_data, webhook_body
from models import metrics
from models.db import session_scope
from models.events import Event
from models.inbox import store_delivery
from models.mirror import MAX_PARAMS, PG_UPSERT_ROWS, apply_events
from models.tables import InboxStatus, Membership, Organization
from worker.apply import apply_inbox

NOW = 1_800_000_000_000


def skipped() -> dict[str, float]:
    """The process's orgsync_events_skipped_total, by reason."""
    registry = metrics.instruments().registry
    return {
        reason: registry.get_sample_value("orgsync_events_skipped_total", {"reason": reason}) or 0.0
        for reason in metrics.SKIP_REASONS
    }


def since(before: dict[str, float]) -> dict[str, float]:
    now = skipped()
    return {reason: now[reason] - before[reason] for reason in before}


def organization(org: str = "org_1", *, at: int = T0) -> dict[str, Any]:
    return organization_data(org, name=org, slug=org.replace("_", "-"), created_at=T0, updated_at=at)


def membership(
    user: str, *, role: str = "org:member", at: int = T0, org: str = "org_1", org_at: int = T0
) -> Any:
    return membership_data(
        f"orgmem_{org}_{user}", organization(org, at=org_at), user, role=role, created_at=T0, updated_at=at
    )


def membership_body(user: str, *, role: str, at: int) -> str:
    return webhook_body("organizationMembership.updated", membership(user, role=role, at=at), at)


def store(factory: sessionmaker[Session], body: str) -> int:
    with session_scope(factory) as session:
        stored = store_delivery(session, svix_id=new_msg_id(), body=body, received_at=T0)
    assert stored.status == InboxStatus.PENDING
    return stored.inbox_id


def apply(factory: sessionmaker[Session], events: list[Event]) -> int:
    with session_scope(factory) as session:
        return apply_events(session, events, now_ms=NOW)


def role_of(factory: sessionmaker[Session], user: str) -> str:
    with session_scope(factory) as session:
        found = session.get(Membership, ("org_1", user))
        assert found is not None
        return found.role


def test_both_reasons_are_exported_before_anything_is_counted() -> None:
    registry = metrics.instruments().registry
    for reason in metrics.SKIP_REASONS:
        assert registry.get_sample_value("orgsync_events_skipped_total", {"reason": reason}) is not None


def test_an_older_version_is_stale_a_redelivery_duplicate_and_a_newer_one_applied(
    session_factory: sessionmaker[Session],
) -> None:
    before = skipped()
    current = store(session_factory, membership_body("user_1", role="org:admin", at=T0 + 1_000))
    report = apply_inbox(session_factory, [current], now_ms=NOW, max_attempts=3)
    assert (report.applied, report.stale, report.skipped) == (1, 0, 0)
    assert since(before) == {"stale": 0, "duplicate": 0}

    # An older version under its own delivery id: applied, but the mirror keeps the newer row.
    older = store(session_factory, membership_body("user_1", role="org:member", at=T0 + 500))
    report = apply_inbox(session_factory, [older], now_ms=NOW, max_attempts=3)
    assert (report.applied, report.stale, report.skipped) == (1, 1, 0)
    assert role_of(session_factory, "user_1") == "org:admin"
    assert since(before) == {"stale": 1, "duplicate": 0}

    # The same inbox row handed over again (a redelivered task): already handled, a duplicate.
    report = apply_inbox(session_factory, [older], now_ms=NOW, max_attempts=3)
    assert (report.applied, report.stale, report.skipped) == (0, 0, 1)
    assert since(before) == {"stale": 1, "duplicate": 1}

    newer = store(session_factory, membership_body("user_1", role="org:billing", at=T0 + 2_000))
    report = apply_inbox(session_factory, [newer], now_ms=NOW, max_attempts=3)
    assert (report.applied, report.stale, report.skipped) == (1, 0, 0)
    assert role_of(session_factory, "user_1") == "org:billing"
    assert since(before) == {"stale": 1, "duplicate": 1}


def test_a_task_redelivered_after_its_worker_died_counts_rows_already_applied_as_duplicates(
    session_factory: sessionmaker[Session],
) -> None:
    ids = [store(session_factory, membership_body(f"user_{n}", role="org:member", at=T0)) for n in range(3)]
    apply_inbox(session_factory, ids[:2], now_ms=NOW, max_attempts=3)
    before = skipped()
    # One by one, each row charged its attempt first: the two already applied are found then.
    report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3, one_by_one=True)
    assert (report.applied, report.stale, report.skipped) == (1, 0, 2)
    assert since(before) == {"stale": 0, "duplicate": 2}


def test_two_updates_of_one_membership_in_a_batch_count_one_stale(
    session_factory: sessionmaker[Session],
) -> None:
    before = skipped()
    ids = [
        store(session_factory, membership_body("user_1", role="org:admin", at=T0 + 2_000)),
        store(session_factory, membership_body("user_1", role="org:member", at=T0 + 1_000)),
        # Another membership of the same organization: its embedded organization data collapses
        # with the others' into one row, which is no event's own write and counts for nothing.
        store(session_factory, membership_body("user_2", role="org:member", at=T0 + 1_000)),
    ]
    report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3)
    assert (report.applied, report.stale, report.skipped) == (3, 1, 0)
    assert role_of(session_factory, "user_1") == "org:admin"
    assert since(before) == {"stale": 1, "duplicate": 0}


def test_statements_of_several_chunks_mixing_stale_and_new_rows_count_the_stale_ones(
    session_factory: sessionmaker[Session],
) -> None:
    # More rows than one statement takes on either database (PG_UPSERT_ROWS, SQLite's MAX_PARAMS).
    rows = max(PG_UPSERT_ROWS, MAX_PARAMS // len(Membership.__table__.c)) + 10
    users = [f"user_{n:04d}" for n in range(rows)]

    def event(user: str, at: int) -> Event:
        return make_event("organizationMembership.updated", membership(user, at=at), at)

    assert apply(session_factory, [event(user, T0 + 5_000) for user in users[::2]]) == 0
    assert apply(session_factory, [event(user, T0 + 1_000) for user in users]) == len(users[::2])


def test_an_equal_version_is_stale_in_the_batch_and_in_the_mirror(
    session_factory: sessionmaker[Session],
) -> None:
    event = make_event("organizationMembership.created", membership("user_1"), T0)
    assert apply(session_factory, [event, event]) == 1
    assert apply(session_factory, [event]) == 1


def test_organization_events_are_counted_apart_from_the_organization_data_memberships_embed(
    session_factory: sessionmaker[Session],
) -> None:
    def updated(org: str, at: int) -> Event:
        return make_event("organization.updated", organization(org, at=at), at)

    def member(user: str, org: str, org_at: int = T0) -> Event:
        return make_event("organizationMembership.created", membership(user, org=org, org_at=org_at), T0)

    # The organization event wins over the older data a membership of its organization embeds.
    assert apply(session_factory, [updated("org_1", T0 + 5_000), member("user_1", "org_1")]) == 0
    # A new organization from embedded data beside a newer organization event: neither is stale.
    assert apply(session_factory, [updated("org_1", T0 + 6_000), member("user_2", "org_2")]) == 0
    # An older organization event beside a new organization from embedded data: one stale.
    assert apply(session_factory, [updated("org_1", T0 + 1_000), member("user_3", "org_3")]) == 1
    # An organization event older than the data a membership of the same batch embeds.
    assert apply(session_factory, [updated("org_4", T0 + 1_000), member("user_4", "org_4", T0 + 9_000)]) == 1
    with session_scope(session_factory) as session:
        updated = {org.id: org.updated_at for org in session.scalars(select(Organization))}
    assert updated == {"org_1": T0 + 6_000, "org_2": T0, "org_3": T0, "org_4": T0 + 9_000}


def test_deletions_of_objects_never_reused_are_never_stale(session_factory: sessionmaker[Session]) -> None:
    apply(session_factory, [make_event("organizationMembership.created", membership("user_1"), T0)])
    for _ in range(2):
        deletions = [
            make_event("user.deleted", deleted_stub("user", "user_1"), T0 + 10),
            make_event("organization.deleted", deleted_stub("organization", "org_1"), T0 + 10),
        ]
        assert apply(session_factory, deletions) == 0
