"""Parsing Clerk webhook bodies into events, their rows, and the versions that order them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from histories import T0

from emulator.payloads import deleted as deleted_stub
from emulator.payloads import (
    domain_data,
    invitation_data,
    membership_data,
    organization_data,
    permission_data,
    role_data,
    user_data,
    webhook_body,
)
from models.errors import PayloadError, PermanentError
from models.events import (
    MEMBERSHIPS,
    MIRRORED_EVENT_TYPES,
    ORGANIZATIONS,
    Event,
    event_writes,
    membership_version,
    normalize_role_key,
    normalize_timestamp,
    object_version,
    parse_event,
    primary_identifier,
)

SPEC = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "clerk-openapi" / "webhooks-2025-04-15.yml"
)
ORG = organization_data("org_1", slug="acme")


def body(event_type: str, data: dict[str, Any], timestamp: int = T0) -> str:
    return webhook_body(event_type, data, timestamp)


def sample(event_type: str) -> dict[str, Any]:
    resource, _, action = event_type.partition(".")
    if resource == "organization":
        return deleted_stub("organization", "org_1", slug="acme") if action == "deleted" else ORG
    if resource == "organizationMembership":
        return membership_data("orgmem_1", ORG, "user_1")
    if resource == "organizationInvitation":
        status = {"created": "pending"}.get(action, action)
        return invitation_data(
            "orginv_1", "org_1", status=status, user_id="user_1" if status == "accepted" else None
        )
    if resource == "role":
        return (
            deleted_stub("role", "role_1", slug=None)
            if action == "deleted"
            else role_data("role_1", "org:editor")
        )
    if resource == "permission":
        return (
            deleted_stub("permission", "perm_1")
            if action == "deleted"
            else permission_data("perm_1", "org:posts:edit")
        )
    if resource == "organizationDomain":
        return (
            deleted_stub("organization_domain", "orgdmn_1")
            if action == "deleted"
            else domain_data("orgdmn_1", "org_1")
        )
    return deleted_stub("user", "user_1", external_id="ex_1") if action == "deleted" else user_data("user_1")


@pytest.mark.parametrize("event_type", sorted(MIRRORED_EVENT_TYPES))
def test_every_mirrored_type_parses(event_type: str) -> None:
    event = parse_event("msg_1", body(event_type, sample(event_type)))
    assert event == Event("msg_1", event_type, T0, sample(event_type))
    writes = event_writes(event)
    assert writes
    assert all(len(write.version) in (47, 62) for write in writes)


def test_spec_examples_parse_when_the_spec_is_at_hand() -> None:
    if not SPEC.exists():
        pytest.skip("Clerk's webhook spec is not beside the project")
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load(SPEC.read_text())
    seen = set()
    for event_type, item in spec["x-webhooks"].items():
        if event_type not in MIRRORED_EVENT_TYPES:
            continue
        example = item["post"]["requestBody"]["content"]["application/json"]["example"]
        event = parse_event(f"msg_{event_type}", json.dumps(example))
        assert event.timestamp_ms == example["timestamp"] * 1000
        assert event_writes(event)
        seen.add(event_type)
    assert seen == MIRRORED_EVENT_TYPES


def test_membership_writes_the_membership_and_its_organization_snapshot() -> None:
    event = parse_event(
        "msg_1", body("organizationMembership.created", sample("organizationMembership.created"))
    )
    membership, organization = event_writes(event)
    assert membership.table == MEMBERSHIPS
    assert membership.key == ("org_1", "user_1")
    assert membership.values["id"] == "orgmem_1"
    assert membership.values["identifier"] == "user_1@example.com"
    assert membership.values["permissions"] == ["org:sys_memberships:read"]
    assert organization.table == ORGANIZATIONS
    assert organization.values["slug"] == "acme"
    assert organization.values["deleted"] is False
    # The snapshot ranks below the organization's own updated event at the same updated_at.
    updated = event_writes(parse_event("msg_2", body("organization.updated", ORG, T0 - 5000)))[0]
    assert organization.version < updated.version


def test_user_keeps_public_data_only() -> None:
    data = user_data("user_1", emails=["other@example.com", "main@example.com"], primary=1)
    (write,) = event_writes(parse_event("msg_1", body("user.created", data)))
    assert write.values["identifier"] == "main@example.com"
    assert "private_metadata" not in write.values
    assert "phone_numbers" not in write.values
    assert write.values["first_name"] == "John"


def test_primary_identifier_falls_back_to_the_first_address() -> None:
    assert (
        primary_identifier({"email_addresses": [{"id": "a", "email_address": "first@x.io"}]}) == "first@x.io"
    )
    assert primary_identifier({"primary_email_address_id": "zz", "email_addresses": []}) is None
    assert primary_identifier({}) is None


def test_role_permissions_are_stored_as_keys() -> None:
    data = role_data("role_1", "org:editor", permissions=["org:posts:edit", "org:posts:publish"])
    (write,) = event_writes(parse_event("msg_1", body("role.updated", data)))
    assert write.values["permissions"] == ["org:posts:edit", "org:posts:publish"]


def test_role_deleted_full_form_keeps_its_data_and_is_deleted() -> None:
    data = {**role_data("role_1", "org:editor"), "deleted": True}
    (write,) = event_writes(parse_event("msg_1", body("role.deleted", data)))
    assert write.deleted
    assert write.values["key"] == "org:editor"


def test_deleted_flag_marks_a_deletion_whatever_the_type_says() -> None:
    (write,) = event_writes(parse_event("msg_1", body("role.updated", {"id": "role_1", "deleted": True})))
    assert write.deleted


@pytest.mark.parametrize(
    ("legacy", "modern"),
    [("admin", "org:admin"), ("basic_member", "org:member"), ("guest_member", "org:guest_member")],
)
def test_legacy_role_keys_are_normalised(legacy: str, modern: str) -> None:
    data = membership_data("orgmem_1", ORG, "user_1", role=legacy)
    (membership, _org) = event_writes(parse_event("msg_1", body("organizationMembership.updated", data)))
    assert membership.values["role"] == modern
    invitation = invitation_data("orginv_1", "org_1", role=legacy)
    (write,) = event_writes(parse_event("msg_2", body("organizationInvitation.created", invitation)))
    assert write.values["role"] == modern


def test_other_role_keys_are_kept_verbatim() -> None:
    assert normalize_role_key("editor") == "editor"
    assert normalize_role_key("org:billing") == "org:billing"


def test_lenient_about_missing_optional_fields() -> None:
    minimal = {
        "id": "orgmem_1",
        "role": "org:member",
        "organization": {"id": "org_1"},
        "public_user_data": {"user_id": "user_1"},
    }
    membership, organization = event_writes(
        parse_event("msg_1", body("organizationMembership.created", minimal))
    )
    assert membership.values["created_at"] is None
    assert membership.values["permissions"] is None
    assert organization.values["name"] is None
    invitation = parse_event(
        "msg_2", body("organizationInvitation.created", {"id": "orginv_1", "organization_id": "org_1"})
    )
    assert event_writes(invitation)[0].values["status"] == "pending"
    drifted = {**ORG, "name": 42, "created_at": "1716883200000", "brand_new_field": {"x": 1}}
    (write,) = event_writes(parse_event("msg_3", body("organization.updated", drifted)))
    assert write.values["name"] is None
    assert write.values["created_at"] == T0


def test_membership_deleted_without_role_is_accepted() -> None:
    data = membership_data("orgmem_1", ORG, "user_1")
    del data["role"]
    (write, _org) = event_writes(parse_event("msg_1", body("organizationMembership.deleted", data)))
    assert write.deleted


def test_invitation_status_follows_the_event_type() -> None:
    data = invitation_data("orginv_1", "org_1", status="expired")
    (write,) = event_writes(parse_event("msg_1", body("organizationInvitation.revoked", data)))
    assert write.values["status"] == "revoked"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{not json", "body is not valid JSON"),
        (b"\xff\xfe", "body is not valid JSON"),
        ("[1, 2]", "body is not a JSON object"),
        ('{"object": "event", "data": {}, "timestamp": 1}', "type missing or not a string"),
        ('{"type": 7, "data": {}, "timestamp": 1}', "type missing or not a string"),
        ('{"type": "user.created", "object": "thing", "data": {}, "timestamp": 1}', "object is not 'event'"),
        (
            '{"type": "session.created", "data": {}, "timestamp": 1}',
            "event type 'session.created' is not mirrored",
        ),
        (
            '{"type": "user.created", "data": [], "timestamp": 1}',
            "data missing or not an object for user.created",
        ),
        ('{"type": "user.created", "timestamp": 1}', "data missing or not an object for user.created"),
        ('{"type": "user.created", "data": {"id": "u"}}', "timestamp missing or not a non-negative number"),
        (
            '{"type": "user.created", "data": {"id": "u"}, "timestamp": "1"}',
            "timestamp missing or not a non-negative number",
        ),
        (
            '{"type": "user.created", "data": {"id": "u"}, "timestamp": true}',
            "timestamp missing or not a non-negative number",
        ),
        (
            '{"type": "user.created", "data": {"id": "u"}, "timestamp": -5}',
            "timestamp missing or not a non-negative number",
        ),
    ],
)
def test_envelope_errors_name_the_reason(raw: str | bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event("msg_1", raw)
    assert str(caught.value) == reason
    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize(
    ("event_type", "data", "reason"),
    [
        (
            "organizationMembership.created",
            {"role": "org:member", "organization": {"id": "o"}, "public_user_data": {"user_id": "u"}},
            "data.id missing for organizationMembership.created",
        ),
        (
            "organizationMembership.updated",
            {"id": "m", "role": "org:member", "public_user_data": {"user_id": "u"}},
            "data.organization.id missing for organizationMembership.updated",
        ),
        (
            "organizationMembership.deleted",
            {"id": "m", "organization": {"id": "o"}, "public_user_data": {}},
            "data.public_user_data.user_id missing for organizationMembership.deleted",
        ),
        (
            "organizationMembership.created",
            {"id": "m", "organization": {"id": "o"}, "public_user_data": {"user_id": "u"}},
            "data.role missing for organizationMembership.created",
        ),
        (
            "organizationInvitation.created",
            {"organization_id": "o"},
            "data.id missing for organizationInvitation.created",
        ),
        (
            "organizationInvitation.accepted",
            {"id": "i"},
            "data.organization_id missing for organizationInvitation.accepted",
        ),
        ("organization.deleted", {"deleted": True}, "data.id missing for organization.deleted"),
        ("role.deleted", {"id": 5, "deleted": True}, "data.id missing for role.deleted"),
        ("permission.updated", {"id": ""}, "data.id missing for permission.updated"),
        ("user.updated", {}, "data.id missing for user.updated"),
    ],
)
def test_data_errors_name_the_field_and_type(event_type: str, data: dict[str, Any], reason: str) -> None:
    with pytest.raises(PayloadError, match=f"^{reason}$"):
        parse_event("msg_1", body(event_type, data))


def test_empty_delivery_id_is_rejected() -> None:
    with pytest.raises(PayloadError, match="svix-id"):
        parse_event("", body("user.created", user_data("user_1")))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1716883200, 1716883200000),
        (1716883200000, 1716883200000),
        (1716883200.5, 1716883200500),
        (0, 0),
        (10**11, 10**11),
    ],
)
def test_timestamp_seconds_or_milliseconds(raw: float, expected: int) -> None:
    assert normalize_timestamp(raw) == expected


def test_versions_are_fixed_width_lowercase_hex_and_digits() -> None:
    version = membership_version(
        created_at=T0, updated_at=T0, kind="created", timestamp_ms=T0, svix_id="msg_1"
    )
    assert len(version) == 62
    assert all(c in "0123456789abcdef" for c in version)
    other = object_version(updated_at=T0, rank=1, timestamp_ms=T0, svix_id="msg_1")
    assert len(other) == 47
    # Out-of-range inputs clamp instead of breaking the width.
    assert len(object_version(updated_at=-1, rank=0, timestamp_ms=10**16, svix_id="x")) == 47
    with pytest.raises(ValueError, match="one digit"):
        object_version(updated_at=0, rank=10, timestamp_ms=0, svix_id="x")


def mv(created: int, updated: int, kind: str, ts: int = T0, svix_id: str = "msg") -> str:
    return membership_version(
        created_at=created, updated_at=updated, kind=kind, timestamp_ms=ts, svix_id=svix_id
    )


def test_membership_version_ordering() -> None:
    created = mv(T0, T0, "created")
    updated = mv(T0, T0 + 10, "updated")
    deleted = mv(T0, T0 + 10, "deleted")
    readded = mv(T0 + 20, T0 + 20, "created")
    assert created < updated < deleted < readded
    # The deletion repeats the last change's updated_at; its kind rank wins even if it left earlier.
    assert mv(T0, T0 + 10, "updated", ts=T0 + 99) < mv(T0, T0 + 10, "deleted", ts=T0 + 11)
    # A late update of the old generation never outranks the new generation.
    assert mv(T0, T0 + 500, "updated") < readded
    # Equal object timestamps and kinds: envelope time, then the delivery hash, decide.
    assert mv(T0, T0, "updated", ts=T0) < mv(T0, T0, "updated", ts=T0 + 1)
    assert mv(T0, T0, "updated", svix_id="a") != mv(T0, T0, "updated", svix_id="b")
    assert mv(T0, T0, "updated", svix_id="a") == mv(T0, T0, "updated", svix_id="a")


def test_object_versions_order_by_updated_at_then_rank() -> None:
    def ov(updated: int, rank: int, ts: int = T0) -> str:
        return object_version(updated_at=updated, rank=rank, timestamp_ms=ts, svix_id="msg")

    assert ov(T0, 0, ts=T0 + 100) < ov(T0, 1) < ov(T0 + 1, 0)
    assert ov(9, 0) < ov(10, 0) < ov(100, 0)  # fixed width: no lexical surprises


def test_invitation_versions_rank_final_states_above_pending() -> None:
    pending = event_writes(
        parse_event("m1", body("organizationInvitation.created", invitation_data("i", "o"), T0 + 9))
    )
    accepted = event_writes(
        parse_event("m2", body("organizationInvitation.accepted", invitation_data("i", "o"), T0))
    )
    assert pending[0].version < accepted[0].version
    assert accepted[0].values["status"] == "accepted"


def test_deleted_stub_versions_use_the_envelope_time_and_top_rank() -> None:
    stub = event_writes(parse_event("m1", body("user.deleted", deleted_stub("user", "user_1"), T0 + 10)))[0]
    update = event_writes(
        parse_event("m2", body("user.updated", user_data("user_1", updated_at=T0 + 10), T0 + 10))
    )[0]
    assert stub.deleted
    assert stub.values["updated_at"] is None
    assert stub.version.startswith(f"{T0 + 10:015d}2")
    assert update.version < stub.version


def _with(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**data, **changes}


MEMBERSHIP = membership_data("orgmem_1", ORG, "user_1")
NUL = "(PostgreSQL text cannot hold it)"
RANGE = "is not a time in milliseconds between 1970 and 9999"


@pytest.mark.parametrize(
    ("event_type", "data", "reason"),
    [
        (
            "organization.created",
            _with(ORG, name="Acme\x00"),
            f"organizations.name contains a NUL character {NUL}",
        ),
        (
            "organization.created",
            _with(ORG, id="org_\x00"),
            f"organizations.id contains a NUL character {NUL}",
        ),
        (
            "user.updated",
            _with(user_data("user_1"), first_name="\ud800"),
            "users.first_name is not valid Unicode",
        ),
        ("role.created", role_data("role_1", "org:" + "k" * 200), "roles.key is longer than 128 characters"),
        (
            "organizationMembership.created",
            _with(MEMBERSHIP, role="org:" + "k" * 200),
            "memberships.role is longer than 128 characters",
        ),
        (
            "organization.created",
            _with(ORG, id="org_" + "1" * 61),
            "organizations.id is longer than 64 characters",
        ),
        (
            "organizationInvitation.created",
            _with(invitation_data("orginv_1", "org_1"), email_address="a" * 400 + "@example.com"),
            "invitations.email_address is longer than 320 characters",
        ),
        (
            "organization.created",
            _with(ORG, created_at=float("inf")),
            "data.created_at is inf, not a finite number",
        ),
        (
            "organization.created",
            _with(ORG, updated_at=float("nan")),
            "data.updated_at is nan, not a finite number",
        ),
        ("organization.created", _with(ORG, created_at=2**64), f"data.created_at {RANGE}"),
        ("organization.created", _with(ORG, created_at=-1), f"data.created_at {RANGE}"),
        ("organization.created", _with(ORG, created_at=1.5), "data.created_at is not a whole number"),
        (
            "organization.created",
            _with(ORG, created_at="9" * 5000),
            "data.created_at is a number beyond the signed 64-bit range",
        ),
        (
            "organizationMembership.updated",
            _with(MEMBERSHIP, organization=_with(ORG, updated_at=10**16)),
            f"data.organization.updated_at {RANGE}",
        ),
        (
            "organization.updated",
            _with(ORG, members_count=2**31),
            "organizations.members_count is outside the signed 32-bit range",
        ),
        (
            "organization.updated",
            _with(ORG, public_metadata={"plan": float("nan")}),
            "organizations.public_metadata holds NaN or an infinity, which JSON cannot represent",
        ),
        (
            "organization.updated",
            _with(ORG, private_metadata={"notes": ["ok", "bad\x00"]}),
            f"organizations.private_metadata holds a string that contains a NUL character {NUL}",
        ),
        (
            "user.updated",
            _with(user_data("user_1"), public_metadata={"\x00": 1}),
            f"users.public_metadata holds a key that contains a NUL character {NUL}",
        ),
        (
            "role.updated",
            _with(role_data("role_1", "org:editor"), permissions=["org:a", "org:\x00"]),
            f"roles.permissions holds a string that contains a NUL character {NUL}",
        ),
        (
            "organization.updated",
            _with(ORG, public_metadata=json.loads('{"a":' * 100 + "1" + "}" * 100)),
            "organizations.public_metadata is nested deeper than 64 levels",
        ),
    ],
)
def test_content_the_database_cannot_hold_is_rejected_naming_the_field(
    event_type: str, data: dict[str, Any], reason: str
) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event("msg_1", body(event_type, data))
    assert str(caught.value).startswith(reason)
    assert str(caught.value).endswith(f" for {event_type}")
    # The reason names the field, never echoes the text that is wrong.
    assert "\x00" not in str(caught.value)
    assert "kkkk" not in str(caught.value)


@pytest.mark.parametrize(
    ("raw_timestamp", "reason"),
    [
        ("Infinity", "timestamp is not a finite number"),
        ("NaN", "timestamp is not a finite number"),
        ("1e400", "timestamp is not a finite number"),
        (str(2**64), "timestamp is after the year 9999"),
        ("253402300800000", "timestamp is after the year 9999"),
    ],
)
def test_envelope_timestamps_out_of_range_are_rejected(raw_timestamp: str, reason: str) -> None:
    raw = body("user.created", user_data("user_1")).replace(
        f'"timestamp": {T0}', f'"timestamp": {raw_timestamp}'
    )
    with pytest.raises(PayloadError, match=f"^{reason}$"):
        parse_event("msg_1", raw)


def test_the_edges_of_every_range_are_accepted() -> None:
    data = _with(ORG, created_at=0, updated_at=253_402_300_799_999, members_count=2**31 - 1, name="n" * 256)
    data["public_metadata"] = {
        "big": 2**70,
        "float": 1e300,
        "nested": json.loads('{"a":' * 60 + "1" + "}" * 60),
    }
    event = parse_event("msg_1", body("organization.created", data, timestamp=253_402_300_799_999))
    (write,) = event_writes(event)
    assert write.values["updated_at"] == 253_402_300_799_999
    assert write.values["members_count"] == 2**31 - 1


def test_drifted_types_stay_lenient() -> None:
    data = _with(ORG, created_at="1716883200000", updated_at="²", members_count=[1], email_addresses=True)
    (write,) = event_writes(parse_event("msg_1", body("organization.created", data)))
    assert write.values["created_at"] == 1716883200000
    assert write.values["updated_at"] is None
    assert write.values["members_count"] is None
    user = _with(user_data("user_1"), email_addresses=True)
    (write,) = event_writes(parse_event("msg_1", body("user.created", user)))
    assert write.values["identifier"] is None


def test_a_body_nested_beyond_the_json_parser_is_rejected() -> None:
    with pytest.raises(PayloadError, match=r"^body is not valid JSON$"):
        parse_event("msg_1", "[" * 100_000 + "]" * 100_000)
