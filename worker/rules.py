"""Provisioning rules: decide the role each membership should hold, and turn drift into commands.

Rules are read from a file (``worker.rules_format`` documents the format) and evaluated on the
mirror's state, after each applied batch for the memberships it touched (``RulesHook``, called
by ``worker.apply`` after the batch commit) and on demand over the whole mirror
(``plan_rules`` / ``evaluate`` and ``apply_rules``, used by ``orgsync rules plan|apply``).

Semantics:

* First match wins: the first rule, in file order, whose conditions all hold decides for a
  membership, and later rules are not consulted even when the winner has nothing to do (an
  ``on_join`` rule already applied, an ``enforce`` rule stopped). That keeps an ``on_join``
  promotion from being undone by a broader ``enforce`` rule further down.
* ``on_join`` acts once per membership generation (its ``orgmem_`` id): after a batch only for
  a membership that joined in it (``member_joined`` / ``invitation_accepted``); on demand for
  any membership whose generation it has not handled yet. Handled means recorded in
  ``rule_states.on_join_done_at``, whether a command was needed or not.
* ``enforce`` restores the role whenever it differs. Every correction counts as a reversal
  (the first included), per rule and membership generation; the correction that would exceed
  ``max_reversals`` is not made: the rule is stopped for that membership and reported
  (``rule_states.stopped_at`` / ``stopped_reason``, the log, ``orgsync rules check|plan``).
* Loop safety: a decision compares the desired role with the mirror's current role, so the
  webhook echo of a rule's own change (desired == current) does nothing. While a command for
  the membership is still open, or applied but not yet visible in the mirror, ``enforce``
  waits instead of sending (or counting) another one.
* A change that would demote or remove the organization's last admin-level member is refused
  here from the mirror (and ``submit_command`` refuses it again): reported, never retried in a
  loop. An ``on_join`` refusal marks the generation handled.
* ``dry_run`` (the rule's or the global default) records the command as ``planned``, never sends
  it, and counts no reversal; its idempotency key makes re-evaluation reuse the same row.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from models.commands import CommandRequest, admin_role_levels, is_admin_role
from models.db import lock_mirror_writes, session_scope
from models.errors import PermanentError
from models.events import Event
from models.settings import Settings
from models.submission import Send, enqueue_commands, record_commands
from models.tables import (
    Command,
    CommandKind,
    CommandStatus,
    Invitation,
    Membership,
    Organization,
    Role,
    RuleState,
    User,
)
from worker.rules_format import (
    ENFORCE,
    EVENTS,
    INVITATION_ACCEPTED,
    MEMBER_JOINED,
    ON_JOIN,
    ROLE_CHANGED,
    Rule,
    RulesError,
    RuleSet,
    domain_matches,
    email_domain,
    identifier_matches,
    load_rules,
    parse_rules,
)

__all__ = [
    "ENFORCE",
    "EVENTS",
    "INVITATION_ACCEPTED",
    "MEMBER_JOINED",
    "ON_JOIN",
    "ROLE_CHANGED",
    "Decision",
    "Rule",
    "RuleSet",
    "RulesError",
    "RulesHook",
    "RunReport",
    "Target",
    "apply_decisions",
    "apply_rules",
    "evaluate",
    "known_role_keys",
    "load_rules",
    "parse_rules",
    "plan_rules",
    "stopped_states",
]

log = logging.getLogger(__name__)

# An accepted invitation belongs to a membership created this close to its acceptance: the two
# events describe one moment, but arrive in no guaranteed order and possibly in other batches.
INVITATION_PAIRING_MS = 60_000
# How long an applied command whose effect the mirror does not show yet is taken to be in flight.
DEFAULT_CONFIRM_TIMEOUT_MS = 300_000
MAX_IN = 400

Key = tuple[str, str]

# Decision actions.
CHANGE = "change"
RECORD = "record"
STOP = "stop"
REFUSED = "refused"


@dataclass(frozen=True)
class Target:
    """A live membership as rules see it, with the events of the batch that touched it."""

    organization_id: str
    organization_slug: str | None
    organization_metadata: Mapping[str, Any] | None
    organization_private_metadata: Mapping[str, Any] | None
    user_id: str
    identifier: str | None
    membership_id: str
    role: str
    membership_metadata: Mapping[str, Any] | None
    membership_private_metadata: Mapping[str, Any] | None
    invitation_id: str | None = None
    invitation_metadata: Mapping[str, Any] | None = None
    invitation_private_metadata: Mapping[str, Any] | None = None
    updated_at: int | None = None
    events: frozenset[str] = frozenset()

    @property
    def key(self) -> Key:
        return (self.organization_id, self.user_id)


def matches(rule: Rule, target: Target) -> bool:
    """Whether every condition of ``rule`` holds for ``target``."""
    when = rule.when
    if when.organization_ids and target.organization_id not in when.organization_ids:
        return False
    if when.organization_slugs and (target.organization_slug or "").lower() not in when.organization_slugs:
        return False
    if not all(c.matches(target.organization_metadata) for c in when.organization_metadata):
        return False
    if not all(c.matches(target.organization_private_metadata) for c in when.organization_private_metadata):
        return False
    if when.user_ids and target.user_id not in when.user_ids:
        return False
    if when.email_domains and not domain_matches(email_domain(target.identifier), when.email_domains):
        return False
    if (when.identifier_globs or when.identifier_regexes) and not identifier_matches(
        target.identifier, when.identifier_globs, when.identifier_regexes
    ):
        return False
    if not all(c.matches(target.membership_metadata) for c in when.membership_metadata):
        return False
    if not all(c.matches(target.membership_private_metadata) for c in when.membership_private_metadata):
        return False
    if when.needs_invitation and target.invitation_id is None:
        return False
    if not all(c.matches(target.invitation_metadata) for c in when.invitation_metadata):
        return False
    if not all(c.matches(target.invitation_private_metadata) for c in when.invitation_private_metadata):
        return False
    if when.roles and target.role not in when.roles:
        return False
    return not when.events or bool(target.events.intersection(when.events))


def first_match(ruleset: RuleSet, target: Target) -> Rule | None:
    for rule in ruleset.rules:
        if matches(rule, target):
            return rule
    return None


@dataclass(frozen=True)
class Decision:
    """What one rule decided for one membership: ``change`` (a command), ``record`` (an
    ``on_join`` with nothing to change), ``stop`` (too many reversals) or ``refused``."""

    rule: Rule
    target: Target
    action: str
    dry_run: bool = False
    reversal: int = 0
    reason: str = ""

    @property
    def idempotency_key(self) -> str:
        base = f"rule:{self.rule.name}:{self.target.membership_id}"
        if self.dry_run:
            # One planned row per rule, generation and drift, however often it is re-evaluated.
            return f"{base}:planned:{self.target.role}->{self.rule.role}"
        if self.rule.mode == ON_JOIN:
            return f"{base}:on_join"
        return f"{base}:enforce:{self.reversal}"

    def request(self) -> CommandRequest:
        return CommandRequest(
            kind=CommandKind.SET_ROLE,
            organization_id=self.target.organization_id,
            requested_by=self.rule.requested_by,
            user_id=self.target.user_id,
            role=self.rule.role,
            rule_name=self.rule.name,
            dry_run=self.dry_run,
            idempotency_key=self.idempotency_key,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "rule": self.rule.name,
            "rule_index": self.rule.index,
            "mode": self.rule.mode,
            "organization_id": self.target.organization_id,
            "organization_slug": self.target.organization_slug,
            "user_id": self.target.user_id,
            "identifier": self.target.identifier,
            "membership_id": self.target.membership_id,
            "current_role": self.target.role,
            "desired_role": self.rule.role,
            "dry_run": self.dry_run,
            "reversal": self.reversal or None,
            "reason": self.reason,
        }


@dataclass
class RunReport:
    """What ``apply_decisions`` did: ``pending`` holds the open command ids, to enqueue after the commit."""

    pending: list[int] = field(default_factory=list)
    planned: list[int] = field(default_factory=list)
    recorded: int = 0
    stopped: list[Decision] = field(default_factory=list)
    refused: list[tuple[Decision, str]] = field(default_factory=list)
    commands: list[tuple[Decision, Command]] = field(default_factory=list)


# -- reading the mirror --------------------------------------------------------------------


def _chunks(items: Sequence[Key]) -> Iterable[Sequence[Key]]:
    for start in range(0, len(items), MAX_IN):
        yield items[start : start + MAX_IN]


def load_targets(session: Session, events_by_key: Mapping[Key, frozenset[str]] | None = None) -> list[Target]:
    """Live memberships of live organizations: those in ``events_by_key``, or all of them."""
    query = (
        select(Membership, Organization, User.identifier)
        .join(Organization, Organization.id == Membership.organization_id)
        .outerjoin(User, (User.id == Membership.user_id) & User.deleted.is_(False))
        .where(Membership.deleted.is_(False), Organization.deleted.is_(False))
    )
    rows: list[Any] = []
    if events_by_key is None:
        rows = list(session.execute(query.order_by(Membership.organization_id, Membership.user_id)).all())
    else:
        keys = sorted(events_by_key)
        for chunk in _chunks(keys):
            rows.extend(
                session.execute(
                    query.where(tuple_(Membership.organization_id, Membership.user_id).in_(chunk))
                ).all()
            )
        rows.sort(key=lambda row: (row[0].organization_id, row[0].user_id))
    invitations = _accepted_invitations(session, None if events_by_key is None else sorted(events_by_key))
    targets = []
    for membership, organization, user_identifier in rows:
        key = (membership.organization_id, membership.user_id)
        events = set(events_by_key.get(key, frozenset())) if events_by_key is not None else set()
        invitation = _pair_invitation(invitations.get(key, []), membership.created_at)
        if invitation is not None and MEMBER_JOINED in events:
            # The acceptance may have been applied in an earlier batch than the membership.
            events.add(INVITATION_ACCEPTED)
        targets.append(
            Target(
                organization_id=membership.organization_id,
                organization_slug=organization.slug,
                organization_metadata=organization.public_metadata,
                organization_private_metadata=organization.private_metadata,
                user_id=membership.user_id,
                identifier=membership.identifier or user_identifier,
                membership_id=membership.id,
                role=membership.role,
                membership_metadata=membership.public_metadata,
                membership_private_metadata=membership.private_metadata,
                invitation_id=None if invitation is None else invitation.id,
                invitation_metadata=None if invitation is None else invitation.public_metadata,
                invitation_private_metadata=None if invitation is None else invitation.private_metadata,
                updated_at=membership.updated_at,
                events=frozenset(events),
            )
        )
    return targets


def _accepted_invitations(session: Session, keys: Sequence[Key] | None) -> dict[Key, list[Invitation]]:
    query = select(Invitation).where(
        Invitation.status == "accepted", Invitation.user_id.is_not(None), Invitation.deleted.is_(False)
    )
    found: dict[Key, list[Invitation]] = defaultdict(list)
    batches = [session.scalars(query).all()] if keys is None else []
    if keys is not None:
        for chunk in _chunks(keys):
            batches.append(
                session.scalars(
                    query.where(tuple_(Invitation.organization_id, Invitation.user_id).in_(chunk))
                ).all()
            )
    for batch in batches:
        for invitation in batch:
            assert invitation.user_id is not None
            found[(invitation.organization_id, invitation.user_id)].append(invitation)
    return found


def _pair_invitation(candidates: Sequence[Invitation], created_at: int | None) -> Invitation | None:
    """The accepted invitation that produced this membership generation, if any."""
    if created_at is None:
        return None
    best: tuple[int, Invitation] | None = None
    for invitation in candidates:
        accepted_at = invitation.updated_at or invitation.created_at
        if accepted_at is None:
            continue
        distance = abs(accepted_at - created_at)
        if distance <= INVITATION_PAIRING_MS and (best is None or distance < best[0]):
            best = (distance, invitation)
    return None if best is None else best[1]


def _rule_states(
    session: Session, ruleset: RuleSet, keys: Sequence[Key] | None
) -> dict[tuple[str, Key], RuleState]:
    names = [rule.name for rule in ruleset.rules]
    if not names:
        return {}
    query = select(RuleState).where(RuleState.rule_name.in_(names))
    rows: list[RuleState] = []
    if keys is None:
        rows = list(session.scalars(query).all())
    else:
        for chunk in _chunks(keys):
            rows.extend(
                session.scalars(query.where(tuple_(RuleState.organization_id, RuleState.user_id).in_(chunk)))
            )
    return {(row.rule_name, (row.organization_id, row.user_id)): row for row in rows}


def _open_commands(session: Session, keys: Sequence[Key] | None) -> dict[Key, list[Command]]:
    query = select(Command).where(
        Command.user_id.is_not(None),
        Command.status.in_((CommandStatus.PENDING, CommandStatus.SENDING, CommandStatus.APPLIED)),
    )
    rows: list[Command] = []
    if keys is None:
        rows = list(session.scalars(query).all())
    else:
        for chunk in _chunks(keys):
            rows.extend(
                session.scalars(query.where(tuple_(Command.organization_id, Command.user_id).in_(chunk)))
            )
    found: dict[Key, list[Command]] = defaultdict(list)
    for row in rows:
        assert row.user_id is not None
        found[(row.organization_id, row.user_id)].append(row)
    return found


def known_role_keys(session: Session) -> set[str] | None:
    """The role keys the mirror knows, or ``None`` while it knows none (nothing to check against)."""
    keys = {key for key in session.scalars(select(Role.key).where(Role.deleted.is_(False))) if key}
    return keys or None


class _AdminLedger:
    """Admin-level members per organization, from the mirror, updated with this run's decisions
    (two demotions in one run must not each count on the other member staying an admin).
    The notion of admin level is the commands core's, which guards ``submit_command`` too."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._levels = admin_role_levels(session)
        self._admins: dict[str, set[str]] = {}

    def _org_admins(self, organization_id: str) -> set[str]:
        admins = self._admins.get(organization_id)
        if admins is None:
            rows = self._session.execute(
                select(Membership.user_id, Membership.role, Membership.permissions).where(
                    Membership.organization_id == organization_id, Membership.deleted.is_(False)
                )
            ).all()
            admins = {user for user, role, perms in rows if is_admin_role(role, self._levels, perms)}
            self._admins[organization_id] = admins
        return admins

    def would_remove_last_admin(self, target: Target, new_role: str) -> bool:
        if is_admin_role(new_role, self._levels):
            return False
        admins = self._org_admins(target.organization_id)
        return target.user_id in admins and not admins - {target.user_id}

    def assume(self, target: Target, new_role: str) -> None:
        admins = self._org_admins(target.organization_id)
        if is_admin_role(new_role, self._levels):
            admins.add(target.user_id)
        else:
            admins.discard(target.user_id)


