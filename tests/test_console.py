"""The web console at /console: pages, paging and filters, sign-in, CSRF, permissions, commands.

Flask's test client over the real app (``orgsync.web.create_app``) on SQLite and PostgreSQL;
commands go through the real submission path, with the sender recording what it is handed.
A member's sign-in is the console's own signed session naming the Clerk user (what verifying
a session token produces), so these tests are about what a signed-in member may do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import assert_no_secrets, wait_until
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_cli_commands import DAY_MS, NOW_MS, ORG, OTHER_ORG, membership, seed

from console import auth
from emulator.payloads import invitation_data, webhook_body
from emulator.sessions import SessionIssuer
from models.db import make_session_factory, session_scope
from models.errors import ConfigError
from models.events import parse_event
from models.mirror import apply_events
from models.settings import Settings
from models.tables import Command, CommandKind, CommandStatus, InboxEvent, InboxStatus, Notification
from orgsync.web import create_app, get_state

ADMIN_TOKEN = "console-admin-token-0123456789abcdef"
OTHER_ADMIN_TOKEN = "console-other-admin-token-fedcba9876"
SECRET_KEY = "console-secret-key-0123456789abcdef0123456789"
EXTRA_MEMBERS = 60


class Recorder:
    """A sender that remembers what it was handed."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def __call__(self, ids: list[Any]) -> None:
        self.calls.append(list(ids))

    @property
    def flat(self) -> list[Any]:
        return [item for call in self.calls for item in call]


def make_settings(tmp_path: Path, engine: Engine) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",),
        admin_tokens=(OTHER_ADMIN_TOKEN, ADMIN_TOKEN),
        secret_key=SECRET_KEY,
    )


def seed_members(engine: Engine, count: int) -> None:
    """``count`` more members of acme, every third an admin, joined one millisecond apart."""
    base = NOW_MS - DAY_MS + 1000
    events = [
        parse_event(
            f"msg_console_{index}",
            webhook_body(
                "organizationMembership.created",
                membership(
                    f"orgmem_c{index:04d}",
                    f"user_c{index:04d}",
                    "org:admin" if index % 3 == 0 else "org:member",
                    base + index,
                ),
                base + index,
            ),
        )
        for index in range(count)
    ]
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, events, now_ms=NOW_MS)


@pytest.fixture
def commands_sent() -> Recorder:
    return Recorder()


@pytest.fixture
def events_sent() -> Recorder:
    return Recorder()


@pytest.fixture
def reconciles_sent() -> Recorder:
    return Recorder()


@pytest.fixture
def app(
    tmp_path: Path,
    engine: Engine,
    commands_sent: Recorder,
    events_sent: Recorder,
    reconciles_sent: Recorder,
) -> Iterator[Flask]:
    seed(engine)
    app = create_app(
        make_settings(tmp_path, engine),
        engine=engine,
        send=events_sent,
        command_send=commands_sent,
        reconcile_send=reconciles_sent,
    )
    yield app
    get_state(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf_of(client: FlaskClient) -> str:
    with client.session_transaction("/console/") as session:
        token = session.get(auth.CSRF_FIELD)
    assert isinstance(token, str)
    return token


def login(client: FlaskClient, token: str = ADMIN_TOKEN) -> None:
    page = client.get("/console/login")
    assert page.status_code == 200
    response = client.post("/console/login", data={"token": token, "csrf_token": csrf_of(client)})
    assert response.status_code == 303, response.get_data(as_text=True)


def as_member(client: FlaskClient, user_id: str) -> None:
    """The session a verified Clerk session token for ``user_id`` leaves behind."""
    with client.session_transaction("/console/") as session:
        session.clear()
        session[auth.CSRF_FIELD] = "member-csrf-token"
        session["kind"] = auth.MEMBER
        session["user_id"] = user_id
        session["expires"] = NOW_MS // 1000 + 3600


def post(client: FlaskClient, path: str, data: dict[str, str] | None = None, *, htmx: bool = True) -> Any:
    headers = {"HX-Request": "true"} if htmx else {}
    return client.post(path, data={**(data or {}), "csrf_token": csrf_of(client)}, headers=headers)


def page(client: FlaskClient, path: str, expect: int = 200, **query: Any) -> str:
    response = client.get(path, query_string=query or None)
    assert response.status_code == expect, response.get_data(as_text=True)[:2000]
    text = response.get_data(as_text=True)
    assert_no_secrets(text, ADMIN_TOKEN, OTHER_ADMIN_TOKEN, SECRET_KEY)
    return text


def commands_in(engine: Engine) -> list[Command]:
    with Session(engine) as session:
        return list(session.scalars(select(Command).order_by(Command.id)))


def rows(html: str, cls: str) -> list[str]:
    table = html.split(f'<table class="{cls}">', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<tr data-user="([^"]+)"', table)


