"""The ``/v1`` blueprint: bearer-token check, Clerk's query parameters in, Clerk's JSON out.

Views only parse and render; every filter lives in ``models.reads``. Tokens come from the
settings (several during rotation) and are checked by ``api.auth.TokenCheck``, as on
``/orgsync/v1``: in constant time, never logged; a wrong or missing one gets Clerk's 401.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, Response, request
from flask.blueprints import BlueprintSetupState
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from api import params
from api.auth import TokenCheck
from api.errors import ApiError, invalid, not_found, unauthorized
from models import reads, render

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _json(payload: Any) -> Response:
    return Response(render.encode(payload), mimetype="application/json")


def _listing(listing: reads.Listing[T], item: Callable[[T], dict[str, Any]]) -> Response:
    return _json({"data": [item(x) for x in listing.data], "total_count": listing.total_count})


def database_unavailable(error: OperationalError) -> Response:
    """Clerk's 503 shape, with Retry-After, for a mirror that cannot be read right now."""
    logger.warning("read API: database unavailable: %s", type(error.orig).__name__)
    response = ApiError(
        503, "service_unavailable", "Service unavailable", "The mirror cannot be read right now."
    ).response()
    response.headers["Retry-After"] = "5"
    return response


def create_api_blueprint(engine: Engine, tokens: Sequence[str]) -> Blueprint:
    """Clerk's read endpoints over the mirror at ``engine``, for callers holding one of ``tokens``."""
    check = TokenCheck(tokens)
    factory = reads.read_sessions(engine)
    v1 = Blueprint("clerk_read_api", __name__, url_prefix="/v1")

    def install(setup: BlueprintSetupState) -> None:
        # Plain GETs of an organization's page of memberships are answered before Flask, on a
        # connection of their own (no session: it would cost as much as a statement).
        from api.lean import MembershipPageMiddleware  # noqa: PLC0415  (api.lean imports this module)

        app = cast(Flask, setup.app)
        pages = MembershipPageMiddleware(app.wsgi_app, app, check, reads.read_connections(engine))
        app.wsgi_app = pages  # type: ignore[method-assign]

    v1.record_once(install)

    def read(fn: Callable[[Session], T]) -> T:
        # Reads only: the session is rolled back on leaving, there is nothing to commit.
        with factory() as session:
            return fn(session)

    @v1.before_request
    def authenticate() -> None:
        header = request.headers.get("Authorization")
        if not header:
            raise unauthorized("The Authorization header is missing: send 'Bearer <token>'.")
        if check.match(header) is None:
            raise unauthorized("The provided token is invalid. Check ORGSYNC_API_TOKENS.")

    @v1.errorhandler(ApiError)
    def api_error(error: ApiError) -> Response:
        return error.response()

    @v1.errorhandler(reads.InvalidQueryError)
    def query_error(error: reads.InvalidQueryError) -> Response:
        if isinstance(error, reads.InvalidParameterError):
            return invalid(error.param, error.detail).response()
        return invalid("request", str(error)).response()

    @v1.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = "resource_not_found" if status == 404 else "request_invalid"
        return ApiError(status, code, error.name, error.description or error.name).response()

    @v1.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        logger.exception("read API: unexpected error in %s %s", request.method, request.path)
        return ApiError(500, "internal_clerk_error", "Oops, an error occurred", "Internal error").response()

    @v1.errorhandler(OperationalError)
    def database_error(error: OperationalError) -> Response:
        return database_unavailable(error)

    # ---------------------------------------------------------- organizations
    @v1.get("/organizations")
    def list_organizations() -> Any:
        limit, offset = params.window()
        counts = params.flag("include_members_count")
        params.flag("include_missing_member_with_elevated_permissions")
        listing = read(
            lambda s: reads.list_organizations(
                s,
                limit=limit,
                offset=offset,
                order_by=params.text("order_by"),
                query=params.text("query"),
                user_ids=params.values("user_id"),
                organization_ids=params.values("organization_id"),
            )
        )
        return _listing(listing, lambda org: render.organization(org, counts=counts))

    @v1.get("/organizations/<org_id>")
    def get_organization(org_id: str) -> Any:
        counts = params.flag("include_members_count")
        params.flag("include_missing_member_with_elevated_permissions")
        org = read(lambda s: reads.get_organization(s, org_id))
        if org is None:
            raise not_found("organization", org_id)
        return _json(render.organization(org, counts=counts))

    # ------------------------------------------------------------ memberships
    def memberships(organization: str | None = None, user: str | None = None) -> Response:
        limit, offset = params.window()
        params.refuse_unmirrored(
            "phone_number",
            "web3_wallet",
            "phone_number_query",
            "last_active_at_before",
            "last_active_at_after",
        )
        query = reads.MembershipQuery(
            organization=organization,
            user=user,
            limit=limit,
            offset=offset,
            order_by=params.text("order_by"),
            roles=params.values("role"),
            user_ids=params.values("user_id"),
            email_addresses=params.values("email_address"),
            usernames=params.values("username"),
            query=params.text("query"),
            email_address_query=params.text("email_address_query"),
            username_query=params.text("username_query"),
            name_query=params.text("name_query"),
            created_at_before=params.integer("created_at_before"),
            created_at_after=params.integer("created_at_after"),
        )
        body = read(lambda s: render.membership_page(s, query))
        if body is None:
            raise not_found(
                "organization" if organization is not None else "user", organization or user or ""
            )
        return Response(body, mimetype="application/json")

    @v1.get("/organizations/<org_id>/memberships")
    def list_memberships(org_id: str) -> Any:
        return memberships(organization=org_id)

    @v1.get("/organization_memberships")
    def list_instance_memberships() -> Any:
        return memberships()

    @v1.get("/users/<user_id>/organization_memberships")
    def list_user_memberships(user_id: str) -> Any:
        return memberships(user=user_id)

    # ------------------------------------------------------------ invitations
    def invitations(
        organization: str | None = None,
        user: str | None = None,
        *,
        status: str | None = None,
        with_organization: bool = False,
    ) -> Response:
        limit, offset = params.window()
        listing = read(
            lambda s: reads.list_invitations(
                s,
                organization=organization,
                user=user,
                limit=limit,
                offset=offset,
                order_by=params.text("order_by"),
                status=status or params.values("status"),
                email_address=params.text("email_address"),
                query=params.text("query"),
            )
        )
        if listing is None:
            raise not_found(
                "organization" if organization is not None else "user", organization or user or ""
            )
        return _listing(listing, lambda inv: render.invitation(inv, with_organization=with_organization))

    @v1.get("/organizations/<org_id>/invitations")
    def list_invitations(org_id: str) -> Any:
        return invitations(organization=org_id)

    @v1.get("/organizations/<org_id>/invitations/pending")
    def list_pending_invitations(org_id: str) -> Any:
        return invitations(organization=org_id, status="pending")

    @v1.get("/organizations/<org_id>/invitations/<invitation_id>")
    def get_invitation(org_id: str, invitation_id: str) -> Any:
        found = read(lambda s: reads.get_invitation(s, org_id, invitation_id))
        if found is None:
            raise not_found("organization invitation", invitation_id)
        return _json(render.invitation(found))

    @v1.get("/organization_invitations")
    def list_instance_invitations() -> Any:
        return invitations(with_organization=True)

    @v1.get("/users/<user_id>/organization_invitations")
    def list_user_invitations(user_id: str) -> Any:
        return invitations(user=user_id, with_organization=True)

    # -------------------------------------------------- roles and permissions
    @v1.get("/organization_roles")
    def list_roles() -> Any:
        limit, offset = params.window()
        listing = read(
            lambda s: reads.list_roles(
                s, limit=limit, offset=offset, order_by=params.text("order_by"), query=params.text("query")
            )
        )
        return _listing(listing, render.role)

    @v1.get("/organization_roles/<role_id>")
    def get_role(role_id: str) -> Any:
        found = read(lambda s: reads.get_role(s, role_id))
        if found is None:
            raise not_found("role", role_id)
        return _json(render.role(found))

    @v1.get("/organization_permissions/<permission_id>")
    def get_permission(permission_id: str) -> Any:
        found = read(lambda s: reads.get_permission(s, permission_id))
        if found is None:
            raise not_found("permission", permission_id)
        return _json(render.permission(found))

    @v1.get("/organization_permissions")
    def list_permissions() -> Any:
        limit, offset = params.window()
        listing = read(
            lambda s: reads.list_permissions(
                s, limit=limit, offset=offset, order_by=params.text("order_by"), query=params.text("query")
            )
        )
        return _listing(listing, render.permission)

    # -------------------------------------------------------------- role sets
    @v1.get("/role_sets")
    def list_role_sets() -> Any:
        limit, offset = params.window()
        listing = read(
            lambda s: reads.list_role_sets(
                s, limit=limit, offset=offset, order_by=params.text("order_by"), query=params.text("query")
            )
        )
        return _listing(listing, render.role_set)

    @v1.get("/role_sets/<key_or_id>")
    def get_role_set(key_or_id: str) -> Any:
        found = read(lambda s: reads.get_role_set(s, key_or_id))
        if found is None:
            raise not_found("role set", key_or_id)
        return _json(render.role_set(found))

    # --------------------------------------------------- organization domains
    def domains(organization: str | None = None) -> Response:
        limit, offset = params.window()
        verified = params.optional_flag("verified")
        listing = read(
            lambda s: reads.list_domains(
                s,
                organization=organization,
                limit=limit,
                offset=offset,
                order_by=params.text("order_by"),
                organization_ids=params.values("organization_id") if organization is None else (),
                verified=verified,
                enrollment_modes=params.values("enrollment_mode"),
                query=params.given("query") if organization is None else None,
                domains=params.values("domains") if organization is None else (),
            )
        )
        if listing is None:
            raise not_found("organization", organization or "")
        return _listing(listing, render.domain)

    @v1.get("/organizations/<org_id>/domains")
    def list_domains(org_id: str) -> Any:
        return domains(organization=org_id)

    @v1.get("/organization_domains")
    def list_instance_domains() -> Any:
        return domains()

    # ------------------------------------------------------------------ users
    @v1.get("/users")
    def list_users() -> Any:
        limit, offset = params.window()
        params.refuse_unmirrored(*params.NOT_MIRRORED)
        listing = read(
            lambda s: reads.list_users(
                s,
                limit=limit,
                offset=offset,
                order_by=params.text("order_by"),
                user_ids=params.values("user_id"),
                email_addresses=params.values("email_address"),
                usernames=params.values("username"),
                organization_ids=params.values("organization_id"),
                query=params.text("query"),
                created_at_before=params.integer("created_at_before"),
                created_at_after=params.integer("created_at_after"),
            )
        )
        # Clerk's user list is a bare array, without a total.
        return _json([render.user(u) for u in listing.data])

    @v1.get("/users/<user_id>")
    def get_user(user_id: str) -> Any:
        found = read(lambda s: reads.get_user(s, user_id))
        if found is None:
            raise not_found("user", user_id)
        return _json(render.user(found))

    @v1.route("/<path:rest>", methods=["GET", "POST", "PATCH", "PUT", "DELETE"])
    def unknown(rest: str) -> Any:
        raise ApiError(
            404,
            "resource_not_found",
            "not found",
            f"{request.method} /v1/{rest} is not served by the mirror, which answers Clerk's reads only.",
        )

    return v1