# -- deciding ------------------------------------------------------------------------------


def _in_flight(commands: Sequence[Command], target: Target, *, now_ms: int, confirm_timeout_ms: int) -> bool:
    """Whether a command for this membership may still change (or has changed, unseen) its role."""
    for command in commands:
        if command.status in (CommandStatus.PENDING, CommandStatus.SENDING):
            return True
        if command.status != CommandStatus.APPLIED or command.role is None or command.role == target.role:
            continue
        applied_at = command.applied_at or command.updated_at
        if now_ms - applied_at > confirm_timeout_ms:
            # Never confirmed: flagged by the commands core; waiting longer would stall enforcement.
            continue
        # Compare Clerk's clock with Clerk's clock when the response told us the change's time.
        changed_at = (command.result or {}).get("updated_at")
        mark = changed_at if isinstance(changed_at, int) and not isinstance(changed_at, bool) else applied_at
        if target.updated_at is None or target.updated_at < mark:
            # The mirror still shows the state before this command: its echo is on its way.
            return True
    return False


def evaluate(
    session: Session,
    ruleset: RuleSet,
    *,
    now_ms: int,
    events_by_key: Mapping[Key, frozenset[str]] | None = None,
    max_reversals: int = 3,
    dry_run_default: bool = False,
    confirm_timeout_ms: int = DEFAULT_CONFIRM_TIMEOUT_MS,
) -> list[Decision]:
    """Decide, without writing anything, what the rules do for the memberships in
    ``events_by_key`` (after a batch) or for every membership (on demand, when ``None``)."""
    if not ruleset.rules:
        return []
    on_demand = events_by_key is None
    targets = load_targets(session, events_by_key)
    keys = None if on_demand else [target.key for target in targets]
    states = _rule_states(session, ruleset, keys)
    commands = _open_commands(session, keys)
    ledger = _AdminLedger(session)
    decisions = []
    for target in targets:
        rule = first_match(ruleset, target)
        if rule is None:
            continue
        state = states.get((rule.name, target.key))
        if state is not None and state.membership_id != target.membership_id:
            state = None  # a previous generation's record: this membership starts afresh
        decision = _decide(
            rule,
            target,
            state,
            commands.get(target.key, []),
            on_demand=on_demand,
            now_ms=now_ms,
            max_reversals=max_reversals,
            dry_run=rule.dry_run or dry_run_default,
            confirm_timeout_ms=confirm_timeout_ms,
        )
        if decision is None:
            continue
        if decision.action == CHANGE:
            if ledger.would_remove_last_admin(target, rule.role):
                decision = Decision(
                    rule,
                    target,
                    REFUSED,
                    dry_run=decision.dry_run,
                    reason=(f"refused: {target.user_id} is the last admin of {target.organization_id}"),
                )
            else:
                ledger.assume(target, rule.role)
        decisions.append(decision)
    return decisions


