"""Commands end to end: a real worker sends them to the emulator, its webhooks confirm them.

``orgsync serve`` receives the emulator's Svix-signed webhooks and a real Celery worker (on
PostgreSQL and Redis) both applies them and sends the commands the test records. Faults
injected in the emulator make the first attempts time out or fail after the change was made;
a low instance budget makes it answer 429s.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import free_port, truncate_all
from helpers import assert_no_secrets
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from stack import FAST_SWEEPS, TEST_BOUND_S, Stack, hermetic_env, running_stack

from emulator import Emulator, EmulatorConfig
from models.db import make_session_factory, session_scope
from models.settings import Settings
from models.submission import CommandService
from models.tables import ApiCall, Command, CommandKind, CommandStatus, Invitation, Membership
from worker.app import create_celery, make_command_sender
from worker.commands import CommandRequest, LastAdminError, list_api_calls, submit_command

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

SECRET_KEY = "sk_test_commands_e2e"
BOUND_S = 90.0
# How far a recorded call start may trail the limiter's grant on a loaded machine.
GRANT_SKEW_MS = 250


@contextmanager
def orgsync_and_emulator(
    engine: Engine,
    redis_url: str,
    signing_secret: str,
    tmp_path: Path,
    orgsync_env: dict[str, str] | None = None,
    **emulator: Any,
) -> Iterator[tuple[Stack, Emulator, Callable[[list[int]], None]]]:
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    env = hermetic_env(
        database_url=engine.url.render_as_string(hide_password=False),
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        CLERK_SECRET_KEY=SECRET_KEY,
        CLERK_API_URL=f"http://127.0.0.1:{port}/v1",
        # Well above a loaded machine's answer times; the injected timeout below outlasts it.
        CLERK_API_TIMEOUT="3",
        **FAST_SWEEPS,
        **(orgsync_env or {}),
    )
    with running_stack(env, tmp_path / "logs") as stack:
        config = EmulatorConfig(
            port=port,
            secret_key=SECRET_KEY,
            webhook_urls=(stack.webhook_url,),
            signing_secret=signing_secret,
            announce_defaults=True,
            seed=9,
            **{"rate_limit": 0, "membership_rate_limit": 0, **emulator},
        )
        stack.start_web()
        # Beat's confirm sweep, as in production: a command whose webhook was applied while its send
        # was still committing is confirmed by the next sweep, not only by a later webhook.
        stack.start_worker(beat=True, concurrency=2)
        with Emulator(config) as emu:
            yield stack, emu, make_command_sender(create_celery(Settings.from_env(env)))
    # Every request, retry and refusal the processes logged: never the key or the signing secret.
    assert_no_secrets(stack.output(lines=1_000_000), SECRET_KEY, signing_secret)


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    yield pg_engine
    truncate_all(pg_engine)


def fault(emu: Emulator, **body: Any) -> None:
    request = urllib.request.Request(
        f"{emu.url}/_emulator/faults", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Authorization", f"Bearer {SECRET_KEY}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def submit_all(factory: sessionmaker[Session], requests: list[CommandRequest]) -> list[int]:
    with session_scope(factory) as session:
        return [submit_command(session, r, now_ms=time.time_ns() // 1_000_000).id for r in requests]


def wait_for_mirror(stack: Stack, factory: sessionmaker[Session], org_id: str, users: int) -> None:
    def ready() -> bool | None:
        with session_scope(factory) as session:
            rows = session.scalars(
                select(Membership).where(Membership.organization_id == org_id, Membership.deleted.is_(False))
            ).all()
        return True if len(rows) == users else None

    stack.wait_for(f"the mirror to show {users} members of {org_id}", ready, BOUND_S)


def wait_final(stack: Stack, factory: sessionmaker[Session], ids: list[int]) -> dict[int, Command]:
    final = (CommandStatus.CONFIRMED, CommandStatus.FAILED)

    def done() -> dict[int, Command] | None:
        with session_scope(factory) as session:
            rows = {c.id: c for c in session.scalars(select(Command).where(Command.id.in_(ids)))}
        return rows if all(rows[i].status in final for i in ids) else None

    return stack.wait_for("the commands to be confirmed or failed", done, BOUND_S)


def test_every_kind_end_to_end_through_faults_and_the_last_admin_guard(
    database: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> None:
    factory = make_session_factory(database)
    with orgsync_and_emulator(database, redis_url, signing_secret, tmp_path) as (stack, emu, send):
        state = emu.state
        users = {
            name: state.create_user(email_address=f"{name}@example.com")["id"]
            for name in ("a", "m1", "m2", "o")
        }
        org = state.create_organization(name="Acme", created_by=users["a"])["id"]
        for name in ("m1", "m2"):
            state.add_membership(org, user_id=users[name], role="org:member")
        old = state.create_invitation(org, email_address="old@example.com", role="org:member")["id"]
        # A second organization whose only admin is also its only member.
        solo = state.create_organization(name="Solo", created_by=users["o"])["id"]
        wait_for_mirror(stack, factory, org, 3)
        wait_for_mirror(stack, factory, solo, 1)

        # The first invite times out after Clerk made it; the first add answers 500 after it.
        fault(emu, method="POST", path_regex="/invitations$", mode="timeout_after_commit", delay=6)
        fault(emu, method="POST", path_regex="/memberships$", mode="error_500_after_commit")

        def req(kind: str, **fields: Any) -> CommandRequest:
            return CommandRequest(kind=kind, organization_id=org, requested_by="api:e2e", **fields)

        ids = submit_all(
            factory,
            [
                req(CommandKind.SET_ROLE, user_id=users["m1"], role="org:admin"),
                req(CommandKind.ADD_MEMBER, user_id=users["o"], role="org:member"),
                req(CommandKind.REMOVE_MEMBER, user_id=users["m2"]),
                req(CommandKind.INVITE, email_address="new@example.com", role="org:member"),
                req(
                    CommandKind.BULK_INVITE,
                    role="org:member",
                    payload={"email_addresses": ["b1@example.com", "b2@example.com"]},
                ),
                req(
                    CommandKind.REVOKE_INVITATION,
                    invitation_id=old,
                    payload={"requesting_user_id": users["a"]},
                ),
            ],
        )
        send(ids)
        commands = wait_final(stack, factory, ids)
        assert {commands[i].status for i in ids} == {CommandStatus.CONFIRMED}, {
            commands[i].kind: (commands[i].status, commands[i].error_code) for i in ids
        }
        set_role, add, _, invite, _, _ = (commands[i] for i in ids)

        # No second invitation, no failure on "already a member": the retries looked first.
        invited = [
            i for i in state.list_invitations(org, limit=100).data if i["email_address"] == "new@example.com"
        ]
        assert len(invited) == 1
        assert invite.attempts == 2 and (invite.result or {}).get("already") is True
        assert add.attempts == 2 and (add.result or {}).get("already") is True
        with session_scope(factory) as session:
            invite_calls = [(c.purpose, c.error_code) for c in list_api_calls(session, command_id=invite.id)]
            assert invite_calls == [("send", "timeout"), ("check", None)]
            assert session.scalars(select(Invitation.status).where(Invitation.id == old)).one() == "revoked"
            every = session.scalars(select(ApiCall)).all()
            assert all(c.command_id in ids and c.duration_ms >= 0 for c in every)
        assert set_role.confirmed_at is not None

        # Through the submission service, by slug: the requesting user reaches Clerk, which
        # refuses one who is not a member of the organization.
        other = state.create_invitation(org, email_address="other@example.com", role="org:member")["id"]
        service = CommandService(factory, send)
        submitted = service.submit(
            [
                CommandRequest(
                    CommandKind.REVOKE_INVITATION,
                    "acme",
                    "api:e2e",
                    invitation_id=other,
                    payload={"requesting_user_id": users["m2"]},
                )
            ]
        )
        assert submitted.enqueued
        [stranger] = service.wait(submitted.open_ids, BOUND_S)
        assert (stranger.status, stranger.error_code) == (CommandStatus.FAILED, "resource_not_found")
        assert "requesting user" in (stranger.error_message or "")

        # The last admin guard, locally: Solo's only admin cannot be demoted or removed.
        with pytest.raises(LastAdminError):
            submit_all(
                factory,
                [
                    CommandRequest(
                        CommandKind.SET_ROLE, solo, "api:e2e", user_id=users["o"], role="org:member"
                    )
                ],
            )
        # And Clerk's own refusal, when the mirror is wrong: a lost webhook left it believing
        # that "a" is a second admin of Solo, so the local guard lets the removal through.
        with session_scope(factory) as session:
            session.add(
                Membership(
                    organization_id=solo,
                    user_id=users["a"],
                    id="orgmem_stale",
                    role="org:admin",
                    version="0",
                    deleted=False,
                    synced_at=0,
                )
            )
        [refused] = submit_all(
            factory, [CommandRequest(CommandKind.REMOVE_MEMBER, solo, "api:e2e", user_id=users["o"])]
        )
        send([refused])
        failed = wait_final(stack, factory, [refused])[refused]
        assert failed.status == CommandStatus.FAILED
        assert failed.error_code == "organization_minimum_permissions_needed" and failed.attempts == 1
        with session_scope(factory) as session:
            [call] = list_api_calls(session, command_id=refused)
            assert call.status_code == 400 and call.clerk_trace_id
        assert {u for u, _ in state.members_of(solo)} == {users["o"]}


def promote_everyone(
    stack: Stack,
    emu: Emulator,
    send: Callable[[list[int]], None],
    factory: sessionmaker[Session],
    *,
    name: str,
    count: int,
) -> dict[int, Command]:
    """An organization of ``count`` members (and its admin), then one set-role command each."""
    state = emu.state
    admin = state.create_user(email_address=f"admin@{name.lower()}.example")["id"]
    org = state.create_organization(name=name, created_by=admin)["id"]
    members = [state.create_user(email_address=f"u{i}@{name.lower()}.example")["id"] for i in range(count)]
    for user in members:
        state.add_membership(org, user_id=user, role="org:member")
    wait_for_mirror(stack, factory, org, count + 1)
    ids = submit_all(
        factory,
        [
            CommandRequest(CommandKind.SET_ROLE, org, "api:e2e", user_id=user, role="org:admin")
            for user in members
        ],
    )
    send(ids)
    return wait_final(stack, factory, ids)


def test_a_429_storm_finishes_every_command(
    database: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> None:
    """The emulator allows 4 calls per 2 s; orgsync is configured for far more (a budget shared
    with other consumers, say). Every command still ends confirmed, each 429 is waited out by
    every worker process instead of being hammered, and no call is repeated needlessly."""
    budget, window, count = 4, 2.0, 12
    factory = make_session_factory(database)
    with orgsync_and_emulator(
        database, redis_url, signing_secret, tmp_path, rate_limit=budget, rate_window=window
    ) as (stack, emu, send):
        commands = promote_everyone(stack, emu, send, factory, name="Busy", count=count)
    assert {c.status for c in commands.values()} == {CommandStatus.CONFIRMED}
    with session_scope(factory) as session:
        calls = list(session.scalars(select(ApiCall).order_by(ApiCall.started_at)))
    ok = [c for c in calls if c.status_code == 200]
    limited = [c for c in calls if c.status_code == 429]
    assert len(ok) == count, "one successful PATCH per command, nothing sent twice"
    assert limited, "the emulator's budget was never hit: no storm to weather"
    assert all(c.retry_after is not None and c.retry_after >= 1 for c in limited)
    assert all(c.error_code == "too_many_requests" for c in limited)
    # After a 429 every process waits for Retry-After: at most one refusal per worker process
    # per window of the emulator, however many commands are queued.
    span = (calls[-1].started_at - calls[0].started_at) / 1000
    windows = int(span // window) + 2
    assert len(limited) <= 2 * windows, (len(limited), windows)
    assert {c.attempts for c in commands.values()} == {1}


def test_commands_stay_within_a_budget_they_share(
    database: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> None:
    """orgsync knows the budget (5 calls per 10 s, the emulator's too): two worker processes
    share it through Redis, so no 10-second span of the calls they make ever holds more than
    the budget, and every command is confirmed.

    The emulator counts a call when it arrives, orgsync when it grants it: a call that takes
    longer on the way than the next one can land in the emulator's previous window. Such a
    boundary 429 is waited out (Retry-After, shared) and stays rare: at most one a window.
    """
    budget, count, window_ms = 5, 9, 10_000
    factory = make_session_factory(database)
    with orgsync_and_emulator(
        database,
        redis_url,
        signing_secret,
        tmp_path,
        orgsync_env={"ORGSYNC_RATE_LIMIT": str(budget)},
        rate_limit=budget,
        rate_window=window_ms / 1000,
    ) as (stack, emu, send):
        commands = promote_everyone(stack, emu, send, factory, name="Budget", count=count)
    assert {c.status for c in commands.values()} == {CommandStatus.CONFIRMED}
    with session_scope(factory) as session:
        calls = list(session.scalars(select(ApiCall).order_by(ApiCall.started_at)))
    assert len([c for c in calls if c.status_code == 200]) == count
    # A call's started_at is read just after the limiter granted it: on a busy machine the
    # two are a few milliseconds apart, so spans a little shorter than the window are judged.
    starts = [c.started_at for c in calls]
    for first, at in enumerate(starts):
        in_span = [s for s in starts[first:] if s < at + window_ms - GRANT_SKEW_MS]
        assert len(in_span) <= budget, (at, in_span)
    windows = (starts[-1] - starts[0]) // window_ms + 1
    assert len([c for c in calls if c.status_code == 429]) <= windows
