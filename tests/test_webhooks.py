"""The webhook endpoint: every refusal with its reason, durable acceptance, probes, a real server."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import http.client
import io
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from flask import Flask
from flask.testing import FlaskClient
from helpers import new_msg_id, signed_headers
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from emulator.payloads import webhook_body
from models.db import create_db_engine, make_session_factory
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus
from orgsync.web import create_app, get_state
from worker.apply import apply_inbox

PATH = "/webhooks/clerk"
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-secret-for-the-rotation!").decode()
BODY = webhook_body(
    "organizationMembership.created",
    {"object": "organization_membership", "id": "orgmem_1", "role": "org:admin"},
    1_700_000_000_000,
)


class Sent:
    """A ``send`` that records the ids it was given, optionally failing like a dead broker."""

    def __init__(self, *, fail: bool = False) -> None:
        self.ids: list[int] = []
        self.fail = fail

    def __call__(self, ids: list[int]) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.ids.extend(ids)


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, signing_secret: str) -> Settings:
    return Settings(
        database_url=sqlite_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=(signing_secret,),
    )


@pytest.fixture
def sent() -> Sent:
    return Sent()


def build(settings: Settings, engine: Engine, **kwargs: Any) -> Iterator[Flask]:
    app = create_app(settings, engine=engine, **kwargs)
    yield app
    get_state(app).close()


@pytest.fixture
def app(settings: Settings, sqlite_engine: Engine, sent: Sent) -> Iterator[Flask]:
    yield from build(settings, sqlite_engine, send=sent, broker_check=lambda: None)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post(client: FlaskClient, body: bytes | str, headers: dict[str, str], **kwargs: Any) -> TestResponse:
    return client.post(PATH, data=body, headers=headers, **kwargs)


def inbox(engine: Engine) -> list[InboxEvent]:
    with Session(engine) as session:
        return list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


def assert_refused(response: TestResponse, status: int, code: str, engine: Engine) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    payload = response.get_json()
    assert payload["error"] == code
    assert payload["message"]
    assert inbox(engine) == []


def sign_bytes(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """A v1 signature over raw bytes, for bodies the svix signer cannot take (non-UTF-8)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# ---------------------------------------------------------------- refusals: one reason each


@pytest.mark.parametrize("name", ["id", "timestamp", "signature"])
def test_missing_header(client: FlaskClient, sqlite_engine: Engine, signing_secret: str, name: str) -> None:
    headers = signed_headers(signing_secret, BODY)
    del headers[f"svix-{name}"]
    response = post(client, BODY, headers)
    assert_refused(response, 400, "missing_headers", sqlite_engine)
    assert f"svix-{name}" in response.get_json()["message"]


def test_empty_header_counts_as_missing(
    client: FlaskClient, sqlite_engine: Engine, signing_secret: str
) -> None:
    headers = signed_headers(signing_secret, BODY)
    headers["svix-id"] = ""
    assert_refused(post(client, BODY, headers), 400, "missing_headers", sqlite_engine)


def test_signature_entry_without_comma(
    client: FlaskClient, sqlite_engine: Engine, signing_secret: str
) -> None:
    headers = signed_headers(signing_secret, BODY)
    headers["svix-signature"] = headers["svix-signature"].replace(",", "")
    assert_refused(post(client, BODY, headers), 400, "malformed_signature", sqlite_engine)


def test_signature_entry_not_base64(client: FlaskClient, sqlite_engine: Engine, signing_secret: str) -> None:
    headers = signed_headers(signing_secret, BODY)
    headers["svix-signature"] = "v1,abc"
    assert_refused(post(client, BODY, headers), 400, "malformed_signature", sqlite_engine)


@pytest.mark.parametrize("value", ["12.5", "soon", "1e9"])
def test_non_integer_timestamp(
    client: FlaskClient, sqlite_engine: Engine, signing_secret: str, value: str
) -> None:
    headers = signed_headers(signing_secret, BODY)
    headers["svix-timestamp"] = value
    assert_refused(post(client, BODY, headers), 400, "invalid_timestamp", sqlite_engine)


