"""Who is using the console, and the checks every request passes: sign-in, CSRF, permissions.

Two kinds of people sign in:

* operators, with one of ``ORGSYNC_ADMIN_TOKENS`` (compared in constant time, remembered by
  position, never stored or shown): they see and may do everything;
* members of the application, with their Clerk session token (when ``CLERK_JWT_KEY`` is
  configured), verified without a network call: they see only their own organizations, and
  may manage memberships only where the mirror says their role grants
  ``org:sys_memberships:manage``. The page hides what they may not do; every action checks
  again on the server, whatever the page showed.

The sign-in lives in Flask's signed session cookie (HttpOnly, SameSite=Lax, Secure when the
request came over HTTPS), keyed by ``ORGSYNC_SECRET_KEY`` or, without it, by a key derived
from the admin tokens. Every form carries a per-session CSRF token: a POST without it is
answered 400, with a wrong one 403.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Request, request, session
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import BadRequest, Forbidden

from models.errors import ConfigError
from models.settings import Settings

log = logging.getLogger(__name__)

OPERATOR = "operator"
MEMBER = "member"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# The cookie Clerk's frontend keeps the session token in, on the application's own origin.
CLERK_SESSION_COOKIE = "__session"
COOKIE_NAME = "orgsync_console"
# How long a console sign-in lasts before the person signs in again (a member's token again
# proves the Clerk session; what they may do is read from the mirror on every request anyway).
OPERATOR_SESSION_S = 12 * 3600
MEMBER_SESSION_S = 3600
_DERIVATION_LABEL = b"orgsync console session key v1"


@dataclass(frozen=True)
class Principal:
    """The person behind a request: an operator (by token position) or a member (by Clerk user id)."""

    kind: str
    operator: int | None = None
    user_id: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.kind == OPERATOR

    @property
    def requested_by(self) -> str:
        """What commands record as their requester: the token's position, never the token."""
        if self.is_operator:
            return f"console:operator-{self.operator}"
        return f"console:{self.user_id}"

    @property
    def label(self) -> str:
        return f"operator {self.operator}" if self.is_operator else str(self.user_id)


def member_sign_in_enabled(settings: Settings) -> bool:
    return settings.clerk_jwt_key is not None


def console_enabled(settings: Settings) -> bool:
    """Served when someone can sign in: operators with tokens, or members with Clerk sessions."""
    return bool(settings.admin_tokens) or member_sign_in_enabled(settings)


def session_secret(settings: Settings) -> bytes:
    """The key signing the console's cookies: ``ORGSYNC_SECRET_KEY``, else derived from the admin
    tokens (secret themselves, and the same in every process). Rotating the tokens then signs
    everyone out, which is what a rotation is for. Without either, there is nothing secret to
    sign with: ``ConfigError``."""
    if settings.secret_key:
        return settings.secret_key.encode()
    if settings.admin_tokens:
        material = "\n".join(sorted(settings.admin_tokens)).encode()
        return hmac.new(material, _DERIVATION_LABEL, hashlib.sha256).digest()
    raise ConfigError(
        "ORGSYNC_SECRET_KEY is required to sign the console's session cookies when "
        "ORGSYNC_ADMIN_TOKENS is not set (use a long random value)"
    )


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or _is_https(request)


def _is_https(req: Request) -> bool:
    try:
        return req.is_secure
    except RuntimeError:  # outside a request
        return False


def configure_app(app: Flask, settings: Settings, prefix: str) -> None:
    """Session signing and cookie flags for the console's app (one app, one session cookie)."""
    app.secret_key = session_secret(settings)
    app.session_interface = ConsoleSessionInterface()
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH=prefix,
    )


class TokenMatcher:
    """Which admin token (1-based position) a sign-in form carries; every token compared."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._expected = [token.encode() for token in tokens]

    def match(self, given: str) -> int | None:
        candidate = given.strip().encode()
        found: int | None = None
        for position, token in enumerate(self._expected, start=1):
            if hmac.compare_digest(candidate, token) and found is None:
                found = position
        return found


# ------------------------------------------------------------------ the session
def sign_in_operator(position: int) -> None:
    _fresh_session()
    session["kind"] = OPERATOR
    session["operator"] = position
    session["expires"] = int(time.time()) + OPERATOR_SESSION_S


def sign_in_member(user_id: str) -> None:
    _fresh_session()
    session["kind"] = MEMBER
    session["user_id"] = user_id
    session["expires"] = int(time.time()) + MEMBER_SESSION_S


def sign_out() -> None:
    session.clear()


def _fresh_session() -> None:
    # A new CSRF token with every sign-in: one planted before it is worth nothing after.
    session.clear()
    session[CSRF_FIELD] = secrets.token_urlsafe(32)


def current_principal() -> Principal | None:
    """Who the session cookie signs in, or None (absent, expired or malformed)."""
    kind = session.get("kind")
    expires = session.get("expires")
    if not isinstance(expires, int) or expires <= time.time():
        return None
    if kind == OPERATOR and isinstance(session.get("operator"), int):
        return Principal(OPERATOR, operator=int(session["operator"]))
    if kind == MEMBER and isinstance(session.get("user_id"), str):
        return Principal(MEMBER, user_id=str(session["user_id"]))
    return None


def presented_session_token() -> str | None:
    """A Clerk session token the request carries: the ``__session`` cookie or a Bearer header."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer ") :].strip() or None
    cookie = request.cookies.get(CLERK_SESSION_COOKIE)
    return cookie.strip() if cookie and cookie.strip() else None


# --------------------------------------------------------------------- CSRF
def csrf_token() -> str:
    """This session's CSRF token, made on first use (the login form needs one too)."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def check_csrf() -> None:
    """Refuse a state-changing request without the session's CSRF token (400) or with another (403)."""
    given: Any = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not given:
        raise BadRequest("the form has no CSRF token: reload the page and submit it again")
    expected = session.get(CSRF_FIELD)
    if not isinstance(expected, str) or not hmac.compare_digest(str(given).encode(), expected.encode()):
        raise Forbidden("the form's CSRF token does not match this session: reload the page and try again")
