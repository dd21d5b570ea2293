"""The inbox: store once per svix id, classify envelopes, list, replay and sweep."""

from __future__ import annotations

import json
import threading

import pytest
from helpers import new_msg_id
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from emulator.payloads import webhook_body
from models.db import make_session_factory, session_scope
from models.errors import PermanentError
from models.inbox import KNOWN_EVENT_TYPES, due_pending_ids, list_events, reset_for_replay, store_delivery
from models.tables import InboxEvent, InboxStatus

MEMBERSHIP = webhook_body("organizationMembership.created", {"id": "orgmem_1"}, 1_700_000_000_000)


def store(factory: sessionmaker[Session], body: str, *, svix_id: str | None = None, at: int = 1000) -> int:
    with session_scope(factory) as session:
        return store_delivery(session, svix_id=svix_id or new_msg_id(), body=body, received_at=at).inbox_id


def count_rows(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        return int(session.scalar(select(func.count()).select_from(InboxEvent)) or 0)


def test_known_event_types_are_the_mirrored_ones() -> None:
    assert len(KNOWN_EVENT_TYPES) == 21
    assert "organizationMembership.deleted" in KNOWN_EVENT_TYPES
    assert "organizationInvitation.accepted" in KNOWN_EVENT_TYPES
    assert "session.created" not in KNOWN_EVENT_TYPES


def test_store_pending_event(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        stored = store_delivery(session, svix_id="msg_a", body=MEMBERSHIP, received_at=1234)
    assert stored.duplicate is False
    assert stored.status == InboxStatus.PENDING
    with session_scope(session_factory) as session:
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None
        assert row.svix_id == "msg_a"
        assert row.event_type == "organizationMembership.created"
        assert row.body == MEMBERSHIP
        assert row.received_at == 1234
        assert row.attempts == 0
        assert row.handled_at is None
        assert row.last_error is None


def test_duplicate_svix_id_is_stored_once(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        first = store_delivery(session, svix_id="msg_dup", body=MEMBERSHIP, received_at=1)
    with session_scope(session_factory) as session:
        second = store_delivery(session, svix_id="msg_dup", body=MEMBERSHIP, received_at=2)
    assert second.duplicate is True
    assert second.inbox_id == first.inbox_id
    assert second.status == InboxStatus.PENDING
    assert count_rows(session_factory) == 1


def test_duplicate_reports_the_existing_status(session_factory: sessionmaker[Session]) -> None:
    inbox_id = store(session_factory, MEMBERSHIP, svix_id="msg_done")
    with session_scope(session_factory) as session:
        session.execute(update(InboxEvent).where(InboxEvent.id == inbox_id).values(status="applied"))
    with session_scope(session_factory) as session:
        again = store_delivery(session, svix_id="msg_done", body=MEMBERSHIP, received_at=2)
    assert again.duplicate and again.status == InboxStatus.APPLIED


@pytest.mark.parametrize(
    ("body", "reason_prefix"),
    [
        ("not json at all", "not_json:"),
        ("", "not_json:"),
        ("[" * 100_000, "not_json:"),
        ("[1, 2]", "not_an_object:"),
        ('"text"', "not_an_object:"),
        ('{"object": "event", "data": {}}', "not_an_event: 'type'"),
        ('{"type": 5, "object": "event", "data": {}}', "not_an_event: 'type'"),
        ('{"type": "user.created", "object": "user", "data": {}}', "not_an_event: 'object'"),
        ('{"type": "user.created", "object": "event", "data": []}', "not_an_event: 'data'"),
        ('{"type": "user.created", "object": "event"}', "not_an_event: 'data'"),
    ],
)
def test_bad_envelopes_are_stored_rejected(
    session_factory: sessionmaker[Session], body: str, reason_prefix: str
) -> None:
    with session_scope(session_factory) as session:
        stored = store_delivery(session, svix_id=new_msg_id(), body=body, received_at=77)
    assert stored.status == InboxStatus.REJECTED
    assert stored.reason is not None and stored.reason.startswith(reason_prefix)
    with session_scope(session_factory) as session:
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None
        assert row.status == InboxStatus.REJECTED
        assert row.last_error == stored.reason
        assert row.body == body
        assert row.handled_at == 77


def test_nul_in_a_rejected_body_is_kept_readably(session_factory: sessionmaker[Session]) -> None:
    # PostgreSQL text refuses NUL; the delivery must still be stored (and so acknowledged).
    with session_scope(session_factory) as session:
        stored = store_delivery(session, svix_id=new_msg_id(), body="a\x00b", received_at=1)
    assert stored.status == InboxStatus.REJECTED
    with session_scope(session_factory) as session:
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None and row.body == "a\ufffdb"


def test_unknown_type_is_stored_ignored(session_factory: sessionmaker[Session]) -> None:
    body = webhook_body("session.created", {"id": "sess_1"}, 1)
    with session_scope(session_factory) as session:
        stored = store_delivery(session, svix_id=new_msg_id(), body=body, received_at=5)
    assert stored.status == InboxStatus.IGNORED
    with session_scope(session_factory) as session:
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None
        assert row.event_type == "session.created"
        assert row.handled_at == 5


def test_overlong_type_is_truncated_and_ignored(session_factory: sessionmaker[Session]) -> None:
    body = json.dumps({"type": "x" * 500, "object": "event", "data": {}})
    with session_scope(session_factory) as session:
        stored = store_delivery(session, svix_id=new_msg_id(), body=body, received_at=5)
    assert stored.status == InboxStatus.IGNORED
    with session_scope(session_factory) as session:
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None and row.event_type == "x" * 128


def test_overlong_svix_id_is_refused(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(PermanentError), session_scope(session_factory) as session:
        store_delivery(session, svix_id="m" * 129, body=MEMBERSHIP, received_at=1)
    assert count_rows(session_factory) == 0


def test_store_does_not_commit(session_factory: sessionmaker[Session]) -> None:
    session = session_factory()
    try:
        store_delivery(session, svix_id="msg_uncommitted", body=MEMBERSHIP, received_at=1)
        session.rollback()
    finally:
        session.close()
    assert count_rows(session_factory) == 0


def test_list_events_newest_first_and_filtered(session_factory: sessionmaker[Session]) -> None:
    first = store(session_factory, MEMBERSHIP)
    second = store(session_factory, "garbage")
    third = store(session_factory, MEMBERSHIP)
    with session_scope(session_factory) as session:
        assert [row.id for row in list_events(session)] == [third, second, first]
        assert [row.id for row in list_events(session, status="pending")] == [third, first]
        assert [row.id for row in list_events(session, status="rejected")] == [second]
        assert [row.id for row in list_events(session, limit=1)] == [third]
        with pytest.raises(PermanentError, match="unknown inbox status"):
            list_events(session, status="bogus")


def test_reset_for_replay_by_id_and_svix_id(session_factory: sessionmaker[Session]) -> None:
    first = store(session_factory, MEMBERSHIP, svix_id="msg_first")
    second = store(session_factory, "garbage", svix_id="msg_second")
    with session_scope(session_factory) as session:
        session.execute(
            update(InboxEvent)
            .where(InboxEvent.id == first)
            .values(status="dead", attempts=8, last_error="boom", next_attempt_at=99, handled_at=5)
        )
    with session_scope(session_factory) as session:
        ids = reset_for_replay(session, ["msg_first", str(second), "msg_first"])
    assert ids == [first, second]
    with session_scope(session_factory) as session:
        for inbox_id in ids:
            row = session.get(InboxEvent, inbox_id)
            assert row is not None
            assert row.status == InboxStatus.PENDING
            assert row.attempts == 0
            assert row.last_error is None
            assert row.next_attempt_at is None
            assert row.handled_at is None


def test_reset_for_replay_names_unknown_refs_and_changes_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    known = store(session_factory, "garbage", svix_id="msg_known")
    with pytest.raises(PermanentError, match=r"msg_nope, 424242"), session_scope(session_factory) as session:
        reset_for_replay(session, ["msg_known", "msg_nope", "424242"])
    with session_scope(session_factory) as session:
        row = session.get(InboxEvent, known)
        assert row is not None and row.status == InboxStatus.REJECTED


def test_reset_for_replay_refuses_redacted_rows_and_changes_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    kept = store(session_factory, MEMBERSHIP, svix_id="msg_kept")
    redacted = store(session_factory, MEMBERSHIP, svix_id="msg_redacted")
    with session_scope(session_factory) as session:
        session.execute(
            update(InboxEvent)
            .where(InboxEvent.id.in_([kept, redacted]))
            .values(status="applied", handled_at=5)
        )
        session.execute(update(InboxEvent).where(InboxEvent.id == redacted).values(redacted_at=7))
    with (
        pytest.raises(PermanentError, match=r"redacted cannot be replayed: msg_redacted;.*orgsync sync"),
        session_scope(session_factory) as session,
    ):
        reset_for_replay(session, ["msg_kept", str(redacted)])
    with session_scope(session_factory) as session:
        statuses = {row.id: row.status for row in session.scalars(select(InboxEvent))}
    assert statuses == {kept: InboxStatus.APPLIED, redacted: InboxStatus.APPLIED}


def test_due_pending_ids(session_factory: sessionmaker[Session]) -> None:
    old = store(session_factory, MEMBERSHIP, at=1_000)
    recent = store(session_factory, MEMBERSHIP, at=9_500)
    backing_off = store(session_factory, MEMBERSHIP, at=1_000)
    due_retry = store(session_factory, MEMBERSHIP, at=1_000)
    store(session_factory, "garbage", at=1_000)  # rejected: never swept
    with session_scope(session_factory) as session:
        session.execute(update(InboxEvent).where(InboxEvent.id == backing_off).values(next_attempt_at=20_000))
        session.execute(update(InboxEvent).where(InboxEvent.id == due_retry).values(next_attempt_at=10_000))
    with session_scope(session_factory) as session:
        assert due_pending_ids(session, now_ms=10_000, grace_ms=1_000, limit=10) == [old, due_retry]
        assert due_pending_ids(session, now_ms=10_000, grace_ms=1_000, limit=1) == [old]
        assert due_pending_ids(session, now_ms=30_000, grace_ms=1_000, limit=10) == [
            old,
            recent,
            backing_off,
            due_retry,
        ]


def test_concurrent_duplicates_store_one_row(engine: Engine) -> None:
    factory = make_session_factory(engine)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def deliver() -> None:
        try:
            barrier.wait()
            with session_scope(factory) as session:
                stored = store_delivery(session, svix_id="msg_race", body=MEMBERSHIP, received_at=1)
            results.append((stored.inbox_id, stored.duplicate))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({inbox_id for inbox_id, _ in results}) == 1
    assert sorted(duplicate for _, duplicate in results) == [False] + [True] * 7
    assert count_rows(factory) == 1
