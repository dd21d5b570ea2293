"""Provisioning rules: the file format and its validation, matching, modes, loop safety, the hook."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from emulator.payloads import (
    OMIT,
    invitation_data,
    membership_data,
    organization_data,
    permission_data,
    role_data,
    webhook_body,
)
from models.db import make_session_factory, session_scope
from models.events import Event
from models.inbox import store_delivery
from models.mirror import apply_events
from models.tables import Command, CommandStatus, InboxEvent, InboxStatus, Membership, RuleState
from orgsync.cli import cli
from orgsync.cli.base import EXIT_CONFIG, Runtime
from worker.apply import apply_inbox
from worker.rules import (
    CHANGE,
    INVITATION_ACCEPTED,
    MEMBER_JOINED,
    REFUSED,
    ROLE_CHANGED,
    Decision,
    RuleSet,
    RulesHook,
    Target,
    apply_rules,
    evaluate,
    events_by_membership,
    first_match,
    matches,
    plan_rules,
    stopped_states,
)
from worker.rules_format import RulesError, load_rules, parse_rules

NOW = 1_700_000_000_000
ADMIN, MEMBER, BILLING = "org:admin", "org:member", "org:billing"

# -- the file format -----------------------------------------------------------------------

YAML_RULES = """
rules:
  - name: acme-admins
    mode: on_join
    role: org:admin
    when:
      organization: {slug: acme, metadata: {plan: [pro, enterprise], "billing.tier": gold}}
      user: {email_domain: acme.test, identifier: "*@acme.test", identifier_regex: '[a-z.]+@acme\\.test'}
      membership: {metadata: {team: ops}}
      invitation: {private_metadata: {source: hr}}
      role: [org:member]
      event: [member_joined, invitation_accepted]
  - name: keep-billing
    mode: enforce
    role: org:billing
    dry_run: true
    when:
      organization: {id: org_billing}
      user: {id: [user_b1, user_b2]}
"""

TOML_RULES = """
[[rules]]
name = "acme-admins"
mode = "on_join"
role = "org:admin"
[rules.when]
role = ["org:member"]
event = ["member_joined", "invitation_accepted"]
[rules.when.organization]
slug = "acme"
metadata = { plan = ["pro", "enterprise"], "billing.tier" = "gold" }
[rules.when.user]
email_domain = "acme.test"
identifier = "*@acme.test"
identifier_regex = '[a-z.]+@acme\\.test'
[rules.when.membership]
metadata = { team = "ops" }
[rules.when.invitation]
private_metadata = { source = "hr" }

[[rules]]
name = "keep-billing"
mode = "enforce"
role = "org:billing"
dry_run = true
[rules.when.organization]
id = "org_billing"
[rules.when.user]
id = ["user_b1", "user_b2"]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_toml_files_load_to_the_same_rules(tmp_path: Path) -> None:
    from_yaml = load_rules(write(tmp_path, "rules.yaml", YAML_RULES))
    from_toml = load_rules(write(tmp_path, "rules.toml", TOML_RULES))
    assert from_yaml.rules == from_toml.rules
    first, second = from_yaml.rules
    assert (first.index, first.name, first.mode, first.role, first.dry_run) == (
        1,
        "acme-admins",
        "on_join",
        ADMIN,
        False,
    )
    assert first.when.organization_slugs == ("acme",)
    assert first.when.events == (MEMBER_JOINED, INVITATION_ACCEPTED)
    assert first.when.organization_metadata[1].path == ("billing", "tier")
    assert (second.mode, second.dry_run, second.when.user_ids) == ("enforce", True, ("user_b1", "user_b2"))
    assert load_rules(write(tmp_path, "rules.yml", YAML_RULES)).rules == from_yaml.rules


def test_an_empty_file_has_no_rules(tmp_path: Path) -> None:
    assert load_rules(write(tmp_path, "rules.yaml", "")).rules == ()
    assert load_rules(write(tmp_path, "rules.toml", "rules = []")).rules == ()


def rule_yaml(**fields: Any) -> str:
    base: dict[str, Any] = {"name": "first-rule", "mode": "on_join", "role": ADMIN}
    base.update(fields)
    for key in [key for key, value in base.items() if value is ...]:
        del base[key]
    good = {"name": "ok", "mode": "enforce", "role": MEMBER}
    return json.dumps({"rules": [good, base]})  # JSON is YAML: the bad rule is rule 2


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"name": ...}, "name", "required"),
        ({"name": "has space"}, "name", "letters, digits"),
        ({"name": "x" * 129}, "name", "at most 128"),
        ({"mode": "sometimes"}, "mode", "one of on_join, enforce"),
        ({"mode": ...}, "mode", "required"),
        ({"role": ...}, "role", "required"),
        ({"role": 7}, "role", "role key"),
        ({"dry_run": "yes"}, "dry_run", "true or false"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"when": ["x"]}, "when", "mapping"),
        ({"when": {"weather": "sunny"}}, "when.weather", "unknown condition"),
        ({"when": {"user": {"email": "a@b"}}}, "when.user.email", "unknown condition"),
        ({"when": {"organization": "acme"}}, "when.organization", "mapping"),
        ({"when": {"organization": {"slug": 3}}}, "when.organization.slug", "non-empty string"),
        ({"when": {"organization": {"id": []}}}, "when.organization.id", "empty list"),
        ({"when": {"event": "user_deleted"}}, "when.event", "unknown event 'user_deleted'"),
        ({"when": {"user": {"email_domain": "a@acme.test"}}}, "when.user.email_domain", "not a domain"),
        (
            {"when": {"user": {"identifier_regex": "(unclosed"}}},
            "when.user.identifier_regex",
            "invalid regular",
        ),
        (
            {"when": {"membership": {"metadata": {"k": {"a": 1}}}}},
            "when.membership.metadata.k",
            "values must",
        ),
        ({"when": {"invitation": {"metadata": []}}}, "when.invitation.metadata", "non-empty mapping"),
        ({"when": {"organization": {"metadata": {"a..b": 1}}}}, "when.organization.metadata.a..b", "keys"),
        ({"when": {"role": [None]}}, "when.role", "non-empty string"),
    ],
)
def test_each_validation_error_names_file_rule_and_field(
    tmp_path: Path, fields: dict[str, Any], field: str, message: str
) -> None:
    path = write(tmp_path, "rules.yaml", rule_yaml(**fields))
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: rule 2"), text
    assert f"field {field}:" in text, text
    assert message in text, text
    if "name" in fields and fields["name"] is not ...:
        assert repr(fields["name"]) in text


