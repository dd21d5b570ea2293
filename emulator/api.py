"""The Backend API under ``/v1`` (bearer secret key, Clerk's error body, rate limits) and ``/_emulator``.

Views only parse parameters and translate: every rule lives in ``emulator.state``. The
``/_emulator`` endpoints are test and demo helpers that Clerk does not have (snapshot,
delivery log, settle, accepting an invitation as the invitee, running a scenario, faults).
"""

from __future__ import annotations

import hmac
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from emulator.delivery import WebhookDelivery
from emulator.errors import (
    ClerkError,
    not_found,
    param_format,
    param_invalid,
    param_missing,
    too_many_requests,
)
from emulator.scenario import Scenario
from emulator.sessions import DEFAULT_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME, MIN_TOKEN_LIFETIME, SessionIssuer
from emulator.state import State


@dataclass(frozen=True)
class RateLimits:
    """Requests per window for the whole instance, and role/metadata changes per membership (0: off)."""

    instance: int = 100
    membership: int = 10
    window: float = 10.0


class WindowLimiter:
    """Fixed windows per key: once a key's budget is spent, everything is refused until the window ends."""

    def __init__(self, limit: int, window: float, now: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._now = now
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, key: str) -> int | None:
        """Count one request; None if allowed, else the ``Retry-After`` in whole seconds."""
        if self.limit <= 0:
            return None
        with self._lock:
            now = self._now()
            start, count = self._windows.get(key, (now, 0))
            if now >= start + self.window:
                start, count = now, 0
            if count >= self.limit:
                return max(1, math.ceil(start + self.window - now))
            self._windows[key] = (start, count + 1)
            if len(self._windows) > 10_000:
                self._windows = {k: v for k, v in self._windows.items() if now < v[0] + self.window}
            return None


FAULT_MODES = ("error_500", "error_500_after_commit", "timeout_after_commit")


@dataclass
class Fault:
    """Make the next ``count`` matching requests fail: before the change (``error_500``), or after
    it, answering 500 or answering only after ``delay`` seconds (beyond the client's timeout)."""

    method: str
    path_regex: str
    mode: str
    count: int
    delay: float

    def matches(self, method: str, path: str) -> bool:
        return (
            self.count > 0 and self.method in ("*", method) and re.search(self.path_regex, path) is not None
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path_regex": self.path_regex,
            "mode": self.mode,
            "count": self.count,
            "delay": self.delay,
        }


