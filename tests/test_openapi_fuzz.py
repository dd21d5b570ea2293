"""The /orgsync/v1 endpoints fuzzed from their OpenAPI document: never a 5xx, every answer as documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine
from test_cli_commands import seed
from test_orgsync_api import TOKEN, make_settings

from api.orgsync import openapi_document
from orgsync.web import create_app, get_state

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def fuzzed_app(tmp_path: Path, sqlite_engine: Engine) -> Iterator[Flask]:
    # The document's examples name organization acme and user_2abc: the commands they make
    # are accepted, so the 202 answers are checked too.
    seed(sqlite_engine)
    sent: list[int] = []
    app = create_app(make_settings(tmp_path, sqlite_engine), engine=sqlite_engine, command_send=sent.extend)
    yield app
    get_state(app).close()


# The packaged document, as served at /orgsync/v1/openapi.json (a test below checks they agree).
schema = schemathesis.openapi.from_dict(openapi_document())
# Data that fits the document and data that does not: both must get a documented answer.
schema.config.generation.update(modes=["positive", "negative"])


def test_the_served_document_is_the_packaged_one(fuzzed_app: Flask) -> None:
    served = fuzzed_app.test_client().get("/orgsync/v1/openapi.json")
    assert served.status_code == 200 and served.get_json() == openapi_document()


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_endpoint_answers_as_documented(case: Any, fuzzed_app: Flask) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS, app=fuzzed_app)