def test_errors_name_the_rule_by_index_and_name(tmp_path: Path) -> None:
    path = write(tmp_path, "rules.yaml", rule_yaml(mode="never"))
    with pytest.raises(RulesError, match=r"rule 2 \('first-rule'\): field mode: "):
        load_rules(path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("rules.json", "{}", "unknown rules file format '.json'"),
        ("rules.yaml", "rules: [\n  - {name: a\n", "not valid YAML at line"),
        ("rules.toml", "[[rules]\n", "not valid TOML"),
        ("rules.yaml", "- just a list", "top level must be a mapping"),
        ("rules.yaml", "rules: []\nextra: 1", "unknown top-level field(s) 'extra'"),
        ("rules.yaml", "rules: {a: 1}", "field rules: must be a list"),
        ("rules.yaml", "rules: [3]", "rule 1: must be a mapping"),
        (
            "rules.yaml",
            "rules: [{name: a, mode: enforce, role: org:admin}, {name: a, mode: enforce, role: org:admin}]",
            "rule 2 ('a'): field name: duplicate of rule 1",
        ),
    ],
)
def test_file_level_errors_name_the_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert str(caught.value).startswith(f"{path}: "), caught.value
    assert message in str(caught.value)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="rules file not found"):
        load_rules(tmp_path / "nope.yaml")


def test_unknown_role_keys_are_reported_against_the_mirrored_roles(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "rules": [
                {"name": "a", "mode": "enforce", "role": ADMIN},
                {"name": "b", "mode": "enforce", "role": "org:admn", "when": {"role": "org:membr"}},
            ]
        }
    )
    path = write(tmp_path, "rules.yaml", text)
    with pytest.raises(RulesError) as caught:
        load_rules(path, known_roles={ADMIN, MEMBER})
    message = str(caught.value)
    assert f"{path}: rule 2 ('b'): field role: unknown role 'org:admn'" in message
    assert "field when.role: unknown role 'org:membr'" in message
    assert "roles in the mirror: org:admin, org:member" in message
    assert load_rules(path).rules  # no roles known: nothing to check against


# -- matching ------------------------------------------------------------------------------


def target(**overrides: Any) -> Target:
    values: dict[str, Any] = {
        "organization_id": "org_acme",
        "organization_slug": "Acme",
        "organization_metadata": {"plan": "pro", "billing": {"tier": "gold"}, "seats": 10, "sso": True},
        "organization_private_metadata": {"region": "eu"},
        "user_id": "user_1",
        "identifier": "Jane.Doe@Acme.Test",
        "membership_id": "orgmem_1",
        "role": MEMBER,
        "membership_metadata": {"team": "ops"},
        "membership_private_metadata": {"cost_center": 42},
        "invitation_id": "orginv_1",
        "invitation_metadata": {"source": "hr"},
        "invitation_private_metadata": {"ticket": "T-1"},
        "events": frozenset({MEMBER_JOINED}),
    }
    values.update(overrides)
    return Target(**values)


def one_rule(when: dict[str, Any], mode: str = "enforce", role: str = ADMIN, name: str = "r") -> RuleSet:
    return parse_rules(json.dumps({"rules": [{"name": name, "mode": mode, "role": role, "when": when}]}))


