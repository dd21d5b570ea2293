"""The emulator's user, role and permission changes, their webhooks, and the mirror they keep true."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_emulator_api import raw, start

from emulator import Emulator
from models.db import make_session_factory, session_scope
from models.events import PERMISSIONS, ROLE_SETS, USERS, Event, parse_event
from models.mirror import apply_events
from models.reconcile import absent_rows, tombstone_objects, write_listing
from models.tables import Invitation, Membership, OrganizationDomain, RoleSet, User

NOW = 1_800_000_000_000


class Recorder:
    """Every event the emulator emits, as (type, data, timestamp)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], int]] = []

    def __call__(self, event_type: str, data: dict[str, Any], timestamp: int) -> None:
        self.events.append((event_type, data, timestamp))

    def types(self) -> list[str]:
        return [event_type for event_type, _, _ in self.events]

    def parsed(self) -> list[Event]:
        return [
            parse_event(
                f"msg_{i}",
                json.dumps(
                    {"type": t, "object": "event", "data": d, "timestamp": ts, "instance_id": "ins_e"}
                ),
            )
            for i, (t, d, ts) in enumerate(self.events)
        ]


@pytest.fixture
def emu() -> Iterator[Emulator]:
    emulator = start()
    yield emulator
    emulator.stop()


@pytest.fixture
def world(emu: Emulator) -> tuple[Recorder, str, str]:
    """A user who is an editor of one organization, with every event recorded from the start."""
    recorder = Recorder()
    emu.state.subscribe(recorder)
    emu.state.announce_defaults()
    user = emu.state.create_user(email_address="jane@acme.com", first_name="Jane", last_name="Doe")
    org = emu.state.create_organization(name="Acme", created_by=user["id"])
    emu.state.create_permission(name="Publish", key="org:posts:publish")
    emu.state.create_role(name="Editor", key="org:editor", permissions=["org:posts:publish"])
    other = emu.state.create_user(email_address="joe@acme.com", first_name="Joe")
    emu.state.add_membership(org["id"], user_id=other["id"], role="org:editor")
    return recorder, org["id"], other["id"]


def test_updating_a_user_sends_user_updated_only(emu: Emulator, world: tuple[Recorder, str, str]) -> None:
    recorder, _, user_id = world
    before = len(recorder.events)
    status, _, body = raw(emu, "PATCH", f"/v1/users/{user_id}", {"first_name": "Joseph"})
    assert (status, body["first_name"]) == (200, "Joseph")
    assert recorder.types()[before:] == ["user.updated"]


def test_updating_a_role_sends_role_updated_and_members_show_it(
    emu: Emulator, world: tuple[Recorder, str, str]
) -> None:
    recorder, org_id, _ = world
    role_id = next(r["id"] for r in emu.state.list_roles().data if r["key"] == "org:editor")
    before = len(recorder.events)
    status, _, body = raw(emu, "PATCH", f"/v1/organization_roles/{role_id}", {"name": "Chief editor"})
    assert (status, body["name"]) == (200, "Chief editor")
    assert recorder.types()[before:] == ["role.updated"]
    members = emu.state.list_memberships(org_id).data
    assert {m["role_name"] for m in members if m["role"] == "org:editor"} == {"Chief editor"}


def test_permissions_are_created_and_deleted(emu: Emulator, world: tuple[Recorder, str, str]) -> None:
    recorder, _, _ = world
    status, _, created = raw(
        emu, "POST", "/v1/organization_permissions", {"name": "Archive", "key": "org:posts:archive"}
    )
    assert (status, created["key"]) == (200, "org:posts:archive")
    status, _, refused = raw(emu, "POST", "/v1/organization_permissions", {"name": "Bad", "key": "archive"})
    assert (status, refused["errors"][0]["code"]) == (422, "form_param_format_invalid")
    status, _, _ = raw(emu, "DELETE", f"/v1/organization_permissions/{created['id']}")
    assert status == 200
    assert recorder.types()[-2:] == ["permission.created", "permission.deleted"]
    status, _, _ = raw(emu, "DELETE", f"/v1/organization_permissions/{created['id']}")
    assert status == 404


def apply(engine: Engine, events: list[Event]) -> None:
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, events, now_ms=NOW)


def member(engine: Engine, org_id: str, user_id: str) -> Membership:
    with Session(engine) as session:
        found = session.get(Membership, (org_id, user_id))
        assert found is not None
        return found


