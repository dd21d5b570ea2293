"""The hot read questions of ``/orgsync/v1`` answered before Flask, straight from the WSGI environ.

Applications ask "may U do P in O" (``GET /orgsync/v1/permission``), "U's role in O"
(``GET /orgsync/v1/users/{U}/organizations/{O}``) and "U's organizations"
(``GET /orgsync/v1/users/{U}/organizations``) on their own requests, and the answer usually
comes from the in-memory ``AccessCache``: Flask's request context, routing, ``Request`` and
``Response`` objects then cost about as much as the answer itself. ``ReadMiddleware``
answers plain GETs of those paths from the environ with the same ``AccessQuestions``
methods the Flask views call, in the same bytes, status lines and headers; any other request,
and any of these it does not judge the plain way (a path or query string that is not ASCII,
doubled or trailing slashes), goes to the Flask app. ``webhooks.intake.IntakeMiddleware``
does the same for the webhook route.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import parse_qsl
from wsgiref.types import StartResponse
from wsgiref.types import WSGIApplication as WsgiApp

# Registers the "werkzeug.url_quote" codec error handler ``request.args`` parses with.
import werkzeug.urls  # noqa: F401
from flask import Flask
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from werkzeug.http import HTTP_STATUS_CODES

from api.auth import TokenCheck
from api.blueprint import database_unavailable
from api.orgsync import PREFIX, AccessQuestions, HttpError, dumps, failure
from models import reads, render

logger = logging.getLogger(__name__)

PERMISSION_PATH = f"{PREFIX}/permission"
USERS_PREFIX = f"{PREFIX}/users/"
_JSON = ("Content-Type", "application/json")
ORGANIZATIONS_PREFIX = "/v1/organizations/"
MEMBERSHIPS_SUFFIX = "/memberships"
# What an SDK sends to list an organization's members page by page; any other parameter (a
# filter) goes to the Flask view.
PAGE_PARAMETERS = frozenset(("limit", "offset", "order_by"))


def status_line(status: int) -> str:
    """The WSGI status line werkzeug's ``Response`` sends for ``status`` ("422 UNPROCESSABLE ENTITY")."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'unknown').upper()}"


class _Query:
    """Every value of each query parameter, parsed as werkzeug parses ``request.args``."""

    __slots__ = ("values",)

    def __init__(self, query_string: str) -> None:
        values: dict[str, list[str]] = {}
        if query_string:
            for name, value in parse_qsl(query_string, keep_blank_values=True, errors="werkzeug.url_quote"):
                values.setdefault(name, []).append(value)
        self.values = values

    def __call__(self, name: str) -> list[str]:
        return self.values.get(name, [])


class ReadMiddleware:
    """WSGI middleware answering plain ``GET``s of the ``/orgsync/v1`` read questions itself."""

    def __init__(self, app: WsgiApp, questions: AccessQuestions) -> None:
        self.app = app
        self.questions = questions

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET":
            return self.app(environ, start_response)
        path = environ.get("PATH_INFO")
        if not isinstance(path, str) or not path.startswith(PREFIX) or not path.isascii():
            return self.app(environ, start_response)
        query_string = environ.get("QUERY_STRING", "")
        if not isinstance(query_string, str) or not query_string.isascii():
            return self.app(environ, start_response)
        if path == PERMISSION_PATH:
            parts: list[str] = []
        elif path.startswith(USERS_PREFIX):
            # users/{user_id}/organizations[/{organization}]: no empty part, as Flask routes it.
            parts = path[len(USERS_PREFIX) :].split("/")
            if len(parts) not in (2, 3) or parts[1] != "organizations" or not all(parts):
                return self.app(environ, start_response)
        else:
            return self.app(environ, start_response)
        questions = self.questions
        status = 200
        headers: dict[str, str] = {}
        try:
            questions.authenticate(environ.get("HTTP_AUTHORIZATION"))
            if not parts:
                payload = questions.permission(_Query(query_string))
            elif len(parts) == 2:
                payload = questions.organizations(parts[0])
            else:
                payload = questions.membership(parts[0], parts[2])
        except Exception as exc:
            error = exc if isinstance(exc, HttpError) else failure(exc, "GET", path)
            status, payload, headers = error.status, error.payload(), error.headers
        content = dumps(payload).encode()
        start_response(status_line(status), [_JSON, ("Content-Length", str(len(content))), *headers.items()])
        return [content]


class MembershipPageMiddleware:
    """WSGI middleware answering plain ``GET /v1/organizations/{id}/memberships`` (with
    ``limit``, ``offset`` and ``order_by`` at most: the SDKs' member listing) itself, with the
    ``render.membership_page`` body the ``/v1`` view answers, and the view's 503 when the mirror
    cannot be read. It answers only those: a filter, a missing or unknown token, a value the
    view refuses, an unknown organization or any other error goes to Flask, which answers each
    in Clerk's error shape, as for every ``/v1`` request."""

    def __init__(
        self,
        app: WsgiApp,
        flask_app: Flask,
        tokens: TokenCheck,
        sessions: Callable[[], AbstractContextManager[Session | Connection]],
    ) -> None:
        self.app = app
        self.flask_app = flask_app  # for the context Clerk's error body is built in
        self.tokens = tokens
        self.sessions = sessions

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = self._plain_page(environ)
        if query is None:
            return self.app(environ, start_response)
        try:
            with self.sessions() as session:
                body = render.membership_page(session, query)
        except OperationalError as exc:
            with self.flask_app.app_context():
                unavailable = database_unavailable(exc)
            result: Iterable[bytes] = unavailable(environ, start_response)
            return result
        except Exception:  # the view answers it: a refusal, or a logged 500
            return self.app(environ, start_response)
        if body is None:  # unknown organization: the view's 404
            return self.app(environ, start_response)
        start_response(status_line(200), [_JSON, ("Content-Length", str(len(body)))])
        return [body]

    def _plain_page(self, environ: dict[str, Any]) -> reads.MembershipQuery | None:
        """The page a plain, authenticated request asks for, or None for Flask to answer."""
        path = environ.get("PATH_INFO")
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or not isinstance(path, str)
            or not path.startswith(ORGANIZATIONS_PREFIX)
            or not path.endswith(MEMBERSHIPS_SUFFIX)
            or not path.isascii()
        ):
            return None
        organization = path[len(ORGANIZATIONS_PREFIX) : -len(MEMBERSHIPS_SUFFIX)]
        query_string = environ.get("QUERY_STRING", "")
        if not organization or "/" in organization or not isinstance(query_string, str):
            return None
        if not query_string.isascii() or self.tokens.match(environ.get("HTTP_AUTHORIZATION")) is None:
            return None
        values = _Query(query_string).values
        if not values.keys() <= PAGE_PARAMETERS or any(len(found) != 1 for found in values.values()):
            return None
        try:
            # As ``api.params``: a blank value is the default, surrounding spaces are ignored.
            limit = int(values.get("limit", [""])[0].strip() or 10)
            offset = int(values.get("offset", [""])[0].strip() or 0)
        except ValueError:
            return None
        order_by = values.get("order_by", [""])[0] or None
        return reads.MembershipQuery(organization=organization, limit=limit, offset=offset, order_by=order_by)
