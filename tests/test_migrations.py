"""The migrations build exactly the schema the tables declare, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import new_pg_database
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
from models.userdata import mark_served_copies


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


@pytest.fixture(params=["sqlite", "postgres"])
def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no orgsync schema yet: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'blank.db'}"
        return
    with new_pg_database("orgsync_blank") as url:
        yield url


def test_upgrading_marks_the_memberships_whose_user_data_is_served_as_stored(blank_url: str) -> None:
    # Memberships mirrored before revision 0008 are judged as their writers judge them now.
    complete = {
        "user_id": "user_1", "identifier": "a@example.com", "first_name": "A", "last_name": None,
        "image_url": "https://img/a", "profile_image_url": "https://img/a", "has_image": False,
        "extra": 2**70,
    }  # fmt: skip
    stored = {
        ("org_1", "user_1"): complete,
        ("org_1", "user_2"): {**complete, "user_id": "user_2"},
        ("org_2", "user_1"): {key: value for key, value in complete.items() if key != "profile_image_url"},
        ("org_2", "user_3"): {**complete, "user_id": "user_1"},  # another user's copy
        ("org_3", "user_1"): None,
        ("org_3", "user_2"): ["not", "an", "object"],
    }
    upgrade(blank_url, "0007")
    engine = create_db_engine(blank_url)
    try:
        members = sa.table(
            "memberships",
            *(sa.column(name) for name in ("organization_id", "user_id", "id", "role", "version")),
            sa.column("deleted"), sa.column("synced_at"), sa.column("public_user_data", sa.JSON),
        )  # fmt: skip
        with engine.begin() as connection:
            for number, ((org, user), data) in enumerate(stored.items()):
                connection.execute(
                    sa.insert(members).values(
                        organization_id=org,
                        user_id=user,
                        id=f"orgmem_{number}",
                        role="org:member",
                        version="1",
                        deleted=False,
                        synced_at=1,
                        public_user_data=sa.null() if data is None else data,
                    )
                )
        upgrade(blank_url)
        read = sa.text("SELECT organization_id || '/' || user_id, user_data_complete FROM memberships")
        with engine.connect() as connection:
            marked = dict(connection.execute(read).all())
        # The same judgement a few rows at a time, as on a large table.
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE memberships SET user_data_complete = false"))
            assert mark_served_copies(connection, batch=2) == 2
            assert dict(connection.execute(read).all()) == marked
    finally:
        engine.dispose()
    assert marked == {
        "org_1/user_1": True,
        "org_1/user_2": True,
        "org_2/user_1": False,
        "org_2/user_3": False,
        "org_3/user_1": False,
        "org_3/user_2": False,
    }
