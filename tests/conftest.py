"""Shared fixtures: a SQLite file per test, one PostgreSQL database per run, Redis, signing.

Integration fixtures skip with the reason when a server cannot be reached, and fail the run
instead under ``CI=true``: CI has these servers, so a skip there would hide a broken setup.
Property tests run the ``ci`` Hypothesis profile there (five times the examples), ``dev`` elsewhere;
``HYPOTHESIS_PROFILE`` picks one explicitly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
import redis
from hypothesis import settings
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from models.db import create_db_engine, make_session_factory
from models.migrate import upgrade
from models.tables import Base

PG_ADMIN_DSN = os.environ.get(
    "ORGSYNC_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_HOST_URL = os.environ.get("ORGSYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_HOST_URL = os.environ.get("ORGSYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379")

# Local runs keep Hypothesis' default count; CI, with time to spare, searches five times deeper.
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("ci", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")
)


def examples(base: int) -> int:
    """``base`` examples under the dev profile, scaled like the loaded profile's ``max_examples``.

    A test that sets ``max_examples`` itself overrides the profile, so it states its count through this.
    """
    return max(1, base * settings().max_examples // 100)


# A fixed example secret for tests, in the format Clerk hands out.
TEST_SIGNING_SECRET = "whsec_dGVzdC1zaWduaW5nLXNlY3JldC1mb3Itb3Jnc3luYw=="


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: integration services must be reachable)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def truncate_all(engine: Engine) -> None:
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY"))
        else:
            for name in tables:
                connection.execute(text(f"DELETE FROM {name}"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'orgsync.db'}"
    upgrade(url)
    return url


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = create_db_engine(sqlite_url)
    yield engine
    engine.dispose()


@contextlib.contextmanager
def new_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL unreachable ({PG_ADMIN_DSN}): {exc}".strip())
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_HOST_URL}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated to head, dropped afterwards."""
    with new_pg_database("orgsync_test") as url:
        upgrade(url)
        yield url


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_db_engine(pg_url)
    truncate_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The same test on SQLite and on PostgreSQL."""
    fixture = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database of its own for this run (flushed first), chosen among 1..15."""
    base = REDIS_HOST_URL.rstrip("/")
    try:
        client = redis.Redis.from_url(f"{base}/0", socket_connect_timeout=3)
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis unreachable ({base}): {exc}")
    # Parallel runs (pytest-xdist) take distinct databases: gw0 -> 1, gw1 -> 2, ...
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    db = 1 + (int(worker[2:]) if worker.startswith("gw") else uuid.uuid4().int) % 15
    url = f"{base}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def signing_secret() -> str:
    return TEST_SIGNING_SECRET