@pytest.mark.parametrize(
    ("when", "hit", "miss"),
    [
        ({"organization": {"id": "org_acme"}}, {}, {"organization_id": "org_other"}),
        ({"organization": {"id": ["org_x", "org_acme"]}}, {}, {"organization_id": "org_y"}),
        ({"organization": {"slug": "acme"}}, {}, {"organization_slug": "acme-2"}),
        ({"organization": {"slug": "acme"}}, {}, {"organization_slug": None}),
        ({"organization": {"metadata": {"plan": "pro"}}}, {}, {"organization_metadata": {"plan": "free"}}),
        ({"organization": {"metadata": {"plan": ["free", "pro"]}}}, {}, {"organization_metadata": {}}),
        (
            {"organization": {"metadata": {"billing.tier": "gold"}}},
            {},
            {"organization_metadata": {"billing": 1}},
        ),
        ({"organization": {"metadata": {"seats": 10}}}, {}, {"organization_metadata": {"seats": "10"}}),
        ({"organization": {"metadata": {"sso": True}}}, {}, {"organization_metadata": {"sso": 1}}),
        ({"organization": {"metadata": {"gone": None}}}, {"organization_metadata": {"gone": None}}, {}),
        (
            {"organization": {"private_metadata": {"region": "eu"}}},
            {},
            {"organization_private_metadata": None},
        ),
        ({"user": {"id": "user_1"}}, {}, {"user_id": "user_2"}),
        ({"user": {"email_domain": "acme.test"}}, {}, {"identifier": "jane@acme.test.evil"}),
        ({"user": {"email_domain": "@ACME.test"}}, {}, {"identifier": "jane"}),
        ({"user": {"email_domain": "*.acme.test"}}, {"identifier": "j@eu.acme.test"}, {}),
        ({"user": {"identifier": "jane.*@acme.test"}}, {}, {"identifier": "john@acme.test"}),
        ({"user": {"identifier": "j?ne.doe@*"}}, {}, {"identifier": None}),
        (
            {"user": {"identifier_regex": r"[a-z]+\.doe@acme\.test"}},
            {},
            {"identifier": "x.jane.doe@acme.test.x"},
        ),
        ({"membership": {"metadata": {"team": "ops"}}}, {}, {"membership_metadata": None}),
        ({"membership": {"private_metadata": {"cost_center": 42}}}, {}, {"membership_private_metadata": {}}),
        (
            {"invitation": {"metadata": {"source": "hr"}}},
            {},
            {"invitation_id": None, "invitation_metadata": None},
        ),
        ({"invitation": {"private_metadata": {"ticket": "T-1"}}}, {}, {"invitation_private_metadata": {}}),
        ({"role": MEMBER}, {}, {"role": ADMIN}),
        ({"role": [BILLING, MEMBER]}, {}, {"role": ADMIN}),
        ({"event": "member_joined"}, {}, {"events": frozenset({ROLE_CHANGED})}),
        (
            {"event": ["role_changed", "invitation_accepted"]},
            {"events": frozenset({INVITATION_ACCEPTED})},
            {},
        ),
        ({"event": "role_changed"}, {"events": frozenset({ROLE_CHANGED})}, {"events": frozenset()}),
    ],
)
def test_every_condition_kind_matches_and_misses(
    when: dict[str, Any], hit: dict[str, Any], miss: dict[str, Any]
) -> None:
    rule = one_rule(when).rules[0]
    assert matches(rule, target(**hit))
    if miss:
        assert not matches(rule, target(**miss))
    assert matches(one_rule({}).rules[0], target(**miss))  # no conditions: everything


def test_conditions_combine_with_and() -> None:
    rule = one_rule({"organization": {"slug": "acme"}, "user": {"email_domain": "acme.test"}}).rules[0]
    assert matches(rule, target())
    assert not matches(rule, target(organization_slug="other"))
    assert not matches(rule, target(identifier="jane@other.test"))


def test_the_first_matching_rule_wins() -> None:
    ruleset = parse_rules(
        json.dumps(
            {
                "rules": [
                    {
                        "name": "ops",
                        "mode": "enforce",
                        "role": BILLING,
                        "when": {"membership": {"metadata": {"team": "ops"}}},
                    },
                    {
                        "name": "acme",
                        "mode": "enforce",
                        "role": ADMIN,
                        "when": {"user": {"email_domain": "acme.test"}},
                    },
                    {"name": "everyone", "mode": "enforce", "role": MEMBER},
                ]
            }
        )
    )
    assert first_match(ruleset, target()).name == "ops"  # type: ignore[union-attr]
    assert first_match(ruleset, target(membership_metadata={})).name == "acme"  # type: ignore[union-attr]
    assert first_match(ruleset, target(membership_metadata={}, identifier="x@y.z")).name == "everyone"  # type: ignore[union-attr]


# -- the engine on a real mirror -----------------------------------------------------------

_counter = iter(range(1, 10**9))


