"""The one submission path for changes in Clerk: validate, record, commit, enqueue after the commit, wait.

Every entry point (the command line, the Python API, the provisioning rules, the HTTP API
and console to come) goes through here, so they all behave alike:

* the organization is named by id or slug and resolved from the mirror
  (``OrganizationNotFoundError`` when the mirror does not know it);
* a ``bulk_invite`` of more than ``MAX_BULK`` addresses becomes one command per ``MAX_BULK``
  (Clerk's limit), all recorded in one transaction, with idempotency keys derived from the
  one given (``KEY:1``, ``KEY:2``...);
* after the commit, every command still open (``pending`` or ``sending``) is enqueued. A
  ``sending`` one is there because an idempotent re-run or a retry returned a command a worker
  may be holding: a second message is harmless (the worker leaves a leased command alone, and
  takes over one whose lease ran out). A broker that cannot be reached is logged and loses
  nothing: the commands stay open and the workers' periodic sweep sends them;
* waiting polls the rows until each command has left the workers' hands (applied, confirmed,
  failed or superseded) or the time is up.

Rules record inside a transaction of their own (``record_commands`` flushes, never commits)
and call ``enqueue_commands`` after their commit. Flask and Celery stay out: the Celery
sender is a plain ``send(ids)`` handed in by the composition root.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import reads
from models.clock import now_ms
from models.commands import (
    MAX_BULK,
    CommandRequest,
    InvalidCommandError,
    retry_command,
    submit_command,
)
from models.db import session_scope
from models.errors import OrganizationNotFoundError
from models.redact import describe_error
from models.tables import Command, CommandKind, CommandStatus

log = logging.getLogger(__name__)

Send = Callable[[list[int]], None]
# Where waiting stops: the command left the workers' hands (confirmation can take a webhook's time).
SETTLED = (CommandStatus.APPLIED, CommandStatus.CONFIRMED, CommandStatus.FAILED, CommandStatus.SUPERSEDED)
POLL_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Submitted:
    """Commands recorded and committed, and whether the open ones reached the broker.

    ``enqueue_error`` names the broker failure (redacted) when they did not: the sweep sends
    them later.
    """

    commands: list[Command]
    enqueue_error: str | None = None

    @property
    def open_ids(self) -> list[int]:
        return open_command_ids(self.commands)

    @property
    def enqueued(self) -> bool:
        return self.enqueue_error is None


def part_key(key: str | None, part: str, count: int) -> str | None:
    """The idempotency key of one part of a request split in ``count`` commands."""
    if key is None or count == 1:
        return key
    return f"{key}:{part}"


def split_request(request: CommandRequest) -> list[CommandRequest]:
    """A ``bulk_invite`` of more than ``MAX_BULK`` addresses as several; anything else as is.

    Addresses are checked for repeats over the whole list (Clerk matches them ignoring case),
    so a repeat in two different parts is refused like one within a part.
    """
    payload = dict(request.payload or {})
    emails = payload.get("email_addresses")
    if request.kind != CommandKind.BULK_INVITE or not isinstance(emails, list) or len(emails) <= MAX_BULK:
        return [request]
    seen: set[str] = set()
    for email in emails:
        if isinstance(email, str):
            folded = email.strip().lower()
            if folded in seen:
                raise InvalidCommandError("payload.email_addresses", f"lists {email.strip()!r} twice")
            seen.add(folded)
    parts = [emails[start : start + MAX_BULK] for start in range(0, len(emails), MAX_BULK)]
    return [
        replace(
            request,
            payload={**payload, "email_addresses": part},
            idempotency_key=part_key(request.idempotency_key, str(index), len(parts)),
        )
        for index, part in enumerate(parts, start=1)
    ]


def resolve_organization_id(session: Session, ref: str) -> str:
    """The id of the live organization with id or slug ``ref`` in the mirror."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidCommandError("organization_id", "is required")
    found = reads.organization_id(session, ref.strip())
    if found is None:
        raise OrganizationNotFoundError(f"no organization with id or slug {ref!r} in the mirror")
    return found