def _decide(
    rule: Rule,
    target: Target,
    state: RuleState | None,
    commands: Sequence[Command],
    *,
    on_demand: bool,
    now_ms: int,
    max_reversals: int,
    dry_run: bool,
    confirm_timeout_ms: int,
) -> Decision | None:
    if rule.mode == ON_JOIN:
        if state is not None and state.on_join_done_at is not None:
            return None
        if not on_demand and not target.events.intersection((MEMBER_JOINED, INVITATION_ACCEPTED)):
            return None
        if target.role == rule.role:
            return Decision(rule, target, RECORD, dry_run=dry_run, reason="already holds the role")
        return Decision(
            rule, target, CHANGE, dry_run=dry_run, reason="joined" if not on_demand else "not yet applied"
        )
    if state is not None and state.stopped_at is not None:
        return None
    if target.role == rule.role:
        return None
    if _in_flight(commands, target, now_ms=now_ms, confirm_timeout_ms=confirm_timeout_ms):
        return None
    if dry_run:
        return Decision(rule, target, CHANGE, dry_run=True, reason="drifted")
    reversals = 0 if state is None else state.reversals
    if reversals >= max_reversals:
        return Decision(
            rule,
            target,
            STOP,
            reversal=reversals,
            reason=(
                f"stopped after {reversals} reversal(s): the role keeps drifting from {rule.role} "
                f"(now {target.role}); someone may be changing it back"
            ),
        )
    return Decision(rule, target, CHANGE, reversal=reversals + 1, reason="drifted")


