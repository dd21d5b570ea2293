"""Seeded streams of realistic organization activity, driven through the state's own methods.

A scenario step picks an action (joins, role changes, removals, re-adds, invitations created,
accepted and revoked, metadata edits, organizations created, renamed and deleted, users
deleted) and a target with its own seeded generator, then calls the same ``State`` methods
the Backend API calls, so every step emits exactly the webhooks the API would. A step that
Clerk's rules refuse (e.g. demoting the last admin) is counted as rejected with its code.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from emulator.errors import ClerkError
from emulator.state import ADMIN_ROLE, MEMBER_ROLE, State

FIRST_NAMES = ("Ada", "Grace", "Alan", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Radia", "Edsger")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Torvalds", "Liskov", "Thompson", "Hamilton", "Ritchie")
ORG_WORDS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell", "Cyberdyne")
EDITOR_ROLE = "org:editor"

DEFAULT_WEIGHTS: dict[str, int] = {
    "join": 20,
    "role_change": 18,
    "remove": 10,
    "readd": 8,
    "invite": 12,
    "accept": 8,
    "revoke": 4,
    "metadata": 8,
    "create_org": 3,
    "update_org": 2,
    "delete_org": 1,
    "delete_user": 1,
}


@dataclass
class ScenarioReport:
    steps: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "actions": dict(sorted(self.actions.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "skipped": self.skipped,
        }


class Scenario:
    """A reproducible activity generator over one ``State`` (same seed, same history: same stream)."""

    def __init__(
        self,
        state: State,
        *,
        seed: int = 0,
        weights: dict[str, int] | None = None,
        min_orgs: int = 3,
        max_orgs: int = 30,
        max_members: int = 40,
    ) -> None:
        self.state = state
        self.rng = random.Random(seed)
        self.weights = dict(weights or DEFAULT_WEIGHTS)
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown scenario actions: {', '.join(sorted(unknown))}")
        self.min_orgs = min_orgs
        self.max_orgs = max_orgs
        self.max_members = max_members
        self._removed: list[tuple[str, str]] = []
        self._counter = 0
        self._actions = {
            "join": self._join,
            "role_change": self._role_change,
            "remove": self._remove,
            "readd": self._readd,
            "invite": self._invite,
            "accept": self._accept,
            "revoke": self._revoke,
            "metadata": self._metadata,
            "create_org": self._create_org,
            "update_org": self._update_org,
            "delete_org": self._delete_org,
            "delete_user": self._delete_user,
        }

    # ----------------------------------------------------------------- running
    def run(
        self, steps: int, *, rate: float | None = None, stop: threading.Event | None = None
    ) -> ScenarioReport:
        """Run ``steps`` steps, at ``rate`` steps per second if given (else as fast as possible)."""
        report = ScenarioReport()
        started = time.monotonic()
        for n in range(steps):
            if stop is not None and stop.is_set():
                break
            if rate:
                wait = started + n / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            self.step(report)
        return report

    def step(self, report: ScenarioReport | None = None) -> str:
        """One action; returns its name (``skipped`` when nothing fitted)."""
        report = report if report is not None else ScenarioReport()
        report.steps += 1
        self._ensure_basics()
        names = [n for n, w in self.weights.items() if w > 0]
        order = self.rng.choices(names, weights=[self.weights[n] for n in names], k=len(names) * 2)
        for name in order:
            try:
                done = self._actions[name]()
            except ClerkError as exc:
                report.actions[name] += 1
                report.rejected[exc.code] += 1
                return name
            if done:
                report.actions[name] += 1
                return name
        report.skipped += 1
        return "skipped"

    # ----------------------------------------------------------------- helpers
    def _ensure_basics(self) -> None:
        if EDITOR_ROLE not in self.state.role_keys():
            self.state.create_role(
                name="Editor",
                key=EDITOR_ROLE,
                description="Edits the organization profile.",
                permissions=["org:sys_memberships:read", "org:sys_profile:manage"],
            )
        while len(self.state.organization_ids()) < self.min_orgs:
            self._create_org()

    def _name(self) -> tuple[str, str]:
        return self.rng.choice(FIRST_NAMES), self.rng.choice(LAST_NAMES)

    def _email(self, first: str, last: str) -> str:
        self._counter += 1
        return f"{first.lower()}.{last.lower()}.{self._counter}.{self.rng.randrange(10**6)}@example.com"

    def _new_user(self) -> str:
        first, last = self._name()
        data = self.state.create_user(
            email_address=self._email(first, last), first_name=first, last_name=last
        )
        return str(data["id"])

    def _org(self) -> str | None:
        orgs = self.state.organization_ids()
        return self.rng.choice(orgs) if orgs else None

    def _member(self) -> tuple[str, str, str] | None:
        org = self._org()
        if org is None:
            return None
        members = self.state.members_of(org)
        if not members:
            return None
        user, role = self.rng.choice(members)
        return org, user, role

    def _role(self) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            return ADMIN_ROLE
        if roll < 0.3 and EDITOR_ROLE in self.state.role_keys():
            return EDITOR_ROLE
        return MEMBER_ROLE

    # ----------------------------------------------------------------- actions
    def _join(self) -> bool:
        org = self._org()
        if org is None or len(self.state.members_of(org)) >= self.max_members:
            return False
        members = {u for u, _ in self.state.members_of(org)}
        candidates = [u for u in self.state.user_ids() if u not in members]
        user = self.rng.choice(candidates) if candidates and self.rng.random() < 0.5 else self._new_user()
        self.state.add_membership(org, user_id=user, role=self._role())
        return True

    def _role_change(self) -> bool:
        picked = self._member()
        if picked is None:
            return False
        org, user, current = picked
        choices = [r for r in self.state.role_keys() if r != current]
        if not choices:
            return False
        self.state.update_membership_role(org, user, role=self.rng.choice(choices))
        return True

    def _remove(self) -> bool:
        picked = self._member()
        if picked is None:
            return False
        org, user, _ = picked
        self.state.remove_membership(org, user)
        self._removed.append((org, user))
        return True

    def _readd(self) -> bool:
        orgs, users = set(self.state.organization_ids()), set(self.state.user_ids())
        self._removed = [(o, u) for o, u in self._removed if o in orgs and u in users]
        candidates = [(o, u) for o, u in self._removed if u not in {m for m, _ in self.state.members_of(o)}]
        if not candidates:
            return False
        org, user = self.rng.choice(candidates)
        self._removed.remove((org, user))
        self.state.add_membership(org, user_id=user, role=self._role())
        return True

    def _invite(self) -> bool:
        org = self._org()
        if org is None:
            return False
        first, last = self._name()
        admins = [u for u, r in self.state.members_of(org) if r == ADMIN_ROLE]
        self.state.create_invitation(
            org,
            email_address=self._email(first, last),
            role=self._role(),
            inviter_user_id=self.rng.choice(admins) if admins else None,
            public_metadata={"source": "scenario"},
        )
        return True

    def _pending(self) -> tuple[str, str] | None:
        org = self._org()
        if org is None:
            return None
        pending = self.state.pending_invitations_of(org)
        if not pending:
            return None
        inv, _ = self.rng.choice(pending)
        return org, inv

    def _accept(self) -> bool:
        picked = self._pending()
        if picked is None:
            return False
        first, last = self._name()
        self.state.accept_invitation(picked[1], first_name=first, last_name=last)
        return True

    def _revoke(self) -> bool:
        picked = self._pending()
        if picked is None:
            return False
        self.state.revoke_invitation(picked[0], picked[1])
        return True

    def _metadata(self) -> bool:
        picked = self._member()
        if picked is None:
            return False
        org, user, _ = picked
        key = self.rng.choice(("team", "title", "level"))
        value = None if self.rng.random() < 0.2 else self.rng.choice(("a", "b", "c", 1, 2, 3))
        self.state.update_membership_metadata(org, user, public_metadata={key: value})
        return True

    def _create_org(self) -> bool:
        if len(self.state.organization_ids()) >= self.max_orgs:
            return False
        users = self.state.user_ids()
        creator = self.rng.choice(users) if users and self.rng.random() < 0.3 else self._new_user()
        name = f"{self.rng.choice(ORG_WORDS)} {self.rng.choice(('Labs', 'Corp', 'Group', 'Works'))}"
        self.state.create_organization(name=name, created_by=creator)
        return True

    def _update_org(self) -> bool:
        org = self._org()
        if org is None:
            return False
        self.state.update_organization(org, name=f"{self.rng.choice(ORG_WORDS)} {self.rng.randrange(1000)}")
        return True

    def _delete_org(self) -> bool:
        if len(self.state.organization_ids()) <= self.min_orgs:
            return False
        org = self._org()
        if org is None:
            return False
        self.state.delete_organization(org)
        return True

    def _delete_user(self) -> bool:
        users = self.state.user_ids()
        if len(users) < 10:
            return False
        self.state.delete_user(self.rng.choice(users))
        return True


def seed_state(state: State, *, organizations: int, members: int, seed: int = 0) -> None:
    """``organizations`` organizations of ``members`` members each (the first one an admin), with a
    few pending invitations each: the ``--seed-orgs``/``--seed-members`` starting point."""
    rng = random.Random(f"{seed}:seed")
    for n in range(organizations):
        users: list[str] = []
        for m in range(members):
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            email = f"{first.lower()}.{last.lower()}.{n}.{m}@org{n}.example.com"
            users.append(str(state.create_user(email_address=email, first_name=first, last_name=last)["id"]))
        word = rng.choice(ORG_WORDS)
        creator = users[0] if users else None
        org = str(
            state.create_organization(name=f"{word} {n}", slug=f"{word.lower()}-{n}", created_by=creator)[
                "id"
            ]
        )
        for user in users[1:]:
            state.add_membership(org, user_id=user, role=MEMBER_ROLE)
        for k in range(1 + members // 10):
            state.create_invitation(
                org,
                email_address=f"invitee.{n}.{k}@org{n}.example.com",
                role=MEMBER_ROLE,
                inviter_user_id=creator,
            )
