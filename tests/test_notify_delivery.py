"""The outbox delivered over real HTTP to a loopback receiver: signed, in order per organization,
retried until the receiver recovers, dead after the configured time."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import TEST_SIGNING_SECRET
from histories import generate_history
from sqlalchemy import Engine, select
from svix.webhooks import Webhook
from test_convergence import apply_in_batches, deliver
from test_notifications import announced, clear, mirrored, outbox

from models import notifications
from models.db import make_session_factory
from models.tables import Notification, NotificationStatus
from worker.notify import Sender, drain

NOTIFY_SECRET = TEST_SIGNING_SECRET


@dataclass
class Receiver:
    """A loopback HTTP server recording every request; ``refuse(body)`` says which to answer 503."""

    refuse: Callable[[dict[str, Any]], bool] = lambda _body: False
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[dict[str, Any]]:
        """Bodies answered 2xx, first time each id, in arrival order."""
        seen: set[str] = set()
        result = []
        with self.lock:
            for headers, raw in self.requests:
                body = json.loads(raw)
                if headers.get("x-answer") == "200" and body["id"] not in seen:
                    seen.add(body["id"])
                    result.append(body)
        return result


@contextmanager
def serve_receiver() -> Iterator[tuple[Receiver, str]]:
    """A ``Receiver`` on a free loopback port and its URL (with a token, as receivers' often carry)."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["content-length"]))
            body = json.loads(raw)
            status = 503 if state.refuse(body) else 200
            headers = {key.lower(): value for key, value in self.headers.items()}
            headers["x-answer"] = str(status)
            with state.lock:
                state.requests.append((headers, raw))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/hooks?token=s3cret"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    with serve_receiver() as served:
        yield served


@pytest.fixture(autouse=True)
def outbox_on() -> Iterator[None]:
    with notifications.configured(outbox=True):
        yield


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def run_drain(engine: Engine, sender: Sender, clock: Clock, *, dead_after_ms: int = 10**12) -> Any:
    return drain(
        make_session_factory(engine), sender, clock_ms=clock, dead_after_ms=dead_after_ms, retry_base_s=1.0
    )


def test_a_receiver_gets_exactly_the_net_changes_signed(
    engine: Engine, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    events = generate_history(334, 80).events
    clear(engine)
    apply_in_batches(engine, deliver(events, random.Random(7)))
    rows = outbox(engine)
    assert rows

    sender = Sender([url], NOTIFY_SECRET, timeout_s=10)
    try:
        report = run_drain(engine, sender, Clock(2_000_000_000_000))
    finally:
        sender.close()
    assert report.delivered == len(rows)
    assert {row["status"] for row in outbox(engine)} == {NotificationStatus.DELIVERED}

    bodies = state.accepted()
    assert sorted(body["id"] for body in bodies) == sorted(row["event_id"] for row in rows)
    assert_in_order_per_key(bodies, rows)
    assert len(state.requests) == len(rows)
    verifier = Webhook(NOTIFY_SECRET)
    for headers, raw in state.requests:
        verifier.verify(raw, headers)  # raises on a bad signature
        assert headers["webhook-id"] == json.loads(raw)["id"]
    body = bodies[0]
    assert set(body) == {"id", "type", "timestamp", "data"}
    assert body["timestamp"].endswith("Z")
    # What the receiver heard nets out to the mirror, as the outbox does.
    heard = [{"type": b["type"], "object_id": b["data"]["object"]["id"], "data": b["data"]} for b in bodies]
    assert announced(heard) == mirrored(engine)


def _history_rows(engine: Engine) -> list[dict[str, Any]]:
    events = generate_history(11, 80).events
    clear(engine)
    apply_in_batches(engine, deliver(events, random.Random(3)))
    return outbox(engine)


def test_a_failing_receiver_gets_everything_in_order_per_organization_after_it_recovers(
    engine: Engine, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    rows = _history_rows(engine)
    keys = sorted({row["ordering_key"] for row in rows})
    assert len(keys) > 2
    broken = {keys[0], keys[1]}
    down = {"all": True}
    state.refuse = lambda body: down["all"] or ordering_key(body) in broken
    clock = Clock(2_000_000_000_000)
    sender = Sender([url], NOTIFY_SECRET, timeout_s=10)
    try:
        first = run_drain(engine, sender, clock)
        assert first.delivered == 0
        assert first.failed == len(keys)  # each key's head tried once, nothing after it
        # Up again for every organization but two: those wait, the others go on.
        down["all"] = False
        clock.now += 1_000
        second = run_drain(engine, sender, clock)
        assert second.delivered == sum(1 for row in rows if row["ordering_key"] not in broken)
        # Still failing, not yet due: nothing is tried.
        tried = len(state.requests)
        assert run_drain(engine, sender, clock).delivered == 0
        assert len(state.requests) == tried
        state.refuse = lambda _body: False
        clock.now += 3_600_000
        third = run_drain(engine, sender, clock)
        assert third.delivered == sum(1 for row in rows if row["ordering_key"] in broken)
    finally:
        sender.close()
    bodies = state.accepted()
    assert sorted(body["id"] for body in bodies) == sorted(row["event_id"] for row in rows)
    assert_in_order_per_key(bodies, rows)
    attempts = {row["event_id"]: row["attempts"] for row in outbox(engine)}
    assert max(attempts.values()) >= 3


def assert_in_order_per_key(bodies: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Each organization's (or user's) events arrived in the order the mirror recorded them."""
    position = {row["event_id"]: index for index, row in enumerate(rows)}
    for key in {row["ordering_key"] for row in rows}:
        mine = [position[body["id"]] for body in bodies if ordering_key(body) == key]
        assert mine == sorted(mine), f"{key} delivered out of order"


def ordering_key(body: dict[str, Any]) -> str:
    data = body["data"]
    if "organization_id" in data:
        return str(data["organization_id"])
    return str(data["object"]["id"])


def test_a_row_failing_past_the_dead_time_is_dead_and_the_rest_goes_on(
    engine: Engine, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    rows = _history_rows(engine)
    victim = rows[0]["event_id"]
    state.refuse = lambda body: body["id"] == victim
    sender = Sender([url], NOTIFY_SECRET, timeout_s=10)
    try:
        report = run_drain(engine, sender, Clock(rows[0]["created_at"] + 5_000), dead_after_ms=5_000)
    finally:
        sender.close()
    assert report.dead == 1
    assert report.delivered == len(rows) - 1
    table = Notification.__table__
    with engine.connect() as connection:
        dead = connection.execute(select(table).where(table.c.status == NotificationStatus.DEAD)).one()
    assert dead.event_id == victim
    assert dead.last_error == "receiver 1 of 1: HTTP 503"  # never the URL, which holds a token
