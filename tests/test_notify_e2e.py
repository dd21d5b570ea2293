"""Change notifications end to end: signed webhooks into ``orgsync serve``, applied by a real
``orgsync worker``, announced by it and its beat to a loopback receiver that fails for a while."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_SIGNING_SECRET
from histories import generate_history
from sqlalchemy import Engine, func, select
from stack import FAST_SWEEPS, TEST_BOUND_S, hermetic_env, running_stack
from svix.webhooks import Webhook
from test_convergence import deliver
from test_notifications import announced, mirrored, outbox
from test_notify_delivery import NOTIFY_SECRET, Receiver, assert_in_order_per_key, serve_receiver

from emulator.payloads import webhook_body
from models.tables import InboxEvent, InboxStatus, Notification, NotificationStatus

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(TEST_BOUND_S)]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    with serve_receiver() as served:
        yield served


def _count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def test_a_receiver_down_for_a_while_gets_the_net_changes_in_order(
    pg_engine: Engine, pg_url: str, redis_url: str, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    down = {"now": True}
    state.refuse = lambda _body: down["now"]
    env = hermetic_env(
        database_url=pg_url,
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=TEST_SIGNING_SECRET,
        ORGSYNC_NOTIFY_URLS=url,
        ORGSYNC_NOTIFY_SECRET=NOTIFY_SECRET,
        ORGSYNC_NOTIFY_INTERVAL="0.5",
        ORGSYNC_NOTIFY_RETRY_BASE="0.2",
        **FAST_SWEEPS,
    )
    events = generate_history(334, 50).events
    deliveries = [event for batch in deliver(events, random.Random(5)) for event in batch]
    inbox = InboxEvent.__table__
    notifications = Notification.__table__
    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_web()
        stack.start_worker(beat=True)
        for event in deliveries:
            body = webhook_body(event.type, event.data, event.timestamp_ms)
            assert stack.post(body, TEST_SIGNING_SECRET, msg_id=event.svix_id) in (200, 204)
        stack.wait_for(
            "every delivery applied",
            lambda: (
                True
                if _count(pg_engine, inbox) == len(events)
                and _count(pg_engine, inbox, inbox.c.status == InboxStatus.PENDING) == 0
                else None
            ),
        )
        # The receiver refuses: the heads of the keys are retried, none is delivered.
        stack.wait_for(
            "retries while the receiver is down",
            lambda: True if _count(pg_engine, notifications, notifications.c.attempts >= 2) else None,
        )
        assert _count(pg_engine, notifications, notifications.c.status == NotificationStatus.DELIVERED) == 0
        down["now"] = False
        stack.wait_for(
            "every notification delivered",
            lambda: (
                True
                if _count(pg_engine, notifications, notifications.c.status != NotificationStatus.DELIVERED)
                == 0
                else None
            ),
        )
    rows = outbox(pg_engine)
    bodies = state.accepted()
    assert sorted(body["id"] for body in bodies) == sorted(row["event_id"] for row in rows)
    assert_in_order_per_key(bodies, rows)
    heard = [{"type": b["type"], "object_id": b["data"]["object"]["id"], "data": b["data"]} for b in bodies]
    assert announced(heard) == mirrored(pg_engine)
    verifier = Webhook(NOTIFY_SECRET)
    for headers, raw in state.requests:
        verifier.verify(raw, headers)