# -- acting --------------------------------------------------------------------------------

Submit = Callable[[Session, CommandRequest], Command]


def default_submit(*, now_ms: int, dry_run_default: bool) -> Submit:
    """Record through the one submission path, inside the caller's transaction."""

    # One lookup per organization and run, not per command: a run may decide thousands.
    resolved: dict[str, str] = {}

    def submit(session: Session, request: CommandRequest) -> Command:
        (command,) = record_commands(
            session, [request], now_ms=now_ms, dry_run_default=dry_run_default, resolved=resolved
        )
        return command

    return submit


def _state(session: Session, decision: Decision, *, now_ms: int) -> RuleState:
    target = decision.target
    state = session.get(RuleState, (decision.rule.name, target.organization_id, target.user_id))
    if state is None:
        state = RuleState(
            rule_name=decision.rule.name,
            organization_id=target.organization_id,
            user_id=target.user_id,
            membership_id=target.membership_id,
            reversals=0,
            updated_at=now_ms,
        )
        session.add(state)
    elif state.membership_id != target.membership_id:
        # A new generation (removed and added again): nothing of the old one carries over.
        state.membership_id = target.membership_id
        state.on_join_done_at = None
        state.reversals = 0
        state.last_reversal_at = None
        state.stopped_at = None
        state.stopped_reason = None
    state.updated_at = now_ms
    return state


