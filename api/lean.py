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
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

# Registers the "werkzeug.url_quote" codec error handler ``request.args`` parses with.
import werkzeug.urls  # noqa: F401

from api.orgsync import PREFIX, AccessQuestions, HttpError, dumps, failure
from webhooks.intake import StartResponse, WsgiApp, status_line

logger = logging.getLogger(__name__)

PERMISSION_PATH = f"{PREFIX}/permission"
USERS_PREFIX = f"{PREFIX}/users/"
_JSON = ("Content-Type", "application/json")


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
