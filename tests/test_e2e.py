"""End to end over real processes: granian-served intake, a Celery worker, Redis and PostgreSQL.

Signed events posted over HTTP end up in the mirror; and with the broker unreachable while
they arrive, every acknowledged event waits in the inbox and is applied exactly once after
the worker and the sweeper come up.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from conftest import free_port, truncate_all
from helpers import new_msg_id
from sqlalchemy import Engine, Table, func, select
from sqlalchemy.orm import Session
from stack import FAST_SWEEPS, TEST_BOUND_S, Stack, hermetic_env, request, running_stack

from emulator.payloads import OMIT, invitation_data, membership_data, organization_data, webhook_body
from models import reads, tables
from models.db import make_session_factory, session_scope
from models.events import parse_event
from models.mirror import apply_events
from models.tables import InboxEvent, InboxStatus

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

ORG = "org_e2eAcme"
SLUG = "e2e-acme"
OTHER_ORG = "org_e2eGlobex"
T = int(time.time() * 1000) - 3_600_000
DAY_MS = 86_400_000


# -- Clerk-shaped payloads -------------------------------------------------------------------


# Only the fields these tests read: what a payload leaves out (OMIT) the mirror stores as null.
def organization(*, updated: int = T, name: str = "Acme", org: str = ORG) -> dict[str, Any]:
    return organization_data(
        org,
        name=name,
        slug=SLUG if org == ORG else org.lower(),
        image_url=OMIT,
        has_image=False,
        members_count=OMIT,
        missing_member_with_elevated_permissions=OMIT,
        pending_invitations_count=OMIT,
        max_allowed_memberships=0,
        created_by=OMIT,
        created_at=T,
        updated_at=updated,
    )


def membership(
    member_id: str, user: str, role: str, created: int, updated: int | None = None, *, org: str = ORG
) -> dict[str, Any]:
    return membership_data(
        member_id,
        organization(org=org),
        user,
        role=role,
        role_name=OMIT,
        permissions=[],
        public_user_data={"user_id": user, "identifier": f"{user}@acme.test", "first_name": user},
        created_at=created,
        updated_at=updated,
    )


def invitation(
    inv_id: str, email: str, status: str, created: int, updated: int, *, user: str | None = None
) -> dict[str, Any]:
    return invitation_data(
        inv_id,
        ORG,
        email=email,
        status=status,
        url=OMIT,
        expires_at=T + 30 * DAY_MS,
        created_at=created,
        updated_at=updated,
        user_id=user,
    )


def lifecycle() -> list[tuple[str, dict[str, Any]]]:
    """An organization's first hour: members join, a role changes, one leaves, an invitee accepts."""
    return [
        ("organization.created", organization()),
        ("organizationMembership.created", membership("orgmem_alice", "user_alice", "org:admin", T + 10)),
        ("organizationMembership.created", membership("orgmem_bob", "user_bob", "org:member", T + 20)),
        ("organizationMembership.created", membership("orgmem_carol", "user_carol", "org:member", T + 30)),
        (
            "organizationMembership.updated",
            membership("orgmem_bob", "user_bob", "org:admin", T + 20, T + 40),
        ),
        ("organizationMembership.deleted", membership("orgmem_carol", "user_carol", "org:member", T + 30)),
        (
            "organizationInvitation.created",
            invitation("orginv_dan", "dan@acme.test", "pending", T + 50, T + 50),
        ),
        (
            "organizationInvitation.accepted",
            invitation("orginv_dan", "dan@acme.test", "accepted", T + 50, T + 60, user="user_dan"),
        ),
        ("organizationMembership.created", membership("orgmem_dan", "user_dan", "org:member", T + 60)),
        (
            "organizationInvitation.created",
            invitation("orginv_erin", "erin@acme.test", "pending", T + 70, T + 70),
        ),
        ("organization.updated", organization(updated=T + 80, name="Acme Corporation")),
    ]


