"""Changes made in Clerk from the command line: members, invitations and the commands outbox.

Every change goes through the one submission service (``models.submission``), as from the
Python API and the rules: a row in ``commands`` first, committed, and only then its id handed
to the workers, which send it through the Backend API. A broker that is down loses nothing:
the row stays pending and the sweeper (or ``orgsync commands retry``) sends it later.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import click
from sqlalchemy.orm import Session

from models import reads
from models.commands import (
    MAX_LIST,
    CommandRequest,
    CommandStateError,
    InvalidCommandError,
    LastAdminError,
    get_command,
    list_api_calls,
    list_commands,
)
from models.db import make_session_factory
from models.submission import SETTLED, CommandService, Submitted, all_settled, part_key
from models.tables import ApiCall, Command, CommandKind, CommandStatus
from orgsync.cli.base import (
    EPILOG,
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    BadOptionError,
    NotFoundError,
    RefusedError,
    describe,
    fail,
    invitations,
    json_option,
    members,
    open_database,
    org_option,
    reading,
    report_enqueue,
    runtime,
)
from orgsync.render import Column, format_cell, render_table, to_json

DEFAULT_ROLE = "org:member"
DEFAULT_WAIT_S = 60.0


def os_user(environ: Mapping[str, str]) -> str:
    """The login name of whoever runs the CLI, for ``requested_by``: never fails."""
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        value = environ.get(name, "").strip()
        if value:
            return value
    try:
        import pwd  # noqa: PLC0415  (POSIX only)

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, OSError):
        return "unknown"


# -- presentation --------------------------------------------------------------------------


def target_of(row: Command) -> str | None:
    if row.kind == CommandKind.BULK_INVITE:
        emails = (row.payload or {}).get("email_addresses") or []
        return ",".join(str(email) for email in emails) or None
    return row.user_id or row.email_address or row.invitation_id


def command_dict(row: Command) -> dict[str, Any]:
    return {
        "object": "command",
        "id": row.id,
        "kind": row.kind,
        "status": row.status,
        "organization_id": row.organization_id,
        "target": target_of(row),
        "user_id": row.user_id,
        "email_address": row.email_address,
        "invitation_id": row.invitation_id,
        "role": row.role,
        "payload": row.payload,
        "requested_by": row.requested_by,
        "rule_name": row.rule_name,
        "idempotency_key": row.idempotency_key,
        "dry_run": row.dry_run,
        "attempts": row.attempts,
        "error_code": row.error_code,
        "error_message": row.error_message,
        "result": row.result,
        "superseded_by": row.superseded_by,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "sent_at": row.sent_at,
        "applied_at": row.applied_at,
        "confirmed_at": row.confirmed_at,
        "next_attempt_at": row.next_attempt_at,
        "flagged_at": row.flagged_at,
    }


def api_call_dict(row: ApiCall) -> dict[str, Any]:
    return {
        "id": row.id,
        "command_id": row.command_id,
        "purpose": row.purpose,
        "method": row.method,
        "path": row.path,
        "status_code": row.status_code,
        "error_code": row.error_code,
        "error_message": row.error_message,
        "clerk_trace_id": row.clerk_trace_id,
        "retry_after": row.retry_after,
        "duration_ms": row.duration_ms,
        "started_at": row.started_at,
    }


COMMAND_COLUMNS: Sequence[Column] = (
    ("id", "id"),
    ("kind", "kind"),
    ("organization", "organization_id"),
    ("target", "target"),
    ("role", "role"),
    ("status", "status"),
    ("requested by", "requested_by"),
    ("created", "created_at"),
    ("error", "error_code"),
)

API_CALL_COLUMNS: Sequence[Column] = (
    ("started", "started_at"),
    ("purpose", "purpose"),
    ("method", "method"),
    ("path", "path"),
    ("status", "status_code"),
    ("error", "error_code"),
    ("clerk trace id", "clerk_trace_id"),
    ("ms", "duration_ms"),
    ("retry after", "retry_after"),
)

DETAIL_FIELDS = (
    "id",
    "kind",
    "status",
    "organization_id",
    "user_id",
    "email_address",
    "invitation_id",
    "role",
    "payload",
    "requested_by",
    "rule_name",
    "idempotency_key",
    "dry_run",
    "attempts",
    "error_code",
    "error_message",
    "result",
    "superseded_by",
    "created_at",
    "updated_at",
    "sent_at",
    "applied_at",
    "confirmed_at",
    "next_attempt_at",
    "flagged_at",
)


def emit_commands(rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    click.echo(to_json(rows) if as_json else render_table(COMMAND_COLUMNS, rows))


def render_detail(command: Mapping[str, Any], calls: Sequence[Mapping[str, Any]]) -> str:
    """A command as ``field  value`` lines, then its API calls as a table."""
    fields = [(name.replace("_", " "), name) for name in DETAIL_FIELDS]
    width = max(len(label) for label, _ in fields)
    lines = [f"{label.ljust(width)}  {format_cell(name, command.get(name))}" for label, name in fields]
    lines += ["", f"API calls ({len(calls)}):", render_table(API_CALL_COLUMNS, calls)]
    return "\n".join(lines)


# -- submitting ----------------------------------------------------------------------------


def wait_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--wait",
        "wait",
        type=click.FloatRange(0, 3600),
        is_flag=False,
        flag_value=DEFAULT_WAIT_S,
        default=None,
        metavar="[SECONDS]",
        help=(
            f"Wait until the command is applied or failed (default {DEFAULT_WAIT_S:g} s); "
            "exit 0 applied, 1 failed, 5 still pending at the end."
        ),
    )(function)


def submit_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = json_option(function)
    function = wait_option(function)
    function = click.option(
        "--idempotency-key",
        default=None,
        metavar="KEY",
        help="Safe re-runs: an existing command with this key is returned, not repeated.",
    )(function)
    return click.option(
        "--dry-run", is_flag=True, help="Record the command as planned; send nothing to Clerk."
    )(function)


@dataclass(frozen=True)
class Submission:
    """Options every change command shares."""

    org_ref: str
    dry_run: bool
    idempotency_key: str | None
    wait: float | None
    as_json: bool


def submit(ctx: click.Context, options: Submission, requests: Callable[[str], list[CommandRequest]]) -> None:
    """Hand the requests to the submission service, print the commands, optionally wait for them."""
    rt = runtime(ctx)
    settings = rt.settings()
    with open_database(settings) as engine:
        service = rt.command_service(settings, make_session_factory(engine))
        try:
            submitted = service.submit(requests(f"cli:{os_user(rt.environ)}"))
        except LastAdminError as exc:
            # Its message starts with "refused:" and says why.
            raise RefusedError(str(exc)) from exc
        except InvalidCommandError as exc:
            # The request itself is wrong: the message names the field (an email address...).
            raise BadOptionError(str(exc)) from exc
        planned = [c.id for c in submitted.commands if c.status == CommandStatus.PLANNED]
        if planned:
            click.echo(f"orgsync: dry run: {describe(planned)} recorded as planned, nothing sent", err=True)
        report(service, submitted, wait=options.wait, as_json=options.as_json)


def report(service: CommandService, submitted: Submitted, *, wait: float | None, as_json: bool) -> None:
    """After the commit and the enqueue: print the commands, or wait and print the outcome."""
    rows = [command_dict(command) for command in submitted.commands]
    open_ids = submitted.open_ids
    report_enqueue(open_ids, submitted.enqueue_error)
    if wait is None or not open_ids:
        emit_commands(rows, as_json)
        code, message = outcome(rows) if wait is not None else (0, "")
    elif not submitted.enqueued:
        emit_commands(rows, as_json)
        code, message = EXIT_UNAVAILABLE, "not waiting: the commands could not be enqueued"
    else:
        waited = service.wait(open_ids, wait, on_poll=WaitProgress(wait))
        final = {row["id"]: row for row in rows} | {c.id: command_dict(c) for c in waited}
        rows = [final[row["id"]] for row in rows]
        emit_commands(rows, as_json)
        if all_settled(waited):
            code, message = outcome(rows)
        else:
            still = [c.id for c in waited if c.status not in SETTLED]
            code, message = (
                EXIT_UNAVAILABLE,
                f"timed out after {wait:g} s: {describe(still)} not applied yet; the workers "
                f"carry on (`orgsync commands show {still[0]}`)",
            )
    if code:
        fail(message, code)


class WaitProgress:
    """Prints a line on stderr whenever the commands' statuses change while waiting."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.started = time.monotonic()
        self.last = ""

    def __call__(self, commands: list[Command]) -> None:
        counts: dict[str, int] = {}
        for command in commands:
            counts[command.status] = counts.get(command.status, 0) + 1
        summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        if summary != self.last:
            elapsed = time.monotonic() - self.started
            click.echo(f"orgsync: waiting ({elapsed:.0f} s of {self.timeout:g} s): {summary}", err=True)
            self.last = summary


