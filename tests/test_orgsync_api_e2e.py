"""Commands over HTTP end to end: ``orgsync serve`` records and enqueues, a worker sends to the emulator.

The permission check that the seeds' flows make before showing admin actions is asked over
HTTP before and after the command, and its answer follows the emulator's webhook.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from stack import Stack, request
from test_commands_e2e import BOUND_S, database, orgsync_and_emulator, wait_for_mirror

from models.db import make_session_factory

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(240)]

TOKEN = "orgsync-e2e-token-0123456789"
MANAGE = "org:sys_memberships:manage"

__all__ = ["database"]


def call(stack: Stack, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
    status, raw = request(
        stack.port,
        method,
        f"/orgsync/v1{path}",
        None if body is None else json.dumps(body),
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **headers},
    )
    return status, json.loads(raw)


def test_a_role_change_over_http_reaches_clerk_and_is_confirmed(
    database: Engine, redis_url: str, signing_secret: str, tmp_path: Path
) -> None:
    factory = make_session_factory(database)
    env = {"ORGSYNC_API_TOKENS": TOKEN}
    with orgsync_and_emulator(database, redis_url, signing_secret, tmp_path, orgsync_env=env) as (
        stack,
        emu,
        _send,
    ):
        state = emu.state
        admin = state.create_user(email_address="admin@example.com")["id"]
        member = state.create_user(email_address="member@example.com")["id"]
        org = state.create_organization(name="Acme", slug="acme", created_by=admin)["id"]
        state.add_membership(org, user_id=member, role="org:member")
        wait_for_mirror(stack, factory, org, 2)

        query = f"/permission?user_id={member}&organization=acme&permission={MANAGE}"
        assert call(stack, "GET", query) == (
            200,
            {
                "allowed": False,
                "user_id": member,
                "organization_id": org,
                "permission": MANAGE,
                "role": "org:member",
            },
        )
        # The seeds' flow: only a member allowed to manage memberships changes a role.
        assert call(stack, "GET", f"/permission?user_id={admin}&organization=acme&permission={MANAGE}")[1][
            "allowed"
        ]

        status, command = call(
            stack,
            "PATCH",
            f"/organizations/acme/memberships/{member}",
            {"role": "org:admin"},
            **{"Idempotency-Key": "promote-1"},
        )
        assert status == 202, command
        assert command["requested_by"] == "api:token-1"
        again = call(
            stack,
            "PATCH",
            f"/organizations/acme/memberships/{member}",
            {"role": "org:admin"},
            **{"Idempotency-Key": "promote-1"},
        )
        assert again[0] == 202 and again[1]["id"] == command["id"]

        last: list[Any] = []

        def settled() -> dict[str, Any] | None:
            polled = call(stack, "GET", command["url"].removeprefix("/orgsync/v1"))[1]
            last[:] = [polled]
            return polled if polled["status"] in ("confirmed", "failed") else None

        try:
            final = stack.wait_for("the HTTP command to be confirmed", settled, BOUND_S)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"the command as last polled: {last}") from exc
        assert final["status"] == "confirmed", final
        assert final["confirmed_at"] is not None
        assert state.list_memberships(org, limit=10, user_ids=[member]).data[0]["role"] == "org:admin"

        def allowed() -> bool | None:
            return True if call(stack, "GET", query)[1]["allowed"] else None

        stack.wait_for("the permission check to follow the mirror", allowed, BOUND_S)
        # With two admins now, the first may step down.
        status, demoted = call(
            stack, "PATCH", f"/organizations/acme/memberships/{admin}", {"role": "org:member"}
        )
        assert status == 202, demoted