def bodies(history: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [webhook_body(kind, data, T + 100 * n) for n, (kind, data) in enumerate(history)]


# -- fixtures and probes ---------------------------------------------------------------------


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    """The session's PostgreSQL database, emptied, for the processes and for the test's reads."""
    yield pg_engine
    truncate_all(pg_engine)


@pytest.fixture
def broker_url(redis_url: str) -> str:
    # Messages left by an earlier test would name inbox ids that no longer mean the same rows.
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def inbox(engine: Engine) -> list[InboxEvent]:
    with session_scope(make_session_factory(engine)) as session:
        rows = list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))
        session.expunge_all()
        return rows


def drained(engine: Engine, expected_rows: int) -> list[InboxEvent] | None:
    """The inbox once it holds ``expected_rows`` rows and none of them is pending, else None."""
    rows = inbox(engine)
    if len(rows) == expected_rows and all(row.status != InboxStatus.PENDING for row in rows):
        return rows
    return None


def mirror_rows(session: Session) -> dict[str, list[dict[str, Any]]]:
    """Every mirrored row (tombstones included), every column but ``synced_at``, in key order."""
    dump: dict[str, list[dict[str, Any]]] = {}
    for model in (
        tables.Organization,
        tables.Membership,
        tables.Invitation,
        tables.Role,
        tables.Permission,
        tables.User,
    ):
        table = cast(Table, model.__table__)
        columns = [c for c in table.columns if c.name != "synced_at"]
        keys = list(table.primary_key.columns)
        dump[table.name] = [dict(row._mapping) for row in session.execute(select(*columns).order_by(*keys))]
    return dump


def assert_lifecycle_mirrored(engine: Engine, stack: Stack) -> None:
    with session_scope(make_session_factory(engine)) as session:
        org = reads.get_organization(session, SLUG)
        assert org is not None
        assert (org.id, org.name, org.members_count) == (ORG, "Acme Corporation", 3)
        members = reads.list_memberships(session, organization=SLUG, limit=100)
        assert members is not None
        assert {(m.user_id, m.id, m.role) for m in members.data} == {
            ("user_alice", "orgmem_alice", "org:admin"),
            ("user_bob", "orgmem_bob", "org:admin"),
            ("user_dan", "orgmem_dan", "org:member"),
        }
        invitations = reads.list_invitations(session, organization=ORG, limit=100)
        assert invitations is not None
        assert {(i.id, i.status, i.user_id) for i in invitations.data} == {
            ("orginv_dan", "accepted", "user_dan"),
            ("orginv_erin", "pending", None),
        }
        carol = reads.list_memberships(session, user="user_carol")
        assert carol is None or carol.data == []

    # The same through the command line, in Clerk's JSON shape.
    result = stack.orgsync("members", "list", "--org", SLUG, "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [(m["public_user_data"]["user_id"], m["role"]) for m in listed] == [
        ("user_alice", "org:admin"),
        ("user_bob", "org:admin"),
        ("user_dan", "org:member"),
    ]
    assert {m["organization_id"] for m in listed} == {ORG}
    assert listed[0]["public_user_data"]["identifier"] == "user_alice@acme.test"
    result = stack.orgsync("invitations", "list", "--org", SLUG, "--status", "pending", "--json")
    assert result.returncode == 0, result.stderr
    assert [i["id"] for i in json.loads(result.stdout)] == ["orginv_erin"]


# -- the tests -------------------------------------------------------------------------------


