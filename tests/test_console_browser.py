"""The console as people use it: headless Chromium against real processes and the emulator.

One stack for the module (``orgsync serve`` and a Celery worker with beat, on PostgreSQL and
Redis; the emulator delivering Svix-signed webhooks to it) and one browser; the tests run in
file order on the same world, as one person's session would: the operator's flows first, then
members'. Every change made on a page is followed to the emulator's state, Clerk's truth here,
and to the page showing the command confirmed by the webhook that came back.

With ``ORGSYNC_SCREENSHOTS=docs/screenshots`` the main pages are saved as PNGs on the way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from browser import Browser, chromium, chromium_paths, screenshot_dir
from conftest import TEST_SIGNING_SECRET, free_port, truncate_all
from helpers import assert_no_secrets
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import sessionmaker
from stack import FAST_SWEEPS, Stack, hermetic_env, running_stack

from emulator import Emulator, EmulatorConfig, seed_state
from emulator.payloads import organization_data, webhook_body
from emulator.sessions import SessionIssuer
from models.db import create_db_engine, make_session_factory, session_scope
from models.inbox import store_delivery
from models.tables import Command, InboxEvent, InboxStatus, Membership, Organization

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900)]

SECRET_KEY = "sk_test_console_browser"
ADMIN_TOKEN = "operator-token-for-the-browser-tests"
COOKIE_KEY = "console-cookie-signing-key-for-the-browser-tests"
MEMBERS = 250
MIRROR_BOUND_S = 180.0


@dataclass
class World:
    """The running stack, the emulator, the browser, and who is who in the seeded organizations."""

    stack: Stack
    emu: Emulator
    browser: Browser
    factory: sessionmaker
    big: str  # 250 members, the first an admin
    small: str  # one admin (``lone_admin``) and one basic member (``basic``)
    lone_admin: str
    basic: str
    tokens: list[str] = field(default_factory=list)

    def member_token(self, user_id: str) -> str:
        token = self.emu.sessions.mint(user_id)
        self.tokens.append(token)
        return token


def _mirror_members(factory: sessionmaker, org_id: str) -> int:
    with session_scope(factory) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Membership)
                .where(Membership.organization_id == org_id, Membership.deleted.is_(False))
            )
            or 0
        )


def _small_team(emu: Emulator) -> tuple[str, str, str]:
    """(admin, basic member, organization): the only admin of an organization of two."""
    state = emu.state
    admin = state.create_user(email_address="lena.admin@small.example.com", first_name="Lena")["id"]
    basic = state.create_user(email_address="bo.member@small.example.com", first_name="Bo")["id"]
    org = state.create_organization(name="Small Team", slug="small-team", created_by=admin)["id"]
    state.add_membership(org, user_id=basic, role="org:member")
    return admin, basic, org


@pytest.fixture(scope="module")
def world(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    chromium_paths()  # skip (fail under CI=true) before starting anything when there is no browser
    tmp = tmp_path_factory.mktemp("console-browser")
    engine: Engine = create_db_engine(pg_url)
    truncate_all(engine)
    redis.Redis.from_url(redis_url).flushdb()
    # The key pair first: orgsync's CLERK_JWT_KEY is its public half, the emulator signs with it.
    key_file = tmp / "session-key.pem"
    public_pem = SessionIssuer(key_file=key_file).public_pem()
    port = free_port()
    env = hermetic_env(
        database_url=pg_url,
        broker_url=redis_url,
        data_dir=tmp / "data",
        signing_secret=TEST_SIGNING_SECRET,
        CLERK_SECRET_KEY=SECRET_KEY,
        CLERK_API_URL=f"http://127.0.0.1:{port}/v1",
        CLERK_JWT_KEY=public_pem,
        ORGSYNC_ADMIN_TOKENS=ADMIN_TOKEN,
        ORGSYNC_SECRET_KEY=COOKIE_KEY,
        **FAST_SWEEPS,
    )
    factory = make_session_factory(engine)
    with running_stack(env, tmp / "logs") as stack:
        stack.start_web()
        stack.start_worker(beat=True, concurrency=2)
        config = EmulatorConfig(
            port=port,
            secret_key=SECRET_KEY,
            webhook_urls=(stack.webhook_url,),
            signing_secret=TEST_SIGNING_SECRET,
            announce_defaults=True,
            seed=11,
            rate_limit=0,
            membership_rate_limit=0,
            session_key_file=key_file,
        )
        with Emulator(config) as emu, chromium(tmp) as driver:
            seed_state(emu.state, organizations=1, members=MEMBERS, seed=11)
            (big,) = emu.state.organization_ids()
            lone_admin, basic, small = _small_team(emu)
            stack.wait_for(
                "the mirror to hold every seeded member",
                lambda: (
                    True
                    if _mirror_members(factory, big) == MEMBERS and _mirror_members(factory, small) == 2
                    else None
                ),
                MIRROR_BOUND_S,
            )
            browser = Browser(driver, f"http://127.0.0.1:{stack.port}", screenshot_dir())
            world = World(stack, emu, browser, factory, big, small, lone_admin, basic)
            yield world
    engine.dispose()
    # No process logged a secret, the operator's token or a member's session token.
    assert_no_secrets(
        stack.output(lines=1_000_000), SECRET_KEY, TEST_SIGNING_SECRET, ADMIN_TOKEN, COOKIE_KEY, *world.tokens
    )


# ------------------------------------------------------------------------------ helpers
def sign_in_operator(world: World) -> None:
    b = world.browser
    b.driver.delete_all_cookies()
    b.open("/console/login")
    b.find("input[name=token]").send_keys(ADMIN_TOKEN)
    b.find("input[name=token]").submit()
    b.wait_css("form.signout", "the signed-in header")
    assert "Signed in as operator 1" in b.text()


def sign_in_member(world: World, user_id: str) -> None:
    """As Clerk's frontend leaves it: the session token in the ``__session`` cookie."""
    b = world.browser
    b.driver.delete_all_cookies()
    b.open("/console/login")
    b.driver.add_cookie({"name": "__session", "value": world.member_token(user_id), "path": "/"})
    b.open("/console/")
    b.wait_css("form.signout", "the signed-in header")
    assert f"Signed in as {user_id}" in b.text()


