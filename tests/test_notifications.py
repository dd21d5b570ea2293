"""Change events derived from the mirror's writes: net changes, nothing for what changes nothing."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import examples
from histories import T0, any_delivery, generate_history, make_event
from sqlalchemy import Engine, delete, select
from test_convergence import apply_in_batches, clear_mirror, deliver

from emulator.payloads import membership_data, organization_data, user_public_data
from models import notifications
from models.db import make_session_factory, session_scope
from models.mirror import TABLES, apply_events
from models.reads import invitation_status
from models.reconcile import absent_rows, tombstone_rows, write_listing
from models.tables import Notification

NOW = 1_800_000_000_000
DELETIONS = {"organization.deleted", "user.deleted", "membership.removed", "invitation.deleted"}


@pytest.fixture(autouse=True)
def outbox_on() -> Iterator[None]:
    with notifications.configured(outbox=True):
        yield


def clear(engine: Engine) -> None:
    clear_mirror(engine)
    with engine.begin() as connection:
        connection.execute(delete(Notification.__table__))


def outbox(engine: Engine) -> list[dict[str, Any]]:
    table = Notification.__table__
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(select(table).order_by(table.c.id))]


def object_key(row: dict[str, Any]) -> tuple[str, ...]:
    kind = row["type"].split(".")[0]
    if kind == "membership":
        return (kind, row["data"]["organization_id"], row["data"]["user_id"])
    return (kind, row["object_id"])


def announced(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], Any]:
    """Each object's state as the last event about it tells: None when deleted, else its fields."""
    state: dict[tuple[str, ...], Any] = {}
    for row in rows:
        key = object_key(row)
        obj = row["data"]["object"]
        if row["type"] in DELETIONS:
            state[key] = None
        elif key[0] == "organization":
            state[key] = (obj["name"], obj["slug"])
        elif key[0] == "membership":
            state[key] = (obj["id"], obj["role"], obj["public_metadata"])
        elif key[0] == "user":
            state[key] = obj["first_name"]
        else:
            state[key] = obj["status"]
    return state


def mirrored(engine: Engine) -> dict[tuple[str, ...], Any]:
    """Every watched row of the mirror as the same fields: None for tombstones."""
    state: dict[tuple[str, ...], Any] = {}
    with engine.connect() as connection:
        for row in connection.execute(select(TABLES["organizations"])):
            state[("organization", row.id)] = None if row.deleted else (row.name or "", row.slug or "")
        for row in connection.execute(select(TABLES["memberships"])):
            value = None if row.deleted else (row.id, row.role, row.public_metadata or {})
            state[("membership", row.organization_id, row.user_id)] = value
        for row in connection.execute(select(TABLES["users"])):
            state[("user", row.id)] = None if row.deleted else row.first_name
        for row in connection.execute(select(TABLES["invitations"])):
            value = None if row.deleted else invitation_status(row.status, row.expires_at, NOW)
            state[("invitation", row.id)] = value
    return state


@any_delivery(examples(25), max_steps=60)
def test_events_of_any_delivery_net_out_to_the_mirror(
    engine: Engine, history_seed: int, steps: int, delivery_seed: int
) -> None:
    """Shuffled, duplicated, batched: the last event of every object is the object's final state,
    every object the mirror holds was announced, and delivering any event again announces nothing."""
    events = generate_history(history_seed, steps).events
    if not events:
        return
    clear(engine)
    rng = random.Random(delivery_seed)
    apply_in_batches(engine, deliver(events, rng))
    rows = outbox(engine)
    assert announced(rows) == mirrored(engine)
    assert len({row["event_id"] for row in rows}) == len(rows)

    again = [rng.choice(events) for _ in range(rng.randint(1, len(events)))]
    apply_in_batches(engine, [again, events])
    assert outbox(engine) == rows


