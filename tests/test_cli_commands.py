"""The CLI that changes Clerk: members, invitations and the commands outbox, through click's runner."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import free_port
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from emulator.payloads import (
    OMIT,
    invitation_data,
    membership_data,
    organization_data,
    permission_data,
    role_data,
    user_public_data,
    webhook_body,
)
from models.db import make_session_factory, session_scope
from models.events import parse_event
from models.mirror import apply_events
from models.settings import Settings
from models.tables import ApiCall, Command, CommandKind, CommandStatus
from orgsync.cli import cli
from orgsync.cli.base import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, Runtime

NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000
ORG = "org_2cmdACME"
OTHER_ORG = "org_2cmdGLOBEX"
ADMIN_PERMISSIONS = [
    "org:sys_profile:manage",
    "org:sys_profile:delete",
    "org:sys_memberships:read",
    "org:sys_memberships:manage",
]
MEMBER_PERMISSIONS = ["org:sys_memberships:read"]


# -- a small mirror ------------------------------------------------------------------------


# Only the fields these tests read: what a payload leaves out (OMIT) the mirror stores as null.
def organization(org_id: str, slug: str, at: int) -> dict[str, Any]:
    return organization_data(
        org_id,
        name=slug.capitalize(),
        slug=slug,
        image_url=OMIT,
        has_image=False,
        members_count=OMIT,
        missing_member_with_elevated_permissions=OMIT,
        pending_invitations_count=OMIT,
        max_allowed_memberships=10,
        private_metadata=OMIT,
        created_by=OMIT,
        created_at=at,
    )


def membership(member_id: str, user_id: str, role: str, at: int, *, org_id: str = ORG) -> dict[str, Any]:
    slug = "acme" if org_id == ORG else "globex"
    return membership_data(
        member_id,
        organization(org_id, slug, NOW_MS - DAY_MS),
        user_id,
        role=role,
        role_name=OMIT,
        permissions=ADMIN_PERMISSIONS if role == "org:admin" else MEMBER_PERMISSIONS,
        private_metadata=OMIT,
        public_user_data=user_public_data(
            user_id,
            identifier=f"{user_id.removeprefix('user_')}@{slug}.test",
            first_name=None,
            last_name=None,
            image_url="https://img.example/x.png",
            profile_image_url=OMIT,
            has_image=False,
        ),
        created_at=at,
    )


def role(key: str, permissions: list[str], at: int) -> dict[str, Any]:
    return role_data(
        f"role_{key.removeprefix('org:')}",
        key,
        name=key.removeprefix("org:").capitalize(),
        description=None,
        is_creator_eligible=key == "org:admin",
        permissions=[
            permission_data(
                f"perm_{index}", permission, name=permission, description=None, type="system", created_at=at
            )
            for index, permission in enumerate(permissions)
        ],
        created_at=at,
    )


def history() -> list[tuple[str, dict[str, Any]]]:
    t = NOW_MS - DAY_MS
    return [
        ("role.created", role("org:admin", ADMIN_PERMISSIONS, t)),
        ("role.created", role("org:member", MEMBER_PERMISSIONS, t)),
        ("organization.created", organization(ORG, "acme", t)),
        ("organization.created", organization(OTHER_ORG, "globex", t + 1)),
        ("organizationMembership.created", membership("orgmem_a", "user_alice", "org:admin", t + 10)),
        ("organizationMembership.created", membership("orgmem_b", "user_bob", "org:member", t + 20)),
        (
            "organizationMembership.created",
            membership("orgmem_z", "user_zed", "org:admin", t + 30, org_id=OTHER_ORG),
        ),
        (
            "organizationInvitation.created",
            invitation_data(
                "orginv_dan",
                ORG,
                email="dan@acme.test",
                private_metadata=OMIT,
                url=None,
                expires_at=NOW_MS + DAY_MS,
                created_at=t + 40,
            ),
        ),
    ]


def seed(engine: Engine) -> None:
    events = [
        parse_event(f"msg_cmd_{index}", webhook_body(kind, data, NOW_MS - DAY_MS + index))
        for index, (kind, data) in enumerate(history())
    ]
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, events, now_ms=NOW_MS)


# -- running the CLI -----------------------------------------------------------------------


def environment(engine: Engine, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        # Nobody listens there: only tests that use the real sender reach it.
        "BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "ORGSYNC_DATA_DIR": str(tmp_path / "data"),
        "ORGSYNC_LOG_LEVEL": "WARNING",
        "USER": "tester",
    }
    env.update(extra)
    return env


def commands_in(engine: Engine) -> list[Command]:
    with Session(engine) as session:
        return list(session.scalars(select(Command).order_by(Command.id)))


class Recorder:
    """A command sender that records each enqueue and checks the rows were committed first."""

    def __init__(self, engine: Engine, then: Callable[[Engine, list[int]], None] | None = None) -> None:
        self.engine = engine
        self.sent: list[list[int]] = []
        self.then = then

    def make(self, _settings: Settings) -> Callable[[list[int]], None]:
        return self.send

    def send(self, ids: list[int]) -> None:
        # A fresh connection sees only committed rows: the CLI must have committed already.
        committed = {row.id: row.status for row in commands_in(self.engine)}
        assert all(committed.get(command_id) in CommandStatus.OPEN for command_id in ids), committed
        self.sent.append(list(ids))
        if self.then is not None:
            self.then(self.engine, ids)


Invoke = Callable[..., Result]


def make_invoke(env: dict[str, str], recorder: Recorder | None) -> Invoke:
    def invoke(*args: str, stdin: str | None = None) -> Result:
        obj = Runtime(environ=env, make_command_sender=recorder.make if recorder else None)
        return CliRunner().invoke(cli, list(args), obj=obj, input=stdin, catch_exceptions=False)

    return invoke


@pytest.fixture
def db(sqlite_engine: Engine) -> Engine:
    seed(sqlite_engine)
    return sqlite_engine


@pytest.fixture
def recorder(db: Engine) -> Recorder:
    return Recorder(db)


@pytest.fixture
def invoke(db: Engine, tmp_path: Path, recorder: Recorder) -> Invoke:
    return make_invoke(environment(db, tmp_path), recorder)


def json_array(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == EXIT_OK, result.output
    value = json.loads(result.stdout)
    assert isinstance(value, list)
    return value


def set_status(engine: Engine, command_id: int, status: str, **fields: Any) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(Command).where(Command.id == command_id).values(status=status, updated_at=NOW_MS, **fields)
        )


# -- members -------------------------------------------------------------------------------


def test_set_role_records_commits_then_enqueues(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    result = invoke("members", "set-role", "--org", "acme", "--user", "user_bob", "--role", "org:admin")
    assert result.exit_code == EXIT_OK, result.output
    [row] = commands_in(db)
    assert (row.kind, row.organization_id, row.user_id, row.role) == (
        CommandKind.SET_ROLE,
        ORG,
        "user_bob",
        "org:admin",
    )
    assert row.requested_by == "cli:tester"
    assert row.status == CommandStatus.PENDING
    assert not row.dry_run
    assert row.idempotency_key
    assert recorder.sent == [[row.id]]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "KIND", "ORGANIZATION"]
    assert lines[1].split()[:6] == [str(row.id), "set_role", ORG, "user_bob", "org:admin", "pending"]
    assert f"enqueued command {row.id}" in result.stderr


def test_json_shape(invoke: Invoke, db: Engine) -> None:
    [item] = json_array(
        invoke("members", "set-role", "--org", ORG, "--user", "user_bob", "--role", "org:admin", "--json")
    )
    [row] = commands_in(db)
    assert item["object"] == "command"
    assert item["id"] == row.id
    assert item["kind"] == "set_role"
    assert item["status"] == "pending"
    assert item["organization_id"] == ORG
    assert item["target"] == "user_bob"
    assert item["user_id"] == "user_bob"
    assert item["role"] == "org:admin"
    assert item["requested_by"] == "cli:tester"
    assert item["dry_run"] is False
    assert isinstance(item["created_at"], int)
    assert {"error_code", "error_message", "attempts", "superseded_by", "applied_at"} <= item.keys()


def test_add_and_remove_member(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    added = json_array(invoke("members", "add", "--org", "acme", "--user", "user_new", "--json"))
    removed = json_array(invoke("members", "remove", "--org", "acme", "--user", "user_bob", "--json"))
    assert [(c["kind"], c["user_id"], c["role"]) for c in added + removed] == [
        (CommandKind.ADD_MEMBER, "user_new", "org:member"),
        (CommandKind.REMOVE_MEMBER, "user_bob", None),
    ]
    assert recorder.sent == [[added[0]["id"]], [removed[0]["id"]]]


def test_unknown_org_is_not_found_and_records_nothing(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    result = invoke("members", "set-role", "--org", "nope", "--user", "user_bob", "--role", "org:admin")
    assert result.exit_code == EXIT_NOT_FOUND
    assert result.stderr.startswith("orgsync: error: no organization with id or slug 'nope'")
    assert "Traceback" not in result.output
    assert commands_in(db) == []
    assert recorder.sent == []


@pytest.mark.parametrize(
    "args",
    [
        ("members", "set-role", "--org", "acme", "--user", "user_alice", "--role", "org:member"),
        ("members", "remove", "--org", "acme", "--user", "user_alice"),
    ],
)
def test_last_admin_is_refused_locally(
    invoke: Invoke, db: Engine, recorder: Recorder, args: tuple[str, ...]
) -> None:
    result = invoke(*args)
    assert result.exit_code == EXIT_FAILED, result.output
    assert result.stderr.startswith("orgsync: error: refused: ")
    assert "Traceback" not in result.output
    assert commands_in(db) == []
    assert recorder.sent == []


def test_validation_errors_are_bad_input(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    no_email = invoke("invitations", "create", "--org", "acme")
    assert no_email.exit_code == EXIT_USAGE
    assert "--email" in no_email.stderr
    bad_email = invoke("invitations", "create", "--org", "acme", "--email", "not-an-address")
    assert bad_email.exit_code == EXIT_USAGE, bad_email.output
    assert bad_email.stderr.startswith("orgsync: error: ")
    assert "Traceback" not in bad_email.output
    assert commands_in(db) == []
    assert recorder.sent == []


def test_dry_run_records_planned_and_sends_nothing(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    [item] = json_array(
        invoke(
            "members",
            "set-role",
            "--org",
            "acme",
            "--user",
            "user_bob",
            "--role",
            "org:admin",
            "--dry-run",
            "--json",
        )
    )
    assert item["status"] == CommandStatus.PLANNED
    assert item["dry_run"] is True
    assert [row.status for row in commands_in(db)] == [CommandStatus.PLANNED]
    assert recorder.sent == []


def test_global_dry_run_setting(db: Engine, tmp_path: Path) -> None:
    recorder = Recorder(db)
    invoke = make_invoke(environment(db, tmp_path, ORGSYNC_DRY_RUN="true"), recorder)
    result = invoke("members", "add", "--org", "acme", "--user", "user_new")
    assert result.exit_code == EXIT_OK, result.output
    assert "nothing sent" in result.stderr
    assert [row.status for row in commands_in(db)] == [CommandStatus.PLANNED]
    assert recorder.sent == []


def test_idempotency_key_returns_the_same_command(invoke: Invoke, db: Engine) -> None:
    args = ("members", "add", "--org", "acme", "--user", "user_new", "--idempotency-key", "k1", "--json")
    first = json_array(invoke(*args))
    again = json_array(invoke(*args))
    assert first[0]["id"] == again[0]["id"]
    assert len(commands_in(db)) == 1


# -- invitations ---------------------------------------------------------------------------


def test_invitations_single_and_bulk(invoke: Invoke, db: Engine, recorder: Recorder, tmp_path: Path) -> None:
    single = json_array(
        invoke("invitations", "create", "--org", "acme", "--email", "new@acme.test", "--json")
    )
    assert [(c["kind"], c["email_address"], c["role"], c["target"]) for c in single] == [
        (CommandKind.INVITE, "new@acme.test", "org:member", "new@acme.test")
    ]
    listing = tmp_path / "emails.txt"
    listing.write_text("# the new team\nann@acme.test\n\nben@acme.test  # lead\nANN@acme.test\n")
    [bulk] = json_array(
        invoke(
            "invitations", "create", "--org", "acme", "--role", "org:admin",
            "--email", "cat@acme.test", "--file", str(listing), "--json",
        )
    )  # fmt: skip
    assert (bulk["kind"], bulk["role"], bulk["status"]) == (CommandKind.BULK_INVITE, "org:admin", "pending")
    assert bulk["payload"]["email_addresses"] == ["cat@acme.test", "ann@acme.test", "ben@acme.test"]
    assert recorder.sent == [[single[0]["id"]], [bulk["id"]]]
    many = "".join(f"p{index}@acme.test\n" for index in range(12))
    batches = json_array(
        invoke("invitations", "create", "--org", "acme", "--file", "-", "--json", stdin=many)
    )
    # Clerk's bulk endpoint takes at most 10 addresses a call.
    assert [len(c["payload"]["email_addresses"]) for c in batches] == [10, 2]
    assert recorder.sent[-1] == [c["id"] for c in batches]


def test_invitations_bad_address_records_nothing(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    result = invoke("invitations", "create", "--org", "acme", "--email", "ok@acme.test", "--email", "nope")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "'nope' is not an email address" in result.stderr
    assert commands_in(db) == []
    assert recorder.sent == []


def test_invitations_revoke(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    rows = json_array(invoke("invitations", "revoke", "--org", "acme", "orginv_dan", "--json"))
    assert [(c["kind"], c["invitation_id"], c["target"]) for c in rows] == [
        (CommandKind.REVOKE_INVITATION, "orginv_dan", "orginv_dan")
    ]
    assert recorder.sent == [[rows[0]["id"]]]


def test_invitations_revoke_as_a_requesting_user(invoke: Invoke, db: Engine, recorder: Recorder) -> None:
    args = ("invitations", "revoke", "--org", "acme", "orginv_dan", "--json")
    [item] = json_array(invoke(*args, "--requesting-user", "user_alice"))
    assert item["payload"] == {"requesting_user_id": "user_alice"}
    assert recorder.sent == [[item["id"]]]
    blank = invoke(*args, "--requesting-user", " ")
    assert blank.exit_code == EXIT_USAGE, blank.output
    assert "payload.requesting_user_id: is required" in blank.stderr
    assert len(commands_in(db)) == 1


# -- the broker, and waiting ---------------------------------------------------------------


def test_broker_down_leaves_the_command_pending(db: Engine, tmp_path: Path) -> None:
    password = "broker-password-xyz"
    env = environment(db, tmp_path, BROKER_URL=f"redis://:{password}@127.0.0.1:{free_port()}/0")
    invoke = make_invoke(env, None)  # the real sender
    result = invoke("members", "add", "--org", "acme", "--user", "user_new")
    assert result.exit_code == EXIT_OK, result.output
    assert "could not enqueue" in result.stderr
    assert "commands retry" in result.stderr
    assert password not in result.output
    assert [row.status for row in commands_in(db)] == [CommandStatus.PENDING]
    waiting = invoke("members", "add", "--org", "acme", "--user", "user_other", "--wait", "5")
    assert waiting.exit_code == EXIT_UNAVAILABLE
    assert "not waiting" in waiting.stderr


def worker_that(status: str, **fields: Any) -> Callable[[Engine, list[int]], None]:
    """Plays the worker: settles each enqueued command at once."""

    def settle(engine: Engine, ids: list[int]) -> None:
        for command_id in ids:
            set_status(engine, command_id, status, **fields)

    return settle


def test_wait_until_applied(db: Engine, tmp_path: Path) -> None:
    invoke = make_invoke(environment(db, tmp_path), Recorder(db, worker_that(CommandStatus.APPLIED)))
    result = invoke(
        "members",
        "set-role",
        "--org",
        "acme",
        "--user",
        "user_bob",
        "--role",
        "org:admin",
        "--wait",
        "--json",
    )
    assert result.exit_code == EXIT_OK, result.output
    assert [item["status"] for item in json.loads(result.stdout)] == [CommandStatus.APPLIED]
    assert "orgsync: waiting" in result.stderr


def test_wait_reports_clerks_error(db: Engine, tmp_path: Path) -> None:
    settle = worker_that(
        CommandStatus.FAILED,
        error_code="organization_minimum_permissions_needed",
        error_message="at least one admin",
    )
    invoke = make_invoke(environment(db, tmp_path), Recorder(db, settle))
    result = invoke(
        "members", "set-role", "--org", "acme", "--user", "user_bob", "--role", "org:admin", "--wait", "10"
    )
    assert result.exit_code == EXIT_FAILED
    assert "failed: organization_minimum_permissions_needed: at least one admin" in result.stderr
    assert "failed" in result.stdout  # the final state is still printed


def test_wait_times_out(invoke: Invoke, db: Engine) -> None:
    result = invoke("members", "add", "--org", "acme", "--user", "user_new", "--wait", "0.2")
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "timed out after 0.2 s" in result.stderr
    assert [row.status for row in commands_in(db)] == [CommandStatus.PENDING]


# -- the outbox ----------------------------------------------------------------------------


@pytest.fixture
def some_commands(invoke: Invoke, db: Engine) -> list[int]:
    for args in (
        ("members", "add", "--org", "acme", "--user", "user_new"),
        ("members", "set-role", "--org", "acme", "--user", "user_bob", "--role", "org:admin"),
        ("members", "add", "--org", "globex", "--user", "user_new"),
    ):
        assert invoke(*args).exit_code == EXIT_OK
    return [row.id for row in commands_in(db)]


def test_commands_list(invoke: Invoke, db: Engine, some_commands: list[int]) -> None:
    first, second, third = some_commands
    set_status(db, second, CommandStatus.FAILED, error_code="resource_not_found")
    everything = json_array(invoke("commands", "list", "--json"))
    assert [c["id"] for c in everything] == [third, second, first]
    assert [c["id"] for c in json_array(invoke("commands", "list", "--org", "acme", "--json"))] == [
        second,
        first,
    ]
    assert [c["id"] for c in json_array(invoke("commands", "list", "--status", "failed", "--json"))] == [
        second
    ]
    assert [c["id"] for c in json_array(invoke("commands", "list", "--limit", "1", "--json"))] == [third]
    table = invoke("commands", "list")
    assert table.exit_code == EXIT_OK
    assert "resource_not_found" in table.stdout
    assert invoke("commands", "list", "--org", "nope").exit_code == EXIT_NOT_FOUND


def test_commands_show_includes_the_api_calls(invoke: Invoke, db: Engine, some_commands: list[int]) -> None:
    command_id = some_commands[1]
    with Session(db) as session, session.begin():
        for status, trace in ((429, "trace-one"), (200, "trace-two")):
            session.add(
                ApiCall(
                    command_id=command_id,
                    purpose="send",
                    method="PATCH",
                    path=f"/organizations/{ORG}/memberships/user_bob",
                    status_code=status,
                    error_code="too_many_requests" if status == 429 else None,
                    clerk_trace_id=trace,
                    retry_after=1.0 if status == 429 else None,
                    duration_ms=42,
                    started_at=NOW_MS,
                )
            )
    shown = invoke("commands", "show", str(command_id), "--json")
    assert shown.exit_code == EXIT_OK, shown.output
    item = json.loads(shown.stdout)
    assert item["id"] == command_id
    assert item["kind"] == "set_role"
    assert [(c["status_code"], c["clerk_trace_id"], c["duration_ms"]) for c in item["api_calls"]] == [
        (429, "trace-one", 42),
        (200, "trace-two", 42),
    ]
    table = invoke("commands", "show", str(command_id))
    assert table.exit_code == EXIT_OK
    assert "API calls (2):" in table.stdout
    assert "trace-two" in table.stdout
    assert "too_many_requests" in table.stdout
    missing = invoke("commands", "show", "99999")
    assert missing.exit_code == EXIT_NOT_FOUND
    assert "99999" in missing.stderr


def test_commands_retry_failed(
    invoke: Invoke, db: Engine, recorder: Recorder, some_commands: list[int]
) -> None:
    command_id = some_commands[1]
    set_status(db, command_id, CommandStatus.FAILED, error_code="resource_not_found", error_message="gone")
    recorder.sent.clear()
    [item] = json_array(invoke("commands", "retry", str(command_id), "--json"))
    assert item["id"] == command_id
    assert item["status"] == CommandStatus.PENDING
    assert recorder.sent == [[command_id]]


def test_commands_retry_pending_enqueues_again_and_waits(db: Engine, tmp_path: Path) -> None:
    recorder = Recorder(db)
    invoke = make_invoke(environment(db, tmp_path), recorder)
    [item] = json_array(invoke("members", "add", "--org", "acme", "--user", "user_new", "--json"))
    recorder.then = worker_that(CommandStatus.APPLIED)
    again = invoke("commands", "retry", str(item["id"]), "--wait", "10")
    assert again.exit_code == EXIT_OK, again.output
    assert recorder.sent == [[item["id"]], [item["id"]]]
    assert [row.status for row in commands_in(db)] == [CommandStatus.APPLIED]


def test_rerun_with_a_key_reports_the_existing_outcome(
    invoke: Invoke, db: Engine, recorder: Recorder
) -> None:
    args = ("members", "add", "--org", "acme", "--user", "user_new", "--idempotency-key", "k2")
    assert invoke(*args).exit_code == EXIT_OK
    [row] = commands_in(db)
    set_status(db, row.id, CommandStatus.FAILED, error_code="resource_not_found", error_message="no user")
    recorder.sent.clear()
    again = invoke(*args, "--wait", "10")
    assert again.exit_code == EXIT_FAILED
    assert "resource_not_found: no user" in again.stderr
    assert recorder.sent == []  # a settled command is not sent again by a re-run


def test_superseded_while_waiting_is_a_failure(db: Engine, tmp_path: Path) -> None:
    recorder = Recorder(db, worker_that(CommandStatus.SUPERSEDED, superseded_by=99))
    invoke = make_invoke(environment(db, tmp_path), recorder)
    result = invoke("members", "add", "--org", "acme", "--user", "user_new", "--wait", "10")
    assert result.exit_code == EXIT_FAILED
    assert "superseded by command 99" in result.stderr


@pytest.mark.parametrize(
    "status",
    [CommandStatus.CONFIRMED, CommandStatus.SUPERSEDED, CommandStatus.PLANNED, CommandStatus.APPLIED],
)
def test_commands_retry_refuses_final_commands(
    invoke: Invoke, db: Engine, recorder: Recorder, some_commands: list[int], status: str
) -> None:
    command_id = some_commands[0]
    set_status(db, command_id, status)
    recorder.sent.clear()
    result = invoke("commands", "retry", str(command_id))
    assert result.exit_code == EXIT_FAILED, result.output
    assert result.stderr.startswith("orgsync: error: ")
    assert status in result.stderr
    assert "Traceback" not in result.output
    assert [row.status for row in commands_in(db) if row.id == command_id] == [status]
    assert recorder.sent == []
    assert invoke("commands", "retry", "99999").exit_code == EXIT_NOT_FOUND


# -- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def pg_db(pg_engine: Engine) -> Iterator[Engine]:
    seed(pg_engine)
    yield pg_engine


def test_on_postgresql(pg_db: Engine, tmp_path: Path) -> None:
    recorder = Recorder(pg_db)
    invoke = make_invoke(environment(pg_db, tmp_path), recorder)
    [item] = json_array(
        invoke("members", "set-role", "--org", "acme", "--user", "user_bob", "--role", "org:admin", "--json")
    )
    assert recorder.sent == [[item["id"]]]
    refused = invoke("members", "remove", "--org", "globex", "--user", "user_zed")
    assert refused.exit_code == EXIT_FAILED
    listed = json_array(invoke("commands", "list", "--org", ORG, "--json"))
    assert [(c["id"], c["status"], c["requested_by"]) for c in listed] == [
        (item["id"], "pending", "cli:tester")
    ]
