"""The change notification outbox: what was announced, to whom it is still owed, and sending again."""

from __future__ import annotations

import json
from typing import Any

import click

from models import notifications
from models.clock import now_ms
from models.db import make_session_factory, session_scope
from models.tables import Notification, NotificationStatus
from orgsync.cli.base import (
    EPILOG,
    BadOptionError,
    NotFoundError,
    emit,
    json_option,
    open_database,
    reading,
    runtime,
)

NOTIFY_EPILOG = (
    EPILOG
    + """
\b
Notifications are recorded when ORGSYNC_NOTIFY_URLS is set, and delivered by the workers to
those URLs, signed with ORGSYNC_NOTIFY_SECRET (Standard Webhooks), every
ORGSYNC_NOTIFY_INTERVAL seconds and after each applied batch.
"""
)


def notification_dict(row: Notification, *, with_data: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {
        "id": row.id,
        "event_id": row.event_id,
        "type": row.type,
        "ordering_key": row.ordering_key,
        "object_id": row.object_id,
        "status": row.status,
        "attempts": row.attempts,
        "created_at": row.created_at,
        "next_attempt_at": row.next_attempt_at if row.status == NotificationStatus.PENDING else None,
        "delivered_at": row.delivered_at,
        "last_error": row.last_error,
    }
    if with_data:
        result["body"] = notifications.webhook_body(row.event_id, row.type, row.created_at, row.data)
    return result


@click.group("notifications", epilog=NOTIFY_EPILOG)
def notifications_group() -> None:
    """Change notifications: the outbox of what changed in the mirror."""


@notifications_group.command("list", epilog=NOTIFY_EPILOG)
@click.option("--status", type=click.Choice(NotificationStatus.ALL), default=None, help="Only this status.")
@click.option(
    "--type",
    "type_prefix",
    default=None,
    metavar="TYPE",
    help="Only this type (membership.added) or family (membership).",
)
@click.option(
    "--org", "org_id", default=None, metavar="ID", help="Only this organization's (or user's) notifications."
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@click.pass_context
def notifications_list(
    ctx: click.Context,
    *,
    status: str | None,
    type_prefix: str | None,
    org_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List notifications, newest first."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        rows = [
            notification_dict(row)
            for row in notifications.list_notifications(
                session, status=status, type_prefix=type_prefix, ordering_key=org_id, limit=limit
            )
        ]
    emit(
        rows,
        [
            ("id", "id"),
            ("event id", "event_id"),
            ("type", "type"),
            ("org", "ordering_key"),
            ("object", "object_id"),
            ("status", "status"),
            ("attempts", "attempts"),
            ("created", "created_at"),
            ("last error", "last_error"),
        ],
        as_json,
    )


@notifications_group.command("show", epilog=NOTIFY_EPILOG)
@click.argument("ref", metavar="ID")
@click.pass_context
def notifications_show(ctx: click.Context, ref: str) -> None:
    """One notification by outbox id or event id (ntf_...): its delivery state and the body sent."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        try:
            row = notifications.get_notification(session, ref)
        except notifications.NotificationNotFoundError as exc:
            raise NotFoundError(str(exc)) from exc
        result = notification_dict(row, with_data=True)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False))


@notifications_group.command("retry", epilog=NOTIFY_EPILOG)
@click.argument("refs", nargs=-1, metavar="[ID...]")
@click.option("--dead", "all_dead", is_flag=True, help="Every dead notification.")
@click.pass_context
def notifications_retry(ctx: click.Context, refs: tuple[str, ...], all_dead: bool) -> None:
    """Send dead (or delivered) notifications again, by outbox id or event id.

    They become pending and due now, keeping their event ids (receivers de-duplicate on them);
    the next drain delivers them before the later notifications of their organization.
    """
    if not refs and not all_dead:
        raise BadOptionError("give notification ids (ID...) or --dead")
    settings = runtime(ctx).settings()
    with open_database(settings) as engine, session_scope(make_session_factory(engine)) as session:
        try:
            reset = notifications.retry_notifications(session, refs, all_dead=all_dead, now_ms=now_ms())
        except notifications.NotificationNotFoundError as exc:
            raise NotFoundError(str(exc)) from exc
        ids = [row.id for row in reset]
    if not ids:
        click.echo("nothing to retry: the notifications named are pending already")
        return
    click.echo(f"reset {len(ids)} notification(s) to pending: {', '.join(str(i) for i in ids)}")
    if not settings.notify_urls:
        click.echo("note: ORGSYNC_NOTIFY_URLS is not set here; the workers deliver them once it is")
