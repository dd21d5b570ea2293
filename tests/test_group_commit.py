"""Group commit of the inbox: batches store what single inserts would, and nothing is answered early."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import examples, truncate_all
from helpers import new_msg_id, signed_headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from emulator.payloads import webhook_body
from models.errors import RetryableError
from models.inbox import InboxRow, Stored, inbox_row, store_delivery
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus
from orgsync.web import create_app, get_state
from webhooks.committer import (
    BatchFailedError,
    CommitTimeoutError,
    DatabaseUnavailableError,
    GroupCommitter,
    InboxWriter,
    store_batch,
)

PATH = "/webhooks/clerk"
PENDING = webhook_body("organizationMembership.created", {"id": "orgmem_1"}, 1_700_000_000_000)
IGNORED = webhook_body("session.created", {"id": "sess_1"}, 1_700_000_000_000)
BODIES = (PENDING, IGNORED, "not json")


def rows_in(engine: Engine) -> dict[str, tuple[int, str, str | None]]:
    with Session(engine) as session:
        return {
            row.svix_id: (row.id, row.status, row.last_error)
            for row in session.scalars(select(InboxEvent).order_by(InboxEvent.id))
        }


@pytest.mark.postgres
@settings(
    max_examples=examples(25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    stored_before=st.lists(st.sampled_from("abcdef"), unique=True, max_size=4),
    batch=st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from(BODIES)), min_size=1, max_size=8),
)
def test_a_batch_answers_each_row_as_one_insert_after_another_would(
    pg_engine: Engine, stored_before: list[str], batch: list[tuple[str, str]]
) -> None:
    truncate_all(pg_engine)
    with pg_engine.begin() as connection:
        for svix_id in stored_before:
            store_delivery(connection, svix_id=f"msg_{svix_id}", body=PENDING, received_at=1)
    rows = [inbox_row(svix_id=f"msg_{key}", body=body, received_at=2) for key, body in batch]

    results = store_batch(pg_engine, rows)

    # What storing the rows one by one, each in its own transaction, answers.
    expected: dict[str, Stored] = {}
    answers: list[tuple[bool, str, str | None]] = []
    existing = {f"msg_{key}" for key in stored_before}
    for row in rows:
        first = row.svix_id not in existing and row.svix_id not in expected
        if first:
            expected[row.svix_id] = Stored(0, duplicate=False, status=row.status, reason=row.last_error)
        known = expected.get(row.svix_id)
        status, reason = (known.status, known.reason) if known is not None else (InboxStatus.PENDING, None)
        answers.append((not first, status, reason))
    assert all(isinstance(result, Stored) for result in results)
    stored = [result for result in results if isinstance(result, Stored)]
    assert [(result.duplicate, result.status, result.reason) for result in stored] == answers
    table = rows_in(pg_engine)
    assert set(table) == existing | {row.svix_id for row in rows}
    # Every answer names the row that holds its svix id.
    for row, result in zip(rows, stored, strict=True):
        assert table[row.svix_id][0] == result.inbox_id


@pytest.fixture
def app_settings(tmp_path: Path, signing_secret: str) -> Settings:
    return Settings(
        database_url="sqlite://",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=(signing_secret,),
    )


def test_concurrent_deliveries_are_each_answered_only_once_committed(
    engine: Engine, app_settings: Settings, signing_secret: str
) -> None:
    sent: list[int] = []
    app = create_app(app_settings, engine=engine, send=sent.extend)
    # Some ids twice, so that a batch may hold both copies or meet a row of an earlier batch.
    ids = [new_msg_id() for _ in range(24)]
    deliveries = [*ids, *ids[:8]]
    answers: dict[int, tuple[str, int, str]] = {}
    seen_after_answer: dict[int, bool] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def deliver(lane: int) -> None:
        client = app.test_client()
        try:
            barrier.wait()
            for index in range(lane, len(deliveries), 8):
                msg_id = deliveries[index]
                headers = signed_headers(signing_secret, PENDING, msg_id=msg_id)
                response = client.post(PATH, data=PENDING, headers=headers)
                payload = response.get_json()
                answers[index] = (msg_id, response.status_code, payload["status"])
                # Committed before the answer: another connection sees the row at once.
                with Session(engine) as session:
                    seen_after_answer[index] = (
                        session.scalar(select(InboxEvent.id).where(InboxEvent.svix_id == msg_id))
                        == payload["id"]
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(lane,)) for lane in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
        assert len(answers) == len(deliveries)
        assert all(status == 200 for _, status, _ in answers.values())
        assert all(seen_after_answer.values())
        by_id: dict[str, list[str]] = {}
        for msg_id, _, outcome in answers.values():
            by_id.setdefault(msg_id, []).append(outcome)
        # Each id accepted exactly once, its other copy answered as a duplicate.
        assert all(sorted(outcomes)[0] == "accepted" for outcomes in by_id.values())
        assert sum(outcomes.count("accepted") for outcomes in by_id.values()) == len(ids)
        assert set(rows_in(engine)) == set(ids)
        dispatcher = get_state(app).dispatcher
        assert dispatcher is not None and dispatcher.flush()
        assert sorted(sent) == sorted(row_id for row_id, _, _ in rows_in(engine).values())
    finally:
        get_state(app).close()


# ------------------------------------------------------------ the committer's failure answers


class Gate:
    """A store step that holds each batch until released, recording what it was given."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def __call__(self, engine: Engine, rows: Sequence[InboxRow]) -> list[Stored | RetryableError]:
        self.batches.append([row.svix_id for row in rows])
        self.entered.set()
        self.release.wait(60)
        return store_batch(engine, rows)


