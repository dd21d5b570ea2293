"""The ``/orgsync/v1`` blueprint: permission checks from the mirror and commands for Clerk over HTTP.

Reads answer from ``models.permissions``; every change goes through the one submission
service (``models.submission``), as from the command line and the Python API: validated,
recorded and committed, then enqueued, and answered ``202`` with the command's URL to poll.
Errors are ``{"error": code, "message": ...}`` (with ``field`` for a bad one); the document
of every endpoint is ``api/openapi.yaml``, served at ``/orgsync/v1/openapi.json``.

The read questions asked on every request of an application (the permission check, a user's
role in an organization, a user's organizations) are ``AccessQuestions`` methods: the views
here call them, and ``api.lean.ReadMiddleware`` calls them for plain GETs before Flask.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import cache
from importlib import resources
from typing import Any, TypeVar, cast

import yaml
from flask import Blueprint, Flask, Response, g, request
from flask.sansio.blueprints import BlueprintSetupState
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from api.auth import TokenCheck, requester
from models import permissions, reads
from models.commands import CommandRequest, InvalidCommandError, LastAdminError, get_command
from models.db import is_connection_error, make_session_factory
from models.errors import OrganizationNotFoundError, PermanentError, RetryableError
from models.permissions import Access, AccessCache
from models.submission import CommandService, Send
from models.tables import Command, CommandKind

logger = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "/orgsync/v1"
MAX_ID = 64
MAX_ROLE = 128
MAX_EMAIL = 320
MAX_TEXT = 2048
# Room for the ":N" a bulk invitation of more than ten addresses adds to each part's key.
MAX_IDEMPOTENCY_KEY = 200
MAX_INVITE_ADDRESSES = 100
MAX_COMMAND_ID = 2**63 - 1
RETRY_AFTER_SECONDS = 5
INVITE_FIELDS = ("inviter_user_id", "redirect_url", "expires_in_days", "public_metadata", "private_metadata")


class HttpError(PermanentError):
    """One error answer: status, a stable code, a sentence saying what to do, the field at fault,
    and any extra headers (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body

    def response(self) -> Response:
        return _json(self.payload(), self.status, self.headers or None)


def dumps(payload: Any) -> str:
    """The JSON text of every answer of these endpoints (compact separators)."""
    return json.dumps(payload, separators=(",", ":"))


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(payload), status=status, headers=headers, mimetype="application/json")


