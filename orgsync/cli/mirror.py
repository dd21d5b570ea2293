"""Reading the mirror and the inbox: organizations, members, invitations, roles, inbox events."""

from __future__ import annotations

import logging
from typing import Any

import click

from models import reads
from models.db import make_session_factory, session_scope
from models.errors import PermanentError, RetryableError
from models.reads import INVITATION_STATUSES
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
    paging_options,
    reading,
    resolve_org_id,
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
        limit, offset = reads.page_window(page, page_size)
        result = reads.list_organizations(session, limit=limit, offset=offset, order_by="created_at")
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


def _filters_page(listing: reads.Listing[Any] | None, missing: str) -> reads.Listing[Any]:
    if listing is None:
        raise NotFoundError(missing)
    return listing


def _missing(org_ref: str | None, user: str | None) -> str:
    if org_ref is not None:
        return f"no organization with id or slug {org_ref!r}"
    return f"no user {user!r} in the mirror"


optional_org_option = click.option(
    "--org",
    "org_ref",
    default=None,
    metavar="ID_OR_SLUG",
    help="Organization id or slug (without it: every organization).",
)
user_option = click.option(
    "--user", default=None, metavar="USER_ID", help="Only this user's (with or without --org)."
)
query_option = click.option(
    "--query", default=None, metavar="TEXT", help="Match the user id exactly, or the email or names in part."
)


@members.command("list", epilog=EPILOG)
@optional_org_option
@user_option
@click.option(
    "--role", "roles", multiple=True, metavar="KEY", help="Only this role, e.g. org:admin; repeatable."
)
@query_option
@click.option(
    "--order-by",
    default="created_at",
    show_default=True,
    metavar="FIELD",
    help=f"One of {', '.join(reads.MEMBERSHIP_ORDER)}; prefix - for descending.",
)
@paging_options(100)
@json_option
@click.pass_context
def members_list(
    ctx: click.Context,
    *,
    org_ref: str | None,
    user: str | None,
    roles: tuple[str, ...],
    query: str | None,
    order_by: str,
    page: int,
    page_size: int,
    as_json: bool,
) -> None:
    """List memberships: of an organization, of a user, or of every organization; oldest first."""
    if any(not role.strip() for role in roles):
        raise reads.InvalidParameterError("role", "must be a role key such as org:admin, not empty")
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        org_id = None if org_ref is None else resolve_org_id(session, org_ref)
        result = _filters_page(
            reads.list_memberships(
                session,
                organization=org_id,
                user=user,
                roles=roles,
                query=query,
                order_by=order_by,
                limit=page_size,
                offset=(page - 1) * page_size,
            ),
            _missing(org_ref, user),
        )
    columns = [
        ("user id", "public_user_data.user_id"),
        ("identifier", "public_user_data.identifier"),
        ("first name", "public_user_data.first_name"),
        ("last name", "public_user_data.last_name"),
        ("role", "role"),
        ("membership id", "id"),
        ("joined", "created_at"),
    ]
    if org_ref is None:
        columns.insert(0, ("organization", "organization_id"))
    emit_page(result, columns, as_json=as_json, number=page, size=page_size)


@invitations.command("list", epilog=EPILOG)
@optional_org_option
@click.option(
    "--user",
    default=None,
    metavar="USER_ID",
    help="Only those sent to or accepted by this user.",
)
@click.option("--status", type=click.Choice(INVITATION_STATUSES), default=None, help="Only this status.")
@click.option("--query", default=None, metavar="TEXT", help="Match the email address in part.")
@click.option(
    "--order-by",
    default="-created_at",
    show_default=True,
    metavar="FIELD",
    help=f"One of {', '.join(reads.INVITATION_ORDER)}; prefix - for descending.",
)
@paging_options(100)
@json_option
@click.pass_context
def invitations_list(
    ctx: click.Context,
    *,
    org_ref: str | None,
    user: str | None,
    status: str | None,
    query: str | None,
    order_by: str,
    page: int,
    page_size: int,
    as_json: bool,
) -> None:
    """List invitations: of an organization, of a user, or of every organization; newest first."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        org_id = None if org_ref is None else resolve_org_id(session, org_ref)
        result = _filters_page(
            reads.list_invitations(
                session,
                organization=org_id,
                user=user,
                status=status,
                query=query,
                order_by=order_by,
                limit=page_size,
                offset=(page - 1) * page_size,
            ),
            _missing(org_ref, user),
        )
    columns = [
        ("id", "id"),
        ("email address", "email_address"),
        ("role", "role"),
        ("status", "status"),
        ("created", "created_at"),
        ("expires", "expires_at"),
    ]
    if org_ref is None:
        columns.insert(1, ("organization", "organization_id"))
    emit_page(result, columns, as_json=as_json, number=page, size=page_size)


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
        limit, offset = reads.page_window(page, page_size)
        result = reads.list_roles(session, limit=limit, offset=offset, order_by="key")
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
