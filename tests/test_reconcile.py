"""Reconciliation against the emulator over real HTTP: backfill, repairs, resume, 429s, listing versions."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import examples, truncate_all
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mirror_compare import describe, differences, mirror_snapshot
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from emulator import DEFAULT_SECRET_KEY, Emulator, EmulatorConfig
from emulator.payloads import (
    BARE_MEMBERSHIP,
    BARE_ORGANIZATION,
    OMIT,
    membership_data,
    organization_data,
    webhook_body,
)
from models.db import make_session_factory, session_scope
from models.events import (
    INVITATION_RANK,
    INVITATIONS,
    MEMBERSHIP_RANK,
    MEMBERSHIPS,
    OBJECT_RANK,
    ORGANIZATION_RANK,
    ORGANIZATIONS,
    ROLES,
    Event,
    membership_version,
    object_version,
)
from models.inbox import store_delivery
from models.mirror import apply_events
from models.reconcile import (
    SCOPE_INSTANCE,
    Absent,
    Drift,
    SyncBusyError,
    absent_rows,
    claim_run,
    listing_version,
    tombstone_rows,
    tombstone_version,
    write_listing,
)
from models.settings import Settings
from models.tables import ApiCall, Membership, Organization, SyncRun, SyncStatus
from orgsync.cli import cli
from orgsync.cli.base import Runtime
from worker import reconcile as reconcile_module
from worker.app import TASK_RECONCILE, TASK_RECONCILE_ORG, create_celery
from worker.apply import apply_inbox
from worker.clerk import ClerkClient
from worker.reconcile import CountingLimiter, Progress, SyncResult, run_reconcile

RECONCILED = ("organizations", "memberships", "invitations", "roles")
Snapshot = dict[str, list[dict[str, Any]]]


def reconciled(state: Any) -> Snapshot:
    return {name: state[name] for name in RECONCILED}


def make_client(emu: Emulator, *, per_window: int = 1000, window: int = 10) -> ClerkClient:
    limiter = CountingLimiter(
        "memory://", per_window, 10, window=window, namespace=f"t{uuid.uuid4().hex[:8]}"
    )
    return ClerkClient(secret_key=DEFAULT_SECRET_KEY, api_url=emu.api_url, timeout=10.0, limiter=limiter)


def mirror_of(factory: sessionmaker[Session]) -> Snapshot:
    with session_scope(factory) as session:
        return reconciled(mirror_snapshot(session))


def assert_mirror_equals_truth(factory: sessionmaker[Session], emu: Emulator) -> None:
    diff = differences(mirror_of(factory), reconciled(emu.snapshot()))
    assert not diff, describe(diff)


def counts(result: SyncResult) -> dict[str, dict[str, int]]:
    """The non-zero drift only, for readable assertions."""
    return {
        kind: {action: n for action, n in actions.items() if n}
        for kind, actions in result.drift.as_dict().items()
        if any(actions.values())
    }


@pytest.fixture
def emu() -> Iterator[Emulator]:
    config = EmulatorConfig(port=0, rate_limit=0, seed=3, seed_orgs=12, seed_members=6)
    with Emulator(config) as running:
        yield running


@pytest.fixture
def factory(sqlite_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(sqlite_engine)


# ------------------------------------------------------- listings the mirror cannot hold


def test_listed_objects_the_database_cannot_hold_are_skipped_with_the_reason(
    session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    good = {"object": "organization", "id": "org_good", "name": "Good", "created_at": 1, "updated_at": 1}
    bad = [
        dict(good, id="org_nul", name="Bad\x00"),
        dict(good, id="org_" + "9" * 100),
        dict(good, id="org_nan", created_at=float("nan")),
        dict(good, id="org_big", members_count=2**40),
        dict(good, id="org_meta", public_metadata={"x": float("inf")}),
    ]
    with caplog.at_level("WARNING", logger="models.reconcile"), session_scope(session_factory) as session:
        drift = write_listing(session, ORGANIZATIONS, [*bad, good], now_ms=10)
        # The organization of a skipped listing has no rows: nothing of it is absent.
        assert (
            absent_rows(session, MEMBERSHIPS, seen=set(), listed_since_ms=10, organization_id="org_\x00")
            == []
        )
    assert drift.as_dict()[ORGANIZATIONS]["created"] == 1
    with session_scope(session_factory) as session:
        assert list(session.scalars(select(Organization.id))) == ["org_good"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping a listed")]
    assert len(skipped) == len(bad)
    assert all("\x00" not in message for message in skipped)
    assert any("organizations.name contains a NUL character" in message for message in skipped)


# ------------------------------------------------------------------ listing versions


def test_a_listing_ranks_below_every_delivery_with_the_same_timestamps() -> None:
    created, updated = 1_700_000_000_000, 1_700_000_500_000
    listed = listing_version(MEMBERSHIPS, created_at=created, updated_at=updated)
    for kind in MEMBERSHIP_RANK:
        delivered = membership_version(
            created_at=created, updated_at=updated, kind=kind, timestamp_ms=1, svix_id="msg_x"
        )
        assert len(delivered) == len(listed)
        assert listed < delivered, kind
    # A later change (or a later generation) that a webhook missed does win.
    older = membership_version(
        created_at=created, updated_at=updated - 1, kind="deleted", timestamp_ms=updated + 99, svix_id="m"
    )
    assert older < listed
    regenerated = listing_version(MEMBERSHIPS, created_at=created + 1, updated_at=created + 1)
    tombstone = membership_version(
        created_at=created, updated_at=updated, kind="deleted", timestamp_ms=9, svix_id="m"
    )
    assert tombstone < regenerated
    for kind, ranks in (
        (ORGANIZATIONS, ORGANIZATION_RANK),
        (ROLES, OBJECT_RANK),
        (INVITATIONS, INVITATION_RANK),
    ):
        listed = listing_version(kind, created_at=created, updated_at=updated)
        for rank in ranks.values():
            delivered = object_version(updated_at=updated, rank=rank, timestamp_ms=1, svix_id="msg_x")
            assert len(delivered) == len(listed) and listed < delivered, (kind, rank)
        assert object_version(updated_at=updated - 1, rank=3, timestamp_ms=updated, svix_id="m") < listed


def test_a_confirmed_deletion_outranks_every_change_of_its_generation() -> None:
    created, updated, checked = 100, 200, 10_000
    gone = tombstone_version(MEMBERSHIPS, created_at=created, updated_at=updated, checked_at=checked)
    # Any update of that generation happened before Clerk answered that it was gone.
    late = membership_version(
        created_at=created, updated_at=checked - 1, kind="updated", timestamp_ms=checked + 5, svix_id="m"
    )
    assert late < gone
    assert listing_version(MEMBERSHIPS, created_at=created, updated_at=checked - 1) < gone
    assert gone < listing_version(MEMBERSHIPS, created_at=created + 1, updated_at=created + 1)


# ------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("engine", ["sqlite", "postgres"], indirect=True)
def test_backfill_equals_the_snapshot_and_a_second_run_repairs_nothing(engine: Engine, emu: Emulator) -> None:
    factory = make_session_factory(engine)
    emu.state.create_role(name="Billing", key="org:billing", permissions=["org:sys_billing:manage"])
    seen: list[Progress] = []
    client = make_client(emu)
    first = run_reconcile(factory, client, workers=3, on_progress=seen.append)
    assert first.status == SyncStatus.COMPLETED, first.error
    assert_mirror_equals_truth(factory, emu)
    truth = emu.snapshot()
    found = counts(first)
    assert {kind: found[kind] for kind in RECONCILED} == {
        kind: {"created": len(truth[kind])} for kind in RECONCILED
    }
    assert found["role_sets"] == {"created": 1}
    assert seen and seen[-1].organizations_done == seen[-1].organizations_total == 12
    # Users, permissions, roles, role sets, domains (1 call each) + organizations (1) +
    # memberships and invitations (1 each per organization).
    assert first.api_calls == 6 + 2 * 12

    second = run_reconcile(factory, client)
    assert second.status == SyncStatus.COMPLETED and second.drift.total == 0
    with session_scope(factory) as session:
        runs = session.scalars(select(SyncRun).order_by(SyncRun.id)).all()
        assert [(r.status, r.scope) for r in runs] == [(SyncStatus.COMPLETED, SCOPE_INSTANCE)] * 2
        assert Drift.from_dict(runs[0].drift).total == first.drift.total
        assert runs[0].api_calls == first.api_calls and runs[0].finished_at is not None


def test_missed_changes_creates_and_deletes_are_repaired_and_counted(
    factory: sessionmaker[Session], emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Re-checked two users per call, so that the missing members take several calls.
    monkeypatch.setattr(reconcile_module, "RECHECK_USERS", 2)
    client = make_client(emu)
    state = emu.state
    role = state.create_role(name="Gone", key="org:gone")
    assert run_reconcile(factory, client).status == SyncStatus.COMPLETED
    orgs = state.organization_ids()
    # Changes no webhook told the mirror about (the emulator has no endpoint).
    changed_org, emptied_org, deleted_org = orgs[0], orgs[1], orgs[2]
    members = state.members_of(changed_org)
    state.update_membership_role(changed_org, members[1][0], role="org:admin")
    for user_id, _ in members[2:5]:
        state.remove_membership(changed_org, user_id)
    invitation_id, _ = state.pending_invitations_of(changed_org)[0]
    state.revoke_invitation(changed_org, invitation_id)
    state.update_organization(emptied_org, name="Renamed")
    doomed = len(state.members_of(deleted_org)), len(state.pending_invitations_of(deleted_org))
    state.delete_organization(deleted_org)
    user = state.create_user(email_address="late@example.com", first_name="Late", last_name="Comer")["id"]
    state.create_organization(name="Newcomer", slug="newcomer", created_by=str(user))
    state.delete_role(str(role["id"]))

    result = run_reconcile(factory, client)
    assert result.status == SyncStatus.COMPLETED, result.error
    assert_mirror_equals_truth(factory, emu)
    assert counts(result) == {
        ORGANIZATIONS: {"created": 1, "updated": 1, "tombstoned": 1},
        MEMBERSHIPS: {"created": 1, "updated": 1, "tombstoned": 3 + doomed[0]},
        INVITATIONS: {"updated": 1, "tombstoned": doomed[1]},
        ROLES: {"tombstoned": 1},
        # The user created without a webhook: reconciliation lists users too.
        "users": {"created": 1},
    }
    with session_scope(factory) as session:
        gone = session.get(Organization, deleted_org)
        assert gone is not None and gone.deleted
        left = session.get(Membership, (changed_org, members[2][0]))
        assert left is not None and left.deleted


def test_one_organization_by_slug_and_one_that_is_gone(factory: sessionmaker[Session], emu: Emulator) -> None:
    client = make_client(emu)
    org_id = emu.state.organization_ids()[4]
    slug = emu.state.get_organization(org_id)["slug"]
    result = run_reconcile(factory, client, organization=slug)
    assert (result.status, result.organization_id, result.organizations) == (SyncStatus.COMPLETED, org_id, 1)
    assert counts(result)[MEMBERSHIPS] == {"created": 6}
    with session_scope(factory) as session:
        assert {m.organization_id for m in session.scalars(select(Membership))} == {org_id}

    emu.state.delete_organization(org_id)
    gone = run_reconcile(factory, client, organization=org_id)
    assert counts(gone) == {
        ORGANIZATIONS: {"tombstoned": 1},
        MEMBERSHIPS: {"tombstoned": 6},
        INVITATIONS: {"tombstoned": 1},
    }
    with pytest.raises(reconcile_module.OrganizationNotFoundError):
        run_reconcile(factory, client, organization="no-such-org")


def test_an_interrupted_run_resumes_where_it_stopped(
    factory: sessionmaker[Session], emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile_module, "FLUSH_ORGS", 3)
    stop = threading.Event()

    def stop_after_two_batches(progress: Progress) -> None:
        if progress.organizations_done >= 6:
            stop.set()

    client = make_client(emu)
    first = run_reconcile(factory, client, workers=1, on_progress=stop_after_two_batches, stop=stop)
    assert first.status == SyncStatus.INTERRUPTED
    assert 6 <= first.organizations < 12
    with session_scope(factory) as session:
        run = session.get(SyncRun, first.run_id)
        assert run is not None and run.status == SyncStatus.INTERRUPTED and run.progress
        assert run.progress["after"]

    second = run_reconcile(factory, client)
    assert (second.run_id, second.resumed, second.status) == (first.run_id, True, SyncStatus.COMPLETED)
    assert second.organizations == 12
    # Only the organizations after the cursor were fetched again: the five instance listings,
    # the organization page, and two calls for each organization not done before.
    assert second.api_calls - first.api_calls == 6 + 2 * (12 - first.organizations)
    assert_mirror_equals_truth(factory, emu)
    assert counts(second)[MEMBERSHIPS] == {"created": 12 * 6}


def test_a_stale_running_run_is_taken_over_and_a_live_one_is_left_alone(
    factory: sessionmaker[Session],
) -> None:
    with session_scope(factory) as session:
        run, resumed = claim_run(
            session, scope=SCOPE_INSTANCE, organization_id=None, now_ms=1_000, stale_after_ms=500
        )
        assert not resumed
    with session_scope(factory) as session, pytest.raises(SyncBusyError):
        claim_run(session, scope=SCOPE_INSTANCE, organization_id=None, now_ms=1_400, stale_after_ms=500)
    with session_scope(factory) as session:
        again, resumed = claim_run(
            session, scope=SCOPE_INSTANCE, organization_id=None, now_ms=1_600, stale_after_ms=500
        )
        assert resumed and again.id == run.id and again.heartbeat_at == 1_600


def test_429s_from_a_low_budget_are_waited_out(factory: sessionmaker[Session]) -> None:
    # The emulator allows 8 calls a second; orgsync is told 1000 per 10 s, so it meets 429s.
    config = EmulatorConfig(port=0, rate_limit=8, rate_window=1.0, seed=5, seed_orgs=6, seed_members=3)
    with Emulator(config) as emu:
        result = run_reconcile(factory, make_client(emu), workers=4)
        assert result.status == SyncStatus.COMPLETED, result.error
        assert result.rate_limit_waits > 0
        assert_mirror_equals_truth(factory, emu)
    with session_scope(factory) as session:
        refused = session.scalars(select(ApiCall).where(ApiCall.status_code == 429)).all()
    assert refused and {call.purpose for call in refused} == {"reconcile"}
    assert all(call.retry_after for call in refused)


def test_the_shared_budget_share_caps_reconciliation(emu: Emulator, factory: sessionmaker[Session]) -> None:
    # 20 calls per second at share 0.5: reconciliation may take 10 of them; its 30 calls wait.
    limiter = CountingLimiter("memory://", 20, 10, window=1, share=0.5, namespace=f"t{uuid.uuid4().hex[:8]}")
    client = ClerkClient(secret_key=DEFAULT_SECRET_KEY, api_url=emu.api_url, timeout=10.0, limiter=limiter)
    result = run_reconcile(factory, client, workers=2)
    assert result.status == SyncStatus.COMPLETED and result.api_calls == 30
    assert result.rate_limit_waits > 0


# ------------------------------------------------------------------ command line


def test_orgsync_sync_prints_the_drift_and_json(emu: Emulator, sqlite_url: str, tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": sqlite_url,
        "ORGSYNC_DATA_DIR": str(tmp_path),
        "CLERK_SECRET_KEY": DEFAULT_SECRET_KEY,
        "CLERK_API_URL": emu.api_url,
        "ORGSYNC_RATE_LIMIT_STORAGE": "memory://",
    }
    runner = CliRunner()
    text = runner.invoke(cli, ["sync", "--progress"], obj=Runtime(environ=env), catch_exceptions=False)
    assert text.exit_code == 0, text.output
    assert "completed" in text.output and "memberships" in text.output and "72" in text.output
    assert "orgs |" in text.stderr and "ETA" in text.stderr
    again = runner.invoke(
        cli, ["sync", "--json", "--org", emu.state.organization_ids()[0]], obj=Runtime(environ=env)
    )
    assert again.exit_code == 0, again.output
    body = again.stdout
    assert '"drift_total": 0' in body and '"scope": "organization"' in body
    missing = runner.invoke(cli, ["sync", "--org", "nope"], obj=Runtime(environ=env))
    assert missing.exit_code == 4 and "nope" in missing.stderr


# ------------------------------------------------------- reconciliation on demand


def test_events_for_an_unseen_organization_ask_for_its_reconciliation(factory: sessionmaker[Session]) -> None:
    def organization(org_id: str, name: str) -> dict[str, Any]:
        return organization_data(org_id, name=name, slug=name, created_at=OMIT, **BARE_ORGANIZATION)

    def membership(org_id: str, user_id: str) -> dict[str, Any]:
        return membership_data(
            f"orgmem_{org_id}_{user_id}",
            organization(org_id, org_id),
            user_id,
            public_user_data={"user_id": user_id},
            created_at=10,
            **BARE_MEMBERSHIP,
        )

    bodies = [
        ("organizationMembership.created", membership("org_old", "user_1")),
        ("organizationMembership.created", membership("org_old", "user_2")),
        ("organization.created", organization("org_new", "n")),
        ("organizationMembership.created", membership("org_new", "user_1")),
    ]
    with session_scope(factory) as session:
        ids = [
            store_delivery(
                session, svix_id=f"msg_{n}", body=webhook_body(kind, data, 1_000 + n), received_at=1
            ).inbox_id
            for n, (kind, data) in enumerate(bodies)
        ]
    asked: list[list[str]] = []
    report = apply_inbox(factory, ids, now_ms=2_000, max_attempts=3, on_unseen_organizations=asked.append)
    assert report.applied == 4
    # org_new arrived with its own created event: nothing about it can have been missed.
    assert asked == [["org_old"]]
    with session_scope(factory) as session:
        kind, data = bodies[1]
        more = store_delivery(
            session, svix_id="msg_9", body=webhook_body(kind, data, 5_000), received_at=1
        ).inbox_id
    apply_inbox(factory, [more], now_ms=6_000, max_attempts=3, on_unseen_organizations=asked.append)
    assert asked == [["org_old"]]


# --------------------------------------------- listings interleaved with webhooks


ORG = "org_prop"
PEOPLE = ("user_a", "user_b", "user_c")
ROLE_KEYS = ("org:admin", "org:member")
STEP_MS = 7


class World:
    """Clerk's truth for one organization, the webhooks in flight, and listings taken but not yet written.

    One clock serves both sides, as wall time does: a change at ``t`` carries ``updated_at = t``,
    and whatever orgsync writes at ``t`` gets ``synced_at = t``.
    """

    def __init__(self, factory: sessionmaker[Session], ops: list[tuple[str, str, str]]) -> None:
        self.factory = factory
        self.ops = list(ops)
        self.clock = 1_000
        self.truth: dict[str, dict[str, Any]] = {}
        self.in_flight: list[Event] = []
        self.listings: list[tuple[int, list[dict[str, Any]]]] = []
        self.rechecks: list[tuple[int, list[Absent]]] = []
        self.messages = 0
        self.versions: dict[tuple[str, str], str] = {}
        self.dead: set[tuple[str, int | None]] = set()

    def tick(self) -> int:
        self.clock += STEP_MS
        return self.clock

    def emit(self, action: str, data: dict[str, Any], at: int) -> None:
        self.messages += 1
        self.in_flight.append(
            Event(f"msg_{self.messages}", f"organizationMembership.{action}", at, copy.deepcopy(data))
        )

    def step_history(self) -> None:
        kind, user, role = self.ops.pop(0)
        now = self.tick()
        current = self.truth.get(user)
        if kind == "join" and current is None:
            self.messages += 1
            organization = organization_data(
                ORG, name="P", slug="p", created_at=OMIT, updated_at=1, **BARE_ORGANIZATION
            )
            self.truth[user] = membership_data(
                f"orgmem_{self.messages}",
                organization,
                user,
                role=role,
                public_user_data={"user_id": user, "identifier": f"{user}@example.com"},
                created_at=now,
                **BARE_MEMBERSHIP,
            )
            self.emit("created", self.truth[user], now)
        elif kind == "change" and current is not None:
            current["role"], current["updated_at"] = role, now
            self.emit("updated", current, now)
        elif kind == "leave" and current is not None:
            # The deleted event carries the membership as it last was: updated_at unchanged.
            self.emit("deleted", self.truth.pop(user), now)

    def deliver(self, index: int, duplicate: bool) -> None:
        event = self.in_flight[index] if duplicate else self.in_flight.pop(index)
        with session_scope(self.factory) as session:
            apply_events(session, [event], now_ms=self.tick())

    def take_listing(self) -> None:
        items = sorted(self.truth.values(), key=lambda m: m["created_at"])
        self.listings.append((self.tick(), copy.deepcopy(items)))

    def write_listing(self, index: int) -> None:
        started, items = self.listings.pop(index)
        with session_scope(self.factory) as session:
            write_listing(session, MEMBERSHIPS, items, now_ms=self.tick())
            seen = {(ORG, m["public_user_data"]["user_id"]) for m in items}
            absent = absent_rows(
                session, MEMBERSHIPS, seen=seen, listed_since_ms=started, organization_id=ORG
            )
        if absent:
            self.rechecks.append((started, absent))

    def recheck(self, index: int) -> None:
        """The GET for each missing row, answered by Clerk's truth at this moment."""
        started, absent = self.rechecks.pop(index)
        now = self.tick()
        found = [copy.deepcopy(self.truth[a.key[1]]) for a in absent if a.key[1] in self.truth]
        gone = [a for a in absent if a.key[1] not in self.truth]
        with session_scope(self.factory) as session:
            write_listing(session, MEMBERSHIPS, found, now_ms=now)
            tombstone_rows(session, gone, listed_since_ms=started, now_ms=now)

    def check_no_regression(self) -> None:
        with session_scope(self.factory) as session:
            rows = session.scalars(select(Membership)).all()
            for row in rows:
                key = (row.organization_id, row.user_id)
                before = self.versions.get(key)
                assert before is None or row.version >= before, (row.user_id, before, row.version)
                self.versions[key] = row.version
                # A generation (one created_at) once shown deleted never shows alive again.
                generation = (row.user_id, row.created_at)
                assert not (generation in self.dead and not row.deleted), ("resurrected", generation)
                if row.deleted:
                    self.dead.add(generation)

    def live_mirror(self) -> dict[str, tuple[Any, ...]]:
        with session_scope(self.factory) as session:
            rows = session.scalars(select(Membership).where(Membership.deleted.is_(False))).all()
            return {r.user_id: (r.id, r.role, r.created_at, r.updated_at) for r in rows}

    def live_truth(self) -> dict[str, tuple[Any, ...]]:
        return {u: (m["id"], m["role"], m["created_at"], m["updated_at"]) for u, m in self.truth.items()}


