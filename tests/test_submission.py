"""The one submission service: resolve, split, record, commit, enqueue after the commit, wait."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from test_cli_commands import ORG, seed

from models.commands import MAX_BULK, CommandRequest, InvalidCommandError
from models.db import make_session_factory, session_scope
from models.errors import OrganizationNotFoundError
from models.submission import CommandService, all_settled, split_request
from models.tables import Command, CommandKind, CommandStatus


def remove_bob(org: str = "acme") -> CommandRequest:
    return CommandRequest(CommandKind.REMOVE_MEMBER, org, "test", user_id="user_bob")


def bulk(count: int, key: str | None = None) -> CommandRequest:
    emails = [f"p{n}@acme.test" for n in range(count)]
    return CommandRequest(
        CommandKind.BULK_INVITE,
        "acme",
        "test",
        role="org:member",
        payload={"email_addresses": emails, "redirect_url": "https://acme.test/welcome"},
        idempotency_key=key,
    )


def test_bulk_invites_split_at_clerks_limit() -> None:
    assert split_request(bulk(MAX_BULK, "k")) == [bulk(MAX_BULK, "k")]
    parts = split_request(bulk(MAX_BULK + 1, "k"))
    assert [len(p.payload["email_addresses"]) for p in parts if p.payload] == [MAX_BULK, 1]
    assert [p.idempotency_key for p in parts] == ["k:1", "k:2"]
    # Every part keeps the other invite options.
    assert all(p.payload and p.payload["redirect_url"] == "https://acme.test/welcome" for p in parts)
    assert [p.idempotency_key for p in split_request(bulk(2 * MAX_BULK + 1))] == [None, None, None]


class Sender:
    def __init__(self, engine: Engine, *, fail: bool = False) -> None:
        self.engine = engine
        self.fail = fail
        self.sent: list[int] = []

    def __call__(self, ids: list[int]) -> None:
        # After the commit: another session sees the rows.
        with session_scope(make_session_factory(self.engine)) as session:
            assert list(session.scalars(select(Command.id).where(Command.id.in_(ids)))) == ids
        if self.fail:
            raise ConnectionError("redis://:secret@broker:6379 refused")
        self.sent.extend(ids)


@pytest.fixture
def service_engine(sqlite_engine: Engine) -> Engine:
    seed(sqlite_engine)
    return sqlite_engine


def test_submit_resolves_the_slug_records_all_parts_together_and_enqueues(service_engine: Engine) -> None:
    send = Sender(service_engine)
    service = CommandService(make_session_factory(service_engine), send)
    submitted = service.submit([bulk(25), remove_bob(ORG)])
    assert [c.kind for c in submitted.commands] == [CommandKind.BULK_INVITE] * 3 + [CommandKind.REMOVE_MEMBER]
    assert {c.organization_id for c in submitted.commands} == {ORG}
    assert submitted.enqueued and send.sent == submitted.open_ids == [c.id for c in submitted.commands]


def test_one_refusal_records_none_of_the_requests(service_engine: Engine) -> None:
    send = Sender(service_engine)
    service = CommandService(make_session_factory(service_engine), send)
    with pytest.raises(OrganizationNotFoundError, match="'nope'"):
        service.submit([remove_bob(), remove_bob("nope")])
    revoke = CommandRequest(
        CommandKind.REVOKE_INVITATION,
        ORG,
        "test",
        invitation_id="orginv_dan",
        payload={"requesting_user_id": 7},
    )
    with pytest.raises(InvalidCommandError, match=r"payload\.requesting_user_id: must be a string"):
        service.submit([remove_bob(), revoke])
    assert service.load(range(1, 10)) == []
    assert send.sent == []


def test_a_broker_failure_is_reported_redacted_and_the_command_stays_pending(service_engine: Engine) -> None:
    service = CommandService(make_session_factory(service_engine), Sender(service_engine, fail=True))
    submitted = service.submit([remove_bob()])
    assert not submitted.enqueued
    assert submitted.enqueue_error is not None
    assert "ConnectionError" in submitted.enqueue_error and "secret" not in submitted.enqueue_error
    [row] = service.load(submitted.open_ids)
    assert row.status == CommandStatus.PENDING


def test_wait_returns_the_rows_once_settled_or_at_the_timeout(service_engine: Engine) -> None:
    factory = make_session_factory(service_engine)
    service = CommandService(factory, Sender(service_engine), poll_interval_s=0.01)
    submitted = service.submit([remove_bob()])
    [pending] = service.wait(submitted.open_ids, 0)
    assert pending.status == CommandStatus.PENDING and not all_settled([pending])

    def worker(rows: list[Command]) -> None:
        with session_scope(factory) as session:
            session.get_one(Command, rows[0].id).status = CommandStatus.APPLIED

    [applied] = service.wait(submitted.open_ids, 30, on_poll=worker)
    assert applied.status == CommandStatus.APPLIED
