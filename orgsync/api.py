"""The Python API for applications: read the mirror and ask for changes in Clerk.

    from orgsync.api import Orgsync

    orgsync = Orgsync.from_env(requested_by="api:billing")
    command = orgsync.set_role("acme", "user_2abc", "org:admin")
    orgsync.get_memberships("acme", role="org:admin")

A change is recorded as a command (the outbox) and committed before it is enqueued, exactly
as the CLI does; if the broker is down the command stays pending and the workers' periodic
sweep sends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models import queries
from models.commands import CommandError, CommandRequest, submit_command
from models.db import create_db_engine, make_session_factory, session_scope
from models.redact import describe_error
from models.settings import Settings
from models.tables import Command, CommandKind, CommandStatus

log = logging.getLogger(__name__)

Sender = Callable[[list[int]], None]


class Orgsync:
    """One per process: it owns an engine, a session factory and (lazily) a Celery client."""

    def __init__(
        self,
        settings: Settings,
        *,
        requested_by: str,
        engine: Engine | None = None,
        send: Sender | None = None,
    ) -> None:
        if not requested_by.strip():
            raise CommandError("requested_by", "is required (e.g. 'api:billing')")
        self.settings = settings
        self.requested_by = requested_by
        self.engine = engine if engine is not None else create_db_engine(settings.database_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self._send = send

    @classmethod
    def from_env(cls, *, requested_by: str) -> Orgsync:
        return cls(Settings.from_env(), requested_by=requested_by)

    # ------------------------------------------------------------------ reads
    def get_memberships(
        self,
        organization: str,
        *,
        page: int = 1,
        page_size: int = 10,
        role: str | Sequence[str] | None = None,
    ) -> queries.Page[queries.MembershipView]:
        with self.sessions() as session:
            return queries.get_memberships(session, organization, page=page, page_size=page_size, role=role)

    def get_user_memberships(
        self, user_id: str, *, page: int = 1, page_size: int = 10
    ) -> queries.Page[queries.MembershipView]:
        with self.sessions() as session:
            return queries.get_user_memberships(session, user_id, page=page, page_size=page_size)

    def get_pending_invitations(
        self, organization: str, *, page: int = 1, page_size: int = 10
    ) -> queries.Page[queries.InvitationView]:
        with self.sessions() as session:
            return queries.get_pending_invitations(session, organization, page=page, page_size=page_size)

    # ------------------------------------------------------------------ changes
    def set_role(self, organization: str, user_id: str, role: str, **options: Any) -> Command:
        return self._submit(CommandKind.SET_ROLE, organization, user_id=user_id, role=role, **options)

    def add_member(
        self, organization: str, user_id: str, role: str = "org:member", **options: Any
    ) -> Command:
        return self._submit(CommandKind.ADD_MEMBER, organization, user_id=user_id, role=role, **options)

    def remove_member(self, organization: str, user_id: str, **options: Any) -> Command:
        return self._submit(CommandKind.REMOVE_MEMBER, organization, user_id=user_id, **options)

    def invite(
        self, organization: str, email_address: str, role: str = "org:member", **options: Any
    ) -> Command:
        return self._submit(
            CommandKind.INVITE, organization, email_address=email_address, role=role, **options
        )

    def bulk_invite(
        self, organization: str, email_addresses: Sequence[str], role: str = "org:member", **options: Any
    ) -> Command:
        payload = {**dict(options.pop("payload", None) or {}), "email_addresses": list(email_addresses)}
        return self._submit(CommandKind.BULK_INVITE, organization, role=role, payload=payload, **options)

    def revoke_invitation(self, organization: str, invitation_id: str, **options: Any) -> Command:
        return self._submit(
            CommandKind.REVOKE_INVITATION, organization, invitation_id=invitation_id, **options
        )

    def _submit(
        self,
        kind: str,
        organization: str,
        *,
        payload: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        **target: Any,
    ) -> Command:
        with session_scope(self.sessions) as session:
            found = queries.resolve_organization(session, organization)
            if found is None:
                raise CommandError(
                    "organization", f"no organization with id or slug {organization!r} in the mirror"
                )
            command = submit_command(
                session,
                CommandRequest(
                    kind=kind,
                    organization_id=found.id,
                    requested_by=self.requested_by,
                    payload=payload,
                    idempotency_key=idempotency_key,
                    dry_run=dry_run,
                    **target,
                ),
                now_ms=int(time.time() * 1000),
                dry_run_default=self.settings.dry_run,
            )
        # After the commit: a worker must find the row it is told about.
        if command.status == CommandStatus.PENDING:
            self._enqueue(command.id)
        return command

    def _enqueue(self, command_id: int) -> None:
        if self._send is None:
            from worker.app import create_celery, make_command_sender  # noqa: PLC0415 (Celery on first use)

            self._send = make_command_sender(create_celery(self.settings))
        try:
            self._send([command_id])
        except Exception as exc:
            log.warning(
                "command %d recorded but not enqueued (%s); the sweep sends it",
                command_id,
                describe_error(exc),
            )

    def close(self) -> None:
        self.engine.dispose()
