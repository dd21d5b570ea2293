"""The ``/console`` blueprint: server-rendered pages over the mirror, changes through the command path.

Every read goes through ``models.reads`` (paged in SQL, a fixed number of queries per page),
every change through ``models.submission`` (validated, recorded and committed, then
enqueued), exactly as from the command line and the HTTP API. A change answers with a small
fragment showing the command's progress, which htmx polls until the command settles; without
JavaScript the same forms work with a redirect back to the page.

What a person may see and do is decided here, per request, from the mirror (see
``console.auth``); the templates only hide what the server would refuse anyway.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, abort, flash, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from console import auth
from console.auth import Principal
from models import permissions, reads
from models.clock import now_ms
from models.commands import (
    ADMIN_PERMISSION,
    CommandRequest,
    InvalidCommandError,
    LastAdminError,
    get_command,
    list_commands,
)
from models.db import is_connection_error, make_session_factory, session_scope
from models.errors import OrganizationNotFoundError, PermanentError, RetryableError
from models.inbox import list_events, reset_for_replay
from models.permissions import Access, AccessCache
from models.reconcile import latest_runs
from models.sessions import verify_session_token
from models.settings import Settings
from models.status import DEFAULT_MAX_LAG_S, collect_status
from models.submission import CommandService
from models.tables import Command, CommandKind, CommandStatus, InboxStatus

log = logging.getLogger(__name__)

T = TypeVar("T")
Send = Callable[[list[int]], None]
SendOrgs = Callable[[list[str]], None]

PREFIX = "/console"
PAGE_SIZES = (10, 25, 50, 100, 250)
DEFAULT_PAGE_SIZE = 25
MAX_QUERY = 200
MAX_INVITE_ADDRESSES = 100
MAX_ID = 64
MAX_ROLE = 128
HEALTH_ROWS = 25
# A command fragment polls this often while the workers hold the command.
POLL_S = 1
SLOW_POLL_S = 5
_ADDRESS_SPLIT = re.compile(r"[\s,;]+")

# The fragment keeps polling while a command may still change: applied waits for its webhook.
POLLING = (CommandStatus.PENDING, CommandStatus.SENDING, CommandStatus.APPLIED)
STATUS_TEXT = {
    CommandStatus.PENDING: "pending: waiting for a worker",
    CommandStatus.SENDING: "pending: being sent to Clerk",
    CommandStatus.APPLIED: "applied: Clerk made the change, waiting for its webhook",
    CommandStatus.CONFIRMED: "confirmed: the mirror shows the change",
    CommandStatus.FAILED: "failed",
    CommandStatus.SUPERSEDED: "superseded by a newer change",
    CommandStatus.PLANNED: "planned (dry run): not sent",
}


@dataclass(frozen=True)
class Paging:
    page: int
    page_size: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.page_size

    def pages(self, total: int) -> int:
        return max(1, -(-total // self.page_size))


def _text_arg(name: str, limit: int = MAX_QUERY) -> str | None:
    value = request.args.get(name, "").strip()
    if not value:
        return None
    if len(value) > limit:
        abort(400, f"{name} must be at most {limit} characters")
    if any(ord(char) < 32 for char in value):
        abort(400, f"{name} must not contain control characters")
    return value


def _paging() -> Paging:
    raw_page = request.args.get("page", "1").strip() or "1"
    raw_size = request.args.get("page_size", str(DEFAULT_PAGE_SIZE)).strip() or str(DEFAULT_PAGE_SIZE)
    if not raw_page.isdigit() or int(raw_page) < 1 or len(raw_page) > 9:
        abort(400, "page must be a whole number from 1")
    if not raw_size.isdigit() or int(raw_size) not in PAGE_SIZES:
        abort(400, f"page_size must be one of {', '.join(map(str, PAGE_SIZES))}")
    return Paging(int(raw_page), int(raw_size))


def _form_text(name: str, limit: int, *, required: bool = True) -> str | None:
    value = request.form.get(name, "").strip()
    if not value:
        if required:
            abort(422, f"{name} is required")
        return None
    if len(value) > limit or any(ord(char) < 32 for char in value):
        abort(422, f"{name} must be at most {limit} characters, without control characters")
    return value


def split_addresses(raw: str) -> list[str]:
    """One or many addresses, separated by commas, semicolons, spaces or lines; repeats dropped."""
    seen: dict[str, str] = {}
    for part in _ADDRESS_SPLIT.split(raw):
        if part:
            seen.setdefault(part.lower(), part)
    return list(seen.values())


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _seats_left(org: reads.CountedOrganizationView) -> int | None:
    """Seats still free, counting pending invitations as Clerk does; None without a limit (0 or unset)."""
    limit = org.max_allowed_memberships
    if not limit:
        return None
    return max(0, limit - org.members_count - org.pending_invitations_count)


def _display_name(data: dict[str, Any]) -> str:
    name = " ".join(part for part in (data.get("first_name"), data.get("last_name")) if part)
    return name or str(data.get("username") or "")


def _is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def create_console_blueprint(
    engine: Engine,
    settings: Settings,
    *,
    command_send: Send | None,
    apply_send: Send | None = None,
    reconcile_send: SendOrgs | None = None,
    permission_cache: AccessCache | None = None,
) -> Blueprint:
    """The console over the mirror at ``engine``.

    ``command_send(ids)`` enqueues committed commands, ``apply_send(ids)`` replayed inbox
    events and ``reconcile_send(org_ids)`` one-organization reconciliations; each may be None
    (the workers' sweep then sends commands and events later; reconciling needs a worker).
    """
    factory = make_session_factory(engine)
    checks = permissions.check_sessions(engine)
    cache = permission_cache if permission_cache is not None else AccessCache()
    service = CommandService(factory, command_send, dry_run_default=settings.dry_run)
    operators = auth.TokenMatcher(settings.admin_tokens)
    members_enabled = auth.member_sign_in_enabled(settings)
    bp = Blueprint(
        "console",
        __name__,
        url_prefix=PREFIX,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )

    @bp.record_once
    def _configure(state: Any) -> None:
        app: Flask = state.app
        auth.configure_app(app, settings, PREFIX)
        app.jinja_env.filters["when"] = _when

    def read(fn: Callable[[Session], T]) -> T:
        with factory() as session:
            return fn(session)

    def access_of(user_id: str, organization: str) -> Access | None:
        with checks() as session:
            return cache.access_of(session, user_id, organization)

    # ------------------------------------------------------------ who is asking
    @bp.before_request
    def identify() -> ResponseReturnValue | None:
        if request.endpoint in ("console.static", "console.login"):
            return None
        principal = auth.current_principal()
        token = auth.presented_session_token() if members_enabled else None
        if token is not None and (principal is None or not principal.is_operator):
            # A fresh Clerk session token wins over an older console session of a member.
            user_id = verify_session_token(token, settings)
            if user_id is not None and (principal is None or principal.user_id != user_id):
                auth.sign_in_member(user_id)
                principal = auth.current_principal()
        if principal is None:
            auth.sign_out()
            if request.method != "GET" or _is_htmx():
                abort(401, "sign in to the console first")
            return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
        g.principal = principal
        if request.method == "POST":
            auth.check_csrf()
        return None

    def principal() -> Principal:
        found: Principal = g.principal
        return found

    def require_operator() -> None:
        if not principal().is_operator:
            abort(403, "only operators may open this page or do this")

    def org_access(organization: str) -> Access | None:
        """The member's access to the organization (403 when not a member); None for operators."""
        who = principal()
        if who.is_operator:
            return None
        assert who.user_id is not None
        access = access_of(who.user_id, organization)
        if access is None:
            abort(403, "you are not a member of this organization")
        return access

    def may_manage(access: Access | None) -> bool:
        return principal().is_operator or (access is not None and access.allows(ADMIN_PERMISSION))

    def require_manage(organization: str) -> Access | None:
        access = org_access(organization)
        if not may_manage(access):
            abort(403, f"your role in this organization does not grant {ADMIN_PERMISSION}")
        return access

    def organization_or_404(organization: str) -> reads.CountedOrganizationView:
        found = read(lambda s: reads.get_organization(s, organization))
        if found is None:
            abort(404, f"no organization {organization!r} in the mirror")
        return found

    @bp.context_processor
    def _globals() -> dict[str, Any]:
        return {
            "principal": g.get("principal"),
            "csrf_token": auth.csrf_token,
            "status_text": STATUS_TEXT,
            "polling": POLLING,
            "poll_s": POLL_S,
            "slow_poll_s": SLOW_POLL_S,
            "page_sizes": PAGE_SIZES,
        }

    @bp.after_request
    def _headers(response: Response) -> Response:
        # Pages show personal data and carry CSRF tokens: never cached, never framed.
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        return response

    # --------------------------------------------------------------- errors
    @bp.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Any:
        status = error.code or 500
        message = error.description or error.name
        if status == 401 and not _is_htmx() and request.method == "GET":
            return redirect(url_for("console.login"))
        template = "console/_problem.html" if _is_htmx() else "console/error.html"
        return render_template(template, status=status, title=error.name, message=message), status

    @bp.errorhandler(Exception)
    def unexpected(error: Exception) -> Any:
        if isinstance(error, RetryableError) or is_connection_error(error):
            log.warning("console: database unavailable: %s", type(error).__name__, exc_info=True)
            message = "the database cannot be reached right now; try again in a few seconds"
            template = "console/_problem.html" if _is_htmx() else "console/error.html"
            body = render_template(template, status=503, title="Unavailable", message=message)
            return body, 503, {"Retry-After": "5"}
        log.exception("console: unexpected error in %s %s", request.method, request.path)
        template = "console/_problem.html" if _is_htmx() else "console/error.html"
        return render_template(template, status=500, title="Error", message="internal error"), 500

    # -------------------------------------------------------------- sign-in
    @bp.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error: str | None = None
        status = 200
        if request.method == "POST":
            auth.check_csrf()
            token = request.form.get("token", "").strip()
            session_token = request.form.get("session_token", "").strip()
            if token:
                position = operators.match(token) if settings.admin_tokens else None
                if position is not None:
                    auth.sign_in_operator(position)
                    log.info("console: operator %d signed in", position)
                    return redirect(_next_url(), 303)
                log.info("console: sign-in refused: the token is not one of ORGSYNC_ADMIN_TOKENS")
                error, status = "That token is not one of ORGSYNC_ADMIN_TOKENS.", 401
            elif session_token and members_enabled:
                user_id = verify_session_token(session_token, settings)
                if user_id is not None:
                    auth.sign_in_member(user_id)
                    log.info("console: member %s signed in", user_id)
                    return redirect(_next_url(), 303)
                log.info("console: sign-in refused: the Clerk session token does not verify")
                error, status = (
                    "That Clerk session token does not verify (expired, or another instance's).",
                    401,
                )
            else:
                error, status = "Enter an operator token or a Clerk session token.", 422
        body = render_template(
            "console/login.html",
            error=error,
            operators_enabled=bool(settings.admin_tokens),
            members_enabled=members_enabled,
            next=request.args.get("next", ""),
        )
        return body, status

    def _next_url() -> str:
        target = request.args.get("next", "")
        # Only paths inside the console: never an open redirect.
        if target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
            return target
        return url_for("console.home")

    @bp.post("/logout")
    def logout() -> ResponseReturnValue:
        auth.sign_out()
        response = redirect(url_for("console.login"), 303)
        return response

    @bp.get("/")
    def home() -> ResponseReturnValue:
        who = principal()
        if who.is_operator:
            return redirect(url_for("console.organizations"))
        return redirect(url_for("console.user", user_id=who.user_id))

    # -------------------------------------------------------- organizations
    @bp.get("/organizations")
    def organizations() -> Any:
        paging = _paging()
        query = _text_arg("q")
        who = principal()
        user_ids = () if who.is_operator else (str(who.user_id),)
        listing = read(
            lambda s: reads.list_organizations(
                s,
                limit=paging.page_size,
                offset=paging.offset,
                order_by="+name",
                query=query,
                user_ids=user_ids,
            )
        )
        roles: dict[str, str] = {}
        if not who.is_operator:
            assert who.user_id is not None
            uid = who.user_id
            roles = {a.organization_id: a.role for a in read(lambda s: permissions.organizations_of(s, uid))}
        rows = [
            {"org": org, "seats_left": _seats_left(org), "role": roles.get(org.id)} for org in listing.data
        ]
        return render_template(
            "console/organizations.html",
            rows=rows,
            total=listing.total_count,
            paging=paging,
            pages=paging.pages(listing.total_count),
            q=query or "",
        )

    # ------------------------------------------------------------- members
    @bp.get("/organizations/<organization>/members")
    def members(organization: str) -> Any:
        access = org_access(organization)
        paging = _paging()
        query = _text_arg("q")
        role = _text_arg("role", MAX_ROLE)

        def page(session: Session) -> tuple[Any, Any, list[reads.AssignableRole]]:
            listing = reads.list_memberships(
                session,
                organization=organization,
                limit=paging.page_size,
                offset=paging.offset,
                order_by="-created_at",
                roles=(role,) if role else (),
                query=query,
            )
            if listing is None:
                return None, None, []
            # Each row carries its organization with its counts: no second read of them.
            org = listing.data[0].organization if listing.data else None
            if org is None:
                org = reads.get_organization(session, organization)
            assert org is None or isinstance(org, reads.CountedOrganizationView)
            return listing, org, reads.assignable_roles(session, organization) or []

        listing, org, roles = read(page)
        if listing is None or org is None:
            abort(404, f"no organization {organization!r} in the mirror")
        command_id = request.args.get("command", "")
        command = read(lambda s: get_command(s, int(command_id))) if command_id.isdigit() else None
        if command is not None and command.organization_id != org.id:
            command = None
        rows = [
            {
                "membership": m,
                "name": _display_name(m.public_user_data),
                "identifier": m.public_user_data.get("identifier") or "",
                "self": m.user_id == principal().user_id,
            }
            for m in listing.data
        ]
        return render_template(
            "console/members.html",
            org=org,
            seats_left=_seats_left(org),
            rows=rows,
            roles=roles,
            role_keys={r.key for r in roles},
            org_url=f"{PREFIX}/organizations/{org.id}",
            users_url=f"{PREFIX}/users",
            total=listing.total_count,
            paging=paging,
            pages=paging.pages(listing.total_count),
            q=query or "",
            role=role or "",
            filter_args={
                "organization": org.id,
                **({"q": query} if query else {}),
                **({"role": role} if role else {}),
            },
            can_manage=may_manage(access),
            my_role=None if access is None else access.role,
            command=command,
        )

    def submitted(commands: Sequence[Command], back: str) -> Any:
        if _is_htmx():
            return render_template("console/_commands.html", commands=commands), 202
        flash(f"Command {commands[0].id} recorded: {STATUS_TEXT[commands[0].status]}.")
        return redirect(f"{back}?command={commands[0].id}", 303)

    def submit(request_: CommandRequest, back: str) -> Any:
        try:
            commands = service.submit([request_]).commands
        except LastAdminError:
            return refusal_last_admin(request_, back)
        except OrganizationNotFoundError:
            abort(404, f"no organization {request_.organization_id!r} in the mirror")
        except InvalidCommandError as error:
            return problem(422, "Not recorded", str(error).split(": ", 1)[-1], back)
        return submitted(commands, back)

    def problem(status: int, title: str, message: str, back: str) -> Any:
        if _is_htmx():
            return render_template(
                "console/_problem.html", status=status, title=title, message=message
            ), status
        flash(f"{title}: {message}", "error")
        return redirect(back, 303)

    def refusal_last_admin(request_: CommandRequest, back: str) -> Any:
        change = (
            "removed" if request_.kind == CommandKind.REMOVE_MEMBER else f"given the role {request_.role}"
        )
        user_id = str(request_.user_id)
        profile = read(lambda s: reads.get_user(s, user_id))
        who = f"{profile.identifier} ({user_id})" if profile is not None and profile.identifier else user_id
        message = (
            f"{who} is the last member of this organization whose role grants "
            f"{ADMIN_PERMISSION}: if they were {change}, nobody could manage its members any more. "
            "Give another member an admin role first, then change this one."
        )
        return problem(409, "Not changed: the organization would have no admin", message, back)

    @bp.post("/organizations/<organization>/members/<user_id>/role")
    def set_role(organization: str, user_id: str) -> Any:
        require_manage(organization)
        org = organization_or_404(organization)
        role = _form_text("role", MAX_ROLE)
        assignable = {r.key for r in read(lambda s: reads.assignable_roles(s, org.id) or [])}
        if role not in assignable:
            abort(422, f"role {role!r} is not one this organization may assign")
        back = url_for("console.members", organization=organization)
        return submit(
            CommandRequest(
                kind=CommandKind.SET_ROLE,
                organization_id=org.id,
                user_id=_clean_id(user_id),
                role=role,
                requested_by=principal().requested_by,
            ),
            back,
        )

    @bp.post("/organizations/<organization>/members/<user_id>/remove")
    def remove_member(organization: str, user_id: str) -> Any:
        require_manage(organization)
        org = organization_or_404(organization)
        back = url_for("console.members", organization=organization)
        return submit(
            CommandRequest(
                kind=CommandKind.REMOVE_MEMBER,
                organization_id=org.id,
                user_id=_clean_id(user_id),
                requested_by=principal().requested_by,
            ),
            back,
        )

    # --------------------------------------------------------- invitations
    @bp.get("/organizations/<organization>/invitations")
    def invitations(organization: str) -> Any:
        access = org_access(organization)
        org = organization_or_404(organization)
        paging = _paging()
        closed = request.args.get("closed") == "1"
        statuses = ("pending", "expired", "revoked") if closed else ("pending",)
        listing = read(
            lambda s: reads.list_invitations(
                s, organization=org.id, limit=paging.page_size, offset=paging.offset, status=statuses
            )
        )
        if listing is None:
            abort(404, f"no organization {organization!r} in the mirror")
        roles = read(lambda s: reads.assignable_roles(s, org.id) or [])
        return render_template(
            "console/invitations.html",
            org=org,
            seats_left=_seats_left(org),
            invitations=listing.data,
            total=listing.total_count,
            paging=paging,
            pages=paging.pages(listing.total_count),
            closed=closed,
            roles=roles,
            can_manage=may_manage(access),
        )

    @bp.post("/organizations/<organization>/invitations")
    def invite(organization: str) -> Any:
        require_manage(organization)
        org = organization_or_404(organization)
        back = url_for("console.invitations", organization=organization)
        addresses = split_addresses(request.form.get("emails", ""))
        if not addresses:
            return problem(422, "Not recorded", "enter at least one email address", back)
        if len(addresses) > MAX_INVITE_ADDRESSES:
            return problem(422, "Not recorded", f"at most {MAX_INVITE_ADDRESSES} addresses at once", back)
        role = _form_text("role", MAX_ROLE) or "org:member"
        assignable = {r.key for r in read(lambda s: reads.assignable_roles(s, org.id) or [])}
        if role not in assignable:
            abort(422, f"role {role!r} is not one this organization may assign")
        who = principal()
        # Clerk records the member who invited; an operator invites as the instance.
        options = {"inviter_user_id": who.user_id} if who.user_id else {}
        if len(addresses) == 1:
            request_ = CommandRequest(
                kind=CommandKind.INVITE,
                organization_id=org.id,
                email_address=addresses[0],
                role=role,
                payload=options or None,
                requested_by=who.requested_by,
            )
        else:
            request_ = CommandRequest(
                kind=CommandKind.BULK_INVITE,
                organization_id=org.id,
                role=role,
                payload={**options, "email_addresses": addresses},
                requested_by=who.requested_by,
            )
        return submit(request_, back)

    @bp.post("/organizations/<organization>/invitations/<invitation_id>/revoke")
    def revoke(organization: str, invitation_id: str) -> Any:
        require_manage(organization)
        org = organization_or_404(organization)
        who = principal()
        back = url_for("console.invitations", organization=organization)
        return submit(
            CommandRequest(
                kind=CommandKind.REVOKE_INVITATION,
                organization_id=org.id,
                invitation_id=_clean_id(invitation_id),
                payload={"requesting_user_id": who.user_id} if who.user_id else None,
                requested_by=who.requested_by,
            ),
            back,
        )

    # ------------------------------------------------------------ commands
    @bp.get("/commands/<int:command_id>")
    def command(command_id: int) -> Any:
        found = read(lambda s: get_command(s, command_id)) if command_id < 2**63 else None
        if found is None:
            abort(404, f"no command {command_id}")
        if not principal().is_operator:
            require_manage(found.organization_id)
        return render_template("console/_command.html", command=found)

    # ---------------------------------------------------------------- users
    @bp.get("/users/<user_id>")
    def user(user_id: str) -> Any:
        user_id = _clean_id(user_id)
        who = principal()
        if not who.is_operator and who.user_id != user_id:
            abort(403, "members may see only their own organizations and invitations")

        def load(session: Session) -> tuple[Any, Any, Any]:
            return (
                reads.get_user(session, user_id),
                reads.list_memberships(session, user=user_id, limit=100, order_by="+created_at"),
                reads.list_invitations(session, user=user_id, status="pending", limit=100),
            )

        profile, memberships, pending = read(load)
        return render_template(
            "console/user.html",
            user_id=user_id,
            profile=profile,
            memberships=memberships.data if memberships is not None else [],
            invitations=pending.data if pending is not None else [],
        )

    # --------------------------------------------------------------- health
    @bp.get("/health")
    def health() -> Any:
        require_operator()

        def load(session: Session) -> dict[str, Any]:
            status = collect_status(session, settings, now=now_ms(), max_lag_s=DEFAULT_MAX_LAG_S)
            commands = list_commands(session, limit=HEALTH_ROWS)
            return {
                "status": status,
                "dead": list_events(session, status=InboxStatus.DEAD, limit=HEALTH_ROWS),
                "commands": commands,
                "calls": reads.api_calls_of(session, [c.id for c in commands]),
                "runs": latest_runs(session, limit=10),
                "notifications": reads.notification_backlog(session),
            }

        return render_template("console/health.html", **read(load), can_reconcile=reconcile_send is not None)

    @bp.post("/health/events/<int:event_id>/replay")
    def replay(event_id: int) -> ResponseReturnValue:
        require_operator()
        try:
            with session_scope(factory) as session:
                ids = reset_for_replay(session, [str(event_id)])
        except PermanentError as error:
            flash(f"Not replayed: {error}", "error")
            return redirect(url_for("console.health"), 303)
        if apply_send is not None:
            apply_send(ids)
            flash(f"Event {event_id} is pending again and queued for a worker.")
        else:
            flash(f"Event {event_id} is pending again; the workers' sweep applies it shortly.")
        log.info("console: %s replayed inbox event %d", principal().requested_by, event_id)
        return redirect(url_for("console.health"), 303)

    @bp.post("/reconcile")
    def reconcile() -> ResponseReturnValue:
        require_operator()
        organization = _form_text("organization", 256)
        assert organization is not None
        back = request.form.get("back", "")
        target = (
            back if back.startswith(PREFIX + "/") and not back.startswith("//") else url_for("console.health")
        )
        org = read(lambda s: reads.get_organization(s, organization))
        if org is None and not re.fullmatch(r"org_[A-Za-z0-9]+", organization):
            abort(404, f"no organization {organization!r} in the mirror (give its id to fetch it from Clerk)")
        org_id = org.id if org is not None else organization
        if reconcile_send is None:
            abort(503, f"no worker connection in this process: run `orgsync sync --org {org_id}` instead")
        reconcile_send([org_id])
        log.info("console: %s queued a reconciliation of %s", principal().requested_by, org_id)
        flash(f"Reconciliation of {org_id} queued; its run shows under Sync health when it finishes.")
        return redirect(target, 303)

    return bp


def _clean_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > MAX_ID or not re.fullmatch(r"[A-Za-z0-9_\-]+", value):
        abort(422, "the id in the address is not a Clerk id")
    return value


__all__ = ["PREFIX", "create_console_blueprint", "split_addresses"]
