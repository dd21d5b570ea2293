"""The commands core on SQLite and PostgreSQL, sending to the emulator over real HTTP.

The emulator's events are applied to the mirror by the test itself (``Mirror.sync``), standing
in for webhook delivery, so that confirmation sees "the desired state arriving by webhook".
"""

from __future__ import annotations

import itertools
import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from emulator import Emulator, EmulatorConfig
from emulator.payloads import OMIT, webhook_body
from models.commands import CommandNotFoundError, InvalidCommandError
from models.db import session_scope
from models.events import parse_event
from models.mirror import apply_events
from models.tables import ApiCall, Command, CommandKind, CommandStatus, Membership
from worker.clerk import ClerkClient
from worker.commands import (
    CommandRequest,
    CommandStateError,
    LastAdminError,
    SendResult,
    confirm_commands,
    due_command_ids,
    get_command,
    list_api_calls,
    list_commands,
    retry_command,
    send_command,
    submit_command,
)
from worker.ratelimit import RateLimiter

SECRET_KEY = "sk_test_commands"
NOW = 1_700_000_000_000
CONFIRM_TIMEOUT_MS = 300_000


class Mirror:
    """Collects the emulator's events; ``sync`` applies them as the webhook path would."""

    def __init__(self, emu: Emulator, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.events: list[tuple[str, dict[str, Any], int]] = []
        self._ids = itertools.count(1)
        emu.state.subscribe(lambda kind, data, ts: self.events.append((kind, data, ts)))

    def sync(self) -> None:
        batch, self.events = self.events, []
        events = [
            parse_event(
                f"msg_{next(self._ids)}_{uuid.uuid4().hex[:6]}",
                webhook_body(kind, data, ts, instance_id=OMIT),
            )
            for kind, data, ts in batch
        ]
        with session_scope(self.factory) as session:
            apply_events(session, events, now_ms=NOW)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    emulator = Emulator(
        EmulatorConfig(port=0, secret_key=SECRET_KEY, rate_limit=0, membership_rate_limit=0, seed=5)
    ).start()
    yield emulator
    emulator.stop()


@pytest.fixture
def client(emu: Emulator) -> Iterator[ClerkClient]:
    limiter = RateLimiter("memory://", 1000, 100, namespace=f"t{uuid.uuid4().hex[:8]}")
    clerk = ClerkClient(secret_key=SECRET_KEY, api_url=emu.api_url, timeout=2.0, limiter=limiter)
    yield clerk
    clerk.close()


@pytest.fixture
def mirror(emu: Emulator, session_factory: sessionmaker[Session]) -> Mirror:
    emu.state.announce_defaults()
    return Mirror(emu, session_factory)


@pytest.fixture
def org(emu: Emulator, mirror: Mirror) -> dict[str, str]:
    """An organization with an admin and a member, mirrored."""
    state = emu.state
    admin = state.create_user(email_address="admin@example.com")["id"]
    member = state.create_user(email_address="member@example.com")["id"]
    outsider = state.create_user(email_address="outsider@example.com")["id"]
    org_id = state.create_organization(name="Acme", created_by=admin)["id"]
    state.add_membership(org_id, user_id=member, role="org:member")
    mirror.sync()
    return {"id": org_id, "admin": admin, "member": member, "outsider": outsider}


def fault(emu: Emulator, **body: Any) -> None:
    request = urllib.request.Request(
        f"{emu.url}/_emulator/faults", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Authorization", f"Bearer {SECRET_KEY}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def submit(factory: sessionmaker[Session], request: CommandRequest, **options: Any) -> int:
    with session_scope(factory) as session:
        return submit_command(session, request, now_ms=NOW, **options).id


def load(factory: sessionmaker[Session], command_id: int) -> Command:
    with session_scope(factory) as session:
        command = get_command(session, command_id)
        assert command is not None
        return command


def calls(factory: sessionmaker[Session], command_id: int) -> list[ApiCall]:
    with session_scope(factory) as session:
        return list_api_calls(session, command_id=command_id)


def send(factory: sessionmaker[Session], client: ClerkClient, command_id: int, **options: Any) -> SendResult:
    # Far enough after the previous run for any backoff to have passed.
    now = NOW + 3_600_000 * (load(factory, command_id).attempts + 1)
    return send_command(factory, client, command_id, now_ms=now, **options)


def confirm(factory: sessionmaker[Session], now_ms: int = NOW) -> tuple[int, int]:
    with session_scope(factory) as session:
        return confirm_commands(session, now_ms=now_ms, confirm_timeout_ms=CONFIRM_TIMEOUT_MS)


def req(kind: str, org: dict[str, str], **fields: Any) -> CommandRequest:
    return CommandRequest(kind=kind, organization_id=org["id"], requested_by="cli:test", **fields)


def invitations_for(emu: Emulator, org_id: str, email: str) -> list[dict[str, Any]]:
    page = emu.state.list_invitations(org_id, limit=100)
    return [i for i in page.data if i["email_address"] == email]


# ---------------------------------------------------------------------- each kind
def kind_requests(emu: Emulator, org: dict[str, str]) -> dict[str, CommandRequest]:
    invitation = emu.state.create_invitation(org["id"], email_address="old@example.com", role="org:member")
    return {
        CommandKind.SET_ROLE: req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:admin"),
        CommandKind.ADD_MEMBER: req(CommandKind.ADD_MEMBER, org, user_id=org["outsider"], role="org:member"),
        CommandKind.REMOVE_MEMBER: req(CommandKind.REMOVE_MEMBER, org, user_id=org["member"]),
        CommandKind.INVITE: req(CommandKind.INVITE, org, email_address="new@example.com", role="org:member"),
        CommandKind.BULK_INVITE: req(
            CommandKind.BULK_INVITE,
            org,
            role="org:member",
            payload={"email_addresses": ["b1@example.com", "b2@example.com"]},
        ),
        CommandKind.REVOKE_INVITATION: req(
            CommandKind.REVOKE_INVITATION, org, invitation_id=invitation["id"]
        ),
    }


@pytest.mark.parametrize("kind", CommandKind.ALL)
def test_each_kind_is_sent_applied_then_confirmed_by_the_mirror(
    kind: str, emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    request = kind_requests(emu, org)[kind]
    mirror.sync()
    command_id = submit(factory, request)
    assert load(factory, command_id).status == CommandStatus.PENDING

    # The webhook has not arrived yet: applied, not confirmed.
    assert send(factory, client, command_id) == SendResult(CommandStatus.APPLIED)
    command = load(factory, command_id)
    assert command.attempts == 1 and command.applied_at is not None and command.result
    assert confirm(factory) == (0, 0)

    mirror.sync()
    assert confirm(factory) == (1, 0)
    command = load(factory, command_id)
    assert command.status == CommandStatus.CONFIRMED and command.confirmed_at is not None
    recorded = calls(factory, command_id)
    assert [c.purpose for c in recorded] == ["send"] and recorded[0].status_code == 200
    # A duplicate task message changes nothing.
    assert send(factory, client, command_id).status == CommandStatus.CONFIRMED
    assert len(calls(factory, command_id)) == 1


def test_a_command_already_shown_by_the_mirror_is_confirmed_when_applied(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    command_id = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:member"))
    assert send(factory, client, command_id).status == CommandStatus.CONFIRMED


# ------------------------------------------------------------------- idempotency
def test_invite_after_a_timeout_creates_no_second_invitation(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    fault(emu, method="POST", path_regex="/invitations$", mode="timeout_after_commit", delay=3)
    command_id = submit(
        factory, req(CommandKind.INVITE, org, email_address="t@example.com", role="org:member")
    )

    first = send(factory, client, command_id)
    assert first.status == CommandStatus.PENDING and first.retry_at_ms is not None
    command = load(factory, command_id)
    assert command.error_code == "timeout" and command.attempts == 1
    # The client gave up on its own clock; a loaded server may commit a little later.
    wait_until("the timed-out invitation", lambda: invitations_for(emu, org["id"], "t@example.com") or None)
    assert len(invitations_for(emu, org["id"], "t@example.com")) == 1

    assert send(factory, client, command_id).status == CommandStatus.APPLIED
    command = load(factory, command_id)
    assert command.result is not None and command.result["already"] is True
    assert command.error_code is None and command.attempts == 2
    invitations = invitations_for(emu, org["id"], "t@example.com")
    assert len(invitations) == 1 and command.result["invitation_id"] == invitations[0]["id"]
    assert [(c.purpose, c.method, c.error_code) for c in calls(factory, command_id)] == [
        ("send", "POST", "timeout"),
        ("check", "GET", None),
    ]
    mirror.sync()
    assert confirm(factory) == (1, 0)


def test_add_member_after_a_5xx_does_not_fail_on_already_a_member(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    fault(emu, method="POST", path_regex="/memberships$", mode="error_500_after_commit")
    command_id = submit(factory, req(CommandKind.ADD_MEMBER, org, user_id=org["outsider"], role="org:member"))
    assert send(factory, client, command_id).status == CommandStatus.PENDING
    assert load(factory, command_id).error_code == "internal_clerk_error"
    assert send(factory, client, command_id).status == CommandStatus.APPLIED
    assert load(factory, command_id).result == {
        **(load(factory, command_id).result or {}),
        "already": True,
    }


def test_already_a_member_on_a_first_attempt_is_applied_when_the_role_matches(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    same = submit(factory, req(CommandKind.ADD_MEMBER, org, user_id=org["member"], role="org:member"))
    other = submit(factory, req(CommandKind.ADD_MEMBER, org, user_id=org["admin"], role="org:member"))
    assert send(factory, client, same).status == CommandStatus.CONFIRMED
    assert send(factory, client, other).status == CommandStatus.FAILED
    assert load(factory, other).error_code == "already_a_member_in_organization"


def test_bulk_invite_after_a_timeout_sends_only_the_missing_ones(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    fault(emu, method="POST", path_regex="/invitations/bulk$", mode="timeout_after_commit", delay=3)
    emails = ["a@example.com", "b@example.com"]
    command_id = submit(
        factory, req(CommandKind.BULK_INVITE, org, role="org:member", payload={"email_addresses": emails})
    )
    assert send(factory, client, command_id).status == CommandStatus.PENDING
    wait_until(
        "the timed-out bulk invitations",
        lambda: True if all(invitations_for(emu, org["id"], e) for e in emails) else None,
    )
    assert send(factory, client, command_id).status == CommandStatus.APPLIED
    for email in emails:
        assert len(invitations_for(emu, org["id"], email)) == 1
    # Someone else invited one of the next batch: only the other one is created.
    emu.state.create_invitation(org["id"], email_address="c@example.com", role="org:member")
    second = submit(
        factory,
        req(
            CommandKind.BULK_INVITE,
            org,
            role="org:member",
            payload={"email_addresses": ["c@example.com", "d@example.com"]},
        ),
    )
    assert send(factory, client, second).status == CommandStatus.APPLIED
    assert len(invitations_for(emu, org["id"], "c@example.com")) == 1
    assert len(invitations_for(emu, org["id"], "d@example.com")) == 1
    result = load(factory, second).result or {}
    assert len(result["invitation_ids"]) == 2 and result["already"] == ["c@example.com"]
    mirror.sync()
    assert confirm(factory) == (2, 0)


def test_remove_and_revoke_already_done_are_applied(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    invitation = emu.state.create_invitation(org["id"], email_address="r@example.com", role="org:member")
    remove = submit(factory, req(CommandKind.REMOVE_MEMBER, org, user_id=org["member"]))
    revoke = submit(factory, req(CommandKind.REVOKE_INVITATION, org, invitation_id=invitation["id"]))
    emu.state.remove_membership(org["id"], org["member"])
    emu.state.revoke_invitation(org["id"], invitation["id"])
    assert send(factory, client, remove).status == CommandStatus.APPLIED
    assert send(factory, client, revoke).status == CommandStatus.APPLIED
    assert (load(factory, remove).result or {}).get("already") is True
    assert (load(factory, revoke).result or {}).get("already") is True


# ----------------------------------------------------------------- failures
def test_business_errors_are_final(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    command_id = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:nope"))
    assert send(factory, client, command_id).status == CommandStatus.FAILED
    command = load(factory, command_id)
    assert command.error_code == "resource_not_found" and command.attempts == 1
    assert "org:nope" in (command.error_message or "")


def test_transient_errors_back_off_then_give_up(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    fault(emu, method="PATCH", path_regex="/memberships/", mode="error_500", count=5)
    command_id = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:admin"))
    first = send(factory, client, command_id, max_attempts=3)
    assert first.status == CommandStatus.PENDING and first.retry_at_ms is not None
    assert send(factory, client, command_id, max_attempts=3).status == CommandStatus.PENDING
    assert send(factory, client, command_id, max_attempts=3).status == CommandStatus.FAILED
    command = load(factory, command_id)
    assert command.error_code == "internal_clerk_error" and command.attempts == 3
    assert "3 attempts" in (command.error_message or "")


# ---------------------------------------------------------------- last admin
def test_last_admin_guard_refuses_locally(emu: Emulator, mirror: Mirror, org: dict[str, str]) -> None:
    factory = mirror.factory
    with pytest.raises(LastAdminError, match="without a member"):
        submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["admin"], role="org:member"))
    with pytest.raises(LastAdminError):
        submit(factory, req(CommandKind.REMOVE_MEMBER, org, user_id=org["admin"]))
    with session_scope(factory) as session:
        assert list_commands(session) == []
    # With a second admin, demoting the first is fine.
    emu.state.update_membership_role(org["id"], org["member"], role="org:admin")
    mirror.sync()
    submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["admin"], role="org:member"))


def test_last_admin_guard_uses_role_permissions_and_falls_back_to_org_admin(
    emu: Emulator, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    # A custom role with the admin-level permission counts as an admin.
    manage = next(p for p in emu.state.snapshot()["permissions"] if p["key"] == "org:sys_memberships:manage")
    emu.state.create_role(name="Owner", key="org:owner", permissions=[manage["id"]])
    emu.state.update_membership_role(org["id"], org["member"], role="org:owner")
    mirror.sync()
    submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["admin"], role="org:member"))
    emu.state.update_membership_role(org["id"], org["admin"], role="org:member")
    mirror.sync()
    with pytest.raises(LastAdminError):
        submit(factory, req(CommandKind.REMOVE_MEMBER, org, user_id=org["member"]))
    # Moving the owner to another admin-level role is no demotion.
    submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:admin"))


def test_last_admin_guard_without_mirrored_roles(session_factory: sessionmaker[Session]) -> None:
    """No role rows (Clerk never announces the defaults): org:admin is the admin-level role."""
    with session_scope(session_factory) as session:
        for user, role in (("user_a", "org:admin"), ("user_b", "org:member"), ("user_c", "org:custom")):
            session.add(
                Membership(
                    organization_id="org_1",
                    user_id=user,
                    id=f"orgmem_{user}",
                    role=role,
                    permissions=None,
                    version="1",
                    deleted=False,
                    synced_at=NOW,
                )
            )
    org = {"id": "org_1"}
    with pytest.raises(LastAdminError):
        submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="user_a", role="org:custom"))
    submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="user_b", role="org:custom"))
    submit(session_factory, req(CommandKind.REMOVE_MEMBER, org, user_id="user_c"))


def test_last_admin_guard_checks_again_before_sending(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    emu.state.update_membership_role(org["id"], org["member"], role="org:admin")
    mirror.sync()
    command_id = submit(factory, req(CommandKind.REMOVE_MEMBER, org, user_id=org["admin"]))
    emu.state.remove_membership(org["id"], org["member"])
    mirror.sync()
    assert send(factory, client, command_id).status == CommandStatus.FAILED
    assert load(factory, command_id).error_code == "last_admin_guard"
    assert calls(factory, command_id) == []


def test_clerks_own_last_admin_refusal_is_recorded(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    """The mirror believes there is another admin (its webhook is late); Clerk refuses."""
    factory = mirror.factory
    emu.state.update_membership_role(org["id"], org["member"], role="org:admin")
    mirror.sync()
    emu.state.update_membership_role(org["id"], org["member"], role="org:member")
    command_id = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["admin"], role="org:member"))
    assert send(factory, client, command_id).status == CommandStatus.FAILED
    command = load(factory, command_id)
    assert command.error_code == "organization_minimum_permissions_needed"
    [call] = calls(factory, command_id)
    assert call.status_code == 400 and call.clerk_trace_id


# ------------------------------------------------------------------ the outbox
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"kind": "nope"}, "kind"),
        ({"organization_id": ""}, "organization_id"),
        ({"user_id": None}, "user_id"),
        ({"role": None}, "role"),
        ({"kind": CommandKind.INVITE, "email_address": "not-an-email"}, "email_address"),
        ({"kind": CommandKind.BULK_INVITE, "payload": {"email_addresses": []}}, "payload.email_addresses"),
        (
            {"kind": CommandKind.BULK_INVITE, "payload": {"email_addresses": ["a@x.io", "A@x.io"]}},
            "payload.email_addresses",
        ),
        ({"kind": CommandKind.REVOKE_INVITATION}, "invitation_id"),
        ({"payload": {"surprise": 1}}, "payload.surprise"),
        (
            {"kind": CommandKind.INVITE, "email_address": "a@x.io", "payload": {"expires_in_days": 0}},
            "payload.expires_in_days",
        ),
    ],
)
def test_invalid_requests_name_the_field(
    session_factory: sessionmaker[Session], fields: dict[str, Any], field: str
) -> None:
    base: dict[str, Any] = {
        "kind": CommandKind.SET_ROLE,
        "organization_id": "org_1",
        "requested_by": "cli:test",
        "user_id": "user_1",
        "role": "org:member",
    }
    with pytest.raises(InvalidCommandError) as error:
        submit(session_factory, CommandRequest(**{**base, **fields}))
    assert error.value.field == field