def csrf(world: World) -> str:
    return str(world.browser.find("form.signout input[name=csrf_token]").get_attribute("value"))


def row_of(world: World, user_id: str) -> str:
    """The css selector of a member's row on the members page."""
    return f"tr[data-user='{user_id}']"


def wait_confirmed(world: World, scope: str) -> str:
    """Wait until the command shown inside ``scope`` is final; its status."""
    b = world.browser

    def final() -> str | None:
        found = b.find_all(f"{scope} [data-status]")
        status = found[0].get_attribute("data-status") if found else None
        return status if status in ("confirmed", "failed", "superseded") else None

    return b.wait_for(f"the command in {scope} to be confirmed", final, MIRROR_BOUND_S)


def role_in_emulator(world: World, org_id: str, user_id: str) -> str | None:
    return dict(world.emu.state.members_of(org_id)).get(user_id)


# -------------------------------------------------------------------------------- tests
def test_operator_signs_in_and_pages_through_every_member(world: World) -> None:
    b = world.browser
    b.driver.delete_all_cookies()
    b.open("/console/organizations")
    assert b.path.startswith("/console/login"), "the console asks who you are first"
    b.shot("login")
    b.find("input[name=token]").send_keys("not-the-token-of-anyone-here")
    b.find("input[name=token]").submit()
    assert "not one of ORGSYNC_ADMIN_TOKENS" in b.wait_css("[role=alert]").text

    sign_in_operator(world)
    b.open("/console/organizations")
    table = b.wait_css("table.orgs")
    assert "Small Team" in table.text and f"{MEMBERS:,}" in table.text
    b.shot("organizations")

    b.open(f"/console/organizations/{world.big}/members?page_size=100")
    seen: list[str] = []
    pages = 0
    while True:
        b.wait_css("table.members tbody tr[data-user]")
        seen += [str(r.get_attribute("data-user")) for r in b.find_all("table.members tbody tr[data-user]")]
        pages += 1
        if pages == 1:
            b.shot("members")
        following = b.find_all("nav.paging a[rel=next]")
        if not following:
            break
        following[0].click()
    assert pages == 3
    assert sorted(seen) == sorted(user for user, _ in world.emu.state.members_of(world.big))