def apply_decisions(
    session: Session,
    decisions: Sequence[Decision],
    *,
    now_ms: int,
    dry_run_default: bool = False,
    submit: Submit | None = None,
) -> RunReport:
    """Record the decisions: submit commands, mark ``on_join`` generations, count reversals,
    stop rules. Flushes, never commits; enqueue ``report.pending`` after the caller commits."""
    report = RunReport()
    if not decisions:
        return report
    send = submit if submit is not None else default_submit(now_ms=now_ms, dry_run_default=dry_run_default)
    for decision in decisions:
        rule, target = decision.rule, decision.target
        if decision.action == STOP:
            state = _state(session, decision, now_ms=now_ms)
            state.stopped_at = now_ms
            state.stopped_reason = decision.reason
            log.warning(
                "rule %r stopped for %s in %s: %s",
                rule.name,
                target.user_id,
                target.organization_id,
                decision.reason,
            )
            report.stopped.append(decision)
            continue
        if decision.action in (RECORD, REFUSED):
            if rule.mode == ON_JOIN:
                _state(session, decision, now_ms=now_ms).on_join_done_at = now_ms
            if decision.action == REFUSED:
                log.warning("rule %r: %s", rule.name, decision.reason)
                report.refused.append((decision, decision.reason))
            else:
                report.recorded += 1
            continue
        try:
            # A savepoint: a refusal must not undo the rest of the run.
            with session.begin_nested():
                command = send(session, decision.request())
        except PermanentError as exc:
            # The last-admin guard or a validation error: retrying cannot help, so the on_join
            # generation counts as handled and enforce waits for the membership's next change.
            message = f"refused: {exc}"
            log.warning("rule %r for %s in %s %s", rule.name, target.user_id, target.organization_id, message)
            report.refused.append((decision, message))
            if rule.mode == ON_JOIN:
                _state(session, decision, now_ms=now_ms).on_join_done_at = now_ms
            continue
        state = _state(session, decision, now_ms=now_ms)
        if rule.mode == ON_JOIN:
            state.on_join_done_at = now_ms
        elif not decision.dry_run:
            state.reversals = decision.reversal
            state.last_reversal_at = now_ms
        report.commands.append((decision, command))
        if command.status in CommandStatus.OPEN:
            report.pending.append(command.id)
        elif command.status == CommandStatus.PLANNED:
            report.planned.append(command.id)
        log.info(
            "rule %r: %s in %s %s -> %s (command %s, %s)",
            rule.name,
            target.user_id,
            target.organization_id,
            target.role,
            rule.role,
            command.id,
            command.status,
        )
    session.flush()
    return report


