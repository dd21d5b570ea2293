"""Real processes killed with SIGKILL: nothing acknowledged is lost, nothing is applied twice.

The worker (PostgreSQL and Redis) and the whole embedded ``orgsync run`` (SQLite) are killed
halfway through a backlog of a couple of thousand events, the web server while deliveries
pour in; each is started again. "Applied exactly once" is checked with a trigger the test
installs on the inbox: it records every committed transition of a row to ``applied``, and the
worker marks rows applied in the same transaction that writes their events to the mirror, so
each event's count of records is the number of times it was applied. The mirror must also
equal the in-order result of the same events.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import free_port, truncate_all
from helpers import new_msg_id
from histories import generate_history
from mirror_compare import describe, differences, mirror_snapshot
from sqlalchemy import Engine, func, select, text
from stack import FAST_SWEEPS, hermetic_env, running_stack
from test_run_embedded import processes_with
from test_worker_e2e import membership_body

from emulator.payloads import webhook_body
from models.db import create_db_engine, make_session_factory, session_scope
from models.events import parse_event
from models.inbox import store_delivery
from models.migrate import upgrade
from models.mirror import apply_events
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus, Membership
from worker.app import create_celery, make_sender

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HISTORY_SEED = 8
HISTORY_STEPS = 1_800  # a little over 2,000 events
# Small batches, so that the backlog takes many transactions and a kill lands between and in them.
BATCH = "20"
# While the processes run for the first time the sweeper leaves the backlog alone: every row is
# sent once, by the test, as the web process would. After the restart it sweeps at once.
NO_SWEEPS = {"ORGSYNC_SWEEP_GRACE": "3600"}
NOW_MS = 1_800_000_000_000

PG_AUDIT = (
    "CREATE TABLE test_apply_audit (svix_id text NOT NULL)",
    """CREATE FUNCTION test_apply_audit() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN INSERT INTO test_apply_audit (svix_id) VALUES (NEW.svix_id); RETURN NULL; END $$""",
    """CREATE TRIGGER test_apply_audit AFTER UPDATE OF status ON inbox_events
       FOR EACH ROW WHEN (NEW.status = 'applied') EXECUTE FUNCTION test_apply_audit()""",
)
PG_AUDIT_DROP = (
    "DROP TRIGGER IF EXISTS test_apply_audit ON inbox_events",
    "DROP FUNCTION IF EXISTS test_apply_audit()",
    "DROP TABLE IF EXISTS test_apply_audit",
)
SQLITE_AUDIT = (
    "CREATE TABLE test_apply_audit (svix_id TEXT NOT NULL)",
    """CREATE TRIGGER test_apply_audit AFTER UPDATE OF status ON inbox_events
       FOR EACH ROW WHEN NEW.status = 'applied'
       BEGIN INSERT INTO test_apply_audit (svix_id) VALUES (NEW.svix_id); END""",
)
# Another client's open transaction on the test's database: the worker in the middle of a batch.
WORKER_TRANSACTION = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
)


# -- the events and their in-order result ----------------------------------------------------


def history() -> dict[str, str]:
    """svix id -> body, in the order Clerk emitted them."""
    events = generate_history(HISTORY_SEED, HISTORY_STEPS).events
    return {new_msg_id(): webhook_body(e.type, e.data, e.timestamp_ms) for e in events}


def in_order_result(engine: Engine, deliveries: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """The mirror after applying the events one at a time in emission order, on an empty mirror."""
    with session_scope(make_session_factory(engine)) as session:
        for svix_id, body in deliveries.items():
            apply_events(session, [parse_event(svix_id, body)], now_ms=NOW_MS)
            session.flush()
    with session_scope(make_session_factory(engine)) as session:
        return mirror_snapshot(session)


def store_all(engine: Engine, deliveries: dict[str, str]) -> list[int]:
    with session_scope(make_session_factory(engine)) as session:
        received = time.time_ns() // 1_000_000
        return [
            store_delivery(session, svix_id=svix_id, body=body, received_at=received).inbox_id
            for svix_id, body in deliveries.items()
        ]


def enqueue(env: dict[str, str], ids: list[int]) -> None:
    """What the web process does after storing: one apply task per batch of ids."""
    settings = Settings.from_env(env)
    send = make_sender(create_celery(settings))
    size = settings.apply_batch_size
    for start in range(0, len(ids), size):
        send(ids[start : start + size])


# -- evidence --------------------------------------------------------------------------------


def status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(select(InboxEvent.status, func.count()).group_by(InboxEvent.status))
        return {status: int(count) for status, count in rows}


def audit(engine: Engine) -> Counter[str]:
    with engine.connect() as connection:
        return Counter(connection.scalars(text("SELECT svix_id FROM test_apply_audit")))


def assert_applied_exactly_once(engine: Engine, deliveries: dict[str, str]) -> None:
    assert status_counts(engine) == {InboxStatus.APPLIED: len(deliveries)}
    with engine.connect() as connection:
        rows = connection.execute(select(InboxEvent.svix_id, InboxEvent.body))
        stored = {svix_id: body for svix_id, body in rows}
    assert stored == deliveries
    applications = audit(engine)
    assert set(applications) == set(deliveries)
    twice = {svix_id: n for svix_id, n in applications.items() if n != 1}
    assert not twice, f"applied more than once: {twice}"


def assert_mirror_is(engine: Engine, expected: dict[str, list[dict[str, Any]]]) -> None:
    with session_scope(make_session_factory(engine)) as session:
        diff = differences(mirror_snapshot(session), expected)
    assert not diff, describe(diff)


# -- PostgreSQL and Redis --------------------------------------------------------------------


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    """The run's PostgreSQL database, emptied, with the applied-transitions audit installed."""
    with pg_engine.begin() as connection:
        for statement in (*PG_AUDIT_DROP, *PG_AUDIT):
            connection.execute(text(statement))
    yield pg_engine
    with pg_engine.begin() as connection:
        for statement in PG_AUDIT_DROP:
            connection.execute(text(statement))
    truncate_all(pg_engine)