def _membership(role: str, updated_at: int, *, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    org = organization_data("org_1", name="Acme", slug="acme", created_at=T0, updated_at=T0)
    data = membership_data("orgmem_1", org, "user_1", role=role, created_at=T0, updated_at=updated_at)
    data["public_user_data"] = user_public_data("user_1", first_name="Ann", identifier="ann@example.com")
    if metadata is not None:
        data["public_metadata"] = metadata
    return data


def test_a_burst_in_one_batch_is_one_net_change(engine: Engine) -> None:
    factory = make_session_factory(engine)
    clear(engine)
    created = make_event("organizationMembership.created", _membership("org:member", T0), T0)
    with session_scope(factory) as session:
        apply_events(session, [created], now_ms=NOW)
    assert [row["type"] for row in outbox(engine)] == ["organization.created", "membership.added"]

    burst = [
        make_event("organizationMembership.updated", _membership(role, T0 + i), T0 + i)
        for i, role in enumerate(["org:admin", "org:editor", "org:admin"], start=1)
    ]
    with session_scope(factory) as session:
        apply_events(session, list(reversed(burst)) + burst, now_ms=NOW)
    rows = outbox(engine)[2:]
    assert [row["type"] for row in rows] == ["membership.role_changed"]
    assert rows[0]["data"]["object"]["role"] == "org:admin"
    assert rows[0]["data"]["previous"]["role"] == "org:member"
    assert rows[0]["ordering_key"] == "org_1"

    # The same role again with other data: an update; then a stale event and a duplicate: nothing.
    tagged = make_event(
        "organizationMembership.updated", _membership("org:admin", T0 + 9, metadata={"plan": "pro"}), T0 + 9
    )
    with session_scope(factory) as session:
        apply_events(session, [tagged, burst[0], created], now_ms=NOW)
    with session_scope(factory) as session:
        apply_events(session, [tagged], now_ms=NOW)
    rows = outbox(engine)[3:]
    assert [row["type"] for row in rows] == ["membership.updated"]
    assert rows[0]["data"]["previous"] == {"public_metadata": {}, "updated_at": T0 + 3}
    assert rows[0]["data"]["object"]["object"] == "organization_membership"
    assert rows[0]["data"]["object"]["organization"]["id"] == "org_1"


def test_nothing_is_read_or_written_when_no_channel_is_configured(engine: Engine) -> None:
    clear(engine)
    with notifications.configured(outbox=False), session_scope(make_session_factory(engine)) as session:
        assert notifications.capture(session, {}, now_ms=NOW) is None
        apply_events(
            session,
            [make_event("organizationMembership.created", _membership("org:member", T0), T0)],
            now_ms=NOW,
        )
    assert outbox(engine) == []


def test_callbacks_run_after_commit_and_never_after_rollback(engine: Engine) -> None:
    clear(engine)
    heard: list[notifications.Change] = []
    unsubscribe = notifications.subscribe(heard.append)
    factory = make_session_factory(engine)
    try:
        with notifications.configured(outbox=False):
            with pytest.raises(RuntimeError), session_scope(factory) as session:
                apply_events(
                    session,
                    [make_event("organizationMembership.created", _membership("org:member", T0), T0)],
                    now_ms=NOW,
                )
                assert heard == []
                raise RuntimeError("rolled back")
            assert heard == []
            with session_scope(factory) as session:
                apply_events(
                    session,
                    [make_event("organizationMembership.created", _membership("org:member", T0), T0)],
                    now_ms=NOW,
                )
                assert heard == []
    finally:
        unsubscribe()
    assert [change.type for change in heard] == ["organization.created", "membership.added"]
    assert heard[1].body()["data"]["object"]["role"] == "org:member"


def test_postgres_notify_is_sent_with_the_commit_and_never_on_rollback(
    pg_engine: Engine, pg_url: str
) -> None:
    clear(pg_engine)
    channel = "orgsync_test_changes"
    dsn = pg_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    factory = make_session_factory(pg_engine)
    event = make_event("organizationMembership.created", _membership("org:member", T0), T0)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {channel}")
        with notifications.configured(outbox=False, channel=channel):
            with pytest.raises(RuntimeError), session_scope(factory) as session:
                apply_events(session, [event], now_ms=NOW)
                raise RuntimeError("rolled back")
            with session_scope(factory) as session:
                apply_events(session, [event], now_ms=NOW)
        # A marker after both transactions: notifications arrive in commit order, so the rolled
        # back batch's would have come before it.
        listener.execute(f"NOTIFY {channel}, 'marker'")
        payloads = [n.payload for n in listener.notifies(timeout=30, stop_after=3)]
    assert payloads[2] == "marker"
    heard = [json.loads(payload) for payload in payloads[:2]]
    assert [item["type"] for item in heard] == ["organization.created", "membership.added"]
    assert heard[1]["ordering_key"] == "org_1"
    assert heard[1]["id"].startswith("ntf_")
    assert outbox(pg_engine) == []  # no URLs: no outbox rows


def test_reconciliation_repairs_are_announced(engine: Engine) -> None:
    """A missed update found by a listing, and a missed removal confirmed with Clerk, are changes too."""
    factory = make_session_factory(engine)
    clear(engine)
    with session_scope(factory) as session:
        apply_events(
            session,
            [make_event("organizationMembership.created", _membership("org:member", T0), T0)],
            now_ms=NOW,
        )
    listed = _membership("org:admin", T0 + 50)
    with session_scope(factory) as session:
        write_listing(session, "memberships", [listed], now_ms=NOW)
    with session_scope(factory) as session:
        write_listing(session, "memberships", [listed], now_ms=NOW)  # listed again: nothing new
    rows = outbox(engine)[2:]
    assert [row["type"] for row in rows] == ["membership.role_changed"]
    assert rows[0]["data"]["previous"]["role"] == "org:member"

    with session_scope(factory) as session:
        gone = absent_rows(
            session, "memberships", seen=set(), listed_since_ms=NOW + 1, organization_id="org_1"
        )
        tombstone_rows(session, gone, listed_since_ms=NOW + 1, now_ms=NOW + 2)
    rows = outbox(engine)[3:]
    assert [row["type"] for row in rows] == ["membership.removed"]
    assert rows[0]["data"]["object"]["deleted"] is True