def plan_rules(
    session: Session,
    ruleset: RuleSet,
    *,
    now_ms: int,
    max_reversals: int = 3,
    dry_run_default: bool = False,
) -> list[CommandRequest]:
    """The commands the rules would submit over the whole mirror now (writes nothing)."""
    decisions = evaluate(
        session, ruleset, now_ms=now_ms, max_reversals=max_reversals, dry_run_default=dry_run_default
    )
    return [decision.request() for decision in decisions if decision.action == CHANGE]


def apply_rules(
    session: Session,
    ruleset: RuleSet,
    *,
    now_ms: int,
    max_reversals: int = 3,
    dry_run_default: bool = False,
    confirm_timeout_ms: int = DEFAULT_CONFIRM_TIMEOUT_MS,
    events_by_key: Mapping[Key, frozenset[str]] | None = None,
    submit: Submit | None = None,
) -> RunReport:
    """Evaluate and record in one go (flushes; the caller commits, then enqueues ``pending``).

    Takes the mirror lock first: a batch being applied, its hook, and an on-demand run never
    interleave, so two of them cannot both count the same drift.
    """
    lock_mirror_writes(session)
    decisions = evaluate(
        session,
        ruleset,
        now_ms=now_ms,
        events_by_key=events_by_key,
        max_reversals=max_reversals,
        dry_run_default=dry_run_default,
        confirm_timeout_ms=confirm_timeout_ms,
    )
    return apply_decisions(session, decisions, now_ms=now_ms, dry_run_default=dry_run_default, submit=submit)


def stopped_states(session: Session, ruleset: RuleSet | None = None) -> list[RuleState]:
    """Enforcement stopped for a membership (still the same generation), newest first."""
    query = (
        select(RuleState)
        .join(
            Membership,
            (Membership.organization_id == RuleState.organization_id)
            & (Membership.user_id == RuleState.user_id),
        )
        .where(
            RuleState.stopped_at.is_not(None),
            Membership.deleted.is_(False),
            Membership.id == RuleState.membership_id,
        )
        .order_by(RuleState.stopped_at.desc())
    )
    if ruleset is not None:
        query = query.where(RuleState.rule_name.in_([rule.name for rule in ruleset.rules]))
    return list(session.scalars(query).all())


# -- after each applied batch --------------------------------------------------------------


