"""A broker outage loses nothing: sends fail fast, rows stay pending, the sweeper enqueues them later."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import free_port, unavailable
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker
from stack import START_BOUND_S, TEST_BOUND_S
from test_worker_e2e import T0, membership_body, running_worker, statuses, store, wait_for, worker_env

from emulator.payloads import BARE_MEMBERSHIP, OMIT, membership_data, webhook_body
from models.db import make_session_factory, session_scope
from models.errors import RetryableError
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus, Membership
from worker.app import QUEUE, check_broker, create_celery, make_sender

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

SWEEPING = {"ORGSYNC_SWEEP_INTERVAL": "0.5", "ORGSYNC_SWEEP_GRACE": "0.1"}


@pytest.fixture
def broker_url(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


def outage_events() -> list[str]:
    bodies = [membership_body(f"org_{n % 4}", f"user_{n}") for n in range(40)]
    bodies.append(membership_body("org_0", "user_0", "org:admin", updated_at=T0 + 1_000))
    bodies.append(
        webhook_body(
            "organizationMembership.deleted",
            membership_data(
                "orgmem_org_1_user_1",
                {"id": "org_1"},
                "user_1",
                public_user_data={"user_id": "user_1"},
                created_at=T0,
                object=OMIT,
                **BARE_MEMBERSHIP,
            ),
            T0 + 2_000,
        )
    )
    return bodies


def assert_all_applied_once(factory: sessionmaker[Session], count: int) -> None:
    assert statuses(factory) == {InboxStatus.APPLIED: count}
    with session_scope(factory) as session:
        # Never tried before the worker came, and applied at the first try.
        assert set(session.scalars(select(InboxEvent.attempts))) == {0}
        assert session.scalar(select(func.count()).select_from(Membership)) == 40
        live = select(func.count()).select_from(Membership).where(Membership.deleted.is_(False))
        assert session.scalar(live) == 39
        promoted = session.get(Membership, ("org_0", "user_0"))
        assert promoted is not None
        assert promoted.role == "org:admin"
        removed = session.get(Membership, ("org_1", "user_1"))
        assert removed is not None
        assert removed.deleted


def test_events_stored_while_the_broker_is_down_are_swept_and_applied_once(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> None:
    factory = make_session_factory(pg_engine)
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    web_side = create_celery(
        Settings.from_env(
            {"DATABASE_URL": pg_url, "BROKER_URL": dead_broker, "ORGSYNC_DATA_DIR": str(tmp_path)}
        )
    )
    send = make_sender(web_side)

    bodies = outage_events()
    ids = store(factory, bodies, received_at=time.time_ns() // 1_000_000)
    for inbox_id in ids:
        with pytest.raises(BrokerError):
            send([inbox_id])
    with pytest.raises(RetryableError) as excinfo:
        check_broker(web_side)
    assert "127.0.0.1" not in str(excinfo.value)
    assert statuses(factory) == {InboxStatus.PENDING: len(bodies)}

    log_path = tmp_path / "worker.log"
    env = worker_env(pg_url, broker_url, tmp_path / "data", **SWEEPING)
    with running_worker(env, log_path, beat=True) as process:
        wait_for(
            lambda: InboxStatus.PENDING not in statuses(factory), "the sweeper to drain", process, log_path
        )

    assert_all_applied_once(factory, len(bodies))
    assert "sweeper enqueued" in log_path.read_text(errors="replace")


def test_messages_lost_with_a_crashed_worker_are_swept(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> None:
    factory = make_session_factory(pg_engine)
    settings = Settings.from_env(
        {"DATABASE_URL": pg_url, "BROKER_URL": broker_url, "ORGSYNC_DATA_DIR": str(tmp_path)}
    )
    bodies = outage_events()
    ids = store(factory, bodies, received_at=time.time_ns() // 1_000_000)
    make_sender(create_celery(settings))(ids)
    client = redis.Redis.from_url(broker_url)
    assert client.llen(QUEUE) == 1
    # What a worker killed while holding the message (or a broker losing it) leaves behind.
    client.delete(QUEUE)

    log_path = tmp_path / "worker.log"
    env = worker_env(pg_url, broker_url, tmp_path / "data", **SWEEPING)
    with running_worker(env, log_path, beat=True) as process:
        wait_for(
            lambda: InboxStatus.PENDING not in statuses(factory), "the sweeper to drain", process, log_path
        )

    assert_all_applied_once(factory, len(bodies))


@pytest.fixture
def private_redis_port() -> Iterator[int]:
    """A port for a Redis server of this test's own, which it starts and stops at will."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    port = free_port()
    yield port
    # Nothing to clean here: the test stops every server it starts.


def start_redis(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + START_BOUND_S
    while time.monotonic() < deadline:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    pytest.fail("the private redis-server did not start")


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_sender_and_readiness_recover_when_the_broker_comes_back(
    private_redis_port: int, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{private_redis_port}/0"
    celery = create_celery(Settings.from_env({"BROKER_URL": url, "ORGSYNC_DATA_DIR": str(tmp_path)}))
    send = make_sender(celery)

    with pytest.raises(BrokerError):
        send([1])
    with pytest.raises(RetryableError):
        check_broker(celery)

    for round_trip in range(2):
        server = start_redis(private_redis_port)
        try:
            # The same app, its pooled connection broken by the outage, works again.
            check_broker(celery)
            send([10 + round_trip])
            send([20 + round_trip])
            assert redis.Redis(host="127.0.0.1", port=private_redis_port).llen(QUEUE) == 2
        finally:
            stop_redis(server)
        with pytest.raises(BrokerError):
            send([30 + round_trip])
        with pytest.raises(RetryableError):
            check_broker(celery)


def test_running_worker_outlives_a_broker_restart(
    pg_engine: Engine, pg_url: str, private_redis_port: int, tmp_path: Path
) -> None:
    factory = make_session_factory(pg_engine)
    url = f"redis://127.0.0.1:{private_redis_port}/0"
    send = make_sender(
        create_celery(
            Settings.from_env({"DATABASE_URL": pg_url, "BROKER_URL": url, "ORGSYNC_DATA_DIR": str(tmp_path)})
        )
    )
    bodies = outage_events()
    before, during = bodies[:20], bodies[20:]
    log_path = tmp_path / "worker.log"
    env = worker_env(pg_url, url, tmp_path / "data", **SWEEPING)

    server = start_redis(private_redis_port)
    try:
        with running_worker(env, log_path, beat=True) as process:
            first = store(factory, before, received_at=time.time_ns() // 1_000_000)
            send(first)
            wait_for(
                lambda: InboxStatus.PENDING not in statuses(factory), "the first events", process, log_path
            )

            stop_redis(server)
            second = store(factory, during, received_at=time.time_ns() // 1_000_000)
            with pytest.raises(BrokerError):
                send(second)
            server = start_redis(private_redis_port)

            wait_for(
                lambda: InboxStatus.PENDING not in statuses(factory), "the swept events", process, log_path
            )
    finally:
        stop_redis(server)

    assert_all_applied_once(factory, len(bodies))
