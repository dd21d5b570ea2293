"""Workers applying at the same time on PostgreSQL end with the mirror one worker would have made.

Mirror writes lock what they write (``models.db``): a batch of organizations' events locks those
organizations, a batch with users, roles or permissions the whole mirror, and ``apply_inbox``
first applies what it can lock without waiting, then the rest. These tests run several
workers at once, as threads sharing one engine and as real ``orgsync worker`` processes, on
histories full of cascades (users and organizations deleted while their memberships still
arrive, re-created, roles changed), and compare with applying the same events in order.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
from conftest import examples, truncate_all
from histories import ClerkSimulator, any_delivery, generate_history
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session, sessionmaker
from stack import FAST_SWEEPS, hermetic_env, running_stack
from test_convergence import NOW, clear_mirror, snapshot
from test_crash_e2e import assert_mirror_is, enqueue, in_order_result, status_counts

from emulator.payloads import webhook_body
from models.db import lock_mirror_writes, lock_organizations, make_session_factory, session_scope
from models.events import Event
from models.inbox import store_delivery
from models.mirror import apply_events
from models.permissions import mirror_generation
from models.tables import InboxEvent, InboxStatus, Membership
from worker.apply import apply_inbox

pytestmark = pytest.mark.postgres

WORKERS = 3


def apply_in_order(engine: Engine, events: Sequence[Event]) -> None:
    """The reference: each event applied on its own, in order, by one writer holding everything."""
    with session_scope(make_session_factory(engine)) as session:
        lock_mirror_writes(session)
        for event in events:
            apply_events(session, [event], now_ms=NOW)


def store(factory: sessionmaker[Session], events: Sequence[Event]) -> list[int]:
    """The events as the web process stores them (same delivery ids), pending; their inbox ids."""
    with session_scope(factory) as session:
        return [
            store_delivery(
                session,
                svix_id=event.svix_id,
                body=webhook_body(event.type, event.data, event.timestamp_ms),
                received_at=NOW,
            ).inbox_id
            for event in events
        ]


def apply_concurrently(
    factory: sessionmaker[Session], batches: Sequence[Sequence[int]], workers: int
) -> None:
    """``workers`` threads take batches from one queue and apply them, all starting at once."""
    todo: queue.Queue[Sequence[int]] = queue.Queue()
    for batch in batches:
        todo.put(batch)
    start = threading.Barrier(workers)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            start.wait()
            while True:
                try:
                    batch = todo.get_nowait()
                except queue.Empty:
                    return
                report = apply_inbox(factory, batch, now_ms=NOW, max_attempts=5)
                assert report.failed == report.dead == 0, report
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"apply-{n}") for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def cut(ids: Sequence[int], rng: random.Random, *, largest: int) -> list[list[int]]:
    """The ids shuffled and cut into batches of 1 to ``largest``."""
    shuffled = list(ids)
    rng.shuffle(shuffled)
    batches: list[list[int]] = []
    while shuffled:
        size = rng.randint(1, largest)
        batches.append(shuffled[:size])
        shuffled = shuffled[size:]
    return batches


@pytest.fixture
def pg_factory(pg_engine: Engine) -> Iterator[sessionmaker[Session]]:
    yield make_session_factory(pg_engine)
    truncate_all(pg_engine)


def reset(engine: Engine) -> None:
    clear_mirror(engine)
    with engine.begin() as connection:
        connection.execute(delete(InboxEvent))


@any_delivery(examples(15))
def test_concurrent_workers_converge_to_in_order_application(
    pg_engine: Engine, pg_factory: sessionmaker[Session], history_seed: int, steps: int, delivery_seed: int
) -> None:
    events = generate_history(history_seed, steps).events
    if not events:
        return
    reset(pg_engine)
    apply_in_order(pg_engine, events)
    reference = snapshot(pg_engine)

    reset(pg_engine)
    ids = store(pg_factory, events)
    rng = random.Random(delivery_seed)
    apply_concurrently(pg_factory, cut(ids, rng, largest=max(1, len(ids) // 4)), WORKERS)
    assert status_counts(pg_engine) == {InboxStatus.APPLIED: len(ids)}
    assert snapshot(pg_engine) == reference


def cascades(seed: int) -> list[Event]:
    """Organizations and users deleted (and re-created) amid a stream of memberships, role and
    user changes, so that concurrent batches keep meeting a cascade."""
    sim = ClerkSimulator(random.Random(seed))
    for _ in range(12):
        sim.create_user()
    for _ in range(6):
        sim.create_org()
    moves = (
        [sim.add_member] * 8
        + [sim.change_role, sim.remove_member, sim.readd_member, sim.update_user, sim.invite, sim.accept]
        + [sim.delete_user, sim.delete_org, sim.recreate_org, sim.recreate_user, sim.create_user]
        + [sim.create_org, sim.update_role, sim.create_role]
    )
    for _ in range(600):
        sim.rng.choice(moves)()
    return sim.events


def test_cascades_under_concurrent_workers_match_one_worker(
    pg_engine: Engine, pg_factory: sessionmaker[Session]
) -> None:
    events = cascades(7)
    reset(pg_engine)
    apply_in_order(pg_engine, events)
    reference = snapshot(pg_engine)
    for round_seed in range(3):
        reset(pg_engine)
        ids = store(pg_factory, events)
        apply_concurrently(pg_factory, cut(ids, random.Random(round_seed), largest=25), 4)
        assert snapshot(pg_engine) == reference


def visible(engine: Engine, organization_id: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.scalar(select(func.count()).where(Membership.organization_id == organization_id)) or 0
        )


def test_a_batch_applies_what_it_can_lock_while_another_worker_holds_an_organization(
    pg_engine: Engine, pg_factory: sessionmaker[Session]
) -> None:
    sim = ClerkSimulator(random.Random(3))
    for _ in range(3):
        sim.create_user()
    busy, free = sim.create_org(), sim.create_org()
    assert busy is not None and free is not None
    ids = store(pg_factory, sim.events)
    holder = pg_factory()
    try:
        # Another worker in the middle of a batch of the busy organization.
        assert lock_organizations(holder, [busy]).organizations == frozenset({busy})
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (apply_inbox(pg_factory, ids, now_ms=NOW, max_attempts=5), done.set())
        )
        worker.start()
        try:
            # The free organization's rows commit while the busy one is still locked; user rows
            # (which need the whole mirror) and the busy organization's wait.
            while not visible(pg_engine, free):
                assert worker.is_alive()
                done.wait(0.05)
            assert visible(pg_engine, busy) == 0
            assert not done.is_set()
        finally:
            holder.rollback()
            worker.join(timeout=60)
        assert done.is_set()
    finally:
        holder.close()
    assert status_counts(pg_engine) == {InboxStatus.APPLIED: len(ids)}
    assert visible(pg_engine, busy) == 1


def test_every_concurrent_commit_moves_the_generation(
    pg_engine: Engine, pg_factory: sessionmaker[Session]
) -> None:
    """Writers of different organizations hold different generation slots, and each commit moves
    the sum: a reader never keeps a cached answer across a commit it did not see."""
    with session_scope(pg_factory) as session:
        before = mirror_generation(session)
    first, second = pg_factory(), pg_factory()
    try:
        lock_organizations(first, ["org_a"])
        lock_organizations(second, ["org_b"])  # does not wait for the first
        with session_scope(pg_factory) as session:
            assert mirror_generation(session) == before  # nothing committed yet
        second.commit()
        with session_scope(pg_factory) as session:
            assert mirror_generation(session) == before + 1
        first.commit()
        with session_scope(pg_factory) as session:
            assert mirror_generation(session) == before + 2
    finally:
        first.close()
        second.close()
    with session_scope(pg_factory) as session:
        lock_mirror_writes(session)
    with session_scope(pg_factory) as session:
        assert mirror_generation(session) == before + 3


def test_a_mirror_lock_is_never_widened_within_a_transaction(pg_factory: sessionmaker[Session]) -> None:
    with pg_factory() as session:
        lock_organizations(session, ["org_a", "org_b"])
        lock_organizations(session, ["org_b"])  # covered: nothing more to take
        with pytest.raises(RuntimeError, match="widened"):
            lock_organizations(session, ["org_c"])
        with pytest.raises(RuntimeError, match="widened"):
            lock_mirror_writes(session)
        session.rollback()
        # A new transaction starts with nothing held.
        assert lock_mirror_writes(session).everything
        session.rollback()


# -- real worker processes -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_two_worker_processes_apply_a_backlog_with_cascades_as_one_would(
    pg_engine: Engine,
    pg_factory: sessionmaker[Session],
    sqlite_engine: Engine,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """``orgsync worker`` twice, two pool processes each, on a backlog sent as small tasks in a
    shuffled order: every event applied once, the mirror equal to the in-order result."""
    redis.Redis.from_url(redis_url).flushdb()
    events = cascades(11) + generate_history(8, 600).events
    deliveries = {event.svix_id: webhook_body(event.type, event.data, event.timestamp_ms) for event in events}
    # On a local SQLite file: the same mirror code, one writer, a fraction of the round trips.
    expected = in_order_result(sqlite_engine, deliveries)
    ids = store(pg_factory, events)
    random.Random(5).shuffle(ids)
    env = hermetic_env(
        database_url=pg_engine.url.render_as_string(hide_password=False),
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret="whsec_" + "A" * 32,
        ORGSYNC_APPLY_BATCH_SIZE="10",
        # A task lost on the way (a Redis database other tests share) is sent again.
        **FAST_SWEEPS,
    )
    enqueue(env, ids)
    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_worker(concurrency=2)
        stack.start_worker(concurrency=2)
        stack.wait_for(
            "the backlog applied",
            lambda: True if status_counts(pg_engine) == {InboxStatus.APPLIED: len(ids)} else None,
        )
    assert_mirror_is(pg_engine, expected)