def test_idempotency_key_returns_the_existing_command(session_factory: sessionmaker[Session]) -> None:
    request = CommandRequest(
        kind=CommandKind.SET_ROLE,
        organization_id="org_1",
        requested_by="rule:admins",
        rule_name="admins",
        user_id="user_1",
        role="org:admin",
        idempotency_key="rule:admins:orgmem_1:on_join",
    )
    first = submit(session_factory, request)
    assert submit(session_factory, request) == first
    with session_scope(session_factory) as session:
        assert len(list_commands(session)) == 1


def test_newer_commands_supersede_unsent_older_ones(session_factory: sessionmaker[Session]) -> None:
    org = {"id": "org_1"}
    add = submit(session_factory, req(CommandKind.ADD_MEMBER, org, user_id="user_1", role="org:member"))
    first = submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="user_1", role="org:admin"))
    second = submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="user_1", role="org:member"))
    other = submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="user_2", role="org:admin"))
    planned = submit(
        session_factory, req(CommandKind.SET_ROLE, org, user_id="user_1", role="x", dry_run=True)
    )
    assert load(session_factory, first).status == CommandStatus.SUPERSEDED
    assert load(session_factory, first).superseded_by == second
    # A role change does not make an unsent add_member pointless; a dry run supersedes nothing.
    assert {load(session_factory, i).status for i in (add, second, other)} == {CommandStatus.PENDING}
    assert load(session_factory, planned).status == CommandStatus.PLANNED
    remove = submit(session_factory, req(CommandKind.REMOVE_MEMBER, org, user_id="user_1"))
    assert load(session_factory, add).superseded_by == remove
    assert load(session_factory, second).superseded_by == remove


