"""``orgsync notifications list|show|retry``, the outbox in ``status`` and ``prune``, and its settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import TEST_SIGNING_SECRET
from histories import T0, make_event
from sqlalchemy import Engine, select, update
from test_notifications import _membership

from models import notifications
from models.clock import now_ms
from models.db import make_session_factory, session_scope
from models.mirror import apply_events
from models.retention import DAY_MS
from models.settings import Settings
from models.tables import Notification, NotificationStatus
from orgsync.cli import cli
from orgsync.cli.base import EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, Runtime
from orgsync.cli.ops import EXIT_ATTENTION

OUTBOX = Notification.__table__


def invoke(environ: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), obj=Runtime(environ=environ), catch_exceptions=False)


@pytest.fixture(autouse=True)
def restore_configuration() -> Iterator[None]:
    # Commands configure this process's notifications from their settings: undo it afterwards.
    with notifications.configured():
        yield


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": sqlite_url, "ORGSYNC_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def rows(sqlite_engine: Engine) -> list[str]:
    """Two notifications (organization.created, membership.added), the first one dead."""
    with notifications.configured(outbox=True), session_scope(make_session_factory(sqlite_engine)) as session:
        event = make_event("organizationMembership.created", _membership("org:member", T0), T0)
        apply_events(session, [event], now_ms=now_ms())
    with sqlite_engine.begin() as connection:
        ids = list(connection.scalars(select(OUTBOX.c.event_id).order_by(OUTBOX.c.id)))
        connection.execute(
            update(OUTBOX)
            .where(OUTBOX.c.event_id == ids[0])
            .values(status=NotificationStatus.DEAD, attempts=9, last_error="receiver 1 of 1: HTTP 503")
        )
    return ids


def test_list_show_and_filters(env: dict[str, str], rows: list[str]) -> None:
    listed = json.loads(invoke(env, "notifications", "list", "--json").stdout)
    assert [row["event_id"] for row in listed] == list(reversed(rows))
    dead = json.loads(invoke(env, "notifications", "list", "--status", "dead", "--json").stdout)
    assert [row["type"] for row in dead] == ["organization.created"]
    members = json.loads(invoke(env, "notifications", "list", "--type", "membership", "--json").stdout)
    assert [row["type"] for row in members] == ["membership.added"]
    assert json.loads(invoke(env, "notifications", "list", "--org", "org_2", "--json").stdout) == []
    assert "membership.added" in invoke(env, "notifications", "list").stdout

    shown = json.loads(invoke(env, "notifications", "show", rows[1]).stdout)
    assert shown["body"]["id"] == rows[1]
    assert set(shown["body"]) == {"id", "type", "timestamp", "data"}
    assert shown["body"]["data"]["object"]["role"] == "org:member"
    by_number = json.loads(invoke(env, "notifications", "show", str(shown["id"])).stdout)
    assert by_number["event_id"] == rows[1]

    missing = invoke(env, "notifications", "show", "ntf_nope")
    assert missing.exit_code == EXIT_NOT_FOUND
    assert "no notification 'ntf_nope'" in missing.stderr


def test_status_reports_dead_notifications_and_retry_sends_them_again(
    env: dict[str, str], rows: list[str], sqlite_engine: Engine
) -> None:
    result = invoke(env, "status", "--json")
    assert result.exit_code == EXIT_ATTENTION
    status = json.loads(result.stdout)
    assert status["notifications"]["dead"] == 1
    assert status["notifications"]["pending"] == 1
    assert any("dead notification" in item for item in status["attention"])
    assert "notifications:" in invoke(env, "status").stdout

    assert invoke(env, "notifications", "retry").exit_code == EXIT_USAGE
    assert invoke(env, "notifications", "retry", "ntf_nope").exit_code == EXIT_NOT_FOUND
    retried = invoke(env, "notifications", "retry", "--dead")
    assert retried.exit_code == EXIT_OK, retried.output
    assert "reset 1 notification(s) to pending" in retried.stdout
    with sqlite_engine.connect() as connection:
        states = dict(connection.execute(select(OUTBOX.c.event_id, OUTBOX.c.status)).all())
    assert states == {rows[0]: NotificationStatus.PENDING, rows[1]: NotificationStatus.PENDING}
    assert "nothing to retry" in invoke(env, "notifications", "retry", rows[0]).stdout


def test_prune_removes_delivered_notifications_past_retention(
    env: dict[str, str], rows: list[str], sqlite_engine: Engine
) -> None:
    old = now_ms() - 31 * DAY_MS
    with sqlite_engine.begin() as connection:
        connection.execute(
            update(OUTBOX)
            .where(OUTBOX.c.event_id == rows[1])
            .values(status=NotificationStatus.DELIVERED, created_at=old)
        )
        connection.execute(update(OUTBOX).where(OUTBOX.c.event_id == rows[0]).values(created_at=old))
    report = json.loads(invoke(env, "prune", "--dry-run", "--json").stdout)
    assert report["deleted"]["notifications"] == 2  # delivered and dead; pending ones never
    kept = json.loads(invoke({**env, "ORGSYNC_RETAIN_NOTIFICATIONS_DAYS": "40"}, "prune", "--json").stdout)
    assert kept["deleted"]["notifications"] == 0
    assert json.loads(invoke(env, "prune", "--json").stdout)["deleted"]["notifications"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ORGSYNC_NOTIFY_URLS": "https://hooks.example.com/x"}, "ORGSYNC_NOTIFY_SECRET is not set"),
        (
            {
                "ORGSYNC_NOTIFY_URLS": "https://a.example.com, ftp://token@b.example.com",
                "ORGSYNC_NOTIFY_SECRET": "x",
            },
            "ORGSYNC_NOTIFY_URLS: entry 2 of 2 is not an http:// or https:// URL",
        ),
        (
            {"ORGSYNC_NOTIFY_URLS": "https://a.example.com", "ORGSYNC_NOTIFY_SECRET": "secret"},
            "ORGSYNC_NOTIFY_SECRET: entry 1 of 1 does not start with 'whsec_'",
        ),
        (
            {"ORGSYNC_NOTIFY_CHANNEL": "Orgsync Changes"},
            "ORGSYNC_NOTIFY_CHANNEL must be a PostgreSQL channel",
        ),
        ({"ORGSYNC_NOTIFY_CHANNEL": "orgsync_changes"}, "ORGSYNC_NOTIFY_CHANNEL needs PostgreSQL"),
        ({"ORGSYNC_NOTIFY_DEAD_AFTER": "soon"}, "ORGSYNC_NOTIFY_DEAD_AFTER must be a number of seconds"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], extra: dict[str, str], message: str) -> None:
    result = invoke({**env, **extra}, "notifications", "list")
    assert result.exit_code == EXIT_CONFIG
    assert message in result.stderr
    assert "token@" not in result.stderr


def test_good_settings_parse(env: dict[str, str]) -> None:
    result = invoke(
        {
            **env,
            "ORGSYNC_NOTIFY_URLS": "https://a.example.com/hook?key=1 https://b.example.com",
            "ORGSYNC_NOTIFY_SECRET": TEST_SIGNING_SECRET,
        },
        "notifications",
        "list",
        "--json",
    )
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads(result.stdout) == []


def test_readyz_shows_the_delivery_state_when_urls_are_set(
    rows: list[str], sqlite_url: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    from orgsync.web import create_app

    settings = Settings(
        database_url=sqlite_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=(TEST_SIGNING_SECRET,),
        notify_urls=("http://127.0.0.1:9/hook",),
        notify_secret=TEST_SIGNING_SECRET,
    )
    response = create_app(settings, engine=sqlite_engine).test_client().get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["notifications"]["dead"] == 1
    assert response.get_json()["notifications"]["pending"] == 1
