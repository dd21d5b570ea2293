"""The /orgsync/v1 endpoints: permission checks and commands over HTTP, on SQLite."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import wait_until
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from test_cli_commands import NOW_MS, ORG, OTHER_ORG, membership, seed

from emulator.payloads import webhook_body
from models import permissions
from models.db import make_session_factory, session_scope
from models.events import parse_event
from models.mirror import apply_events
from models.settings import Settings
from models.tables import Command, CommandKind, CommandStatus
from orgsync.web import create_app, get_state

TOKEN = "orgsync-test-token-0123456789"
OTHER_TOKEN = "orgsync-other-token-9876543210"
MANAGE = "org:sys_memberships:manage"


def make_settings(tmp_path: Path, engine: Engine, tokens: tuple[str, ...] = (OTHER_TOKEN, TOKEN)) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",),
        api_tokens=tokens,
    )


class Sent:
    """The command sender: records ids, and checks they were committed before being enqueued."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ids: list[int] = []

    def __call__(self, ids: list[int]) -> None:
        with Session(self.engine) as session:
            assert list(session.scalars(select(Command.id).where(Command.id.in_(ids)))) == ids
        self.ids.extend(ids)


@pytest.fixture
def sent(sqlite_engine: Engine) -> Sent:
    return Sent(sqlite_engine)