def record_commands(
    session: Session,
    requests: Sequence[CommandRequest],
    *,
    now_ms: int,
    dry_run_default: bool = False,
    resolved: dict[str, str] | None = None,
) -> list[Command]:
    """Resolve, split and record ``requests`` (``organization_id`` may be a slug); flushes,
    never commits. Raises ``InvalidCommandError``, ``LastAdminError`` or
    ``OrganizationNotFoundError`` and records nothing the caller then commits.

    ``resolved`` caches organization references across calls within one transaction.
    """
    resolved = {} if resolved is None else resolved
    commands: list[Command] = []
    for request in requests:
        ref = request.organization_id
        if ref not in resolved:
            resolved[ref] = resolve_organization_id(session, ref)
        for part in split_request(replace(request, organization_id=resolved[ref])):
            commands.append(submit_command(session, part, now_ms=now_ms, dry_run_default=dry_run_default))
    return commands


def open_command_ids(commands: Sequence[Command]) -> list[int]:
    """The commands to hand to the workers: every one still open (``pending`` or ``sending``)."""
    return [command.id for command in commands if command.status in CommandStatus.OPEN]


def enqueue_commands(send: Send | None, ids: Sequence[int]) -> str | None:
    """Hand committed command ids to the workers; on failure log it and return why (None: sent).

    Call only after the commit that made the rows visible: a worker must find them.
    """
    if not ids:
        return None
    if send is None:
        return "no sender configured"
    try:
        send(list(ids))
    except Exception as exc:
        reason = describe_error(exc)
        log.warning("%d command(s) recorded but not enqueued (%s); the sweep sends them", len(ids), reason)
        return reason
    return None


class CommandService:
    """Submits, retries and waits for commands, with one session factory and one sender."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        send: Send | None,
        *,
        dry_run_default: bool = False,
        clock_ms: Callable[[], int] = now_ms,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.sessions = sessions
        self.send = send
        self.dry_run_default = dry_run_default
        self.clock_ms = clock_ms
        self.poll_interval_s = poll_interval_s

    def submit(self, requests: Sequence[CommandRequest]) -> Submitted:
        """Record every request in one transaction, commit, then enqueue the open commands."""
        with session_scope(self.sessions) as session:
            commands = record_commands(
                session, requests, now_ms=self.clock_ms(), dry_run_default=self.dry_run_default
            )
        return self._enqueue(commands)

    def retry(self, command_id: int) -> Submitted:
        """A failed command back to pending, committed, then enqueued; an open one enqueued again."""
        with session_scope(self.sessions) as session:
            command = retry_command(session, command_id, now_ms=self.clock_ms())
        return self._enqueue([command])

    def _enqueue(self, commands: list[Command]) -> Submitted:
        return Submitted(commands, enqueue_commands(self.send, open_command_ids(commands)))

    def load(self, ids: Sequence[int]) -> list[Command]:
        """The current rows of these commands, in the order given (unknown ids left out)."""
        with session_scope(self.sessions) as session:
            rows = {row.id: row for row in session.scalars(select(Command).where(Command.id.in_(list(ids))))}
        return [rows[command_id] for command_id in ids if command_id in rows]

    def wait(
        self,
        ids: Sequence[int],
        timeout_s: float,
        *,
        on_poll: Callable[[list[Command]], None] | None = None,
    ) -> list[Command]:
        """Poll until every command is settled (``SETTLED``) or ``timeout_s`` passes; the last rows.

        The caller tells the two apart with ``all_settled``: a timeout is no error, the workers
        carry on.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.load(ids)
            if on_poll is not None:
                on_poll(rows)
            remaining = deadline - time.monotonic()
            if all_settled(rows) or remaining <= 0:
                return rows
            time.sleep(min(self.poll_interval_s, remaining))


def all_settled(commands: Sequence[Command]) -> bool:
    return all(command.status in SETTLED for command in commands)
