"""The read API in the web app: tokens, Clerk's parameters and errors, filters and paging, on both DBs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from read_world import OTHER_TOKEN, TOKEN, World, build_world, mirror
from sqlalchemy import Engine, event

from models import reads, render
from models.db import make_session_factory
from models.errors import ConfigError
from models.settings import Settings, parse_api_tokens
from orgsync.web import create_app, get_state


def make_settings(tmp_path: Path, engine: Engine, tokens: tuple[str, ...]) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",),
        api_tokens=tokens,
    )


@pytest.fixture
def world(engine: Engine) -> World:
    built = build_world()
    mirror(built, engine)
    return built


@pytest.fixture
def app(tmp_path: Path, engine: Engine, world: World) -> Iterator[Flask]:
    app = create_app(make_settings(tmp_path, engine, (OTHER_TOKEN, TOKEN)), engine=engine)
    yield app
    get_state(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def get(client: FlaskClient, path: str, expect: int = 200, token: str = TOKEN, **query: Any) -> Any:
    response = client.get(path, query_string=query, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == expect, response.get_data(as_text=True)
    return response.get_json()


def error_of(body: Any) -> tuple[str, str | None]:
    assert set(body) >= {"errors", "clerk_trace_id"}
    error = body["errors"][0]
    assert set(error) >= {"message", "long_message", "code"}
    return error["code"], error.get("meta", {}).get("param_name")


def ids(body: Any) -> list[str]:
    return [item["id"] for item in body["data"]]


def user_ids(body: Any) -> list[str]:
    return [item["public_user_data"]["user_id"] for item in body["data"]]


# ------------------------------------------------------------------ tokens
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_missing_or_wrong_token_gets_clerks_401_and_is_never_logged(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    missing = client.get("/v1/organizations")
    assert missing.status_code == 401
    assert error_of(missing.get_json())[0] == "authentication_invalid"
    wrong = get(client, "/v1/organizations", 401, token="not-the-token-at-all")
    assert error_of(wrong)[0] == "authentication_invalid"
    assert "not-the-token-at-all" not in caplog.text and TOKEN not in caplog.text
    basic = client.get("/v1/organizations", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    # Both configured tokens work: the old one stays valid while callers rotate.
    assert get(client, "/v1/organizations", token=OTHER_TOKEN)["total_count"] == 4


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_not_served_without_tokens(tmp_path: Path, engine: Engine) -> None:
    app = create_app(make_settings(tmp_path, engine, ()), engine=engine)
    try:
        assert app.test_client().get("/v1/organizations").status_code == 404
        assert app.test_client().get("/healthz").status_code == 200
    finally:
        get_state(app).close()


def test_tokens_setting() -> None:
    assert parse_api_tokens(f" {TOKEN}, {OTHER_TOKEN}\n") == (TOKEN, OTHER_TOKEN)
    assert parse_api_tokens("") == ()
    with pytest.raises(ConfigError, match="entry 2 of 2") as raised:
        parse_api_tokens(f"{TOKEN} tiny-secret")
    assert "tiny-secret" not in str(raised.value)
    settings = Settings.from_env({"ORGSYNC_API_TOKENS": TOKEN})
    assert settings.api_tokens == (TOKEN,)
    assert TOKEN not in repr(settings)


# ---------------------------------------------------------- organizations
def test_organizations_newest_first_with_paging(client: FlaskClient, world: World) -> None:
    o = world.orgs
    body = get(client, "/v1/organizations")
    assert body["total_count"] == 4
    assert ids(body) == [o["delta"], o["gamma"], o["beta"], o["acme"]]
    first = body["data"][-1]
    assert first["object"] == "organization" and first["slug"] == "acme"
    assert first["created_by"] == world.users["alice"]
    assert first["public_metadata"] == {"tier": "acme"} and first["private_metadata"] == {"crm": "crm-acme"}
    assert "members_count" not in first
    page = get(client, "/v1/organizations", limit=2, offset=1, order_by="+created_at")
    assert ids(page) == [o["beta"], o["gamma"]] and page["total_count"] == 4
    assert get(client, "/v1/organizations", offset=10)["data"] == []


def test_organization_filters_and_order(client: FlaskClient, world: World) -> None:
    o, u = world.orgs, world.users
    assert ids(get(client, "/v1/organizations", query="GAMMA")) == [o["gamma"]]
    assert ids(get(client, "/v1/organizations", query="bet")) == [o["beta"]]
    assert ids(get(client, "/v1/organizations", query=o["delta"])) == [o["delta"]]
    assert get(client, "/v1/organizations", query="%")["total_count"] == 0
    assert ids(get(client, "/v1/organizations", user_id=u["dan"], order_by="name")) == [o["acme"], o["gamma"]]
    assert ids(get(client, "/v1/organizations", user_id=[u["alice"], u["carol"]], order_by="name")) == [
        o["acme"],
        o["beta"],
        o["gamma"],
    ]
    assert ids(get(client, "/v1/organizations", user_id=f"-{u['alice']}", order_by="name")) == [
        o["delta"],
        o["gamma"],
    ]
    assert ids(
        get(client, "/v1/organizations", organization_id=[o["beta"], o["delta"]], order_by="-name")
    ) == [
        o["delta"],
        o["beta"],
    ]
    by_size = get(client, "/v1/organizations", order_by="-members_count", include_members_count="true")
    assert ids(by_size) == [o["acme"], o["beta"], o["gamma"], o["delta"]]
    assert [org["members_count"] for org in by_size["data"]] == [9, 3, 2, 0]
    assert by_size["data"][0]["pending_invitations_count"] == 1


def test_get_organization_by_id_or_slug(client: FlaskClient, world: World) -> None:
    acme = get(client, f"/v1/organizations/{world.orgs['acme']}", include_members_count="true")
    assert acme["name"] == "Acme Corp" and acme["members_count"] == 9
    assert get(client, "/v1/organizations/gamma")["name"] == "Gamma Group International"
    for gone in ("temp", world.orgs["temp"], "nope"):
        code, _ = error_of(get(client, f"/v1/organizations/{gone}", 404))
        assert code == "resource_not_found"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"order_by": "-updated_at"}, "order_by"),
        ({"order_by": "+"}, "order_by"),
        ({"include_members_count": "maybe"}, "include_members_count"),
    ],
)
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_bad_parameters_get_clerks_422(client: FlaskClient, query: dict[str, Any], param: str) -> None:
    assert error_of(get(client, "/v1/organizations", 422, **query)) == ("form_param_value_invalid", param)


# ------------------------------------------------------------ memberships
def test_organization_memberships_and_filters(client: FlaskClient, world: World) -> None:
    u, acme = world.users, f"/v1/organizations/{world.orgs['acme']}/memberships"
    body = get(client, acme, limit=100)
    assert body["total_count"] == 9 and world.users["zoe"] not in user_ids(body)
    newest = body["data"][0]
    assert newest["public_user_data"]["user_id"] == u["mia"]
    assert newest["organization"]["id"] == world.orgs["acme"]
    assert newest["organization"]["members_count"] == 9
    carol = next(m for m in body["data"] if m["public_user_data"]["user_id"] == u["carol"])
    assert carol["public_metadata"] == {"desk": 12} and carol["private_metadata"] == {"seat": "carol"}
    assert carol["public_user_data"]["identifier"] == "carol@acme.test"
    assert carol["role"] == "org:member" and carol["role_name"] == "Member"
    assert carol["permissions"] == ["org:sys_memberships:read"]

    def who(**query: Any) -> list[str]:
        return sorted(
            name for name, uid in u.items() if uid in user_ids(get(client, acme, limit=100, **query))
        )

    assert who(role="org:billing") == ["dan", "erin"]
    assert who(role=["org:admin", "org:billing"]) == ["alice", "dan", "erin", "grace"]
    assert who(user_id=[u["bob"], u["ivan"]]) == ["bob"]
    assert who(user_id=f"-{u['bob']}") == ["alice", "carol", "dan", "erin", "frank", "grace", "heidi", "mia"]
    assert who(email_address="GRACE@acme.test") == ["grace"]
    assert who(username="carolc") == ["carol"]
    assert who(query="ar") == ["alice", "carol"]  # Archer, carol@, Carol...
    assert who(query=u["frank"]) == ["frank"]
    assert who(email_address_query="RAN") == ["frank"]
    assert who(username_query="g") == ["grace"]
    assert who(name_query="hall") == ["heidi"]
    created = world.created_at
    assert who(created_at_before=created["carol"]) == ["alice", "bob"]
    assert who(created_at_after=created["grace"]) == ["heidi", "mia"]


def test_membership_order(client: FlaskClient, world: World) -> None:
    acme = f"/v1/organizations/{world.orgs['acme']}/memberships"
    emails = [
        m["public_user_data"]["identifier"] for m in get(client, acme, order_by="email_address")["data"]
    ]
    assert emails == sorted(emails) and len(emails) == 9
    first_names = [
        m["public_user_data"]["first_name"]
        for m in get(client, acme, order_by="-first_name", limit=3)["data"]
    ]
    assert first_names == ["Mia", "Grace", "Frank"]
    # No first name: first ascending, last descending, as Clerk's NULL ordering.
    assert (
        get(client, acme, order_by="first_name", limit=1)["data"][0]["public_user_data"]["last_name"]
        == "Hall"
    )
    paged = [user_ids(get(client, acme, limit=3, offset=offset)) for offset in (0, 3, 6, 9)]
    assert [uid for page in paged for uid in page] == user_ids(get(client, acme, limit=100))
    assert get(client, acme, offset=50) == {"data": [], "total_count": 9}
    assert get(client, acme, role="org:nobody") == {"data": [], "total_count": 0}


def test_membership_lists_of_the_instance_and_of_a_user(client: FlaskClient, world: World) -> None:
    u = world.users
    everything = get(client, "/v1/organization_memberships", limit=500)
    assert everything["total_count"] == 14
    dans = get(client, f"/v1/users/{u['dan']}/organization_memberships")
    assert [m["organization"]["id"] for m in dans["data"]] == [world.orgs["gamma"], world.orgs["acme"]]
    assert get(client, f"/v1/users/{u['zoe']}/organization_memberships")["total_count"] == 0
    assert (
        error_of(get(client, "/v1/users/user_nobody/organization_memberships", 404))[0]
        == "resource_not_found"
    )
    assert error_of(get(client, "/v1/organizations/nope/memberships", 404))[0] == "resource_not_found"


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_filters_the_mirror_cannot_answer_are_refused(client: FlaskClient, world: World) -> None:
    acme = f"/v1/organizations/{world.orgs['acme']}/memberships"
    body = get(client, acme, 422, phone_number="+15550100")
    assert error_of(body) == ("form_param_value_invalid", "phone_number")
    assert "phone numbers" in body["errors"][0]["long_message"]
    assert error_of(get(client, "/v1/users", 422, last_active_at_after=1)) == (
        "form_param_value_invalid",
        "last_active_at_after",
    )
    assert error_of(get(client, acme, 422, created_at_before="yesterday"))[1] == "created_at_before"
    too_many = [f"user_{n}" for n in range(101)]
    assert error_of(get(client, acme, 422, user_id=too_many))[1] == "user_id"


# ------------------------------------------------------------ invitations
def test_invitations_by_status(client: FlaskClient, world: World) -> None:
    i, acme = world.invitations, f"/v1/organizations/{world.orgs['acme']}/invitations"
    body = get(client, acme)
    assert ids(body) == [i["mia"], i["liam"], i["ken"], i["judy"]] and body["total_count"] == 4
    statuses = {inv["id"]: inv["status"] for inv in body["data"]}
    assert statuses == {i["judy"]: "pending", i["ken"]: "revoked", i["liam"]: "expired", i["mia"]: "accepted"}
    for status, expected in (
        ("pending", "judy"),
        ("revoked", "ken"),
        ("expired", "liam"),
        ("accepted", "mia"),
    ):
        assert ids(get(client, acme, status=status)) == [i[expected]]
    assert ids(get(client, f"{acme}/pending")) == [i["judy"]]
    assert ids(get(client, acme, email_address="KEN@ext.test")) == [i["ken"]]
    assert ids(get(client, acme, order_by="email_address", limit=2)) == [i["judy"], i["ken"]]
    judy = get(client, acme, status="pending")["data"][0]
    assert judy["inviter_id"] == world.users["alice"]
    assert judy["public_inviter_data"]["identifier"] == "alice@acme.test"
    assert judy["url"] and judy["expires_at"] and "public_organization_data" not in judy
    accepted = get(client, acme, status="accepted")["data"][0]
    assert accepted["user_id"] == world.users["mia"]
    assert error_of(get(client, acme, 422, status="lost")) == ("form_param_value_invalid", "status")
    assert error_of(get(client, "/v1/organizations/temp/invitations", 404))[0] == "resource_not_found"


def test_invitations_of_the_instance_and_of_a_user(client: FlaskClient, world: World) -> None:
    i = world.invitations
    everything = get(client, "/v1/organization_invitations", limit=50)
    assert everything["total_count"] == 6  # the deleted organization's invitation is gone
    assert everything["data"][0]["public_organization_data"]["slug"] == "beta"
    assert ids(get(client, "/v1/organization_invitations", query="beta.test")) == [i["nina"]]
    assert ids(get(client, "/v1/organization_invitations", status="pending", order_by="email_address")) == [
        i["dan-beta"],
        i["judy"],
        i["nina"],
    ]
    dans = get(client, f"/v1/users/{world.users['dan']}/organization_invitations")
    assert ids(dans) == [i["dan-beta"]] and dans["data"][0]["public_organization_data"]["name"] == "Beta Labs"
    assert ids(get(client, f"/v1/users/{world.users['mia']}/organization_invitations")) == [i["mia"]]
    assert (
        get(client, f"/v1/users/{world.users['dan']}/organization_invitations", status="revoked")["data"]
        == []
    )


# -------------------------------------------------- roles and permissions
def test_roles_and_permissions(client: FlaskClient) -> None:
    roles = get(client, "/v1/organization_roles", order_by="key")
    assert [r["key"] for r in roles["data"]] == ["org:admin", "org:billing", "org:member"]
    billing = roles["data"][1]
    assert [p["key"] for p in billing["permissions"]] == ["org:sys_billing:read", "org:sys_billing:manage"]
    assert billing["permissions"][0]["created_at"] and billing["permissions"][0]["type"] == "system"
    assert [r["key"] for r in get(client, "/v1/organization_roles", query="bill")["data"]] == ["org:billing"]
    perms = get(client, "/v1/organization_permissions", query="memberships", order_by="-key")
    assert [p["key"] for p in perms["data"]] == ["org:sys_memberships:read", "org:sys_memberships:manage"]
    assert get(client, "/v1/organization_permissions", limit=3)["total_count"] == 9
    assert error_of(get(client, "/v1/organization_roles", 422, order_by="-color"))[1] == "order_by"


# ------------------------------------------------------------------ users
CLERK_SPEC = Path(__file__).resolve().parents[2] / "shared/reference/clerk-openapi/bapi-2025-11-10.yml"


def test_users_full_data(client: FlaskClient, world: World) -> None:
    u = world.users
    grace = get(client, f"/v1/users/{u['grace']}")
    assert grace["object"] == "user" and grace["username"] == "gg" and grace["last_name"] == "Green"
    assert grace["public_metadata"] == {"team": "g"}
    assert [e["email_address"] for e in grace["email_addresses"]] == ["grace@acme.test"]
    assert (grace["external_id"], grace["banned"], grace["locked"]) == ("ext-grace", False, False)
    assert "private_metadata" not in grace and grace["phone_numbers"] == []
    listed = {x["id"]: x for x in get(client, "/v1/users", limit=100)}
    assert listed[u["grace"]] == grace
    assert listed[u["zoe"]]["external_id"] is None
    assert error_of(get(client, "/v1/users/user_nobody", 404))[0] == "resource_not_found"
    listed = get(client, "/v1/users", organization_id=world.orgs["gamma"], order_by="first_name")
    assert [x["id"] for x in listed] == [u["carol"], u["dan"]]
    assert [x["id"] for x in get(client, "/v1/users", query="zimmer")] == [u["zoe"]]
    assert [x["id"] for x in get(client, "/v1/users", email_address="IVAN@acme.test")] == [u["ivan"]]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_user_has_every_field_clerks_schema_requires(client: FlaskClient, world: World) -> None:
    if not CLERK_SPEC.exists():
        pytest.skip("Clerk's OpenAPI document is not on this machine")
    schemas = yaml.safe_load(CLERK_SPEC.read_text())["components"]["schemas"]
    grace = get(client, f"/v1/users/{world.users['grace']}")
    assert set(schemas["User"]["required"]) - set(grace) == set()
    assert set(grace) <= set(schemas["User"]["properties"])
    for address in grace["email_addresses"]:
        assert set(schemas["EmailAddress"]["required"]) - set(address) == set()
        assert set(address) <= set(schemas["EmailAddress"]["properties"])


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_failure_gets_clerks_error_shape(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken read")

    monkeypatch.setattr(reads, "list_roles", broken)
    assert error_of(get(client, "/v1/organization_roles", 500))[0] == "internal_clerk_error"
    assert "broken read" in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_other_paths_get_clerks_404(client: FlaskClient) -> None:
    assert error_of(get(client, "/v1/organizations/x/domains/y/z", 404))[0] == "resource_not_found"
    response = client.post("/v1/organizations", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code in (404, 405)


# ----------------------------------------------------------- query counts
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_page_costs_the_same_queries_whatever_its_size(engine: Engine, world: World) -> None:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    factory = make_session_factory(engine)
    event.listen(engine, "before_cursor_execute", count)
    try:
        costs = []
        for limit in (1, 8):
            statements.clear()
            with factory() as session:
                listing = reads.list_memberships(session, organization="acme", limit=limit)
                assert listing is not None and len(listing.data) == limit
            costs.append(len(statements))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert costs[0] == costs[1]


def test_a_page_of_memberships_is_each_membership_as_its_view_renders(engine: Engine, world: World) -> None:
    owners: list[dict[str, Any]] = [{"organization": "acme"}, {"user": world.users["dan"]}, {}]
    with reads.read_sessions(engine)() as session:
        for owner in owners:
            for order_by in (None, "email_address", "+first_name", "-username"):
                query = reads.MembershipQuery(limit=50, order_by=order_by, **owner)
                listing = reads.membership_listing(session, query)
                body = render.membership_page(session, query)
                assert listing is not None and listing.data and body is not None
                assert json.loads(body) == {
                    "data": [render.membership(m) for m in listing.data],
                    "total_count": listing.total_count,
                }
        assert render.membership_page(session, reads.MembershipQuery(organization="org_missing")) is None


def test_read_layer_names_the_bad_parameter() -> None:
    with pytest.raises(reads.InvalidParameterError) as raised:
        reads.parse_order("size", reads.ORGANIZATION_ORDER)
    assert raised.value.param == "order_by"
    with pytest.raises(reads.InvalidParameterError, match="limit"):
        reads.check_window(0, 0)


def test_single_invitation_role_and_permission(client: FlaskClient, world: World) -> None:
    judy = world.invitations["judy"]
    assert get(client, f"/v1/organizations/acme/invitations/{judy}")["email_address"] == "judy@acme.test"
    assert error_of(get(client, f"/v1/organizations/beta/invitations/{judy}", 404))[0] == "resource_not_found"
    roles = {r["key"]: r["id"] for r in get(client, "/v1/organization_roles")["data"]}
    billing = get(client, f"/v1/organization_roles/{roles['org:billing']}")
    assert billing["name"] == "Billing" and len(billing["permissions"]) == 2
    permission = get(client, f"/v1/organization_permissions/{billing['permissions'][0]['id']}")
    assert permission["key"] == "org:sys_billing:read"
    assert error_of(get(client, "/v1/organization_roles/role_nobody", 404))[0] == "resource_not_found"
    assert error_of(get(client, "/v1/organization_permissions/perm_nobody", 404))[0] == "resource_not_found"


# -------------------------------------------------- role sets and domains
def test_role_sets_with_their_roles(client: FlaskClient, world: World) -> None:
    listed = get(client, "/v1/role_sets")
    assert listed["total_count"] == 1
    role_set = listed["data"][0]
    assert role_set["object"] == "role_set" and role_set["key"] == "role_set:default"
    assert [r["key"] for r in role_set["roles"]] == ["org:admin", "org:member", "org:billing"]
    assert role_set["roles"][2]["id"] == world.roles["org:billing"]
    assert role_set["roles"][2]["object"] == "role_set_item"
    assert role_set["default_role"]["key"] == "org:member" and role_set["creator_role"]["key"] == "org:admin"
    assert role_set["type"] == "initial" and role_set["role_set_migration"] is None
    assert get(client, "/v1/role_sets", query="default")["total_count"] == 1
    assert get(client, "/v1/role_sets", query="nothing-like-it")["data"] == []
    assert get(client, "/v1/role_sets", order_by="-name", offset=1) == {"data": [], "total_count": 1}
    assert get(client, "/v1/role_sets/role_set:default") == role_set
    assert get(client, f"/v1/role_sets/{role_set['id']}") == role_set
    assert error_of(get(client, "/v1/role_sets/role_set:nope", 404))[0] == "resource_not_found"
    assert error_of(get(client, "/v1/role_sets", 422, order_by="updated_at"))[1] == "order_by"
    assert error_of(get(client, "/v1/role_sets", 422, limit=0))[1] == "limit"


def names(body: Any) -> list[str]:
    return [item["name"] for item in body["data"]]


def test_domains_of_an_organization(client: FlaskClient, world: World) -> None:
    acme = get(client, f"/v1/organizations/{world.orgs['acme']}/domains")
    assert names(acme) == ["acme-labs.test", "acme.test"] and acme["total_count"] == 2
    domain = acme["data"][1]
    assert domain["object"] == "organization_domain" and domain["id"] == world.domains["acme.test"]
    assert domain["organization_id"] == world.orgs["acme"]
    assert domain["enrollment_mode"] == "automatic_invitation"
    assert domain["affiliation_verification"]["status"] == "verified"
    assert domain["verification"] == domain["affiliation_verification"]
    assert domain["ownership_verification"] is None
    assert domain["total_pending_invitations"] == 2 and domain["total_pending_suggestions"] == 0
    assert domain["public_organization_data"]["slug"] == "acme"
    assert acme["data"][0]["affiliation_verification"] is None
    assert names(get(client, "/v1/organizations/acme/domains", verified="true")) == ["acme.test"]
    assert names(get(client, "/v1/organizations/acme/domains", verified="false")) == ["acme-labs.test"]
    only_manual = get(client, "/v1/organizations/acme/domains", enrollment_mode="manual_invitation")
    assert names(only_manual) == ["acme-labs.test"]
    not_manual = get(client, "/v1/organizations/acme/domains", enrollment_mode="-manual_invitation")
    assert names(not_manual) == ["acme.test"]
    assert get(client, "/v1/organizations/acme/domains", limit=1, offset=1)["data"][0]["name"] == "acme.test"
    # The deleted domain is gone; the update is there.
    gamma = get(client, "/v1/organizations/gamma/domains")
    assert names(gamma) == ["gamma.test"] and gamma["data"][0]["enrollment_mode"] == "automatic_suggestion"
    assert get(client, "/v1/organizations/delta/domains") == {"data": [], "total_count": 0}
    missing = get(client, "/v1/organizations/org_nobody/domains", 404)
    assert error_of(missing)[0] == "resource_not_found"


def test_domains_of_the_instance(client: FlaskClient, world: World) -> None:
    everything = get(client, "/v1/organization_domains")
    assert names(everything) == ["gamma.test", "beta.test", "acme-labs.test", "acme.test"]
    assert names(get(client, "/v1/organization_domains", order_by="name")) == [
        "acme-labs.test",
        "acme.test",
        "beta.test",
        "gamma.test",
    ]
    by_org = get(client, "/v1/organization_domains", organization_id=world.orgs["beta"])
    assert names(by_org) == ["beta.test"]
    assert names(get(client, "/v1/organization_domains", query=world.orgs["beta"])) == ["beta.test"]
    assert names(get(client, "/v1/organization_domains", query="ACME", order_by="name")) == [
        "acme-labs.test",
        "acme.test",
    ]
    exact = get(client, "/v1/organization_domains", domains=["beta.test", "gamma.test"], order_by="name")
    assert names(exact) == ["beta.test", "gamma.test"]
    # The array form: a comma-separated list, includes and excludes composed as AND.
    modes = get(
        client, "/v1/organization_domains", enrollment_mode="automatic_suggestion,-automatic_invitation"
    )
    assert names(modes) == ["gamma.test", "beta.test"]
    assert get(client, "/v1/organization_domains", verified="false")["total_count"] == 1


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"verified": "yes"}, "verified"),
        ({"enrollment_mode": "by_magic"}, "enrollment_mode"),
        ({"enrollment_mode": "-by_magic"}, "enrollment_mode"),
        ({"query": "  "}, "query"),
        ({"order_by": "-enrollment_mode"}, "order_by"),
        ({"limit": 501}, "limit"),
    ],
)
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_bad_domain_parameters_get_clerks_422(client: FlaskClient, query: dict[str, Any], param: str) -> None:
    body = get(client, "/v1/organization_domains", 422, **query)
    assert error_of(body) == ("form_param_value_invalid", param)