# Only the fields these tests read: what a payload leaves out (OMIT) the mirror stores as null.
def org_data(
    org: str = "org_acme", slug: str = "acme", metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    return organization_data(
        org,
        name=slug.title(),
        slug=slug,
        image_url=OMIT,
        has_image=OMIT,
        members_count=OMIT,
        missing_member_with_elevated_permissions=OMIT,
        pending_invitations_count=OMIT,
        max_allowed_memberships=OMIT,
        admin_delete_enabled=OMIT,
        public_metadata=metadata,
        private_metadata=OMIT,
        created_by=OMIT,
        created_at=NOW - 10_000,
    )


def membership_event(
    action: str,
    user: str,
    role: str,
    *,
    at: int,
    org: str = "org_acme",
    slug: str = "acme",
    generation: int = 1,
    email: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Event:
    created = NOW + generation * 1_000_000
    data = membership_data(
        f"orgmem_{org}_{user}_{generation}",
        org_data(org, slug),
        user,
        role=role,
        role_name=OMIT,
        permissions=[],
        public_metadata=metadata,
        private_metadata=OMIT,
        public_user_data={"user_id": user, "identifier": email or f"{user}@acme.test"},
        created_at=created,
        updated_at=created + at,
    )
    return Event(f"msg_{next(_counter)}", f"organizationMembership.{action}", created + at, data)


def invitation_accepted(user: str, *, org: str = "org_acme", at: int, metadata: dict[str, Any]) -> Event:
    data = invitation_data(
        f"orginv_{user}",
        org,
        email=f"{user}@acme.test",
        role=MEMBER,
        role_name=OMIT,
        status="accepted",
        user_id=user,
        public_metadata=metadata,
        url=OMIT,
        expires_at=OMIT,
        created_at=at - 5_000,
        updated_at=at,
    )
    return Event(f"msg_{next(_counter)}", "organizationInvitation.accepted", at, data)


def role_event(key: str, permissions: list[str]) -> Event:
    data = role_data(
        f"role_{key}",
        key,
        name=key,
        description=OMIT,
        is_creator_eligible=OMIT,
        permissions=[
            permission_data(
                f"perm_{p}", p, name=OMIT, description=OMIT, type=OMIT, created_at=OMIT, updated_at=OMIT
            )
            for p in permissions
        ],
        created_at=NOW,
    )
    return Event(f"msg_{next(_counter)}", "role.created", NOW, data)


def mirror(factory: sessionmaker[Session], *events: Event) -> None:
    with session_scope(factory) as session:
        apply_events(session, list(events), now_ms=NOW)


class Runner:
    """Runs the rules as the hook does, one batch at a time, with the commands core's semantics."""

    def __init__(
        self, factory: sessionmaker[Session], text: str, *, max_reversals: int = 2, dry_run: bool = False
    ):
        self.factory = factory
        self.ruleset = parse_rules(text)
        self.max_reversals = max_reversals
        self.dry_run = dry_run
        self.clock = NOW

    def batch(self, *events: Event) -> list[Command]:
        mirror(self.factory, *events)
        self.clock += 1_000
        with session_scope(self.factory) as session:
            report = apply_rules(
                session,
                self.ruleset,
                now_ms=self.clock,
                max_reversals=self.max_reversals,
                dry_run_default=self.dry_run,
                events_by_key=events_by_membership(events),
            )
            return [command for _, command in report.commands]

    def on_demand(self) -> list[Decision]:
        with session_scope(self.factory) as session:
            return evaluate(session, self.ruleset, now_ms=self.clock, max_reversals=self.max_reversals)

    def finish(
        self, *commands: Command, status: str = CommandStatus.CONFIRMED, applied_at: int | None = None
    ) -> None:
        """What the worker does with a sent command: applied in Clerk, then confirmed."""
        with session_scope(self.factory) as session:
            for command in commands:
                row = session.get(Command, command.id)
                assert row is not None
                row.status = status
                row.applied_at = self.clock if applied_at is None else applied_at

    def commands(self) -> list[Command]:
        with session_scope(self.factory) as session:
            rows = list(session.scalars(select(Command).order_by(Command.id)).all())
            session.expunge_all()
            return rows

    def state(self, rule: str, user: str, org: str = "org_acme") -> RuleState | None:
        with session_scope(self.factory) as session:
            row = session.get(RuleState, (rule, org, user))
            if row is not None:
                session.expunge(row)
            return row


def rules_text(*rules: dict[str, Any]) -> str:
    return json.dumps({"rules": list(rules)})


ACME_ON_JOIN = {
    "name": "acme-admins",
    "mode": "on_join",
    "role": ADMIN,
    "when": {"organization": {"slug": "acme"}, "user": {"email_domain": "acme.test"}},
}


def test_on_join_applies_once_per_membership_generation(session_factory: sessionmaker[Session]) -> None:
    run = Runner(session_factory, rules_text(ACME_ON_JOIN))
    run.batch(membership_event("created", "user_owner", ADMIN, at=0, email="owner@other.test"))
    [command] = run.batch(membership_event("created", "user_1", MEMBER, at=0))
    assert (command.kind, command.user_id, command.role, command.status) == (
        "set_role",
        "user_1",
        ADMIN,
        "pending",
    )
    assert (command.requested_by, command.rule_name) == ("rule:acme-admins", "acme-admins")
    state = run.state("acme-admins", "user_1")
    assert state is not None and state.on_join_done_at is not None
    assert state.membership_id == "orgmem_org_acme_user_1_1"
    run.finish(command)
    # The echo of the rule's own change, and a human's later demotion: neither re-applies it.
    assert run.batch(membership_event("updated", "user_1", ADMIN, at=10)) == []
    assert run.batch(membership_event("updated", "user_1", MEMBER, at=20)) == []
    assert [d for d in run.on_demand() if d.action == CHANGE] == []
    # Removed and added again: a new generation (new orgmem_ id), on_join applies again.
    run.batch(membership_event("deleted", "user_1", MEMBER, at=30))
    [again] = run.batch(membership_event("created", "user_1", MEMBER, at=0, generation=2))
    assert again.idempotency_key != command.idempotency_key
    state = run.state("acme-admins", "user_1")
    assert state is not None and state.membership_id == "orgmem_org_acme_user_1_2"


def test_on_join_needs_a_join_after_a_batch_but_backfills_on_demand(
    session_factory: sessionmaker[Session],
) -> None:
    run = Runner(session_factory, rules_text(ACME_ON_JOIN))
    # Joined before the rules existed: a later update is not a join.
    mirror(session_factory, membership_event("created", "user_1", MEMBER, at=0))
    assert run.batch(membership_event("updated", "user_1", MEMBER, at=5)) == []
    [decision] = run.on_demand()
    assert (decision.action, decision.target.user_id, decision.rule.role) == (CHANGE, "user_1", ADMIN)
    # Already holding the role: recorded as handled, no command.
    run.batch(membership_event("created", "user_2", ADMIN, at=0))
    state = run.state("acme-admins", "user_2")
    assert state is not None and state.on_join_done_at is not None
    assert [c.user_id for c in run.commands()] == []


def test_invitation_accepted_pairs_with_the_membership_in_any_order(
    session_factory: sessionmaker[Session],
) -> None:
    rule = {
        "name": "hr-billing",
        "mode": "on_join",
        "role": BILLING,
        "when": {"event": "invitation_accepted", "invitation": {"metadata": {"dept": "finance"}}},
    }
    run = Runner(session_factory, rules_text(rule))
    joined = membership_event("created", "user_1", MEMBER, at=0)
    accepted_at = joined.data["created_at"]
    # The acceptance first (no membership yet: nothing to do), then the membership.
    assert run.batch(invitation_accepted("user_1", at=accepted_at, metadata={"dept": "finance"})) == []
    [command] = run.batch(joined)
    assert command.role == BILLING
    # The other order, in one batch.
    joined2 = membership_event("created", "user_2", MEMBER, at=0)
    [command2] = run.batch(
        invitation_accepted("user_2", at=accepted_at, metadata={"dept": "finance"}), joined2
    )
    assert command2.user_id == "user_2"
    # A join without an invitation does not match an invitation_accepted rule.
    assert run.batch(membership_event("created", "user_3", MEMBER, at=0)) == []


ENFORCE_BILLING = {
    "name": "billing-stays",
    "mode": "enforce",
    "role": BILLING,
    "when": {"user": {"id": "user_1"}},
}


def test_enforce_restores_drift_and_stops_after_max_reversals(
    session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    run = Runner(session_factory, rules_text(ENFORCE_BILLING), max_reversals=2)
    run.batch(membership_event("created", "user_owner", ADMIN, at=0, email="owner@acme.test"))
    joined = membership_event("created", "user_1", MEMBER, at=0)
    first_created_at = joined.data["created_at"]
    [first] = run.batch(joined)
    assert (first.role, first.idempotency_key) == (
        BILLING,
        "rule:billing-stays:orgmem_org_acme_user_1_1:enforce:1",
    )
    # Another event for the membership while the command is open: wait, do not count.
    assert run.batch(membership_event("updated", "user_1", MEMBER, at=1, metadata={"x": 1})) == []
    # Applied in Clerk but the echo not mirrored yet: a late older event must not trigger another.
    run.finish(first, status=CommandStatus.APPLIED, applied_at=first_created_at + 5)
    assert run.batch(membership_event("updated", "user_1", MEMBER, at=2)) == []
    assert run.batch(membership_event("updated", "user_1", BILLING, at=10)) == []  # the echo
    run.finish(first)
    state = run.state("billing-stays", "user_1")
    assert state is not None and state.reversals == 1 and state.stopped_at is None
    # A human changes it back: reversal 2.
    [second] = run.batch(membership_event("updated", "user_1", MEMBER, at=20))
    run.finish(second)
    assert run.batch(membership_event("updated", "user_1", BILLING, at=30)) == []
    # And again: the rule has fought enough, it stops instead of sending a third command.
    with caplog.at_level(logging.WARNING, logger="worker.rules"):
        assert run.batch(membership_event("updated", "user_1", MEMBER, at=40)) == []
    state = run.state("billing-stays", "user_1")
    assert state is not None and state.reversals == 2 and state.stopped_at is not None
    assert "stopped after 2 reversal(s)" in (state.stopped_reason or "")
    assert "rule 'billing-stays' stopped for user_1" in caplog.text
    assert run.batch(membership_event("updated", "user_1", ADMIN, at=50)) == []
    assert len(run.commands()) == 2
    with session_scope(session_factory) as session:
        assert [s.user_id for s in stopped_states(session, run.ruleset)] == ["user_1"]
    # A new generation starts afresh.
    run.batch(membership_event("deleted", "user_1", ADMIN, at=60))
    [fresh] = run.batch(membership_event("created", "user_1", MEMBER, at=0, generation=2))
    assert fresh.idempotency_key.endswith("_2:enforce:1")
    with session_scope(session_factory) as session:
        assert stopped_states(session) == []


def test_a_failed_command_is_a_reversal_too(session_factory: sessionmaker[Session]) -> None:
    run = Runner(session_factory, rules_text(ENFORCE_BILLING), max_reversals=1)
    [first] = run.batch(membership_event("created", "user_1", MEMBER, at=0))
    run.finish(first, status=CommandStatus.FAILED)
    assert run.batch(membership_event("updated", "user_1", MEMBER, at=5, metadata={"n": 1})) == []
    state = run.state("billing-stays", "user_1")
    assert state is not None and state.stopped_at is not None


def test_first_match_wins_even_when_the_winner_has_nothing_to_do(
    session_factory: sessionmaker[Session],
) -> None:
    everyone = {"name": "everyone-member", "mode": "enforce", "role": MEMBER}
    run = Runner(session_factory, rules_text(ACME_ON_JOIN, everyone))
    run.batch(membership_event("created", "user_owner", ADMIN, at=0, email="owner@other.test"))
    [promote] = run.batch(membership_event("created", "user_1", MEMBER, at=0))
    run.finish(promote)
    # The on_join rule matched first and is done: the broader enforce rule never demotes.
    assert run.batch(membership_event("updated", "user_1", ADMIN, at=10)) == []
    [demote] = run.batch(membership_event("created", "user_2", BILLING, at=0, email="x@other.test"))
    assert (demote.user_id, demote.role, demote.rule_name) == ("user_2", MEMBER, "everyone-member")


@pytest.mark.parametrize("where", ["global", "rule"])
def test_dry_run_plans_and_records_and_counts_nothing(
    session_factory: sessionmaker[Session], where: str
) -> None:
    rule = dict(ENFORCE_BILLING, dry_run=where == "rule")
    run = Runner(session_factory, rules_text(rule), max_reversals=1, dry_run=where == "global")
    [planned] = run.batch(membership_event("created", "user_1", MEMBER, at=0))
    assert (planned.status, planned.dry_run, planned.role) == (CommandStatus.PLANNED, True, BILLING)
    # Re-evaluated many times: the same planned row, never a stop, never a send.
    for at in range(1, 5):
        [again] = run.batch(membership_event("updated", "user_1", MEMBER, at=at, metadata={"n": at}))
        assert again.id == planned.id
    assert len(run.commands()) == 1
    state = run.state("billing-stays", "user_1")
    assert state is not None and state.reversals == 0 and state.stopped_at is None


def test_a_rule_never_demotes_the_last_admin(session_factory: sessionmaker[Session]) -> None:
    on_join = {
        "name": "demote-on-join",
        "mode": "on_join",
        "role": MEMBER,
        "when": {"user": {"id": "user_1"}},
    }
    enforce = {"name": "demote-always", "mode": "enforce", "role": MEMBER, "when": {"user": {"id": "user_2"}}}
    run = Runner(session_factory, rules_text(on_join, enforce))
    mirror(session_factory, role_event(ADMIN, ["org:sys_memberships:manage"]), role_event(MEMBER, []))
    assert run.batch(membership_event("created", "user_1", ADMIN, at=0)) == []
    state = run.state("demote-on-join", "user_1")
    assert state is not None and state.on_join_done_at is not None  # handled, not retried
    with session_scope(session_factory) as session:
        assert evaluate(session, run.ruleset, now_ms=NOW, max_reversals=3) == []
    # With a second admin, one of them may be demoted, but never both in one run.
    both = {
        "name": "demote-both",
        "mode": "enforce",
        "role": MEMBER,
        "when": {"organization": {"slug": "beta"}},
    }
    ruleset = parse_rules(rules_text(both))
    mirror(
        session_factory,
        membership_event("created", "user_a", ADMIN, at=0, org="org_beta", slug="beta"),
        membership_event("created", "user_b", ADMIN, at=0, org="org_beta", slug="beta"),
    )
    with session_scope(session_factory) as session:
        decisions = evaluate(session, ruleset, now_ms=NOW, max_reversals=3)
    assert sorted((d.target.user_id, d.action) for d in decisions) == [
        ("user_a", CHANGE),
        ("user_b", REFUSED),
    ]
    assert "last admin" in decisions[1].reason


def test_plan_rules_returns_command_requests_and_writes_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    ruleset = parse_rules(rules_text(ACME_ON_JOIN))
    mirror(
        session_factory,
        membership_event("created", "user_owner", ADMIN, at=0, email="o@other.test"),
        membership_event("created", "user_1", MEMBER, at=0),
        membership_event("created", "user_2", MEMBER, at=0, org="org_beta", slug="beta"),
    )
    with session_scope(session_factory) as session:
        [request] = plan_rules(session, ruleset, now_ms=NOW)
        assert (request.user_id, request.role, request.requested_by) == ("user_1", ADMIN, "rule:acme-admins")
        assert request.idempotency_key == "rule:acme-admins:orgmem_org_acme_user_1_1:on_join"
    with session_scope(session_factory) as session:
        assert session.scalar(select(func.count()).select_from(RuleState)) == 0
        assert session.scalar(select(func.count()).select_from(Command)) == 0


def test_events_by_membership_maps_event_types() -> None:
    events = [
        membership_event("created", "user_1", MEMBER, at=0),
        membership_event("updated", "user_2", MEMBER, at=0),
        membership_event("deleted", "user_3", MEMBER, at=0),
        invitation_accepted("user_4", at=NOW, metadata={}),
        role_event(ADMIN, []),
    ]
    assert events_by_membership(events) == {
        ("org_acme", "user_1"): frozenset({MEMBER_JOINED}),
        ("org_acme", "user_2"): frozenset({ROLE_CHANGED}),
        ("org_acme", "user_4"): frozenset({INVITATION_ACCEPTED}),
    }


# -- the hook in the apply path ------------------------------------------------------------


def store(factory: sessionmaker[Session], *events: Event) -> list[int]:
    ids = []
    with session_scope(factory) as session:
        for event in events:
            body = webhook_body(event.type, event.data, event.timestamp_ms, instance_id=OMIT)
            ids.append(store_delivery(session, svix_id=event.svix_id, body=body, received_at=NOW).inbox_id)
    return ids


def statuses(factory: sessionmaker[Session]) -> list[str]:
    with session_scope(factory) as session:
        return list(session.scalars(select(InboxEvent.status).order_by(InboxEvent.id)))


def test_the_hook_runs_rules_after_the_batch_and_sends_after_commit(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    path = write(tmp_path, "rules.yaml", rules_text(ACME_ON_JOIN))
    sent: list[list[int]] = []
    hook = RulesHook(path, send=sent.append)
    ids = store(
        session_factory,
        membership_event("created", "user_owner", ADMIN, at=0, email="o@other.test"),
        membership_event("created", "user_1", MEMBER, at=0),
    )
    report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3, after_batch=hook)
    assert report.applied == 2
    with session_scope(session_factory) as session:
        [command] = session.scalars(select(Command)).all()
        assert (command.user_id, command.role) == ("user_1", ADMIN)
        assert sent == [[command.id]]


def test_a_broken_rules_file_never_stops_the_mirror(
    session_factory: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "rules.yaml", "rules: [{name: a, mode: sometimes, role: org:admin}]")
    hook = RulesHook(path, send=lambda ids: None)
    with caplog.at_level(logging.ERROR):
        ids = store(session_factory, membership_event("created", "user_1", MEMBER, at=0))
        report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3, after_batch=hook)
        ids = store(session_factory, membership_event("created", "user_2", MEMBER, at=0))
        apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3, after_batch=hook)
    assert report.applied == 1 and statuses(session_factory) == [InboxStatus.APPLIED] * 2
    errors = [r.getMessage() for r in caplog.records if "rules file" in r.getMessage()]
    assert len(errors) == 1, errors  # once per version of the file, not per batch
    assert f"{path}: rule 1 ('a'): field mode:" in errors[0]
    with session_scope(session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Membership)) == 2
    # Fixed: the next batch runs the rules.
    path.write_text(rules_text(ACME_ON_JOIN) + "\n")
    ids = store(session_factory, membership_event("created", "user_3", MEMBER, at=0))
    apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3, after_batch=hook)
    with session_scope(session_factory) as session:
        assert [c.user_id for c in session.scalars(select(Command))] == ["user_3"]


