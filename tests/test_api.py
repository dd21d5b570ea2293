"""The application-facing Python API: reads, and changes recorded then enqueued after the commit."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from test_cli_commands import NOW_MS, ORG, environment, make_invoke, membership, seed
from test_cli_commands import Recorder as CliRecorder

from emulator.payloads import webhook_body
from models.commands import InvalidCommandError, LastAdminError
from models.db import make_session_factory, session_scope
from models.errors import OrganizationNotFoundError
from models.events import parse_event
from models.mirror import apply_events
from models.permissions import AccessCache
from models.settings import Settings
from models.tables import Command, CommandKind, CommandStatus
from orgsync.api import Orgsync


class Recorder:
    def __init__(self, engine: Engine, *, fail: bool = False) -> None:
        self.engine = engine
        self.fail = fail
        self.sent: list[int] = []

    def __call__(self, ids: list[int]) -> None:
        # Enqueued only after the commit: the row is visible from another session.
        with session_scope(make_session_factory(self.engine)) as session:
            assert session.scalars(select(Command.id).where(Command.id.in_(ids))).all() == ids
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.sent.extend(ids)


@pytest.fixture
def recorder(engine: Engine) -> Recorder:
    return Recorder(engine)


@pytest.fixture
def api(engine: Engine, tmp_path: Path, recorder: Recorder) -> Orgsync:
    seed(engine)
    settings = Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path)})
    return Orgsync(settings, requested_by="api:billing", engine=engine, send=recorder)


def test_reads_the_mirror(api: Orgsync) -> None:
    page = api.get_memberships("acme", role="org:admin")
    assert [m.public_user_data["user_id"] for m in page.data] == ["user_alice"]
    assert api.get_user_memberships("user_bob").total_count == 1
    assert [i.email_address for i in api.get_pending_invitations("acme").data] == ["dan@acme.test"]


def test_each_change_is_recorded_then_enqueued(api: Orgsync, recorder: Recorder) -> None:
    commands = [
        api.set_role("acme", "user_bob", "org:admin"),
        api.add_member("acme", "user_carol"),
        api.invite(ORG, "erin@acme.test", idempotency_key="invite-erin"),
        *api.bulk_invite("acme", ["f@acme.test", "g@acme.test"]),
        api.revoke_invitation("acme", "orginv_dan", requesting_user_id="user_alice"),
        api.remove_member("acme", "user_carol"),
    ]
    assert [c.kind for c in commands] == [
        CommandKind.SET_ROLE,
        CommandKind.ADD_MEMBER,
        CommandKind.INVITE,
        CommandKind.BULK_INVITE,
        CommandKind.REVOKE_INVITATION,
        CommandKind.REMOVE_MEMBER,
    ]
    assert all(c.requested_by == "api:billing" and c.organization_id == ORG for c in commands)
    assert commands[3].payload == {"email_addresses": ["f@acme.test", "g@acme.test"]}
    assert commands[4].payload == {"requesting_user_id": "user_alice"}
    assert recorder.sent == [c.id for c in commands]
    # The same idempotency key returns the recorded command; still open, it is enqueued again.
    again = api.invite(ORG, "erin@acme.test", idempotency_key="invite-erin")
    assert again.id == commands[2].id
    assert recorder.sent.count(commands[2].id) == 2


def test_bulk_invite_splits_into_commands_of_ten(api: Orgsync, recorder: Recorder) -> None:
    emails = [f"person{n}@acme.test" for n in range(25)]
    commands = api.bulk_invite("acme", emails, idempotency_key="onboarding")
    assert [len(c.payload["email_addresses"]) for c in commands if c.payload] == [10, 10, 5]
    assert [a for c in commands if c.payload for a in c.payload["email_addresses"]] == emails
    assert [c.idempotency_key for c in commands] == ["onboarding:1", "onboarding:2", "onboarding:3"]
    assert recorder.sent == [c.id for c in commands]
    # Again with the same key: the same three commands, nothing new recorded.
    assert [c.id for c in api.bulk_invite("acme", emails, idempotency_key="onboarding")] == recorder.sent[:3]


def test_bulk_invite_refuses_an_address_twice_across_parts(api: Orgsync, recorder: Recorder) -> None:
    emails = [f"person{n}@acme.test" for n in range(12)] + ["PERSON0@acme.test"]
    with pytest.raises(InvalidCommandError, match="twice"):
        api.bulk_invite("acme", emails)
    assert recorder.sent == []


def test_refusals_are_raised_and_nothing_is_sent(api: Orgsync, recorder: Recorder) -> None:
    with pytest.raises(LastAdminError):
        api.set_role("acme", "user_alice", "org:member")
    with pytest.raises(OrganizationNotFoundError, match="no organization"):
        api.set_role("nope", "user_bob", "org:admin")
    with pytest.raises(InvalidCommandError, match="requested_by"):
        Orgsync(api.settings, requested_by=" ", engine=api.engine)
    with pytest.raises(InvalidCommandError, match="requesting_user_id"):
        api.revoke_invitation("acme", "orginv_dan", requesting_user_id=" ")
    assert recorder.sent == []


def test_dry_run_and_broker_down(api: Orgsync, engine: Engine, recorder: Recorder) -> None:
    planned = api.set_role("acme", "user_bob", "org:admin", dry_run=True)
    assert planned.status == CommandStatus.PLANNED
    down = Orgsync(api.settings, requested_by="api:billing", engine=engine, send=Recorder(engine, fail=True))
    pending = down.set_role("acme", "user_bob", "org:admin")
    assert pending.status == CommandStatus.PENDING
    assert recorder.sent == []
    # Retrying the pending command enqueues it again, now through the working broker.
    assert api.retry(pending.id).id == pending.id
    assert recorder.sent == [pending.id]


@pytest.mark.parametrize("status", CommandStatus.ALL)
def test_the_api_and_the_cli_enqueue_the_same_states(
    api: Orgsync, recorder: Recorder, engine: Engine, tmp_path: Path, status: str
) -> None:
    """A re-run with the same key returns the command as it is: open ones go to the workers again."""
    first = api.add_member("acme", "user_new", idempotency_key="same-key")
    with session_scope(make_session_factory(engine)) as session:
        session.get_one(Command, first.id).status = status
    recorder.sent.clear()
    cli_recorder = CliRecorder(engine)
    invoke = make_invoke(environment(engine, tmp_path), cli_recorder)
    again = api.add_member("acme", "user_new", idempotency_key="same-key")
    result = invoke("members", "add", "--org", "acme", "--user", "user_new", "--idempotency-key", "same-key")
    assert result.exit_code == 0, result.output
    assert again.id == first.id
    expected = [first.id] if status in CommandStatus.OPEN else []
    assert recorder.sent == expected
    assert [i for ids in cli_recorder.sent for i in ids] == expected


def test_permission_questions(api: Orgsync) -> None:
    assert api.has_permission("user_alice", "acme", "org:sys_memberships:manage")
    assert api.has_permission("user_alice", ORG, "org:sys_memberships:manage")
    assert not api.has_permission("user_bob", "acme", "org:sys_memberships:manage")
    assert api.has_permission("user_bob", "acme", "org:sys_memberships:read")
    assert not api.has_permission("user_bob", "globex", "org:sys_memberships:read")
    assert api.role_of("user_bob", "acme") == "org:member"
    assert api.role_of("user_bob", "globex") is None
    assert [(a.organization_slug, a.role) for a in api.organizations_of("user_zed")] == [
        ("globex", "org:admin")
    ]


def test_cached_permission_answers_follow_the_mirror(engine: Engine, tmp_path: Path) -> None:
    seed(engine)
    settings = Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path)})
    cached = Orgsync(
        settings, requested_by="api:app", engine=engine, permission_cache=AccessCache(recheck_s=0)
    )
    assert not cached.has_permission("user_bob", "acme", "org:sys_memberships:manage")
    assert not cached.has_permission("user_bob", "acme", "org:sys_memberships:manage")
    assert cached.permission_cache is not None and cached.permission_cache.hits == 1
    promoted = membership("orgmem_b", "user_bob", "org:admin", NOW_MS)
    with session_scope(make_session_factory(engine)) as session:
        apply_events(
            session,
            [parse_event("msg_promote", webhook_body("organizationMembership.updated", promoted, NOW_MS))],
            now_ms=NOW_MS,
        )
    assert cached.has_permission("user_bob", "acme", "org:sys_memberships:manage")
    assert cached.role_of("user_bob", "acme") == "org:admin"


def test_filtered_reads(api: Orgsync) -> None:
    listing = api.list_memberships(organization="acme", query="bob", order_by="-created_at")
    assert listing is not None and [m.user_id for m in listing.data] == ["user_bob"]
    mine = api.list_memberships(user="user_zed")
    assert mine is not None and [m.organization_id for m in mine.data] == ["org_2cmdGLOBEX"]
    assert api.list_memberships(organization="nowhere") is None
    everyone = api.list_memberships(order_by="created_at", limit=2)
    assert everyone is not None and everyone.total_count == 3
    assert [m.user_id for m in everyone.data] == ["user_alice", "user_bob"]
    invitations = api.list_invitations(organization="acme", status="pending", query="dan")
    assert invitations is not None and [i.id for i in invitations.data] == ["orginv_dan"]
    assert api.list_invitations(organization="acme", query="nobody") is not None
