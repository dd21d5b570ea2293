"""No secret in any log line, even at DEBUG and in tracebacks: web server, worker, beat and the CLI.

One run at ``ORGSYNC_LOG_LEVEL=DEBUG`` provokes what makes processes talk most: Clerk answering
500s and refusals, deliveries that are unsigned, wrongly signed or unreadable, a malformed task
message (the worker logs its traceback) and a CLI command whose broker is down. The Clerk secret
key, the signing secret and its base64 body, and the broker password must appear nowhere in what
they wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import free_port, truncate_all
from helpers import assert_no_secrets, signed_headers
from sqlalchemy import Engine, select
from stack import FAST_SWEEPS, ROOT, TEST_BOUND_S, hermetic_env, request, running_stack

from emulator import Emulator, EmulatorConfig
from emulator.payloads import webhook_body
from models.db import make_session_factory, session_scope
from models.settings import Settings
from models.tables import Command, CommandKind, CommandStatus, Membership
from worker.app import TASK_SEND_COMMAND, create_celery, make_command_sender
from worker.commands import CommandRequest, submit_command

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

SECRET_KEY = "sk_test_debug_logs_7f3c9a1e5b"
OTHER_SIGNING_SECRET = "whsec_b3RoZXItc2lnbmluZy1zZWNyZXQtZm9yLWxvZ3M="
BROKER_PASSWORD = "broker-password-debug-logs"


def fault(emu: Emulator, **body: Any) -> None:
    request_ = urllib.request.Request(
        f"{emu.url}/_emulator/faults", data=json.dumps(body).encode(), method="POST"
    )
    request_.add_header("Authorization", f"Bearer {SECRET_KEY}")
    request_.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request_, timeout=10) as response:
        assert response.status == 200


def test_debug_logs_and_tracebacks_carry_no_secret(
    pg_engine: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    factory = make_session_factory(pg_engine)
    port = free_port()
    env = hermetic_env(
        database_url=pg_engine.url.render_as_string(hide_password=False),
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        CLERK_SECRET_KEY=SECRET_KEY,
        CLERK_API_URL=f"http://127.0.0.1:{port}/v1",
        ORGSYNC_LOG_LEVEL="DEBUG",
        **FAST_SWEEPS,
    )
    try:
        with running_stack(env, tmp_path / "logs") as stack:
            stack.start_web()
            stack.start_worker(beat=True)
            config = EmulatorConfig(
                port=port,
                secret_key=SECRET_KEY,
                webhook_urls=(stack.webhook_url,),
                signing_secret=signing_secret,
                announce_defaults=True,
                seed=3,
                rate_limit=0,
                membership_rate_limit=0,
            )
            with Emulator(config) as emu:
                admin = emu.state.create_user(email_address="admin@example.com")["id"]
                joiner = emu.state.create_user(email_address="joiner@example.com")["id"]
                org = emu.state.create_organization(name="Acme", created_by=admin)["id"]

                def mirrored() -> bool | None:
                    with session_scope(factory) as session:
                        rows = session.scalars(
                            select(Membership.id).where(
                                Membership.organization_id == org, Membership.deleted.is_(False)
                            )
                        ).all()
                    return True if rows else None

                stack.wait_for("the organization in the mirror", mirrored)

                # Clerk answers 500 twice, then the add goes through; a role change of a stranger is refused.
                fault(emu, method="POST", path_regex="/memberships$", mode="error_500", count=2)
                now = time.time_ns() // 1_000_000
                with session_scope(factory) as session:
                    ids = [
                        submit_command(session, request_, now_ms=now).id
                        for request_ in (
                            CommandRequest(
                                kind=CommandKind.ADD_MEMBER,
                                organization_id=org,
                                requested_by="api:logs",
                                user_id=joiner,
                                role="org:member",
                            ),
                            CommandRequest(
                                kind=CommandKind.SET_ROLE,
                                organization_id=org,
                                requested_by="api:logs",
                                user_id="user_nobody",
                                role="org:admin",
                            ),
                        )
                    ]
                celery = create_celery(Settings.from_env(env))
                make_command_sender(celery)(ids)
                # A malformed task message: the worker logs the task's failure with its traceback.
                celery.send_task(TASK_SEND_COMMAND, args=["not-a-command-id"], retry=False)
                worker_log = next(p.log_path for p in stack.procs if p.name == "worker")
                stack.wait_for(
                    "the worker's traceback",
                    lambda: True if "Traceback" in worker_log.read_text(errors="replace") else None,
                )

                def final() -> bool | None:
                    with session_scope(factory) as session:
                        statuses = session.scalars(select(Command.status).where(Command.id.in_(ids))).all()
                    done = {CommandStatus.CONFIRMED, CommandStatus.FAILED}
                    return True if len(statuses) == 2 and set(statuses) <= done else None

                stack.wait_for("both commands to end", final)

                # Deliveries that are unsigned, signed with another secret, or not what Clerk sends.
                body = webhook_body("organization.updated", {"object": "organization"}, now)
                assert request(stack.port, "POST", "/webhooks/clerk", body, {})[0] == 400
                assert stack.post(body, OTHER_SIGNING_SECRET) == 400
                for bad in ("{not json", body, webhook_body("user.exploded", {"id": "user_x"}, now)):
                    status, _ = request(
                        stack.port, "POST", "/webhooks/clerk", bad, signed_headers(signing_secret, bad)
                    )
                    assert status < 500

            # The CLI with its broker down (the URL carries a password): it reports the enqueue failure.
            dead_broker = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{free_port()}/0"
            cli = subprocess.run(
                [sys.executable, "-m", "orgsync", "members", "add", "--org", org, "--user", "user_cli_new"],
                cwd=ROOT,
                env={**env, "BROKER_URL": dead_broker},
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert "could not enqueue" in cli.stderr, cli.stderr
            stack.stop()
            logs = stack.output(lines=1_000_000) + cli.stdout + cli.stderr
    finally:
        truncate_all(pg_engine)

    assert " DEBUG " in logs or "DEBUG/" in logs, "the run logged at DEBUG"
    assert_no_secrets(logs, SECRET_KEY, signing_secret, OTHER_SIGNING_SECRET, BROKER_PASSWORD)
