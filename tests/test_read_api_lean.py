"""The lean page path (``api.lean.MembershipPageMiddleware``) answers exactly as the ``/v1`` view.

Each request is made twice on one app: through the middleware, and through the Flask app it
wraps. Status line, headers and body must be identical; the middleware answers plain pages
itself and hands everything else (filters, refusals, unknown organizations, bad tokens) on.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import test_read_api
from flask import Flask
from read_world import TOKEN, World
from sqlalchemy.exc import OperationalError
from test_orgsync_api_lean import FlaskSpy, both, call, environ

from api.lean import MembershipPageMiddleware
from models import render

GOOD = f"Bearer {TOKEN}"
# The read API's world and app, as its own tests have them.
world = test_read_api.world
app = test_read_api.app


@pytest.fixture
def pages(app: Flask) -> MembershipPageMiddleware:
    layer: Any = app.wsgi_app
    while not isinstance(layer, MembershipPageMiddleware):
        layer = layer.app  # the middlewares each wrap the next one as ``app``
    return layer


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