def test_signed_events_posted_over_http_end_up_in_the_mirror(
    database: Engine, broker_url: str, signing_secret: str, tmp_path: Path
) -> None:
    env = hermetic_env(
        database_url=url_of(database),
        broker_url=broker_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        **FAST_SWEEPS,
    )
    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_web()
        stack.start_worker()
        posted = bodies(lifecycle())
        redelivered = new_msg_id()
        statuses = [
            stack.post(body, signing_secret, msg_id=redelivered if n == 2 else None)
            for n, body in enumerate(posted)
        ]
        # Svix redelivers with the same svix-id: acknowledged again, stored once.
        statuses.append(stack.post(posted[2], signing_secret, msg_id=redelivered))
        assert all(200 <= status < 300 for status in statuses), statuses
        # A request that is not signed with the secret is refused and leaves nothing behind.
        assert (
            request(stack.port, "POST", "/webhooks/clerk", posted[0], {"content-type": "application/json"})[0]
            == 400
        )

        rows = stack.wait_for("the inbox to drain", lambda: drained(database, len(posted)))
        assert {row.status for row in rows} == {InboxStatus.APPLIED}
        assert {row.attempts for row in rows} == {0}
        assert_lifecycle_mirrored(database, stack)
        ready = request(stack.port, "GET", "/readyz")
        assert ready[0] == 200, ready
        logs = stack.output(lines=10_000)
        assert signing_secret.removeprefix("whsec_") not in logs


def test_events_acknowledged_while_the_broker_is_down_are_applied_once_it_is_up(
    database: Engine, broker_url: str, signing_secret: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"

    def env(broker: str) -> dict[str, str]:
        return hermetic_env(
            database_url=url_of(database),
            broker_url=broker,
            data_dir=tmp_path / "data",
            signing_secret=signing_secret,
            # DEBUG makes the worker log how many rows each task applied (see below).
            ORGSYNC_LOG_LEVEL="DEBUG",
            **FAST_SWEEPS,
        )

    web_env, worker_env = env(dead_broker), env(broker_url)

    history = lifecycle() + [
        (
            "organizationMembership.created",
            membership(f"orgmem_{n}", f"user_{n}", "org:member", T + 200 + n, org=OTHER_ORG),
        )
        for n in range(30)
    ]
    posted = bodies(history)
    ids = [new_msg_id() for _ in posted]
    with running_stack(web_env, tmp_path / "logs") as stack:
        stack.start_web()
        not_ready = request(stack.port, "GET", "/readyz")
        assert not_ready[0] == 503, not_ready

        answers = [
            stack.post(body, signing_secret, msg_id=msg_id) for body, msg_id in zip(posted, ids, strict=True)
        ]
        # Svix retries some of them (it saw a timeout, say): the same svix-id, answered 2xx again.
        answers += [stack.post(posted[n], signing_secret, msg_id=ids[n]) for n in (0, 4, 7, 20)]
        assert all(200 <= status < 300 for status in answers), answers

        rows = inbox(database)
        assert [row.svix_id for row in rows] == ids
        assert {row.status for row in rows} == {InboxStatus.PENDING}
        assert {row.attempts for row in rows} == {0}

        # The broker is back (the worker and beat reach the real Redis); the web process still
        # cannot reach it, so the sweeper alone brings these rows to the worker.
        stack.start_worker(beat=True, env=worker_env)
        rows = stack.wait_for("every stored event applied", lambda: drained(database, len(posted)))
        assert {row.status for row in rows} == {InboxStatus.APPLIED}
        assert {row.attempts for row in rows} == {0}
        assert all(row.handled_at is not None and row.last_error is None for row in rows)
        assert_lifecycle_mirrored(database, stack)

        # Applied once: the worker's tasks together applied exactly as many rows as were stored
        # (a task handed rows already applied reports them as skipped, not applied).
        worker_log = (stack.log_dir / "worker.log").read_text(errors="replace")
        applied_counts = [int(n) for n in re.findall(r"\bapplied=(\d+) rejected=", worker_log)]
        assert sum(applied_counts) == len(posted), applied_counts

    # The mirror equals each event applied once, in order, to an empty mirror.
    reference = make_session_factory(sqlite_engine)
    with session_scope(reference) as session:
        events = [parse_event(msg_id, body) for body, msg_id in zip(posted, ids, strict=True)]
        apply_events(session, events, now_ms=T)
    with session_scope(reference) as expected, session_scope(make_session_factory(database)) as actual:
        assert mirror_rows(actual) == mirror_rows(expected)
        assert actual.scalar(select(func.count()).select_from(tables.Membership)) == 34