class Faults:
    """Armed faults, consumed in the order they were added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str, *, after_commit: bool) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.mode.endswith("_after_commit") == after_commit and fault.matches(method, path):
                    fault.count -= 1
                    return fault
            return None

    def armed(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.as_dict() for f in self._faults if f.count > 0]


def _parse_fault(body: dict[str, Any]) -> Fault:
    method, path_regex, mode = body.get("method", "*"), body.get("path_regex"), body.get("mode")
    count, delay = body.get("count", 1), body.get("delay", 3.0)
    if not isinstance(method, str) or not method:
        raise param_invalid("method", "must be an HTTP method or *")
    if not isinstance(path_regex, str) or not path_regex:
        raise param_invalid("path_regex", "must be a regular expression")
    try:
        re.compile(path_regex)
    except re.error:
        raise param_invalid("path_regex", "must be a valid regular expression") from None
    if mode not in FAULT_MODES:
        raise param_invalid("mode", f"must be one of {', '.join(FAULT_MODES)}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise param_invalid("count", "must be a positive integer")
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 60:
        raise param_invalid("delay", "must be between 0 and 60 seconds")
    return Fault(method.upper(), path_regex, mode, count, float(delay))


def _error_response(error: ClerkError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise param_invalid(name, "must be an integer") from None


def _optional_int_arg(name: str) -> int | None:
    if not request.args.get(name):
        return None
    return _int_arg(name, 0)


def _bool_arg(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _list_arg(name: str) -> list[str]:
    # The SDK sends repeated ``name=a&name=b``; Clerk's docs also show ``name[]=``.
    return [v for v in request.args.getlist(name) + request.args.getlist(f"{name}[]") if v]


def _body(*, required: bool = True) -> dict[str, Any]:
    if not request.data and not required:
        return {}
    data = request.get_json(silent=True)
    if data is None and not required and not request.data.strip():
        return {}
    if not isinstance(data, dict):
        raise param_format("body", "must be a JSON object")
    return data


def _str_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise param_format(name, "must be a string")
    return value


def _page_args() -> tuple[int, int]:
    return _int_arg("limit", 10), _int_arg("offset", 0)


def create_app(
    state: State,
    *,
    secret_key: str,
    delivery: WebhookDelivery | None = None,
    limits: RateLimits | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    sessions: SessionIssuer | None = None,
) -> Flask:
    """The emulator's WSGI app over ``state``; ``delivery`` backs the delivery-log endpoints,
    ``sessions`` the JWKS and session endpoints (a fresh key pair when not given)."""
    if not secret_key:
        raise ValueError("the emulator needs a secret key to check")
    limits = limits or RateLimits()
    instance_limiter = WindowLimiter(limits.instance, limits.window, monotonic)
    membership_limiter = WindowLimiter(limits.membership, limits.window, monotonic)
    expected = f"Bearer {secret_key}".encode()
    faults = Faults()
    issuer = sessions if sessions is not None else SessionIssuer()

    app = Flask("emulator")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    v1 = Blueprint("v1", __name__, url_prefix="/v1")
    test = Blueprint("emulator", __name__, url_prefix="/_emulator")

    def authenticate() -> None:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ClerkError(
                401,
                "authentication_invalid",
                "Unauthorized request",
                "The provided Clerk Secret Key is invalid. Make sure that your Clerk Secret Key is correct.",
            )

    @v1.before_request
    def check_v1() -> None:
        authenticate()
        retry_after = instance_limiter.hit("instance")
        if retry_after is not None:
            raise too_many_requests(retry_after)
        if faults.take(request.method, request.path, after_commit=False) is not None:
            raise ClerkError(500, "internal_clerk_error", "Oops, an error occurred", "Injected fault")

    @v1.after_request
    def fault_after_commit(response: Response) -> Response:
        if response.status_code >= 400:
            return response
        fault = faults.take(request.method, request.path, after_commit=True)
        if fault is None:
            return response
        if fault.mode == "timeout_after_commit":
            # The change is made and its webhook emitted; the answer comes after the client gave up.
            time.sleep(fault.delay)
            return response
        return _error_response(
            ClerkError(500, "internal_clerk_error", "Oops, an error occurred", "Injected fault")
        )

    @test.before_request
    def check_test() -> None:
        authenticate()

    def membership_budget(org_id: str, user_id: str) -> None:
        retry_after = membership_limiter.hit(f"{org_id}/{user_id}")
        if retry_after is not None:
            raise too_many_requests(retry_after)

    @app.errorhandler(ClerkError)
    def clerk_error(error: ClerkError) -> Response:
        return _error_response(error)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        app.logger.exception("unexpected error in the emulator")
        return _error_response(ClerkError(500, "internal_clerk_error", "Oops, an error occurred", str(error)))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = "resource_not_found" if status == 404 else "request_invalid"
        return _error_response(ClerkError(status, code, error.name, error.description or error.name))

    # ---------------------------------------------------------- organizations
    @v1.get("/organizations")
    def list_organizations() -> Any:
        limit, offset = _page_args()
        return state.list_organizations(
            limit=limit,
            offset=offset,
            order_by=request.args.get("order_by"),
            query=request.args.get("query"),
            include_members_count=_bool_arg("include_members_count"),
            user_ids=_list_arg("user_id"),
            organization_ids=_list_arg("organization_id"),
        ).body()

    @v1.post("/organizations")
    def create_organization() -> Any:
        body = _body()
        max_allowed = body.get("max_allowed_memberships")
        if max_allowed is not None and not isinstance(max_allowed, int):
            raise param_format("max_allowed_memberships", "must be an integer")
        return state.create_organization(
            name=_str_field(body, "name") or "",
            slug=_str_field(body, "slug"),
            created_by=_str_field(body, "created_by"),
            max_allowed_memberships=max_allowed,
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
        )

    @v1.get("/organizations/<org_id>")
    def get_organization(org_id: str) -> Any:
        return state.get_organization(org_id, include_members_count=_bool_arg("include_members_count"))

    @v1.patch("/organizations/<org_id>")
    def update_organization(org_id: str) -> Any:
        body = _body()
        max_allowed = body.get("max_allowed_memberships")
        if max_allowed is not None and not isinstance(max_allowed, int):
            raise param_format("max_allowed_memberships", "must be an integer")
        admin_delete = body.get("admin_delete_enabled")
        if admin_delete is not None and not isinstance(admin_delete, bool):
            raise param_format("admin_delete_enabled", "must be a boolean")
        return state.update_organization(
            org_id,
            name=_str_field(body, "name"),
            slug=_str_field(body, "slug"),
            max_allowed_memberships=max_allowed,
            admin_delete_enabled=admin_delete,
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
        )

    @v1.delete("/organizations/<org_id>")
    def delete_organization(org_id: str) -> Any:
        return state.delete_organization(org_id)

    # ------------------------------------------------------------ memberships
    def memberships(org_id: str | None) -> Any:
        limit, offset = _page_args()
        return state.list_memberships(
            org_id,
            limit=limit,
            offset=offset,
            order_by=request.args.get("order_by"),
            roles=_list_arg("role"),
            user_ids=_list_arg("user_id"),
            email_addresses=_list_arg("email_address"),
            usernames=_list_arg("username"),
            query=request.args.get("query") or None,
            email_address_query=request.args.get("email_address_query") or None,
            username_query=request.args.get("username_query") or None,
            name_query=request.args.get("name_query") or None,
            created_at_before=_optional_int_arg("created_at_before"),
            created_at_after=_optional_int_arg("created_at_after"),
        ).body()

    @v1.get("/organizations/<org_id>/memberships")
    def list_memberships(org_id: str) -> Any:
        return memberships(org_id)

    @v1.get("/organization_memberships")
    def list_instance_memberships() -> Any:
        limit, offset = _page_args()
        return state.list_memberships(
            None, limit=limit, offset=offset, order_by=request.args.get("order_by")
        ).body()

    @v1.post("/organizations/<org_id>/memberships")
    def add_membership(org_id: str) -> Any:
        body = _body()
        return state.add_membership(
            org_id,
            user_id=_str_field(body, "user_id") or "",
            role=_str_field(body, "role") or "",
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
        )

    @v1.patch("/organizations/<org_id>/memberships/<user_id>")
    def update_membership(org_id: str, user_id: str) -> Any:
        body = _body()
        membership_budget(org_id, user_id)
        return state.update_membership_role(org_id, user_id, role=_str_field(body, "role") or "")

    @v1.delete("/organizations/<org_id>/memberships/<user_id>")
    def remove_membership(org_id: str, user_id: str) -> Any:
        return state.remove_membership(org_id, user_id)

    @v1.patch("/organizations/<org_id>/memberships/<user_id>/metadata")
    def update_membership_metadata(org_id: str, user_id: str) -> Any:
        body = _body()
        unknown = set(body) - {"public_metadata", "private_metadata"}
        if unknown:
            raise param_invalid(sorted(unknown)[0], "is not a recognised parameter")
        membership_budget(org_id, user_id)
        return state.update_membership_metadata(
            org_id,
            user_id,
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
        )

    # ------------------------------------------------------------ invitations
    @v1.get("/organizations/<org_id>/invitations")
    def list_invitations(org_id: str) -> Any:
        limit, offset = _page_args()
        return state.list_invitations(
            org_id,
            status=_list_arg("status"),
            limit=limit,
            offset=offset,
            order_by=request.args.get("order_by"),
            email_address=request.args.get("email_address") or None,
        ).body()

    @v1.get("/organization_invitations")
    def list_instance_invitations() -> Any:
        limit, offset = _page_args()
        return state.list_invitations(
            None,
            status=_list_arg("status"),
            limit=limit,
            offset=offset,
            order_by=request.args.get("order_by"),
            query=request.args.get("query") or None,
        ).body()

    @v1.get("/users/<user_id>/organization_invitations")
    def list_user_invitations(user_id: str) -> Any:
        limit, offset = _page_args()
        return state.list_invitations(
            None, user_id=user_id, status=_list_arg("status"), limit=limit, offset=offset
        ).body()

    @v1.get("/organizations/<org_id>/invitations/pending")
    def list_pending_invitations(org_id: str) -> Any:
        limit, offset = _page_args()
        return state.list_invitations(org_id, status="pending", limit=limit, offset=offset).body()

    @v1.post("/organizations/<org_id>/invitations")
    def create_invitation(org_id: str) -> Any:
        body = _body()
        return state.create_invitation(
            org_id,
            email_address=body.get("email_address"),
            role=body.get("role"),
            inviter_user_id=body.get("inviter_user_id"),
            expires_in_days=body.get("expires_in_days"),
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
        )

    @v1.post("/organizations/<org_id>/invitations/bulk")
    def bulk_create_invitations(org_id: str) -> Any:
        items = request.get_json(silent=True)
        if not isinstance(items, list):
            raise param_format("body", "must be a JSON array of invitations")
        return state.bulk_create_invitations(org_id, items).body()

    @v1.get("/organizations/<org_id>/invitations/<invitation_id>")
    def get_invitation(org_id: str, invitation_id: str) -> Any:
        return state.get_invitation(org_id, invitation_id)

    @v1.post("/organizations/<org_id>/invitations/<invitation_id>/revoke")
    def revoke_invitation(org_id: str, invitation_id: str) -> Any:
        body = _body(required=False)
        return state.revoke_invitation(
            org_id, invitation_id, requesting_user_id=_str_field(body, "requesting_user_id")
        )

    # ------------------------------------------------------------------ roles
    @v1.get("/organization_roles")
    def list_roles() -> Any:
        limit, offset = _page_args()
        return state.list_roles(
            limit=limit, offset=offset, order_by=request.args.get("order_by"), query=request.args.get("query")
        ).body()

    @v1.post("/organization_roles")
    def create_role() -> Any:
        body = _body()
        permissions = body.get("permissions")
        if permissions is not None and (
            not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions)
        ):
            raise param_format("permissions", "must be a list of permission ids")
        return state.create_role(
            name=_str_field(body, "name") or "",
            key=_str_field(body, "key") or "",
            description=_str_field(body, "description"),
            permissions=permissions,
        )

    @v1.get("/organization_permissions")
    def list_permissions() -> Any:
        limit, offset = _page_args()
        return state.list_permissions(
            limit=limit, offset=offset, order_by=request.args.get("order_by"), query=request.args.get("query")
        ).body()

    @v1.get("/organization_permissions/<permission_id>")
    def get_permission(permission_id: str) -> Any:
        return state.get_permission(permission_id)

    @v1.get("/organization_roles/<role_id>")
    def get_role(role_id: str) -> Any:
        return state.get_role(role_id)

    @v1.delete("/organization_roles/<role_id>")
    def delete_role(role_id: str) -> Any:
        return state.delete_role(role_id)

    # ------------------------------------------------------------------ users
    @v1.post("/users")
    def create_user() -> Any:
        body = _body()
        emails = body.get("email_address")
        if isinstance(emails, str):
            emails = [emails]
        if not emails:
            raise ClerkError(
                422,
                "form_param_missing",
                "email_address must be included",
                "email_address must be included",
                meta={"param_name": "email_address"},
            )
        if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
            raise param_format("email_address", "must be a list of email addresses")
        return state.create_user(
            email_address=emails[0],
            first_name=_str_field(body, "first_name"),
            last_name=_str_field(body, "last_name"),
            username=_str_field(body, "username"),
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
            external_id=_str_field(body, "external_id"),
        )

    @v1.get("/users")
    def list_users() -> Any:
        limit, offset = _page_args()
        return state.list_users(
            limit=limit,
            offset=offset,
            order_by=request.args.get("order_by"),
            user_ids=_list_arg("user_id"),
            email_addresses=_list_arg("email_address"),
            usernames=_list_arg("username"),
            organization_ids=_list_arg("organization_id"),
            query=request.args.get("query") or None,
            created_at_before=_optional_int_arg("created_at_before"),
            created_at_after=_optional_int_arg("created_at_after"),
        )

    @v1.get("/users/<user_id>")
    def get_user(user_id: str) -> Any:
        return state.get_user(user_id)

    @v1.delete("/users/<user_id>")
    def delete_user(user_id: str) -> Any:
        return state.delete_user(user_id)

    @v1.get("/users/<user_id>/organization_memberships")
    def user_memberships(user_id: str) -> Any:
        limit, offset = _page_args()
        return state.list_user_memberships(user_id, limit=limit, offset=offset).body()

    @v1.patch("/users/<user_id>")
    def update_user(user_id: str) -> Any:
        body = _body()
        return state.update_user(
            user_id,
            first_name=_str_field(body, "first_name"),
            last_name=_str_field(body, "last_name"),
            username=_str_field(body, "username"),
            public_metadata=body.get("public_metadata"),
            private_metadata=body.get("private_metadata"),
        )

    @v1.patch("/organization_roles/<role_id>")
    def update_role(role_id: str) -> Any:
        body = _body()
        permissions = body.get("permissions")
        if permissions is not None and (
            not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions)
        ):
            raise param_format("permissions", "must be a list of permission ids")
        return state.update_role(
            role_id,
            name=_str_field(body, "name"),
            description=_str_field(body, "description"),
            permissions=permissions,
        )

    @v1.post("/organization_permissions")
    def create_permission() -> Any:
        body = _body()
        return state.create_permission(
            name=_str_field(body, "name") or "",
            key=_str_field(body, "key") or "",
            description=_str_field(body, "description") or "",
        )

    @v1.delete("/organization_permissions/<permission_id>")
    def delete_permission(permission_id: str) -> Any:
        return state.delete_permission(permission_id)

    @v1.get("/role_sets")
    def list_role_sets() -> Any:
        limit, offset = _page_args()
        return state.list_role_sets(
            limit=limit, offset=offset, order_by=request.args.get("order_by"), query=request.args.get("query")
        ).body()

    @v1.get("/role_sets/<key_or_id>")
    def get_role_set(key_or_id: str) -> Any:
        return state.get_role_set(key_or_id)

    def _verified_arg() -> bool | None:
        raw = request.args.get("verified")
        if raw is None:
            return None
        if raw not in ("true", "false"):
            raise param_invalid("verified", "must be true or false")
        return raw == "true"

    def _enrollment_args() -> list[str]:
        # One value, a comma-separated list (the array form) or repeated values.
        return [m.strip() for v in _list_arg("enrollment_mode") for m in v.split(",") if m.strip()]

    @v1.get("/organization_domains")
    def list_all_domains() -> Any:
        limit, offset = _page_args()
        return state.list_domains(
            limit=limit,
            offset=offset,
            organization_id=request.args.get("organization_id") or None,
            verified=_verified_arg(),
            enrollment_modes=_enrollment_args(),
            query=request.args.get("query"),
            domains=_list_arg("domains"),
            order_by=request.args.get("order_by"),
        ).body()

    @v1.get("/organizations/<org_id>/domains")
    def list_org_domains(org_id: str) -> Any:
        limit, offset = _page_args()
        return state.list_domains(
            limit=limit,
            offset=offset,
            within_organization=org_id,
            verified=_verified_arg(),
            enrollment_modes=_enrollment_args(),
        ).body()

    @v1.post("/organizations/<org_id>/domains")
    def create_domain(org_id: str) -> Any:
        body = _body()
        verified = body.get("verified", True)
        if not isinstance(verified, bool):
            raise param_format("verified", "must be a boolean")
        return state.create_domain(
            org_id,
            name=_str_field(body, "name") or "",
            enrollment_mode=_str_field(body, "enrollment_mode") or "manual_invitation",
            verified=verified,
        )

    @v1.patch("/organizations/<org_id>/domains/<domain_id>")
    def update_domain(org_id: str, domain_id: str) -> Any:
        body = _body()
        return state.update_domain(org_id, domain_id, enrollment_mode=_str_field(body, "enrollment_mode"))

    @v1.delete("/organizations/<org_id>/domains/<domain_id>")
    def delete_domain(org_id: str, domain_id: str) -> Any:
        return state.delete_domain(org_id, domain_id)

    # ------------------------------------------------------ sessions and keys
    @v1.get("/jwks")
    def jwks() -> Any:
        return issuer.jwks()

    @v1.post("/sessions")
    def create_session() -> Any:
        # Clerk: "intended only for use in testing, and not available for production instances".
        body = _body()
        user_id = _str_field(body, "user_id")
        if not user_id:
            raise param_missing("user_id")
        organization = _str_field(body, "active_organization_id")
        if organization:
            org_claim = state.session_org_claim(user_id, organization)
        else:
            state.get_user(user_id)
            org_claim = None
        return issuer.open_session(user_id, org_claim).body()

    @v1.post("/sessions/<session_id>/tokens")
    def create_session_token(session_id: str) -> Any:
        found = issuer.session(session_id)
        if found is None:
            raise not_found("session", session_id)
        body = _body(required=False)
        lifetime = body.get("expires_in_seconds")
        if lifetime is None:
            lifetime = DEFAULT_TOKEN_LIFETIME
        if (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, int)
            or not MIN_TOKEN_LIFETIME <= lifetime <= MAX_TOKEN_LIFETIME
        ):
            raise param_invalid(
                "expires_in_seconds",
                f"must be a whole number from {MIN_TOKEN_LIFETIME} to {MAX_TOKEN_LIFETIME}",
            )
        return {"object": "token", "jwt": issuer.token_for(found, lifetime=lifetime)}

    # -------------------------------------------------------------- test only
    @test.get("/snapshot")
    def snapshot() -> Any:
        return state.snapshot()

    @test.post("/invitations/<invitation_id>/accept")
    def accept_invitation(invitation_id: str) -> Any:
        body = _body(required=False)
        return state.accept_invitation(
            invitation_id,
            user_id=_str_field(body, "user_id"),
            first_name=_str_field(body, "first_name"),
            last_name=_str_field(body, "last_name"),
        )

    @test.post("/scenario")
    def run_scenario() -> Any:
        body = _body(required=False)
        steps, seed, rate = body.get("steps", 100), body.get("seed", 0), body.get("rate")
        if not isinstance(steps, int) or steps < 0:
            raise param_invalid("steps", "must be a non-negative integer")
        if not isinstance(seed, int):
            raise param_invalid("seed", "must be an integer")
        if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
            raise param_invalid("rate", "must be a positive number of steps per second")
        return Scenario(state, seed=seed).run(steps, rate=rate).as_dict()

    def need_delivery() -> WebhookDelivery:
        if delivery is None:
            raise ClerkError(404, "resource_not_found", "not found", "This emulator delivers no webhooks.")
        return delivery

    @test.get("/deliveries")
    def deliveries() -> Any:
        log = need_delivery().log()
        msg_id = request.args.get("msg_id")
        if msg_id:
            log = [a for a in log if a.msg_id == msg_id]
        limit = _int_arg("limit", 1000)
        return {"data": [a.as_dict() for a in log[-limit:]], "total_count": len(log)}

    @test.get("/dropped")
    def dropped() -> Any:
        messages = need_delivery().dropped()
        return {
            "data": [
                {
                    "seq": m.seq,
                    "msg_id": m.msg_id,
                    "type": m.event_type,
                    "timestamp": m.timestamp,
                    "data": m.data,
                }
                for m in messages
            ],
            "total_count": len(messages),
        }

    @test.post("/faults")
    def add_fault() -> Any:
        fault = _parse_fault(_body())
        faults.add(fault)
        return fault.as_dict()

    @test.get("/faults")
    def list_faults() -> Any:
        armed = faults.armed()
        return {"data": armed, "total_count": len(armed)}

    @test.delete("/faults")
    def clear_faults() -> Any:
        faults.clear()
        return {"data": [], "total_count": 0}

    @test.get("/stats")
    def stats() -> Any:
        result: dict[str, Any] = {"state": state.counts()}
        if delivery is not None:
            result["delivery"] = delivery.stats()
        return result

    @test.post("/settle")
    def settle() -> Any:
        body = _body(required=False)
        timeout = body.get("timeout", 30)
        if not isinstance(timeout, int | float) or timeout < 0:
            raise param_invalid("timeout", "must be a non-negative number of seconds")
        target = need_delivery()
        settled = target.settle(float(timeout))
        return {"settled": settled, "pending": target.pending()}

    app.register_blueprint(v1)
    app.register_blueprint(test)

    return app
