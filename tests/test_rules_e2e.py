"""Provisioning rules end to end: the emulator as Clerk over real HTTP, orgsync serve + a real worker.

The emulator delivers its webhooks to ``orgsync serve``; the worker applies them, runs the
rules after each batch, and sends the rules' commands back to the emulator's Backend API. A
"human" acts through the same API with the official SDK. Everything is observed from outside:
the emulator's state, the requests it received, and orgsync's tables.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from clerk_backend_api import Clerk
from clerk_backend_api.utils.retries import BackoffStrategy, RetryConfig
from conftest import free_port, truncate_all
from helpers import assert_no_secrets
from sqlalchemy import Engine, select
from stack import FAST_SWEEPS, TEST_BOUND_S, Stack, hermetic_env, running_stack

from emulator import Emulator, EmulatorConfig
from models.db import make_session_factory, session_scope
from models.tables import ApiCall, Command, CommandStatus, Membership, RuleState

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(TEST_BOUND_S)]

SECRET_KEY = "sk_test_rules_e2e"
NO_RETRIES = RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), retry_connection_errors=False)
MAX_REVERSALS = 2
ADMIN, MEMBER = "org:admin", "org:member"

RULES = """
rules:
  - name: acme-admins
    mode: on_join
    role: org:admin
    when:
      organization: {slug: acme}
      user: {email_domain: acme.test}
  - name: ops-lead
    mode: enforce
    role: org:admin
    when:
      organization: {slug: ops}
      user: {identifier: "lead@*"}
  - name: sandbox-admins
    mode: on_join
    role: org:admin
    dry_run: true
    when:
      organization: {slug: sandbox}
