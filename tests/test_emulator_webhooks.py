"""The emulator's Svix side: signed deliveries, event shapes and cascades, retries, chaos, the log."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from svix.webhooks import Webhook

from emulator import ChaosConfig, Emulator, EmulatorConfig, Outage, State
from emulator.delivery import WebhookDelivery
from emulator.records import Clock
from emulator.testing import Receiver

SECRET = "whsec_dGVzdC1zaWduaW5nLXNlY3JldC1mb3Itb3Jnc3luYw=="
FAST = 1e-6  # time_scale: Svix's hours become milliseconds
# settle() returns as soon as every delivery ended: the bound only turns a hang into a failure.
SETTLE_S = 120.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET) as rec:
        yield rec


def emulator_for(*urls: str, **overrides: Any) -> Emulator:
    options: dict[str, Any] = {
        "port": 0,
        "rate_limit": 0,
        "webhook_urls": urls,
        "signing_secret": SECRET,
        "time_scale": FAST,
        "delivery_workers": 1,
    }
    options.update(overrides)
    return Emulator(EmulatorConfig(**options))


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_deliveries_are_signed_and_shaped_like_clerk(receiver: Receiver) -> None:
    with emulator_for(receiver.url) as emu:
        state = emu.state
        user = state.create_user(email_address="ada@example.com", first_name="Ada", last_name="L")
        org = state.create_organization(name="Acme", created_by=user["id"])
        assert emu.settle(SETTLE_S)
    received = receiver.accepted()
    assert [r.event["type"] for r in received] == [
        "user.created",
        "organization.created",
        "organizationMembership.created",
    ]
    verifier = Webhook(SECRET)
    for item in received:
        verifier.verify(item.body, item.headers)  # raises if the signature does not hold
        assert item.msg_id.startswith("msg_")
        assert item.headers["content-type"] == "application/json"
        event = item.event
        assert event["object"] == "event" and event["instance_id"] == emu.config.instance_id
        assert event["timestamp"] > 10**12, "envelope timestamps are milliseconds"
    membership = received[2].event["data"]
    assert membership["organization"]["id"] == org["id"]
    assert membership["public_user_data"]["user_id"] == user["id"]
    assert membership["role"] == "org:admin"
    assert len({r.msg_id for r in received}) == 3


def test_api_responses_and_webhook_data_are_the_same_object(receiver: Receiver) -> None:
    with emulator_for(receiver.url) as emu:
        user = emu.state.create_user(email_address="bob@example.com")
        org = emu.state.create_organization(name="Acme", created_by=user["id"])
        changed = emu.state.update_membership_metadata(org["id"], user["id"], public_metadata={"k": 1})
        assert emu.settle(SETTLE_S)
    last = receiver.accepted()[-1].event
    assert last["type"] == "organizationMembership.updated"
    assert last["data"] == changed
    assert last["timestamp"] == changed["updated_at"]


def test_every_change_emits_its_event_and_deletions_cascade(receiver: Receiver) -> None:
    with emulator_for(receiver.url) as emu:
        s = emu.state
        admin = s.create_user(email_address="admin@example.com")["id"]
        bob = s.create_user(email_address="bob@example.com")["id"]
        org = s.create_organization(name="Acme", created_by=admin)["id"]
        s.add_membership(org, user_id=bob, role="org:member")
        s.update_membership_role(org, bob, role="org:admin")
        role = s.create_role(name="Editor", key="org:editor")
        s.delete_role(role["id"])
        invite = s.create_invitation(org, email_address="carol@example.com", role="org:member")
        s.accept_invitation(invite["id"])
        other = s.create_invitation(org, email_address="dan@example.com", role="org:member")
        s.revoke_invitation(org, other["id"])
        s.update_organization(org, name="Acme 2")
        s.delete_user(bob)
        s.delete_organization(org)
        assert emu.settle(SETTLE_S)
    events = receiver.accepted_events()
    kinds = types_of(events)
    # Accepting emits both events together, in an unspecified order.
    accepted_at = kinds.index("organizationInvitation.accepted")
    created_at = [i for i, k in enumerate(kinds) if k == "organizationMembership.created"][-1]
    assert abs(accepted_at - created_at) == 1
    assert Counter(kinds) == Counter(
        {
            "user.created": 3,
            "organization.created": 1,
            "organizationMembership.created": 3,
            "organizationMembership.updated": 1,
            "role.created": 1,
            "role.deleted": 1,
            "organizationInvitation.created": 2,
            "organizationInvitation.accepted": 1,
            "organizationInvitation.revoked": 1,
            "organization.updated": 1,
            "organizationMembership.deleted": 3,
            "user.deleted": 1,
            "organization.deleted": 1,
        }
    )
    # Deleting bob: his membership goes first; deleting the org: one deleted event per member, then the org.
    assert kinds[-6:] == [
        "organization.updated",
        "organizationMembership.deleted",
        "user.deleted",
        "organizationMembership.deleted",
        "organizationMembership.deleted",
        "organization.deleted",
    ]
    assert events[-1]["data"] == {"object": "organization", "id": org, "slug": "acme", "deleted": True}
    accepted = next(e for e in events if e["type"] == "organizationInvitation.accepted")
    assert accepted["data"]["status"] == "accepted" and accepted["data"]["user_id"].startswith("user_")
    timestamps = [e["timestamp"] for e in events]
    assert timestamps == sorted(set(timestamps)), "envelope timestamps strictly increase"


def test_retries_keep_the_svix_id_and_sign_each_attempt() -> None:
    with Receiver(SECRET, fail_first=2) as rec, emulator_for(rec.url) as emu:
        emu.state.create_user(email_address="retry@example.com")
        assert emu.settle(SETTLE_S)
        log = emu.delivery.log()
    assert [r.status for r in rec.received] == [500, 500, 204]
    assert len({r.msg_id for r in rec.received}) == 1
    assert all(r.verified for r in rec.received)
    assert [(a.attempt, a.status, a.outcome) for a in log] == [
        (1, 500, "retrying"),
        (2, 500, "retrying"),
        (3, 204, "succeeded"),
    ]
    assert {a.msg_id for a in log} == {rec.received[0].msg_id}


def test_a_message_fails_after_the_whole_schedule() -> None:
    with Receiver(SECRET, status=lambda attempt: 302) as rec, emulator_for(rec.url) as emu:
        emu.state.create_user(email_address="never@example.com")
        assert emu.settle(SETTLE_S)
        outcomes = emu.delivery.outcomes()
        stats = emu.delivery.stats()
    assert len(rec.received) == 8, "Svix makes 8 attempts: immediately, 5 s, 5 min, ... 10 h, 10 h"
    assert list(outcomes.values()) == [{rec.url: "failed"}]
    assert stats["failed"] == 1 and stats["succeeded"] == 0


def test_unreachable_endpoint_is_retried_then_failed() -> None:
    with Receiver(SECRET) as rec:
        url = rec.url
    # The receiver is stopped: connections are refused.
    with emulator_for(url) as emu:
        emu.state.create_user(email_address="nobody@example.com")
        assert emu.settle(SETTLE_S)
        log = emu.delivery.log()
    assert len(log) == 8 and all(a.status is None and a.error for a in log)
    assert log[-1].outcome == "failed"


def test_every_endpoint_gets_every_message(receiver: Receiver) -> None:
    with Receiver(SECRET) as second, emulator_for(receiver.url, second.url) as emu:
        emu.state.create_user(email_address="one@example.com")
        emu.state.create_user(email_address="two@example.com")
        assert emu.settle(SETTLE_S)
        ids = [r.msg_id for r in second.accepted()]
    assert sorted(ids) == sorted(r.msg_id for r in receiver.accepted())
    assert len(ids) == 2


def test_outage_windows_fail_attempts_until_they_end(receiver: Receiver) -> None:
    chaos = ChaosConfig(outages=(Outage(0.0, 0.3),))
    # With time_scale 2e-3 the retries come 10 ms, then 0.6 s after: the third attempt is after the outage.
    with emulator_for(receiver.url, chaos=chaos, time_scale=2e-3) as emu:
        emu.state.create_user(email_address="outage@example.com")
        assert emu.settle(SETTLE_S)
        log = emu.delivery.log()
    assert [a.error for a in log[:2]] == ["endpoint outage (chaos)"] * 2
    assert log[-1].outcome == "succeeded"
    assert len(receiver.received) == 1


def drive(state: State) -> None:
    """A fixed history of 40 events."""
    admin = state.create_user(email_address="admin@example.com")["id"]
    org = state.create_organization(name="Acme", created_by=admin)["id"]
    for n in range(12):
        user = state.create_user(email_address=f"u{n}@example.com")["id"]
        state.add_membership(org, user_id=user, role="org:member")
        if n % 2:
            state.update_membership_role(org, user, role="org:admin")


def chaotic_run(receiver_url: str, seed: int) -> tuple[Emulator, list[str]]:
    chaos = ChaosConfig(
        seed=seed, duplicate_rate=0.3, drop_rate=0.2, reorder_window=0.02, delay_rate=0.3, max_delay=0.02
    )
    emu = emulator_for(receiver_url, chaos=chaos, delivery_workers=4, seed=7)
    with emu:
        drive(emu.state)
        assert emu.settle(SETTLE_S)
    return emu, [e["type"] for e in [json.loads(m.body) for m in emu.delivery.dropped()]]


def plan_of(emu: Emulator) -> tuple[list[int], list[int]]:
    log = emu.delivery.log()
    dropped = sorted(a.seq for a in log if a.outcome == "dropped")
    duplicated = sorted(a.seq for a in log if a.copy == 1)
    return dropped, duplicated


def test_chaos_is_reproducible_with_a_seed() -> None:
    with Receiver(SECRET) as first_rec:
        first, _ = chaotic_run(first_rec.url, seed=42)
        first_received = Counter(r.msg_id for r in first_rec.accepted())
    with Receiver(SECRET) as second_rec:
        second, _ = chaotic_run(second_rec.url, seed=42)
    with Receiver(SECRET) as third_rec:
        third, _ = chaotic_run(third_rec.url, seed=43)

    assert plan_of(first) == plan_of(second)
    assert plan_of(first) != plan_of(third)
    dropped, duplicated = plan_of(first)
    assert dropped and duplicated

    # Same seeds, same history: the same events are dropped (message ids are always fresh).
    def dropped_objects(emu: Emulator) -> list[tuple[str, str]]:
        return [(m.event_type, m.data["id"]) for m in emu.delivery.dropped()]

    assert dropped_objects(first) == dropped_objects(second)

    dropped_ids = {m.msg_id for m in first.delivery.dropped()}
    assert not dropped_ids & set(first_received), "a dropped message is never delivered"
    assert all(a.attempt == 0 and a.status is None for a in first.delivery.log() if a.outcome == "dropped"), (
        "drops are logged, never attempted"
    )
    assert any(count == 2 for count in first_received.values()), "duplicates arrive with the same svix-id"
    total = first.delivery.stats()["messages"]
    assert len(first_received) == total - len(dropped_ids)


def test_reordering_delivers_out_of_order(receiver: Receiver) -> None:
    chaos = ChaosConfig(seed=1, reorder_window=0.05)
    with emulator_for(receiver.url, chaos=chaos, delivery_workers=4) as emu:
        drive(emu.state)
        assert emu.settle(SETTLE_S)
    arrived = [r.event["timestamp"] for r in receiver.accepted()]
    assert len(arrived) == emu.delivery.stats()["messages"]
    assert arrived != sorted(arrived)


def test_delivery_without_endpoints_only_counts() -> None:
    delivery = WebhookDelivery([], SECRET)
    state = State(clock=Clock(lambda: 1_700_000_000_000))
    state.subscribe(delivery.on_event)
    state.create_user(email_address="x@example.com")
    assert delivery.settle(0) and delivery.stats()["messages"] == 1


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        EmulatorConfig(signing_secret="nope")
    with pytest.raises(ValueError, match="drop_rate"):
        ChaosConfig(drop_rate=1.5)
    with pytest.raises(ValueError, match="START:END"):
        Outage.parse("5")
    assert Outage.parse("1.5:3") == Outage(1.5, 3.0)
    with pytest.raises(ValueError, match="webhook URL"):
        WebhookDelivery(["ftp://example.com"], SECRET)
