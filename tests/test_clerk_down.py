"""Applying events never waits behind work that talks to Clerk, and that work's retries free its worker.

Real ``orgsync serve`` and ``orgsync worker`` (both pools) on PostgreSQL and Redis, with
``CLERK_SECRET_KEY`` set and the Backend API replaced by a loopback server that is down: it
answers every request 503, or takes it and never answers. Membership events for new
organizations each queue a reconciliation of their organization, as in production.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from conftest import truncate_all
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from stack import FAST_SWEEPS, TEST_BOUND_S, Stack, hermetic_env, running_stack
from test_worker_e2e import membership_body

from models.db import make_session_factory, session_scope
from models.tables import InboxEvent, InboxStatus

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

SECRET_KEY = "sk_test_clerk_down"
BOUND_S = 120.0
ORGANIZATIONS = 6


class DownBackend:
    """A Backend API that is down: every request is recorded, then answered 503 or never answered."""

    def __init__(self, *, hang: bool) -> None:
        self.paths: list[str] = []
        self.release = threading.Event()
        lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    backend.paths.append(self.path)
                if hang:
                    # Hold the request (and the worker slot that made it) until the test ends.
                    backend.release.wait()
                    return
                body = b'{"errors":[{"code":"service_unavailable","message":"down"}]}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> DownBackend:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def organizations_asked(self) -> list[str]:
        """The organization of each request in order (``/v1/organizations/{id}...``)."""
        asked = []
        for path in list(self.paths):
            parts = path.split("?", 1)[0].split("/")
            if len(parts) > 3 and parts[2] == "organizations":
                asked.append(parts[3])
        return asked


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    yield pg_engine
    truncate_all(pg_engine)


@contextmanager
def orgsync_with(
    backend: DownBackend,
    engine: Engine,
    redis_url: str,
    signing_secret: str,
    tmp_path: Path,
    *,
    timeout: str,
    both_pools: bool = True,
) -> Iterator[Stack]:
    redis.Redis.from_url(redis_url).flushdb()
    env = hermetic_env(
        database_url=engine.url.render_as_string(hide_password=False),
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        CLERK_SECRET_KEY=SECRET_KEY,
        CLERK_API_URL=backend.url,
        CLERK_API_TIMEOUT=timeout,
        ORGSYNC_LOG_LEVEL="INFO",
        **FAST_SWEEPS,
    )
    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_web()
        if both_pools:
            # One process per pool: a single Clerk call that never ends holds the whole clerk pool.
            stack.start_worker(concurrency=1)
        else:
            start_pool(stack, "apply")
        yield stack


def start_pool(stack: Stack, role: str) -> None:
    hostname = f"t-{uuid.uuid4().hex[:8]}@%h"
    stack.spawn(f"{role}-worker", "worker", "--queue", role, "--concurrency", "1", "--hostname", hostname)


def post_new_organizations(stack: Stack, signing_secret: str, count: int) -> list[str]:
    orgs = [f"org_down{index}" for index in range(count)]
    for org in orgs:
        assert stack.post(membership_body(org, f"user_{org}"), signing_secret) == 200
    return orgs


def applied_count(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        return len(
            session.scalars(select(InboxEvent.id).where(InboxEvent.status == InboxStatus.APPLIED)).all()
        )


def test_events_are_applied_while_every_clerk_call_hangs(
    database: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> None:
    factory = make_session_factory(database)
    with (
        DownBackend(hang=True) as backend,
        orgsync_with(backend, database, redis_url, signing_secret, tmp_path, timeout="3600") as stack,
    ):
        orgs = post_new_organizations(stack, signing_secret, ORGANIZATIONS)
        stack.wait_for(
            "every event applied",
            lambda: True if applied_count(factory) == len(orgs) else None,
            BOUND_S,
        )
        stack.wait_for("a reconciliation to call Clerk", lambda: True if backend.paths else None, BOUND_S)
        # That call is still open, and the clerk pool's only process is in it: every event was
        # applied without waiting for any Clerk work to finish.
        assert not backend.release.is_set()
        assert len(backend.paths) == 1
        assert backend.organizations_asked()[0] in orgs
        # More events for more new organizations: applied too, behind a clerk pool still stuck.
        more = [f"org_later{index}" for index in range(ORGANIZATIONS)]
        for org in more:
            assert stack.post(membership_body(org, f"user_{org}"), signing_secret) == 200
        stack.wait_for(
            "the later events applied",
            lambda: True if applied_count(factory) == len(orgs) + len(more) else None,
            BOUND_S,
        )
        assert len(backend.paths) == 1
        # Let the held call fail now, so that the workers stop without waiting for it.
        backend.release.set()


def test_a_reconciliation_retry_gives_the_worker_back(
    database: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> None:
    with (
        DownBackend(hang=False) as backend,
        orgsync_with(
            backend, database, redis_url, signing_secret, tmp_path, timeout="10", both_pools=False
        ) as stack,
    ):
        factory = make_session_factory(database)
        orgs = post_new_organizations(stack, signing_secret, ORGANIZATIONS)
        # Every reconciliation is queued before the clerk pool starts, in the order it will take them.
        stack.wait_for(
            "every event applied", lambda: True if applied_count(factory) == len(orgs) else None, BOUND_S
        )
        start_pool(stack, "clerk")

        def every_organization_tried_twice() -> list[str] | None:
            asked = backend.organizations_asked()
            return asked if all(asked.count(org) >= 2 for org in orgs) else None

        asked = stack.wait_for(
            "each organization's reconciliation retried", every_organization_tried_twice, BOUND_S
        )
        # One clerk process: had a run retried inside its task (sleeping between tries), one
        # organization would come several times in a row. Each run gave up at its first 503
        # and was queued again with a countdown, so every organization was tried once before
        # any was tried again.
        first_round = asked[: len(orgs)]
        assert sorted(first_round) == sorted(orgs), asked