def test_a_newer_command_waits_for_an_older_open_one(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    add = submit(factory, req(CommandKind.ADD_MEMBER, org, user_id=org["outsider"], role="org:member"))
    promote = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["outsider"], role="org:admin"))
    waiting = send(factory, client, promote)
    assert waiting.status == CommandStatus.PENDING and waiting.retry_at_ms is not None
    assert load(factory, promote).attempts == 0
    assert send(factory, client, add).status == CommandStatus.APPLIED
    assert send(factory, client, promote).status == CommandStatus.APPLIED
    mirror.sync()
    assert confirm(factory) == (2, 0)


def test_dry_run_is_planned_and_never_sent(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    explicit = submit(
        factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:admin", dry_run=True)
    )
    default = submit(
        factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:admin"), dry_run_default=True
    )
    for command_id in (explicit, default):
        assert load(factory, command_id).status == CommandStatus.PLANNED
        assert send(factory, client, command_id).status == CommandStatus.PLANNED
        assert calls(factory, command_id) == []
    with session_scope(factory) as session:
        assert due_command_ids(session, now_ms=NOW + 10**9, grace_ms=0, limit=10) == []


def test_applied_but_never_confirmed_is_flagged(
    emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]
) -> None:
    factory = mirror.factory
    command_id = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:admin"))
    send(factory, client, command_id)
    applied_at = load(factory, command_id).applied_at
    assert applied_at is not None
    assert confirm(factory, applied_at + CONFIRM_TIMEOUT_MS - 1) == (0, 0)
    assert confirm(factory, applied_at + CONFIRM_TIMEOUT_MS) == (0, 1)
    assert confirm(factory, applied_at + CONFIRM_TIMEOUT_MS + 1) == (0, 0)
    command = load(factory, command_id)
    assert command.status == CommandStatus.APPLIED and command.flagged_at is not None
    # A late webhook still confirms it; the flag stays as history.
    mirror.sync()
    assert confirm(factory, applied_at + CONFIRM_TIMEOUT_MS + 2) == (1, 0)


