"""Changes made in Clerk from the command line: members, invitations and the commands outbox.

Every change is a row in ``commands`` first: the CLI records it, commits, and only then hands
its id to the workers, which send it through the Backend API. A broker that is down loses
nothing: the row stays pending and the sweeper (or ``orgsync commands retry``) sends it later.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import click
from sqlalchemy.orm import Session, sessionmaker

from models import queries
from models.commands import (
    MAX_BULK,
    MAX_LIST,
    CommandRequest,
    CommandStateError,
    LastAdminError,
    get_command,
    list_api_calls,
    list_commands,
    retry_command,
    submit_command,
)
from models.commands import CommandError as InvalidCommandError
from models.db import make_session_factory, session_scope
from models.queries import OrganizationView
from models.settings import Settings
from models.tables import ApiCall, Command, CommandKind, CommandStatus
from orgsync.cli import (
    EPILOG,
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    BadOptionError,
    CommandError,
    NotFoundError,
    Runtime,
    Sender,
    celery_app,
    cli,
    fail,
    first_line,
    invitations,
    json_option,
    members,
    open_database,
    org_option,
    reading,
    resolve_org,
    runtime,
    warn,
)
from orgsync.render import Column, format_cell, render_table, to_json

log = logging.getLogger("orgsync")

DEFAULT_ROLE = "org:member"
DEFAULT_WAIT_S = 60.0
POLL_INTERVAL_S = 0.25
# Where --wait stops: the command left the workers' hands (confirmation can take a webhook's time).
SETTLED = (CommandStatus.APPLIED, CommandStatus.CONFIRMED, CommandStatus.FAILED, CommandStatus.SUPERSEDED)


@dataclass
class CommandRuntime(Runtime):
    """``Runtime`` with a seam for the command sender: tests record what is enqueued."""

    make_command_sender: Callable[[Settings], Sender] | None = None


def command_sender(rt: Runtime, settings: Settings) -> Sender:
    if isinstance(rt, CommandRuntime) and rt.make_command_sender is not None:
        return rt.make_command_sender(settings)
    from worker.app import make_command_sender  # noqa: PLC0415  (Celery only when needed)

    send: Sender = make_command_sender(celery_app(settings))
    return send


def now_ms() -> int:
    return time.time_ns() // 1_000_000


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


def submit(
    ctx: click.Context,
    options: Submission,
    build: Callable[[OrganizationView, str], list[CommandRequest]],
) -> None:
    """Record the commands, commit, enqueue them, print them, and optionally wait for them."""
    rt = runtime(ctx)
    settings = rt.settings()
    requested_by = f"cli:{os_user(rt.environ)}"
    with open_database(settings) as engine:
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            org = resolve_org(session, options.org_ref)
            requests = build(org, requested_by)
            try:
                commands = [
                    submit_command(session, item, now_ms=now_ms(), dry_run_default=settings.dry_run)
                    for item in requests
                ]
            except LastAdminError as exc:
                # Its message starts with "refused:" and says why.
                raise CommandError(str(exc)) from exc
            except InvalidCommandError as exc:
                # The request itself is wrong: the message names the field (an email address...).
                raise BadOptionError(str(exc)) from exc
            rows = [command_dict(command) for command in commands]
        planned = [row["id"] for row in rows if row["status"] == CommandStatus.PLANNED]
        if planned:
            click.echo(f"orgsync: dry run: {describe(planned)} recorded as planned, nothing sent", err=True)
        dispatch(rt, settings, factory, rows, wait=options.wait, as_json=options.as_json)


def dispatch(
    rt: Runtime,
    settings: Settings,
    factory: sessionmaker[Session],
    rows: list[dict[str, Any]],
    *,
    wait: float | None,
    as_json: bool,
) -> None:
    """After the commit: enqueue the open commands, then print them, or wait and print the outcome."""
    # Only after the commit: a worker must find the rows when the message arrives. A command
    # already being sent (an idempotent re-run) is enqueued too: a duplicate message is harmless.
    open_ids = [row["id"] for row in rows if row["status"] in CommandStatus.OPEN]
    enqueued = enqueue(rt, settings, open_ids)
    if wait is None or not open_ids:
        emit_commands(rows, as_json)
        code, message = outcome(rows) if wait is not None else (0, "")
    elif not enqueued:
        emit_commands(rows, as_json)
        code, message = EXIT_UNAVAILABLE, "not waiting: the commands could not be enqueued"
    else:
        settled = {row["id"]: row for row in rows if row["id"] not in open_ids}
        waited, code, message = wait_for(factory, open_ids, wait)
        final = {**settled, **{row["id"]: row for row in waited}}
        emit_commands([final[row["id"]] for row in rows], as_json)
    if code:
        fail(message, code)


def describe(ids: Sequence[int]) -> str:
    listed = ", ".join(str(value) for value in ids)
    return f"command {listed}" if len(ids) == 1 else f"{len(ids)} commands ({listed})"


def enqueue(rt: Runtime, settings: Settings, ids: list[int]) -> bool:
    """Hand committed pending commands to the workers; False (with a warning) if the broker is down."""
    if not ids:
        return True
    try:
        command_sender(rt, settings)(ids)
    except Exception as exc:
        log.debug("enqueue failed", exc_info=True)
        warn(
            f"could not enqueue {describe(ids)} ({type(exc).__name__}: {first_line(exc)}); "
            "they stay pending: the sweeper sends them once the broker is reachable, "
            "or run `orgsync commands retry ID`"
        )
        return False
    click.echo(f"orgsync: enqueued {describe(ids)}", err=True)
    return True


def load_commands(session: Session, ids: Iterable[int]) -> list[Command]:
    found = [get_command(session, command_id) for command_id in ids]
    return [command for command in found if command is not None]


def wait_for(
    factory: sessionmaker[Session], ids: list[int], timeout: float
) -> tuple[list[dict[str, Any]], int, str]:
    """Poll until every command settles or ``timeout`` passes: (rows, exit code, message)."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last = ""
    while True:
        with session_scope(factory) as session:
            rows = [command_dict(command) for command in load_commands(session, ids)]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        if summary != last:
            elapsed = time.monotonic() - started
            click.echo(f"orgsync: waiting ({elapsed:.0f} s of {timeout:g} s): {summary}", err=True)
            last = summary
        if all(row["status"] in SETTLED for row in rows):
            return rows, *outcome(rows)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            open_ids = [row["id"] for row in rows if row["status"] not in SETTLED]
            return (
                rows,
                EXIT_UNAVAILABLE,
                f"timed out after {timeout:g} s: {describe(open_ids)} not applied yet; the workers "
                f"carry on (`orgsync commands show {open_ids[0]}`)",
            )
        time.sleep(min(POLL_INTERVAL_S, remaining))


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