def test_operator_changes_a_role_and_removes_a_member(world: World) -> None:
    b = world.browser
    sign_in_operator(world)
    members = world.emu.state.members_of(world.big)
    promoted, removed = members[1][0], members[2][0]
    assert role_in_emulator(world, world.big, promoted) == "org:member"
    b.open(f"/console/organizations/{world.big}/members?q={promoted}")
    row = b.wait_css(row_of(world, promoted))
    b.driver.execute_script("window.sameDocument = true")
    row.find_element("css selector", "select[name=role] option[value='org:admin']").click()
    row.find_element("css selector", "button[value=role]").click()
    assert wait_confirmed(world, f"{row_of(world, promoted)} td.progress") == "confirmed"
    assert b.driver.execute_script("return window.sameDocument === true"), "the page was reloaded"
    assert role_in_emulator(world, world.big, promoted) == "org:admin"
    b.open(f"/console/organizations/{world.big}/members?q={promoted}")
    assert "Admin" in b.wait_css(f"{row_of(world, promoted)} td.role").text

    b.open(f"/console/organizations/{world.big}/members?q={removed}")
    b.wait_css(row_of(world, removed)).find_element("css selector", "button.danger").click()
    b.accept_confirm()
    assert wait_confirmed(world, f"{row_of(world, removed)} td.progress") == "confirmed"
    assert role_in_emulator(world, world.big, removed) is None
    b.open(f"/console/organizations/{world.big}/members?q={removed}")
    b.wait_css("table.members")
    assert not b.find_all(row_of(world, removed))


def test_operator_invites_three_people_and_revokes_one(world: World) -> None:
    b = world.browser
    sign_in_operator(world)
    emails = [f"new.person.{n}@invited.example.com" for n in range(3)]
    b.open(f"/console/organizations/{world.small}/invitations")
    b.wait_css("form.invite textarea[name=emails]").send_keys(", ".join(emails))
    b.find("form.invite select[name=role] option[value='org:member']").click()
    b.find("form.invite button[type=submit]").click()
    assert wait_confirmed(world, "#invite-progress") == "confirmed"

    def pending_in_emulator() -> dict[str, str]:
        return {email: ident for ident, email in world.emu.state.pending_invitations_of(world.small)}

    assert set(emails) <= set(pending_in_emulator())
    b.open(f"/console/organizations/{world.small}/invitations")
    b.wait_for(
        "the three invitations listed",
        lambda: True if all(e in b.find("table.invitations").text for e in emails) else None,
    )
    b.shot("invitations")

    revoked = pending_in_emulator()[emails[1]]
    row = b.wait_css(f"tr[data-invitation='{revoked}']")
    row.find_element("css selector", "button.danger").click()
    b.accept_confirm()
    assert wait_confirmed(world, f"tr[data-invitation='{revoked}']") == "confirmed"
    assert set(pending_in_emulator()) >= {emails[0], emails[2]}
    assert emails[1] not in pending_in_emulator()
    b.open(f"/console/organizations/{world.small}/invitations")
    b.wait_css("table.invitations")
    assert not b.find_all(f"tr[data-invitation='{revoked}']")


def test_demoting_the_last_admin_is_refused_with_the_reason_on_the_page(world: World) -> None:
    b = world.browser
    sign_in_operator(world)
    b.open(f"/console/organizations/{world.small}/members")
    row = b.wait_css(row_of(world, world.lone_admin))
    row.find_element("css selector", "select[name=role] option[value='org:member']").click()
    row.find_element("css selector", "button[value=role]").click()
    problem = b.wait_css(f"{row_of(world, world.lone_admin)} td.progress [role=alert]")
    assert "would have no admin" in problem.text
    assert "Give another member an admin role first" in problem.text
    b.shot("last-admin")
    assert role_in_emulator(world, world.small, world.lone_admin) == "org:admin"