def test_a_failing_hook_never_stops_the_mirror(
    session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*args: Any) -> None:
        raise RuntimeError("boom")

    ids = store(session_factory, membership_event("created", "user_1", MEMBER, at=0))
    with caplog.at_level(logging.ERROR):
        report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3, after_batch=explode)
    assert (report.applied, report.failed) == (1, 0)
    assert statuses(session_factory) == [InboxStatus.APPLIED]
    assert "after-batch hook failed" in caplog.text


def test_the_hook_swallows_its_own_errors(
    session_factory: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "rules.yaml", rules_text(ACME_ON_JOIN))

    def broken_submit(now_ms: int) -> Any:
        def submit(session: Session, request: Any) -> Command:
            raise RuntimeError("commands core down")

        return submit

    hook = RulesHook(path, submit=broken_submit)
    mirror(session_factory, membership_event("created", "user_1", MEMBER, at=0))
    with caplog.at_level(logging.ERROR):
        assert hook(session_factory, [membership_event("created", "user_1", MEMBER, at=0)], NOW) is None
    assert "provisioning rules failed" in caplog.text


def test_unknown_roles_in_the_mirror_disable_the_rules_with_a_report(
    session_factory: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "rules.yaml", rules_text(dict(ACME_ON_JOIN, role="org:boss")))
    mirror(session_factory, role_event(ADMIN, ["org:sys_memberships:manage"]), role_event(MEMBER, []))
    hook = RulesHook(path)
    event = membership_event("created", "user_1", MEMBER, at=0)
    mirror(session_factory, event)
    with caplog.at_level(logging.ERROR):
        report = hook(session_factory, [event], NOW)
    assert report is None
    assert "field role: unknown role 'org:boss'" in caplog.text


