"""Reading the mirror and the inbox: organizations, members, invitations, roles, inbox events."""

from __future__ import annotations

import logging
from typing import Any

import click

from models import queries
from models.db import make_session_factory, session_scope
from models.errors import PermanentError, RetryableError
from models.queries import INVITATION_STATUSES
from models.tables import InboxEvent, InboxStatus
from orgsync.cli.base import (
    EPILOG,
    NotFoundError,
    emit,
    emit_page,
    first_line,
    invitations,
    json_option,
    members,
    open_database,
    org_option,
    paging_options,
    reading,
    resolve_org,
    runtime,
    warn,
)

log = logging.getLogger("orgsync")


@click.group(epilog=EPILOG)
def orgs() -> None:
    """Organizations in the mirror."""


@orgs.command("list", epilog=EPILOG)
@paging_options(100)
@json_option
@click.pass_context
def orgs_list(ctx: click.Context, *, page: int, page_size: int, as_json: bool) -> None:
    """List organizations, oldest first."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        result = queries.list_organizations(session, page=page, page_size=page_size)
    emit_page(
        result,
        [
            ("id", "id"),
            ("slug", "slug"),
            ("name", "name"),
            ("members", "members_count"),
            ("created", "created_at"),
            ("updated", "updated_at"),
        ],
        as_json=as_json,
        number=page,
        size=page_size,
    )


@members.command("list", epilog=EPILOG)
@org_option
@click.option("--role", default=None, metavar="KEY", help="Only this role, e.g. org:admin.")
@paging_options(100)
@json_option
@click.pass_context
def members_list(
    ctx: click.Context, *, org_ref: str, role: str | None, page: int, page_size: int, as_json: bool
) -> None:
    """List the members of an organization, oldest first."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        org = resolve_org(session, org_ref)
        result = queries.get_memberships(session, org.id, page=page, page_size=page_size, role=role)
    emit_page(
        result,
        [
            ("user id", "public_user_data.user_id"),
            ("identifier", "public_user_data.identifier"),
            ("first name", "public_user_data.first_name"),
            ("last name", "public_user_data.last_name"),
            ("role", "role"),
            ("membership id", "id"),
            ("joined", "created_at"),
        ],
        as_json=as_json,
        number=page,
        size=page_size,
    )


@invitations.command("list", epilog=EPILOG)
@org_option
@click.option("--status", type=click.Choice(INVITATION_STATUSES), default=None, help="Only this status.")
@paging_options(100)
@json_option
@click.pass_context
def invitations_list(
    ctx: click.Context, *, org_ref: str, status: str | None, page: int, page_size: int, as_json: bool
) -> None:
    """List the invitations of an organization, newest first (every status unless --status)."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        org = resolve_org(session, org_ref)
        result = queries.list_invitations(session, org.id, status=status, page=page, page_size=page_size)
    emit_page(
        result,
        [
            ("id", "id"),
            ("email address", "email_address"),
            ("role", "role"),
            ("status", "status"),
            ("created", "created_at"),
            ("expires", "expires_at"),
        ],
        as_json=as_json,
        number=page,
        size=page_size,
    )


@click.group(epilog=EPILOG)
def roles() -> None:
    """Roles in the mirror."""


@roles.command("list", epilog=EPILOG)
@paging_options(100)
@json_option
@click.pass_context
def roles_list(ctx: click.Context, *, page: int, page_size: int, as_json: bool) -> None:
    """List roles by key, with their permissions."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        result = queries.list_roles(session, page=page, page_size=page_size)
    emit_page(
        result,
        [("key", "key"), ("name", "name"), ("id", "id"), ("permissions", "permissions")],
        as_json=as_json,
        number=page,
        size=page_size,
    )


@click.group(epilog=EPILOG)
def events() -> None:
    """The webhook inbox: what arrived and what became of it."""


def event_dict(row: InboxEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "svix_id": row.svix_id,
        "type": row.event_type,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "received_at": row.received_at,
        "handled_at": row.handled_at,
        "next_attempt_at": row.next_attempt_at,
    }


@events.command("list", epilog=EPILOG)
@click.option("--status", type=click.Choice(InboxStatus.ALL), default=None, help="Only this status.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@click.pass_context
def events_list(ctx: click.Context, status: str | None, limit: int, as_json: bool) -> None:
    """List inbox events, newest first."""
    from models.inbox import list_events  # noqa: PLC0415

    settings = runtime(ctx).settings()
    with reading(settings) as session:
        rows = [event_dict(row) for row in list_events(session, status=status, limit=limit)]
    emit(
        rows,
        [
            ("id", "id"),
            ("svix id", "svix_id"),
            ("type", "type"),
            ("status", "status"),
            ("attempts", "attempts"),
            ("received", "received_at"),
            ("last error", "last_error"),
        ],
        as_json,
    )


@events.command("replay", epilog=EPILOG)
@click.argument("refs", nargs=-1, required=True, metavar="ID...")
@click.pass_context
def events_replay(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Apply inbox events again: by inbox id or svix id (msg_...).

    The events are reset to pending and committed, then enqueued. If the broker cannot be
    reached they stay pending and the sweeper enqueues them once it can.
    """
    from models.inbox import reset_for_replay  # noqa: PLC0415

    rt = runtime(ctx)
    settings = rt.settings()
    with open_database(settings) as engine, session_scope(make_session_factory(engine)) as session:
        try:
            ids = reset_for_replay(session, refs)
        except RetryableError:
            raise
        except PermanentError as exc:
            # The inbox names every unknown reference and changes nothing.
            raise NotFoundError(str(exc)) from exc
    listed = ", ".join(str(i) for i in ids)
    click.echo(f"reset {len(ids)} event(s) to pending: {listed}")
    # Enqueue only after the commit above, so that the worker sees the rows as pending.
    try:
        rt.sender(settings)(ids)
    except Exception as exc:
        log.debug("enqueue failed", exc_info=True)
        warn(
            f"could not enqueue them ({type(exc).__name__}: {first_line(exc)}); they stay pending "
            f"and the sweeper enqueues them once the broker is reachable"
        )
        return
    click.echo(f"enqueued {len(ids)} event(s)")