def test_stale_timestamp(client: FlaskClient, sqlite_engine: Engine, signing_secret: str) -> None:
    when = datetime.now(tz=UTC) - timedelta(minutes=6)
    headers = signed_headers(signing_secret, BODY, timestamp=when)
    assert_refused(post(client, BODY, headers), 400, "stale_timestamp", sqlite_engine)


def test_future_timestamp(client: FlaskClient, sqlite_engine: Engine, signing_secret: str) -> None:
    when = datetime.now(tz=UTC) + timedelta(minutes=6)
    headers = signed_headers(signing_secret, BODY, timestamp=when)
    assert_refused(post(client, BODY, headers), 400, "future_timestamp", sqlite_engine)


def test_wrong_signature(client: FlaskClient, sqlite_engine: Engine, signing_secret: str) -> None:
    headers = signed_headers(signing_secret, BODY.replace("org:admin", "org:member"))
    assert_refused(post(client, BODY, headers), 400, "invalid_signature", sqlite_engine)


def test_wrong_secret(client: FlaskClient, sqlite_engine: Engine) -> None:
    headers = signed_headers(OTHER_SECRET, BODY)
    assert_refused(post(client, BODY, headers), 400, "invalid_signature", sqlite_engine)


def test_non_utf8_body(client: FlaskClient, sqlite_engine: Engine, signing_secret: str) -> None:
    body = b'{"type": "user.created", "name": "\xff\xfe"}'
    msg_id = new_msg_id()
    timestamp = int(datetime.now(tz=UTC).timestamp())
    headers = {
        "svix-id": msg_id,
        "svix-timestamp": str(timestamp),
        # Correctly signed bytes: the refusal is about the encoding, not the signature.
        "svix-signature": sign_bytes(signing_secret, msg_id, timestamp, body),
    }
    assert_refused(post(client, body, headers), 400, "invalid_encoding", sqlite_engine)


def test_overlong_svix_id(client: FlaskClient, sqlite_engine: Engine, signing_secret: str) -> None:
    headers = signed_headers(signing_secret, BODY, msg_id="msg_" + "x" * 200)
    assert_refused(post(client, BODY, headers), 400, "invalid_id", sqlite_engine)


@pytest.fixture
def small_client(settings: Settings, sqlite_engine: Engine) -> Iterator[FlaskClient]:
    for app in build(dataclasses.replace(settings, max_body_bytes=1024), sqlite_engine):
        yield app.test_client()


def padded(size: int) -> str:
    base = json.loads(BODY)
    base["data"]["padding"] = ""
    filler = size - len(json.dumps(base))
    base["data"]["padding"] = "x" * filler
    text = json.dumps(base)
    assert len(text) == size
    return text


def test_oversize_by_content_length(
    small_client: FlaskClient, sqlite_engine: Engine, signing_secret: str
) -> None:
    body = padded(1025)
    response = post(small_client, body, signed_headers(signing_secret, body))
    assert_refused(response, 413, "payload_too_large", sqlite_engine)


