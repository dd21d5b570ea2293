"""orgsync's own PostgreSQL schema: beside an application's tables of the same names, never touching them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from conftest import PG_ADMIN_DSN, PG_HOST_URL, unavailable
from helpers import signed_headers
from psycopg import sql
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from emulator.payloads import webhook_body
from models.db import create_db_engine, make_session_factory
from models.errors import ConfigError
from models.migrate import upgrade
from models.settings import Settings, parse_db_schema
from models.tables import InboxEvent, InboxStatus, Organization
from orgsync.web import create_app, get_state
from worker.apply import apply_inbox

pytestmark = pytest.mark.postgres

T0 = 1_700_000_000_000


@pytest.fixture
def database() -> Iterator[tuple[str, str]]:
    """A database of its own (name, SQLAlchemy URL), with an application's ``public.users`` in it."""
    name = f"orgsync_schema_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL unreachable ({PG_ADMIN_DSN}): {exc}".strip())
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with connect(name) as connection:
            connection.execute(
                "CREATE TABLE public.users (id serial PRIMARY KEY, email text NOT NULL, password_hash text)"
            )
            connection.execute("CREATE TABLE public.organizations (slug text PRIMARY KEY)")
            connection.execute(
                "INSERT INTO public.users (email, password_hash) VALUES ('app@example.com', 'x')"
            )
            connection.execute("INSERT INTO public.organizations VALUES ('the-app')")
        yield name, f"{PG_HOST_URL}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def connect(dbname: str, user: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
    conninfo = psycopg.conninfo.make_conninfo(PG_ADMIN_DSN, dbname=dbname)
    if user is not None:
        conninfo = psycopg.conninfo.make_conninfo(conninfo, user=user)
    return psycopg.connect(conninfo, autocommit=True)


def tables_in(dbname: str, schema: str) -> set[str]:
    with connect(dbname) as connection:
        rows = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
        ).fetchall()
    return {str(row[0]) for row in rows}


def the_apps_tables_are_untouched(dbname: str) -> None:
    with connect(dbname) as connection:
        assert connection.execute("SELECT id, email, password_hash FROM public.users").fetchall() == [
            (1, "app@example.com", "x")
        ]
        assert connection.execute("SELECT slug FROM public.organizations").fetchall() == [("the-app",)]
    assert tables_in(dbname, "public") == {"users", "organizations"}


def deliver_and_apply(url: str, engine: Engine, secret: str) -> None:
    """One organization.created through the webhook endpoint and the worker's apply."""
    settings = Settings(
        database_url=url, broker_url="sqla+sqlite://", data_dir=None, webhook_secrets=(secret,)
    )  # type: ignore[arg-type]
    body = webhook_body(
        "organization.created",
        {
            "object": "organization",
            "id": "org_s1",
            "name": "Mirror Co",
            "slug": "mirror-co",
            "created_at": T0,
            "updated_at": T0,
        },
        T0,
    )
    app = create_app(settings, engine=engine)
    try:
        response = app.test_client().post("/webhooks/clerk", data=body, headers=signed_headers(secret, body))
        assert response.status_code == 200, response.get_data(as_text=True)
    finally:
        get_state(app).close()
    with Session(engine) as session:
        ids = list(session.scalars(select(InboxEvent.id)))
    apply_inbox(make_session_factory(engine), ids, now_ms=int(time.time() * 1000), max_attempts=3)
    with Session(engine) as session:
        assert (
            session.scalar(
                select(func.count()).select_from(InboxEvent).where(InboxEvent.status == InboxStatus.APPLIED)
            )
            == 1
        )
        organization = session.get(Organization, "org_s1")
        assert organization is not None and organization.name == "Mirror Co"


