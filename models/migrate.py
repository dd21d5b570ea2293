"""Alembic, driven from code: schema checks and upgrades for the processes, `db upgrade` and tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from models.db import create_db_engine
from models.errors import ConfigError, RetryableError
from models.redact import describe_error

MIGRATIONS = Path(__file__).with_name("migrations")


class NotMigratedError(ConfigError):
    """The database has no orgsync schema yet, or one at another revision than this orgsync's."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would choke on '%' in a password.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema at ``database_url`` to ``revision``; safe to run again."""
    command.upgrade(alembic_config(database_url), revision)


def redact_url(url: str) -> str:
    """A database URL fit for output: the password replaced, never shown."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ValueError, SQLAlchemyError):
        return "<unparseable URL>"


def schema_revisions(engine: Engine) -> tuple[set[str], set[str]]:
    """(current revisions in the database, head revisions of this orgsync); ``RetryableError``
    when the database cannot be reached."""
    heads = set(ScriptDirectory(str(MIGRATIONS)).get_heads())
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    except DBAPIError as exc:
        raise RetryableError(f"database unavailable: {describe_error(exc)}") from exc
    return current, heads


def require_migrated(engine: Engine) -> None:
    """Raise ``NotMigratedError`` unless the schema is exactly at this orgsync's head revisions."""
    current, heads = schema_revisions(engine)
    if current == heads:
        return
    if not current:
        raise NotMigratedError(
            f"the database at {redact_url(str(engine.url))} has no orgsync schema yet: "
            "run `orgsync db upgrade`"
        )
    raise NotMigratedError(
        f"the database schema is at revision {', '.join(sorted(current))} but this orgsync expects "
        f"{', '.join(sorted(heads))}: run `orgsync db upgrade` (or upgrade orgsync if the database is newer)"
    )


def require_database_file(database_url: str) -> None:
    """A SQLite file that does not exist is an unmigrated database, not one to create by reading."""
    url = make_url(database_url)
    path = url.database if url.get_backend_name() == "sqlite" else None
    if path and path != ":memory:" and not Path(path).exists():
        raise NotMigratedError(
            f"there is no database at {url.database} yet: run `orgsync db upgrade` (or `orgsync run`)"
        )


def upgrade_database(database_url: str) -> str:
    """Upgrade to head when needed and say what happened, in one line fit for output."""
    engine = create_db_engine(database_url)
    try:
        before, heads = schema_revisions(engine)
    finally:
        engine.dispose()
    where = redact_url(database_url)
    if before == heads:
        return f"orgsync: database {where} is up to date (revision {', '.join(sorted(heads))})"
    try:
        upgrade(database_url)
    except DBAPIError as exc:
        raise RetryableError(f"database unavailable during the upgrade: {describe_error(exc)}") from exc
    engine = create_db_engine(database_url)
    try:
        after, _ = schema_revisions(engine)
    finally:
        engine.dispose()
    was = ", ".join(sorted(before)) or "empty"
    return f"orgsync: database {where} upgraded from {was} to revision {', '.join(sorted(after))}"
