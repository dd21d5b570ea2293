"""The database bounds: ORGSYNC_DB_TIMEOUT, and an engine given a timeout never hangs on a silent server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import signed_headers
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from tcpproxy import Mode, TcpProxy
from test_worker_e2e import membership_body

from models.db import create_db_engine, is_connection_error, ping
from models.errors import ConfigError, RetryableError
from models.settings import Settings
from orgsync.web import create_app, get_state

BOUND_S = 2.0


def test_the_web_timeout_defaults_to_a_few_seconds_and_is_checked() -> None:
    assert Settings.from_env({}).db_timeout == 5.0
    assert Settings.from_env({"ORGSYNC_DB_TIMEOUT": "2.5"}).db_timeout == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="ORGSYNC_DB_TIMEOUT"):
            Settings.from_env({"ORGSYNC_DB_TIMEOUT": bad})


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    url = make_url(pg_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running


def through(proxy: TcpProxy, pg_url: str) -> Engine:
    url = make_url(pg_url).set(host="127.0.0.1", port=proxy.port)
    return create_db_engine(url.render_as_string(hide_password=False), timeout=BOUND_S)


@pytest.mark.postgres
def test_a_timeout_sets_the_statement_timeout_and_keeps_the_urls_options(pg_url: str) -> None:
    engine = create_db_engine(f"{pg_url}?options=-c%20lock_timeout%3D1234", timeout=BOUND_S)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SHOW statement_timeout")) == "2s"
            assert connection.scalar(text("SHOW lock_timeout")) == "1234ms"
    finally:
        engine.dispose()
    # Without one (the worker, the command line) statements may run as long as they need.
    engine = create_db_engine(pg_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SHOW statement_timeout")) == "0"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_server_that_stops_answering_fails_the_statement_instead_of_hanging(
    pg_url: str, proxy: TcpProxy
) -> None:
    engine = through(proxy, pg_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
        proxy.mode = Mode.HANG
        # The pooled connection: the query is sent and nothing comes back.
        with pytest.raises(OperationalError) as excinfo, engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        assert is_connection_error(excinfo.value)
        # A new connection: accepted, and the server's greeting never comes.
        with pytest.raises(RetryableError):
            ping(engine)
        proxy.mode = Mode.FORWARD
        ping(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_connection_idle_in_the_pool_past_the_bound_is_not_cut(pg_url: str) -> None:
    engine = create_db_engine(pg_url, timeout=BOUND_S, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as connection:
            first = connection.scalar(text("SELECT pg_backend_pid()"))
        # Checked in: the bound applies to holding a connection, not to keeping it pooled.
        time.sleep(BOUND_S + 1)
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT pg_backend_pid()")) == first
    finally:
        engine.dispose()


def settings_for(url: str, signing_secret: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {
            "DATABASE_URL": url,
            "ORGSYNC_DATA_DIR": str(tmp_path),
            "CLERK_WEBHOOK_SIGNING_SECRET": signing_secret,
            "ORGSYNC_DB_TIMEOUT": str(BOUND_S),
        },
        require_webhook_secret=True,
    )


@pytest.mark.postgres
def test_the_webhook_answers_503_with_retry_after_when_the_database_hangs(
    pg_engine: Engine, pg_url: str, proxy: TcpProxy, signing_secret: str, tmp_path: Path
) -> None:
    url = make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    app = create_app(settings_for(url, signing_secret, tmp_path))
    client = app.test_client()
    body = membership_body("org_1", "user_1")
    try:
        proxy.mode = Mode.HANG
        response = client.post("/webhooks/clerk", data=body, headers=signed_headers(signing_secret, body))
        assert response.status_code == 503
        assert response.json is not None
        assert response.json["error"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json is not None
        assert ready.json["failed"] == ["database"]
    finally:
        get_state(app).close()


@pytest.mark.postgres
def test_readyz_does_not_queue_behind_an_exhausted_pool(
    pg_engine: Engine, pg_url: str, signing_secret: str, tmp_path: Path
) -> None:
    engine = create_db_engine(pg_url, timeout=BOUND_S, pool_size=1, max_overflow=0)
    app = create_app(settings_for(pg_url, signing_secret, tmp_path), engine=engine)
    client = app.test_client()
    try:
        with engine.connect():
            # The one connection is taken (as by a request that hangs): the probe says so.
            ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json is not None
        assert (
            "TimeoutError" in ready.json["checks"]["database"]
            or "Retryable" in ready.json["checks"]["database"]
        )
        assert client.get("/readyz").status_code == 200
    finally:
        engine.dispose()