@pytest.fixture
def app(tmp_path: Path, sqlite_engine: Engine, sent: Sent) -> Iterator[Flask]:
    seed(sqlite_engine)
    app = create_app(make_settings(tmp_path, sqlite_engine), engine=sqlite_engine, command_send=sent)
    yield app
    get_state(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def auth(token: str = TOKEN, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def get(client: FlaskClient, path: str, expect: int = 200, **query: Any) -> Any:
    response = client.get(f"/orgsync/v1{path}", headers=auth(), query_string=query)
    assert response.status_code == expect, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.get_json()


def send(
    client: FlaskClient, method: str, path: str, body: Any = None, expect: int = 202, **headers: str
) -> Any:
    response = client.open(f"/orgsync/v1{path}", method=method, headers=auth(**headers), json=body)
    assert response.status_code == expect, response.get_data(as_text=True)
    payload = response.get_json()
    if expect == 202:
        first = payload["data"][0] if "data" in payload else payload
        assert response.headers["Location"] == f"/orgsync/v1/commands/{first['id']}"
    return payload


def check(client: FlaskClient, user: str, org: str, permission: str = MANAGE) -> Any:
    return get(client, "/permission", user_id=user, organization=org, permission=permission)


# -------------------------------------------------------------------- reads


def test_permission_checks(client: FlaskClient) -> None:
    assert check(client, "user_alice", "acme") == {
        "allowed": True,
        "user_id": "user_alice",
        "organization_id": ORG,
        "permission": MANAGE,
        "role": "org:admin",
    }
    assert check(client, "user_alice", ORG)["allowed"] is True
    bob = check(client, "user_bob", "acme")
    assert (bob["allowed"], bob["role"]) == (False, "org:member")
    assert check(client, "user_bob", "acme", "org:sys_memberships:read")["allowed"] is True
    stranger = check(client, "user_bob", "nowhere")
    assert stranger == {
        "allowed": False,
        "user_id": "user_bob",
        "organization_id": None,
        "permission": MANAGE,
        "role": None,
    }


def test_permission_check_parameters_are_required_and_named(client: FlaskClient) -> None:
    missing = get(client, "/permission", expect=422, user_id="user_bob", organization="acme")
    assert missing == {"error": "invalid_field", "message": "permission is required", "field": "permission"}
    blank = get(client, "/permission", expect=422, user_id=" ", organization="acme", permission=MANAGE)
    assert blank["field"] == "user_id"
    long = get(client, "/permission", expect=422, user_id="u" * 65, organization="acme", permission=MANAGE)
    assert "at most 64" in long["message"]


def test_role_and_organizations_of_a_user(client: FlaskClient) -> None:
    alice = get(client, "/users/user_alice/organizations/acme")
    assert alice["role"] == "org:admin" and MANAGE in alice["permissions"]
    assert alice["organization_slug"] == "acme"
    outsider = get(client, "/users/user_alice/organizations/globex", expect=404)
    assert outsider["error"] == "not_a_member"
    zed = get(client, "/users/user_zed/organizations")
    assert zed["total_count"] == 1 and zed["data"][0]["organization_id"] == OTHER_ORG
    assert get(client, "/users/user_nobody/organizations") == {"data": [], "total_count": 0}


def test_a_mirror_change_reaches_a_cached_answer(client: FlaskClient, sqlite_engine: Engine) -> None:
    assert check(client, "user_bob", "acme")["allowed"] is False
    assert check(client, "user_bob", "acme")["allowed"] is False
    promoted = membership("orgmem_b", "user_bob", "org:admin", NOW_MS)
    with session_scope(make_session_factory(sqlite_engine)) as session:
        event = parse_event("msg_promote", webhook_body("organizationMembership.updated", promoted, NOW_MS))
        apply_events(session, [event], now_ms=NOW_MS)
    # The web app's cache watches the generation: the change is seen within its recheck_s.
    wait_until("the promotion", lambda: check(client, "user_bob", "acme")["allowed"] or None)


def test_tokens(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    missing = client.get("/orgsync/v1/users/user_bob/organizations")
    assert missing.status_code == 401 and missing.get_json()["error"] == "unauthorized"
    wrong = client.get("/orgsync/v1/users/user_bob/organizations", headers=auth("not-a-token-at-all-xx"))
    assert wrong.status_code == 401
    assert "not-a-token-at-all-xx" not in caplog.text and TOKEN not in caplog.text
    other = client.get("/orgsync/v1/users/user_bob/organizations", headers=auth(OTHER_TOKEN))
    assert other.status_code == 200
    document = client.get("/orgsync/v1/openapi.json")  # the document needs no token
    assert document.status_code == 200 and "/permission" in document.get_json()["paths"]


def test_not_served_without_tokens(tmp_path: Path, sqlite_engine: Engine) -> None:
    app = create_app(make_settings(tmp_path, sqlite_engine, ()), engine=sqlite_engine)
    response = app.test_client().get("/orgsync/v1/permission", headers=auth())
    assert response.status_code == 404
    get_state(app).close()


# ----------------------------------------------------------------- commands


def test_each_command_is_recorded_then_enqueued_and_polled(client: FlaskClient, sent: Sent) -> None:
    added = send(client, "POST", "/organizations/acme/memberships", {"user_id": "user_carol"})
    assert (added["kind"], added["organization_id"], added["role"]) == ("add_member", ORG, "org:member")
    assert added["status"] == "pending"
    # Requested by the token's position in ORGSYNC_API_TOKENS, never the token itself.
    assert added["requested_by"] == "api:token-2"
    promoted = send(client, "PATCH", "/organizations/acme/memberships/user_bob", {"role": "org:admin"})
    invited = send(client, "POST", "/organizations/acme/invitations", {"email_address": "erin@acme.test"})
    bulk = send(
        client,
        "POST",
        f"/organizations/{ORG}/invitations",
        {
            "email_addresses": [f"p{n}@acme.test" for n in range(12)],
            "role": "org:member",
            "expires_in_days": 3,
        },
    )
    revoked = send(
        client,
        "POST",
        "/organizations/acme/invitations/orginv_dan/revoke",
        {"requesting_user_id": "user_alice"},
    )
    removed = send(client, "DELETE", "/organizations/acme/memberships/user_carol")
    kinds = [
        added["kind"],
        promoted["kind"],
        invited["data"][0]["kind"],
        *[c["kind"] for c in bulk["data"]],
        revoked["kind"],
        removed["kind"],
    ]
    assert kinds == [
        "add_member",
        "set_role",
        "invite",
        "bulk_invite",
        "bulk_invite",
        "revoke_invitation",
        "remove_member",
    ]
    assert [len(c["email_addresses"]) for c in bulk["data"]] == [10, 2]
    ids = [added["id"], promoted["id"], invited["data"][0]["id"], *[c["id"] for c in bulk["data"]]]
    assert sent.ids == [*ids, revoked["id"], removed["id"]]
    polled = get(client, f"/commands/{added['id']}")
    assert polled["id"] == added["id"] and polled["url"] == f"/orgsync/v1/commands/{added['id']}"
    assert get(client, "/commands/999999", expect=404)["error"] == "command_not_found"


def test_idempotency_key(client: FlaskClient, sent: Sent) -> None:
    first = send(
        client,
        "POST",
        "/organizations/acme/memberships",
        {"user_id": "user_carol"},
        **{"Idempotency-Key": "k1"},
    )
    again = send(
        client,
        "POST",
        f"/organizations/{ORG}/memberships",
        {"user_id": "user_carol"},
        **{"Idempotency-Key": "k1"},
    )
    assert again["id"] == first["id"] and again["idempotency_key"] == "k1"
    reused = send(
        client,
        "PATCH",
        "/organizations/acme/memberships/user_bob",
        {"role": "org:admin"},
        expect=409,
        **{"Idempotency-Key": "k1"},
    )
    assert reused["error"] == "idempotency_key_reused" and reused["field"] == "Idempotency-Key"
    too_long = send(
        client,
        "POST",
        "/organizations/acme/memberships",
        {"user_id": "u"},
        expect=422,
        **{"Idempotency-Key": "k" * 201},
    )
    assert too_long["field"] == "Idempotency-Key"


def test_refusals_name_the_reason(client: FlaskClient, sent: Sent, sqlite_engine: Engine) -> None:
    guard = send(client, "DELETE", "/organizations/acme/memberships/user_alice", expect=409)
    assert guard["error"] == "last_admin_guard"
    assert "without a member holding org:sys_memberships:manage" in guard["message"]
    demote = send(
        client, "PATCH", "/organizations/acme/memberships/user_alice", {"role": "org:member"}, expect=409
    )
    assert demote["error"] == "last_admin_guard"
    unknown = send(client, "POST", "/organizations/nowhere/memberships", {"user_id": "user_x"}, expect=404)
    assert unknown["error"] == "organization_not_found" and unknown["field"] == "organization"
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/organizations/acme/memberships", {}, "user_id"),
        ("POST", "/organizations/acme/memberships", {"user_id": 7}, "user_id"),
        ("POST", "/organizations/acme/memberships", {"user_id": "u", "colour": "red"}, "colour"),
        (
            "POST",
            "/organizations/acme/memberships",
            {"user_id": "u", "public_metadata": []},
            "public_metadata",
        ),
        ("POST", "/organizations/acme/memberships", {"user_id": "u", "dry_run": "yes"}, "dry_run"),
        ("PATCH", "/organizations/acme/memberships/user_bob", {}, "role"),
        ("POST", "/organizations/acme/invitations", {"email_address": "not-an-email"}, "email_address"),
        ("POST", "/organizations/acme/invitations", {}, "email_address"),
        ("POST", "/organizations/acme/invitations", {"email_addresses": []}, "email_addresses"),
        ("POST", "/organizations/acme/invitations", {"email_addresses": ["a@b.co", 3]}, "email_addresses[1]"),
        (
            "POST",
            "/organizations/acme/invitations",
            {"email_address": "a@b.co", "expires_in_days": 0},
            "expires_in_days",
        ),
    ]
    for method, path, body, field in cases:
        answer = send(client, method, path, body, expect=422)
        assert answer["error"] == "invalid_field" and answer["field"] == field, (body, answer)
        assert answer["message"].startswith(field), answer
    bad_json = client.post(
        "/orgsync/v1/organizations/acme/memberships",
        headers=auth(),
        data="{",
        content_type="application/json",
    )
    assert bad_json.status_code == 400 and bad_json.get_json()["error"] == "invalid_json"
    not_object = send(client, "POST", "/organizations/acme/memberships", [1], expect=400)
    assert not_object["message"] == "the body must be a JSON object"
    assert sent.ids == []
    with Session(sqlite_engine) as session:
        assert session.scalars(select(Command)).all() == []


def test_dry_run_is_recorded_as_planned_and_not_sent(client: FlaskClient, sent: Sent) -> None:
    planned = send(
        client, "PATCH", "/organizations/acme/memberships/user_bob", {"role": "org:admin", "dry_run": True}
    )
    assert planned["status"] == CommandStatus.PLANNED and planned["dry_run"] is True
    assert sent.ids == []


def test_unknown_routes_and_methods_answer_json(client: FlaskClient) -> None:
    missing = client.get("/orgsync/v1/nothing-here", headers=auth())
    assert missing.status_code == 404 and missing.get_json()["error"] == "not_found"
    wrong = client.put("/orgsync/v1/organizations/acme/memberships/user_bob", headers=auth())
    assert wrong.status_code == 405 and "PATCH" in wrong.headers["Allow"]


def test_commands_recorded_over_http_are_those_of_the_submission_service(
    client: FlaskClient, sqlite_engine: Engine
) -> None:
    send(client, "POST", "/organizations/acme/memberships", {"user_id": "user_carol", "role": "org:admin"})
    with Session(sqlite_engine) as session:
        command = session.scalars(select(Command)).one()
    assert (command.kind, command.user_id, command.role) == (
        CommandKind.ADD_MEMBER,
        "user_carol",
        "org:admin",
    )
    assert command.requested_by == "api:token-2"


def test_database_unavailable_is_a_503_with_retry_after(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(_session: Session) -> int:
        raise OperationalError("SELECT generation", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(permissions, "mirror_generation", down)
    response = client.get(
        "/orgsync/v1/permission",
        headers=auth(),
        query_string={"user_id": "user_bob", "organization": "acme", "permission": MANAGE},
    )
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.get_json()["error"] == "database_unavailable"