def events_by_membership(events: Iterable[Event]) -> dict[Key, frozenset[str]]:
    """The memberships a batch touched, with what happened to them in rules' terms.

    ``role_changed`` stands for ``organizationMembership.updated``, which Clerk also sends for
    metadata changes; the rules see the role the mirror holds after the batch either way.
    """
    found: dict[Key, set[str]] = defaultdict(set)
    for event in events:
        data = event.data
        if event.type.startswith("organizationMembership."):
            if event.action == "deleted":
                continue
            organization = data.get("organization")
            org_id = (organization.get("id") if isinstance(organization, dict) else None) or data.get(
                "organization_id"
            )
            user_data = data.get("public_user_data")
            user_id = (user_data.get("user_id") if isinstance(user_data, dict) else None) or data.get(
                "user_id"
            )
            if isinstance(org_id, str) and isinstance(user_id, str):
                found[(org_id, user_id)].add(MEMBER_JOINED if event.action == "created" else ROLE_CHANGED)
        elif event.type == "organizationInvitation.accepted":
            org_id, user_id = data.get("organization_id"), data.get("user_id")
            if isinstance(org_id, str) and isinstance(user_id, str):
                found[(org_id, user_id)].add(INVITATION_ACCEPTED)
    return {key: frozenset(kinds) for key, kinds in found.items()}


class RulesHook:
    """Runs the rules after each applied batch; never raises (the mirror must go on).

    The rules file is read again when it changes (size or modification time) or when the
    mirrored roles change; a file that does not load is logged once per version and skipped,
    so a typo in the rules stops the rules, never the mirror.
    """

    def __init__(
        self,
        rules_file: Path | None,
        *,
        send: Send | None = None,
        dry_run: bool = False,
        max_reversals: int = 3,
        confirm_timeout_ms: int = DEFAULT_CONFIRM_TIMEOUT_MS,
        submit: Callable[[int], Submit] | None = None,
    ) -> None:
        self.rules_file = rules_file
        self.send = send
        self.dry_run = dry_run
        self.max_reversals = max_reversals
        self.confirm_timeout_ms = confirm_timeout_ms
        self._submit = submit
        self._cache_key: tuple[Any, ...] | None = None
        self._ruleset: RuleSet | None = None
        self._error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, send: Send | None = None) -> RulesHook:
        """The hook the worker wires into ``apply_inbox(after_batch=...)``."""
        return cls(
            settings.rules_file,
            send=send,
            dry_run=settings.dry_run,
            max_reversals=settings.enforce_max_reversals,
            confirm_timeout_ms=int(settings.confirm_timeout * 1000),
        )

    def ruleset(self, session: Session) -> RuleSet | None:
        """The current rules, or ``None`` when there is no usable file (the error is logged)."""
        if self.rules_file is None:
            return None
        roles = known_role_keys(session)
        try:
            stat = self.rules_file.stat()
            key: tuple[Any, ...] = (stat.st_mtime_ns, stat.st_size, tuple(sorted(roles or ())))
        except OSError:
            key = ("missing", tuple(sorted(roles or ())))
        if key != self._cache_key:
            self._cache_key = key
            try:
                self._ruleset, self._error = load_rules(self.rules_file, known_roles=roles), None
            except RulesError as exc:
                self._ruleset, self._error = None, str(exc)
                log.error("rules are not applied until the rules file is fixed: %s", exc)
        return self._ruleset

    def __call__(
        self, factory: sessionmaker[Session], events: Sequence[Event], now_ms: int
    ) -> RunReport | None:
        try:
            return self._run(factory, events, now_ms=now_ms)
        except Exception:
            log.exception(
                "provisioning rules failed for a batch of %d events; the mirror is unaffected", len(events)
            )
            return None

    def _run(
        self, factory: sessionmaker[Session], events: Sequence[Event], *, now_ms: int
    ) -> RunReport | None:
        if self.rules_file is None:
            return None
        touched = events_by_membership(events)
        if not touched:
            return None
        with session_scope(factory) as session:
            ruleset = self.ruleset(session)
            if ruleset is None or not ruleset.rules:
                return None
            submit = self._submit(now_ms) if self._submit is not None else None
            report = apply_rules(
                session,
                ruleset,
                now_ms=now_ms,
                max_reversals=self.max_reversals,
                dry_run_default=self.dry_run,
                confirm_timeout_ms=self.confirm_timeout_ms,
                events_by_key=touched,
                submit=submit,
            )
        # Only after the commit: a worker must find the rows when the message arrives. If the
        # broker is down the commands stay pending; the commands core's sweep sends them later.
        if self.send is not None:
            enqueue_commands(self.send, report.pending)
        return report
