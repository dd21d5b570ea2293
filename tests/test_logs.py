"""Logs: JSON lines with their context when asked for, secrets masked, no per-task Celery chatter."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import signed_headers
from sqlalchemy import Engine, insert
from stack import FAST_SWEEPS, TEST_BOUND_S, hermetic_env, request, running_stack

from emulator.payloads import webhook_body
from models.tables import InboxEvent, InboxStatus
from orgsync.logs import JsonFormatter, TextFormatter

SECRET_KEY = "sk_test_logs_0123456789abcdef"


def record(message: str, *args: Any, exc: BaseException | None = None, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("orgsync.test", logging.INFO, __file__, 1, message, args, None)
    if exc is not None:
        try:
            raise exc
        except BaseException as raised:
            made.exc_info = (type(raised), raised, raised.__traceback__)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_a_json_line_has_the_context_and_no_secret() -> None:
    line = JsonFormatter().format(
        record(
            "calling with %s at %s",
            SECRET_KEY,
            "redis://:hunter2@broker:6379/0",
            exc=RuntimeError(f"refused {SECRET_KEY}"),
            delivery_id="msg_1",
            event_type="user.created",
            task_id="t-1",
        )
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "orgsync.test"
    assert entry["delivery_id"] == "msg_1"
    assert entry["event_type"] == "user.created"
    assert entry["task_id"] == "t-1"
    assert entry["time"].endswith("Z")
    assert "RuntimeError" in entry["exception"]
    assert SECRET_KEY not in line
    assert "hunter2" not in line


def test_a_text_line_shows_the_context_and_no_secret() -> None:
    line = TextFormatter().format(record("key %s", SECRET_KEY, delivery_id="msg_2"))
    assert line.endswith("[delivery_id=msg_2]")
    assert SECRET_KEY not in line


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a process's output (Celery's start-up banner goes to stdout as text)."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(TEST_BOUND_S)
def test_processes_log_json_with_context_and_without_task_chatter(
    tmp_path: Path, pg_url: str, pg_engine: Engine, redis_url: str, signing_secret: str
) -> None:
    env = hermetic_env(
        database_url=pg_url,
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        ORGSYNC_LOG_FORMAT="json",
        **FAST_SWEEPS,
    )
    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_web()
        stack.start_worker(beat=True, concurrency=1)
        # Wrongly signed: the refusal's line names the delivery.
        body = webhook_body("user.created", {"object": "user", "id": "user_l"}, 1_700_000_000_000)
        headers = signed_headers(
            "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=", body, msg_id="msg_badsig"
        )
        assert request(stack.port, "POST", "/webhooks/clerk", body, headers)[0] == 400
        # A pending row nobody enqueued: the sweeper's task picks it up and says so, with its id.
        with pg_engine.begin() as connection:
            connection.execute(
                insert(InboxEvent).values(
                    svix_id="msg_swept",
                    status=InboxStatus.PENDING,
                    body="{}",
                    received_at=int(time.time() * 1000) - 60_000,
                )
            )

        def swept() -> dict[str, Any] | None:
            for entry in json_lines(tmp_path / "logs" / "worker.log"):
                if entry["message"].startswith("sweeper enqueued"):
                    return entry
            return None

        entry = stack.wait_for("the sweeper's line", swept)
        assert entry["task"] == "orgsync.sweep_inbox"
        assert entry["task_id"]

        def refused() -> dict[str, Any] | None:
            for found in json_lines(tmp_path / "logs" / "web.log"):
                if found["message"].startswith("webhook refused"):
                    return found
            return None

        assert stack.wait_for("the refusal's line", refused)["delivery_id"] == "msg_badsig"
    # Many sweep intervals (0.5 s) passed meanwhile: beat sent, the worker ran, none of it logged.
    for name in ("worker", "beat"):
        text = (tmp_path / "logs" / f"{name}.log").read_text(errors="replace")
        assert "Sending due task" not in text, name
        assert "succeeded in" not in text, name
        assert "] received" not in text, name
    # The web server prints nothing but log lines, and every one is JSON, granian's own too.
    web_text = (tmp_path / "logs" / "web.log").read_text(errors="replace")
    for line in web_text.splitlines():
        if line.strip():
            json.loads(line)
    web_lines = json_lines(tmp_path / "logs" / "web.log")
    # granian's own lines come through the same JSON formatter.
    assert any(entry["logger"] == "_granian" for entry in web_lines), web_lines[:5]