operations = st.lists(
    st.tuples(
        st.sampled_from(("join", "change", "leave")), st.sampled_from(PEOPLE), st.sampled_from(ROLE_KEYS)
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=examples(120),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# A missed change and a removal both still in flight when the listing shows the member gone:
# the confirmed tombstone must outrank the late change, or it would resurrect the member.
@example(
    ops=[
        ("join", "user_a", "org:member"),
        ("change", "user_a", "org:admin"),
        ("leave", "user_a", "org:member"),
    ],
    schedule=[(0, 0), (1, 1), (0, 0), (0, 0), (2, 0), (3, 0), (4, 0), (1, 2)],
)
# A listing taken before a removal and written after it must not undo it (equal timestamps).
@example(
    ops=[("join", "user_a", "org:member"), ("leave", "user_a", "org:member")],
    schedule=[(0, 0), (1, 1), (2, 0), (0, 0), (1, 1), (3, 0)],
)
@given(ops=operations, schedule=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 50)), max_size=60))
def test_listings_interleaved_with_webhooks_never_regress_a_row(
    sqlite_engine: Engine, ops: list[tuple[str, str, str]], schedule: list[tuple[int, int]]
) -> None:
    truncate_all(sqlite_engine)
    world = World(make_session_factory(sqlite_engine), ops)
    for action, pick in schedule:
        if action == 0 and world.ops:
            world.step_history()
        elif action == 1 and world.in_flight:
            world.deliver(pick % len(world.in_flight), duplicate=pick % 5 == 0)
        elif action == 2:
            world.take_listing()
        elif action == 3 and world.listings:
            world.write_listing(pick % len(world.listings))
        elif action == 4 and world.rechecks:
            world.recheck(pick % len(world.rechecks))
        world.check_no_regression()
    while world.ops:
        world.step_history()
    while world.in_flight:
        world.deliver(0, duplicate=False)
        world.check_no_regression()
    # Listings and re-checks left over are stale by now: they must change nothing that matters.
    while world.listings or world.rechecks:
        if world.listings:
            world.write_listing(0)
        if world.rechecks:
            world.recheck(0)
        world.check_no_regression()
    assert world.live_mirror() == world.live_truth()