def invalid(field: str, message: str) -> HttpError:
    return HttpError(422, "invalid_field", f"{field} {message}", field=field)


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of these endpoints, from the package data."""
    text = resources.files("api").joinpath("openapi.yaml").read_text(encoding="utf-8")
    document: dict[str, Any] = yaml.safe_load(text)
    return document


# ------------------------------------------------------------------ input
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _clean(value: str, field: str, limit: int) -> str:
    value = value.strip()
    if not value:
        raise invalid(field, "must not be empty")
    if len(value) > limit:
        raise invalid(field, f"must be at most {limit} characters")
    if _CONTROL.search(value):
        raise invalid(field, "must not contain control characters")
    return value


def _path(value: str, field: str, limit: int = MAX_ID) -> str:
    return _clean(value, field, limit)


def query_value(values: Sequence[str], name: str, limit: int) -> str:
    """The one value of query parameter ``name`` (``values``: every value sent), cleaned."""
    if not values:
        raise invalid(name, "is required")
    if len(values) > 1:
        raise invalid(name, "must be given once")
    return _clean(values[0], name, limit)


def _body(allowed: Sequence[str]) -> dict[str, Any]:
    if not request.get_data(cache=True):
        return {}
    try:
        body = json.loads(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_json", "the body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise invalid(unknown[0], f"is not a field of this request; expected {', '.join(allowed)}")
    return body


def _string(body: dict[str, Any], field: str, limit: int, *, required: bool = False) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise invalid(field, "is required")
        return None
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    return _clean(value, field, limit)


def _object(body: dict[str, Any], field: str) -> dict[str, Any] | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(field, "must be an object")
    return value


def _flag(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise invalid(field, "must be true or false")
    return value


def _idempotency_key() -> str | None:
    values = request.headers.getlist("Idempotency-Key")
    if not values:
        return None
    if len(values) > 1:
        raise invalid("Idempotency-Key", "must be given once")
    return _clean(values[0], "Idempotency-Key", MAX_IDEMPOTENCY_KEY)


def _field_name(field: str) -> str:
    # The submission service names payload options and the organization as the row does.
    if field == "organization_id":
        return "organization"
    return field.removeprefix("payload.")


# ----------------------------------------------------------------- output
def command_json(command: Command) -> dict[str, Any]:
    return {
        "object": "command",
        "id": command.id,
        "url": f"{PREFIX}/commands/{command.id}",
        "kind": command.kind,
        "status": command.status,
        "organization_id": command.organization_id,
        "user_id": command.user_id,
        "email_address": command.email_address,
        "invitation_id": command.invitation_id,
        "role": command.role,
        "email_addresses": (command.payload or {}).get("email_addresses"),
        "requested_by": command.requested_by,
        "idempotency_key": command.idempotency_key,
        "dry_run": command.dry_run,
        "attempts": command.attempts,
        "error_code": command.error_code,
        "error_message": command.error_message,
        "superseded_by": command.superseded_by,
        "created_at": command.created_at,
        "updated_at": command.updated_at,
        "applied_at": command.applied_at,
        "confirmed_at": command.confirmed_at,
    }


def access_json(access: Access) -> dict[str, Any]:
    return {
        "organization_id": access.organization_id,
        "organization_slug": access.organization_slug,
        "organization_name": access.organization_name,
        "user_id": access.user_id,
        "role": access.role,
        "permissions": sorted(access.permissions),
    }


QueryValues = Callable[[str], list[str]]
"""Every value sent for a query parameter, by name (``request.args.getlist`` or the environ's)."""


class AccessQuestions:
    """The read questions applications ask on every request, each answered by one method.

    Authentication, the permission check, a user's membership of one organization and a
    user's organizations: the Flask views call these, and so does ``api.lean.ReadMiddleware``,
    which answers plain GETs of the same paths before Flask. Each method returns the JSON
    payload of a 200 or raises ``HttpError``; any other exception is for ``failure``.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        reads: Callable[[], AbstractContextManager[Session]],
        checks: Callable[[], AbstractContextManager[Session]],
        cache: AccessCache | None,
    ) -> None:
        self._check = TokenCheck(tokens)
        self._reads = reads
        self._checks = checks
        self._cache = cache

    def authenticate(self, header: str | None) -> str:
        """The requester of the bearer token in ``header``; 401 when there is none or it is unknown."""
        if not header:
            raise HttpError(401, "unauthorized", "the Authorization header is missing: send 'Bearer <token>'")
        position = self._check.match(header)
        if position is None:
            raise HttpError(401, "unauthorized", "the bearer token is not one of ORGSYNC_API_TOKENS")
        return requester(position)

    def access_of(self, user_id: str, organization: str) -> Access | None:
        if self._cache is not None:
            return self._cache.access_of(self._checks, user_id, organization)
        with self._checks() as session:
            return permissions.access_of(session, user_id, organization)

    def permission(self, query: QueryValues) -> dict[str, Any]:
        """``GET /permission?user_id=&organization=&permission=``."""
        user_id = query_value(query("user_id"), "user_id", MAX_ID)
        organization = query_value(query("organization"), "organization", 256)
        permission = query_value(query("permission"), "permission", MAX_ROLE)
        access = self.access_of(user_id, organization)
        return {
            "allowed": access is not None and access.allows(permission),
            "user_id": user_id,
            "organization_id": None if access is None else access.organization_id,
            "permission": permission,
            "role": None if access is None else access.role,
        }

    def membership(self, user_id: str, organization: str) -> dict[str, Any]:
        """``GET /users/{user_id}/organizations/{organization}``: the role and its permissions."""
        user_id = _path(user_id, "user_id")
        organization = _path(organization, "organization", 256)
        access = self.access_of(user_id, organization)
        if access is None:
            raise HttpError(
                404,
                "not_a_member",
                f"{user_id} is not a member of organization {organization} (per the mirror)",
            )
        return access_json(access)

    def organizations(self, user_id: str) -> dict[str, Any]:
        """``GET /users/{user_id}/organizations``: every live membership of the user."""
        user_id = _path(user_id, "user_id")
        with self._reads() as session:
            accesses = permissions.organizations_of(session, user_id)
        return {"data": [access_json(a) for a in accesses], "total_count": len(accesses)}


def failure(error: Exception, method: str, path: str) -> HttpError:
    """The answer to an error no view expected: 503 with Retry-After when the database cannot be
    reached, else 500 (logged with its traceback)."""
    if isinstance(error, RetryableError) or is_connection_error(error):
        # Unreachable, dropped, timed out or no pooled connection free in time.
        logger.warning("orgsync API: database unavailable: %s", type(error).__name__)
        return HttpError(
            503,
            "database_unavailable",
            "the database cannot be reached right now",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    logger.error("orgsync API: unexpected error in %s %s", method, path, exc_info=error)
    return HttpError(500, "internal_error", "internal server error")


def create_orgsync_blueprint(
    engine: Engine,
    tokens: Sequence[str],
    *,
    send: Send | None,
    dry_run_default: bool = False,
    permission_cache: AccessCache | None = None,
) -> Blueprint:
    """Permission checks and commands over the mirror at ``engine``, for holders of ``tokens``.

    ``send(ids)`` enqueues committed commands (None: the workers' sweep sends them later);
    ``permission_cache`` keeps answers per process until the mirror changes.
    """
    factory = make_session_factory(engine)
    questions = AccessQuestions(
        tokens, reads=factory, checks=permissions.check_sessions(engine), cache=permission_cache
    )
    service = CommandService(factory, send, dry_run_default=dry_run_default)
    bp = Blueprint("orgsync_api", __name__, url_prefix=PREFIX)

    def install(setup: BlueprintSetupState) -> None:
        # Plain GETs of the read questions are answered before Flask, by the same methods.
        from api.lean import ReadMiddleware  # noqa: PLC0415  (api.lean imports this module)

        app = cast(Flask, setup.app)
        app.wsgi_app = ReadMiddleware(app.wsgi_app, questions)  # type: ignore[method-assign]

    bp.record_once(install)

    def read(fn: Callable[[Session], T]) -> T:
        with factory() as session:
            return fn(session)

    @bp.before_request
    def authenticate() -> None:
        if request.endpoint == "orgsync_api.openapi":
            return
        g.orgsync_requester = questions.authenticate(request.headers.get("Authorization"))

    @bp.errorhandler(HttpError)
    def http_error(error: HttpError) -> Response:
        return error.response()

    @bp.errorhandler(InvalidCommandError)
    def invalid_command(error: InvalidCommandError) -> Response:
        field = _field_name(error.field)
        reason = str(error).split(": ", 1)[-1]
        return invalid(field, reason).response()

    @bp.errorhandler(LastAdminError)
    def last_admin(error: LastAdminError) -> Response:
        return HttpError(409, "last_admin_guard", str(error)).response()

    @bp.errorhandler(OrganizationNotFoundError)
    def organization_not_found(error: OrganizationNotFoundError) -> Response:
        return HttpError(404, "organization_not_found", str(error), field="organization").response()

    @bp.errorhandler(HTTPException)
    def werkzeug_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = (error.name or "error").lower().replace(" ", "_")
        response = HttpError(status, code, error.description or error.name or "error").response()
        for key, value in error.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @bp.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        return failure(error, request.method, request.path).response()

    # ------------------------------------------------------------ document
    @bp.get("/openapi.json")
    def openapi() -> Response:
        return _json(openapi_document())

    # --------------------------------------------------------- permissions
    # Plain GETs of these three are answered by ``api.lean.ReadMiddleware`` before Flask.
    @bp.get("/permission")
    def check_permission() -> Response:
        return _json(questions.permission(request.args.getlist))

    @bp.get("/users/<user_id>/organizations")
    def user_organizations(user_id: str) -> Response:
        return _json(questions.organizations(user_id))

    @bp.get("/users/<user_id>/organizations/<organization>")
    def user_membership(user_id: str, organization: str) -> Response:
        return _json(questions.membership(user_id, organization))

    # ------------------------------------------------------------ commands
    def submit(request_: CommandRequest) -> list[Command]:
        commands = service.submit([request_]).commands
        first = commands[0]
        if request_.idempotency_key is not None and not _same_request(first, request_):
            # The key names a command made by another request: answering with it would mislead.
            raise HttpError(
                409,
                "idempotency_key_reused",
                f"Idempotency-Key {request_.idempotency_key!r} was used for command {first.id} "
                f"({first.kind} in {first.organization_id}); use a new key for a different request",
                field="Idempotency-Key",
            )
        return commands

    def _same_request(command: Command, request_: CommandRequest) -> bool:
        if command.kind != request_.kind:
            return False
        if command.organization_id == request_.organization_id:
            return True
        return read(lambda s: reads.organization_id(s, request_.organization_id)) == command.organization_id

    def accepted(commands: list[Command], *, many: bool = False) -> Response:
        body: Any = {"data": [command_json(c) for c in commands]} if many else command_json(commands[0])
        return _json(body, 202, {"Location": f"{PREFIX}/commands/{commands[0].id}"})

    def command_request(kind: str, organization: str, **fields: Any) -> CommandRequest:
        return CommandRequest(
            kind=kind,
            organization_id=_path(organization, "organization", 256),
            requested_by=g.orgsync_requester,
            idempotency_key=_idempotency_key(),
            **fields,
        )

    @bp.post("/organizations/<organization>/memberships")
    def add_member(organization: str) -> Response:
        body = _body(("user_id", "role", "public_metadata", "private_metadata", "dry_run"))
        payload = {
            name: value
            for name in ("public_metadata", "private_metadata")
            if (value := _object(body, name)) is not None
        }
        return accepted(
            submit(
                command_request(
                    CommandKind.ADD_MEMBER,
                    organization,
                    user_id=_string(body, "user_id", MAX_ID, required=True),
                    role=_string(body, "role", MAX_ROLE) or "org:member",
                    payload=payload or None,
                    dry_run=_flag(body, "dry_run"),
                )
            )
        )

    @bp.patch("/organizations/<organization>/memberships/<user_id>")
    def set_role(organization: str, user_id: str) -> Response:
        body = _body(("role", "dry_run"))
        return accepted(
            submit(
                command_request(
                    CommandKind.SET_ROLE,
                    organization,
                    user_id=_path(user_id, "user_id"),
                    role=_string(body, "role", MAX_ROLE, required=True),
                    dry_run=_flag(body, "dry_run"),
                )
            )
        )

    @bp.delete("/organizations/<organization>/memberships/<user_id>")
    def remove_member(organization: str, user_id: str) -> Response:
        body = _body(("dry_run",))
        return accepted(
            submit(
                command_request(
                    CommandKind.REMOVE_MEMBER,
                    organization,
                    user_id=_path(user_id, "user_id"),
                    dry_run=_flag(body, "dry_run"),
                )
            )
        )

    @bp.post("/organizations/<organization>/invitations")
    def invite(organization: str) -> Response:
        options = (
            "inviter_user_id",
            "redirect_url",
            "expires_in_days",
            "public_metadata",
            "private_metadata",
        )
        body = _body(("email_address", "email_addresses", "role", "dry_run", *options))
        payload: dict[str, Any] = {}
        for name in ("inviter_user_id",):
            if (text := _string(body, name, MAX_ID)) is not None:
                payload[name] = text
        if (url := _string(body, "redirect_url", MAX_TEXT)) is not None:
            payload["redirect_url"] = url
        for name in ("public_metadata", "private_metadata"):
            if (value := _object(body, name)) is not None:
                payload[name] = value
        if body.get("expires_in_days") is not None:
            payload["expires_in_days"] = body["expires_in_days"]
        role = _string(body, "role", MAX_ROLE) or "org:member"
        dry_run = _flag(body, "dry_run")
        one = body.get("email_address")
        many = body.get("email_addresses")
        if (one is None) == (many is None):
            raise invalid("email_address", "or email_addresses is required, not both")
        if one is not None:
            email = _string(body, "email_address", MAX_EMAIL, required=True)
            request_ = command_request(
                CommandKind.INVITE,
                organization,
                email_address=email,
                role=role,
                payload=payload or None,
                dry_run=dry_run,
            )
        else:
            if not isinstance(many, list) or not 1 <= len(many) <= MAX_INVITE_ADDRESSES:
                raise invalid("email_addresses", f"must be a list of 1 to {MAX_INVITE_ADDRESSES} addresses")
            emails = []
            for index, item in enumerate(many):
                if not isinstance(item, str):
                    raise invalid(f"email_addresses[{index}]", "must be a string")
                emails.append(_clean(item, f"email_addresses[{index}]", MAX_EMAIL))
            request_ = command_request(
                CommandKind.BULK_INVITE,
                organization,
                role=role,
                payload={**payload, "email_addresses": emails},
                dry_run=dry_run,
            )
        return accepted(submit(request_), many=True)

    @bp.post("/organizations/<organization>/invitations/<invitation_id>/revoke")
    def revoke(organization: str, invitation_id: str) -> Response:
        body = _body(("requesting_user_id", "dry_run"))
        requesting = _string(body, "requesting_user_id", MAX_ID)
        return accepted(
            submit(
                command_request(
                    CommandKind.REVOKE_INVITATION,
                    organization,
                    invitation_id=_path(invitation_id, "invitation_id"),
                    payload={"requesting_user_id": requesting} if requesting else None,
                    dry_run=_flag(body, "dry_run"),
                )
            )
        )

    @bp.get("/commands/<int:command_id>")
    def command(command_id: int) -> Response:
        found = read(lambda s: get_command(s, command_id)) if command_id <= MAX_COMMAND_ID else None
        if found is None:
            raise HttpError(404, "command_not_found", f"no command {command_id}")
        return _json(command_json(found))

    return bp
