"""One Clerk instance built in the emulator and mirrored from its own events: the read API's test world.

Everything happens ten days in the past on the emulator's clock, then the clock is set to
now: an invitation that expired in between reads as expired on both sides. The mirror is
filled by applying every event the emulator emitted (what the webhooks would deliver), the
defaults announced first as a mirror that wants roles and permissions would have them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from emulator import State
from emulator.payloads import envelope
from emulator.records import Clock, wall_ms
from models.db import make_session_factory, session_scope
from models.events import ROLE_SETS, Event, parse_event
from models.mirror import apply_events
from models.reconcile import write_listing

TOKEN = "orgsync-read-api-test-token-1"
OTHER_TOKEN = "orgsync-read-api-test-token-2"
DAY_MS = 86_400_000

# (name, first name, last name, username): emails are name@acme.test.
PEOPLE: tuple[tuple[str, str | None, str | None, str | None], ...] = (
    ("alice", "Alice", "Archer", "alice_a"),
    ("bob", "Bob", "Baker", None),
    ("carol", "Carol", "Cole", "carolc"),
    ("dan", "Dan", "Diaz", None),
    ("erin", "Erin", "Evans", "erin"),
    ("frank", "Frank", None, None),
    ("grace", "Grace", "Green", "gg"),
    ("heidi", None, "Hall", None),
    ("ivan", "Ivan", "Ivanov", "ivan"),
    ("zoe", "Zoe", "Zimmer", None),
)


@dataclass
class World:
    state: State
    events: list[Event] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)
    orgs: dict[str, str] = field(default_factory=dict)
    invitations: dict[str, str] = field(default_factory=dict)
    created_at: dict[str, int] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    permissions: dict[str, str] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)


def build_world() -> World:
    """The state, with every event it emitted parsed as the mirror would receive it."""
    now = [wall_ms() - 10 * DAY_MS]
    state = State(clock=Clock(lambda: now[0]), seed=42)
    world = World(state)

    def record(event_type: str, data: dict[str, Any], timestamp: int) -> None:
        body = json.dumps(envelope(event_type, data, timestamp=timestamp, instance_id="ins_readapi"))
        world.events.append(parse_event(f"msg_{len(world.events)}", body))

    state.subscribe(record)
    state.announce_defaults()
    state.create_role(
        name="Billing", key="org:billing", permissions=["org:sys_billing:read", "org:sys_billing:manage"]
    )
    for name, first, last, username in PEOPLE:
        user = state.create_user(
            email_address=f"{name}@acme.test",
            first_name=first,
            last_name=last,
            username=username,
            public_metadata={"team": name[0]},
            external_id=f"ext-{name}" if name[0] < "m" else None,
        )
        world.users[name] = user["id"]
        world.created_at[name] = user["created_at"]
    u = world.users
    for slug, name, creator in (
        ("acme", "Acme Corp", "alice"),
        ("beta", "Beta Labs", "bob"),
        ("gamma", "Gamma Group", "carol"),
        ("delta", "Delta", None),
        ("temp", "Temporary", "zoe"),
    ):
        org = state.create_organization(
            name=name,
            slug=slug,
            created_by=u[creator] if creator else None,
            public_metadata={"tier": slug},
            private_metadata={"crm": f"crm-{slug}"},
        )
        world.orgs[slug] = org["id"]
    o = world.orgs
    for org, who, role in (
        ("acme", "bob", "org:member"),
        ("acme", "carol", "org:member"),
        ("acme", "dan", "org:billing"),
        ("acme", "erin", "org:member"),
        ("acme", "frank", "org:member"),
        ("acme", "grace", "org:admin"),
        ("acme", "heidi", "org:member"),
        ("acme", "zoe", "org:member"),
        ("beta", "alice", "org:member"),
        ("beta", "ivan", "org:member"),
        ("gamma", "dan", "org:member"),
        ("temp", "ivan", "org:member"),
    ):
        state.add_membership(o[org], user_id=u[who], role=role, private_metadata={"seat": who})
    state.update_membership_role(o["acme"], u["erin"], role="org:billing")
    state.update_membership_metadata(o["acme"], u["carol"], public_metadata={"desk": 12})
    state.remove_membership(o["acme"], u["zoe"])
    state.update_organization(o["gamma"], name="Gamma Group International")
    invites = (
        ("judy", "acme", "judy@acme.test", "org:member", {"inviter_user_id": u["alice"]}),
        ("ken", "acme", "ken@ext.test", "org:billing", {}),
        ("liam", "acme", "liam@acme.test", "org:member", {"expires_in_days": 7}),
        ("mia", "acme", "mia@acme.test", "org:member", {"inviter_user_id": u["grace"]}),
        ("dan-beta", "beta", "dan@acme.test", "org:admin", {"inviter_user_id": u["bob"]}),
        ("nina", "beta", "nina@beta.test", "org:member", {"public_metadata": {"src": "fair"}}),
        ("olga", "temp", "olga@acme.test", "org:member", {}),
    )
    for key, org, email, role, extra in invites:
        inv = state.create_invitation(o[org], email_address=email, role=role, **extra)
        world.invitations[key] = inv["id"]
    state.revoke_invitation(o["acme"], world.invitations["ken"])
    mia = state.accept_invitation(world.invitations["mia"], first_name="Mia", last_name="Moss")
    world.users["mia"] = mia["public_user_data"]["user_id"]
    state.delete_organization(o["temp"])
    # Domains last: their pending-invitation counts, sent with their events, stay true.
    for name, org, mode, verified in (
        ("acme.test", "acme", "automatic_invitation", True),
        ("acme-labs.test", "acme", "manual_invitation", False),
        ("beta.test", "beta", "automatic_suggestion", True),
        ("gamma.test", "gamma", "manual_invitation", True),
        ("gone.test", "gamma", "manual_invitation", True),
    ):
        dom = state.create_domain(o[org], name=name, enrollment_mode=mode, verified=verified)
        world.domains[name] = dom["id"]
    state.update_domain(o["gamma"], world.domains["gamma.test"], enrollment_mode="automatic_suggestion")
    state.delete_domain(o["gamma"], world.domains["gone.test"])
    world.roles = {r["key"]: r["id"] for r in state.list_roles(limit=500).data}
    world.permissions = {p["key"]: p["id"] for p in state.list_permissions(limit=500).data}
    now[0] = wall_ms()
    return world


def mirror(world: World, engine: Engine) -> None:
    """Apply every event the world emitted to the mirror at ``engine``, then list its role sets.

    Clerk sends no event for role sets: reconciliation lists them, as here.
    """
    with session_scope(make_session_factory(engine)) as session:
        apply_events(session, world.events, now_ms=wall_ms())
        write_listing(session, ROLE_SETS, world.state.list_role_sets(limit=500).data, now_ms=wall_ms())