"""


class RequestLog:
    """The Backend API requests the emulator received, as (method, path)."""

    def __init__(self, emu: Emulator) -> None:
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        inner = emu.app.wsgi_app

        def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            with self._lock:
                self.calls.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
            return inner(environ, start_response)

        emu.app.wsgi_app = wsgi  # type: ignore[method-assign]

    def touching(self, fragment: str) -> list[tuple[str, str]]:
        with self._lock:
            return [call for call in self.calls if fragment in call[1]]


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    yield pg_engine
    truncate_all(pg_engine)


@pytest.fixture
def world(
    database: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> Iterator[tuple[Stack, Emulator, RequestLog]]:
    redis.Redis.from_url(redis_url).flushdb()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    emulator_port = free_port()
    env = hermetic_env(
        database_url=database.url.render_as_string(hide_password=False),
        broker_url=redis_url,
        data_dir=tmp_path / "data",
        signing_secret=signing_secret,
        CLERK_SECRET_KEY=SECRET_KEY,
        CLERK_API_URL=f"http://127.0.0.1:{emulator_port}/v1",
        ORGSYNC_RULES_FILE=str(rules_file),
        ORGSYNC_ENFORCE_MAX_REVERSALS=str(MAX_REVERSALS),
        **FAST_SWEEPS,
    )
    with running_stack(env, tmp_path / "logs") as stack:
        stack.start_web()
        stack.start_worker(beat=True)
        config = EmulatorConfig(
            port=emulator_port,
            secret_key=SECRET_KEY,
            webhook_urls=(stack.webhook_url,),
            signing_secret=signing_secret,
            rate_limit=0,
            membership_rate_limit=0,
            seed=17,
            announce_defaults=True,
            time_scale=0.001,
        )
        emu = Emulator(config)
        log = RequestLog(emu)
        with emu:
            yield stack, emu, log
    # Every rule action, reversal and refusal the processes logged: never the key or the signing secret.
    assert_no_secrets(stack.output(lines=1_000_000), SECRET_KEY, signing_secret)


def human(emu: Emulator) -> Clerk:
    return Clerk(bearer_auth=SECRET_KEY, server_url=emu.api_url, retry_config=NO_RETRIES)


def role_in_clerk(emu: Emulator, org_id: str, user_id: str) -> str:
    [membership] = [
        m
        for m in emu.state.list_memberships(org_id, limit=100).data
        if m["public_user_data"]["user_id"] == user_id
    ]
    return str(membership["role"])


def rows(database: Engine, model: Any, *where: Any) -> list[Any]:
    query = select(model).where(*where)
    if hasattr(model, "id"):
        query = query.order_by(model.id)
    with session_scope(make_session_factory(database)) as session:
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def test_on_join_enforce_with_reversal_stop_and_dry_run(
    world: tuple[Stack, Emulator, RequestLog], database: Engine
) -> None:
    stack, emu, log = world
    clerk = human(emu)

    def user(email: str) -> str:
        return clerk.users.create(email_address=[email]).id

    owner = user("owner@example.com")
    acme = clerk.organizations.create(request={"name": "Acme", "slug": "acme", "created_by": owner}).id
    ops = clerk.organizations.create(request={"name": "Ops", "slug": "ops", "created_by": owner}).id
    sandbox = clerk.organizations.create(
        request={"name": "Sandbox", "slug": "sandbox", "created_by": owner}
    ).id

    # on_join: someone from @acme.test joining acme becomes org:admin; someone else does not.
    alice, bob = user("alice@acme.test"), user("bob@other.test")
    clerk.organization_memberships.create(organization_id=acme, user_id=alice, role=MEMBER)
    clerk.organization_memberships.create(organization_id=acme, user_id=bob, role=MEMBER)
    stack.wait_for(
        "alice promoted by the on_join rule", lambda: role_in_clerk(emu, acme, alice) == ADMIN or None
    )

    def confirmed(rule: str, count: int) -> list[Command] | None:
        found = rows(database, Command, Command.rule_name == rule)
        return (
            found if len(found) == count and all(c.status == CommandStatus.CONFIRMED for c in found) else None
        )

    [promotion] = stack.wait_for("the on_join command confirmed", lambda: confirmed("acme-admins", 1))
    assert (promotion.user_id, promotion.role, promotion.requested_by) == (alice, ADMIN, "rule:acme-admins")
    # Only once bob's join is applied (the rules run right after its batch) does "not promoted" mean anything.
    stack.wait_for(
        "bob's membership mirrored",
        lambda: (
            rows(database, Membership, Membership.organization_id == acme, Membership.user_id == bob) or None
        ),
    )
    assert role_in_clerk(emu, acme, bob) == MEMBER

    # enforce: the lead must stay admin; a human keeps demoting them.
    lead = user("lead@ops.test")
    clerk.organization_memberships.create(organization_id=ops, user_id=lead, role=MEMBER)
    stack.wait_for("the first enforcement", lambda: confirmed("ops-lead", 1))
    assert role_in_clerk(emu, ops, lead) == ADMIN
    for reversal in range(2, MAX_REVERSALS + 1):
        clerk.organization_memberships.update(organization_id=ops, user_id=lead, role=MEMBER)
        stack.wait_for(f"reversal {reversal}", lambda n=reversal: confirmed("ops-lead", n))  # type: ignore[misc]
        assert role_in_clerk(emu, ops, lead) == ADMIN
    # One demotion too many: the rule stops for this membership instead of fighting on.
    clerk.organization_memberships.update(organization_id=ops, user_id=lead, role=MEMBER)

    def stopped() -> RuleState | None:
        found = rows(
            database, RuleState, RuleState.rule_name == "ops-lead", RuleState.stopped_at.is_not(None)
        )
        return found[0] if found else None

    state = stack.wait_for("the enforce rule to stop", stopped)
    assert state.reversals == MAX_REVERSALS and state.user_id == lead
    assert len(rows(database, Command, Command.rule_name == "ops-lead")) == MAX_REVERSALS
    assert role_in_clerk(emu, ops, lead) == MEMBER
    check = stack.orgsync("rules", "check")
    assert check.returncode == 0, check.stderr
    assert "stopped enforcement (1)" in check.stdout and "ops-lead" in check.stdout
    plan = stack.orgsync("rules", "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    assert [r["user_id"] for r in json.loads(plan.stdout) if r["action"] == "stopped"] == [lead]

    # dry run: the command is planned and recorded, and nothing reaches Clerk.
    carol = user("carol@example.com")
    clerk.organization_memberships.create(organization_id=sandbox, user_id=carol, role=MEMBER)

    def planned() -> Command | None:
        found = rows(database, Command, Command.rule_name == "sandbox-admins")
        return found[0] if found else None

    command = stack.wait_for("the dry-run command planned", planned)
    assert (command.status, command.dry_run, command.user_id) == (CommandStatus.PLANNED, True, carol)
    assert rows(database, ApiCall, ApiCall.command_id == command.id) == []
    # The mirror has caught up with everything the human did; still nothing was sent for carol.
    stack.wait_for(
        "the sandbox membership mirrored",
        lambda: (
            rows(database, Membership, Membership.organization_id == sandbox, Membership.user_id == carol)
            or None
        ),
    )
    assert log.touching(f"/memberships/{carol}") == []
    # Long after bob's join was applied, still nothing was planned or sent for him.
    assert rows(database, Command, Command.user_id == bob) == []
    assert role_in_clerk(emu, acme, bob) == MEMBER
    assert role_in_clerk(emu, sandbox, carol) == MEMBER
    assert rows(database, Command, Command.rule_name == "sandbox-admins")[0].status == CommandStatus.PLANNED