def test_oversize_by_actual_body(
    small_client: FlaskClient, sqlite_engine: Engine, signing_secret: str
) -> None:
    # A chunked body announces no length: the limit must hold while reading.
    body = padded(1025).encode()
    headers = {**signed_headers(signing_secret, body), "Transfer-Encoding": "chunked"}
    response = small_client.post(
        PATH,
        input_stream=io.BytesIO(body),
        headers=headers,
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_refused(response, 413, "payload_too_large", sqlite_engine)


def test_body_at_the_limit_is_accepted(
    small_client: FlaskClient, sqlite_engine: Engine, signing_secret: str
) -> None:
    body = padded(1024)
    headers = {**signed_headers(signing_secret, body), "Transfer-Encoding": "chunked"}
    response = small_client.post(
        PATH,
        input_stream=io.BytesIO(body.encode()),
        headers=headers,
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 200
    assert [row.body for row in inbox(sqlite_engine)] == [body]


# ---------------------------------------------------------------- acceptance


@pytest.mark.parametrize("prefix", ["svix", "webhook"])
def test_accepted_and_handed_to_the_broker(
    client: FlaskClient, signing_secret: str, sent: Sent, prefix: str
) -> None:
    headers = signed_headers(signing_secret, BODY, msg_id="msg_accept", prefix=prefix)
    response = post(client, BODY, headers)
    assert response.status_code == 200
    payload = response.get_json()
    assert payload["status"] == "accepted"
    [row] = inbox(get_state(client.application).engine)
    assert payload["id"] == row.id
    assert (row.svix_id, row.status, row.body) == ("msg_accept", InboxStatus.PENDING, BODY)
    assert row.event_type == "organizationMembership.created"
    dispatcher = get_state(client.application).dispatcher
    assert dispatcher is not None and dispatcher.flush()
    assert sent.ids == [row.id]


def test_rotation_accepts_a_body_signed_by_the_second_secret(
    settings: Settings, sqlite_engine: Engine, signing_secret: str
) -> None:
    rotated = dataclasses.replace(settings, webhook_secrets=(signing_secret, OTHER_SECRET))
    for app in build(rotated, sqlite_engine):
        response = post(app.test_client(), BODY, signed_headers(OTHER_SECRET, BODY))
        assert response.status_code == 200
        assert len(inbox(sqlite_engine)) == 1


def test_duplicate_svix_id_is_stored_and_sent_once(
    app: Flask, client: FlaskClient, sqlite_engine: Engine, signing_secret: str, sent: Sent
) -> None:
    first = post(client, BODY, signed_headers(signing_secret, BODY, msg_id="msg_twice"))
    second = post(client, BODY, signed_headers(signing_secret, BODY, msg_id="msg_twice"))
    assert first.status_code == second.status_code == 200
    assert second.get_json()["status"] == "duplicate"
    assert second.get_json()["id"] == first.get_json()["id"]
    assert len(inbox(sqlite_engine)) == 1
    dispatcher = get_state(app).dispatcher
    assert dispatcher is not None and dispatcher.flush()
    assert sent.ids == [first.get_json()["id"]]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("this is not json", "not_json"),
        ('{"type": "user.created", "object": "user", "data": {}}', "not_an_event"),
        ("[1, 2, 3]", "not_an_object"),
    ],
)
def test_verified_garbage_is_stored_rejected_and_acknowledged(
    client: FlaskClient, signing_secret: str, sent: Sent, body: str, reason: str
) -> None:
    response = post(client, body, signed_headers(signing_secret, body))
    assert response.status_code == 200
    payload = response.get_json()
    assert payload["status"] == "rejected"
    assert payload["reason"].startswith(reason)
    [row] = inbox(get_state(client.application).engine)
    assert row.status == InboxStatus.REJECTED
    assert row.last_error is not None and row.last_error.startswith(reason)
    dispatcher = get_state(client.application).dispatcher
    assert dispatcher is not None and dispatcher.flush()
    assert sent.ids == []


def test_unknown_type_is_stored_ignored_and_acknowledged(
    client: FlaskClient, sqlite_engine: Engine, signing_secret: str, sent: Sent
) -> None:
    body = webhook_body("session.created", {"id": "sess_1"}, 1_700_000_000_000)
    response = post(client, body, signed_headers(signing_secret, body))
    assert response.status_code == 200
    assert response.get_json()["status"] == "ignored"
    [row] = inbox(sqlite_engine)
    assert (row.status, row.event_type) == (InboxStatus.IGNORED, "session.created")
    assert sent.ids == []


def test_without_send_the_app_only_stores(
    settings: Settings, sqlite_engine: Engine, signing_secret: str
) -> None:
    for app in build(settings, sqlite_engine):
        assert get_state(app).dispatcher is None
        response = post(app.test_client(), BODY, signed_headers(signing_secret, BODY))
        assert response.status_code == 200
        assert [row.status for row in inbox(sqlite_engine)] == [InboxStatus.PENDING]


