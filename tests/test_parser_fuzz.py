"""Any JSON value in any field of any event: parsed or rejected, and what is parsed, the database holds."""

from __future__ import annotations

import copy
import json
import math
import uuid
from typing import Any

import pytest
from histories import T0
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from emulator.payloads import deleted as deleted_stub
from emulator.payloads import (
    domain_data,
    invitation_data,
    membership_data,
    organization_data,
    permission_data,
    role_data,
    user_data,
)
from models.errors import PayloadError
from models.events import MIRRORED_EVENT_TYPES, event_writes, parse_event
from models.inbox import store_delivery
from models.mirror import apply_events
from models.reconcile import unseen_organizations
from models.tables import InboxStatus

Path = tuple[str | int, ...]

ORG = organization_data("org_1", slug="acme", public_metadata={"plan": "pro", "limits": [1, 2.5]})


def valid_data(event_type: str) -> dict[str, Any]:
    """A payload the parser accepts, with nested objects and lists to mutate."""
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
        return deleted_stub("role", "role_1") if action == "deleted" else role_data("role_1", "org:editor")
    if resource == "permission":
        if action == "deleted":
            return deleted_stub("permission", "perm_1")
        return permission_data("perm_1", "org:x")
    if resource == "organizationDomain":
        return (
            deleted_stub("organization_domain", "orgdmn_1")
            if action == "deleted"
            else domain_data("orgdmn_1", "org_1")
        )
    return deleted_stub("user", "user_1") if action == "deleted" else user_data("user_1")


def valid_envelope(event_type: str) -> dict[str, Any]:
    return {
        "type": event_type,
        "object": "event",
        "data": copy.deepcopy(valid_data(event_type)),
        "timestamp": T0,
        "instance_id": "ins_test",
    }


def paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every field and list item, at any depth (the root excluded)."""
    found: list[Path] = []
    children: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


def replaced(value: dict[str, Any], path: Path, new: Any) -> dict[str, Any]:
    result = copy.deepcopy(value)
    target: Any = result
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return result


# The edges of what the columns hold, beside what hypothesis invents.
EDGE_INTEGERS = [2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**15, 253_402_300_800_000, -1, 10**40]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 1.5, 1e300, 1716883200.5]
EDGE_TEXTS = ["\x00", "org:\x00admin", "\ud800", "x" * 65, "x" * 129, "x" * 321, "999999999999999999999", "²"]

edges = st.sampled_from([*EDGE_INTEGERS, *EDGE_FLOATS, *EDGE_TEXTS])
any_scalar = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.text(max_size=300)
)
# Three edges in four: hypothesis alone rarely lands a NUL or a 2**63 in the one field that
# cannot hold it within a hundred examples.
scalars = st.integers(0, 3).flatmap(lambda pick: edges if pick else any_scalar)
keys = st.text(max_size=8) | st.sampled_from(["id", "\x00", "\ud800"])
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("event_type", sorted(MIRRORED_EVENT_TYPES))
def test_the_unmutated_payloads_are_valid(event_type: str) -> None:
    event = parse_event("msg_1", json.dumps(valid_envelope(event_type)))
    assert event_writes(event)


@pytest.mark.parametrize("event_type", sorted(MIRRORED_EVENT_TYPES))
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_field_any_value_is_accepted_and_stored_or_rejected_with_a_reason(
    session_factory: sessionmaker[Session], event_type: str, data: st.DataObject
) -> None:
    base = valid_envelope(event_type)
    path = data.draw(st.sampled_from(paths(base)), label="path")
    new = data.draw(json_values, label="value")
    body = json.dumps(replaced(base, path, new))
    svix_id = f"msg_{uuid.uuid4().hex}"
    with session_factory() as session:
        # Intake stores every verified body, whatever it holds.
        stored = store_delivery(session, svix_id=svix_id, body=body, received_at=T0)
        assert stored.status in InboxStatus.ALL
        try:
            event = parse_event(svix_id, body)
        except PayloadError as exc:
            assert str(exc)
        else:
            # The intake's quick classification never turns away what the worker would apply.
            assert stored.status == InboxStatus.PENDING
            # What the parser accepts, the database holds: the worker's whole apply path.
            unseen_organizations(session, [event])
            apply_events(session, [event], now_ms=T0)
            session.flush()
        session.rollback()