def test_decisions_serialise_for_output() -> None:
    rule = one_rule({}, mode="on_join").rules[0]
    decision = Decision(rule, target(), CHANGE, reason="joined")
    data = decision.to_dict()
    assert data["desired_role"] == ADMIN and data["current_role"] == MEMBER and data["rule"] == "r"
    assert json.loads(json.dumps(data))["reason"] == "joined"


# -- the command line ----------------------------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.ids: list[list[int]] = []

    def make(self, _settings: Any) -> Callable[[list[int]], None]:
        return self.ids.append


def cli_env(engine: Engine, tmp_path: Path, rules: Path | None, **extra: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "BROKER_URL": "redis://127.0.0.1:1/0",  # nobody listens: the sender is a test double
        "ORGSYNC_DATA_DIR": str(tmp_path / "data"),
        "ORGSYNC_LOG_LEVEL": "WARNING",
    }
    if rules is not None:
        env["ORGSYNC_RULES_FILE"] = str(rules)
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, sent: Sent | None = None) -> Any:

    obj = Runtime(environ=env, make_command_sender=(sent or Sent()).make)
    return CliRunner().invoke(cli, list(args), obj=obj, catch_exceptions=False)


@pytest.fixture
def cli_mirror(sqlite_engine: Engine) -> Engine:
    mirror(
        make_session_factory(sqlite_engine),
        role_event(ADMIN, ["org:sys_memberships:manage"]),
        role_event(MEMBER, []),
        role_event(BILLING, []),
        membership_event("created", "user_owner", ADMIN, at=0, email="owner@other.test"),
        membership_event("created", "user_1", MEMBER, at=0),
        membership_event("created", "user_2", MEMBER, at=0, org="org_sandbox", slug="sandbox"),
        membership_event("created", "user_3", ADMIN, at=0, org="org_sandbox", slug="sandbox"),
    )
    return sqlite_engine