def test_a_dead_event_is_replayed_from_the_health_page(world: World) -> None:
    """An ``organization.updated`` that died (say, the database was down for every attempt)."""
    b = world.browser
    sign_in_operator(world)
    now = int(time.time() * 1000)
    body = webhook_body(
        "organization.updated",
        organization_data(
            world.small,
            name="Small Team (renamed)",
            slug="small-team",
            created_by=world.lone_admin,
            created_at=now - 60_000,
            updated_at=now,
            members_count=2,
            max_allowed_memberships=0,
        ),
        now,
        instance_id=world.emu.config.instance_id,
    )
    with session_scope(world.factory) as session:
        stored = store_delivery(session, svix_id="msg_2deadbrowsertest", body=body, received_at=now)
        row = session.get(InboxEvent, stored.inbox_id)
        assert row is not None
        row.status = InboxStatus.DEAD
        row.attempts = 8
        row.last_error = "OperationalError: the database was unreachable"
    b.open("/console/health")
    dead = b.wait_css(f"tr[data-event='{stored.inbox_id}']")
    b.shot("health")
    dead.find_element("css selector", "button[type=submit]").click()

    def renamed() -> bool | None:
        with session_scope(world.factory) as session:
            org = session.get(Organization, world.small)
            return True if org is not None and org.name == "Small Team (renamed)" else None

    world.stack.wait_for("the replayed event to be applied", renamed, MIRROR_BOUND_S)
    b.open("/console/health")
    b.wait_css("table.dead")
    assert not b.find_all(f"tr[data-event='{stored.inbox_id}']")


def test_every_form_refuses_a_missing_or_wrong_csrf_token(world: World) -> None:
    b = world.browser
    sign_in_operator(world)
    b.open(f"/console/organizations/{world.small}/members")
    actions = {str(f.get_attribute("action")).removeprefix(b.base) for f in b.find_all("form[method=post]")}
    b.open(f"/console/organizations/{world.small}/invitations")
    actions |= {str(f.get_attribute("action")).removeprefix(b.base) for f in b.find_all("form[method=post]")}
    b.open("/console/health")
    actions |= {str(f.get_attribute("action")).removeprefix(b.base) for f in b.find_all("form[method=post]")}
    assert {"/console/logout", "/console/reconcile"} <= actions
    assert any(a.endswith("/role") for a in actions) and any(a.endswith("/remove") for a in actions)
    assert any(a.endswith("/invitations") for a in actions) and any(a.endswith("/revoke") for a in actions)
    # Replay buttons show only beside dead events; the check comes before the event is looked up.
    actions.add("/console/health/events/1/replay")
    before = world.emu.state.members_of(world.small)
    fields = {"role": "org:admin", "emails": "x@forged.example.com", "organization": world.small}
    for action in sorted(actions):
        missing, _ = b.post(action, fields)
        wrong, _ = b.post(action, {**fields, "csrf_token": "a-token-of-another-session"})
        assert (missing, wrong) == (400, 403), action
    # The sign-in form too: a login without the token planted by the console's own page.
    b.driver.delete_all_cookies()
    b.open("/console/login")
    assert b.post("/console/login", {"token": ADMIN_TOKEN})[0] == 400
    assert b.post("/console/login", {"token": ADMIN_TOKEN, "csrf_token": "wrong"})[0] == 403
    assert world.emu.state.members_of(world.small) == before


