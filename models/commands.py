"""The commands outbox in the database: record, guard, supersede, confirm and query changes for Clerk.

A command is a row before anything is sent. ``submit_command`` validates it, applies the
last-admin guard from the mirror and supersedes older unsent commands for the same target;
the worker (``worker.commands``) sends it; ``confirm_commands`` marks it confirmed when the
mirror, fed by webhooks, shows the desired state, and flags it when that takes too long.
Everything here only flushes: the caller's ``session_scope`` commits.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from models.errors import PermanentError
from models.events import normalize_role_key
from models.tables import ApiCall, Command, CommandKind, CommandStatus, Invitation, Membership, Role

ADMIN_PERMISSION = "org:sys_memberships:manage"
ADMIN_ROLE = "org:admin"
MEMBERSHIP_KINDS = (CommandKind.SET_ROLE, CommandKind.ADD_MEMBER, CommandKind.REMOVE_MEMBER)
MAX_BULK = 10
MAX_LIST = 1000
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
INVITE_OPTIONS = frozenset(
    {"inviter_user_id", "redirect_url", "expires_in_days", "public_metadata", "private_metadata"}
)
MEMBER_OPTIONS = frozenset({"public_metadata", "private_metadata"})
# Clerk records who revoked; the user must be a member of the organization.
REVOKE_OPTIONS = frozenset({"requesting_user_id"})
LAST_ADMIN_CODE = "last_admin_guard"
# Which older unsent commands a new one makes pointless: those whose end state it overrides.
# A role change does not override an unsent add_member (the member must exist first).
SUPERSEDES = {
    CommandKind.SET_ROLE: (CommandKind.SET_ROLE,),
    CommandKind.ADD_MEMBER: (CommandKind.ADD_MEMBER, CommandKind.REMOVE_MEMBER),
    CommandKind.REMOVE_MEMBER: MEMBERSHIP_KINDS,
    CommandKind.INVITE: (CommandKind.INVITE,),
    CommandKind.REVOKE_INVITATION: (CommandKind.REVOKE_INVITATION,),
    CommandKind.BULK_INVITE: (),
}


class InvalidCommandError(PermanentError, ValueError):
    """A command request that cannot be recorded as given; names the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class LastAdminError(PermanentError):
    """The change would leave the organization without a member allowed to manage memberships."""


class CommandStateError(PermanentError):
    """The command is not in a state that allows what was asked (e.g. retrying a confirmed one)."""


class CommandNotFoundError(PermanentError):
    """No command with that id."""


@dataclass(frozen=True)
class CommandRequest:
    """What someone wants changed in Clerk. ``payload`` carries kind-specific extras:

    * ``bulk_invite``: ``{"email_addresses": [...]}`` (1 to 10) plus any invite option;
    * ``invite``: ``inviter_user_id``, ``redirect_url``, ``expires_in_days``, ``public_metadata``,
      ``private_metadata``; ``add_member``: ``public_metadata``, ``private_metadata``;
    * ``revoke_invitation``: ``requesting_user_id`` (the member Clerk records as revoking it).
    """

    kind: str
    organization_id: str
    requested_by: str
    user_id: str | None = None
    email_address: str | None = None
    invitation_id: str | None = None
    role: str | None = None
    payload: Mapping[str, Any] | None = None
    rule_name: str | None = None
    dry_run: bool = False
    idempotency_key: str | None = None