def test_broker_down_still_acknowledges_and_leaves_the_row_pending(
    settings: Settings, sqlite_engine: Engine, signing_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    for app in build(settings, sqlite_engine, send=Sent(fail=True)):
        with caplog.at_level(logging.WARNING, logger="webhooks.dispatch"):
            response = post(app.test_client(), BODY, signed_headers(signing_secret, BODY))
            dispatcher = get_state(app).dispatcher
            assert dispatcher is not None and dispatcher.flush()
        assert response.status_code == 200
        assert [row.status for row in inbox(sqlite_engine)] == [InboxStatus.PENDING]
        assert any("broker unavailable" in record.getMessage() for record in caplog.records)


def test_the_app_builds_its_own_engine(settings: Settings, signing_secret: str) -> None:
    for app in build_owned(settings):
        state = get_state(app)
        assert state.owns_engine
        assert str(state.engine.url) == settings.database_url
        response = post(app.test_client(), BODY, signed_headers(signing_secret, BODY))
        assert response.status_code == 200
        assert len(inbox(state.engine)) == 1


def build_owned(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    get_state(app).close()


def test_accepted_and_duplicate_on_both_databases(
    settings: Settings, engine: Engine, signing_secret: str, sent: Sent
) -> None:
    for app in build(settings, engine, send=sent):
        client = app.test_client()
        headers = signed_headers(signing_secret, BODY, msg_id="msg_both")
        assert post(client, BODY, headers).get_json()["status"] == "accepted"
        assert post(client, BODY, headers).get_json()["status"] == "duplicate"
        garbage = "{not json"
        assert (
            post(client, garbage, signed_headers(signing_secret, garbage)).get_json()["status"] == "rejected"
        )
        rows = inbox(engine)
        assert rows[0].svix_id == "msg_both"
        assert [row.status for row in rows] == [InboxStatus.PENDING, InboxStatus.REJECTED]
        dispatcher = get_state(app).dispatcher
        assert dispatcher is not None and dispatcher.flush()
        assert sent.ids == [rows[0].id]


# ------------------------------------------------- content the database cannot hold


def organization_body(**changes: Any) -> str:
    data = {"object": "organization", "id": "org_1", "name": "Acme", "slug": "acme", "created_at": 1}
    data.update(changes)
    return webhook_body("organization.created", data, 1_700_000_000_000)


UNSTORABLE = [
    (organization_body(name="Acme\x00"), "organizations.name contains a NUL character"),
    (organization_body(public_metadata={"note": "a\x00b"}), "organizations.public_metadata holds a string"),
    (organization_body(id="org_" + "9" * 100), "organizations.id is longer than 64 characters"),
    (organization_body(created_at=2**64), "data.created_at is not a time in milliseconds"),
    (organization_body(members_count=2**40), "organizations.members_count is outside the signed 32-bit"),
    (organization_body().replace('"created_at": 1', '"created_at": 1e400'), "data.created_at is inf"),
    (organization_body(updated_at=float("nan")), "data.updated_at is nan"),
    (organization_body().replace("1700000000000", "Infinity"), "timestamp is not a finite number"),
    (organization_body().replace("1700000000000", "NaN"), "timestamp is not a finite number"),
    (
        webhook_body("role.created", {"id": "role_1", "key": "org:" + "k" * 200}, 1_700_000_000_000),
        "roles.key is longer than 128 characters",
    ),
]


def test_content_the_database_cannot_hold_is_acknowledged_then_rejected_not_retried(
    settings: Settings, engine: Engine, signing_secret: str, sent: Sent
) -> None:
    for app in build(settings, engine, send=sent):
        client = app.test_client()
        for body, _reason in UNSTORABLE:
            response = post(client, body, signed_headers(signing_secret, body))
            assert response.status_code == 200, response.get_data(as_text=True)
        # The worker's path: even a single attempt allowed ends in rejected, never dead.
        ids = [row.id for row in inbox(engine)]
        report = apply_inbox(make_session_factory(engine), ids, now_ms=1, max_attempts=1)
        assert (report.rejected, report.applied, report.dead, report.failed) == (len(UNSTORABLE), 0, 0, 0)
        rows = inbox(engine)
        for row, (body, reason) in zip(rows, UNSTORABLE, strict=True):
            assert (row.status, row.attempts) == (InboxStatus.REJECTED, 0)
            assert row.last_error is not None and row.last_error.startswith(reason), row.last_error
            assert "\x00" not in row.last_error
            # The raw body is kept as received, escapes and all, for the operator to read.
            assert row.body == body


def test_a_type_the_inbox_cannot_hold_is_rejected_at_intake(
    settings: Settings, engine: Engine, signing_secret: str, sent: Sent
) -> None:
    for app in build(settings, engine, send=sent):
        client = app.test_client()
        for event_type in ("organization.created\x00", "\ud800"):
            body = json.dumps({"type": event_type, "object": "event", "data": {}, "timestamp": 1})
            response = post(client, body, signed_headers(signing_secret, body))
            assert response.status_code == 200
            assert response.get_json()["status"] == "rejected"
            assert response.get_json()["reason"].startswith("not_an_event: 'type' holds a NUL")
        assert [(row.status, row.event_type) for row in inbox(engine)] == [(InboxStatus.REJECTED, None)] * 2
        dispatcher = get_state(app).dispatcher
        assert dispatcher is not None and dispatcher.flush()
        assert sent.ids == []


# ---------------------------------------------------------------- database down


@pytest.fixture(params=["postgres-closed-port", "sqlite-unopenable"])
def dead_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgres-closed-port":
        engine = create_db_engine("postgresql+psycopg://orgsync@127.0.0.1:1/orgsync?connect_timeout=2")
    else:
        # A directory where the database file should be: SQLite cannot open it.
        (tmp_path / "db-is-a-directory").mkdir()
        engine = create_db_engine(f"sqlite:///{tmp_path / 'db-is-a-directory'}")
    yield engine
    engine.dispose()


def test_database_down_answers_503_and_acknowledges_nothing(
    settings: Settings, dead_engine: Engine, signing_secret: str, sent: Sent
) -> None:
    for app in build(settings, dead_engine, send=sent):
        response = post(app.test_client(), BODY, signed_headers(signing_secret, BODY))
        assert response.status_code == 503
        assert response.get_json()["error"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        dispatcher = get_state(app).dispatcher
        assert dispatcher is not None and dispatcher.flush()
        assert sent.ids == []


# ---------------------------------------------------------------- probes and errors


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_ok(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_without_a_broker_check(settings: Settings, sqlite_engine: Engine) -> None:
    for app in build(settings, sqlite_engine):
        response = app.test_client().get("/readyz")
        assert response.status_code == 200
        assert response.get_json()["checks"] == {"database": "ok", "broker": "not checked"}


def test_readyz_database_down(settings: Settings, dead_engine: Engine) -> None:
    for app in build(settings, dead_engine, broker_check=lambda: None):
        response = app.test_client().get("/readyz")
        assert response.status_code == 503
        payload = response.get_json()
        assert payload["failed"] == ["database"]
        assert payload["checks"]["broker"] == "ok"


def test_readyz_broker_down(settings: Settings, sqlite_engine: Engine) -> None:
    def broker_check() -> None:
        raise ConnectionError("redis://:hunter2@127.0.0.1:6379 refused")

    for app in build(settings, sqlite_engine, broker_check=broker_check):
        response = app.test_client().get("/readyz")
        assert response.status_code == 503
        payload = response.get_json()
        assert payload["failed"] == ["broker"]
        assert payload["checks"]["database"] == "ok"
        assert "hunter2" not in response.get_data(as_text=True)


def test_unknown_path_is_a_json_404(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize(("method", "path"), [("GET", PATH), ("PUT", PATH), ("POST", "/healthz")])
def test_wrong_method_is_a_json_405(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert "Allow" in response.headers


def test_unexpected_error_is_a_json_500_without_internals(
    client: FlaskClient,
    signing_secret: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("internal detail")

    monkeypatch.setattr("webhooks.committer.store_row", explode)
    with caplog.at_level(logging.ERROR, logger="webhooks.app"):
        response = post(client, BODY, signed_headers(signing_secret, BODY))
    assert response.status_code == 500
    assert response.get_json()["error"] == "internal_error"
    assert "internal detail" not in response.get_data(as_text=True)
    assert any(record.exc_info for record in caplog.records)


def test_no_secret_in_responses_or_logs(
    client: FlaskClient, signing_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret_body = signing_secret.removeprefix("whsec_")
    stale = datetime.now(tz=UTC) - timedelta(minutes=10)
    requests = [
        signed_headers(signing_secret, BODY),
        signed_headers(signing_secret, BODY, timestamp=stale),
        signed_headers(OTHER_SECRET, BODY),
        {"svix-id": "msg_x", "svix-timestamp": "nope", "svix-signature": "v1,x"},
        {"svix-id": "msg_y", "svix-timestamp": "1", "svix-signature": "garbage"},
        {},
    ]
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for headers in requests:
            texts.append(post(client, BODY, headers).get_data(as_text=True))
        texts.append(client.get("/readyz").get_data(as_text=True))
    texts.extend(record.getMessage() for record in caplog.records)
    assert any("webhook refused" in text for text in texts)
    for text in texts:
        assert signing_secret not in text
        assert secret_body not in text


def test_app_without_secrets_refuses_to_start(settings: Settings, sqlite_engine: Engine) -> None:
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="signing secret"):
        create_app(dataclasses.replace(settings, webhook_secrets=()), engine=sqlite_engine)


# ---------------------------------------------------------------- a real server


@pytest.fixture
def server(settings: Settings, sqlite_engine: Engine, sent: Sent) -> Iterator[tuple[int, Flask]]:
    limited = dataclasses.replace(settings, max_body_bytes=64 * 1024)
    for app in build(limited, sqlite_engine, send=sent, broker_check=lambda: None):
        port = free_port()
        httpd = make_server("127.0.0.1", port, app, threaded=True)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield port, app
        finally:
            httpd.shutdown()
            thread.join(10)
            httpd.server_close()


def http_post(port: int, body: bytes, headers: dict[str, str], *, chunked: bool = False) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if chunked:
            connection.request(
                "POST",
                PATH,
                body=iter([body[: len(body) // 2], body[len(body) // 2 :]]),
                headers=headers,
                encode_chunked=True,
            )
        else:
            connection.request("POST", PATH, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_real_server_over_http(
    server: tuple[int, Flask], sqlite_engine: Engine, signing_secret: str, sent: Sent
) -> None:
    port, app = server
    statuses: list[int] = []
    errors: list[BaseException] = []

    def deliver(count: int) -> None:
        try:
            for _ in range(count):
                status, _payload = http_post(port, BODY.encode(), signed_headers(signing_secret, BODY))
                statuses.append(status)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(10,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert statuses == [200] * 40

    dup_headers = signed_headers(signing_secret, BODY, msg_id="msg_http_dup")
    assert http_post(port, BODY.encode(), dup_headers)[1]["status"] == "accepted"
    assert http_post(port, BODY.encode(), dup_headers)[1]["status"] == "duplicate"

    status, payload = http_post(port, BODY.encode(), signed_headers(OTHER_SECRET, BODY))
    assert (status, payload["error"]) == (400, "invalid_signature")

    big = ("x" * (64 * 1024 + 1)).encode()
    status, payload = http_post(port, big, signed_headers(signing_secret, big))
    assert (status, payload["error"]) == (413, "payload_too_large")
    status, payload = http_post(port, big, signed_headers(signing_secret, big), chunked=True)
    assert (status, payload["error"]) == (413, "payload_too_large")

    chunked_ok = signed_headers(signing_secret, BODY)
    assert http_post(port, BODY.encode(), chunked_ok, chunked=True)[0] == 200

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/readyz")
        assert connection.getresponse().status == 200
    finally:
        connection.close()

    with Session(sqlite_engine) as session:
        assert session.scalar(select(func.count()).select_from(InboxEvent)) == 42
    dispatcher = get_state(app).dispatcher
    assert dispatcher is not None and dispatcher.flush()
    assert len(sent.ids) == 42
    assert len(set(sent.ids)) == 42
