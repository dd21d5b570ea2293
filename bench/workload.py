"""The benchmark's workload: plausible organizationMembership histories as signed webhook requests."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from svix.webhooks import Webhook

from emulator.payloads import (
    BARE_ORGANIZATION,
    OMIT,
    membership_data,
    organization_data,
    user_public_data,
    webhook_body,
)

WEBHOOK_PATH = "/webhooks/clerk"
ROLES = (
    ("org:member", "Member", ["org:sys_memberships:read"]),
    (
        "org:admin",
        "Admin",
        ["org:sys_memberships:read", "org:sys_memberships:manage", "org:sys_profile:manage"],
    ),
    ("org:billing", "Billing manager", ["org:sys_memberships:read", "org:sys_billing:manage"]),
)
IMAGE = "https://img.clerk.com/eyJ0eXBlIjoicHJveHkiLCJzcmMiOiJ"
# What Clerk adds to every event it sends.
EVENT_ATTRIBUTES = {
    "http_request": {
        "client_ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0",
    }
}


def _clerk_id(prefix: str, rng: random.Random) -> str:
    return prefix + "".join(
        rng.choices("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", k=27)
    )


class Workload:
    """Membership events from one plausible history: adds, role changes, removals and re-adds.

    Many organizations and users; each removal carries the full membership with its last
    ``updated_at`` (as Clerk sends it), and a re-add gets a new ``orgmem_`` id.
    """

    def __init__(self, rng: random.Random, organizations: int, users: int, start_ms: int) -> None:
        self.rng = rng
        self.clock = start_ms
        self.orgs = [self._organization(n, start_ms) for n in range(organizations)]
        self.users = [self._user(n) for n in range(users)]
        self.live: dict[tuple[int, int], dict[str, Any]] = {}
        self.keys: list[tuple[int, int]] = []
        self.index: dict[tuple[int, int], int] = {}
        self.instance = _clerk_id("ins_", rng)

    def _organization(self, n: int, start_ms: int) -> dict[str, Any]:
        # The shape of a membership's organization as Clerk sends it: no counts.
        return organization_data(
            _clerk_id("org_", self.rng),
            name=f"Organization {n}",
            slug=f"organization-{n}",
            image_url=IMAGE + "b3JnLWxvZ28ifQ",
            has_image=n % 3 == 0,
            members_count=OMIT,
            missing_member_with_elevated_permissions=OMIT,
            pending_invitations_count=OMIT,
            max_allowed_memberships=0,
            created_by=_clerk_id("user_", self.rng),
            public_metadata={"plan": ("free", "team", "enterprise")[n % 3]},
            created_at=start_ms - 86_400_000 * (1 + n % 300),
        )

    def _user(self, n: int) -> dict[str, Any]:
        return user_public_data(
            _clerk_id("user_", self.rng),
            identifier=f"person.{n}@example{n % 97}.com",
            first_name=f"First{n}",
            last_name=f"Last{n}",
            image_url=IMAGE + "dXNlci1hdmF0YXIifQ",
            profile_image_url=OMIT,
            has_image=n % 2 == 0,
        )

    def _add(self, key: tuple[int, int]) -> None:
        self.index[key] = len(self.keys)
        self.keys.append(key)

    def _remove(self, key: tuple[int, int]) -> None:
        position = self.index.pop(key)
        last = self.keys.pop()
        if last != key:
            self.keys[position] = last
            self.index[last] = position
        del self.live[key]

    def _membership(self, key: tuple[int, int], role: int) -> dict[str, Any]:
        role_key, role_name, permissions = ROLES[role]
        user = self.users[key[1]]
        return membership_data(
            _clerk_id("orgmem_", self.rng),
            self.orgs[key[0]],
            user["user_id"],
            role=role_key,
            role_name=role_name,
            permissions=permissions,
            public_user_data=user,
            created_at=self.clock,
        )

    def next_event(self) -> tuple[str, dict[str, Any], int]:
        """(type, data, envelope timestamp in ms) of the next event of the history."""
        self.clock += self.rng.randint(1, 40)
        draw = self.rng.random()
        if self.keys and draw >= 0.55:
            key = self.keys[self.rng.randrange(len(self.keys))]
            membership = self.live[key]
            if draw < 0.85:
                role = (ROLES.index(next(r for r in ROLES if r[0] == membership["role"])) + 1) % len(ROLES)
                membership = dict(
                    membership,
                    role=ROLES[role][0],
                    role_name=ROLES[role][1],
                    permissions=ROLES[role][2],
                    updated_at=self.clock,
                )
                self.live[key] = membership
                return "organizationMembership.updated", membership, self.clock
            self._remove(key)
            return "organizationMembership.deleted", membership, self.clock
        while True:
            key = (self.rng.randrange(len(self.orgs)), self.rng.randrange(len(self.users)))
            if key not in self.live:
                break
        membership = self._membership(key, 0 if self.rng.random() < 0.8 else 1)
        self.live[key] = membership
        self._add(key)
        return "organizationMembership.created", membership, self.clock

    def body(self, event_type: str, data: dict[str, Any], timestamp_ms: int) -> str:
        return webhook_body(
            event_type, data, timestamp_ms, instance_id=self.instance, event_attributes=EVENT_ATTRIBUTES
        )

    def bodies(self, count: int) -> list[str]:
        return [self.body(*self.next_event()) for _ in range(count)]

    def created_for_new_users(self, count: int, tag: str) -> tuple[list[str], list[str]]:
        """Bodies adding ``count`` brand-new users (so each one is a new mirror row), and their ids."""
        bodies, user_ids = [], []
        for n in range(count):
            self.clock += 1
            user = dict(self.users[n % len(self.users)], user_id=f"user_{tag}{n:08d}")
            org = self.orgs[n % len(self.orgs)]
            data = dict(self._membership((0, 0), 0), organization=org, public_user_data=user)
            bodies.append(self.body("organizationMembership.created", data, self.clock))
            user_ids.append(user["user_id"])
        return bodies, user_ids


class MessageIds:
    """Unique svix ids for the whole run (every phase draws from the same counter)."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:10]
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"msg_{self.tag}{self.count:017d}"


def signed_requests(secret: str, ids: MessageIds, bodies: Sequence[str], port: int) -> list[bytes]:
    """Complete HTTP/1.1 requests, signed now (Svix accepts 5 minutes of skew), ready to write."""
    webhook = Webhook(secret)
    now = datetime.now(tz=UTC)
    stamp = str(int(now.timestamp()))
    out = []
    for body in bodies:
        msg_id = ids.next()
        raw = body.encode()
        head = (
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
            f"svix-id: {msg_id}\r\nsvix-timestamp: {stamp}\r\n"
            f"svix-signature: {webhook.sign(msg_id, now, body)}\r\n\r\n"
        )
        out.append(head.encode() + raw)
    return out


def synthetic_memberships(orgs: int, members: int, *, updated_at: int) -> list[dict[str, Any]]:
    """API-shaped memberships, as a listing returns them (for the mirror write path alone)."""
    return [
        membership_data(
            f"orgmem_{n}_{m}",
            organization_data(f"org_{n}", name=OMIT, slug=OMIT, created_at=OMIT, **BARE_ORGANIZATION),
            f"user_{n}_{m}",
            role_name="Member",
            public_metadata={"n": m},
            public_user_data={"user_id": f"user_{n}_{m}", "identifier": f"u{n}.{m}@example.com"},
            created_at=1_700_000_000_000,
            updated_at=updated_at,
        )
        for n in range(orgs)
        for m in range(members)
    ]
