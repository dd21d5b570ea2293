"""Reconciliation after and during chaotic webhook delivery: the mirror ends equal to the emulator's truth.

The emulator delivers its scenario's webhooks over HTTP to the real webhook app (served in this
process), whose dispatcher applies them with ``apply_inbox``, on SQLite. With deliveries
dropped, the mirror then differs from the truth exactly where the dropped events would have
written; one reconciliation repairs all of it, and the drift it records is that difference,
row for row, classified as created, updated or tombstoned.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from mirror_compare import RowKey, as_mirrored, describe, differences, mirror_snapshot
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker
from stack import TEST_BOUND_S
from werkzeug.serving import WSGIRequestHandler, make_server

from emulator import DEFAULT_SECRET_KEY, ChaosConfig, Emulator, EmulatorConfig
from models.db import make_session_factory, session_scope
from models.events import event_writes, parse_event
from models.reconcile import ACTIONS, KINDS
from models.settings import Settings
from models.tables import InboxEvent, InboxStatus
from orgsync.web import create_app
from webhooks.app import WEBHOOK_PATH
from worker.apply import apply_inbox
from worker.clerk import ClerkClient
from worker.reconcile import CountingLimiter, run_reconcile

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TEST_BOUND_S)]

STEPS = 1500
RATE = 500.0
BOUND_S = 120.0
RECONCILED = ("organizations", "memberships", "invitations", "roles")
Snapshot = dict[str, list[dict[str, Any]]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def reconciled(state: Any) -> Snapshot:
    return {name: state[name] for name in RECONCILED}


def wait_for(what: str, probe: Callable[[], bool], bound: float = BOUND_S) -> None:
    deadline = time.monotonic() + bound
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@pytest.fixture
def factory(sqlite_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(sqlite_engine)


@pytest.fixture
def webhook_url(
    sqlite_engine: Engine, factory: sessionmaker[Session], signing_secret: str, tmp_path: Path
) -> Iterator[str]:
    """The real webhook app on a loopback port, applying what it stores right away."""
    settings = Settings(
        database_url=str(sqlite_engine.url),
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=(signing_secret,),
    )

    def send(ids: list[int]) -> None:
        apply_inbox(factory, ids, now_ms=now_ms(), max_attempts=8)

    app = create_app(settings, engine=sqlite_engine, send=send)
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def emulator_config(
    url: str, signing_secret: str, chaos: ChaosConfig, *, rate_limit: int = 0
) -> EmulatorConfig:
    return EmulatorConfig(
        port=0,
        webhook_urls=(url,),
        signing_secret=signing_secret,
        rate_limit=rate_limit,
        seed=7,
        seed_orgs=6,
        seed_members=8,
        announce_defaults=True,
        chaos=chaos,
        time_scale=0.001,
    )


def client_for(emu: Emulator) -> ClerkClient:
    limiter = CountingLimiter("memory://", 1000, 10, namespace=f"e{uuid.uuid4().hex[:8]}")
    return ClerkClient(secret_key=DEFAULT_SECRET_KEY, api_url=emu.api_url, timeout=10.0, limiter=limiter)


def settle_and_drain(emu: Emulator, factory: sessionmaker[Session]) -> None:
    wait_for("the emulator's deliveries to settle", lambda: emu.settle(timeout=1.0))
    delivered = sum(
        1 for per_url in emu.delivery.outcomes().values() if set(per_url.values()) == {"succeeded"}
    )

    def drained() -> bool:
        with session_scope(factory) as session:
            stored = session.scalar(select(func.count()).select_from(InboxEvent)) or 0
            pending = (
                session.scalar(select(func.count()).where(InboxEvent.status == InboxStatus.PENDING)) or 0
            )
        return stored >= delivered and pending == 0

    wait_for("the inbox to drain", drained)


def mirror_of(factory: sessionmaker[Session]) -> Snapshot:
    with session_scope(factory) as session:
        return reconciled(mirror_snapshot(session))


def expected_drift(diff: dict[RowKey, tuple[Any, Any]]) -> dict[str, dict[str, int]]:
    """Each differing row is one repair: missing -> created, extra -> tombstoned, else updated."""
    drift = {kind: dict.fromkeys(ACTIONS, 0) for kind in KINDS if kind in RECONCILED}
    for (table, _), (ours, theirs) in diff.items():
        action = "created" if ours is None else "tombstoned" if theirs is None else "updated"
        drift[table][action] += 1
    return drift


def test_after_dropped_webhooks_one_run_repairs_exactly_what_was_dropped(
    webhook_url: str, factory: sessionmaker[Session], signing_secret: str
) -> None:
    chaos = ChaosConfig(seed=5, duplicate_rate=0.1, reorder_window=0.05, drop_rate=0.03)
    with Emulator(emulator_config(webhook_url, signing_secret, chaos)) as emu:
        emu.run_scenario(STEPS, seed=3, rate=RATE)
        settle_and_drain(emu, factory)
        dropped = [parse_event(m.msg_id, m.body) for m in emu.delivery.dropped()]
        truth = reconciled(as_mirrored(emu.snapshot()))
        before = differences(mirror_of(factory), truth)
        assert dropped and before, "chaos dropped nothing that shows: the test would show nothing"

        # The difference is the dropped events' doing: their rows, and their deletions' cascades.
        touched = {(w.table, w.key) for event in dropped for w in event_writes(event)}
        gone_orgs = {e.data["id"] for e in dropped if e.type == "organization.deleted"}
        unexplained = {
            key: rows
            for key, rows in before.items()
            if key not in touched
            and not any(row is not None and row.get("organization_id") in gone_orgs for row in rows)
        }
        assert not unexplained, describe(unexplained)

        result = run_reconcile(factory, client_for(emu))
        assert result.status == "completed", result.error
        after = differences(mirror_of(factory), truth)
        assert not after, describe(after)
    # The kinds the snapshot compares; users, permissions, role sets and domains are listed
    # and repaired on their own.
    compared = expected_drift(before)
    assert {kind: result.drift.as_dict()[kind] for kind in compared} == compared


def test_a_run_during_live_webhooks_never_overwrites_them_with_older_data(
    webhook_url: str, factory: sessionmaker[Session], signing_secret: str
) -> None:
    chaos = ChaosConfig(seed=9, duplicate_rate=0.1, reorder_window=0.05, delay_rate=0.1, max_delay=0.3)
    with Emulator(emulator_config(webhook_url, signing_secret, chaos)) as emu:
        results = []
        # The scenario keeps changing what the listing pages show while they are fetched.
        runner = threading.Thread(target=lambda: emu.run_scenario(STEPS, seed=4, rate=RATE / 2))
        runner.start()
        while runner.is_alive():
            results.append(run_reconcile(factory, client_for(emu), workers=2))
        runner.join()
        settle_and_drain(emu, factory)
        truth = reconciled(as_mirrored(emu.snapshot()))
        diff = differences(mirror_of(factory), truth)
    assert results and all(r.status == "completed" for r in results), [r.error for r in results]
    # Every webhook arrived: were any listing write older than them to have won, rows would differ.
    assert not diff, describe(diff)
