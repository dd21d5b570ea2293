"""The migrations build exactly the schema the tables declare, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from models.db import create_db_engine
from models.migrate import (
    HEAD_REVISION,
    NotMigratedError,
    alembic_config,
    require_migrated,
    schema_revisions,
    upgrade,
)
from models.tables import Base


def test_migrated_schema_matches_the_tables(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_at_head_and_idempotent(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    upgrade(url)
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head


def test_the_checked_revision_is_the_migrations_head_and_read_as_alembic_reads_it(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    assert ScriptDirectory.from_config(alembic_config(url)).get_heads() == [HEAD_REVISION]
    with engine.connect() as connection:
        alembic_current = set(MigrationContext.configure(connection).get_current_heads())
    assert schema_revisions(engine) == (alembic_current, {HEAD_REVISION})
    require_migrated(engine)


def test_a_database_without_the_version_table_has_no_revision(tmp_path: Path) -> None:
    empty = create_db_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert schema_revisions(empty) == (set(), {HEAD_REVISION})
        with pytest.raises(NotMigratedError, match="no orgsync schema yet"):
            require_migrated(empty)
    finally:
        empty.dispose()


def test_checking_the_schema_loads_no_alembic(tmp_path: Path) -> None:
    # The web server's workers inherit the memory of the process that checked the schema.
    code = (
        "import sys, orgsync.cli\n"
        "from models.db import create_db_engine\n"
        "from models.migrate import schema_revisions\n"
        f"schema_revisions(create_db_engine('sqlite:///{tmp_path / 'x.db'}'))\n"
        "print(any(name.split('.')[0] == 'alembic' for name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
