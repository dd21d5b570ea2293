"""The emulator's in-memory records, its strictly increasing clock and its Clerk-like ids."""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]

_ID_ALPHABET = string.ascii_letters + string.digits


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Clock:
    """Epoch milliseconds that never repeat and never go back.

    Every change takes its own tick, so the events of one object are totally ordered by their
    ``updated_at`` (and envelope ``timestamp``) even when many changes fall in the same
    millisecond: the emitted history is unambiguous for a mirror that orders by version.
    """

    def __init__(self, now: Callable[[], int] = wall_ms) -> None:
        self._now = now
        self._last = 0
        self._lock = threading.Lock()

    def tick(self) -> int:
        with self._lock:
            self._last = max(self._now(), self._last + 1)
            return self._last

    def peek(self) -> int:
        with self._lock:
            return max(self._now(), self._last)


class IdGenerator:
    """Ids shaped like Clerk's (``org_2...`` with 27 base62 characters), reproducible from a seed."""

    def __init__(self, seed: int | str | None = None) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def new(self, prefix: str) -> str:
        with self._lock:
            tail = "".join(self._rng.choice(_ID_ALPHABET) for _ in range(26))
        return f"{prefix}_2{tail}"


@dataclass
class PermissionRecord:
    id: str
    key: str
    name: str
    description: str
    type: str
    created_at: int
    updated_at: int


@dataclass
class RoleRecord:
    id: str
    key: str
    name: str
    description: str | None
    permission_ids: list[str]
    is_creator_eligible: bool
    created_at: int
    updated_at: int


@dataclass
class UserRecord:
    id: str
    email_id: str
    email_address: str
    first_name: str | None
    last_name: str | None
    username: str | None
    created_at: int
    updated_at: int
    public_metadata: Json = field(default_factory=dict)
    private_metadata: Json = field(default_factory=dict)
    external_id: str | None = None


@dataclass
class OrganizationRecord:
    id: str
    name: str
    slug: str
    max_allowed_memberships: int
    admin_delete_enabled: bool
    created_by: str | None
    created_at: int
    updated_at: int
    public_metadata: Json = field(default_factory=dict)
    private_metadata: Json = field(default_factory=dict)


@dataclass
class MembershipRecord:
    id: str
    organization_id: str
    user_id: str
    role: str
    created_at: int
    updated_at: int
    public_metadata: Json = field(default_factory=dict)
    private_metadata: Json = field(default_factory=dict)


@dataclass
class InvitationRecord:
    id: str
    organization_id: str
    email_address: str
    role: str
    status: str
    inviter_id: str | None
    url: str | None
    expires_at: int | None
    created_at: int
    updated_at: int
    user_id: str | None = None
    public_metadata: Json = field(default_factory=dict)
    private_metadata: Json = field(default_factory=dict)


@dataclass
class DomainRecord:
    """An organization domain; ``verified`` stands for a completed affiliation verification."""

    id: str
    organization_id: str
    name: str
    enrollment_mode: str
    verified: bool
    created_at: int
    updated_at: int