# ------------------------------------------------------------------ pages
def test_every_page_renders_for_an_operator(client: FlaskClient, engine: Engine) -> None:
    login(client)
    orgs = page(client, "/console/organizations")
    assert "Acme" in orgs and "Globex" in orgs
    # acme: 2 members and 1 pending invitation of 10 seats.
    assert re.search(r">2</td>\s*<td class=\"num\">1</td>\s*<td class=\"num\">7</td>", orgs)
    members = page(client, f"/console/organizations/{ORG}/members")
    assert rows(members, "members") == ["user_bob", "user_alice"]
    assert "Change role" in members and "Remove" in members
    assert 'href="/console/users/user_bob"' in members
    by_slug = page(client, "/console/organizations/acme/members")
    assert rows(by_slug, "members") == ["user_bob", "user_alice"]
    invitations = page(client, f"/console/organizations/{ORG}/invitations")
    assert "dan@acme.test" in invitations and "Revoke" in invitations
    page(client, f"/console/organizations/{ORG}/invitations", closed=1)
    user = page(client, "/console/users/user_alice")
    assert "Acme" in user
    health = page(client, "/console/health")
    assert "Dead events" in health and "Reconcile now" in health
    assert client.get("/console/").status_code == 302
    with client.get("/console/static/console.css") as css:
        assert css.status_code == 200
    with client.get("/console/static/htmx.min.js") as script:
        assert script.status_code == 200 and b"htmx" in script.data


def test_pages_are_never_cached_or_framed(client: FlaskClient) -> None:
    login(client)
    response = client.get("/console/organizations")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_unknown_organization_and_bad_paging_get_a_clear_answer(client: FlaskClient) -> None:
    login(client)
    assert "no organization" in page(client, "/console/organizations/nowhere/members", 404)
    assert "page_size must be one of" in page(client, "/console/organizations", 400, page_size=7)
    assert "page must be a whole number" in page(client, "/console/organizations", 400, page="x")


def test_members_page_through_filter_and_search(client: FlaskClient, engine: Engine) -> None:
    seed_members(engine, EXTRA_MEMBERS)
    login(client)
    path = f"/console/organizations/{ORG}/members"
    total = EXTRA_MEMBERS + 2
    first = page(client, path, page_size=25)
    assert len(rows(first, "members")) == 25
    assert f"{total} in all; page 1 of 3" in first
    last = page(client, path, page_size=25, page=3)
    assert len(rows(last, "members")) == total - 50
    # Newest first: page 1 starts with the last one to join.
    assert rows(first, "members")[0] == f"user_c{EXTRA_MEMBERS - 1:04d}"
    seen = [
        user
        for number in (1, 2, 3)
        for user in rows(page(client, path, page_size=25, page=number), "members")
    ]
    assert len(seen) == len(set(seen)) == total
    admins = page(client, path, role="org:admin", page_size=100)
    assert set(rows(admins, "members")) == {"user_alice"} | {
        f"user_c{index:04d}" for index in range(EXTRA_MEMBERS) if index % 3 == 0
    }
    found = page(client, path, q="c0007")
    assert rows(found, "members") == ["user_c0007"]
    # The next link keeps the filters.
    assert "page=2&amp;page_size=10&amp;role=org:admin" in page(client, path, role="org:admin", page_size=10)
    orgs = page(client, "/console/organizations", q="glob")
    assert "Globex" in orgs and "Acme" not in orgs


