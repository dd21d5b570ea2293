"""The official Python SDK reads the same from orgsync as from the emulator holding the same state.

The emulator serves the world over HTTP; ``orgsync serve`` (a real granian server) serves
the mirror filled from the world's events. Every read endpoint is called through
``clerk_backend_api.Clerk`` on both, with paging and filters, and the parsed responses must
be equal, except for the fields listed in ``NOT_MIRRORED`` (each with the reason). The
common calls are made through Clerk's JavaScript SDK too (tests/js), when node is present.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clerk_backend_api import Clerk, models
from conftest import unavailable
from read_world import TOKEN, World, build_world, mirror
from stack import hermetic_env, running_stack
from werkzeug.serving import BaseWSGIServer, make_server

from emulator.api import RateLimits, create_app
from models.db import create_db_engine
from models.migrate import upgrade
from worker.clerk import NO_RETRIES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EMULATOR_KEY = "sk_test_read_api_parity"
SIGNING_SECRET = "whsec_" + base64.b64encode(b"read-api-parity-signing-key-32b!").decode()

# Fields the mirror does not hold, by object: what orgsync leaves out and why.
NOT_MIRRORED: dict[str, tuple[str, ...]] = {
    # The emulator gives organizations no role set (null): not compared until it does.
    "organization": ("role_set_key",),
    # A user is compared on the fields the mirror keeps; see USER_FIELDS.
    "user": (),
}
# Of a domain's verification the mirror keeps the status only: the attempts made are not
# in it (the strategy is given as the emulator's, Clerk's email code).
VERIFICATION_NOT_MIRRORED = ("attempts",)
# The mirror keeps a user's public data, external id, email addresses (not their ids or
# verification), ban and lock state and last activity; no phones or sign-in state.
USER_FIELDS = (
    "object",
    "id",
    "external_id",
    "banned",
    "locked",
    "last_active_at",
    "username",
    "first_name",
    "last_name",
    "image_url",
    "has_image",
    "public_metadata",
    "created_at",
    "updated_at",
)


class Servers:
    """Both servers by base URL (without ``/v1``), and an SDK client for each."""

    def __init__(self, world: World, emulator_base: str, orgsync_base: str) -> None:
        self.world = world
        self.emulator_base = emulator_base
        self.orgsync_base = orgsync_base
        self.emulator = Clerk(
            bearer_auth=EMULATOR_KEY, server_url=f"{emulator_base}/v1", retry_config=NO_RETRIES
        )
        self.orgsync = Clerk(bearer_auth=TOKEN, server_url=f"{orgsync_base}/v1", retry_config=NO_RETRIES)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    world = build_world()
    directory = tmp_path_factory.mktemp("parity")
    url = f"sqlite:///{directory / 'orgsync.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    mirror(world, engine)
    engine.dispose()

    app = create_app(world.state, secret_key=EMULATOR_KEY, limits=RateLimits(0, 0))
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    env = hermetic_env(
        database_url=url,
        broker_url=f"sqla+sqlite:///{directory / 'broker.db'}",
        data_dir=directory / "data",
        signing_secret=SIGNING_SECRET,
        ORGSYNC_API_TOKENS=TOKEN,
    )
    try:
        with running_stack(env, directory / "logs") as stack:
            stack.start_web(threads=4)
            yield Servers(
                world,
                f"http://127.0.0.1:{server.server_port}",
                f"http://127.0.0.1:{stack.port}",
            )
            stack.check_alive()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _strip(value: Any) -> Any:
    """A parsed response as plain data, without the fields the mirror does not hold."""
    if isinstance(value, list):
        return [_strip(item) for item in value]
    if not isinstance(value, dict):
        return value
    kind = value.get("object")
    if kind == "user":
        kept = {key: _strip(value.get(key)) for key in USER_FIELDS}
        kept["email_addresses"] = [item.get("email_address") for item in value.get("email_addresses") or []]
        return kept
    ignored = NOT_MIRRORED.get(kind, ()) if isinstance(kind, str) else ()
    stripped = {key: _strip(item) for key, item in value.items() if key not in ignored}
    if kind == "organization_domain":
        for key in ("affiliation_verification", "verification"):
            if isinstance(stripped.get(key), dict):
                stripped[key] = {k: v for k, v in stripped[key].items() if k not in VERIFICATION_NOT_MIRRORED}
    return stripped


def dump(result: Any) -> Any:
    if isinstance(result, list):
        return [dump(item) for item in result]
    return _strip(result.model_dump(mode="json", by_alias=True, exclude_none=True))


def differences(actual: Any, expected: Any, path: str = "") -> list[str]:
    """Where two parsed responses differ, as ``path: orgsync != emulator`` lines."""
    if isinstance(actual, dict) and isinstance(expected, dict):
        return [
            line
            for key in sorted(set(actual) | set(expected))
            for line in differences(
                actual.get(key, "<absent>"), expected.get(key, "<absent>"), f"{path}.{key}"
            )
        ]
    if isinstance(actual, list) and isinstance(expected, list) and len(actual) == len(expected):
        return [
            line
            for i, pair in enumerate(zip(actual, expected, strict=True))
            for line in differences(*pair, f"{path}[{i}]")
        ]
    return [] if actual == expected else [f"{path}: {actual!r} != {expected!r}"]


def quiet(call: Callable[[], Any]) -> Any:
    # The SDK warns on every call of a method it deprecates (list_pending) or whose request
    # or response model has deprecated fields (the user list, a domain's ``verification``).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return call()


Call = Callable[[Clerk, World], Any]


def cases() -> dict[str, Call]:
    def org(name: str) -> Callable[[World], str]:
        return lambda w: w.orgs[name]

    acme = org("acme")
    return {
        # organizations
        "organizations": lambda c, w: c.organizations.list(),
        "organizations paged": lambda c, w: c.organizations.list(limit=2, offset=1, order_by="+created_at"),
        "organizations past the end": lambda c, w: c.organizations.list(limit=5, offset=10),
        "organizations by query": lambda c, w: c.organizations.list(query="a", order_by="name"),
        "organizations by user": lambda c, w: c.organizations.list(
            user_id=[w.users["dan"], w.users["alice"]], order_by="-name"
        ),
        "organizations without a user": lambda c, w: c.organizations.list(user_id=[f"-{w.users['alice']}"]),
        "organizations by id": lambda c, w: c.organizations.list(
            organization_id=[w.orgs["beta"], w.orgs["delta"]]
        ),
        "organizations by size with counts": lambda c, w: c.organizations.list(
            order_by="-members_count", include_members_count=True
        ),
        "organization by id": lambda c, w: c.organizations.get(organization_id=acme(w)),
        "organization by slug with counts": lambda c, w: c.organizations.get(
            organization_id="gamma", include_members_count=True
        ),
        # memberships
        "memberships": lambda c, w: c.organization_memberships.list(organization_id=acme(w)),
        "memberships all": lambda c, w: c.organization_memberships.list(organization_id=acme(w), limit=500),
        "memberships paged by email": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), limit=3, offset=3, order_by="email_address"
        ),
        "memberships by first name": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), order_by="-first_name", limit=20
        ),
        "memberships by last name": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), order_by="last_name", limit=20
        ),
        "memberships by username": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), order_by="+username", limit=20
        ),
        "memberships by role": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), role=["org:billing", "org:admin"]
        ),
        "memberships by user": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), user_id=[w.users["bob"], w.users["grace"], "user_unknown"]
        ),
        "memberships without a user": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), user_id=[f"-{w.users['bob']}"], limit=20
        ),
        "memberships by email": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), email_address=["carol@acme.test", "ERIN@acme.test"]
        ),
        "memberships by query": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), query="ar"
        ),
        "memberships by name query": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), name_query="GR"
        ),
        "memberships by email query": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), email_address_query="an"
        ),
        "memberships by username query": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), username_query="c"
        ),
        "memberships created before": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), created_at_before=w.created_at["erin"]
        ),
        "memberships created after": lambda c, w: c.organization_memberships.list(
            organization_id=acme(w), created_at_after=w.created_at["dan"]
        ),
        "memberships by slug": lambda c, w: c.organization_memberships.list(organization_id="beta"),
        "memberships of the instance": lambda c, w: c.users.get_instance_organization_memberships(limit=500),
        "memberships of the instance paged": lambda c, w: c.users.get_instance_organization_memberships(
            limit=4, offset=8, order_by="email_address"
        ),
        "memberships of a user": lambda c, w: c.users.get_organization_memberships(user_id=w.users["dan"]),
        "memberships of a user paged": lambda c, w: c.users.get_organization_memberships(
            user_id=w.users["alice"], limit=1, offset=1
        ),
        # invitations
        "invitations": lambda c, w: c.organization_invitations.list(organization_id=acme(w)),
        "invitations paged by email": lambda c, w: c.organization_invitations.list(
            organization_id=acme(w), order_by="email_address", limit=2, offset=1
        ),
        "invitations pending": lambda c, w: c.organization_invitations.list(
            organization_id=acme(w), status="pending"
        ),
        "invitations expired": lambda c, w: c.organization_invitations.list(
            organization_id=acme(w), status="expired"
        ),
        "invitations revoked": lambda c, w: c.organization_invitations.list(
            organization_id=acme(w), status="revoked"
        ),
        "invitations accepted": lambda c, w: c.organization_invitations.list(
            organization_id=acme(w), status="accepted"
        ),
        "invitations by email": lambda c, w: c.organization_invitations.list(
            organization_id=acme(w), email_address="ken@ext.test"
        ),
        "invitations pending endpoint": lambda c, w: quiet(
            lambda: c.organization_invitations.list_pending(organization_id=acme(w))
        ),
        "invitation": lambda c, w: c.organization_invitations.get(
            organization_id=acme(w), invitation_id=w.invitations["judy"]
        ),
        "invitation by slug": lambda c, w: c.organization_invitations.get(
            organization_id="acme", invitation_id=w.invitations["liam"]
        ),
        "invitations of the instance": lambda c, w: c.organization_invitations.get_all(limit=50),
        "invitations of the instance filtered": lambda c, w: c.organization_invitations.get_all(
            status="pending", query="acme", order_by="+email_address"
        ),
        "invitations of a user": lambda c, w: c.users.get_organization_invitations(user_id=w.users["dan"]),
        "invitations of an invitee": lambda c, w: c.users.get_organization_invitations(
            user_id=w.users["mia"], status="accepted"
        ),
        # roles and permissions
        "roles": lambda c, w: c.organization_roles.list(),
        "roles by key": lambda c, w: c.organization_roles.list(order_by="key", limit=2, offset=1),
        "roles by query": lambda c, w: c.organization_roles.list(query="mem"),
        "role": lambda c, w: c.organization_roles.get(organization_role_id=w.roles["org:billing"]),
        "permission": lambda c, w: c.organization_permissions.get(
            permission_id=w.permissions["org:sys_profile:manage"]
        ),
        "permissions": lambda c, w: c.organization_permissions.list(limit=20),
        "permissions paged by name": lambda c, w: c.organization_permissions.list(
            order_by="-name", limit=4, offset=2
        ),
        "permissions by query": lambda c, w: c.organization_permissions.list(query="billing"),
        # role sets
        "role sets": lambda c, w: c.role_sets.list(),
        "role sets by query": lambda c, w: c.role_sets.list(query="DEF", order_by="name"),
        "role set by key": lambda c, w: c.role_sets.get(role_set_key_or_id="role_set:default"),
        "role set by id": lambda c, w: c.role_sets.get(role_set_key_or_id="rs_default"),
        # organization domains (the SDK warns about a domain's deprecated ``verification``)
        "domains": lambda c, w: quiet(lambda: c.organization_domains.list(organization_id=acme(w))),
        "domains by slug paged": lambda c, w: quiet(
            lambda: c.organization_domains.list(organization_id="acme", limit=1, offset=1)
        ),
        "domains verified": lambda c, w: quiet(
            lambda: c.organization_domains.list(organization_id=acme(w), verified="true")
        ),
        "domains unverified": lambda c, w: quiet(
            lambda: c.organization_domains.list(organization_id=acme(w), verified="false")
        ),
        "domains by enrollment mode": lambda c, w: quiet(
            lambda: c.organization_domains.list(organization_id=acme(w), enrollment_mode="-manual_invitation")
        ),
        "domains of the instance": lambda c, w: quiet(c.organization_domains.list_all),
        "domains of the instance by name": lambda c, w: quiet(
            lambda: c.organization_domains.list_all(order_by="name", limit=2, offset=1)
        ),
        "domains of the instance filtered": lambda c, w: quiet(
            lambda: c.organization_domains.list_all(
                enrollment_mode=[
                    models.QueryParamEnrollmentMode.AUTOMATIC_SUGGESTION,
                    models.QueryParamEnrollmentMode.MINUS_AUTOMATIC_INVITATION,
                ],
                verified=models.Verified.TRUE,
            )
        ),
        "domains of the instance by query": lambda c, w: quiet(
            lambda: c.organization_domains.list_all(query="acme")
        ),
        "domains of the instance by organization": lambda c, w: quiet(
            lambda: c.organization_domains.list_all(query=w.orgs["gamma"])
        ),
        "domains of the instance by organization id": lambda c, w: quiet(
            lambda: c.organization_domains.list_all(organization_id=w.orgs["beta"])
        ),
        "domains of the instance by name list": lambda c, w: quiet(
            lambda: c.organization_domains.list_all(domains=["beta.test", "acme.test", "none.test"])
        ),
        # users' public data
        "user": lambda c, w: c.users.get(user_id=w.users["grace"]),
        "users": lambda c, w: quiet(lambda: c.users.list(request={"limit": 20})),
        "users of an organization": lambda c, w: quiet(
            lambda: c.users.list(
                request={
                    "organization_id": [w.orgs["acme"]],
                    "order_by": "last_name",
                    "limit": 4,
                    "offset": 2,
                }
            )
        ),
        "users by query": lambda c, w: quiet(lambda: c.users.list(request={"query": "an"})),
    }


CASES = cases()


@pytest.mark.parametrize("name", list(CASES))
def test_the_sdk_reads_the_same_from_orgsync_as_from_the_emulator(servers: Servers, name: str) -> None:
    call = CASES[name]
    expected = dump(call(servers.emulator, servers.world))
    actual = dump(call(servers.orgsync, servers.world))
    assert actual == expected, "\n".join(differences(actual, expected)[:20])
    data = expected.get("data", expected) if isinstance(expected, dict) else expected
    assert data or name.endswith("past the end"), "the case reads nothing: it would not show a difference"


def error_code(error: models.ClerkBaseError) -> str:
    code = json.loads(error.body)["errors"][0]["code"]
    assert isinstance(code, str)
    return code


ERROR_CASES: dict[str, Call] = {
    "unknown organization": lambda c, w: c.organizations.get(organization_id="no-such-org"),
    "members of an unknown organization": lambda c, w: c.organization_memberships.list(
        organization_id="no-such-org"
    ),
    "limit too large": lambda c, w: c.organizations.list(limit=501),
    "unknown order": lambda c, w: c.organizations.list(order_by="-color"),
    "unknown user": lambda c, w: c.users.get(user_id="user_nobody"),
    "unknown invitation": lambda c, w: c.organization_invitations.get(
        organization_id="acme", invitation_id="orginv_x"
    ),
    "invitation of another organization": lambda c, w: c.organization_invitations.get(
        organization_id="beta", invitation_id=w.invitations["judy"]
    ),
    "unknown role": lambda c, w: c.organization_roles.get(organization_role_id="role_nobody"),
    "unknown permission": lambda c, w: c.organization_permissions.get(permission_id="perm_nobody"),
    "unknown role set": lambda c, w: c.role_sets.get(role_set_key_or_id="role_set:nobody"),
    "domains of an unknown organization": lambda c, w: quiet(
        lambda: c.organization_domains.list(organization_id="no-such-org")
    ),
    "blank domain query": lambda c, w: quiet(lambda: c.organization_domains.list_all(query=" ")),
    "unknown domain order": lambda c, w: quiet(
        lambda: c.organization_domains.list_all(order_by="-enrollment_mode")
    ),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_errors_have_the_same_status_and_code(servers: Servers, name: str) -> None:
    errors = []
    for client in (servers.emulator, servers.orgsync):
        with pytest.raises(models.ClerkBaseError) as raised:
            ERROR_CASES[name](client, servers.world)
        errors.append((raised.value.status_code, error_code(raised.value)))
    assert errors[0] == errors[1]


def test_a_wrong_key_gets_the_same_401(servers: Servers) -> None:
    answers = []
    for client in (servers.emulator, servers.orgsync):
        url = client.sdk_configuration.get_server_details()[0]
        wrong = Clerk(bearer_auth="sk_test_wrong_key_0000000000", server_url=url, retry_config=NO_RETRIES)
        with pytest.raises(models.ClerkBaseError) as raised:
            wrong.organizations.list()
        answers.append((raised.value.status_code, error_code(raised.value)))
    assert answers == [(401, "authentication_invalid")] * 2


# ---------------------------------------------------------------- JavaScript SDK
JS_DIR = Path(__file__).resolve().parent / "js"
JS_SDK = "@clerk/backend"
NPM_BOUND_S = 300


def js_sdk_ready() -> str:
    """``node``, once the JavaScript SDK is in tests/js (skip, or fail under CI, if it cannot be)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("node and npm are not installed: the JavaScript SDK check needs them")
    wanted = json.loads((JS_DIR / "package.json").read_text())["dependencies"][JS_SDK]
    installed = JS_DIR / "node_modules" / JS_SDK / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != wanted:
        # From the lock file, into tests/js/node_modules, kept for the next run.
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            check=False,
            timeout=NPM_BOUND_S,
        )
        if done.returncode != 0:
            unavailable(f"npm ci could not install {JS_SDK} {wanted}: {done.stderr.strip()[-500:]}")
    return node


def test_the_javascript_sdk_reads_the_same_from_orgsync_as_from_the_emulator(servers: Servers) -> None:
    node = js_sdk_ready()
    world = servers.world
    config = {
        "sides": {
            "emulator": {"apiUrl": servers.emulator_base, "secretKey": EMULATOR_KEY},
            "orgsync": {"apiUrl": servers.orgsync_base, "secretKey": TOKEN},
        },
        "orgId": world.orgs["acme"],
        "orgSlug": "gamma",
        "userId": world.users["dan"],
        "inviteeId": world.users["dan"],
    }
    done = subprocess.run(
        [node, "read_parity.mjs", json.dumps(config)],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == 15
    for name, sides in results.items():
        emulator, orgsync = sides["emulator"], sides["orgsync"]
        assert orgsync == emulator, f"{name}:\n" + "\n".join(differences(orgsync, emulator)[:20])
        if name.startswith("unknown"):
            assert emulator == {"error": 404, "codes": ["resource_not_found"]}
        else:
            assert "ok" in emulator, f"{name}: {emulator}"
            found = emulator["ok"]
            assert found.get("totalCount", 1) > 0 and found.get("data", [found]), f"{name} reads nothing"
