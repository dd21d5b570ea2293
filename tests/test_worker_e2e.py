"""A real Celery worker subprocess (prefork, Redis, PostgreSQL) applies inbox events sent by make_sender."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from helpers import new_msg_id
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker
from stack import TEST_BOUND_S, log_tail, stop_process

from emulator.payloads import (
    BARE_MEMBERSHIP,
    BARE_ORGANIZATION,
    OMIT,
    membership_data,
    organization_data,
    webhook_body,
)
from models.db import make_session_factory, session_scope
from models.inbox import store_delivery
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus, Membership
from worker.app import create_celery, make_sender

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000_000
# Only a guard against a hung test: the assertions never depend on how fast the worker is.
WAIT_LIMIT_S = 120.0


def membership_body(
    org: str, user: str, role: str = "org:member", *, created_at: int = T0, updated_at: int = T0
) -> str:
    event_type = (
        "organizationMembership.created" if updated_at == created_at else "organizationMembership.updated"
    )
    organization = organization_data(org, name=org, slug=org, created_at=T0, object=OMIT, **BARE_ORGANIZATION)
    return webhook_body(
        event_type,
        membership_data(
            f"orgmem_{org}_{user}",
            organization,
            user,
            role=role,
            public_user_data={"user_id": user, "identifier": f"{user}@example.com"},
            created_at=created_at,
            updated_at=updated_at,
            **BARE_MEMBERSHIP,
        ),
        updated_at,
    )


def store(factory: sessionmaker[Session], bodies: list[str], *, received_at: int) -> list[int]:
    with session_scope(factory) as session:
        return [
            store_delivery(session, svix_id=new_msg_id(), body=body, received_at=received_at).inbox_id
            for body in bodies
        ]


def statuses(factory: sessionmaker[Session]) -> dict[str, int]:
    with session_scope(factory) as session:
        result = session.execute(select(InboxEvent.status, func.count()).group_by(InboxEvent.status)).all()
        return {status: int(count) for status, count in result}


def worker_env(database_url: str, broker_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ORGSYNC_", "CLERK_"))}
    env.update(DATABASE_URL=database_url, BROKER_URL=broker_url, ORGSYNC_DATA_DIR=str(data_dir), **extra)
    return env


@contextmanager
def running_worker(
    env: dict[str, str], log_path: Path, *, beat: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A worker.main worker`` as a child process; always stopped, killed if it must be."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.main",
        "worker",
        "--pool",
        "prefork",
        "-c",
        "2",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"test-{uuid.uuid4().hex[:8]}@%h",
    ]
    if beat:
        command.append("--beat")
    with log_path.open("wb") as log:
        # A session of its own, so that the pool children and beat can be killed with it.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            stop_process(process)


def wait_for(
    condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the worker exited ({process.returncode}) before {what}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}:\n{log_tail(log_path)}")
        time.sleep(0.1)


@pytest.fixture
def broker_url(redis_url: str) -> str:
    # Messages left by an earlier test name inbox ids that no longer mean the same rows.
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


def test_worker_applies_events_sent_through_the_broker(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> None:
    factory = make_session_factory(pg_engine)
    now = time.time_ns() // 1_000_000
    members = [membership_body(f"org_{n % 3}", f"user_{n}") for n in range(60)]
    ids = store(factory, members, received_at=now)
    promoted = store(
        factory, [membership_body("org_0", "user_0", "org:admin", updated_at=T0 + 5_000)], received_at=now
    )
    unparseable = store(
        factory,
        [webhook_body("organizationMembership.created", {"id": "orgmem_bad", "role": "org:member"}, T0)],
        received_at=now,
    )

    settings = Settings.from_env(
        {"DATABASE_URL": pg_url, "BROKER_URL": broker_url, "ORGSYNC_DATA_DIR": str(tmp_path)}
    )
    celery = create_celery(settings)
    send = make_sender(celery)
    # The update goes first: the mirror's result must not depend on the order of arrival.
    send(promoted)
    for start in range(0, len(ids), 25):
        send(ids[start : start + 25])
    send(unparseable)
    # A duplicated message (at-least-once delivery) must change nothing.
    send(ids[:10])

    log_path = tmp_path / "worker.log"
    env = worker_env(pg_url, broker_url, tmp_path / "data")
    with running_worker(env, log_path) as process:
        wait_for(lambda: InboxStatus.PENDING not in statuses(factory), "every row handled", process, log_path)

    assert statuses(factory) == {InboxStatus.APPLIED: 61, InboxStatus.REJECTED: 1}
    with session_scope(factory) as session:
        assert session.scalar(select(func.count()).select_from(Membership)) == 60
        admin = session.get(Membership, ("org_0", "user_0"))
        assert admin is not None
        assert admin.role == "org:admin"
        assert set(session.scalars(select(InboxEvent.attempts))) == {0}
        rejected = session.get(InboxEvent, unparseable[0])
        assert rejected is not None
        assert rejected.last_error