def test_the_mirror_follows_user_and_role_changes_in_any_order(
    emu: Emulator, world: tuple[Recorder, str, str], engine: Engine
) -> None:
    recorder, org_id, user_id = world
    emu.state.update_user(user_id, first_name="Joseph")
    role_id = next(r["id"] for r in emu.state.list_roles().data if r["key"] == "org:editor")
    publish = next(p for p in emu.state.snapshot()["permissions"] if p["key"] == "org:posts:publish")
    emu.state.update_role(role_id, name="Chief editor")
    emu.state.delete_permission(publish["id"])
    events = recorder.parsed()
    random.Random(7).shuffle(events)
    apply(engine, events[: len(events) // 2])
    apply(engine, events[len(events) // 2 :])
    stored = member(engine, org_id, user_id)
    truth = next(
        m for m in emu.state.list_memberships(org_id).data if m["public_user_data"]["user_id"] == user_id
    )
    assert stored.public_user_data is not None
    assert stored.public_user_data["first_name"] == truth["public_user_data"]["first_name"] == "Joseph"
    assert stored.role_name == truth["role_name"] == "Chief editor"
    assert stored.permissions == truth["permissions"] == []


def test_reconciliation_repairs_a_stale_copy_and_a_missed_user_deletion(
    emu: Emulator, world: tuple[Recorder, str, str], engine: Engine
) -> None:
    recorder, org_id, user_id = world
    apply(engine, recorder.parsed())
    # Both webhooks are lost: the membership's timestamps never moved, only the user changed.
    emu.state.update_user(user_id, first_name="Joseph")
    jane = emu.state.find_user_id("jane@acme.com")
    assert jane is not None
    emu.state.delete_user(jane)
    assert member(engine, org_id, user_id).public_user_data["first_name"] == "Joe"  # type: ignore[index]

    listing = [emu.state.get_user(uid) for uid in emu.state.user_ids()]
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        drift = write_listing(session, USERS, listing, now_ms=NOW + 1)
        missing = absent_rows(session, USERS, seen={(u["id"],) for u in listing}, listed_since_ms=NOW + 1)
        drift.merge(
            tombstone_objects(
                session, USERS, [m.key[0] for m in missing], listed_since_ms=NOW + 1, now_ms=NOW + 2
            )
        )
    assert drift.counts[USERS]["updated"] == 1 and drift.counts[USERS]["tombstoned"] == 1
    assert drift.counts["memberships"]["updated"] == 1
    assert member(engine, org_id, user_id).public_user_data["first_name"] == "Joseph"  # type: ignore[index]
    with Session(engine) as session:
        gone = session.get(User, jane)
        assert gone is not None and gone.deleted
    assert member(engine, org_id, jane).deleted


def test_domains_enroll_new_users_with_invitations_no_command_asked_for(
    emu: Emulator, world: tuple[Recorder, str, str], engine: Engine
) -> None:
    recorder, org_id, _ = world
    status, _, created = raw(
        emu,
        "POST",
        f"/v1/organizations/{org_id}/domains",
        {"name": "Acme.com", "enrollment_mode": "automatic_invitation"},
    )
    assert (status, created["name"], created["enrollment_mode"]) == (200, "acme.com", "automatic_invitation")
    status, _, refused = raw(emu, "POST", f"/v1/organizations/{org_id}/domains", {"name": "acme.com"})
    assert (status, refused["errors"][0]["code"]) == (422, "form_identifier_exists")
    status, _, refused = raw(
        emu, "POST", f"/v1/organizations/{org_id}/domains", {"name": "x", "enrollment_mode": "any"}
    )
    assert status == 422

    before = len(recorder.events)
    emu.state.create_user(email_address="new@acme.com")
    emu.state.create_user(email_address="someone@elsewhere.io")
    assert recorder.types()[before:] == ["user.created", "organizationInvitation.created", "user.created"]
    assert recorder.events[before + 1][1]["email_address"] == "new@acme.com"

    status, _, updated = raw(
        emu,
        "PATCH",
        f"/v1/organizations/{org_id}/domains/{created['id']}",
        {"enrollment_mode": "manual_invitation"},
    )
    assert (status, updated["enrollment_mode"], updated["total_pending_invitations"]) == (
        200,
        "manual_invitation",
        1,
    )
    status, _, listed = raw(emu, "GET", "/v1/organization_domains")
    assert (status, [d["id"] for d in listed["data"]], listed["total_count"]) == (200, [created["id"]], 1)

    apply(engine, recorder.parsed())
    with Session(engine) as session:
        stored = session.get(OrganizationDomain, created["id"])
        assert stored is not None
        assert (stored.organization_id, stored.enrollment_mode, stored.deleted) == (
            org_id,
            "manual_invitation",
            False,
        )
        invited = session.scalars(select(Invitation).where(Invitation.email_address == "new@acme.com")).all()
        assert [i.status for i in invited] == ["pending"]

    status, _, _ = raw(emu, "DELETE", f"/v1/organizations/{org_id}/domains/{created['id']}")
    assert status == 200
    assert recorder.types()[-1] == "organizationDomain.deleted"
    apply(engine, recorder.parsed()[-1:])
    with Session(engine) as session:
        gone = session.get(OrganizationDomain, created["id"])
        assert gone is not None and gone.deleted and gone.organization_id == org_id


def test_role_sets_are_listed_and_reconciled(
    emu: Emulator, world: tuple[Recorder, str, str], engine: Engine
) -> None:
    status, _, listed = raw(emu, "GET", "/v1/role_sets")
    assert status == 200 and listed["total_count"] == 1
    role_set = listed["data"][0]
    assert role_set["key"] == "role_set:default"
    assert {"org:admin", "org:member", "org:editor"} <= {r["key"] for r in role_set["roles"]}
    with session_scope(make_session_factory(engine)) as session:
        drift = write_listing(session, ROLE_SETS, listed["data"], now_ms=NOW)
        again = write_listing(session, ROLE_SETS, listed["data"], now_ms=NOW + 1)
    assert (drift.counts[ROLE_SETS]["created"], again.total) == (1, 0)
    with Session(engine) as session:
        stored = session.get(RoleSet, role_set["id"])
        assert stored is not None
        assert (stored.key, stored.default_role_key, stored.creator_role_key) == (
            "role_set:default",
            "org:member",
            "org:admin",
        )
        assert stored.role_keys is not None and "org:editor" in stored.role_keys


def test_domain_and_role_set_lists_take_clerks_filters(
    emu: Emulator, world: tuple[Recorder, str, str]
) -> None:
    _, org_id, _ = world
    other = emu.state.create_organization(name="Beta")["id"]
    for org, name, mode, verified in (
        (org_id, "acme.com", "automatic_invitation", True),
        (org_id, "acme.dev", "manual_invitation", False),
        (other, "beta.io", "automatic_suggestion", True),
    ):
        emu.state.create_domain(org, name=name, enrollment_mode=mode, verified=verified)

    def names(path: str, expect: int = 200) -> Any:
        status, _, body = raw(emu, "GET", path)
        assert status == expect, body
        return [d["name"] for d in body["data"]] if status == 200 else body["errors"][0]["meta"]

    # Newest first, as Clerk's lists.
    assert names("/v1/organization_domains") == ["beta.io", "acme.dev", "acme.com"]
    assert names("/v1/organization_domains?order_by=name") == ["acme.com", "acme.dev", "beta.io"]
    assert names(f"/v1/organizations/{org_id}/domains?verified=false") == ["acme.dev"]
    assert names(f"/v1/organizations/{org_id}/domains?enrollment_mode=-manual_invitation") == ["acme.com"]
    assert names(f"/v1/organization_domains?query={other}") == ["beta.io"]
    assert names("/v1/organization_domains?query=DEV") == ["acme.dev"]
    assert names("/v1/organization_domains?domains=acme.com&domains=beta.io") == ["beta.io", "acme.com"]
    mixed = "/v1/organization_domains?enrollment_mode=automatic_suggestion,-automatic_invitation"
    assert names(mixed) == ["beta.io"]
    assert names(f"/v1/organization_domains?organization_id={org_id}&verified=true") == ["acme.com"]
    assert names("/v1/organization_domains?enrollment_mode=magic", 422)["param_name"] == "enrollment_mode"
    assert names("/v1/organization_domains?query=%20", 422)["param_name"] == "query"
    assert names("/v1/organization_domains?verified=maybe", 422)["param_name"] == "verified"
    status, _, _ = raw(emu, "GET", "/v1/organizations/org_nobody/domains")
    assert status == 404

    status, _, listed = raw(emu, "GET", "/v1/role_sets?query=default&order_by=-name")
    assert (status, listed["total_count"]) == (200, 1)
    role_set = listed["data"][0]
    assert raw(emu, "GET", f"/v1/role_sets/{role_set['key']}")[2] == role_set
    assert raw(emu, "GET", f"/v1/role_sets/{role_set['id']}")[2] == role_set
    assert raw(emu, "GET", "/v1/role_sets/role_set:none")[0] == 404
    assert raw(emu, "GET", "/v1/role_sets?query=nothing")[2] == {"data": [], "total_count": 0}
    assert raw(emu, "GET", "/v1/role_sets?order_by=color")[0] == 422


def test_reconciliation_finds_a_missed_permission_deletion(
    emu: Emulator, world: tuple[Recorder, str, str], engine: Engine
) -> None:
    recorder, org_id, user_id = world
    apply(engine, recorder.parsed())
    assert member(engine, org_id, user_id).permissions == ["org:posts:publish"]
    publish = next(p for p in emu.state.snapshot()["permissions"] if p["key"] == "org:posts:publish")
    emu.state.delete_permission(publish["id"])  # its webhook is lost

    listing = emu.state.snapshot()["permissions"]
    with session_scope(make_session_factory(engine)) as session:
        drift = write_listing(session, PERMISSIONS, listing, now_ms=NOW + 1)
        missing = absent_rows(
            session, PERMISSIONS, seen={(p["id"],) for p in listing}, listed_since_ms=NOW + 1
        )
        drift.merge(
            tombstone_objects(
                session, PERMISSIONS, [m.key[0] for m in missing], listed_since_ms=NOW + 1, now_ms=NOW + 2
            )
        )
    assert drift.counts[PERMISSIONS]["tombstoned"] == 1
    # The role row still names the key (no role.updated came): the membership's grants drop it anyway.
    assert member(engine, org_id, user_id).permissions == []
