"""Scenarios, seeding, the snapshot and the test-only endpoints; the events always add up to the snapshot."""

from __future__ import annotations

import itertools
import json
import threading
import urllib.request
from typing import Any

import pytest

from emulator import ChaosConfig, Emulator, EmulatorConfig, Scenario, State, run_emulator
from emulator.records import Clock
from emulator.testing import Receiver, project_events

SECRET = "whsec_dGVzdC1zaWduaW5nLXNlY3JldC1mb3Itb3Jnc3luYw=="
KEY = "sk_test_scenario"


def fixed_clock() -> Clock:
    ticks = itertools.count(1_700_000_000_000)
    return Clock(lambda: next(ticks))


def call(emu: Emulator, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{emu.url}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {KEY}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_scenario_is_reproducible_from_its_seed() -> None:
    snapshots = []
    for _ in range(2):
        state = State(clock=fixed_clock(), seed=5)
        report = Scenario(state, seed=9).run(300)
        snapshots.append(state.snapshot())
        assert report.steps == 300
    assert snapshots[0] == snapshots[1]
    other = State(clock=fixed_clock(), seed=5)
    Scenario(other, seed=10).run(300)
    assert other.snapshot() != snapshots[0]


def test_scenario_covers_the_realistic_actions() -> None:
    state = State(seed=1)
    report = Scenario(state, seed=1).run(1500)
    for action in ("join", "role_change", "remove", "readd", "invite", "accept", "revoke", "delete_org"):
        assert report.actions[action] > 0, action
    assert set(report.rejected) <= {"organization_minimum_permissions_needed"}
    counts = state.counts()
    assert counts["organizations"] >= 3 and counts["memberships"] > 0


def test_events_received_add_up_to_the_snapshot() -> None:
    """With every event delivered (duplicates and reordering on), the events describe the state exactly."""
    chaos = ChaosConfig(seed=3, duplicate_rate=0.2, reorder_window=0.01)
    with Receiver(SECRET) as rec:
        config = EmulatorConfig(
            port=0,
            secret_key=KEY,
            rate_limit=0,
            webhook_urls=(rec.url,),
            signing_secret=SECRET,
            chaos=chaos,
            announce_defaults=True,
            seed_orgs=3,
            seed_members=4,
        )
        with Emulator(config) as emu:
            report = emu.run_scenario(400, seed=2, settle_timeout=30)
            assert report.steps == 400
            snapshot = emu.snapshot()
        assert all(r.verified for r in rec.received)
        assert project_events(rec.accepted_events()) == snapshot


def test_dropped_events_are_exactly_what_is_missing() -> None:
    chaos = ChaosConfig(seed=4, drop_rate=0.1)
    with Receiver(SECRET) as rec:
        config = EmulatorConfig(
            port=0, secret_key=KEY, rate_limit=0, webhook_urls=(rec.url,), signing_secret=SECRET, chaos=chaos
        )
        with Emulator(config) as emu:
            emu.run_scenario(200, seed=3, settle_timeout=30)
            dropped = emu.delivery.dropped()
            snapshot = emu.snapshot()
        assert dropped
        received = rec.accepted_events()
        everything = sorted(received + [json.loads(m.body) for m in dropped], key=lambda e: e["timestamp"])
        without_defaults = {k: v for k, v in snapshot.items() if k not in ("roles", "permissions")}
        projected = project_events(everything)
        assert {k: v for k, v in projected.items() if k not in ("roles", "permissions")} == without_defaults
        assert project_events(received) != projected


def test_seeding_and_test_endpoints_over_http() -> None:
    with Receiver(SECRET) as rec:
        config = EmulatorConfig(
            port=0,
            secret_key=KEY,
            rate_limit=0,
            webhook_urls=(rec.url,),
            signing_secret=SECRET,
            seed_orgs=2,
            seed_members=3,
        )
        with Emulator(config) as emu:
            snapshot = call(emu, "GET", "/_emulator/snapshot")
            assert len(snapshot["organizations"]) == 2 and len(snapshot["memberships"]) == 6
            admins = [m for m in snapshot["memberships"] if m["role"] == "org:admin"]
            assert len(admins) == 2, "one admin per seeded organization"
            pending = [i for i in snapshot["invitations"] if i["status"] == "pending"]
            assert len(pending) == 2

            member = call(
                emu, "POST", f"/_emulator/invitations/{pending[0]['id']}/accept", {"first_name": "New"}
            )
            assert member["public_user_data"]["first_name"] == "New"

            report = call(emu, "POST", "/_emulator/scenario", {"steps": 50, "seed": 1})
            assert report["steps"] == 50
            settled = call(emu, "POST", "/_emulator/settle", {"timeout": 30})
            assert settled == {"settled": True, "pending": 0}
            stats = call(emu, "GET", "/_emulator/stats")
            assert stats["delivery"]["pending"] == 0 and stats["delivery"]["succeeded"] > 0
            log = call(emu, "GET", "/_emulator/deliveries?limit=5")
            assert len(log["data"]) == 5 and log["data"][-1]["outcome"] == "succeeded"
            one = call(emu, "GET", f"/_emulator/deliveries?msg_id={log['data'][0]['msg_id']}")
            assert one["total_count"] == 1
            assert call(emu, "GET", "/_emulator/dropped") == {"data": [], "total_count": 0}
            assert call(emu, "GET", "/_emulator/snapshot") == emu.snapshot()


def test_run_emulator_prints_where_it_listens() -> None:
    lines: list[str] = []
    stop = threading.Event()
    config = EmulatorConfig(port=0, secret_key=KEY, seed_orgs=1, seed_members=2)

    def output(line: str) -> None:
        lines.append(line)
        if line.startswith("Seeded"):
            stop.set()

    thread = threading.Thread(target=run_emulator, args=(config,), kwargs={"out": output, "stop": stop})
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert lines[0].startswith("Clerk emulator listening on http://127.0.0.1:")
    assert lines[0].endswith("/v1)")
    assert "Seeded 1 organizations, 2 memberships" in lines
    # Then who to sign in as, with a session token from ``orgsync session-token``.
    assert lines[-1].startswith("An admin of org_")
    assert all(KEY not in line and "whsec_" not in line for line in lines), "no secrets printed"


@pytest.mark.parametrize("steps", [0, 200])
def test_scenario_steps_always_leave_a_consistent_state(steps: int) -> None:
    state = State(seed=steps)
    Scenario(state, seed=steps, min_orgs=1).run(steps)
    snapshot = state.snapshot()
    org_ids = {o["id"] for o in snapshot["organizations"]}
    user_ids = {u["id"] for u in snapshot["users"]}
    assert all(m["organization_id"] in org_ids and m["user_id"] in user_ids for m in snapshot["memberships"])
    assert all(i["organization_id"] in org_ids for i in snapshot["invitations"])
