"""The ``orgsync`` command line through click's runner: listings, errors, the inbox commands."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import TEST_SIGNING_SECRET, free_port
from granian.constants import Interfaces
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import orgsync.wsgi
from emulator.payloads import (
    OMIT,
    invitation_data,
    membership_data,
    organization_data,
    user_public_data,
    webhook_body,
)
from models.db import make_session_factory, session_scope
from models.events import parse_event
from models.inbox import store_delivery
from models.mirror import apply_events
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus
from orgsync.cli import cli
from orgsync.cli.base import EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, Runtime
from orgsync.cli.processes import WORKER_QUEUES
from orgsync.render import render_table
from orgsync.runner import ChildSpec, Supervisor, child_specs
from orgsync.serve import RequestEnviron, ServeOptions, ThreadAdvice, build_server, server_log_config
from orgsync.wsgi import build_web_app
from worker.app import WORKER_QUEUES as APP_QUEUES

NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000
ORG = "org_2abcACME"
OTHER_ORG = "org_2abcGLOBEX"


# Only the fields these tests read: what a payload leaves out (OMIT) the mirror stores as null.
def organization(org_id: str, slug: str, name: str, at: int) -> dict[str, Any]:
    return organization_data(
        org_id,
        name=name,
        slug=slug,
        image_url=OMIT,
        has_image=False,
        members_count=OMIT,
        missing_member_with_elevated_permissions=OMIT,
        pending_invitations_count=OMIT,
        private_metadata=OMIT,
        created_by=OMIT,
        created_at=at,
    )


def membership(
    member_id: str, user_id: str, email: str, role: str, at: int, *, org_id: str = ORG
) -> dict[str, Any]:
    return membership_data(
        member_id,
        organization(org_id, "acme" if org_id == ORG else "globex", "Acme", NOW_MS - DAY_MS),
        user_id,
        role=role,
        role_name=OMIT,
        permissions=[],
        private_metadata=OMIT,
        public_user_data=user_public_data(
            user_id,
            identifier=email,
            first_name=email.split("@", maxsplit=1)[0].capitalize(),
            last_name=None,
            image_url="https://img.example/x.png",
            profile_image_url=OMIT,
            has_image=False,
        ),
        created_at=at,
    )


def invitation(inv_id: str, email: str, at: int, *, expires_at: int) -> dict[str, Any]:
    return invitation_data(
        inv_id, ORG, email=email, private_metadata=OMIT, url=None, expires_at=expires_at, created_at=at
    )


def history() -> list[tuple[str, dict[str, Any]]]:
    t = NOW_MS - DAY_MS
    return [
        ("organization.created", organization(ORG, "acme", "Acme Corp", t)),
        ("organization.created", organization(OTHER_ORG, "globex", "Globex", t + 1)),
        (
            "organizationMembership.created",
            membership("orgmem_1", "user_alice", "alice@acme.test", "org:admin", t + 10),
        ),
        (
            "organizationMembership.created",
            membership("orgmem_2", "user_bob", "bob@acme.test", "org:member", t + 20),
        ),
        (
            "organizationMembership.created",
            membership("orgmem_3", "user_carol", "carol@acme.test", "org:member", t + 30),
        ),
        (
            "organizationMembership.deleted",
            membership("orgmem_3", "user_carol", "carol@acme.test", "org:member", t + 30),
        ),
        (
            "organizationMembership.created",
            membership("orgmem_9", "user_zed", "zed@globex.test", "org:admin", t + 40, org_id=OTHER_ORG),
        ),
        (
            "organizationInvitation.created",
            invitation("orginv_pending", "dan@acme.test", t + 50, expires_at=NOW_MS + DAY_MS),
        ),
        (
            "organizationInvitation.created",
            invitation("orginv_revoked", "eve@acme.test", t + 60, expires_at=NOW_MS + DAY_MS),
        ),
        (
            "organizationInvitation.revoked",
            invitation("orginv_revoked", "eve@acme.test", t + 61, expires_at=NOW_MS + DAY_MS),
        ),
        (
            "organizationInvitation.created",
            invitation("orginv_old", "fay@acme.test", t - 40 * DAY_MS, expires_at=t - DAY_MS),
        ),
    ]


def seed(engine: Engine) -> None:
    events = [
        parse_event(f"msg_seed_{index}", webhook_body(kind, data, NOW_MS - DAY_MS + index))
        for index, (kind, data) in enumerate(history())
    ]
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, events, now_ms=NOW_MS)


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def environment(database_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    # A hermetic environment: nothing from the caller's shell leaks into the command.
    env = {
        "DATABASE_URL": database_url,
        "BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "ORGSYNC_DATA_DIR": str(tmp_path / "data"),
        "ORGSYNC_LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


Invoke = Callable[..., Result]


@pytest.fixture
def seeded(engine: Engine) -> Engine:
    seed(engine)
    return engine


@pytest.fixture
def sqlite_seeded(sqlite_engine: Engine) -> Engine:
    seed(sqlite_engine)
    return sqlite_engine


def make_invoke(env: dict[str, str], **runtime: Any) -> Invoke:
    def invoke(*args: str) -> Result:
        return CliRunner().invoke(
            cli, list(args), obj=Runtime(environ=env, **runtime), catch_exceptions=False
        )

    return invoke


@pytest.fixture
def invoke(sqlite_seeded: Engine, tmp_path: Path) -> Invoke:
    return make_invoke(environment(url_of(sqlite_seeded), tmp_path))


def json_out(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == EXIT_OK, result.output
    value = json.loads(result.stdout)
    assert isinstance(value, list)
    return value


# -- listings ------------------------------------------------------------------------------


def test_orgs_list_table_and_json(invoke: Invoke) -> None:
    table = invoke("orgs", "list")
    assert table.exit_code == EXIT_OK, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "SLUG", "NAME"]
    assert any("acme" in line and "Acme Corp" in line for line in lines)
    rows = json_out(invoke("orgs", "list", "--json"))
    assert {row["id"]: row["slug"] for row in rows} == {ORG: "acme", OTHER_ORG: "globex"}
    assert all(row.get("object", "organization") == "organization" for row in rows)


@pytest.mark.parametrize("ref", [ORG, "acme"])
def test_members_list_json_has_clerks_shape(seeded: Engine, tmp_path: Path, ref: str) -> None:
    invoke = make_invoke(environment(url_of(seeded), tmp_path))
    rows = json_out(invoke("members", "list", "--org", ref, "--json"))
    assert [row["public_user_data"]["user_id"] for row in rows] == ["user_alice", "user_bob"]
    alice = rows[0]
    assert alice["id"] == "orgmem_1"
    assert alice["role"] == "org:admin"
    assert alice["organization_id"] == ORG
    assert alice["public_user_data"]["identifier"] == "alice@acme.test"
    assert alice["created_at"] == NOW_MS - DAY_MS + 10
    assert alice["updated_at"] == NOW_MS - DAY_MS + 10
    assert invoke("members", "list", "--org", "nope").exit_code == EXIT_NOT_FOUND


def test_members_list_table(invoke: Invoke) -> None:
    result = invoke("members", "list", "--org", "acme")
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("USER ID")
    body = "\n".join(lines[1:])
    assert "alice@acme.test" in body
    assert "bob@acme.test" in body
    assert "carol@acme.test" not in body  # a tombstone never shows
    assert "zed@globex.test" not in body
    assert lines[-1] == "1-2 of 2"
    # Columns line up: every row's second column starts where the heading's does.
    start = lines[0].index("IDENTIFIER")
    assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[1:3])


def test_members_list_role_filter_and_paging(invoke: Invoke) -> None:
    admins = json_out(invoke("members", "list", "--org", "acme", "--role", "org:admin", "--json"))
    empty_role = invoke("members", "list", "--org", "acme", "--role", "")
    assert empty_role.exit_code == EXIT_USAGE
    assert empty_role.stderr.startswith("orgsync: error: role must be")
    assert [row["public_user_data"]["user_id"] for row in admins] == ["user_alice"]
    first = invoke("members", "list", "--org", "acme", "--page-size", "1")
    assert first.stdout.splitlines()[-1] == "1-1 of 2 (next: --page 2)"
    second = json_out(invoke("members", "list", "--org", "acme", "--page", "2", "--page-size", "1", "--json"))
    assert [row["public_user_data"]["user_id"] for row in second] == ["user_bob"]
    beyond = invoke("members", "list", "--org", "acme", "--page", "5", "--page-size", "1")
    assert beyond.exit_code == EXIT_OK
    assert beyond.stdout.splitlines() == ["(none)", "page 5 is past the end: 2 in all"]


def test_invitations_list(invoke: Invoke) -> None:
    rows = json_out(invoke("invitations", "list", "--org", "acme", "--json"))
    statuses = {row["id"]: row["status"] for row in rows}
    assert statuses == {"orginv_pending": "pending", "orginv_revoked": "revoked", "orginv_old": "expired"}
    pending = next(row for row in rows if row["id"] == "orginv_pending")
    assert pending["email_address"] == "dan@acme.test"
    assert pending["role"] == "org:member"
    assert pending["organization_id"] == ORG
    for status, expected in [("pending", ["orginv_pending"]), ("expired", ["orginv_old"]), ("accepted", [])]:
        listed = json_out(invoke("invitations", "list", "--org", ORG, "--status", status, "--json"))
        assert [row["id"] for row in listed] == expected
    table = invoke("invitations", "list", "--org", "acme", "--status", "pending")
    assert table.exit_code == EXIT_OK
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "EMAIL", "ADDRESS"]
    assert "dan@acme.test" in table.stdout


def test_empty_listing_says_so(sqlite_url: str, tmp_path: Path) -> None:
    invoke = make_invoke(environment(sqlite_url, tmp_path))
    assert invoke("orgs", "list").stdout.strip() == "(none)"
    assert json_out(invoke("orgs", "list", "--json")) == []


# -- errors --------------------------------------------------------------------------------


def test_unknown_org(invoke: Invoke) -> None:
    for command in (["members", "list"], ["invitations", "list"]):
        result = invoke(*command, "--org", "nope")
        assert result.exit_code == EXIT_NOT_FOUND
        assert result.stderr.strip() == "orgsync: error: no organization with id or slug 'nope'"
        assert result.stdout == ""


def test_bad_status_is_a_usage_error(invoke: Invoke) -> None:
    result = invoke("invitations", "list", "--org", "acme", "--status", "lost")
    assert result.exit_code == EXIT_USAGE
    assert "'lost' is not one of" in result.stderr
    result = invoke("events", "list", "--status", "lost")
    assert result.exit_code == EXIT_USAGE


@pytest.mark.parametrize("command", ["serve", "run"])
def test_missing_secret_refuses_to_start(sqlite_url: str, tmp_path: Path, command: str) -> None:
    invoke = make_invoke(environment(sqlite_url, tmp_path))
    result = invoke(command, "--port", str(free_port()))
    assert result.exit_code == EXIT_CONFIG
    assert result.stderr.startswith("orgsync: error: CLERK_WEBHOOK_SIGNING_SECRET is not set")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "secret",
    [
        "sk_test_definitelynotawebhooksecret",
        "whsec_!!!not-base64!!!",
        "whsec_c2hvcnQ=",
        f"{TEST_SIGNING_SECRET},whsec_Zm9vYmFy",
    ],
)
def test_malformed_secret_is_named_never_shown(sqlite_url: str, tmp_path: Path, secret: str) -> None:
    invoke = make_invoke(environment(sqlite_url, tmp_path, CLERK_WEBHOOK_SIGNING_SECRET=secret))
    result = invoke("serve", "--port", str(free_port()))
    assert result.exit_code == EXIT_CONFIG
    assert result.stderr.startswith("orgsync: error: CLERK_WEBHOOK_SIGNING_SECRET: entry ")
    for part in secret.split(","):
        assert part not in result.output
        assert part.removeprefix("whsec_") not in result.output


def test_good_secret_never_appears_in_output(invoke: Invoke, sqlite_url: str, tmp_path: Path) -> None:
    env = environment(sqlite_url, tmp_path, CLERK_WEBHOOK_SIGNING_SECRET=TEST_SIGNING_SECRET)
    for args in (["db", "upgrade"], ["orgs", "list"], ["events", "list"], ["--help"]):
        result = make_invoke(env)(*args)
        assert result.exit_code == EXIT_OK, result.output
        assert TEST_SIGNING_SECRET not in result.output
        assert TEST_SIGNING_SECRET.removeprefix("whsec_") not in result.output


def test_other_configuration_errors(sqlite_url: str, tmp_path: Path) -> None:
    for extra in ({"ORGSYNC_LOG_LEVEL": "LOUD"}, {"CLERK_SECRET_KEY": "pk_test_oops"}):
        result = make_invoke(environment(sqlite_url, tmp_path, **extra))("orgs", "list")
        assert result.exit_code == EXIT_CONFIG
        assert result.stderr.startswith("orgsync: error: ")
        assert "pk_test_oops" not in result.output


def test_unmigrated_database_hint(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    invoke = make_invoke(environment(url, tmp_path))
    for args in (
        ["orgs", "list"],
        ["members", "list", "--org", "acme"],
        ["events", "list"],
        ["events", "replay", "1"],
    ):
        result = invoke(*args)
        assert result.exit_code == EXIT_CONFIG, result.output
        assert "run `orgsync db upgrade`" in result.stderr
        assert "Traceback" not in result.output


def test_db_upgrade_then_list(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    invoke = make_invoke(environment(url, tmp_path))
    first = invoke("db", "upgrade")
    assert first.exit_code == EXIT_OK, first.output
    assert "upgraded from empty to revision" in first.stdout
    again = invoke("db", "upgrade")
    assert again.exit_code == EXIT_OK
    assert "is up to date" in again.stdout
    assert invoke("orgs", "list").exit_code == EXIT_OK


def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://orgsync:hunter2-password@127.0.0.1:{free_port()}/orgsync?connect_timeout=2"
    invoke = make_invoke(environment(url, tmp_path))
    for args in (["orgs", "list"], ["db", "upgrade"]):
        result = invoke(*args)
        assert result.exit_code == EXIT_UNAVAILABLE, result.output
        assert result.stderr.startswith("orgsync: error: database unavailable")
        assert "hunter2-password" not in result.output


def test_help_documents_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == EXIT_OK
    for line in (
        "0  success",
        "2  bad usage",
        "3  configuration",
        "4  not found",
        "5  a service is unavailable",
    ):
        assert line in result.stdout
    for command in ("run", "serve", "worker", "beat", "db", "orgs", "members", "invitations", "events"):
        assert f"  {command} " in result.stdout or f"  {command}\n" in result.stdout


def test_python_dash_m_and_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orgsync", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("orgsync, version ")


# -- the inbox -----------------------------------------------------------------------------


def store(engine: Engine, count: int) -> list[str]:
    svix_ids = [f"msg_inbox_{index}" for index in range(count)]
    with session_scope(make_session_factory(engine)) as session:
        for index, svix_id in enumerate(svix_ids):
            body = webhook_body(
                "organization.created", organization(f"org_inbox_{index}", f"s{index}", "X", NOW_MS), NOW_MS
            )
            store_delivery(session, svix_id=svix_id, body=body, received_at=NOW_MS + index)
        store_delivery(session, svix_id="msg_bad", body="not json", received_at=NOW_MS + count)
    return svix_ids


def inbox(engine: Engine) -> dict[str, InboxEvent]:
    with Session(engine) as session:
        return {row.svix_id: row for row in session.scalars(select(InboxEvent))}


def mark(engine: Engine, svix_id: str, status: str, error: str | None, attempts: int) -> None:
    with session_scope(make_session_factory(engine)) as session:
        row = session.scalars(select(InboxEvent).where(InboxEvent.svix_id == svix_id)).one()
        row.status, row.last_error, row.attempts, row.next_attempt_at = status, error, attempts, NOW_MS * 2


def test_events_list(seeded: Engine, tmp_path: Path) -> None:
    store(seeded, 3)
    invoke = make_invoke(environment(url_of(seeded), tmp_path))
    rows = json_out(invoke("events", "list", "--json"))
    assert [row["svix_id"] for row in rows] == ["msg_bad", "msg_inbox_2", "msg_inbox_1", "msg_inbox_0"]
    assert rows[0]["status"] == InboxStatus.REJECTED
    assert rows[0]["last_error"].startswith("not_json")
    assert rows[1]["type"] == "organization.created"
    assert {"id", "attempts", "received_at", "handled_at"} <= set(rows[1])
    limited = json_out(invoke("events", "list", "--limit", "2", "--json"))
    assert len(limited) == 2
    rejected = json_out(invoke("events", "list", "--status", "rejected", "--json"))
    assert [row["svix_id"] for row in rejected] == ["msg_bad"]
    table = invoke("events", "list")
    assert table.exit_code == EXIT_OK
    assert table.stdout.splitlines()[0].split()[:4] == ["ID", "SVIX", "ID", "TYPE"]
    assert "not_json" in table.stdout


def test_events_replay_resets_then_enqueues(sqlite_engine: Engine, tmp_path: Path) -> None:
    store(sqlite_engine, 3)
    mark(sqlite_engine, "msg_inbox_0", InboxStatus.DEAD, "boom", 8)
    mark(sqlite_engine, "msg_inbox_1", InboxStatus.APPLIED, None, 1)
    sent: list[list[int]] = []

    def sender(_settings: Any) -> Callable[[list[int]], None]:
        def send(ids: list[int]) -> None:
            # Enqueued after the commit: the worker must find the rows pending already.
            rows = {row.id: row.status for row in inbox(sqlite_engine).values()}
            assert all(rows[i] == InboxStatus.PENDING for i in ids)
            sent.append(ids)

        return send

    before = inbox(sqlite_engine)
    invoke = make_invoke(environment(url_of(sqlite_engine), tmp_path), make_sender=sender)
    result = invoke("events", "replay", "msg_inbox_0", str(before["msg_inbox_1"].id))
    assert result.exit_code == EXIT_OK, result.output
    ids = [before["msg_inbox_0"].id, before["msg_inbox_1"].id]
    assert sent == [ids]
    assert f"reset 2 event(s) to pending: {ids[0]}, {ids[1]}" in result.stdout
    assert "enqueued 2 event(s)" in result.stdout
    after = inbox(sqlite_engine)
    for svix_id in ("msg_inbox_0", "msg_inbox_1"):
        assert after[svix_id].status == InboxStatus.PENDING
        assert after[svix_id].attempts == 0
        assert after[svix_id].last_error is None
        assert after[svix_id].next_attempt_at is None


def test_events_replay_without_a_broker_keeps_rows_pending(sqlite_engine: Engine, tmp_path: Path) -> None:
    pytest.importorskip("worker.app")
    store(sqlite_engine, 1)
    mark(sqlite_engine, "msg_inbox_0", InboxStatus.DEAD, "boom", 8)
    # The real sender, against a broker port nobody listens on.
    password = "broker-password-xyz"
    env = environment(
        url_of(sqlite_engine), tmp_path, BROKER_URL=f"redis://:{password}@127.0.0.1:{free_port()}/0"
    )
    result = make_invoke(env)("events", "replay", "msg_inbox_0")
    assert result.exit_code == EXIT_OK, result.output
    assert "reset 1 event(s) to pending" in result.stdout
    assert result.stderr.startswith("orgsync: warning: could not enqueue them")
    assert "the sweeper enqueues them" in result.stderr
    assert password not in result.output
    row = inbox(sqlite_engine)["msg_inbox_0"]
    assert (row.status, row.attempts, row.last_error) == (InboxStatus.PENDING, 0, None)


def test_events_replay_unknown_ref_changes_nothing(sqlite_engine: Engine, tmp_path: Path) -> None:
    store(sqlite_engine, 1)
    mark(sqlite_engine, "msg_inbox_0", InboxStatus.DEAD, "boom", 8)
    sent: list[list[int]] = []
    invoke = make_invoke(
        environment(url_of(sqlite_engine), tmp_path), make_sender=lambda _settings: sent.append
    )
    result = invoke("events", "replay", "msg_inbox_0", "msg_missing", "99999")
    assert result.exit_code == EXIT_NOT_FOUND
    assert "msg_missing" in result.stderr
    assert "99999" in result.stderr
    assert sent == []
    assert inbox(sqlite_engine)["msg_inbox_0"].status == InboxStatus.DEAD


def test_events_replay_needs_an_id(invoke: Invoke) -> None:
    assert invoke("events", "replay").exit_code == EXIT_USAGE


# -- the renderer --------------------------------------------------------------------------


def test_render_table_aligns_wide_and_odd_cells() -> None:
    rows = [
        {"a": "東京", "b": {"n": 1}, "c": None, "t_at": 0},
        {"a": "line\nbreak", "b": [1, 2], "c": True, "t_at": None},
    ]
    text = render_table([("name", "a"), ("data", "b"), ("flag", "c"), ("when", "t_at")], rows)
    lines = text.splitlines()
    assert lines[0] == "NAME        DATA      FLAG  WHEN"
    assert lines[1] == '東京        {"n": 1}  -     1970-01-01 00:00:00Z'
    assert lines[2] == "line break  1,2       yes   -"


def test_reading_a_missing_sqlite_file_does_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "orgsync.db"
    result = make_invoke(environment(f"sqlite:///{path}", tmp_path))("orgs", "list")
    assert result.exit_code == EXIT_CONFIG
    assert "run `orgsync db upgrade`" in result.stderr
    assert not path.parent.exists()


# -- process commands, without starting the processes ---------------------------------------


class FakeCelery:
    def __init__(self) -> None:
        self.argv: list[str] = []

    def start(self, argv: list[str]) -> int:
        self.argv = argv
        return 0


WORKER_CASES = {
    # name: (DATABASE_URL or None for the test's SQLite file, BROKER_URL or None, args, expected, unexpected)
    "embedded": (
        None,
        None,
        ["--queue", "apply"],
        [
            "--concurrency=1",
            "--without-mingle",
            "--without-gossip",
            "--queues=orgsync",
            "--hostname=apply@%h",
        ],
        [],
    ),
    "embedded-explicit": (
        None,
        None,
        ["--queue", "clerk", "--concurrency", "3"],
        ["--concurrency=3", "--queues=orgsync.clerk", "--hostname=clerk@%h"],
        ["--concurrency=1"],
    ),
    "sqlite-redis": (
        None,
        "redis://127.0.0.1:6379/0",
        ["--queue", "apply"],
        ["--concurrency=1"],
        ["--without-mingle"],
    ),
    "postgres-redis": (
        "postgresql://orgsync@127.0.0.1:5432/orgsync",
        "redis://127.0.0.1:6379/0",
        ["--queue", "clerk", "-n", "w1@%h"],
        ["--hostname=clerk-w1@%h", "--queues=orgsync.clerk"],
        ["--without-mingle", "--concurrency=1"],
    ),
}


@pytest.mark.parametrize("case", sorted(WORKER_CASES))
def test_worker_arguments(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, tmp_path: Path, case: str
) -> None:
    database, broker, args, expected, unexpected = WORKER_CASES[case]
    fake = FakeCelery()
    monkeypatch.setattr("orgsync.cli.processes.celery_app", lambda _settings: fake)
    env = environment(database or sqlite_url, tmp_path)
    if broker is None:
        del env["BROKER_URL"]
    else:
        env["BROKER_URL"] = broker
    result = make_invoke(env)("worker", *args)
    assert result.exit_code == EXIT_OK, result.output
    assert fake.argv[:2] == ["worker", "--loglevel=WARNING"]
    assert set(expected) <= set(fake.argv)
    assert not set(unexpected) & set(fake.argv)


def test_worker_queue_names_match_the_celery_app() -> None:
    assert WORKER_QUEUES == APP_QUEUES


def test_worker_without_queue_supervises_one_pool_per_queue(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, tmp_path: Path
) -> None:
    started: list[Supervisor] = []

    def fake_run(self: Supervisor, *_: object, **__: object) -> int:
        started.append(self)
        return 0

    monkeypatch.setattr(Supervisor, "run", fake_run)
    result = make_invoke(environment(sqlite_url, tmp_path))("worker", "--concurrency", "2", "-n", "w1@%h")
    assert result.exit_code == EXIT_OK, result.output
    (supervisor,) = started
    # The pools share the supervisor's process group: killing the group stops them all.
    assert supervisor.own_groups is False
    assert [spec.name for spec in supervisor.specs] == ["apply-worker", "clerk-worker"]
    for spec, role in zip(supervisor.specs, ("apply", "clerk"), strict=True):
        assert list(spec.argv[1:]) == [
            "-m", "orgsync", "worker", "--queue", role, "--concurrency", "2", "--hostname", "w1@%h",
        ]  # fmt: skip


def test_run_starts_both_worker_pools() -> None:
    names = [spec.name for spec in child_specs("127.0.0.1", 8000)]
    assert names == ["web", "apply-worker", "clerk-worker", "beat"]


def test_beat_arguments(monkeypatch: pytest.MonkeyPatch, sqlite_url: str, tmp_path: Path) -> None:
    fake = FakeCelery()
    monkeypatch.setattr("orgsync.cli.processes.celery_app", lambda _settings: fake)
    result = make_invoke(environment(sqlite_url, tmp_path))("beat")
    assert result.exit_code == EXIT_OK, result.output
    assert fake.argv == ["beat", "--loglevel=WARNING"]


def test_server_configuration() -> None:
    settings = Settings.from_env(
        {"ORGSYNC_DATA_DIR": "/tmp/x", "CLERK_WEBHOOK_SIGNING_SECRET": TEST_SIGNING_SECRET}
    )
    built: list[Settings] = []

    def factory(given: Settings) -> Any:
        built.append(given)
        return "the app"

    server, loader = build_server(
        settings, ServeOptions(host="::1", port=8123, workers=3, threads=5, access_log=True), factory
    )
    assert (server.bind_addr, server.bind_port) == ("::1", 8123)
    assert server._bind_addr_fmt == "[::1]:8123"
    assert server.interface == Interfaces.WSGI
    assert (server.workers, server.blocking_threads) == (3, 5)
    assert server.respawn_failed_workers is True
    assert server.log_access is True
    # The app is built by the loader, in each worker after the fork, not by the main process.
    assert built == []
    app = loader()
    assert isinstance(app, RequestEnviron)
    assert app.app == "the app"
    assert built == [settings]


def test_granians_thread_advice_is_dropped_and_its_other_lines_kept() -> None:
    advice = ThreadAdvice()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("_granian", logging.WARNING, __file__, 1, message, None, None)

    assert not advice.filter(record("Configuration allows spawning up to 8 Python threads, which seems high"))
    assert advice.filter(record("Unexpected exit from worker-1"))
    config = server_log_config("INFO")
    assert config["loggers"]["_granian"] == {
        "level": "INFO", "propagate": True, "handlers": [], "filters": ["thread_advice"]
    }  # fmt: skip


def test_the_app_sees_the_request_not_the_process_environment() -> None:
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(dict(environ))
        return [b""]

    process = {"CLERK_SECRET_KEY": "sk_test_x", "DATABASE_URL": "postgresql://u:p@h/d", "SERVER_NAME": "box"}
    wrapped = RequestEnviron(app, process)
    # As granian builds it: the process environment, then the request's own variables over it.
    environ = {**process, "REQUEST_METHOD": "GET", "PATH_INFO": "/healthz", "SERVER_NAME": "orgsync.test"}
    environ |= {"HTTP_AUTHORIZATION": "Bearer t", "wsgi.input": None}
    wrapped(environ, None)  # type: ignore[arg-type]
    assert seen == [
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/healthz",
            "SERVER_NAME": "orgsync.test",
            "HTTP_AUTHORIZATION": "Bearer t",
            "wsgi.input": None,
        }
    ]


def test_build_web_app_wires_the_embedded_default(sqlite_url: str, tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": sqlite_url,
            "ORGSYNC_DATA_DIR": str(tmp_path / "data"),
            "CLERK_WEBHOOK_SIGNING_SECRET": TEST_SIGNING_SECRET,
        },
        require_webhook_secret=True,
    )
    app = build_web_app(settings)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_data(as_text=True)
    with pytest.raises(AttributeError):
        _ = orgsync.wsgi.not_there


# -- the supervisor behind `orgsync run`, with stand-in children -----------------------------


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SLEEPER = "import time; time.sleep(120)"


def stubborn(flag: Path) -> list[str]:
    """A child that ignores SIGTERM, and creates ``flag`` once it does."""
    return child(
        "import pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(flag)!r}).touch()\n"
        "time.sleep(120)"
    )


def test_supervisor_stops_the_others_when_one_dies() -> None:
    messages: list[str] = []
    supervisor = Supervisor(
        [ChildSpec("web", child(SLEEPER)), ChildSpec("worker", child("raise SystemExit(7)"))],
        out=messages.append,
    )
    assert supervisor.run() == 1
    assert messages == ["orgsync: error: worker exited with status 7; stopping the others"]
    assert all(c.process.returncode is not None for c in supervisor.children)


def test_supervisor_stops_everything_on_a_signal(tmp_path: Path) -> None:
    flag = tmp_path / "ignoring"
    ready: list[bool] = []
    supervisor = Supervisor([ChildSpec("web", child(SLEEPER)), ChildSpec("beat", stubborn(flag))])
    supervisor.stop_timeout = 0.5  # the stubborn child ignores SIGTERM: it is killed after this

    def stop_once_started() -> bool:
        if flag.exists():
            supervisor.request_stop(signal.SIGTERM)
        return False

    assert supervisor.run(ready=stop_once_started, on_ready=lambda: ready.append(True)) == 0
    assert ready == []  # stopped before it was ready: nothing claims to listen
    assert supervisor.stop_reason == "SIGTERM"
    codes = {c.name: c.process.returncode for c in supervisor.children}
    assert codes == {"web": -signal.SIGTERM, "beat": -signal.SIGKILL}


def test_a_second_signal_kills_at_once(tmp_path: Path) -> None:
    flag = tmp_path / "ignoring"
    supervisor = Supervisor([ChildSpec("beat", stubborn(flag))], stop_timeout=3600)
    supervisor.start()
    supervisor.wait(until=flag.exists)
    supervisor.request_stop(signal.SIGINT)
    supervisor.request_stop(signal.SIGINT)
    supervisor.stop()
    assert supervisor.stop_reason == "SIGINT"
    assert supervisor.children[0].process.returncode == -signal.SIGKILL


def test_members_list_filters_and_a_users_memberships(invoke: Invoke) -> None:
    found = json_out(invoke("members", "list", "--org", "acme", "--query", "bob", "--json"))
    assert [row["public_user_data"]["user_id"] for row in found] == ["user_bob"]
    newest = json_out(invoke("members", "list", "--org", "acme", "--order-by", "-created_at", "--json"))
    assert [row["public_user_data"]["user_id"] for row in newest] == ["user_bob", "user_alice"]
    zeds = json_out(invoke("members", "list", "--user", "user_zed", "--json"))
    assert [row["organization_id"] for row in zeds] == [OTHER_ORG]
    table = invoke("members", "list", "--user", "user_zed")
    assert table.stdout.splitlines()[0].startswith("ORGANIZATION")
    everyone = json_out(invoke("members", "list", "--role", "org:admin", "--role", "org:member", "--json"))
    assert {row["public_user_data"]["user_id"] for row in everyone} == {"user_alice", "user_bob", "user_zed"}
    assert json_out(invoke("members", "list", "--org", "acme", "--user", "user_zed", "--json")) == []
    unknown = invoke("members", "list", "--user", "user_nobody")
    assert unknown.exit_code == EXIT_NOT_FOUND
    assert unknown.stderr.strip() == "orgsync: error: no user 'user_nobody' in the mirror"
    bad = invoke("members", "list", "--org", "acme", "--order-by", "shoe_size")
    assert bad.exit_code == EXIT_USAGE
    assert "order_by must be one of" in bad.stderr


def test_invitations_list_filters(invoke: Invoke) -> None:
    found = json_out(invoke("invitations", "list", "--org", "acme", "--query", "dan", "--json"))
    assert {row["id"] for row in found} >= {"orginv_pending"}
    assert all("dan" in row["email_address"] for row in found)
    oldest_first = json_out(
        invoke("invitations", "list", "--org", "acme", "--order-by", "created_at", "--json")
    )
    newest_first = json_out(invoke("invitations", "list", "--org", "acme", "--json"))
    assert [row["id"] for row in oldest_first] == [row["id"] for row in reversed(newest_first)]
    everywhere = invoke("invitations", "list", "--status", "pending")
    assert everywhere.exit_code == EXIT_OK
    assert everywhere.stdout.splitlines()[0].split()[:2] == ["ID", "ORGANIZATION"]
    assert invoke("invitations", "list", "--user", "user_nobody").exit_code == EXIT_NOT_FOUND