# ------------------------------------------------------------------ validation
def _text(value: Any, field: str, *, required: bool = True) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidCommandError(field, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidCommandError(field, "must be a string")
    return value.strip()


def _email(value: Any, field: str) -> str:
    email = _text(value, field)
    assert email is not None
    if not EMAIL_RE.match(email):
        raise InvalidCommandError(field, f"{email!r} is not an email address")
    return email


def _options(payload: dict[str, Any], allowed: frozenset[str], kind: str) -> None:
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise InvalidCommandError(f"payload.{unknown[0]}", f"is not an option of {kind}")
    for name in ("public_metadata", "private_metadata"):
        if payload.get(name) is not None and not isinstance(payload[name], Mapping):
            raise InvalidCommandError(f"payload.{name}", "must be an object")
    days = payload.get("expires_in_days")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 365):
        raise InvalidCommandError("payload.expires_in_days", "must be a whole number of days from 1 to 365")
    for name in ("inviter_user_id", "redirect_url", "requesting_user_id"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise InvalidCommandError(f"payload.{name}", "must be a string")
    if "requesting_user_id" in payload:
        payload["requesting_user_id"] = _text(payload["requesting_user_id"], "payload.requesting_user_id")


def _validated(request: CommandRequest) -> dict[str, Any]:
    """The row's columns for a valid request; ``InvalidCommandError`` naming the field otherwise."""
    kind = request.kind
    if kind not in CommandKind.ALL:
        raise InvalidCommandError("kind", f"{kind!r} is not one of {', '.join(CommandKind.ALL)}")
    org = _text(request.organization_id, "organization_id")
    requested_by = _text(request.requested_by, "requested_by")
    payload = dict(request.payload or {})
    row: dict[str, Any] = {
        "kind": kind,
        "organization_id": org,
        "requested_by": requested_by,
        "rule_name": _text(request.rule_name, "rule_name", required=False),
        "user_id": None,
        "email_address": None,
        "invitation_id": None,
        "role": None,
        "payload": None,
    }
    if kind in (CommandKind.SET_ROLE, CommandKind.ADD_MEMBER):
        row["user_id"] = _text(request.user_id, "user_id")
        row["role"] = _text(request.role, "role")
    elif kind == CommandKind.REMOVE_MEMBER:
        row["user_id"] = _text(request.user_id, "user_id")
    elif kind == CommandKind.INVITE:
        row["email_address"] = _email(request.email_address, "email_address")
        row["role"] = _text(request.role, "role")
    elif kind == CommandKind.BULK_INVITE:
        row["role"] = _text(request.role, "role")
        emails = payload.pop("email_addresses", None)
        if request.email_address is not None and emails is None:
            emails = [request.email_address]
        if not isinstance(emails, list) or not 1 <= len(emails) <= MAX_BULK:
            raise InvalidCommandError(
                "payload.email_addresses", f"must be a list of 1 to {MAX_BULK} email addresses"
            )
        cleaned = [_email(e, f"payload.email_addresses[{i}]") for i, e in enumerate(emails)]
        if len({e.lower() for e in cleaned}) != len(cleaned):
            raise InvalidCommandError("payload.email_addresses", "lists an address twice")
        payload["email_addresses"] = cleaned
    else:
        row["invitation_id"] = _text(request.invitation_id, "invitation_id")
    if kind == CommandKind.ADD_MEMBER:
        _options(payload, MEMBER_OPTIONS, kind)
    elif kind in (CommandKind.INVITE, CommandKind.BULK_INVITE):
        _options(payload, INVITE_OPTIONS | {"email_addresses"}, kind)
    elif kind == CommandKind.REVOKE_INVITATION:
        _options(payload, REVOKE_OPTIONS, kind)
    elif payload:
        raise InvalidCommandError(f"payload.{sorted(payload)[0]}", f"is not an option of {kind}")
    row["payload"] = {key: value for key, value in payload.items() if value is not None} or None
    return row


# ------------------------------------------------------------- last-admin guard
def admin_role_levels(session: Session) -> dict[str, bool]:
    """Live role keys of the mirror, each with whether it holds the admin-level permission."""
    rows = session.execute(select(Role.key, Role.permissions).where(Role.deleted.is_(False)))
    return {key: ADMIN_PERMISSION in (permissions or []) for key, permissions in rows if key}


def is_admin_role(role: str, levels: Mapping[str, bool], permissions: Sequence[str] | None = None) -> bool:
    """The mirror's roles first, then the membership's own permissions, then Clerk's default key."""
    key = normalize_role_key(role)
    if key in levels:
        return levels[key]
    if permissions is not None:
        return ADMIN_PERMISSION in permissions
    return key == ADMIN_ROLE


def last_admin_violation(
    session: Session, organization_id: str, user_id: str, new_role: str | None
) -> str | None:
    """Why changing ``user_id`` to ``new_role`` (None: removing) would leave no admin, or None."""
    levels = admin_role_levels(session)
    if new_role is not None and is_admin_role(new_role, levels):
        return None
    members = session.execute(
        select(Membership.user_id, Membership.role, Membership.permissions).where(
            Membership.organization_id == organization_id, Membership.deleted.is_(False)
        )
    ).all()
    admins = {uid for uid, role, permissions in members if is_admin_role(role, levels, permissions)}
    if user_id not in admins or admins - {user_id}:
        return None
    change = "removing" if new_role is None else f"giving role {new_role} to"
    return (
        f"refused: {change} {user_id} would leave organization {organization_id} without a member "
        f"holding {ADMIN_PERMISSION} (per the mirror)"
    )


# ------------------------------------------------------------------ targets
def same_target(command: Command) -> Any:
    """The condition selecting commands aimed at the same thing as ``command`` (None: no target)."""
    org = Command.organization_id == command.organization_id
    if command.kind in MEMBERSHIP_KINDS:
        return and_(org, Command.kind.in_(MEMBERSHIP_KINDS), Command.user_id == command.user_id)
    if command.kind == CommandKind.INVITE and command.email_address:
        return and_(
            org,
            Command.kind == CommandKind.INVITE,
            func.lower(Command.email_address) == command.email_address.lower(),
        )
    if command.kind == CommandKind.REVOKE_INVITATION:
        return and_(org, Command.kind == command.kind, Command.invitation_id == command.invitation_id)
    return None


# ------------------------------------------------------------------ submitting
def submit_command(
    session: Session, request: CommandRequest, *, now_ms: int, dry_run_default: bool = False
) -> Command:
    """Record a command (``planned`` if dry run, else ``pending``); flushes, never commits.

    The same ``idempotency_key`` again returns the existing row unchanged. Raises
    ``InvalidCommandError`` for an invalid request and ``LastAdminError`` when the mirror shows the
    change would remove the organization's last admin-level member.
    """
    if request.idempotency_key is not None:
        key = _text(request.idempotency_key, "idempotency_key")
        existing = session.scalars(select(Command).where(Command.idempotency_key == key)).first()
        if existing is not None:
            return existing
    else:
        key = f"auto:{uuid.uuid4().hex}"
    row = _validated(request)
    if row["kind"] in (CommandKind.SET_ROLE, CommandKind.REMOVE_MEMBER):
        violation = last_admin_violation(session, row["organization_id"], row["user_id"], row["role"])
        if violation is not None:
            raise LastAdminError(violation)
    dry_run = bool(request.dry_run or dry_run_default)
    command = Command(
        **row,
        idempotency_key=key,
        status=CommandStatus.PLANNED if dry_run else CommandStatus.PENDING,
        dry_run=dry_run,
        attempts=0,
        created_at=now_ms,
        updated_at=now_ms,
    )
    session.add(command)
    session.flush()
    target = same_target(command)
    if not dry_run and target is not None:
        # Only unsent commands: one being sent cannot be recalled, and the new one waits for it.
        older = session.scalars(
            select(Command).where(
                target,
                Command.kind.in_(SUPERSEDES[command.kind]),
                Command.id < command.id,
                Command.status == CommandStatus.PENDING,
            )
        ).all()
        for old in older:
            old.status = CommandStatus.SUPERSEDED
            old.superseded_by = command.id
            old.next_attempt_at = None
            old.updated_at = now_ms
        session.flush()
    return command


def retry_refusal(command: Command) -> str | None:
    """Why sending ``command`` again makes no sense, or None when it may be retried."""
    if command.status == CommandStatus.CONFIRMED:
        return "the mirror shows the change made already; nothing to retry"
    if command.status == CommandStatus.SUPERSEDED:
        return f"command {command.superseded_by} replaced it; retry that one if it failed"
    if command.status == CommandStatus.PLANNED:
        return "a dry run is never sent; submit the change again without dry run"
    if command.status == CommandStatus.APPLIED:
        return "Clerk made the change already; the mirror has not shown it yet"
    if command.status not in (CommandStatus.FAILED, *CommandStatus.OPEN):
        return "only failed, pending and sending commands are retried"
    return None


def retry_command(session: Session, command_id: int, *, now_ms: int) -> Command:
    """A failed command goes back to pending (attempts start over); pending and sending ones
    are returned as they are, for the caller to enqueue. Other states are refused with
    ``CommandStateError`` saying why; an unknown id raises ``CommandNotFoundError``."""
    command = session.get(Command, command_id, with_for_update=True)
    if command is None:
        raise CommandNotFoundError(f"no command {command_id}")
    refusal = retry_refusal(command)
    if refusal is not None:
        raise CommandStateError(f"command {command_id} is {command.status}: {refusal}")
    if command.status in CommandStatus.OPEN:
        return command
    command.status = CommandStatus.PENDING
    command.attempts = 0
    command.error_code = None
    command.error_message = None
    command.next_attempt_at = None
    command.updated_at = now_ms
    session.flush()
    return command


# ---------------------------------------------------------------- confirming
def desired_state_shown(session: Session, command: Command) -> bool:
    """Whether the mirror now shows what ``command`` asked for."""
    result = command.result or {}
    if command.kind in MEMBERSHIP_KINDS:
        membership = session.get(Membership, (command.organization_id, command.user_id))
        live = membership is not None and not membership.deleted
        if command.kind == CommandKind.REMOVE_MEMBER:
            return not live
        if membership is None or not live or command.role is None:
            return False
        expected_id = result.get("membership_id")
        if command.kind == CommandKind.ADD_MEMBER and expected_id:
            # The membership we created has arrived; a later change of its role is another story.
            return bool(membership.id == expected_id)
        return normalize_role_key(membership.role) == normalize_role_key(command.role)
    if command.kind == CommandKind.REVOKE_INVITATION:
        invitation = session.get(Invitation, command.invitation_id)
        return invitation is not None and invitation.status == "revoked"
    ids = result.get("invitation_ids") or ([result["invitation_id"]] if result.get("invitation_id") else [])
    if not ids:
        return False
    found = session.scalar(
        select(func.count())
        .select_from(Invitation)
        .where(Invitation.id.in_(ids), Invitation.deleted.is_(False))
    )
    return found == len(ids)


def confirm_commands(
    session: Session, *, now_ms: int, confirm_timeout_ms: int, limit: int = MAX_LIST
) -> tuple[int, int]:
    """Applied commands the mirror shows done -> confirmed; applied for longer than the timeout
    and not yet flagged -> ``flagged_at``. Returns (confirmed, flagged)."""
    applied = session.scalars(
        select(Command).where(Command.status == CommandStatus.APPLIED).order_by(Command.id).limit(limit)
    ).all()
    confirmed = flagged = 0
    for command in applied:
        if confirm_one(session, command, now_ms=now_ms):
            confirmed += 1
        elif (
            command.flagged_at is None
            and (command.applied_at or command.updated_at) + confirm_timeout_ms <= now_ms
        ):
            command.flagged_at = now_ms
            command.updated_at = now_ms
            flagged += 1
    session.flush()
    return confirmed, flagged


def confirm_one(session: Session, command: Command, *, now_ms: int) -> bool:
    if command.status != CommandStatus.APPLIED or not desired_state_shown(session, command):
        return False
    command.status = CommandStatus.CONFIRMED
    command.confirmed_at = now_ms
    command.updated_at = now_ms
    return True


def due_command_ids(session: Session, *, now_ms: int, grace_ms: int, limit: int) -> list[int]:
    """Commands a sweep should (re-)enqueue: pending and due (left unsent for ``grace_ms`` if
    never scheduled), or ``sending`` past their lease (the worker sending them died)."""
    due = or_(
        and_(
            Command.status == CommandStatus.PENDING,
            or_(
                and_(Command.next_attempt_at.is_(None), Command.updated_at <= now_ms - grace_ms),
                Command.next_attempt_at <= now_ms,
            ),
        ),
        and_(Command.status == CommandStatus.SENDING, Command.next_attempt_at <= now_ms),
    )
    return list(session.scalars(select(Command.id).where(due).order_by(Command.id).limit(limit)))


# ------------------------------------------------------------------- reading
def list_commands(
    session: Session,
    *,
    status: str | None = None,
    organization_id: str | None = None,
    limit: int = 50,
) -> list[Command]:
    """Commands newest first, optionally of one status and one organization."""
    if status is not None and status not in CommandStatus.ALL:
        raise InvalidCommandError("status", f"{status!r} is not one of {', '.join(CommandStatus.ALL)}")
    if not 1 <= limit <= MAX_LIST:
        raise InvalidCommandError("limit", f"must be between 1 and {MAX_LIST}")
    query = select(Command)
    if status is not None:
        query = query.where(Command.status == status)
    if organization_id is not None:
        query = query.where(Command.organization_id == organization_id)
    return list(session.scalars(query.order_by(Command.id.desc()).limit(limit)))


def get_command(session: Session, command_id: int) -> Command | None:
    return session.get(Command, command_id)


def list_api_calls(
    session: Session, *, command_id: int | None = None, limit: int = MAX_LIST
) -> list[ApiCall]:
    """API calls in the order they were made: one command's, or the latest ``limit`` of all."""
    query = select(ApiCall)
    if command_id is not None:
        return list(session.scalars(query.where(ApiCall.command_id == command_id).order_by(ApiCall.id)))
    latest = list(session.scalars(query.order_by(ApiCall.id.desc()).limit(limit)))
    return latest[::-1]