def request(
    kind: str, org: OrganizationView, requested_by: str, options: Submission, **fields: Any
) -> CommandRequest:
    return CommandRequest(
        kind=kind,
        organization_id=org.id,
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
    def build(org: OrganizationView, requested_by: str) -> list[CommandRequest]:
        return [request(kind, org, requested_by, options, user_id=user_id, role=role)]

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

    def build(org: OrganizationView, requested_by: str) -> list[CommandRequest]:
        if len(addresses) == 1:
            return [
                request(CommandKind.INVITE, org, requested_by, options, email_address=addresses[0], role=role)
            ]
        batches = [addresses[start : start + MAX_BULK] for start in range(0, len(addresses), MAX_BULK)]
        return [
            request(
                CommandKind.BULK_INVITE,
                org,
                requested_by,
                keyed(options, str(index), len(batches)),
                role=role,
                payload={"email_addresses": batch},
            )
            for index, batch in enumerate(batches, start=1)
        ]

    submit(ctx, options, build)


def keyed(options: Submission, part: str, count: int) -> Submission:
    """One idempotency key per command of a bulk request, derived from the one given."""
    if options.idempotency_key is None or count == 1:
        return options
    return Submission(
        options.org_ref, options.dry_run, f"{options.idempotency_key}:{part}", options.wait, options.as_json
    )


@invitations.command("revoke", epilog=EPILOG)
@org_option
@click.argument("invitation_ids", nargs=-1, required=True, metavar="INVITATION_ID...")
@submit_options
@click.pass_context
def invitations_revoke(
    ctx: click.Context,
    *,
    org_ref: str,
    invitation_ids: tuple[str, ...],
    dry_run: bool,
    idempotency_key: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Revoke pending invitations (orginv_...), one command each."""
    unique = list(dict.fromkeys(invitation_ids))
    options = Submission(org_ref, dry_run, idempotency_key, wait, as_json)

    def build(org: OrganizationView, requested_by: str) -> list[CommandRequest]:
        return [
            request(
                CommandKind.REVOKE_INVITATION,
                org,
                requested_by,
                keyed(options, invitation_id, len(unique)),
                invitation_id=invitation_id,
            )
            for invitation_id in unique
        ]

    submit(ctx, options, build)


# -- the outbox ----------------------------------------------------------------------------


@cli.group(epilog=EPILOG)
def commands() -> None:
    """Changes sent to Clerk: their status and audit trail."""


def organization_filter(session: Session, ref: str | None) -> str | None:
    if ref is None:
        return None
    org = queries.resolve_organization(session, ref)
    if org is not None:
        return org.id
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


def retry_refusal(command: Command) -> str | None:
    """Why sending this command again makes no sense, or None (the core decides the rest)."""
    if command.status == CommandStatus.CONFIRMED:
        return "the mirror shows the change made already; nothing to retry"
    if command.status == CommandStatus.SUPERSEDED:
        return f"command {command.superseded_by} replaced it; retry that one if it failed"
    if command.status == CommandStatus.PLANNED:
        return "a dry run is never sent; submit the change again without --dry-run"
    if command.status == CommandStatus.APPLIED:
        return "Clerk made the change already; the mirror has not shown it yet"
    return None


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
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            current = get_command(session, command_id)
            if current is None:
                raise NotFoundError(f"no command {command_id}")
            refusal = retry_refusal(current)
            if refusal is not None:
                raise CommandError(f"command {command_id} is {current.status}: {refusal}")
            try:
                row = retry_command(session, command_id, now_ms=now_ms())
            except CommandStateError as exc:
                raise CommandError(str(exc)) from exc
            rows = [command_dict(row)]
        dispatch(rt, settings, factory, rows, wait=wait, as_json=as_json)