@pytest.fixture
def committer_engine(sqlite_engine: Engine) -> Iterator[Engine]:
    yield sqlite_engine


def row(svix_id: str) -> InboxRow:
    return inbox_row(svix_id=svix_id, body=PENDING, received_at=1)


def test_a_request_whose_batch_outlives_the_bound_is_refused_not_answered_early(
    committer_engine: Engine,
) -> None:
    gate = Gate(committer_engine)
    committer = GroupCommitter(committer_engine, gate, wait_bound=0.5)
    try:
        with pytest.raises(CommitTimeoutError):
            committer.commit(row("msg_slow"))
        assert gate.entered.is_set()
        # Queued behind the held batch: also refused, and taken out of the queue.
        with pytest.raises(CommitTimeoutError):
            committer.commit(row("msg_queued"))
        gate.release.set()
        committer.close()  # waits for the held batch
        # The held batch still committed: Svix's redelivery of msg_slow is then a duplicate;
        # the refused request that was still queued was never stored.
        assert gate.batches == [["msg_slow"]]
        assert set(rows_in(committer_engine)) == {"msg_slow"}
    finally:
        gate.release.set()
        committer.close()


def test_a_database_error_refuses_every_request_of_the_batch(committer_engine: Engine) -> None:
    def down(_engine: Engine, _rows: Sequence[InboxRow]) -> list[Stored | RetryableError]:
        raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    committer = GroupCommitter(committer_engine, down)
    try:
        with pytest.raises(DatabaseUnavailableError, match="OperationalError"):
            committer.commit(row("msg_down"))
    finally:
        committer.close()


def test_a_bug_in_the_store_step_is_logged_once_and_fails_the_requests(
    committer_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_engine: Engine, _rows: Sequence[InboxRow]) -> list[Stored | RetryableError]:
        raise KeyError("internal detail")

    committer = GroupCommitter(committer_engine, broken)
    try:
        with caplog.at_level(logging.ERROR, logger="webhooks.committer"), pytest.raises(BatchFailedError):
            committer.commit(row("msg_bug"))
        assert [record.exc_info is not None for record in caplog.records] == [True]
    finally:
        committer.close()


def test_after_close_deliveries_are_refused(committer_engine: Engine) -> None:
    committer = GroupCommitter(committer_engine, store_batch)
    assert committer.commit(row("msg_before")).status == InboxStatus.PENDING
    committer.close()
    with pytest.raises(DatabaseUnavailableError):
        committer.commit(row("msg_after"))


# ------------------------------------------------------- the committer's connection between batches


class Checkouts:
    """Counts the engine's pool checkouts and checkins."""

    def __init__(self, engine: Engine) -> None:
        self.out = 0
        self.back = 0
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "checkin", self._checkin)

    def _checkout(self, *_args: Any) -> None:
        self.out += 1

    def _checkin(self, *_args: Any) -> None:
        self.back += 1


@pytest.mark.postgres
def test_the_writer_keeps_its_connection_for_back_to_back_batches_only(pg_engine: Engine) -> None:
    now = [0.0]
    writer = InboxWriter(pg_engine, hold_s=1.0, clock=lambda: now[0])
    pool = Checkouts(pg_engine)
    try:
        assert isinstance(writer(pg_engine, [row("msg_1")])[0], Stored)
        now[0] = 0.5
        assert isinstance(writer(pg_engine, [row("msg_2"), row("msg_3")])[0], Stored)
        assert (pool.out, pool.back) == (1, 0) and writer.holding
        now[0] = 1.0  # held for hold_s: given back, and a fresh checkout for this batch
        again = writer(pg_engine, [row("msg_2")])
        assert again == [Stored(2, duplicate=True, status="pending", reason=None)]
        assert (pool.out, pool.back) == (2, 1)
        writer.release()
        assert (pool.out, pool.back) == (2, 2) and not writer.holding
        # Given back as the pool lent it: a session on it runs in a transaction again.
        with pg_engine.connect() as connection:
            assert connection.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
        assert set(rows_in(pg_engine)) == {"msg_1", "msg_2", "msg_3"}
    finally:
        writer.release()


@pytest.mark.postgres
def test_a_connection_that_fails_is_dropped_and_the_next_batch_gets_another(pg_engine: Engine) -> None:
    writer = InboxWriter(pg_engine, hold_s=60.0)
    try:
        writer(pg_engine, [row("msg_a")])
        held = writer._held.dbapi_connection
        held.pgconn.finish()  # the server went away under it
        with pytest.raises(psycopg.OperationalError):
            writer(pg_engine, [row("msg_b")])
        assert not writer.holding
        assert isinstance(writer(pg_engine, [row("msg_b")])[0], Stored)
        assert writer._held.dbapi_connection is not held
    finally:
        writer.release()
    assert set(rows_in(pg_engine)) == {"msg_a", "msg_b"}


def test_the_committer_calls_idle_when_nothing_is_queued(committer_engine: Engine) -> None:
    idle = threading.Semaphore(0)
    calls: list[str] = []

    def store(engine: Engine, rows: Sequence[InboxRow]) -> list[Stored | RetryableError]:
        calls.append("store")
        return store_batch(engine, rows)

    def on_idle() -> None:
        calls.append("idle")
        idle.release()

    committer = GroupCommitter(committer_engine, store, idle=on_idle)
    try:
        committer.commit(row("msg_1"))
        assert idle.acquire(timeout=10)
        committer.commit(row("msg_2"))
        assert idle.acquire(timeout=10)
    finally:
        committer.close()
    # Once after each batch that emptied the queue, and once more on the way out.
    assert calls == ["store", "idle", "store", "idle", "idle"]
