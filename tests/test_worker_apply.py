"""apply_inbox and sweep_inbox called directly: batches, rejections, poison, retries, dead rows, sweeping."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest
from helpers import new_msg_id
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import worker.apply
from emulator.payloads import (
    BARE_MEMBERSHIP,
    BARE_ORGANIZATION,
    OMIT,
    membership_data,
    organization_data,
    webhook_body,
)
from models.db import create_db_engine, make_session_factory, session_scope
from models.errors import RetryableError
from models.events import Event
from models.inbox import store_delivery
from models.redact import describe_error
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus, Membership
from worker.app import TASK_APPLY, TASK_SWEEP, ProcessDatabase, check_broker, create_celery
from worker.apply import (
    BACKOFF_CAP_MS,
    ApplyReport,
    apply_inbox,
    backoff_ms,
    sweep_inbox,
)

NOW = 1_800_000_000_000
T0 = 1_700_000_000_000


def membership_body(org: str, user: str, role: str = "org:member", *, at: int = T0) -> str:
    organization = organization_data(org, name=org, slug=org, created_at=T0, object=OMIT, **BARE_ORGANIZATION)
    return webhook_body(
        "organizationMembership.created",
        membership_data(
            f"orgmem_{org}_{user}",
            organization,
            user,
            role=role,
            public_user_data={"user_id": user, "identifier": f"{user}@example.com"},
            created_at=at,
            **BARE_MEMBERSHIP,
        ),
        at,
    )


# A valid envelope of a known type (the inbox stores it as pending) that the full parser refuses.
NO_ROLE = webhook_body(
    "organizationMembership.created",
    {"id": "orgmem_x", "organization": {"id": "org_x"}, "public_user_data": {"user_id": "user_x"}},
    T0,
)


def store(factory: sessionmaker[Session], body: str, *, received_at: int = T0, svix_id: str = "") -> int:
    with session_scope(factory) as session:
        stored = store_delivery(session, svix_id=svix_id or new_msg_id(), body=body, received_at=received_at)
    assert stored.status == InboxStatus.PENDING
    return stored.inbox_id


def store_members(factory: sessionmaker[Session], count: int, *, org: str = "org_a") -> list[int]:
    return [store(factory, membership_body(org, f"user_{n}")) for n in range(count)]


def rows(factory: sessionmaker[Session], ids: Sequence[int]) -> dict[int, InboxEvent]:
    with session_scope(factory) as session:
        found = session.scalars(select(InboxEvent).where(InboxEvent.id.in_(ids))).all()
        return {row.id: row for row in found}


def member_count(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        query = select(func.count()).select_from(Membership).where(Membership.deleted.is_(False))
        return int(session.scalar(query) or 0)


def poison_apply(monkeypatch: pytest.MonkeyPatch, bad: set[str], calls: list[int] | None = None) -> None:
    """Make apply_events fail on any batch holding one of the ``bad`` svix ids."""
    real = worker.apply.apply_events

    def apply(session: Session, events: Sequence[Event], *, now_ms: int) -> int:
        if calls is not None:
            calls.append(len(events))
        if any(event.svix_id in bad for event in events):
            raise RuntimeError("cannot apply this event")
        return real(session, events, now_ms=now_ms)

    monkeypatch.setattr(worker.apply, "apply_events", apply)


def svix_id_of(factory: sessionmaker[Session], inbox_id: int) -> str:
    return rows(factory, [inbox_id])[inbox_id].svix_id


def test_applies_pending_rows_and_rejects_unparseable_ones(session_factory: sessionmaker[Session]) -> None:
    good = store_members(session_factory, 3)
    bad = store(session_factory, NO_ROLE)

    report = apply_inbox(session_factory, [*good, bad], now_ms=NOW, max_attempts=3)

    assert (report.applied, report.rejected, report.skipped, report.failed, report.dead) == (3, 1, 0, 0, 0)
    assert report.retry_ids == []
    assert member_count(session_factory) == 3
    state = rows(session_factory, [*good, bad])
    for inbox_id in good:
        assert state[inbox_id].status == InboxStatus.APPLIED
        assert state[inbox_id].handled_at == NOW
        assert state[inbox_id].attempts == 0
        assert state[inbox_id].last_error is None
    assert state[bad].status == InboxStatus.REJECTED
    assert state[bad].handled_at == NOW
    assert state[bad].last_error is not None
    assert "role" in state[bad].last_error


def test_rerun_and_duplicate_ids_are_skipped(session_factory: sessionmaker[Session]) -> None:
    ids = store_members(session_factory, 4)
    first = apply_inbox(session_factory, [*ids, *ids], now_ms=NOW, max_attempts=3)
    assert first.applied == 4

    again = apply_inbox(session_factory, [*ids, 999_999], now_ms=NOW + 1, max_attempts=3)

    assert (again.applied, again.rejected, again.skipped, again.failed) == (0, 0, 5, 0)
    assert member_count(session_factory) == 4
    assert {row.handled_at for row in rows(session_factory, ids).values()} == {NOW}


def test_empty_batch_does_nothing(session_factory: sessionmaker[Session]) -> None:
    assert apply_inbox(session_factory, [], now_ms=NOW, max_attempts=3) == ApplyReport()


def test_poison_event_is_isolated(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = store_members(session_factory, 9)
    poison = ids[5]
    calls: list[int] = []
    poison_apply(monkeypatch, {svix_id_of(session_factory, poison)}, calls)

    report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3)

    assert (report.applied, report.failed, report.dead) == (8, 1, 0)
    assert report.retry_ids == [poison]
    assert member_count(session_factory) == 8
    state = rows(session_factory, ids)
    bad = state[poison]
    assert bad.status == InboxStatus.PENDING
    assert bad.attempts == 1
    assert bad.last_error == "RuntimeError: cannot apply this event"
    assert bad.next_attempt_at is not None
    assert NOW + 1_000 <= bad.next_attempt_at <= NOW + 2_000
    assert report.retry_at_ms == bad.next_attempt_at
    for inbox_id in ids:
        if inbox_id != poison:
            assert state[inbox_id].status == InboxStatus.APPLIED
            assert state[inbox_id].attempts == 0
    # Halving, not one transaction per row: far fewer calls than rows would need.
    assert len(calls) < 2 * len(ids)


def test_two_poison_events_among_good_ones(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = store_members(session_factory, 16)
    bad = {ids[0], ids[11]}
    poison_apply(monkeypatch, {svix_id_of(session_factory, inbox_id) for inbox_id in bad})

    report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3)

    assert (report.applied, report.failed) == (14, 2)
    assert sorted(report.retry_ids) == sorted(bad)
    assert member_count(session_factory) == 14


def test_dead_after_max_attempts(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = store_members(session_factory, 3)
    poison = ids[1]
    poison_apply(monkeypatch, {svix_id_of(session_factory, poison)})

    reports = [apply_inbox(session_factory, ids, now_ms=NOW + n, max_attempts=3) for n in range(3)]

    assert [report.applied for report in reports] == [2, 0, 0]
    assert [report.failed for report in reports] == [1, 1, 0]
    assert [report.dead for report in reports] == [0, 0, 1]
    assert reports[2].retry_ids == []
    row = rows(session_factory, [poison])[poison]
    assert row.status == InboxStatus.DEAD
    assert row.attempts == 3
    assert row.handled_at == NOW + 2
    assert row.next_attempt_at is None
    assert row.last_error == "RuntimeError: cannot apply this event"
    # A dead row is no longer touched.
    later = apply_inbox(session_factory, ids, now_ms=NOW + 10, max_attempts=3)
    assert (later.skipped, later.failed, later.dead) == (3, 0, 0)


def _raise_retryable(*_: Any, **__: Any) -> None:
    raise RetryableError("mirror lock timed out")


def _raise_connection_error(*_: Any, **__: Any) -> None:
    raise OperationalError(
        "SELECT 1", {"secret": "whsec_c2VjcmV0"}, ConnectionError("server closed the connection")
    )


@pytest.mark.parametrize("failure", [_raise_retryable, _raise_connection_error])
def test_transient_failure_charges_every_row_once(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, failure: Any
) -> None:
    ids = store_members(session_factory, 5)
    calls: list[int] = []

    def apply(session: Session, events: Sequence[Event], *, now_ms: int) -> None:
        calls.append(len(events))
        failure()

    monkeypatch.setattr(worker.apply, "apply_events", apply)

    report = apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3)

    # Not the events' fault: no halving, every row charged one attempt and backed off.
    assert calls == [5]
    assert (report.applied, report.failed, report.dead) == (0, 5, 0)
    assert sorted(report.retry_ids) == ids
    for row in rows(session_factory, ids).values():
        assert row.status == InboxStatus.PENDING
        assert row.attempts == 1
        assert row.next_attempt_at is not None
        assert NOW + 1_000 <= row.next_attempt_at <= NOW + 2_000
        assert row.last_error is not None
        assert "whsec_" not in row.last_error
        assert "SELECT" not in row.last_error
    assert member_count(session_factory) == 0

    monkeypatch.undo()
    retry = apply_inbox(session_factory, report.retry_ids, now_ms=NOW + 5_000, max_attempts=3)
    assert retry.applied == 5
    assert member_count(session_factory) == 5
    assert {row.attempts for row in rows(session_factory, ids).values()} == {1}


def test_backoff_grows_with_attempts(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = store_members(session_factory, 1)
    monkeypatch.setattr(worker.apply, "apply_events", _raise_retryable)
    delays = []
    for n in range(4):
        apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=10)
        row = rows(session_factory, ids)[ids[0]]
        assert row.attempts == n + 1
        assert row.next_attempt_at is not None
        delays.append(row.next_attempt_at - NOW)
    for attempt, delay in enumerate(delays, start=1):
        ceiling = 2_000 * 2 ** (attempt - 1)
        assert ceiling // 2 <= delay <= ceiling


def test_unrecordable_failure_raises_retryable(tmp_path: Any) -> None:
    from conftest import free_port

    engine = create_db_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere",
        connect_args={"connect_timeout": 2},
    )
    try:
        with pytest.raises(RetryableError):
            apply_inbox(make_session_factory(engine), [1, 2], now_ms=NOW, max_attempts=3)
    finally:
        engine.dispose()


def test_backoff_bounds() -> None:
    assert backoff_ms(1, rand=lambda: 0.0) == 1_000
    assert backoff_ms(1, rand=lambda: 0.999999) <= 2_000
    assert backoff_ms(3, rand=lambda: 0.0) == 4_000
    assert backoff_ms(60, rand=lambda: 0.999999) <= BACKOFF_CAP_MS
    assert backoff_ms(60, rand=lambda: 0.0) == BACKOFF_CAP_MS // 2


def test_describe_error_leaves_out_parameters_and_secrets() -> None:
    error = IntegrityError(
        "INSERT INTO memberships VALUES (%(private_metadata)s)",
        {"private_metadata": "salary 100"},
        Exception("duplicate key value violates unique constraint\nDETAIL: Key (id)=(orgmem_1)"),
    )
    text = describe_error(error)
    assert text == "Exception: duplicate key value violates unique constraint"
    leaked = describe_error(RuntimeError("bad key sk_live_abcdef0123 in postgresql://u:hunter2@db/x"))
    assert "abcdef0123" not in leaked
    assert "hunter2" not in leaked


def test_concurrent_duplicate_tasks_apply_each_row_once(session_factory: sessionmaker[Session]) -> None:
    ids = store_members(session_factory, 40)
    reports: list[ApplyReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reports.append(apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sum(report.applied for report in reports) == 40
    assert sum(report.skipped for report in reports) == 3 * 40
    assert member_count(session_factory) == 40


# --- the sweeper ---------------------------------------------------------------------------


def test_sweeper_sends_only_due_rows_in_chunks(session_factory: sessionmaker[Session]) -> None:
    old = store_members(session_factory, 5, org="org_old")
    fresh = store(session_factory, membership_body("org_new", "user_new"), received_at=NOW - 100)
    backing_off = store(session_factory, membership_body("org_b", "user_b"))
    done = store(session_factory, membership_body("org_d", "user_d"))
    apply_inbox(session_factory, [done], now_ms=NOW, max_attempts=3)
    with session_scope(session_factory) as session:
        session.execute(
            update(InboxEvent).where(InboxEvent.id == backing_off).values(next_attempt_at=NOW + 1)
        )

    sent: list[list[int]] = []
    count = sweep_inbox(
        session_factory, sent.append, now_ms=NOW, grace_ms=1_000, lease_ms=60_000, batch_size=2, limit=100
    )

    assert count == 5
    assert sent == [old[0:2], old[2:4], old[4:5]]
    state = rows(session_factory, [*old, fresh, backing_off])
    assert {state[inbox_id].next_attempt_at for inbox_id in old} == {NOW + 60_000}
    assert {state[inbox_id].attempts for inbox_id in old} == {0}
    assert state[fresh].next_attempt_at is None
    assert state[backing_off].next_attempt_at == NOW + 1

    # Leased rows are not sent again until the lease runs out.
    again: list[list[int]] = []
    sweep_inbox(
        session_factory,
        again.append,
        now_ms=NOW + 2,
        grace_ms=1_000,
        lease_ms=60_000,
        batch_size=10,
        limit=100,
    )
    assert again == [[backing_off]]
    later: list[list[int]] = []
    sweep_inbox(
        session_factory,
        later.append,
        now_ms=NOW + 60_000,
        grace_ms=1_000,
        lease_ms=60_000,
        batch_size=10,
        limit=100,
    )
    assert later == [[*old, fresh]]


def test_sweeper_respects_limit(session_factory: sessionmaker[Session]) -> None:
    ids = store_members(session_factory, 5)
    sent: list[list[int]] = []
    assert (
        sweep_inbox(session_factory, sent.append, now_ms=NOW, grace_ms=0, lease_ms=1, batch_size=2, limit=3)
        == 3
    )
    assert sent == [ids[0:2], ids[2:3]]


def test_sweeper_send_failure_leaves_unsent_rows_due(session_factory: sessionmaker[Session]) -> None:
    ids = store_members(session_factory, 4)
    sent: list[list[int]] = []

    def flaky(chunk: list[int]) -> None:
        if sent:
            raise ConnectionError("broker down")
        sent.append(chunk)

    with pytest.raises(ConnectionError):
        sweep_inbox(session_factory, flaky, now_ms=NOW, grace_ms=0, lease_ms=60_000, batch_size=2, limit=10)

    state = rows(session_factory, ids)
    assert [state[inbox_id].next_attempt_at for inbox_id in ids] == [NOW + 60_000, NOW + 60_000, None, None]
    retry: list[list[int]] = []
    sweep_inbox(
        session_factory, retry.append, now_ms=NOW + 1, grace_ms=0, lease_ms=60_000, batch_size=2, limit=10
    )
    assert retry == [ids[2:4]]


def test_sweeper_does_not_shorten_a_backoff(session_factory: sessionmaker[Session]) -> None:
    (inbox_id,) = store_members(session_factory, 1)

    def send_and_fail(chunk: list[int]) -> None:
        # The task ran (and failed) before the sweeper got to write its lease.
        with session_scope(session_factory) as session:
            session.execute(
                update(InboxEvent).where(InboxEvent.id.in_(chunk)).values(next_attempt_at=NOW + 500_000)
            )

    sweep_inbox(
        session_factory, send_and_fail, now_ms=NOW, grace_ms=0, lease_ms=60_000, batch_size=10, limit=10
    )
    assert rows(session_factory, [inbox_id])[inbox_id].next_attempt_at == NOW + 500_000


# --- the Celery app, without a worker ------------------------------------------------------


def test_create_celery_configuration(tmp_path: Any) -> None:
    settings = Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path), "ORGSYNC_SWEEP_INTERVAL": "7"})
    app = create_celery(settings)
    assert TASK_APPLY in app.tasks
    assert TASK_SWEEP in app.tasks
    conf = app.conf
    # The embedded broker: kombu's SQLAlchemy transport, woken up by publishers (worker.wakeup).
    assert conf.broker_url.startswith("sqlite:///")
    assert conf.broker_transport == "worker.wakeup:Transport"
    assert conf.broker_transport_options["wake_dir"].endswith("broker.db.wake")
    assert "visibility_timeout" not in conf.broker_transport_options
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert conf.accept_content == ["json"]
    schedule = conf.beat_schedule["orgsync-sweep-inbox"]
    assert schedule["task"] == TASK_SWEEP
    assert schedule["schedule"] == 7.0
    assert app.orgsync_settings is settings

    redis_app = create_celery(
        Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path), "BROKER_URL": "redis://h:1/0"})
    )
    assert redis_app.conf.broker_transport_options["visibility_timeout"] > BACKOFF_CAP_MS / 1000
    # Each app runs its own tasks, bound to its own settings and engine.
    assert redis_app.tasks[TASK_APPLY].run is not app.tasks[TASK_APPLY].run
    assert redis_app.tasks[TASK_SWEEP].run is not app.tasks[TASK_SWEEP].run


# kombu's SQLAlchemy transport declares a relationship with lazy="noload", deprecated in SQLAlchemy 2.1.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
def test_embedded_broker_accepts_sends_and_readiness(tmp_path: Any) -> None:
    app = create_celery(Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path)}))
    check_broker(app)
    from worker.app import make_sender

    make_sender(app)([1, 2, 3])
    with app.connection_for_read() as connection, connection.SimpleQueue("orgsync") as queue:
        message = queue.get(timeout=5)
        assert message.headers["task"] == TASK_APPLY
        assert message.payload[0] == [[1, 2, 3]]
        message.ack()


def test_process_database_builds_lazily_and_disposes(engine: Engine) -> None:
    database = ProcessDatabase(engine.url.render_as_string(hide_password=False))
    factory = database.session_factory()
    assert database.session_factory() is factory
    with session_scope(factory) as session:
        assert session.scalar(select(func.count()).select_from(InboxEvent)) == 0
    database.stop()
    assert database.session_factory() is not factory
    database.stop()


def eager_app(sqlite_url: str, tmp_path: Any) -> Any:
    settings = Settings.from_env(
        {"DATABASE_URL": sqlite_url, "ORGSYNC_DATA_DIR": str(tmp_path), "ORGSYNC_MAX_ATTEMPTS": "3"}
    )
    return create_celery(settings)


def test_task_retries_failed_rows_until_dead(
    sqlite_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = eager_app(sqlite_url, tmp_path)
    factory = app.orgsync_database.session_factory()
    try:
        ids = store_members(factory, 4)
        poison = ids[2]
        calls: list[int] = []
        poison_apply(monkeypatch, {svix_id_of(factory, poison)}, calls)

        # Run in this process: a retry runs at once, so the whole retry chain is observable.
        app.tasks[TASK_APPLY].apply(args=[ids])

        state = rows(factory, ids)
        assert state[poison].status == InboxStatus.DEAD
        assert state[poison].attempts == 3
        assert [state[inbox_id].status for inbox_id in ids if inbox_id != poison] == [InboxStatus.APPLIED] * 3
        # The retries carried only the poison row.
        assert calls[-2:] == [1, 1]
    finally:
        app.orgsync_database.stop()


def test_task_gives_up_to_the_sweeper_when_the_database_stays_down(
    sqlite_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = eager_app(sqlite_url, tmp_path)
    factory = app.orgsync_database.session_factory()
    try:
        ids = store_members(factory, 2)
        calls: list[list[int]] = []

        def database_down(_factory: Any, inbox_ids: list[int], **_: Any) -> ApplyReport:
            calls.append(inbox_ids)
            raise RetryableError("database unavailable: OperationalError")

        monkeypatch.setattr("worker.app.apply_inbox", database_down)

        result = app.tasks[TASK_APPLY].apply(args=[ids])

        # The first run and max_attempts retries, then the task ends without an error.
        assert calls == [ids] * 4
        assert result.successful()
        assert {row.status for row in rows(factory, ids).values()} == {InboxStatus.PENDING}
    finally:
        app.orgsync_database.stop()


def test_sweep_task_sends_due_rows(sqlite_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": sqlite_url, "ORGSYNC_DATA_DIR": str(tmp_path), "ORGSYNC_SWEEP_GRACE": "0.001"}
    )
    app = create_celery(settings)
    factory = app.orgsync_database.session_factory()
    try:
        ids = store_members(factory, 3)
        sent: list[tuple[str, Any]] = []
        monkeypatch.setattr(app, "send_task", lambda name, args, **_: sent.append((name, args)))

        result = app.tasks[TASK_SWEEP].apply()

        assert result.get() == 3
        assert sent == [(TASK_APPLY, [ids])]
    finally:
        app.orgsync_database.stop()


def test_a_lagging_task_fills_its_batch_with_other_due_rows(session_factory: sessionmaker[Session]) -> None:
    ids = store_members(session_factory, 12)
    # Backing off (not yet due): must be left alone by the filling.
    later = store(session_factory, membership_body("org_b", "user_late"))
    with session_scope(session_factory) as session:
        session.execute(update(InboxEvent).where(InboxEvent.id == later).values(next_attempt_at=NOW + 60_000))
    report = apply_inbox(session_factory, ids[:2], now_ms=NOW, max_attempts=3, fill_to=10)
    assert report.applied == 10
    state = rows(session_factory, [*ids, later])
    assert [state[i].status for i in ids[:10]] == [InboxStatus.APPLIED] * 10
    assert {state[i].status for i in [*ids[10:], later]} == {InboxStatus.PENDING}
    # The other tasks of the rows taken find nothing left to do.
    assert apply_inbox(session_factory, ids[2:10], now_ms=NOW, max_attempts=3).skipped == 8


class ProcessKilled(BaseException):
    """Stands for the worker process dying in the middle of a batch."""


def test_an_event_that_kills_its_worker_ends_dead_on_redelivery(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = store_members(session_factory, 5)
    killer = ids[2]
    real = worker.apply.apply_events
    killer_svix = svix_id_of(session_factory, killer)

    def apply(session: Session, events: Sequence[Event], *, now_ms: int) -> int:
        if any(event.svix_id == killer_svix for event in events):
            raise ProcessKilled
        return real(session, events, now_ms=now_ms)

    monkeypatch.setattr(worker.apply, "apply_events", apply)
    # The first delivery dies with its worker: nothing is recorded.
    with pytest.raises(ProcessKilled):
        apply_inbox(session_factory, ids, now_ms=NOW, max_attempts=3)
    assert {row.attempts for row in rows(session_factory, ids).values()} == {0}
    # Each redelivery charges before trying, one row at a time, so the loop has an end.
    for n in range(1, 4):
        try:
            apply_inbox(session_factory, ids, now_ms=NOW + n, max_attempts=3, one_by_one=True)
        except ProcessKilled:
            continue
        break
    state = rows(session_factory, ids)
    assert state[killer].status == InboxStatus.DEAD
    assert "worker process ended" in (state[killer].last_error or "")
    assert all(state[i].status == InboxStatus.APPLIED for i in ids if i != killer)
    assert member_count(session_factory) == 4