def outcome(rows: Sequence[Mapping[str, Any]]) -> tuple[int, str]:
    problems = []
    for row in rows:
        if row["status"] == CommandStatus.FAILED:
            code = row["error_code"] or "error"
            problems.append(f"command {row['id']} failed: {code}: {row['error_message'] or 'no message'}")
        elif row["status"] == CommandStatus.SUPERSEDED:
            problems.append(f"command {row['id']} was superseded by command {row['superseded_by']}")
    if problems:
        return EXIT_FAILED, "; ".join(problems)
    return 0, ""


def request(kind: str, requested_by: str, options: Submission, **fields: Any) -> CommandRequest:
    return CommandRequest(
        kind=kind,
        organization_id=options.org_ref,
        requested_by=requested_by,
        dry_run=options.dry_run,
        idempotency_key=options.idempotency_key,
        **fields,
    )


# -- members -------------------------------------------------------------------------------


user_option = click.option(
    "--user", "user_id", required=True, metavar="USER_ID", help="Clerk user id (user_...)."
)


def member_change(ctx: click.Context, kind: str, options: Submission, user_id: str, role: str | None) -> None:
    def build(requested_by: str) -> list[CommandRequest]:
        return [request(kind, requested_by, options, user_id=user_id, role=role)]

    submit(ctx, options, build)


