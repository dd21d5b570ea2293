"""The lean read path (``api.lean.ReadMiddleware``) answers exactly as the Flask views do.

Each request is made twice on one app: through the middleware (which must answer it itself,
without Flask), and through the Flask app the middleware wraps. Status line, headers and
body must be identical, for good and bad requests alike.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from test_cli_commands import ORG, seed
from test_orgsync_api import MANAGE, OTHER_TOKEN, TOKEN, make_settings

from api.lean import ReadMiddleware
from models import permissions
from orgsync.web import create_app, get_state

GOOD = f"Bearer {TOKEN}"
TRACE_ID = re.compile(rb'"clerk_trace_id":"[0-9a-f]*"')


@dataclass
class Answered:
    status: str
    headers: dict[str, str]
    body: bytes


class FlaskSpy:
    """The app behind the middleware, counting the requests handed to it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        result: Iterable[bytes] = self.app(environ, start_response)
        return result


@pytest.fixture
def app(tmp_path: Path, sqlite_engine: Engine) -> Iterator[Flask]:
    seed(sqlite_engine)
    app = create_app(make_settings(tmp_path, sqlite_engine), engine=sqlite_engine)
    yield app
    get_state(app).close()


@pytest.fixture
def lean(app: Flask) -> ReadMiddleware:
    middleware = app.wsgi_app
    assert isinstance(middleware, ReadMiddleware), "the read middleware wraps the app"
    return middleware


def environ(
    path: str, query: str = "", authorization: str | None = GOOD, method: str = "GET"
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if authorization is not None:
        env["HTTP_AUTHORIZATION"] = authorization
    return env


def call(app: Any, env: dict[str, Any]) -> Answered:
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], _exc: Any = None) -> None:
        started.append((status, headers))

    body = b"".join(app(dict(env), start_response))
    status, headers = started[0]
    assert len({name.lower() for name, _ in headers}) == len(headers), headers
    return Answered(status, dict(headers), body)


def both(lean: Any, env: dict[str, Any], *, handed_on: bool = False) -> Answered:
    """The middleware's answer, after checking Flask answers the same (but for the random trace
    id of Clerk's error bodies) and who answered."""
    spy = FlaskSpy(lean.app)
    lean.app = spy
    try:
        fast = call(lean, env)
    finally:
        lean.app = spy.app
    assert spy.calls == (1 if handed_on else 0), "handed to Flask" if spy.calls else "answered before Flask"
    assert untraced(fast) == untraced(call(lean.app, env))
    return fast


def untraced(answer: Answered) -> Answered:
    """The answer with the random ``clerk_trace_id`` of Clerk's error bodies blanked."""
    return Answered(answer.status, answer.headers, TRACE_ID.sub(b'"clerk_trace_id":""', answer.body))


def permission_query(user: str = "user_alice", org: str = "acme", permission: str = MANAGE) -> str:
    return f"user_id={user}&organization={org}&permission={permission}"


PERMISSION = "/orgsync/v1/permission"


@pytest.mark.parametrize(
    "query",
    [
        permission_query(),
        permission_query(org=ORG),
        permission_query("user_bob"),
        permission_query("user_bob", permission="org:sys_memberships:read"),
        permission_query("user_bob", "nowhere"),
        permission_query("user_nobody"),
        permission_query("%20user_alice%20"),  # surrounding blanks are trimmed
        permission_query() + "&extra=1",
        "permission=org%3Asys_memberships%3Amanage&organization=acme&user_id=user_alice",
        "user_id=user_alice&organization=acme",  # missing
        "",
        "user_id=&organization=acme&permission=x",  # empty
        "user_id=%20&organization=acme&permission=x",  # blank
        "user_id=a&user_id=b&organization=acme&permission=x",  # repeated
        permission_query("u" * 65),  # too long
        permission_query(org="o" * 257),
        permission_query(permission="p" * 129),
        permission_query("user%01alice"),  # control character
        permission_query("user%FFalice"),  # not UTF-8
        permission_query("user_%C3%A9"),  # UTF-8, percent-encoded
        "user_id=user_alice;organization=acme",
        "&&user_id=user_alice&organization=acme&permission=x&",
        "user_id",
    ],
)
def test_permission_check_answers_as_flask(lean: ReadMiddleware, query: str) -> None:
    both(lean, environ(PERMISSION, query))