def test_migrations_and_a_webhook_stay_in_orgsyncs_schema(
    database: tuple[str, str], signing_secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, url = database
    monkeypatch.delenv("ORGSYNC_DB_SCHEMA", raising=False)
    upgrade(url)
    ours = tables_in(name, "orgsync")
    assert {"alembic_version", "users", "organizations", "memberships", "inbox_events"} <= ours
    the_apps_tables_are_untouched(name)
    engine = create_db_engine(url)
    try:
        deliver_and_apply(url, engine, signing_secret)
    finally:
        engine.dispose()
    the_apps_tables_are_untouched(name)
    with connect(name) as connection:
        assert connection.execute("SELECT id FROM orgsync.organizations").fetchall() == [("org_s1",)]
    # Again: nothing to do, nothing moved.
    upgrade(url)
    assert tables_in(name, "orgsync") == ours


def test_a_configured_schema_name_is_used(
    database: tuple[str, str], signing_secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, url = database
    monkeypatch.setenv("ORGSYNC_DB_SCHEMA", "clerk_mirror")
    upgrade(url)
    assert "organizations" in tables_in(name, "clerk_mirror")
    assert "orgsync" not in {row for row in _schemas(name)}
    engine = create_db_engine(url)
    try:
        deliver_and_apply(url, engine, signing_secret)
    finally:
        engine.dispose()
    the_apps_tables_are_untouched(name)


def _schemas(dbname: str) -> list[str]:
    with connect(dbname) as connection:
        return [str(row[0]) for row in connection.execute("SELECT nspname FROM pg_namespace").fetchall()]


def test_the_read_only_grant_an_application_needs(
    database: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, url = database
    monkeypatch.delenv("ORGSYNC_DB_SCHEMA", raising=False)
    upgrade(url)
    role = f"app_{uuid.uuid4().hex[:8]}"
    with connect(name) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with connect(name) as admin:
            # The grant the README shows, as orgsync's migrating role runs it.
            for statement in (
                "GRANT USAGE ON SCHEMA orgsync TO {}",
                "GRANT SELECT ON ALL TABLES IN SCHEMA orgsync TO {}",
                "ALTER DEFAULT PRIVILEGES IN SCHEMA orgsync GRANT SELECT ON TABLES TO {}",
            ):
                admin.execute(sql.SQL(statement).format(sql.Identifier(role)))
            admin.execute(
                "INSERT INTO orgsync.organizations (id, name, version, deleted, synced_at) "
                "VALUES ('org_g', 'G', '1', false, 0)"
            )
            # A table a later migration adds: the default privileges cover it.
            admin.execute("CREATE TABLE orgsync.later_table (id int)")
        with connect(name, user=role) as app:
            assert app.execute("SELECT id FROM orgsync.organizations").fetchall() == [("org_g",)]
            assert app.execute("SELECT count(*) FROM orgsync.later_table").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("DELETE FROM orgsync.organizations")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("CREATE TABLE orgsync.mine (id int)")
    finally:
        with connect(name) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_an_install_from_before_the_schema_setting_is_moved_into_it(
    database: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, url = database
    with connect(name) as connection:
        # An earlier orgsync beside no application: its tables in public, so clear the app's.
        connection.execute("DROP TABLE public.users, public.organizations")
    monkeypatch.setenv("ORGSYNC_DB_SCHEMA", "public")
    upgrade(url)
    engine = create_db_engine(url, schema="public")
    with engine.begin() as connection:
        connection.execute(
            Organization.__table__.insert().values(
                id="org_old", name="Old", version="1", deleted=False, synced_at=0
            )
        )
    engine.dispose()
    monkeypatch.delenv("ORGSYNC_DB_SCHEMA")
    upgrade(url)
    assert tables_in(name, "public") == set()
    assert {"alembic_version", "organizations", "inbox_events"} <= tables_in(name, "orgsync")
    engine = create_db_engine(url)
    try:
        with Session(engine) as session:
            assert session.get(Organization, "org_old") is not None
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "bad", ["Orgsync", "org-sync", "1orgsync", "pg_orgsync", "a" * 64, "org sync", 'x";drop']
)
def test_a_bad_schema_name_is_refused_naming_the_setting(bad: str) -> None:
    with pytest.raises(ConfigError, match="ORGSYNC_DB_SCHEMA"):
        parse_db_schema(bad)
    with pytest.raises(ConfigError, match="ORGSYNC_DB_SCHEMA"):
        Settings.from_env({"ORGSYNC_DB_SCHEMA": bad})


def test_the_default_schema_is_orgsync() -> None:
    assert parse_db_schema("") == "orgsync"
    assert Settings.from_env({}).db_schema == "orgsync"
    assert Settings.from_env({"ORGSYNC_DB_SCHEMA": " mirror_1 "}).db_schema == "mirror_1"
