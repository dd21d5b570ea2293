"""``orgsync prune``, ``status`` and ``doctor``: output, exit codes, and doctor against the emulator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import TEST_SIGNING_SECRET
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from emulator import Emulator, EmulatorConfig
from models.clock import now_ms
from models.db import make_session_factory, session_scope
from models.inbox import store_delivery
from models.retention import DAY_MS
from models.tables import ApiCall, Command, CommandStatus, InboxEvent, InboxStatus, RuleState
from orgsync.cli import cli
from orgsync.cli.base import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, Runtime
from orgsync.cli.ops import EXIT_ATTENTION

KEY = "sk_test_doctor_key"
EMAIL = "ann.lee@example.com"


def invoke(environ: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), obj=Runtime(environ=environ), catch_exceptions=False)


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": sqlite_url, "ORGSYNC_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def factory(sqlite_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(sqlite_engine)


def body(instance_id: str = "ins_one") -> str:
    return json.dumps(
        {
            "type": "organizationMembership.created",
            "object": "event",
            "instance_id": instance_id,
            "timestamp": now_ms(),
            "data": {
                "object": "organization_membership",
                "id": "orgmem_1",
                "public_user_data": {"identifier": EMAIL},
            },
        }
    )


def add_event(
    factory: sessionmaker[Session],
    svix_id: str,
    *,
    age_days: float,
    status: str = InboxStatus.APPLIED,
    instance_id: str = "ins_one",
) -> None:
    with session_scope(factory) as session:
        stored = store_delivery(
            session, svix_id=svix_id, body=body(instance_id), received_at=now_ms() - int(age_days * DAY_MS)
        )
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None
        row.status = status


def count_events(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        return len(list(session.query(InboxEvent.id)))


# -- prune ---------------------------------------------------------------------------------------


def test_prune_dry_run_counts_and_changes_nothing(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    for number in range(3):
        add_event(factory, f"msg_old_{number}", age_days=31)
    add_event(factory, "msg_week", age_days=8)
    add_event(factory, "msg_pending", age_days=60, status=InboxStatus.PENDING)

    result = invoke(env, "prune", "--dry-run", "--json")

    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["deleted"] == {
        "inbox_events": 3,
        "api_calls": 0,
        "commands": 0,
        "sync_runs": 0,
        "notifications": 0,
    }
    assert report["redacted"] == 1
    assert count_events(factory) == 5
    text = invoke(env, "prune", "--dry-run")
    assert "inbox_events   delete  3     30" in text.stdout
    assert "dry run: nothing was changed" in text.stdout


def test_prune_removes_with_progress_on_stderr(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    for number in range(5):
        add_event(factory, f"msg_old_{number}", age_days=31)
    add_event(factory, "msg_pending", age_days=60, status=InboxStatus.PENDING)
    with session_scope(factory) as session:
        session.add(
            ApiCall(purpose="send", method="GET", path="/", duration_ms=1, started_at=now_ms() - 91 * DAY_MS)
        )

    result = invoke(env, "prune", "--batch-size", "2")

    assert result.exit_code == EXIT_OK, result.output
    assert "orgsync: prune: inbox_events: 2 deleted" in result.stderr
    assert "orgsync: prune: inbox_events: 5 deleted" in result.stderr
    assert "inbox_events   delete  5" in result.stdout
    assert "api_calls      delete  1" in result.stdout
    assert count_events(factory) == 1


def test_prune_refuses_bad_settings_and_an_unmigrated_database(tmp_path: Path) -> None:
    result = invoke({"ORGSYNC_DATA_DIR": str(tmp_path), "ORGSYNC_RETAIN_INBOX_DAYS": "1"}, "prune")
    assert result.exit_code == EXIT_CONFIG
    assert "ORGSYNC_RETAIN_INBOX_DAYS must be at least 2 days" in result.stderr
    result = invoke({"ORGSYNC_DATA_DIR": str(tmp_path)}, "prune", "--dry-run")
    assert result.exit_code == EXIT_CONFIG
    assert "orgsync db upgrade" in result.stderr


# -- status --------------------------------------------------------------------------------------


def test_status_all_well(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    add_event(factory, "msg_fresh", age_days=0, status=InboxStatus.PENDING)
    result = invoke(env, "status", "--json")
    assert result.exit_code == EXIT_OK, result.output
    status = json.loads(result.stdout)
    assert set(status) == {
        "ok",
        "attention",
        "checked_at",
        "inbox",
        "commands",
        "reconciliation",
        "rules",
        "notifications",
    }
    assert status["notifications"] == {
        "pending": 0,
        "failing": 0,
        "dead": 0,
        "oldest_pending_age_s": 0.0,
    }
    assert status["ok"] is True
    assert status["inbox"]["pending"] == 1
    assert status["reconciliation"] is None
    assert "all is well" in invoke(env, "status").stdout


def test_status_exits_for_attention(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    add_event(factory, "msg_dead", age_days=1, status=InboxStatus.DEAD)
    add_event(factory, "msg_stuck", age_days=0.01, status=InboxStatus.PENDING)
    with session_scope(factory) as session:
        now = now_ms()
        session.add(
            Command(
                kind="set_role",
                organization_id="org_1",
                user_id="user_1",
                role="org:admin",
                requested_by="cli",
                idempotency_key="k1",
                status=CommandStatus.FAILED,
                dry_run=False,
                attempts=1,
                created_at=now,
                updated_at=now,
            )
        )
        session.add(
            RuleState(
                rule_name="contractors",
                organization_id="org_1",
                user_id="user_1",
                reversals=3,
                stopped_at=now,
                stopped_reason="kept fighting a human change",
                updated_at=now,
            )
        )

    result = invoke(env, "status", "--json", "--max-lag", "60")

    assert result.exit_code == EXIT_ATTENTION, result.output
    status = json.loads(result.stdout)
    assert status["ok"] is False
    assert status["inbox"]["dead"] == 1
    assert status["inbox"]["lag_s"] > 60
    assert status["commands"]["failed_24h"] == 1
    assert status["rules"]["stopped"] == ["contractors"]
    attention = "\n".join(status["attention"])
    for words in ("inbox lag", "dead inbox event", "failed in the last 24 h", "contractors"):
        assert words in attention
    text = invoke(env, "status", "--max-lag", "60")
    assert text.exit_code == EXIT_ATTENTION
    assert "needs attention:" in text.stdout


def test_status_with_the_database_down(tmp_path: Path) -> None:
    environ = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", "ORGSYNC_DATA_DIR": str(tmp_path)}
    result = invoke(environ, "status")
    assert result.exit_code == EXIT_UNAVAILABLE, result.output


# -- doctor --------------------------------------------------------------------------------------


@pytest.fixture
def clerk() -> Iterator[Emulator]:
    emulator = Emulator(EmulatorConfig(port=0, secret_key=KEY, rate_limit=0, membership_rate_limit=0)).start()
    yield emulator
    emulator.stop()


def findings(result: Result) -> dict[str, dict[str, str]]:
    return {item["check"]: item for item in json.loads(result.stdout)}


def test_doctor_all_well_against_the_emulator(env: dict[str, str], clerk: Emulator, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: admins\n    mode: on_join\n    role: org:admin\n")
    environ = {
        **env,
        "CLERK_SECRET_KEY": KEY,
        "CLERK_API_URL": clerk.api_url,
        "CLERK_WEBHOOK_SIGNING_SECRET": TEST_SIGNING_SECRET,
        "ORGSYNC_RULES_FILE": str(rules),
    }
    result = invoke(environ, "doctor", "--json")
    found = findings(result)
    assert result.exit_code == EXIT_OK, result.output
    assert found["clerk secret key"]["result"] == "ok"
    assert "development instance key" in found["clerk secret key"]["detail"]
    assert found["migrations"]["result"] == "ok"
    assert found["rules"]["detail"].endswith("1 rule(s), valid")
    assert {item["result"] for item in found.values()} <= {"ok", "warn"}
    assert KEY not in result.output
    assert TEST_SIGNING_SECRET.removeprefix("whsec_") not in result.output


def test_doctor_reports_a_refused_key_with_its_fix(env: dict[str, str], clerk: Emulator) -> None:
    wrong = "sk_test_not_the_right_key"
    result = invoke(env | {"CLERK_SECRET_KEY": wrong, "CLERK_API_URL": clerk.api_url}, "doctor")
    assert result.exit_code == EXIT_ATTENTION, result.output
    assert "[FAIL] clerk secret key: refused by" in result.stdout
    assert "fix: copy the secret key of the instance again" in result.stdout
    assert wrong not in result.output
    assert "not_the_right_key" not in result.output


def test_doctor_names_every_bad_setting(tmp_path: Path) -> None:
    environ = {
        "ORGSYNC_DATA_DIR": str(tmp_path),
        "ORGSYNC_RETAIN_INBOX_DAYS": "1",
        "ORGSYNC_MAX_ATTEMPTS": "many",
        "ORGSYNC_RETAIN_INBOX_DAY": "3",
        "CLERK_SECRET_KEY": "pk_test_public",
        "CLERK_WEBHOOK_SIGNING_SECRET": "whsec_!!!",
    }
    result = invoke(environ, "doctor", "--json")
    assert result.exit_code == EXIT_CONFIG, result.output
    messages = [item["detail"] for item in json.loads(result.stdout) if item["result"] == "fail"]
    joined = "\n".join(messages)
    for name in (
        "ORGSYNC_RETAIN_INBOX_DAYS",
        "ORGSYNC_MAX_ATTEMPTS",
        "CLERK_SECRET_KEY",
        "CLERK_WEBHOOK_SIGNING_SECRET",
    ):
        assert name in joined
    assert "ORGSYNC_RETAIN_INBOX_DAY" in result.stdout  # the unknown one, as a warning
    assert "pk_test_public" not in result.output


def test_doctor_without_a_database_or_key(tmp_path: Path) -> None:
    result = invoke({"ORGSYNC_DATA_DIR": str(tmp_path)}, "doctor", "--json")
    found = findings(result)
    assert result.exit_code == EXIT_ATTENTION
    assert found["database"]["result"] == "fail"
    assert "orgsync db upgrade" in found["database"]["fix"]
    assert found["clerk secret key"]["result"] == "warn"


def test_doctor_holds_deliveries_to_the_expected_instance(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    add_event(factory, "msg_one", age_days=0, instance_id="ins_one")
    add_event(factory, "msg_two", age_days=0, instance_id="ins_two")
    several = findings(invoke(env, "doctor", "--json"))["instance"]
    assert several["result"] == "fail"
    assert "ins_one, ins_two" in several["detail"]
    pinned = invoke(env | {"CLERK_INSTANCE_ID": "ins_one"}, "doctor", "--json")
    assert pinned.exit_code == EXIT_ATTENTION
    assert "come from ins_two, not ins_one" in findings(pinned)["instance"]["detail"]


def test_the_real_command_in_a_subprocess(env: dict[str, str], factory: sessionmaker[Session]) -> None:
    add_event(factory, "msg_dead", age_days=1, status=InboxStatus.DEAD)
    executable = shutil.which("orgsync", path=str(Path(sys.executable).parent))
    assert executable is not None
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("ORGSYNC_", "CLERK_"))}
    result = subprocess.run(
        [executable, "status", "--json"],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == EXIT_ATTENTION, result.stderr
    assert json.loads(result.stdout)["inbox"]["dead"] == 1
    pruned = subprocess.run(
        [executable, "prune", "--dry-run"],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert pruned.returncode == EXIT_OK, pruned.stderr
    assert "dry run" in pruned.stdout