@members.command("set-role", epilog=EPILOG)
@org_option
@user_option
@click.option("--role", required=True, metavar="KEY", help="The role to hold, e.g. org:admin.")
@submit_options
@click.pass_context
def members_set_role(
    ctx: click.Context,
    *,
    org_ref: str,
    user_id: str,
    role: str,
    dry_run: bool,
    idempotency_key: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Change a member's role in Clerk.

    Refused locally when it would demote the last member with admin-level permissions.
    """
    options = Submission(org_ref, dry_run, idempotency_key, wait, as_json)
    member_change(ctx, CommandKind.SET_ROLE, options, user_id, role)


@members.command("add", epilog=EPILOG)
@org_option
@user_option
@click.option("--role", default=DEFAULT_ROLE, show_default=True, metavar="KEY", help="The new member's role.")
@submit_options
@click.pass_context
def members_add(
    ctx: click.Context,
    *,
    org_ref: str,
    user_id: str,
    role: str,
    dry_run: bool,
    idempotency_key: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Add an existing Clerk user to an organization."""
    options = Submission(org_ref, dry_run, idempotency_key, wait, as_json)
    member_change(ctx, CommandKind.ADD_MEMBER, options, user_id, role)


@members.command("remove", epilog=EPILOG)
@org_option
@user_option
@submit_options
@click.pass_context
def members_remove(
    ctx: click.Context,
    *,
    org_ref: str,
    user_id: str,
    dry_run: bool,
    idempotency_key: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Remove a member from an organization in Clerk.

    Refused locally when it would remove the last member with admin-level permissions.
    """
    options = Submission(org_ref, dry_run, idempotency_key, wait, as_json)
    member_change(ctx, CommandKind.REMOVE_MEMBER, options, user_id, None)


# -- invitations ---------------------------------------------------------------------------


def read_emails(emails: Sequence[str], files: Sequence[TextIO]) -> list[str]:
    """Addresses from --email and --file (one per line; blank lines and # comments skipped), deduplicated."""
    found = [email.strip() for email in emails]
    for handle in files:
        for line in handle:
            text = line.split("#", 1)[0].strip()
            if text:
                found.append(text)
    unique: dict[str, str] = {}
    for email in found:
        if not email:
            raise BadOptionError("an empty email address was given")
        # Clerk matches addresses case-insensitively: one invitation per address.
        unique.setdefault(email.lower(), email)
    if not unique:
        raise BadOptionError("give at least one --email or --file")
    return list(unique.values())


@invitations.command("create", epilog=EPILOG)
@org_option
@click.option("--email", "emails", multiple=True, metavar="ADDRESS", help="Address to invite (repeatable).")
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.File("r", encoding="utf-8"),
    metavar="PATH",
    help="File of addresses, one per line ('-' reads standard input; # starts a comment).",
)
@click.option("--role", default=DEFAULT_ROLE, show_default=True, metavar="KEY", help="Role on acceptance.")
@submit_options
@click.pass_context
def invitations_create(
    ctx: click.Context,
    *,
    org_ref: str,
    emails: tuple[str, ...],
    files: tuple[TextIO, ...],
    role: str,
    dry_run: bool,
    idempotency_key: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Invite people to an organization by email: one, or many at once.

    One address is an `invite` command; more go through Clerk's bulk endpoint as `bulk_invite`
    commands of up to 10 addresses each (Clerk creates all of a batch or none of it).
    """
    addresses = read_emails(emails, files)
    options = Submission(org_ref, dry_run, idempotency_key, wait, as_json)

    def build(requested_by: str) -> list[CommandRequest]:
        if len(addresses) == 1:
            return [request(CommandKind.INVITE, requested_by, options, email_address=addresses[0], role=role)]
        # The submission service splits the list into commands of up to 10 addresses.
        payload = {"email_addresses": addresses}
        return [request(CommandKind.BULK_INVITE, requested_by, options, role=role, payload=payload)]

    submit(ctx, options, build)


@invitations.command("revoke", epilog=EPILOG)
@org_option
@click.argument("invitation_ids", nargs=-1, required=True, metavar="INVITATION_ID...")
@click.option(
    "--requesting-user",
    "requesting_user_id",
    default=None,
    metavar="USER_ID",
    help="The member Clerk records as revoking them (user_...).",
)
@submit_options
@click.pass_context
def invitations_revoke(
    ctx: click.Context,
    *,
    org_ref: str,
    invitation_ids: tuple[str, ...],
    requesting_user_id: str | None,
    dry_run: bool,
    idempotency_key: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Revoke pending invitations (orginv_...), one command each."""
    unique = list(dict.fromkeys(invitation_ids))
    options = Submission(org_ref, dry_run, idempotency_key, wait, as_json)
    payload = {"requesting_user_id": requesting_user_id} if requesting_user_id is not None else None

    def build(requested_by: str) -> list[CommandRequest]:
        return [
            CommandRequest(
                kind=CommandKind.REVOKE_INVITATION,
                organization_id=org_ref,
                requested_by=requested_by,
                dry_run=dry_run,
                idempotency_key=part_key(idempotency_key, invitation_id, len(unique)),
                invitation_id=invitation_id,
                payload=payload,
            )
            for invitation_id in unique
        ]

    submit(ctx, options, build)


# -- the outbox ----------------------------------------------------------------------------


@click.group(epilog=EPILOG)
def commands() -> None:
    """Changes sent to Clerk: their status and audit trail."""


def organization_filter(session: Session, ref: str | None) -> str | None:
    if ref is None:
        return None
    found = reads.organization_id(session, ref)
    if found is not None:
        return found
    if ref.startswith("org_"):
        # Commands outlive their organization: a deleted one's history stays listable by id.
        return ref
    raise NotFoundError(f"no organization with id or slug {ref!r}")


@commands.command("list", epilog=EPILOG)
@click.option("--status", type=click.Choice(CommandStatus.ALL), default=None, help="Only this status.")
@click.option("--org", "org_ref", default=None, metavar="ID_OR_SLUG", help="Only this organization.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, MAX_LIST))
@json_option
@click.pass_context
def commands_list(
    ctx: click.Context, *, status: str | None, org_ref: str | None, limit: int, as_json: bool
) -> None:
    """List commands, newest first."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        org_id = organization_filter(session, org_ref)
        rows = [
            command_dict(row)
            for row in list_commands(session, status=status, organization_id=org_id, limit=limit)
        ]
    emit_commands(rows, as_json)


@commands.command("show", epilog=EPILOG)
@click.argument("command_id", type=click.IntRange(1), metavar="ID")
@json_option
@click.pass_context
def commands_show(ctx: click.Context, *, command_id: int, as_json: bool) -> None:
    """Show a command and its audit trail.

    Every Backend API call made for it: status, Clerk error code, Clerk trace id, duration.
    """
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        row = get_command(session, command_id)
        if row is None:
            raise NotFoundError(f"no command {command_id}")
        command = command_dict(row)
        calls = [api_call_dict(call) for call in list_api_calls(session, command_id=command_id)]
    if as_json:
        click.echo(json.dumps({**command, "api_calls": calls}, indent=2, ensure_ascii=False, default=str))
    else:
        click.echo(render_detail(command, calls))


@commands.command("retry", epilog=EPILOG)
@click.argument("command_id", type=click.IntRange(1), metavar="ID")
@wait_option
@json_option
@click.pass_context
def commands_retry(ctx: click.Context, *, command_id: int, wait: float | None, as_json: bool) -> None:
    """Send a failed or stuck command again.

    A failed command goes back to pending and is enqueued; a pending one is enqueued again
    (sending is idempotent). Confirmed and superseded commands are final and refused.
    """
    rt = runtime(ctx)
    settings = rt.settings()
    with open_database(settings) as engine:
        service = rt.command_service(settings, make_session_factory(engine))
        try:
            submitted = service.retry(command_id)
        except CommandStateError as exc:
            raise RefusedError(str(exc)) from exc
        report(service, submitted, wait=wait, as_json=as_json)
