"""Alembic, driven from code: schema checks and upgrades for the processes, `db upgrade` and tests.

Checking the schema needs no alembic: the revision a database is at is one row of its
``alembic_version`` table, and this orgsync's is ``HEAD_REVISION`` (a test holds it to the
migrations' head). Every process checks at start, and the web server forks its workers after
that check, so alembic (about 7 MB of each web worker's memory) loads only where a migration
runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from models.db import create_db_engine
from models.errors import ConfigError, RetryableError
from models.redact import describe_error

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration's revision; a new migration moves it (tests/test_migrations.py checks).
HEAD_REVISION = "0009"
VERSION_TABLE = "alembic_version"


class NotMigratedError(ConfigError):
    """The database has no orgsync schema yet, or one at another revision than this orgsync's."""


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would choke on '%' in a password.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema at ``database_url`` to ``revision``; safe to run again."""
    from alembic import command  # noqa: PLC0415

    command.upgrade(alembic_config(database_url), revision)


def redact_url(url: str) -> str:
    """A database URL fit for output: the password replaced, never shown."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ValueError, SQLAlchemyError):
        return "<unparseable URL>"


def schema_revisions(engine: Engine) -> tuple[set[str], set[str]]:
    """(current revisions in the database, head revisions of this orgsync); ``RetryableError``
    when the database cannot be reached.

    The current ones are read as alembic reads them: the rows of ``alembic_version`` where the
    engine looks for tables (orgsync's schema on PostgreSQL), none when there is no such table."""
    try:
        with engine.connect() as connection:
            current: set[str] = set()
            if inspect(connection).has_table(VERSION_TABLE):
                current = set(connection.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}")))
    except DBAPIError as exc:
        raise RetryableError(f"database unavailable: {describe_error(exc)}") from exc
    return current, {HEAD_REVISION}


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