def test_retry_and_queries(emu: Emulator, client: ClerkClient, mirror: Mirror, org: dict[str, str]) -> None:
    factory = mirror.factory
    failed = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:nope"))
    send(factory, client, failed)
    ok = submit(factory, req(CommandKind.SET_ROLE, org, user_id=org["member"], role="org:admin"))
    send(factory, client, ok)
    with session_scope(factory) as session:
        assert [c.id for c in list_commands(session)] == [ok, failed]
        assert [c.id for c in list_commands(session, status=CommandStatus.FAILED)] == [failed]
        assert list_commands(session, organization_id="org_other") == []
        assert [c.id for c in list_commands(session, organization_id=org["id"], limit=1)] == [ok]
        with pytest.raises(InvalidCommandError):
            list_commands(session, status="bogus")
        assert get_command(session, 999_999) is None
        assert [c.command_id for c in list_api_calls(session)] == [failed, ok]
    with session_scope(factory) as session:
        command = retry_command(session, failed, now_ms=NOW)
        assert (
            command.status == CommandStatus.PENDING and command.attempts == 0 and command.error_code is None
        )
        with pytest.raises(CommandStateError):
            retry_command(session, ok, now_ms=NOW)
        with pytest.raises(CommandNotFoundError):
            retry_command(session, 999_999, now_ms=NOW)


def test_due_commands_for_the_sweep(session_factory: sessionmaker[Session]) -> None:
    org = {"id": "org_1"}
    fresh = submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="u1", role="org:admin"))
    backing_off = submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="u2", role="org:admin"))
    stuck = submit(session_factory, req(CommandKind.SET_ROLE, org, user_id="u3", role="org:admin"))
    with session_scope(session_factory) as session:
        for command_id, status, due in (
            (backing_off, "pending", NOW + 5_000),
            (stuck, "sending", NOW + 1_000),
        ):
            command = session.get(Command, command_id)
            assert command is not None
            command.status, command.next_attempt_at = status, due
    with session_scope(session_factory) as session:
        assert due_command_ids(session, now_ms=NOW, grace_ms=30_000, limit=10) == []
        assert due_command_ids(session, now_ms=NOW + 2_000, grace_ms=30_000, limit=10) == [stuck]
        assert due_command_ids(session, now_ms=NOW + 30_000, grace_ms=30_000, limit=10) == [
            fresh,
            backing_off,
            stuck,
        ]
        rows = session.scalars(select(Command.id).order_by(Command.id)).all()
        assert list(rows) == [fresh, backing_off, stuck]