# ---------------------------------------------------------------- sign-in
def test_signed_out_visitors_are_sent_to_the_login_page(client: FlaskClient) -> None:
    response = client.get("/console/organizations")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/console/login")
    assert client.post(f"/console/organizations/{ORG}/members/user_bob/remove").status_code == 401
    assert client.get("/console/health", headers={"HX-Request": "true"}).status_code == 401


def test_operator_login_and_logout(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client.get("/console/login")
    wrong = client.post(
        "/console/login", data={"token": "not-a-token-at-all!!", "csrf_token": csrf_of(client)}
    )
    assert wrong.status_code == 401
    assert "not one of ORGSYNC_ADMIN_TOKENS" in wrong.get_data(as_text=True)
    login(client, ADMIN_TOKEN)
    assert "Signed in as operator 2" in page(client, "/console/organizations")
    response = client.post("/console/logout", data={"csrf_token": csrf_of(client)})
    assert response.status_code == 303
    assert client.get("/console/organizations").status_code == 302
    assert_no_secrets(caplog.text, ADMIN_TOKEN, OTHER_ADMIN_TOKEN, SECRET_KEY)


def test_login_redirects_only_inside_the_console(client: FlaskClient) -> None:
    client.get("/console/login")
    token = csrf_of(client)
    inside = client.post(
        "/console/login?next=/console/health", data={"token": ADMIN_TOKEN, "csrf_token": token}
    )
    assert inside.headers["Location"] == "/console/health"
    client.get("/console/login")
    outside = client.post(
        "/console/login?next=//evil.example/", data={"token": ADMIN_TOKEN, "csrf_token": csrf_of(client)}
    )
    assert outside.headers["Location"] == "/console/"


def test_session_cookie_flags(client: FlaskClient, app: Flask) -> None:
    login(client)
    cookie = client.get_cookie(auth.COOKIE_NAME, path="/console")
    assert cookie is not None
    assert cookie.http_only and cookie.same_site == "Lax" and not cookie.secure
    secure = app.test_client()
    secure.get("/console/login", base_url="https://console.example")
    with secure.session_transaction("/console/", base_url="https://console.example") as session:
        token = session[auth.CSRF_FIELD]
    response = secure.post(
        "/console/login", data={"token": ADMIN_TOKEN, "csrf_token": token}, base_url="https://console.example"
    )
    header = response.headers["Set-Cookie"]
    assert "Secure" in header and "HttpOnly" in header and "SameSite=Lax" in header
    assert ADMIN_TOKEN not in header


def forms(client: FlaskClient, engine: Engine) -> list[str]:
    """Every form's address, with a real target."""
    with Session(engine) as session:
        dead = InboxEvent(
            svix_id="msg_console_dead",
            event_type="organization.updated",
            status=InboxStatus.DEAD,
            attempts=8,
            last_error="boom",
            body="{}",
            received_at=NOW_MS,
        )
        session.add(dead)
        session.commit()
        dead_id = dead.id
    return [
        f"/console/organizations/{ORG}/members/user_bob/role",
        f"/console/organizations/{ORG}/members/user_bob/remove",
        f"/console/organizations/{ORG}/invitations",
        f"/console/organizations/{ORG}/invitations/orginv_dan/revoke",
        f"/console/health/events/{dead_id}/replay",
        "/console/reconcile",
        "/console/logout",
    ]


def test_every_form_refuses_a_missing_or_wrong_csrf_token(
    client: FlaskClient, engine: Engine, commands_sent: Recorder
) -> None:
    login(client)
    data = {"role": "org:admin", "emails": "x@acme.test", "organization": ORG}
    for path in forms(client, engine):
        missing = client.post(path, data=data)
        assert missing.status_code == 400, path
        assert "no CSRF token" in missing.get_data(as_text=True)
        wrong = client.post(path, data={**data, "csrf_token": "forged"})
        assert wrong.status_code == 403, path
        assert "does not match" in wrong.get_data(as_text=True)
        header = client.post(path, data=data, headers={"X-CSRF-Token": "forged"})
        assert header.status_code == 403, path
    fresh = client.application.test_client()
    fresh.get("/console/login")
    assert fresh.post("/console/login", data={"token": ADMIN_TOKEN}).status_code == 400
    assert fresh.post("/console/login", data={"token": ADMIN_TOKEN, "csrf_token": "x"}).status_code == 403
    assert commands_in(engine) == [] and commands_sent.calls == []


# --------------------------------------------------------------- commands
def test_role_change_goes_through_the_command_path_and_shows_progress(
    client: FlaskClient, engine: Engine, commands_sent: Recorder
) -> None:
    login(client)
    response = post(client, f"/console/organizations/{ORG}/members/user_bob/role", {"role": "org:admin"})
    assert response.status_code == 202
    [command] = commands_in(engine)
    assert (command.kind, command.user_id, command.role) == (CommandKind.SET_ROLE, "user_bob", "org:admin")
    assert command.requested_by == "console:operator-2"
    assert commands_sent.flat == [command.id]
    fragment = response.get_data(as_text=True)
    assert 'data-status="pending"' in fragment and f'hx-get="/console/commands/{command.id}"' in fragment
    # The workers move it on; the polled fragment follows, and stops polling once settled.
    with session_scope(make_session_factory(engine)) as session:
        row = session.get(Command, command.id)
        assert row is not None
        row.status = CommandStatus.FAILED
        row.error_code = "not_a_member_in_organization"
        row.error_message = "the user is not a member"
    polled = page(client, f"/console/commands/{command.id}")
    assert 'data-status="failed"' in polled and "not_a_member_in_organization" in polled
    assert "hx-get" not in polled
    with session_scope(make_session_factory(engine)) as session:
        row = session.get(Command, command.id)
        assert row is not None
        row.status = CommandStatus.CONFIRMED
    assert 'data-status="confirmed"' in page(client, f"/console/commands/{command.id}")


def test_role_change_without_javascript_redirects_with_the_progress(
    client: FlaskClient, engine: Engine
) -> None:
    login(client)
    response = post(
        client, f"/console/organizations/{ORG}/members/user_bob/role", {"role": "org:admin"}, htmx=False
    )
    assert response.status_code == 303
    [command] = commands_in(engine)
    assert response.headers["Location"] == f"/console/organizations/{ORG}/members?command={command.id}"
    shown = page(client, response.headers["Location"])
    assert f'id="command-{command.id}"' in shown and f"Command {command.id} recorded" in shown


def test_a_role_the_organization_cannot_assign_is_refused(client: FlaskClient, engine: Engine) -> None:
    login(client)
    response = post(client, f"/console/organizations/{ORG}/members/user_bob/role", {"role": "org:owner"})
    assert response.status_code == 422
    assert "not one this organization may assign" in response.get_data(as_text=True)
    assert commands_in(engine) == []


def test_demoting_the_last_admin_is_refused_with_the_explanation(client: FlaskClient, engine: Engine) -> None:
    login(client)
    response = post(client, f"/console/organizations/{ORG}/members/user_alice/role", {"role": "org:member"})
    assert response.status_code == 409
    text = response.get_data(as_text=True)
    assert "the organization would have no admin" in text
    assert "user_alice is the last member of this organization" in text
    assert "Give another member an admin role first" in text
    removal = post(client, f"/console/organizations/{ORG}/members/user_alice/remove")
    assert removal.status_code == 409 and "if they were removed" in removal.get_data(as_text=True)
    plain = post(
        client, f"/console/organizations/{ORG}/members/user_alice/role", {"role": "org:member"}, htmx=False
    )
    assert plain.status_code == 303
    assert "the organization would have no admin" in page(client, plain.headers["Location"])
    assert commands_in(engine) == []


def test_remove_invite_and_revoke(client: FlaskClient, engine: Engine, commands_sent: Recorder) -> None:
    login(client)
    assert post(client, f"/console/organizations/{ORG}/members/user_bob/remove").status_code == 202
    one = post(
        client, f"/console/organizations/{ORG}/invitations", {"emails": "ann@acme.test", "role": "org:member"}
    )
    assert one.status_code == 202
    many = post(
        client,
        f"/console/organizations/{ORG}/invitations",
        {"emails": "ben@acme.test, cy@acme.test\ndee@acme.test; BEN@acme.test", "role": "org:admin"},
    )
    assert many.status_code == 202
    assert post(client, f"/console/organizations/{ORG}/invitations/orginv_dan/revoke").status_code == 202
    remove, invite, bulk, revoke = commands_in(engine)
    assert (remove.kind, remove.user_id) == (CommandKind.REMOVE_MEMBER, "user_bob")
    assert (invite.kind, invite.email_address, invite.role) == (
        CommandKind.INVITE,
        "ann@acme.test",
        "org:member",
    )
    assert bulk.kind == CommandKind.BULK_INVITE and bulk.role == "org:admin"
    assert bulk.payload == {"email_addresses": ["ben@acme.test", "cy@acme.test", "dee@acme.test"]}
    assert (revoke.kind, revoke.invitation_id, revoke.payload) == (
        CommandKind.REVOKE_INVITATION,
        "orginv_dan",
        None,
    )
    assert commands_sent.flat == [remove.id, invite.id, bulk.id, revoke.id]
    bad = post(
        client,
        f"/console/organizations/{ORG}/invitations",
        {"emails": "not-an-address", "role": "org:member"},
    )
    assert bad.status_code == 422 and "is not an email address" in bad.get_data(as_text=True)
    empty = post(client, f"/console/organizations/{ORG}/invitations", {"emails": " ", "role": "org:member"})
    assert empty.status_code == 422


# ------------------------------------------------------------------ health
def test_replay_a_dead_event_from_the_health_page(
    client: FlaskClient, engine: Engine, events_sent: Recorder
) -> None:
    login(client)
    paths = forms(client, engine)
    replay = next(path for path in paths if path.endswith("/replay"))
    event_id = int(replay.split("/")[-2])
    assert "msg_console_dead" in page(client, "/console/health")
    response = post(client, replay, htmx=False)
    assert response.status_code == 303 and response.headers["Location"] == "/console/health"
    with Session(engine) as session:
        row = session.get(InboxEvent, event_id)
        assert row is not None and row.status == InboxStatus.PENDING and row.attempts == 0
    wait_until("the replayed event to be enqueued", lambda: events_sent.flat == [event_id] or None)
    shown = page(client, "/console/health")
    assert f"Event {event_id} is pending again" in shown and "No dead event." in shown
    missing = post(client, "/console/health/events/999999/replay", htmx=False)
    assert "Not replayed: unknown inbox events: 999999" in page(client, missing.headers["Location"])


def test_reconcile_one_organization_now(client: FlaskClient, reconciles_sent: Recorder) -> None:
    login(client)
    response = post(client, "/console/reconcile", {"organization": "acme"}, htmx=False)
    assert response.status_code == 303
    assert reconciles_sent.calls == [[ORG]]
    assert f"Reconciliation of {ORG} queued" in page(client, "/console/health")
    back = post(
        client,
        "/console/reconcile",
        {"organization": ORG, "back": f"/console/organizations/{ORG}/members"},
        htmx=False,
    )
    assert back.headers["Location"] == f"/console/organizations/{ORG}/members"
    unknown = post(client, "/console/reconcile", {"organization": "no-such-slug"}, htmx=False)
    assert unknown.status_code == 404


# ----------------------------------------------------------------- members
def test_a_member_without_the_manage_permission_sees_no_actions(client: FlaskClient, engine: Engine) -> None:
    as_member(client, "user_bob")
    members = page(client, f"/console/organizations/{ORG}/members")
    assert rows(members, "members") == ["user_bob", "user_alice"]
    assert "Change role" not in members and "Remove" not in members
    assert "does not grant org:sys_memberships:manage" in members
    invitations = page(client, f"/console/organizations/{ORG}/invitations")
    assert "Revoke" not in invitations and "Send invitations" not in invitations
    for path, data in (
        (f"/console/organizations/{ORG}/members/user_alice/role", {"role": "org:member"}),
        (f"/console/organizations/{ORG}/members/user_alice/remove", {}),
        (f"/console/organizations/{ORG}/invitations", {"emails": "x@acme.test", "role": "org:member"}),
        (f"/console/organizations/{ORG}/invitations/orginv_dan/revoke", {}),
    ):
        forged = post(client, path, data)
        assert forged.status_code == 403, path
        assert "does not grant org:sys_memberships:manage" in forged.get_data(as_text=True)
    assert commands_in(engine) == []
    assert page(client, "/console/health", 403)
    assert page(client, "/console/users/user_alice", 403)
    assert post(client, "/console/reconcile", {"organization": ORG}).status_code == 403


def test_an_admin_member_manages_only_their_own_organizations(client: FlaskClient, engine: Engine) -> None:
    as_member(client, "user_alice")
    orgs = page(client, "/console/organizations")
    assert "Acme" in orgs and "Globex" not in orgs and "org:admin" in orgs
    assert "Change role" in page(client, f"/console/organizations/{ORG}/members")
    assert page(client, f"/console/organizations/{OTHER_ORG}/members", 403)
    assert page(client, "/console/organizations/globex/invitations", 403)
    refused = post(client, f"/console/organizations/{OTHER_ORG}/members/user_zed/remove")
    assert refused.status_code == 403 and "not a member of this organization" in refused.get_data(
        as_text=True
    )
    assert commands_in(engine) == []
    response = post(client, f"/console/organizations/{ORG}/members/user_bob/role", {"role": "org:admin"})
    assert response.status_code == 202
    invite = post(
        client, f"/console/organizations/{ORG}/invitations", {"emails": "eve@acme.test", "role": "org:member"}
    )
    assert invite.status_code == 202
    revoke = post(client, f"/console/organizations/{ORG}/invitations/orginv_dan/revoke")
    assert revoke.status_code == 202
    role, invitation, revocation = commands_in(engine)
    assert {role.requested_by, invitation.requested_by, revocation.requested_by} == {"console:user_alice"}
    assert invitation.payload == {"inviter_user_id": "user_alice"}
    assert revocation.payload == {"requesting_user_id": "user_alice"}
    assert 'data-status="pending"' in page(client, f"/console/commands/{role.id}")
    # The progress of another organization's command is not another organization's admin's to see.
    as_member(client, "user_zed")
    assert page(client, f"/console/commands/{role.id}", 403)


def test_a_member_sees_their_own_organizations_and_invitations(client: FlaskClient) -> None:
    as_member(client, "user_bob")
    assert client.get("/console/").headers["Location"] == "/console/users/user_bob"
    mine = page(client, "/console/users/user_bob")
    assert "Acme" in mine and "Globex" not in mine
    assert "Sync health" not in mine


def test_an_expired_console_session_signs_out(client: FlaskClient) -> None:
    as_member(client, "user_bob")
    with client.session_transaction("/console/") as session:
        session["expires"] = 1
    assert client.get("/console/organizations").status_code == 302


def test_no_secret_in_any_page_or_log(
    client: FlaskClient, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    login(client)
    for path in (
        "/console/organizations",
        f"/console/organizations/{ORG}/members",
        f"/console/organizations/{ORG}/invitations?closed=1",
        "/console/users/user_alice",
        "/console/health",
    ):
        page(client, path)
    post(client, f"/console/organizations/{ORG}/members/user_bob/role", {"role": "org:admin"})
    post(client, "/console/reconcile", {"organization": ORG})
    client.post("/console/logout", data={"csrf_token": csrf_of(client)})
    assert_no_secrets(caplog.text, ADMIN_TOKEN, OTHER_ADMIN_TOKEN, SECRET_KEY)


# ------------------------------------------------- members' Clerk sessions
@pytest.fixture(scope="module")
def issuer() -> SessionIssuer:
    return SessionIssuer.generate()


@pytest.fixture
def member_client(tmp_path: Path, sqlite_engine: Engine, issuer: SessionIssuer) -> Iterator[FlaskClient]:
    seed(sqlite_engine)
    settings = replace(make_settings(tmp_path, sqlite_engine), clerk_jwt_key=issuer.public_pem())
    app = create_app(settings, engine=sqlite_engine, command_send=Recorder())
    yield app.test_client()
    get_state(app).close()


def test_a_member_signs_in_with_a_clerk_session_token(
    member_client: FlaskClient, issuer: SessionIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = issuer.mint("user_alice")
    login_page = page(member_client, "/console/login")
    assert "Clerk session token" in login_page and "Admin token" in login_page
    response = member_client.post(
        "/console/login", data={"session_token": token, "csrf_token": csrf_of(member_client)}
    )
    assert response.status_code == 303
    orgs = page(member_client, "/console/organizations")
    assert "Signed in as user_alice" in orgs and "Acme" in orgs and "Globex" not in orgs
    assert token not in orgs
    wrong = issuer.mint("user_alice", lifetime=-60)
    member_client.post("/console/logout", data={"csrf_token": csrf_of(member_client)})
    member_client.get("/console/login")
    refused = member_client.post(
        "/console/login", data={"session_token": wrong, "csrf_token": csrf_of(member_client)}
    )
    assert refused.status_code == 401 and "does not verify" in refused.get_data(as_text=True)
    assert_no_secrets(caplog.text, token, wrong, ADMIN_TOKEN, SECRET_KEY)


def test_the_session_cookie_of_the_application_signs_a_member_in(
    member_client: FlaskClient, issuer: SessionIssuer
) -> None:
    member_client.set_cookie(auth.CLERK_SESSION_COOKIE, issuer.mint("user_bob"))
    mine = page(member_client, "/console/organizations")
    assert "Signed in as user_bob" in mine
    # A fresher token of another user wins over the console session of the first.
    member_client.set_cookie(auth.CLERK_SESSION_COOKIE, issuer.mint("user_zed"))
    assert "Signed in as user_zed" in page(member_client, "/console/organizations")
    member_client.set_cookie(auth.CLERK_SESSION_COOKIE, "not.a.token")
    assert "Signed in as user_zed" in page(member_client, "/console/organizations")


def test_a_bearer_session_token_signs_a_member_in(member_client: FlaskClient, issuer: SessionIssuer) -> None:
    token = issuer.mint("user_bob")
    response = member_client.get("/console/organizations", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and "Signed in as user_bob" in response.get_data(as_text=True)
    forged = issuer.mint("user_bob")[:-4] + "AAAA"
    fresh = member_client.application.test_client()
    assert (
        fresh.get("/console/organizations", headers={"Authorization": f"Bearer {forged}"}).status_code == 302
    )


def test_console_settings_are_checked_at_start_up() -> None:
    with pytest.raises(ConfigError, match="ORGSYNC_SECRET_KEY is shorter than 32") as short:
        Settings.from_env({"ORGSYNC_SECRET_KEY": "short-secret-value"})
    assert "short-secret-value" not in str(short.value)
    with pytest.raises(ConfigError, match="ORGSYNC_ADMIN_TOKENS: entry 2 of 2 is shorter"):
        Settings.from_env({"ORGSYNC_ADMIN_TOKENS": f"{ADMIN_TOKEN} tiny"})
    pem = SessionIssuer.generate().public_pem()
    web = {
        "CLERK_JWT_KEY": pem,
        "CLERK_WEBHOOK_SIGNING_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    with pytest.raises(ConfigError, match="ORGSYNC_SECRET_KEY is required when CLERK_JWT_KEY"):
        Settings.from_env(web, require_webhook_secret=True)
    # A worker or the command line signs no cookie; a web app built anyway refuses to start.
    without_key = Settings.from_env(web)
    with pytest.raises(ConfigError, match="ORGSYNC_SECRET_KEY is required"):
        auth.session_secret(without_key)
    settings = Settings.from_env(
        {"CLERK_JWT_KEY": pem, "ORGSYNC_SECRET_KEY": SECRET_KEY, "CLERK_SECRET_KEY": "sk_test_backend"}
    )
    # Two keys of different purposes, never mixed up.
    assert (settings.secret_key, settings.clerk_secret_key) == (SECRET_KEY, "sk_test_backend")
    assert auth.console_enabled(settings) and auth.session_secret(settings) == SECRET_KEY.encode()
    derived = Settings.from_env({"ORGSYNC_ADMIN_TOKENS": ADMIN_TOKEN})
    assert auth.console_enabled(derived)
    assert ADMIN_TOKEN.encode() not in auth.session_secret(derived)
    assert not auth.console_enabled(Settings.from_env({}))
    assert ADMIN_TOKEN not in repr(derived) and SECRET_KEY not in repr(settings)


def test_the_health_page_shows_the_notification_backlog_by_state(client: FlaskClient, engine: Engine) -> None:
    login(client)
    assert re.search(r"<strong>0</strong> notifications waiting", page(client, "/console/health"))
    with Session(engine) as session, session.begin():
        session.add_all(
            Notification(
                event_id=f"ntf_console_{n}",
                type="membership.added",
                ordering_key=ORG,
                object_id=f"orgmem_{n}",
                data={},
                created_at=NOW_MS,
                next_attempt_at=NOW_MS,
                status=status,
            )
            for n, status in enumerate(("pending", "pending", "delivered"))
        )
    shown = page(client, "/console/health")
    assert re.search(r"<strong>2</strong> notifications waiting", shown)
    assert "delivered 1" in shown


def test_expired_and_revoked_invitations_show_on_request(client: FlaskClient, engine: Engine) -> None:
    old = NOW_MS - 3 * DAY_MS
    events = [
        parse_event(
            f"msg_console_inv_{name}",
            webhook_body(
                event,
                invitation_data(
                    f"orginv_{name}",
                    ORG,
                    email=f"{name}@acme.test",
                    status=status,
                    created_at=old,
                    expires_at=old + DAY_MS,
                ),
                old + 1,
            ),
        )
        for name, status, event in (
            ("gone", "pending", "organizationInvitation.created"),
            ("pulled", "revoked", "organizationInvitation.revoked"),
        )
    ]
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, events, now_ms=NOW_MS)
    login(client)
    pending = page(client, f"/console/organizations/{ORG}/invitations")
    assert (
        "dan@acme.test" in pending and "gone@acme.test" not in pending and "pulled@acme.test" not in pending
    )
    everything = page(client, f"/console/organizations/{ORG}/invitations", closed=1)
    assert "gone@acme.test" in everything and "pulled@acme.test" in everything
    assert "<td>expired</td>" in everything and "<td>revoked</td>" in everything
    # Only a pending invitation has a revoke button.
    assert everything.count('class="danger">Revoke</button>') == 1
