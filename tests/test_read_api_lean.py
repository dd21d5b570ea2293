"""The lean page path (``api.lean.MembershipPageMiddleware``) answers exactly as the ``/v1`` view.

Each request is made twice on one app: through the middleware, and through the Flask app it
wraps. Status line, headers and body must be identical; the middleware answers plain pages
itself and hands everything else (filters, refusals, unknown organizations, bad tokens) on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from read_world import OTHER_TOKEN, TOKEN, World, build_world, mirror
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from test_orgsync_api_lean import Answered, FlaskSpy, call, environ
from test_read_api import make_settings

from api.lean import MembershipPageMiddleware
from models import render
from orgsync.web import create_app, get_state

GOOD = f"Bearer {TOKEN}"
TRACE_ID = re.compile(rb'"clerk_trace_id":"[0-9a-f]*"')


@pytest.fixture
def world(engine: Engine) -> World:
    built = build_world()
    mirror(built, engine)
    return built


@pytest.fixture
def app(tmp_path: Path, engine: Engine, world: World) -> Iterator[Flask]:
    app = create_app(make_settings(tmp_path, engine, (OTHER_TOKEN, TOKEN)), engine=engine)
    yield app
    get_state(app).close()


@pytest.fixture
def pages(app: Flask) -> MembershipPageMiddleware:
    layer: Any = app.wsgi_app
    while not isinstance(layer, MembershipPageMiddleware):
        layer = layer.app  # the middlewares each wrap the next one as ``app``
    return layer


def both(pages: MembershipPageMiddleware, env: dict[str, Any], *, handed_on: bool) -> Answered:
    """The middleware's answer, after checking Flask answers the same and who answered."""
    spy = FlaskSpy(pages.app)
    pages.app = spy
    try:
        fast = call(pages, env)
    finally:
        pages.app = spy.app
    assert spy.calls == (1 if handed_on else 0), "handed to Flask" if spy.calls else "answered before Flask"
    assert untraced(fast) == untraced(call(pages.app, env))
    return fast


def untraced(answer: Answered) -> Answered:
    """The answer with the random ``clerk_trace_id`` of Clerk's error bodies blanked."""
    return Answered(answer.status, answer.headers, TRACE_ID.sub(b'"clerk_trace_id":""', answer.body))


def members(org: str) -> str:
    return f"/v1/organizations/{org}/memberships"


@pytest.mark.parametrize(
    "query",
    [
        "",
        "limit=2",
        "limit=2&offset=1",
        "limit=%202%20&offset=",  # surrounding blanks, a blank value: the defaults
        "limit=500&offset=0&order_by=-created_at",
        "order_by=%2Bemail_address",
        "order_by=-first_name&limit=3",
        "offset=400",  # past the end: an empty page with the total
    ],
)
def test_a_plain_page_is_answered_before_flask_as_flask_answers_it(
    pages: MembershipPageMiddleware, world: World, query: str
) -> None:
    for org in ("acme", world.orgs["acme"]):  # by slug and by id
        answer = both(pages, environ(members(org), query, GOOD), handed_on=False)
        assert answer.status == "200 OK"
        assert answer.headers == {"Content-Type": "application/json", "Content-Length": str(len(answer.body))}
        assert set(json.loads(answer.body)) == {"data", "total_count"}


@pytest.mark.parametrize(
    ("path", "query", "authorization", "status"),
    [
        (members("acme"), "role=org:admin", GOOD, "200"),  # a filter: the view's
        (members("acme"), "limit=1&limit=2", GOOD, "200"),  # repeated
        (members("acme"), "limit=ten", GOOD, "422"),
        (members("acme"), "limit=0", GOOD, "422"),
        (members("acme"), "offset=-1", GOOD, "422"),
        (members("acme"), "order_by=size", GOOD, "422"),
        (members("nowhere"), "", GOOD, "404"),
        (members("acme"), "", None, "401"),
        (members("acme"), "", f"Bearer {TOKEN}x", "401"),
        (members("acme") + "/", "", GOOD, "404"),
        ("/v1/organizations//memberships", "", GOOD, "404"),
        ("/v1/organizations/a/b/memberships", "", GOOD, "404"),
        (members("acm%C3%A9"), "", GOOD, "404"),
    ],
)
def test_everything_else_is_handed_to_flask(
    pages: MembershipPageMiddleware, path: str, query: str, authorization: str | None, status: str
) -> None:
    answer = both(pages, environ(path, query, authorization), handed_on=True)
    assert answer.status.startswith(status), answer


def test_other_methods_are_handed_to_flask(pages: MembershipPageMiddleware) -> None:
    both(pages, environ(members("acme"), authorization=GOOD, method="POST"), handed_on=True)


def test_a_mirror_that_cannot_be_read_is_the_views_503(
    pages: MembershipPageMiddleware, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*_args: Any, **_kwargs: Any) -> bytes:
        raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr(render, "membership_page", unreachable)
    spy = FlaskSpy(pages.app)
    pages.app = spy
    try:
        fast = call(pages, environ(members("acme"), authorization=GOOD))
    finally:
        pages.app = spy.app
    assert spy.calls == 0
    slow = call(pages.app, environ(members("acme"), authorization=GOOD))
    assert fast.status == slow.status == "503 SERVICE UNAVAILABLE"
    assert fast.headers == slow.headers and fast.headers["Retry-After"] == "5"
    for answer in (fast, slow):
        body = json.loads(answer.body)
        assert body["errors"][0]["code"] == "service_unavailable"