CLI_RULES = rules_text(
    ACME_ON_JOIN,
    {
        "name": "sandbox-billing",
        "mode": "enforce",
        "role": BILLING,
        "dry_run": True,
        "when": {"user": {"id": "user_2"}},
    },
)


def test_cli_rules_check_reports_a_valid_file(cli_mirror: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "rules.yaml", CLI_RULES)
    result = run_cli(cli_env(cli_mirror, tmp_path, path), "rules", "check")
    assert result.exit_code == 0, result.output
    assert f"{path}: 2 rule(s), valid" in result.stdout
    assert (
        "acme-admins" in result.stdout
        and "organization.slug=acme; user.email_domain=acme.test" in result.stdout
    )
    data = json.loads(run_cli(cli_env(cli_mirror, tmp_path, path), "rules", "check", "--json").stdout)
    assert (
        data[0]["valid"]
        and data[0]["roles_checked"]
        and [r["name"] for r in data[0]["rules"]]
        == [
            "acme-admins",
            "sandbox-billing",
        ]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [{name: a, mode: sometimes, role: org:admin}]", "rule 1 ('a'): field mode: "),
        (
            "rules: [{name: a, mode: enforce, role: org:boss}]",
            "rule 1 ('a'): field role: unknown role 'org:boss'",
        ),
    ],
)
def test_cli_rules_check_fails_on_a_broken_file(
    cli_mirror: Engine, tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, "rules.yaml", text)
    result = run_cli(cli_env(cli_mirror, tmp_path, path), "rules", "check")
    assert result.exit_code == 3
    assert result.stderr.startswith(f"orgsync: error: {path}: {message}"), result.stderr
    assert "Traceback" not in result.output


