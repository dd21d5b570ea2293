"""Retention on SQLite and PostgreSQL: what is pruned, what never is, and redaction of raw payloads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from models.db import session_scope
from models.errors import ConfigError
from models.inbox import store_delivery
from models.retention import (
    API_CALLS,
    COMMANDS,
    DAY_MS,
    INBOX,
    NOTIFICATIONS,
    REDACTED,
    REDACTION,
    SYNC_RUNS,
    Pacer,
    Policy,
    count_prunable,
    prune,
    redact_body,
)
from models.settings import MIN_RETAIN_INBOX_DAYS, Settings
from models.tables import ApiCall, Command, CommandStatus, InboxEvent, InboxStatus, SyncRun, SyncStatus

NOW = 1_800_000_000_000
EMAIL = "ann.lee@example.com"
IP = "203.0.113.7"


def policy(*, batch_size: int = 1000, inbox: int = 30, redact: int = 7, other: int = 90) -> Policy:
    return Policy(
        now_ms=NOW,
        inbox_days=inbox,
        api_calls_days=other,
        commands_days=other,
        sync_runs_days=other,
        redact_after_days=redact,
        batch_size=batch_size,
    )


def membership_body(user_id: str = "user_1") -> str:
    """A membership event carrying every kind of personal data Clerk puts in one."""
    return json.dumps(
        {
            "type": "organizationMembership.created",
            "object": "event",
            "instance_id": "ins_test",
            "timestamp": NOW,
            "event_attributes": {"http_request": {"client_ip": IP, "user_agent": "Mozilla/5.0 (X11)"}},
            "data": {
                "object": "organization_membership",
                "id": "orgmem_1",
                "role": "org:member",
                "organization": {"object": "organization", "id": "org_1", "name": "Acme", "slug": "acme"},
                "public_metadata": {"note": f"invited by {EMAIL} from {IP}"},
                "public_user_data": {
                    "user_id": user_id,
                    "identifier": EMAIL,
                    "first_name": "Ann",
                    "last_name": "Lee",
                    "username": "annlee",
                    "image_url": "https://img.example/ann.png",
                    "has_image": True,
                },
                "created_at": NOW,
                "updated_at": NOW,
            },
        }
    )


def add_inbox(
    factory: sessionmaker[Session], svix_id: str, *, age_days: float, status: str = InboxStatus.APPLIED
) -> int:
    with session_scope(factory) as session:
        stored = store_delivery(
            session, svix_id=svix_id, body=membership_body(), received_at=NOW - int(age_days * DAY_MS)
        )
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None
        row.status = status
        return stored.inbox_id


def inbox_ids(factory: sessionmaker[Session]) -> set[str]:
    with session_scope(factory) as session:
        return set(session.scalars(select(InboxEvent.svix_id)))


def test_old_handled_rows_go_pending_and_recent_rows_stay(session_factory: sessionmaker[Session]) -> None:
    for status in (InboxStatus.APPLIED, InboxStatus.IGNORED, InboxStatus.REJECTED, InboxStatus.DEAD):
        add_inbox(session_factory, f"msg_old_{status}", age_days=31, status=status)
    add_inbox(session_factory, "msg_old_pending", age_days=400, status=InboxStatus.PENDING)
    add_inbox(session_factory, "msg_recent", age_days=29)

    report = prune(session_factory, policy())

    assert report.deleted[INBOX] == 4
    assert inbox_ids(session_factory) == {"msg_old_pending", "msg_recent"}


def test_a_delivery_id_within_the_window_still_deduplicates(session_factory: sessionmaker[Session]) -> None:
    # Two days is the smallest window allowed: past Svix's last retry, about 27.5 h after the first.
    add_inbox(session_factory, "msg_retried", age_days=MIN_RETAIN_INBOX_DAYS - 0.5)
    prune(session_factory, policy(inbox=MIN_RETAIN_INBOX_DAYS, redact=1))
    with session_scope(session_factory) as session:
        again = store_delivery(session, svix_id="msg_retried", body=membership_body(), received_at=NOW)
    assert again.duplicate


def test_batches_commit_as_they_go_and_report_progress(session_factory: sessionmaker[Session]) -> None:
    for number in range(10):
        add_inbox(session_factory, f"msg_{number}", age_days=40)
    seen: list[tuple[str, int]] = []

    report = prune(
        session_factory, policy(batch_size=3), progress=lambda name, done: seen.append((name, done))
    )

    assert report.deleted[INBOX] == 10
    assert [done for name, done in seen if name == INBOX] == [3, 6, 9, 10]
    assert inbox_ids(session_factory) == set()


def test_redaction_masks_personal_data_and_keeps_the_row(session_factory: sessionmaker[Session]) -> None:
    applied = add_inbox(session_factory, "msg_applied", age_days=8)
    dead = add_inbox(session_factory, "msg_dead", age_days=8, status=InboxStatus.DEAD)
    pending = add_inbox(session_factory, "msg_pending", age_days=8, status=InboxStatus.PENDING)
    young = add_inbox(session_factory, "msg_young", age_days=6)

    report = prune(session_factory, policy())

    assert report.redacted == 1
    assert report.deleted[INBOX] == 0
    with session_scope(session_factory) as session:
        row = session.get(InboxEvent, applied)
        assert row is not None
        assert (row.svix_id, row.status, row.redacted_at) == ("msg_applied", InboxStatus.APPLIED, NOW)
        for personal in (EMAIL, IP, "Ann", "Lee", "annlee", "img.example", "Mozilla"):
            assert personal not in row.body
        event = json.loads(row.body)
        assert event["type"] == "organizationMembership.created"
        assert event["data"]["public_user_data"]["user_id"] == "user_1"
        assert event["data"]["public_user_data"]["identifier"] == REDACTED
        assert event["data"]["organization"]["slug"] == "acme"
        # A dead row may still be replayed, a pending one is yet to be applied: both intact.
        for kept in (dead, pending, young):
            other = session.get(InboxEvent, kept)
            assert other is not None
            assert EMAIL in other.body
            assert other.redacted_at is None
    assert prune(session_factory, policy()).redacted == 0


def test_redacting_a_body_that_is_not_json() -> None:
    redacted = json.loads(redact_body(f"not json {EMAIL}"))
    assert redacted == {"redacted": True, "note": "body was not JSON"}


def test_api_calls_commands_and_sync_runs(session_factory: sessionmaker[Session]) -> None:
    old, recent = NOW - 91 * DAY_MS, NOW - 89 * DAY_MS
    with session_scope(session_factory) as session:
        for started, path in ((old, "/old"), (recent, "/recent")):
            session.add(ApiCall(purpose="send", method="GET", path=path, duration_ms=1, started_at=started))
        for number, (status, updated) in enumerate(
            [
                (CommandStatus.CONFIRMED, old),
                (CommandStatus.FAILED, old),
                (CommandStatus.PENDING, old),
                (CommandStatus.SENDING, old),
                (CommandStatus.CONFIRMED, recent),
            ]
        ):
            session.add(command(number, status, updated))
        for status in (SyncStatus.COMPLETED, SyncStatus.RUNNING, SyncStatus.FAILED):
            session.add(sync_run(status, old))

    report = prune(session_factory, policy())

    assert (report.deleted[API_CALLS], report.deleted[COMMANDS], report.deleted[SYNC_RUNS]) == (1, 2, 1)
    with session_scope(session_factory) as session:
        assert set(session.scalars(select(ApiCall.path))) == {"/recent"}
        assert sorted(session.scalars(select(Command.status))) == sorted(
            [CommandStatus.PENDING, CommandStatus.SENDING, CommandStatus.CONFIRMED]
        )
        # The running run is never touched; the latest, however old, is what status reports.
        assert sorted(session.scalars(select(SyncRun.status))) == [SyncStatus.FAILED, SyncStatus.RUNNING]


def test_a_dry_run_counts_exactly_what_prune_removes(session_factory: sessionmaker[Session]) -> None:
    for number in range(4):
        add_inbox(session_factory, f"msg_old_{number}", age_days=31)
    add_inbox(session_factory, "msg_week", age_days=8)
    with session_scope(session_factory) as session:
        session.add(
            ApiCall(purpose="send", method="GET", path="/", duration_ms=1, started_at=NOW - 100 * DAY_MS)
        )

    counted = count_prunable(session_factory, policy())
    assert inbox_ids(session_factory) == {"msg_old_0", "msg_old_1", "msg_old_2", "msg_old_3", "msg_week"}
    done = prune(session_factory, policy())

    assert counted.dry_run and not done.dry_run
    assert (
        counted.deleted
        == done.deleted
        == {INBOX: 4, API_CALLS: 1, COMMANDS: 0, SYNC_RUNS: 0, NOTIFICATIONS: 0}
    )
    assert counted.redacted == done.redacted == 1


def test_only_the_tables_asked_for(session_factory: sessionmaker[Session]) -> None:
    add_inbox(session_factory, "msg_old", age_days=31)
    with session_scope(session_factory) as session:
        session.add(
            ApiCall(purpose="send", method="GET", path="/", duration_ms=1, started_at=NOW - 100 * DAY_MS)
        )
    seen: list[str] = []
    report = prune(session_factory, policy(), tables=[API_CALLS], progress=lambda name, _: seen.append(name))
    assert report.deleted == {INBOX: 0, API_CALLS: 1, COMMANDS: 0, SYNC_RUNS: 0, NOTIFICATIONS: 0}
    assert REDACTION not in seen
    assert inbox_ids(session_factory) == {"msg_old"}


def command(number: int, status: str, updated_at: int) -> Command:
    return Command(
        kind="set_role",
        organization_id="org_1",
        user_id=f"user_{number}",
        role="org:admin",
        requested_by="cli",
        idempotency_key=f"key-{number}",
        status=status,
        dry_run=False,
        attempts=0,
        created_at=updated_at,
        updated_at=updated_at,
    )


def sync_run(status: str, started_at: int) -> SyncRun:
    return SyncRun(
        scope="instance",
        status=status,
        started_at=started_at,
        heartbeat_at=started_at,
        api_calls=0,
        rate_limit_waits=0,
        rows_seen=0,
    )


def test_counting_uses_the_indexes_it_needs(engine: Engine) -> None:
    """Redaction looks rows up by (redacted_at, id): the migration created that index."""
    from sqlalchemy import inspect

    indexes = {index["name"] for index in inspect(engine).get_indexes("inbox_events")}
    assert "ix_inbox_events_redacted_at_id" in indexes


# -- settings ----------------------------------------------------------------------------------


def settings_with(**env: str) -> Settings:
    return Settings.from_env({"ORGSYNC_DATA_DIR": "/tmp/orgsync-retention", **env})


def test_retention_defaults_outlive_svix_retries() -> None:
    settings = settings_with()
    # Svix's last retry comes about 27.5 h after the first attempt.
    assert settings.retain_inbox_days * 24 > 27.5 * 2
    assert settings.redact_after_days < settings.retain_inbox_days
    assert (
        settings.retain_api_calls_days,
        settings.retain_commands_days,
        settings.retain_sync_runs_days,
    ) == (
        90,
        90,
        90,
    )
    assert settings.prune_interval == 3600.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORGSYNC_RETAIN_INBOX_DAYS": "1"}, "ORGSYNC_RETAIN_INBOX_DAYS must be at least 2 days, got 1"),
        (
            {"ORGSYNC_RETAIN_COMMANDS_DAYS": "a week"},
            "ORGSYNC_RETAIN_COMMANDS_DAYS must be a whole number of days",
        ),
        ({"ORGSYNC_RETAIN_API_CALLS_DAYS": "0"}, "ORGSYNC_RETAIN_API_CALLS_DAYS must be at least 1 days"),
        (
            {"ORGSYNC_RETAIN_INBOX_DAYS": "10", "ORGSYNC_REDACT_AFTER_DAYS": "10"},
            "ORGSYNC_REDACT_AFTER_DAYS (10) must be less than ORGSYNC_RETAIN_INBOX_DAYS (10)",
        ),
        ({"ORGSYNC_PRUNE_BATCH_SIZE": "50000"}, "ORGSYNC_PRUNE_BATCH_SIZE must be at most 10000"),
        ({"ORGSYNC_PRUNE_INTERVAL": "-1"}, "ORGSYNC_PRUNE_INTERVAL must not be negative"),
        ({"CLERK_INSTANCE_ID": "app_123"}, "CLERK_INSTANCE_ID must look like ins_"),
    ],
)
def test_bad_retention_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_with(**env)


def test_a_short_inbox_window_lowers_the_default_redaction() -> None:
    settings = settings_with(ORGSYNC_RETAIN_INBOX_DAYS="3")
    assert (settings.retain_inbox_days, settings.redact_after_days) == (3, 2)


def test_the_beat_schedule_prunes_and_the_task_runs(sqlite_url: str, tmp_path: Any) -> None:
    from worker.app import TASK_PRUNE, create_celery

    env = {"DATABASE_URL": sqlite_url, "ORGSYNC_DATA_DIR": str(tmp_path)}
    app = create_celery(Settings.from_env(env))
    assert app.conf.beat_schedule["orgsync-prune"]["task"] == TASK_PRUNE
    assert (
        "orgsync-prune"
        not in create_celery(Settings.from_env({**env, "ORGSYNC_PRUNE_INTERVAL": "0"})).conf.beat_schedule
    )
    factory = app.orgsync_database.session_factory()
    with session_scope(factory) as session:
        store_delivery(session, svix_id="msg_ancient", body=membership_body(), received_at=1)
        session.execute(InboxEvent.__table__.update().values(status=InboxStatus.APPLIED))
    result = app.tasks[TASK_PRUNE].apply().get()
    assert result["deleted"][INBOX] == 1
    with session_scope(factory) as session:
        assert session.scalar(select(func.count()).select_from(InboxEvent)) == 0
    app.orgsync_database.stop()


def test_the_pacer_rests_in_proportion_to_the_work() -> None:
    ticks = iter([0.0, 2.0, 10.0, 10.5])
    rests: list[float] = []
    pacer = Pacer(0.25, clock=lambda: next(ticks), sleep=rests.append)
    with pacer.batch():
        pass
    with pacer.batch():
        pass
    assert rests == [6.0, 1.5]
    with pytest.raises(ValueError, match="duty must be more than 0 and at most 1"):
        Pacer(0)


def test_the_pacer_holds_a_rate_of_rows_without_making_up_lost_time() -> None:
    ticks = iter([0.0, 0.1, 1.0, 1.1, 10.0, 10.1, 10.1, 10.2])
    rests: list[float] = []
    pacer = Pacer(1.0, rows_per_s=1000, clock=lambda: next(ticks), sleep=rests.append)
    for count in (1000, 1000, 1000, 1000):
        with pacer.batch() as batch:
            batch.rows(count)
    # 1,000 rows due by 1.0 s, 2,000 by 2.0 s; the third batch ends late (10.1 s), so the
    # schedule starts again there instead of allowing a burst: the fourth is due at 11.1 s.
    assert rests == pytest.approx([0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="rows_per_s must be positive"):
        Pacer(0.5, rows_per_s=0)
