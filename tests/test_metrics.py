"""/metrics: who may read it, what it counts, the database gauges, and many processes summed as one."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import new_msg_id, signed_headers
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session
from stack import TEST_BOUND_S, hermetic_env, request, running_stack

from emulator.payloads import (
    BARE_MEMBERSHIP,
    BARE_ORGANIZATION,
    OMIT,
    membership_data,
    organization_data,
    webhook_body,
)
from models import metrics
from models.db import make_session_factory
from models.metrics_db import DatabaseCollector
from models.settings import Settings
from models.tables import (
    Command,
    CommandStatus,
    InboxEvent,
    InboxStatus,
    RuleState,
    SyncRun,
    SyncStatus,
)
from orgsync.web import create_app, get_state
from worker.apply import apply_inbox

TOKEN = "metrics-reader-token-0123456789abcdef"
T0 = 1_700_000_000_000
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def membership_body(org: str, user: str) -> str:
    organization = organization_data(org, name=org, slug=org, created_at=T0, object=OMIT, **BARE_ORGANIZATION)
    return webhook_body(
        "organizationMembership.created",
        membership_data(
            f"orgmem_{org}_{user}",
            organization,
            user,
            public_user_data={"user_id": user, "identifier": f"{user}@example.com"},
            created_at=T0,
            updated_at=T0,
            **BARE_MEMBERSHIP,
        ),
        T0,
    )


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def settings_for(tmp_path: Path, url: str, secret: str, **changes: object) -> Settings:
    base = Settings(
        database_url=url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_dir=tmp_path,
        webhook_secrets=(secret,),
        api_tokens=(TOKEN,),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def app(tmp_path: Path, pg_url: str, pg_engine: Engine, signing_secret: str) -> Iterator[Flask]:
    built = create_app(settings_for(tmp_path, pg_url, signing_secret), engine=pg_engine)
    yield built
    get_state(built).close()


def scrape(client: FlaskClient) -> Samples:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return parse(response.get_data(as_text=True))


# ---------------------------------------------------------------- who may read


@pytest.mark.postgres
def test_a_token_is_needed(app: Flask) -> None:
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"
        assert "ORGSYNC_API_TOKENS" in response.get_json()["message"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert scrape(client)


@pytest.mark.postgres
@pytest.mark.parametrize("tokens", [(), (TOKEN,)])
def test_public_metrics_need_no_token(
    tmp_path: Path, pg_url: str, pg_engine: Engine, signing_secret: str, tokens: tuple[str, ...]
) -> None:
    settings = settings_for(tmp_path, pg_url, signing_secret, api_tokens=tokens, metrics_public=True)
    app = create_app(settings, engine=pg_engine)
    try:
        response = app.test_client().get("/metrics")
        assert response.status_code == 200
        assert b"orgsync_database_up 1.0" in response.data
    finally:
        get_state(app).close()


@pytest.mark.postgres
def test_without_tokens_and_not_public_metrics_are_off_and_say_how_to_turn_them_on(
    tmp_path: Path, pg_url: str, pg_engine: Engine, signing_secret: str
) -> None:
    app = create_app(settings_for(tmp_path, pg_url, signing_secret, api_tokens=()), engine=pg_engine)
    try:
        response = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 403
        payload = response.get_json()
        assert payload["error"] == "metrics_not_enabled"
        assert "ORGSYNC_METRICS_PUBLIC=true" in payload["message"]
    finally:
        get_state(app).close()


# ---------------------------------------------------------------- what is counted


@pytest.mark.postgres
def test_deliveries_and_applies_are_counted(app: Flask, pg_engine: Engine, signing_secret: str) -> None:
    client = app.test_client()
    before = scrape(client)
    body = membership_body("org_m", "user_m")
    msg_id = new_msg_id()
    for _ in range(2):  # the second is a duplicate
        assert (
            client.post(
                "/webhooks/clerk", data=body, headers=signed_headers(signing_secret, body, msg_id=msg_id)
            ).status_code
            == 200
        )
    # The same event under another id: a second inbox row.
    assert (
        client.post("/webhooks/clerk", data=body, headers=signed_headers(signing_secret, body)).status_code
        == 200
    )
    bad = signed_headers("whsec_" + base64.b64encode(b"another-secret-entirely-32-bytes").decode(), body)
    assert client.post("/webhooks/clerk", data=body, headers=bad).status_code == 400
    junk = "not json"
    assert (
        client.post("/webhooks/clerk", data=junk, headers=signed_headers(signing_secret, junk)).status_code
        == 200
    )

    during = scrape(client)
    assert value(during, "orgsync_inbox_pending") == 2
    assert value(during, "orgsync_inbox_oldest_pending_age_seconds") >= 0
    delta = {
        (outcome, reason): value(during, "orgsync_webhook_deliveries_total", outcome=outcome, reason=reason)
        - value(before, "orgsync_webhook_deliveries_total", outcome=outcome, reason=reason)
        for outcome, reason in [
            ("accepted", ""),
            ("duplicate", ""),
            ("refused", "invalid_signature"),
            ("rejected", "not_json"),
        ]
    }
    assert delta == {
        ("accepted", ""): 2,
        ("duplicate", ""): 1,
        ("refused", "invalid_signature"): 1,
        ("rejected", "not_json"): 1,
    }

    factory = make_session_factory(pg_engine)
    with Session(pg_engine) as session:
        ids = list(session.scalars(select(InboxEvent.id).where(InboxEvent.status == InboxStatus.PENDING)))
    for inbox_id in sorted(ids):
        apply_inbox(factory, [inbox_id], now_ms=int(time.time() * 1000), max_attempts=3)

    after = scrape(client)
    assert value(after, "orgsync_inbox_pending") == 0
    assert value(after, "orgsync_inbox_oldest_pending_age_seconds") == 0
    assert value(after, "orgsync_events_applied_total") - value(before, "orgsync_events_applied_total") == 2
    assert (
        value(after, "orgsync_apply_lag_seconds_count") - value(before, "orgsync_apply_lag_seconds_count")
        == 2
    )
    # A task that finds its rows already applied (a redelivery) skips them.
    apply_inbox(factory, sorted(ids), now_ms=int(time.time() * 1000), max_attempts=3)
    again = scrape(client)
    assert (
        value(again, "orgsync_events_skipped_total", reason="duplicate")
        - value(after, "orgsync_events_skipped_total", reason="duplicate")
        == 2
    )
    assert value(again, "orgsync_events_applied_total") == value(after, "orgsync_events_applied_total")


@pytest.mark.postgres
def test_database_gauges(pg_engine: Engine) -> None:
    now = T0 + 10 * 86_400_000
    with pg_engine.begin() as connection:
        connection.execute(
            insert(InboxEvent),
            [
                {
                    "svix_id": "msg_p1",
                    "status": InboxStatus.PENDING,
                    "body": "{}",
                    "received_at": now - 90_000,
                },
                {
                    "svix_id": "msg_p2",
                    "status": InboxStatus.PENDING,
                    "body": "{}",
                    "received_at": now - 1_000,
                },
                {"svix_id": "msg_d1", "status": InboxStatus.DEAD, "body": "{}", "received_at": now - 5_000},
            ],
        )
        command = {
            "kind": "set_role",
            "organization_id": "org_1",
            "requested_by": "test",
            "created_at": now,
        }
        for row in [
            {
                **command,
                "idempotency_key": "k1",
                "status": CommandStatus.FAILED,
                "updated_at": now - 1000,
            },
            {
                **command,
                "idempotency_key": "k2",
                "status": CommandStatus.FAILED,
                "updated_at": now - 3 * 86_400_000,
            },
            {
                **command,
                "idempotency_key": "k3",
                "status": CommandStatus.APPLIED,
                "updated_at": now,
                "flagged_at": now,
            },
            {**command, "idempotency_key": "k4", "status": CommandStatus.CONFIRMED, "updated_at": now},
        ]:
            connection.execute(insert(Command), row)
        run = {"heartbeat_at": now, "api_calls": 0, "rate_limit_waits": 0, "rows_seen": 0}
        for row in [
            {
                **run,
                "scope": "instance",
                "status": SyncStatus.COMPLETED,
                "started_at": now - 7000,
                "finished_at": now - 5000,
                "drift": {"memberships": {"created": 2, "updated": 1}, "users": {"updated": 4}},
            },
            {
                **run,
                "scope": "organization",
                "organization_id": "org_1",
                "status": SyncStatus.FAILED,
                "started_at": now - 100,
                "error": "boom",
            },
        ]:
            connection.execute(insert(SyncRun), row)
        connection.execute(
            insert(RuleState),
            [
                {
                    "rule_name": "r1",
                    "organization_id": "org_1",
                    "user_id": f"user_{n}",
                    "stopped_at": now,
                    "updated_at": now,
                }
                for n in range(3)
            ],
        )
    samples: Samples = {}
    for family in DatabaseCollector(pg_engine, clock=lambda: now).collect():
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert value(samples, "orgsync_database_up") == 1
    assert value(samples, "orgsync_inbox_pending") == 2
    assert value(samples, "orgsync_inbox_oldest_pending_age_seconds") == 90
    assert value(samples, "orgsync_inbox_dead") == 1
    assert value(samples, "orgsync_commands", status="failed") == 2
    assert value(samples, "orgsync_commands", status="pending") == 0
    assert value(samples, "orgsync_commands_failed_recent") == 1
    assert value(samples, "orgsync_commands_unconfirmed") == 1
    assert value(samples, "orgsync_reconciliation_last_success_timestamp_seconds") == (now - 5000) / 1000
    assert value(samples, "orgsync_reconciliation_drift", kind="memberships") == 3
    assert value(samples, "orgsync_reconciliation_drift", kind="users") == 4
    assert value(samples, "orgsync_reconciliation_last_failed") == 1
    assert value(samples, "orgsync_rules_stopped") == 1
    # An empty outbox reads as zeros in every state, so an alert on dead notifications can fire at once.
    for state in ("pending", "delivered", "dead"):
        assert value(samples, "orgsync_notifications", state=state) == 0


def test_an_unreachable_database_reads_as_down_not_as_zeros() -> None:
    from models.db import create_db_engine

    engine = create_db_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", timeout=2.0)
    try:
        names = {family.name: family for family in DatabaseCollector(engine).collect()}
    finally:
        engine.dispose()
    assert list(names) == ["orgsync_database_up"]
    assert names["orgsync_database_up"].samples[0].value == 0


# ---------------------------------------------------------------- the files of many processes


def test_label_values_stay_bounded() -> None:
    assert metrics.label("not_json: Expecting value: line 1 column 1 (char 0)") == "not_json"
    assert metrics.label("wrong_instance: ins_abc") == "wrong_instance"
    assert metrics.label(None) == ""
    assert len(metrics.label("x" * 500)) <= 40


def test_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    host = metrics.process_identifier().rsplit("-", 1)[0]
    live, dead = f"counter_{host}-100.db", f"histogram_{host}-200.db"
    foreign = "counter_otherhost-200.db"
    for name in (live, dead, foreign):
        (tmp_path / name).write_bytes(b"")
    removed = metrics.remove_dead_files(tmp_path, alive=lambda pid: pid == 100)
    assert removed == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live, foreign])


def test_live_gauges_of_dead_processes_go_and_their_counters_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    host = metrics.process_identifier().rsplit("-", 1)[0]
    names = [
        f"gauge_livesum_{host}-100.db",  # alive
        f"gauge_livesum_{host}-200.db",  # dead: goes
        f"gauge_liveall_{host}-200.db",  # dead: goes
        f"counter_{host}-200.db",  # dead, but its counts stay
        "gauge_livesum_otherhost-200.db",  # another host's process: not ours to judge
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert metrics.drop_dead_gauges(alive=lambda pid: pid == 100) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[:1] + names[3:])
    monkeypatch.delenv(metrics.MULTIPROC_ENV)
    assert metrics.drop_dead_gauges() == 0


def test_the_operators_directory_wins_and_children_inherit_the_choice(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    chosen = metrics.prepare_multiprocess_dir(env, tmp_path / "default")
    assert chosen == tmp_path / "default"
    assert env[metrics.MULTIPROC_ENV] == str((tmp_path / "default").absolute())
    env = {metrics.MULTIPROC_ENV: str(tmp_path / "operator")}
    assert metrics.prepare_multiprocess_dir(env, tmp_path / "default") == tmp_path / "operator"
    assert (tmp_path / "operator").is_dir()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(TEST_BOUND_S)
def test_two_web_processes_and_a_worker_pool_are_summed_in_one_scrape(
    tmp_path: Path, pg_url: str, pg_engine: Engine, redis_url: str, signing_secret: str
) -> None:
    env = hermetic_env(
        database_url=pg_url,
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        ORGSYNC_API_TOKENS=TOKEN,
    )
    env.pop(metrics.MULTIPROC_ENV, None)
    count = 24
    with running_stack(env, tmp_path / "logs") as stack:
        stack.spawn("web", "serve", "--port", str(stack.port), "--workers", "2", "--threads", "2")
        stack.wait_for("/healthz", lambda: True if _healthy(stack.port) else None)
        stack.start_worker(concurrency=2)
        for n in range(count):
            assert stack.post(membership_body("org_mp", f"user_{n}"), signing_secret) == 200

        def applied() -> int | None:
            with Session(pg_engine) as session:
                done = session.scalar(
                    select(func.count())
                    .select_from(InboxEvent)
                    .where(InboxEvent.status == InboxStatus.APPLIED)
                )
            return done if done == count else None

        stack.wait_for("every event applied", applied)

        def scraped() -> Samples | None:
            status, content = request(
                stack.port, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert status == 200, content
            samples = parse(content.decode())
            # The counts are written just after the commit the probe above saw.
            return samples if value(samples, "orgsync_events_applied_total") == count else None

        samples = stack.wait_for("the worker's counts in /metrics", scraped)
        assert value(samples, "orgsync_webhook_deliveries_total", outcome="accepted", reason="") == count
        assert value(samples, "orgsync_apply_lag_seconds_count") == count
        assert value(samples, "orgsync_inbox_pending") == 0
        files = sorted(path.name for path in (tmp_path / "data" / "metrics").iterdir())
        owners = {name.rsplit("_", 1)[-1] for name in files}
        # Two web workers and at least one pool process wrote their own files.
        assert len(owners) >= 3, files
    # Stopped: a new start clears the files of processes that no longer run.
    metrics.remove_dead_files(tmp_path / "data" / "metrics")
    assert not any(
        name.startswith(("counter_", "histogram_")) and metrics.process_identifier().rsplit("-", 1)[0] in name
        for name in os.listdir(tmp_path / "data" / "metrics")
    )


def _healthy(port: int) -> bool:
    try:
        return request(port, "GET", "/healthz", timeout=2.0)[0] == 200
    except (OSError, http.client.HTTPException):
        return False