def test_permission_check_payloads(lean: ReadMiddleware) -> None:
    allowed = both(lean, environ(PERMISSION, permission_query()))
    assert allowed.status == "200 OK"
    assert allowed.headers == {"Content-Type": "application/json", "Content-Length": str(len(allowed.body))}
    assert allowed.body == (
        b'{"allowed":true,"user_id":"user_alice","organization_id":"org_2cmdACME",'
        b'"permission":"org:sys_memberships:manage","role":"org:admin"}'
    )
    missing = both(lean, environ(PERMISSION, "user_id=user_alice&organization=acme"))
    assert missing.status == "422 UNPROCESSABLE ENTITY"
    assert missing.body == (
        b'{"error":"invalid_field","message":"permission is required","field":"permission"}'
    )


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        GOOD.lower(),
        f"Bearer {TOKEN}x",
        f"Bearer  {TOKEN}",
        TOKEN,
        f"Bearer {OTHER_TOKEN}",
        "Bearer \xe9",
    ],
)
def test_tokens_are_checked_as_flask_checks_them(lean: ReadMiddleware, authorization: str | None) -> None:
    for path in (PERMISSION, "/orgsync/v1/users/user_alice/organizations/acme"):
        answer = both(lean, environ(path, permission_query(), authorization))
        assert answer.status.startswith("200" if authorization == f"Bearer {OTHER_TOKEN}" else "401")


@pytest.mark.parametrize(
    "path",
    [
        "/orgsync/v1/users/user_alice/organizations/acme",
        f"/orgsync/v1/users/user_alice/organizations/{ORG}",
        "/orgsync/v1/users/user_alice/organizations/globex",  # not a member: 404
        "/orgsync/v1/users/user_alice/organizations/nowhere",
        "/orgsync/v1/users/user_zed/organizations",
        "/orgsync/v1/users/user_alice/organizations",
        "/orgsync/v1/users/user_nobody/organizations",
        "/orgsync/v1/users/%s/organizations" % ("u" * 65),
        "/orgsync/v1/users/user_alice/organizations/%s" % ("o" * 257),
        "/orgsync/v1/users/user\x01alice/organizations",
        "/orgsync/v1/users/ /organizations/acme",
    ],
)
def test_user_questions_answer_as_flask(lean: ReadMiddleware, path: str) -> None:
    both(lean, environ(path))


@pytest.mark.parametrize(
    ("path", "query", "method"),
    [
        (PERMISSION, permission_query(), "HEAD"),
        (PERMISSION, permission_query(), "POST"),
        (PERMISSION + "/", permission_query(), "GET"),
        (PERMISSION, "user_id=user_\xe9&organization=acme&permission=x", "GET"),  # raw bytes
        ("/orgsync/v1/users/user_\xc3\xa9/organizations", "", "GET"),
        ("/orgsync/v1/users//organizations", "", "GET"),
        ("/orgsync/v1/users/user_alice/organizations/", "", "GET"),
        ("/orgsync/v1/users/user_alice/organizations/acme/x", "", "GET"),
        ("/orgsync/v1/users/user_alice/memberships", "", "GET"),
        ("/orgsync/v1/commands/1", "", "GET"),
        ("/orgsync/v1/openapi.json", "", "GET"),
        ("/orgsync/v1/nothing", "", "GET"),
    ],
)
def test_other_requests_go_to_flask(lean: ReadMiddleware, path: str, query: str, method: str) -> None:
    both(lean, environ(path, query, method=method), handed_on=True)


def _down(*_args: Any) -> Any:
    raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))


def test_database_unavailable_is_the_same_503(lean: ReadMiddleware, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(permissions, "mirror_generation", _down)
    monkeypatch.setattr(permissions, "access_of", _down)
    monkeypatch.setattr(permissions, "organizations_of", _down)
    for env in (
        environ(PERMISSION, permission_query("user_new")),
        environ("/orgsync/v1/users/user_new/organizations/acme"),
        environ("/orgsync/v1/users/user_alice/organizations"),
    ):
        answer = both(lean, env)
        assert answer.status == "503 SERVICE UNAVAILABLE" and answer.headers["Retry-After"] == "5"
        assert answer.body == (
            b'{"error":"database_unavailable","message":"the database cannot be reached right now"}'
        )


def test_an_unexpected_error_is_the_same_500_and_logged(
    lean: ReadMiddleware, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_session: Session, _user_id: str) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(permissions, "organizations_of", broken)
    with caplog.at_level(logging.ERROR, logger="api.orgsync"):
        answer = both(lean, environ("/orgsync/v1/users/user_alice/organizations"))
    assert answer.status == "500 INTERNAL SERVER ERROR"
    assert answer.body == b'{"error":"internal_error","message":"internal server error"}'
    logged = [r for r in caplog.records if "unexpected error in GET" in r.getMessage()]
    assert len(logged) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in logged)


def test_webhooks_pass_through(lean: ReadMiddleware) -> None:
    answer = both(lean, environ("/webhooks/clerk", method="POST", authorization=None), handed_on=True)
    assert answer.status.startswith("400")
