"""The mirror is a function of the SET of events: any order, duplicates and batching converge."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from conftest import examples
from histories import any_delivery, generate_history
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select

from models.db import make_session_factory, session_scope
from models.events import Event
from models.mirror import TABLES, apply_events
from models.reads import invitation_status

NOW = 1_800_000_000_000


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every mirrored row, tombstones included, every column, in primary-key order."""
    state: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for name, table in TABLES.items():
            order = list(table.primary_key.columns)
            state[name] = [tuple(row) for row in connection.execute(select(table).order_by(*order))]
    return state


def clear_mirror(engine: Engine) -> None:
    """Empty the mirror tables (all these tests write); far cheaper than TRUNCATE per example."""
    with engine.begin() as connection:
        for table in TABLES.values():
            connection.execute(delete(table))


def apply_in_batches(engine: Engine, batches: Sequence[Sequence[Event]]) -> None:
    factory = make_session_factory(engine)
    for batch in batches:
        with session_scope(factory) as session:
            apply_events(session, batch, now_ms=NOW)


def apply_in_order(engine: Engine, events: Sequence[Event]) -> None:
    """Each event applied on its own, in order; one transaction, as commits change nothing here."""
    with session_scope(make_session_factory(engine)) as session:
        for event in events:
            apply_events(session, [event], now_ms=NOW)


def deliver(events: Sequence[Event], rng: random.Random) -> list[list[Event]]:
    """At-least-once, unordered delivery: shuffled, some duplicated, cut into random batches."""
    delivered = list(events) + [rng.choice(events) for _ in range(rng.randint(0, len(events) // 3 + 1))]
    rng.shuffle(delivered)
    batches: list[list[Event]] = []
    while delivered:
        size = rng.randint(1, max(1, len(delivered) // 2))
        batches.append(delivered[:size])
        delivered = delivered[size:]
    return batches


def live(state: dict[str, list[tuple[Any, ...]]], engine: Engine) -> dict[tuple[str, str], tuple[str, str]]:
    table = TABLES["memberships"]
    with engine.connect() as connection:
        rows = connection.execute(
            select(table.c.organization_id, table.c.user_id, table.c.id, table.c.role).where(
                table.c.deleted.is_(False)
            )
        )
        return {(org, user): (mem_id, role) for org, user, mem_id, role in rows}


def live_objects(engine: Engine) -> dict[str, Any]:
    with engine.connect() as connection:
        orgs, users, roles = (TABLES[name] for name in ("organizations", "users", "roles"))
        return {
            "orgs": {
                org_id: (name, slug)
                for org_id, name, slug in connection.execute(
                    select(orgs.c.id, orgs.c.name, orgs.c.slug).where(orgs.c.deleted.is_(False))
                )
            },
            "users": {
                user_id: (identifier, first_name)
                for user_id, identifier, first_name in connection.execute(
                    select(users.c.id, users.c.identifier, users.c.first_name).where(
                        users.c.deleted.is_(False)
                    )
                )
            },
            "roles": {
                role_id: key
                for role_id, key in connection.execute(
                    select(roles.c.id, roles.c.key).where(roles.c.deleted.is_(False))
                )
            },
        }


def live_invitations(engine: Engine, now_ms: int) -> dict[str, str]:
    """Invitation id -> status as the read side reports it at ``now_ms`` (``expired`` derived)."""
    table = TABLES["invitations"]
    with engine.connect() as connection:
        rows = connection.execute(
            select(table.c.id, table.c.status, table.c.expires_at).where(table.c.deleted.is_(False))
        )
        return {
            invitation_id: invitation_status(status, expires_at, now_ms)
            for invitation_id, status, expires_at in rows
        }


@any_delivery(examples(30))
def test_any_delivery_converges_to_in_order_application(
    engine: Engine, history_seed: int, steps: int, delivery_seed: int
) -> None:
    simulator = generate_history(history_seed, steps)
    events = simulator.events
    if not events:
        return

    clear_mirror(engine)
    apply_in_order(engine, events)
    reference = snapshot(engine)
    # The mirror's live state is Clerk's state, whatever Clerk announced about cascades.
    assert live(reference, engine) == simulator.live_memberships()
    # Compared as the history ends: invitations that lapsed by then read as expired.
    now = simulator.clock
    assert live_invitations(engine, now) == simulator.live_invitations(now)
    assert live_objects(engine) == {
        "orgs": {org.id: (org.name, org.slug) for org in simulator.orgs.values()},
        "users": simulator.live_users(),
        "roles": simulator.roles,
    }

    clear_mirror(engine)
    apply_in_batches(engine, deliver(events, random.Random(delivery_seed)))
    assert snapshot(engine) == reference


@settings(
    max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history_seed=st.integers(0, 2**32 - 1), delivery_seed=st.integers(0, 2**32 - 1))
def test_reversed_single_batch_converges(engine: Engine, history_seed: int, delivery_seed: int) -> None:
    events = generate_history(history_seed, 40).events
    clear_mirror(engine)
    apply_in_batches(engine, [events])
    reference = snapshot(engine)
    clear_mirror(engine)
    shuffled = list(reversed(events)) + events[: len(events) // 2]
    random.Random(delivery_seed).shuffle(shuffled)
    apply_in_batches(engine, [shuffled])
    assert snapshot(engine) == reference
