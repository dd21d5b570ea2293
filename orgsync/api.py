"""The Python API for applications: read the mirror and ask for changes in Clerk.

    from orgsync.api import Orgsync

    orgsync = Orgsync.from_env(requested_by="api:billing")
    command = orgsync.set_role("acme", "user_2abc", "org:admin")
    orgsync.wait([command], timeout_s=30)
    orgsync.get_memberships("acme", role="org:admin")
    orgsync.has_permission("user_2abc", "acme", "org:sys_memberships:manage")

Permission checks are one indexed query, or a dictionary lookup with
``Orgsync(..., permission_cache=AccessCache())``: the cache is emptied when the mirror
changes, seen within 50 ms (``AccessCache(recheck_s=0)``: at once, for a query per check;
see ``models.permissions``).

Changes go through the one submission service (``models.submission``), as from the command
line and the rules: recorded as commands and committed before they are enqueued; if the
broker is down they stay pending and the workers' periodic sweep sends them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models import notifications, permissions, reads
from models.commands import CommandRequest, InvalidCommandError
from models.db import create_db_engine, make_session_factory
from models.events import normalize_role_key
from models.permissions import Access, AccessCache
from models.settings import Settings
from models.submission import CommandService, Send
from models.tables import Command, CommandKind


class Orgsync:
    """One per process: it owns an engine, a session factory and (lazily) a Celery client."""

    def __init__(
        self,
        settings: Settings,
        *,
        requested_by: str,
        engine: Engine | None = None,
        send: Send | None = None,
        permission_cache: AccessCache | None = None,
    ) -> None:
        if not requested_by.strip():
            raise InvalidCommandError("requested_by", "is required (e.g. 'api:billing')")
        self.settings = settings
        self.requested_by = requested_by
        self.engine = engine if engine is not None else create_db_engine(settings.database_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self._send = send
        self.permission_cache = permission_cache
        self._checks = permissions.check_sessions(self.engine)
        self.commands = CommandService(self.sessions, self._enqueue, dry_run_default=settings.dry_run)

    @classmethod
    def from_env(cls, *, requested_by: str, permission_cache: AccessCache | None = None) -> Orgsync:
        return cls(Settings.from_env(), requested_by=requested_by, permission_cache=permission_cache)

    # ------------------------------------------------------------ permissions
    def access_of(self, user_id: str, organization: str) -> Access | None:
        """The user's membership of the organization (id or slug): role and permissions, or None."""
        if self.permission_cache is not None:
            return self.permission_cache.access_of(self._checks, user_id, organization)
        with self._checks() as session:
            return permissions.access_of(session, user_id, organization)

    def has_permission(self, user_id: str, organization: str, permission: str) -> bool:
        """May the user do ``permission`` (e.g. ``org:sys_memberships:manage``) in the organization?"""
        access = self.access_of(user_id, organization)
        return access is not None and access.allows(permission)

    def role_of(self, user_id: str, organization: str) -> str | None:
        """The user's role key in the organization (id or slug), or None when not a member."""
        access = self.access_of(user_id, organization)
        return None if access is None else access.role

    def organizations_of(self, user_id: str) -> list[Access]:
        """The user's organizations with the role in each, in the order the user joined them."""
        with self._checks() as session:
            return permissions.organizations_of(session, user_id)

    # ------------------------------------------------------------------ reads
    def list_memberships(
        self,
        *,
        organization: str | None = None,
        user: str | None = None,
        limit: int = 10,
        offset: int = 0,
        order_by: str | None = None,
        roles: Sequence[str] = (),
        query: str | None = None,
        **filters: Any,
    ) -> reads.Listing[reads.MembershipView] | None:
        """Memberships of an organization (id or slug), of a user, or of every organization,
        with Clerk's filters (``models.reads.list_memberships``); None when the organization
        or user named is unknown."""
        with self.sessions() as session:
            return reads.list_memberships(
                session,
                organization=organization,
                user=user,
                limit=limit,
                offset=offset,
                order_by=order_by,
                roles=roles,
                query=query,
                **filters,
            )

    def list_invitations(
        self,
        *,
        organization: str | None = None,
        user: str | None = None,
        limit: int = 10,
        offset: int = 0,
        order_by: str | None = None,
        status: str | Sequence[str] | None = None,
        email_address: str | None = None,
        query: str | None = None,
    ) -> reads.Listing[reads.InvitationDetailView] | None:
        """Invitations of an organization (id or slug), of a user (sent to the user's email or
        accepted by the user), or of every organization; None when the one named is unknown."""
        with self.sessions() as session:
            return reads.list_invitations(
                session,
                organization=organization,
                user=user,
                limit=limit,
                offset=offset,
                order_by=order_by,
                status=status,
                email_address=email_address,
                query=query,
            )

    # Page-numbered shorthands over the same listings; an unknown organization or user reads
    # as an empty page here, as an application rendering a list wants it.
    def get_memberships(
        self,
        organization: str,
        *,
        page: int = 1,
        page_size: int = 10,
        role: str | Sequence[str] | None = None,
    ) -> reads.Listing[reads.MembershipView]:
        """Members of the organization (id or slug), oldest first; ``role`` one key or several."""
        limit, offset = reads.page_window(page, page_size)
        roles = [role] if isinstance(role, str) else list(role or ())
        listing = self.list_memberships(
            organization=organization,
            limit=limit,
            offset=offset,
            order_by="created_at",
            roles=[normalize_role_key(key) for key in roles],
        )
        return listing or reads.Listing([], 0)

    def get_user_memberships(
        self, user_id: str, *, page: int = 1, page_size: int = 10
    ) -> reads.Listing[reads.MembershipView]:
        """The user's memberships, oldest first."""
        limit, offset = reads.page_window(page, page_size)
        listing = self.list_memberships(user=user_id, limit=limit, offset=offset, order_by="created_at")
        return listing or reads.Listing([], 0)

    def get_pending_invitations(
        self, organization: str, *, page: int = 1, page_size: int = 10
    ) -> reads.Listing[reads.InvitationDetailView]:
        """Pending, unexpired invitations of the organization (id or slug), newest first."""
        limit, offset = reads.page_window(page, page_size)
        listing = self.list_invitations(
            organization=organization, status="pending", limit=limit, offset=offset
        )
        return listing or reads.Listing([], 0)

    # ---------------------------------------------------------- notifications
    def on_change(self, callback: Callable[[notifications.Change], None]) -> Callable[[], None]:
        """Call ``callback(change)`` after each mirror write that THIS process commits; returns
        a function that unsubscribes it.

        The process that writes the mirror is the one applying events: a Celery worker
        (``worker.main``) or ``orgsync run``. Register in that process (for example from a
        module the worker imports) to react in-process; elsewhere listen on
        ``ORGSYNC_NOTIFY_CHANNEL`` or receive the outgoing webhooks. ``change.body()`` is the
        webhook's JSON body. Callbacks run after the commit, in order; one that raises is
        logged and the others still run.
        """
        return notifications.subscribe(callback)

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
    ) -> list[Command]:
        """One ``bulk_invite`` command per 10 addresses (Clerk's limit), recorded together."""
        payload = {**dict(options.pop("payload", None) or {}), "email_addresses": list(email_addresses)}
        return self._submit_all(CommandKind.BULK_INVITE, organization, role=role, payload=payload, **options)

    def revoke_invitation(
        self, organization: str, invitation_id: str, *, requesting_user_id: str | None = None, **options: Any
    ) -> Command:
        """``requesting_user_id``: the member Clerk records as revoking it."""
        payload = {**dict(options.pop("payload", None) or {})}
        if requesting_user_id is not None:
            payload["requesting_user_id"] = requesting_user_id
        return self._submit(
            CommandKind.REVOKE_INVITATION,
            organization,
            invitation_id=invitation_id,
            payload=payload or None,
            **options,
        )

    def retry(self, command_id: int) -> Command:
        """Send a failed command again (an open one is enqueued again); final ones are refused."""
        return self.commands.retry(command_id).commands[0]

    def wait(self, commands: Sequence[Command], *, timeout_s: float) -> list[Command]:
        """The commands' rows once each is applied, confirmed, failed or superseded, or at the timeout."""
        return self.commands.wait([command.id for command in commands], timeout_s)

    def _submit(self, kind: str, organization: str, **fields: Any) -> Command:
        return self._submit_all(kind, organization, **fields)[0]

    def _submit_all(
        self,
        kind: str,
        organization: str,
        *,
        payload: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        **target: Any,
    ) -> list[Command]:
        request = CommandRequest(
            kind=kind,
            organization_id=organization,
            requested_by=self.requested_by,
            payload=payload,
            idempotency_key=idempotency_key,
            dry_run=dry_run,
            **target,
        )
        return self.commands.submit([request]).commands

    def _enqueue(self, ids: list[int]) -> None:
        if self._send is None:
            from worker.app import create_celery, make_command_sender  # noqa: PLC0415 (Celery on first use)

            self._send = make_command_sender(create_celery(self.settings))
        self._send(ids)

    def close(self) -> None:
        if self.permission_cache is not None:
            self.permission_cache.close()
        self.engine.dispose()
