"""Send recorded commands to Clerk: claim, call, record the outcome and every API call.

Idempotent for real: a command whose earlier attempt may have been carried out (a timeout, a
5xx, a worker that died while sending) looks at Clerk's state before repeating a create, and
a change Clerk reports as already made ("already a member", "invitation not unique",
"not pending" for a revocation) counts as applied when the desired state holds. Transient
failures go back to pending with a jittered backoff (at least ``Retry-After``); Clerk's
business refusals are final. The database reads and writes live in ``models.commands``,
re-exported here as the one import for callers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models.commands import (
    LAST_ADMIN_CODE,
    CommandNotFoundError,
    CommandRequest,
    CommandStateError,
    InvalidCommandError,
    LastAdminError,
    confirm_commands,
    confirm_one,
    due_command_ids,
    get_command,
    last_admin_violation,
    list_api_calls,
    list_commands,
    retry_command,
    same_target,
    submit_command,
)
from models.db import session_scope
from models.errors import PermanentError
from models.tables import Command, CommandKind, CommandStatus
from worker.clerk import CallRecord, ClerkApiError, ClerkClient, ClerkRefusalError
from worker.ratelimit import RateLimitTimeoutError

__all__ = [
    "CommandNotFoundError",
    "CommandRequest",
    "CommandStateError",
    "InvalidCommandError",
    "LastAdminError",
    "SendResult",
    "confirm_commands",
    "due_command_ids",
    "get_command",
    "list_api_calls",
    "list_commands",
    "retry_command",
    "send_command",
    "submit_command",
]

log = logging.getLogger(__name__)

BACKOFF_BASE_MS = 1_000
BACKOFF_CAP_MS = 60_000
# A worker holds a command in ``sending`` this long; past it, a sweep may hand it to another.
DEFAULT_LEASE_MS = 120_000
# How soon to look again when an older command for the same target is still open.
WAIT_FOR_OLDER_MS = 500
# Celery may run a countdown a little early by our clock; don't bounce a task for that.
EARLY_SLACK_MS = 1_000
MAX_ERROR_CHARS = 500

ALREADY_MEMBER = "already_a_member_in_organization"
NOT_UNIQUE = "organization_invitation_not_unique"
NOT_PENDING = "organization_invitation_not_pending"
NOT_FOUND = "resource_not_found"


@dataclass(frozen=True)
class SendResult:
    """The command's status after this run; ``retry_at_ms`` when it should run again."""

    status: str
    retry_at_ms: int | None = None


@dataclass(frozen=True)
class _Spec:
    """What to send, copied out of the row so no session is held during the HTTP calls."""

    id: int
    kind: str
    organization_id: str
    user_id: str | None
    email_address: str | None
    invitation_id: str | None
    role: str | None
    payload: dict[str, Any]
    attempt: int
    check_first: bool


@dataclass(frozen=True)
class _Outcome:
    result: dict[str, Any]


def backoff_ms(attempt: int, retry_after: float | None = None) -> int:
    """Jittered exponential backoff for ``attempt`` (1-based), never shorter than Retry-After."""
    ceiling = min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** max(0, attempt - 1))
    delay = int(random.uniform(ceiling / 2, ceiling))
    if retry_after is not None:
        delay = max(delay, int(retry_after * 1000))
    return delay