def test_cli_rules_need_a_file(cli_mirror: Engine, tmp_path: Path) -> None:
    result = run_cli(cli_env(cli_mirror, tmp_path, None), "rules", "plan")
    assert result.exit_code == EXIT_CONFIG
    assert "orgsync: error: no rules file: set ORGSYNC_RULES_FILE or pass --file" in result.stderr


def test_cli_rules_check_works_without_a_database(tmp_path: Path) -> None:
    path = write(tmp_path, "rules.toml", TOML_RULES)
    env = {"ORGSYNC_DATA_DIR": str(tmp_path / "nothing-here"), "ORGSYNC_LOG_LEVEL": "WARNING"}
    result = run_cli(env, "rules", "check", "--file", str(path))
    assert result.exit_code == 0, result.output
    assert "role keys not checked" in result.stderr
    assert "2 rule(s), valid" in result.stdout


def test_cli_rules_plan_prints_changes_and_writes_nothing(cli_mirror: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "rules.yaml", CLI_RULES)
    env = cli_env(cli_mirror, tmp_path, path)
    result = run_cli(env, "rules", "plan")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RULE", "MODE", "ORGANIZATION", "USER", "CURRENT", "DESIRED", "ACTION"]
    assert any("acme-admins" in line and "user_1@acme.test" in line and "set role" in line for line in lines)
    assert any("sandbox-billing" in line and "plan only (dry run)" in line for line in lines)
    rows = json.loads(run_cli(env, "rules", "plan", "--json").stdout)
    assert sorted((r["rule"], r["user_id"], r["desired_role"], r["dry_run"]) for r in rows) == [
        ("acme-admins", "user_1", ADMIN, False),
        ("sandbox-billing", "user_2", BILLING, True),
    ]
    with Session(cli_mirror) as session:
        assert session.scalar(select(func.count()).select_from(Command)) == 0


def test_cli_rules_apply_records_commits_then_enqueues(cli_mirror: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "rules.yaml", CLI_RULES)
    env = cli_env(cli_mirror, tmp_path, path)
    sent = Sent()
    result = run_cli(env, "rules", "apply", sent=sent)
    assert result.exit_code == 0, result.output
    with Session(cli_mirror) as session:
        commands = {c.rule_name: c for c in session.scalars(select(Command))}
    assert commands["acme-admins"].status == CommandStatus.PENDING
    assert commands["sandbox-billing"].status == CommandStatus.PLANNED
    assert sent.ids == [[commands["acme-admins"].id]]
    assert "dry run: 1 command(s) recorded as planned, nothing sent" in result.stderr
    # Run again: on_join is done, the planned command is the same row: nothing new.
    again = run_cli(env, "rules", "apply", "--json", sent=sent)
    assert [(r["rule"], r["status"]) for r in json.loads(again.stdout)] == [("sandbox-billing", "planned")]
    assert sent.ids == [[commands["acme-admins"].id]]
    with Session(cli_mirror) as session:
        assert session.scalar(select(func.count()).select_from(Command)) == 2