def test_a_member_without_the_manage_permission_sees_no_managing_action(world: World) -> None:
    b = world.browser
    sign_in_member(world, world.basic)
    b.open(f"/console/organizations/{world.small}/members")
    b.wait_css(row_of(world, world.lone_admin))
    assert not b.find_all("table.members select, table.members button, form.invite")
    assert "does not grant org:sys_memberships:manage" in b.text()
    b.shot("member-view")
    b.open(f"/console/organizations/{world.small}/invitations")
    b.wait_css("table.invitations")
    assert not b.find_all("form.invite, table.invitations button")
    # A forged form, with this member's own valid CSRF token: the server checks again.
    token = csrf(world)
    for path, fields in (
        (f"/console/organizations/{world.small}/members/{world.basic}/role", {"role": "org:admin"}),
        (f"/console/organizations/{world.small}/members/{world.lone_admin}/remove", {}),
        (f"/console/organizations/{world.small}/invitations", {"emails": "me@evil.example.com"}),
    ):
        status, _ = b.post(path, {**fields, "csrf_token": token})
        assert status == 403, path
    assert role_in_emulator(world, world.small, world.basic) == "org:member"
    assert role_in_emulator(world, world.small, world.lone_admin) == "org:admin"


def test_an_admin_member_manages_only_their_own_organizations(world: World) -> None:
    """Signed in the way the README shows: a token from ``orgsync session-token``, pasted in."""
    b = world.browser
    b.driver.delete_all_cookies()
    b.open("/console/login")
    stranger = SessionIssuer.generate().mint(world.lone_admin)
    b.find("input[name=session_token]").send_keys(stranger)
    b.find("input[name=session_token]").submit()
    assert "does not verify" in b.wait_css("[role=alert]").text
    made = world.stack.orgsync("session-token", world.lone_admin, "--org", world.small)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    world.tokens.append(token)
    b.find("input[name=session_token]").send_keys(token)
    b.find("input[name=session_token]").submit()
    b.wait_css("form.signout", "the signed-in header")
    assert f"Signed in as {world.lone_admin}" in b.text()
    b.open("/console/organizations")
    listed = b.wait_css("table.orgs").text
    assert "Small Team" in listed and f"{MEMBERS:,}" not in listed
    b.open(f"/console/users/{world.lone_admin}")
    b.wait_css("table.user-orgs")
    b.shot("my-organizations")
    b.open(f"/console/organizations/{world.small}/members")
    row = b.wait_css(row_of(world, world.basic))
    assert row.find_elements("css selector", "select[name=role]")
    token = csrf(world)
    big_member = world.emu.state.members_of(world.big)[3][0]
    b.open(f"/console/organizations/{world.big}/members")
    assert "not a member of this organization" in b.wait_css("main").text
    status, _ = b.post(
        f"/console/organizations/{world.big}/members/{big_member}/remove", {"csrf_token": token}
    )
    assert status == 403
    assert role_in_emulator(world, world.big, big_member) == "org:member"
    # In their own organization the same action goes through, recorded as theirs.
    b.open(f"/console/organizations/{world.small}/members")
    row = b.wait_css(row_of(world, world.basic))
    row.find_element("css selector", "select[name=role] option[value='org:admin']").click()
    row.find_element("css selector", "button[value=role]").click()
    assert wait_confirmed(world, f"{row_of(world, world.basic)} td.progress") == "confirmed"
    assert role_in_emulator(world, world.small, world.basic) == "org:admin"
    with session_scope(world.factory) as session:
        requesters = set(session.scalars(select(Command.requested_by).where(Command.user_id == world.basic)))
    assert requesters == {f"console:{world.lone_admin}"}


def test_no_page_shows_a_secret_or_a_token(world: World) -> None:
    b = world.browser
    sources = []
    for path in (f"/console/organizations/{world.small}/members", f"/console/users/{world.lone_admin}"):
        b.open(path)
        b.wait_css("main")
        sources.append(b.source())
    sign_in_operator(world)
    for path in (
        "/console/organizations",
        f"/console/organizations/{world.big}/members",
        f"/console/organizations/{world.small}/invitations",
        "/console/health",
    ):
        b.open(path)
        b.wait_css("main")
        sources.append(b.source())
    pages = "\n".join(sources)
    assert_no_secrets(pages, SECRET_KEY, TEST_SIGNING_SECRET, ADMIN_TOKEN, COOKIE_KEY, *world.tokens)
    assert not re.search(r"eyJ[\w-]{10,}\.eyJ", pages), "a JWT on a page"