# ------------------------------------------------------------------------ tasks


def test_the_celery_tasks_and_the_beat_entry(emu: Emulator, sqlite_url: str, tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": sqlite_url,
        "ORGSYNC_DATA_DIR": str(tmp_path),
        "CLERK_SECRET_KEY": DEFAULT_SECRET_KEY,
        "CLERK_API_URL": emu.api_url,
        "ORGSYNC_RECONCILE_INTERVAL": "3600",
    }
    app = create_celery(Settings.from_env(env))
    assert app.conf.beat_schedule["orgsync-reconcile"]["schedule"] == 3600.0
    assert (
        "orgsync-reconcile"
        not in create_celery(Settings.from_env({**env, "ORGSYNC_RECONCILE_INTERVAL": "0"})).conf.beat_schedule
    )
    org_id = emu.state.organization_ids()[0]
    one = app.tasks[TASK_RECONCILE_ORG].apply(args=[org_id]).get()
    assert (one["status"], one["organization_id"], one["drift"]["memberships"]["created"]) == (
        "completed",
        org_id,
        6,
    )
    whole = app.tasks[TASK_RECONCILE].apply().get()
    assert whole["status"] == "completed" and whole["drift"]["memberships"]["created"] == 11 * 6
    app.orgsync_database.stop()