@pytest.fixture
def broker_url(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


def pg_env(engine: Engine, broker_url: str, data_dir: Path, secret: str, **extra: str) -> dict[str, str]:
    return hermetic_env(
        database_url=engine.url.render_as_string(hide_password=False),
        broker_url=broker_url,
        data_dir=data_dir,
        signing_secret=secret,
        ORGSYNC_APPLY_BATCH_SIZE=BATCH,
        **extra,
    )


@pytest.mark.postgres
@pytest.mark.redis
def test_a_worker_killed_while_applying_loses_nothing_and_applies_nothing_twice(
    database: Engine, broker_url: str, signing_secret: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    deliveries = history()
    # On a local SQLite file: the same mirror code, a fraction of the round trips.
    expected = in_order_result(sqlite_engine, deliveries)
    ids = store_all(database, deliveries)
    env = pg_env(database, broker_url, tmp_path / "data", signing_secret, **NO_SWEEPS)
    enqueue(env, ids)

    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_worker()

        def mid_batch() -> int | None:
            with database.connect() as connection:
                applied = connection.scalar(
                    select(func.count()).where(InboxEvent.status == InboxStatus.APPLIED)
                )
                in_transaction = connection.scalar(WORKER_TRANSACTION)
            if applied == len(ids):
                pytest.fail("the worker applied the whole backlog before it could be killed")
            return applied if applied and in_transaction else None

        applied_before = stack.wait_for("the worker in the middle of the backlog", mid_batch, every=0.02)
        stack.kill("worker")
        left = status_counts(database)
        assert left.get(InboxStatus.PENDING, 0) > 0, left
        assert applied_before <= left.get(InboxStatus.APPLIED, 0) < len(ids)

        # Started again, with the sweeper: messages the dead worker held are gone with it.
        stack.start_worker(beat=True, env={**env, **FAST_SWEEPS})
        done = {InboxStatus.APPLIED: len(ids)}
        stack.wait_for("the backlog applied", lambda: status_counts(database) == done or None)

    assert_applied_exactly_once(database, deliveries)
    assert_mirror_is(database, expected)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_web_server_killed_under_load_keeps_every_acknowledged_delivery(
    database: Engine, broker_url: str, signing_secret: str, tmp_path: Path
) -> None:
    env = pg_env(database, broker_url, tmp_path / "data", signing_secret, **FAST_SWEEPS)
    outcomes: dict[str, tuple[str, int | None]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def acknowledged() -> dict[str, str]:
        with lock:
            return {m: body for m, (body, status) in outcomes.items() if status is not None and status < 300}

    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_web()
        stack.start_worker(beat=True)

        def sender(client: int) -> None:
            for n in range(1_000_000):
                if stop.is_set():
                    return
                msg_id, body = new_msg_id(), membership_body(f"org_{client}", f"user_{client}_{n}")
                try:
                    status: int | None = stack.post(body, signing_secret, msg_id=msg_id)
                except (OSError, http.client.HTTPException):
                    status = None
                with lock:
                    outcomes[msg_id] = (body, status)

        senders = [threading.Thread(target=sender, args=(client,)) for client in range(4)]
        for thread in senders:
            thread.start()
        try:
            stack.wait_for("some deliveries acknowledged", lambda: len(acknowledged()) >= 300 or None)
            stack.kill("web")

            # The senders meet the dead server before they stop.
            def refused() -> bool | None:
                with lock:
                    return sum(1 for _, status in outcomes.values() if status is None) >= 4 or None

            stack.wait_for("refused deliveries", refused)
        finally:
            stop.set()
            for thread in senders:
                thread.join()
        assert {status for _, status in outcomes.values()} <= {200, None}
        kept = acknowledged()

        stack.start_web()

        def all_applied(expected: dict[str, str]) -> bool | None:
            query = select(InboxEvent.svix_id, InboxEvent.status).where(
                InboxEvent.svix_id.in_(list(expected))
            )
            with database.connect() as connection:
                rows = {svix_id: status for svix_id, status in connection.execute(query)}
            return True if rows == dict.fromkeys(expected, InboxStatus.APPLIED) else None

        stack.wait_for("every acknowledged delivery applied", lambda: all_applied(kept))
        assert_memberships_include(database, kept)

        # Svix delivers the others again: then everything is there, once.
        everything = {msg_id: body for msg_id, (body, _) in outcomes.items()}
        for msg_id, body in everything.items():
            if msg_id not in kept:
                assert stack.post(body, signing_secret, msg_id=msg_id) == 200
        stack.wait_for("every delivery applied", lambda: all_applied(everything))

    assert_applied_exactly_once(database, everything)
    assert_memberships_include(database, everything, exactly=True)


def assert_memberships_include(engine: Engine, deliveries: dict[str, str], *, exactly: bool = False) -> None:
    expected = {
        (data["organization"]["id"], data["public_user_data"]["user_id"], data["id"])
        for data in (json.loads(body)["data"] for body in deliveries.values())
    }
    with engine.connect() as connection:
        rows = connection.execute(select(Membership.organization_id, Membership.user_id, Membership.id))
        mirrored = {(org, user, member) for org, user, member in rows}
    if exactly:
        assert mirrored == expected
    else:
        missing = expected - mirrored
        assert not missing, f"{len(missing)} acknowledged deliveries not mirrored, e.g. {sorted(missing)[:3]}"


# -- the embedded default --------------------------------------------------------------------


def sqlite_writing(path: Path) -> bool:
    """True while another connection holds SQLite's write lock: the worker inside a batch."""
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return True
        raise
    else:
        connection.execute("ROLLBACK")
        return False
    finally:
        connection.close()


def sqlite_counts(path: Path) -> dict[str, int]:
    """Read-only, so that polling never takes the one writer's lock from the worker."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as connection:
        rows = connection.execute("SELECT status, count(*) FROM inbox_events GROUP BY status").fetchall()
    return {status: count for status, count in rows}


# kombu's SQLAlchemy transport (enqueue() on the embedded broker) declares a lazy="noload"
# relationship, deprecated in SQLAlchemy 2.1.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
def test_orgsync_run_killed_as_a_whole_loses_nothing_and_applies_nothing_twice(
    signing_secret: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    deliveries = history()
    expected = in_order_result(sqlite_engine, deliveries)

    data_dir = tmp_path / "data"
    database_path = data_dir / "orgsync.db"
    url = f"sqlite:///{database_path}"
    upgrade(url)
    everything_run_started = f"ORGSYNC_TEST_MARKER={uuid.uuid4().hex}"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "BROKER_", "CLERK_", "ORGSYNC_"))
    }
    env.update(
        ORGSYNC_DATA_DIR=str(data_dir),
        CLERK_WEBHOOK_SIGNING_SECRET=signing_secret,
        # The SQLite broker is polled once a second, so each task carries many events here;
        # still several transactions, so that the kill lands inside one after others committed.
        ORGSYNC_APPLY_BATCH_SIZE="200",
        ORGSYNC_TEST_MARKER=everything_run_started.partition("=")[2],
        PYTHONUNBUFFERED="1",
    )
    engine = create_db_engine(url)
    try:
        with engine.begin() as connection:
            for statement in SQLITE_AUDIT:
                connection.execute(text(statement))
        ids = store_all(engine, deliveries)
        enqueue(env, ids)

        with running_stack({**env, **NO_SWEEPS}, tmp_path / "logs") as stack:
            port = str(free_port())
            stack.spawn("run", "run", "--port", port)

            def mid_backlog() -> int | None:
                applied = sqlite_counts(database_path).get(InboxStatus.APPLIED, 0)
                if applied == len(ids):
                    pytest.fail("orgsync run applied the whole backlog before it could be killed")
                return applied if applied and sqlite_writing(database_path) else None

            stack.wait_for("orgsync run in the middle of the backlog", mid_backlog, every=0.02)
            # Every process at once: run, its web server, worker (and pool) and beat.
            for pid in processes_with(everything_run_started):
                os.kill(pid, signal.SIGKILL)
            stack.kill("run")
            left = sqlite_counts(database_path)
            assert 0 < left.get(InboxStatus.PENDING, 0) < len(ids), left

            restart = {**env, **FAST_SWEEPS, "ORGSYNC_APPLY_BATCH_SIZE": "500"}
            stack.spawn("run", "run", "--port", port, env=restart)
            stack.wait_for(
                "the backlog applied", lambda: sqlite_counts(database_path) == {"applied": len(ids)} or None
            )
            stack.stop()
            assert not processes_with(everything_run_started)

        assert_applied_exactly_once(engine, deliveries)
        assert_mirror_is(engine, expected)
    finally:
        engine.dispose()
        for pid in processes_with(everything_run_started):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
