"""Alembic environment: runs migrations on the URL handed over by ``models.migrate``.

On PostgreSQL the migrations run inside orgsync's own schema (``ORGSYNC_DB_SCHEMA``): the
engine's ``search_path`` names only that schema, which is created here first, so every table
and the ``alembic_version`` table land in it. A database migrated before the schema setting
existed has orgsync's tables in ``public``; they are moved into the schema once, with their
indexes and sequences, before the first migration runs there.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from models.db import create_db_engine, db_schema
from models.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _table_exists(connection: Connection, schema: str, name: str) -> bool:
    found = connection.execute(
        text("SELECT 1 FROM pg_tables WHERE schemaname = :schema AND tablename = :name"),
        {"schema": schema, "name": name},
    ).first()
    return found is not None


def prepare_schema(connection: Connection, schema: str) -> None:
    """Create orgsync's schema, and move an earlier install's tables from ``public`` into it."""
    # The name is checked by ``parse_db_schema``: a plain identifier, safe to interpolate.
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
    if schema == "public" or _table_exists(connection, schema, "alembic_version"):
        return
    if not _table_exists(connection, "public", "alembic_version"):
        return
    revision = connection.execute(text("SELECT version_num FROM public.alembic_version")).scalar()
    script = context.script
    try:
        ours = revision is not None and script.get_revision(str(revision)) is not None
    except Exception:
        ours = False
    if not ours:
        # Another tool's alembic history: not orgsync's tables, leave them where they are.
        return
    for name in ["alembic_version", *(table.name for table in target_metadata.sorted_tables)]:
        if _table_exists(connection, "public", name):
            connection.execute(text(f"ALTER TABLE public.{name} SET SCHEMA {schema}"))


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    schema = db_schema()
    engine = create_db_engine(url, schema=schema)
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            prepare_schema(connection, schema)
            connection.commit()
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
