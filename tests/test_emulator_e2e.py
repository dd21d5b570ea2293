"""The emulator against real orgsync: chaotic Svix deliveries in, the mirror equals Clerk's truth out.

The emulator runs in this process and delivers its scenario's webhooks over HTTP to
``orgsync serve``; a real Celery worker applies them to PostgreSQL through Redis. Once the
deliveries have settled and the inbox has drained, the mirror is read back in the shape of
the emulator's snapshot and compared with it, row for row. With dropped deliveries the
mirror must differ only where the dropped events would have written, and applying exactly
those events must close the gap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import truncate_all
from mirror_compare import SHAPE, RowKey, as_mirrored, describe, differences, mirror_snapshot
from sqlalchemy import Engine, select
from stack import FAST_SWEEPS, TEST_BOUND_S, Stack, hermetic_env, running_stack

from emulator import ChaosConfig, Emulator, EmulatorConfig
from models.db import make_session_factory, session_scope
from models.events import event_writes, parse_event
from models.mirror import apply_events
from models.tables import InboxEvent, InboxStatus

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

STEPS = 2500
RATE = 500.0  # scenario steps per second: deliveries overlap with the activity producing them
SETTLE_BOUND_S = 180.0
NOW_MS = 0  # synced_at of the rows applied by the test itself: never compared


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    yield pg_engine
    truncate_all(pg_engine)


@pytest.fixture
def stack(database: Engine, redis_url: str, signing_secret: str, tmp_path: Path) -> Iterator[Stack]:
    """orgsync serve + worker + beat on PostgreSQL and Redis, all stopped after the test."""
    redis.Redis.from_url(redis_url).flushdb()
    env = hermetic_env(
        database_url=database.url.render_as_string(hide_password=False),
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        **FAST_SWEEPS,
    )
    with running_stack(env, tmp_path / "logs") as running:
        running.start_web()
        running.start_worker(beat=True)
        yield running


def emulator_config(stack: Stack, signing_secret: str, chaos: ChaosConfig) -> EmulatorConfig:
    return EmulatorConfig(
        port=0,
        webhook_urls=(stack.webhook_url,),
        signing_secret=signing_secret,
        rate_limit=0,
        seed=7,
        seed_orgs=4,
        seed_members=8,
        # A fresh instance's roles and permissions exist before any endpoint: announce them,
        # so that the mirror can hold every table of the snapshot.
        announce_defaults=True,
        chaos=chaos,
        # Svix's retry schedule in milliseconds instead of hours, should orgsync answer 5xx.
        time_scale=0.001,
    )


def run_and_drain(emu: Emulator, stack: Stack, database: Engine) -> set[str]:
    """Run the scenario, wait for every delivery and for the inbox to drain; returns the delivered ids."""
    report = emu.run_scenario(STEPS, seed=3, rate=RATE)
    assert report.steps == STEPS
    stack.wait_for(
        "the emulator's deliveries to settle",
        lambda: True if emu.settle(timeout=1.0) else None,
        SETTLE_BOUND_S,
    )
    outcomes = {msg_id: set(per_url.values()) for msg_id, per_url in emu.delivery.outcomes().items()}
    assert {o for values in outcomes.values() for o in values} <= {"succeeded", "dropped"}, outcomes
    delivered = {msg_id for msg_id, values in outcomes.items() if values == {"succeeded"}}
    # Every step emits at least one event; seeding and the defaults add more.
    assert len(delivered) > STEPS
    factory = make_session_factory(database)

    def drained() -> list[tuple[str, str]] | None:
        with session_scope(factory) as session:
            rows = [tuple(r) for r in session.execute(select(InboxEvent.svix_id, InboxEvent.status))]
        if len(rows) < len(delivered) or any(status == InboxStatus.PENDING for _, status in rows):
            return None
        return rows  # type: ignore[return-value]

    rows = stack.wait_for("the inbox to drain", drained, SETTLE_BOUND_S)
    # Every acknowledged delivery stored once (duplicates included in what was sent) and applied.
    assert {svix_id for svix_id, _ in rows} == delivered
    assert {status for _, status in rows} == {InboxStatus.APPLIED}
    copies = [a for a in emu.delivery.log() if a.copy == 1 and a.outcome == "succeeded"]
    assert copies, "chaos sent no duplicate: the test would not show deduplication"
    return delivered


def test_mirror_equals_the_emulators_truth_after_chaotic_delivery(
    stack: Stack, database: Engine, signing_secret: str
) -> None:
    chaos = ChaosConfig(seed=11, duplicate_rate=0.1, reorder_window=0.05, delay_rate=0.1, max_delay=0.3)
    with Emulator(emulator_config(stack, signing_secret, chaos)) as emu:
        run_and_drain(emu, stack, database)
        truth = as_mirrored(emu.snapshot())
        log = emu.delivery.log()
    assert not emu.delivery.dropped()
    # Out of order for real: some message went out before one emitted earlier.
    sent = [a.seq for a in sorted(log, key=lambda a: (a.sent_at, a.seq)) if a.copy == 0 and a.attempt == 1]
    assert any(later < earlier for earlier, later in itertools.pairwise(sent))

    assert set(SHAPE) <= set(truth)
    for name, (_, _, columns) in SHAPE.items():
        assert all(tuple(row) == columns for row in truth[name]), f"the snapshot's {name} changed shape"
    assert truth["memberships"] and truth["invitations"] and truth["roles"] and truth["users"]

    with session_scope(make_session_factory(database)) as session:
        mirror = mirror_snapshot(session)
    diff = differences(mirror, truth)
    assert not diff, describe(diff)


def test_with_drops_the_difference_is_exactly_the_dropped_events(
    stack: Stack, database: Engine, signing_secret: str
) -> None:
    chaos = ChaosConfig(seed=5, duplicate_rate=0.1, reorder_window=0.05, drop_rate=0.03)
    with Emulator(emulator_config(stack, signing_secret, chaos)) as emu:
        run_and_drain(emu, stack, database)
        truth = as_mirrored(emu.snapshot())
        dropped = [parse_event(m.msg_id, m.body) for m in emu.delivery.dropped()]
    assert dropped

    # Where the dropped events would have written: their own rows, and for a dropped deletion
    # of an organization or a user, the memberships and invitations it cascades to.
    touched = {(w.table, w.key) for event in dropped for w in event_writes(event)}
    gone_orgs = {e.data["id"] for e in dropped if e.type == "organization.deleted"}
    gone_users = {e.data["id"] for e in dropped if e.type == "user.deleted"}

    def explained(key: RowKey, rows: tuple[Any, Any]) -> bool:
        if key in touched:
            return True
        if key[0] not in ("memberships", "invitations"):
            return False
        return any(
            row is not None and (row["organization_id"] in gone_orgs or row["user_id"] in gone_users)
            for row in rows
        )

    factory = make_session_factory(database)
    with session_scope(factory) as session:
        diff = differences(mirror_snapshot(session), truth)
    assert diff, "the dropped events changed nothing: the test would not show their effect"
    unexplained = {key: rows for key, rows in diff.items() if not explained(key, rows)}
    assert not unexplained, describe(unexplained)

    # What reconciliation will do later, done here by hand: the missed events make it whole.
    with session_scope(factory) as session:
        apply_events(session, dropped, now_ms=NOW_MS)
    with session_scope(factory) as session:
        repaired = differences(mirror_snapshot(session), truth)
    assert not repaired, describe(repaired)