# --------------------------------------------------------------------- results
def _membership_result(data: dict[str, Any] | None, *, already: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if data:
        result = {
            "membership_id": data.get("id"),
            "role": data.get("role"),
            "updated_at": data.get("updated_at"),
        }
    if already:
        result["already"] = True
    return result


def _invitation_result(data: dict[str, Any], *, already: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"invitation_id": data.get("id"), "status": data.get("status")}
    if already:
        result["already"] = True
    return result


def _role_of(data: dict[str, Any] | None) -> str | None:
    return None if data is None else data.get("role")


# -------------------------------------------------------------------- sending
def _member_with_role(client: ClerkClient, spec: _Spec) -> _Outcome | None:
    """The outcome "already done" if Clerk shows the user a member with the wanted role, else None."""
    assert spec.user_id is not None
    current = client.get_membership(spec.organization_id, spec.user_id)
    if current is None or _role_of(current) != spec.role:
        return None
    return _Outcome(_membership_result(current, already=True))


def _set_role(client: ClerkClient, spec: _Spec) -> _Outcome:
    assert spec.user_id is not None and spec.role is not None
    if spec.check_first and (done := _member_with_role(client, spec)) is not None:
        return done
    return _Outcome(_membership_result(client.set_role(spec.organization_id, spec.user_id, spec.role)))


def _add_member(client: ClerkClient, spec: _Spec) -> _Outcome:
    assert spec.user_id is not None and spec.role is not None
    if spec.check_first and (done := _member_with_role(client, spec)) is not None:
        return done
    try:
        created = client.add_member(
            spec.organization_id,
            spec.user_id,
            spec.role,
            public_metadata=spec.payload.get("public_metadata"),
            private_metadata=spec.payload.get("private_metadata"),
        )
    except ClerkRefusalError as exc:
        if exc.code != ALREADY_MEMBER:
            raise
        done = _member_with_role(client, spec)
        if done is None:
            raise
        return done
    return _Outcome(_membership_result(created))


def _remove_member(client: ClerkClient, spec: _Spec) -> _Outcome:
    assert spec.user_id is not None
    # Listing the organization's memberships raises 404 when the organization is gone, so
    # "no such membership" below really means the user is not (or no longer) a member.
    if spec.check_first and client.get_membership(spec.organization_id, spec.user_id) is None:
        return _Outcome(_membership_result(None, already=True))
    try:
        removed = client.remove_member(spec.organization_id, spec.user_id)
    except ClerkRefusalError as exc:
        if exc.code != NOT_FOUND or client.get_membership(spec.organization_id, spec.user_id) is not None:
            raise
        return _Outcome(_membership_result(None, already=True))
    return _Outcome(_membership_result(removed))


def _invite_options(payload: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in payload.items() if key != "email_addresses" and value is not None}


def _pending_with_role(client: ClerkClient, spec: _Spec, emails: list[str]) -> dict[str, dict[str, Any]]:
    found = client.find_invitations(spec.organization_id, emails, status="pending")
    return {
        str(item.get("email_address") or "").lower(): item for item in found if item.get("role") == spec.role
    }


def _invite(client: ClerkClient, spec: _Spec) -> _Outcome:
    assert spec.email_address is not None and spec.role is not None
    email = spec.email_address
    if spec.check_first:
        existing = _pending_with_role(client, spec, [email]).get(email.lower())
        if existing is not None:
            return _Outcome(_invitation_result(existing, already=True))
    try:
        created = client.invite(spec.organization_id, email, spec.role, **_invite_options(spec.payload))
    except ClerkRefusalError as exc:
        if exc.code != NOT_UNIQUE:
            raise
        existing = _pending_with_role(client, spec, [email]).get(email.lower())
        if existing is None:
            raise
        return _Outcome(_invitation_result(existing, already=True))
    return _Outcome(_invitation_result(created))


def _bulk_invite(client: ClerkClient, spec: _Spec) -> _Outcome:
    assert spec.role is not None
    emails = [str(e) for e in spec.payload.get("email_addresses") or []]
    options = _invite_options(spec.payload)
    done: dict[str, dict[str, Any]] = {}
    already: list[str] = []
    check = spec.check_first
    for _ in range(2):
        if check:
            done = _pending_with_role(client, spec, emails)
        remaining = [e for e in emails if e.lower() not in done]
        if not remaining:
            already = sorted(done)
            break
        already = sorted(done)
        items = [{"email_address": e, "role": spec.role, **options} for e in remaining]
        try:
            created = client.bulk_invite(spec.organization_id, items)
        except ClerkRefusalError as exc:
            # Clerk creates all or none: when some already exist (our own ambiguous earlier
            # attempt, or someone else's), look once and send only the missing ones.
            if exc.code != NOT_UNIQUE or check:
                raise
            check = True
            continue
        for item in created:
            done[str(item.get("email_address") or "").lower()] = item
        break
    ids = [done[e.lower()].get("id") for e in emails if e.lower() in done]
    return _Outcome({"invitation_ids": ids, "already": already})


def _revoke(client: ClerkClient, spec: _Spec) -> _Outcome:
    assert spec.invitation_id is not None
    if spec.check_first:
        current = client.get_invitation(spec.organization_id, spec.invitation_id)
        if current.get("status") == "revoked":
            return _Outcome(_invitation_result(current, already=True))
    try:
        revoked = client.revoke_invitation(
            spec.organization_id,
            spec.invitation_id,
            requesting_user_id=spec.payload.get("requesting_user_id"),
        )
    except ClerkRefusalError as exc:
        if exc.code != NOT_PENDING:
            raise
        current = client.get_invitation(spec.organization_id, spec.invitation_id)
        if current.get("status") != "revoked":
            raise
        return _Outcome(_invitation_result(current, already=True))
    return _Outcome(_invitation_result(revoked))


SENDERS: dict[str, Callable[[ClerkClient, _Spec], _Outcome]] = {
    CommandKind.SET_ROLE: _set_role,
    CommandKind.ADD_MEMBER: _add_member,
    CommandKind.REMOVE_MEMBER: _remove_member,
    CommandKind.INVITE: _invite,
    CommandKind.BULK_INVITE: _bulk_invite,
    CommandKind.REVOKE_INVITATION: _revoke,
}


def _fail(command: Command, code: str, message: str, now_ms: int) -> None:
    command.status = CommandStatus.FAILED
    command.error_code = code[:128]
    command.error_message = message[:MAX_ERROR_CHARS]
    command.next_attempt_at = None
    command.updated_at = now_ms


def _older_open(session: Session, command: Command) -> bool:
    target = same_target(command)
    if target is None:
        return False
    open_statuses = (CommandStatus.PENDING, CommandStatus.SENDING)
    query = select(Command.id).where(target, Command.id < command.id, Command.status.in_(open_statuses))
    return session.scalars(query.limit(1)).first() is not None


def _claim(
    factory: sessionmaker[Session], command_id: int, *, now_ms: int, lease_ms: int, max_attempts: int
) -> _Spec | SendResult:
    with session_scope(factory) as session:
        command = session.get(Command, command_id, with_for_update=True)
        if command is None:
            return SendResult("missing")
        if command.dry_run or command.status not in (CommandStatus.PENDING, CommandStatus.SENDING):
            return SendResult(command.status)
        due = command.next_attempt_at
        if command.status == CommandStatus.SENDING and due is not None and due > now_ms:
            return SendResult(command.status)  # another worker holds it
        if command.status == CommandStatus.PENDING and due is not None and due > now_ms + EARLY_SLACK_MS:
            return SendResult(command.status, due)  # a duplicate message, early: the real retry follows
        if command.attempts >= max_attempts:
            # Runs that died while sending (their lease ran out) count as attempts too.
            _fail(command, "attempts_exhausted", f"gave up after {command.attempts} attempts", now_ms)
            return SendResult(command.status)
        if _older_open(session, command):
            # Same target, asked earlier, not done yet: keep the order the changes were asked in.
            command.next_attempt_at = now_ms + WAIT_FOR_OLDER_MS
            command.updated_at = now_ms
            return SendResult(command.status, command.next_attempt_at)
        if command.kind in (CommandKind.SET_ROLE, CommandKind.REMOVE_MEMBER):
            assert command.user_id is not None
            violation = last_admin_violation(session, command.organization_id, command.user_id, command.role)
            if violation is not None:
                _fail(command, LAST_ADMIN_CODE, violation, now_ms)
                return SendResult(command.status)
        spec = _Spec(
            id=command.id,
            kind=command.kind,
            organization_id=command.organization_id,
            user_id=command.user_id,
            email_address=command.email_address,
            invitation_id=command.invitation_id,
            role=command.role,
            payload=dict(command.payload or {}),
            attempt=command.attempts + 1,
            # Any earlier attempt may have been carried out without our seeing it succeed.
            check_first=command.attempts > 0,
        )
        command.status = CommandStatus.SENDING
        command.attempts = spec.attempt
        command.sent_at = now_ms
        command.next_attempt_at = now_ms + lease_ms
        command.updated_at = now_ms
        return spec


def send_command(
    factory: sessionmaker[Session],
    client: ClerkClient,
    command_id: int,
    *,
    now_ms: int,
    max_attempts: int = 8,
    lease_ms: int = DEFAULT_LEASE_MS,
    clock_ms: Callable[[], int] | None = None,
) -> SendResult:
    """Send one command (the body of the ``orgsync.send_command`` task).

    Returns the command's new status and, while it should be tried again, when. A command
    not pending (already sent, superseded, dry run) is left alone: duplicate task messages
    are harmless. ``clock_ms`` reads the time after the calls (defaults to ``now_ms``).
    """
    claimed = _claim(factory, command_id, now_ms=now_ms, lease_ms=lease_ms, max_attempts=max_attempts)
    if isinstance(claimed, SendResult):
        return claimed
    spec = claimed
    records: list[CallRecord] = []
    outcome: _Outcome | None = None
    error: Exception | None = None
    try:
        outcome = SENDERS[spec.kind](client.with_recorder(records.append), spec)
    except (ClerkApiError, RateLimitTimeoutError, PermanentError) as exc:
        error = exc
    except Exception as exc:
        # A defect, not Clerk: record it as the command's failure instead of retrying forever.
        log.exception("command %d: unexpected error while sending", spec.id)
        error = exc
    finished = clock_ms() if clock_ms is not None else now_ms
    with session_scope(factory) as session:
        session.add_all(record.to_row(spec.id) for record in records)
        command = session.get(Command, spec.id, with_for_update=True)
        if command is None:
            return SendResult("missing")
        if command.status != CommandStatus.SENDING or command.attempts != spec.attempt:
            # Our lease ran out and another run took over: its outcome is the one that counts.
            log.warning("command %d changed while being sent; keeping its state %s", spec.id, command.status)
            return SendResult(command.status)
        command.updated_at = finished
        if outcome is not None:
            command.status = CommandStatus.APPLIED
            command.applied_at = finished
            command.result = outcome.result
            command.error_code = None
            command.error_message = None
            command.next_attempt_at = None
            # The webhook may have arrived before this write: confirm now if the mirror shows it.
            confirm_one(session, command, now_ms=finished)
            return SendResult(command.status)
        assert error is not None
        if isinstance(error, RateLimitTimeoutError):
            # Nothing was sent: this run does not count as an attempt.
            command.attempts = spec.attempt - 1
            command.status = CommandStatus.PENDING
            command.next_attempt_at = finished + int(error.wait_s * 1000)
            return SendResult(command.status, command.next_attempt_at)
        if isinstance(error, ClerkApiError) and error.retryable:
            code, message = error.code, error.message
            if spec.attempt >= max_attempts:
                _fail(command, code, f"gave up after {spec.attempt} attempts: {message}", finished)
                return SendResult(command.status)
            command.status = CommandStatus.PENDING
            command.error_code = code[:128]
            command.error_message = message[:MAX_ERROR_CHARS]
            command.next_attempt_at = finished + backoff_ms(spec.attempt, error.retry_after)
            return SendResult(command.status, command.next_attempt_at)
        if isinstance(error, ClerkApiError):
            _fail(command, error.code, error.message, finished)
        elif isinstance(error, PermanentError):
            _fail(command, type(error).__name__, str(error), finished)
        else:
            _fail(command, "internal_error", f"{type(error).__name__}: {error}", finished)
        return SendResult(command.status)
