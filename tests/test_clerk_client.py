"""``worker.clerk.ClerkClient`` against the emulator over real HTTP: records, errors, 429s, timeouts."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from clerk_backend_api import Clerk
from conftest import free_port
from helpers import wait_until

from emulator import Emulator, EmulatorConfig
from worker.clerk import CallRecord, ClerkApiError, ClerkClient, ClerkRefusalError, ClerkTransientError
from worker.ratelimit import RateLimiter

SECRET_KEY = "sk_test_clerk_client"


def start(**overrides: Any) -> Emulator:
    options: dict[str, Any] = {
        "port": 0,
        "secret_key": SECRET_KEY,
        "rate_limit": 0,
        "membership_rate_limit": 0,
    }
    options.update(overrides)
    return Emulator(EmulatorConfig(**options)).start()


def make_client(
    api_url: str, records: list[CallRecord], *, timeout: float = 5.0, **options: Any
) -> ClerkClient:
    limiter = RateLimiter("memory://", 1000, 100, namespace=f"t{uuid.uuid4().hex[:8]}")
    return ClerkClient(
        secret_key=SECRET_KEY,
        api_url=api_url,
        timeout=timeout,
        limiter=limiter,
        recorder=records.append,
        **options,
    )


def post(emu: Emulator, path: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{emu.url}{path}", data=json.dumps(body).encode(), method="POST" if body is not None else "DELETE"
    )
    request.add_header("Authorization", f"Bearer {SECRET_KEY}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def org_with_admin(emu: Emulator) -> tuple[str, str, str]:
    admin = emu.state.create_user(email_address=f"admin-{uuid.uuid4().hex[:6]}@example.com")["id"]
    other = emu.state.create_user(email_address=f"member-{uuid.uuid4().hex[:6]}@example.com")["id"]
    org = emu.state.create_organization(name="Acme", created_by=admin)["id"]
    return org, admin, other


@pytest.fixture
def emu() -> Iterator[Emulator]:
    emulator = start()
    yield emulator
    emulator.stop()


@pytest.fixture
def records() -> list[CallRecord]:
    return []


@pytest.fixture
def client(emu: Emulator, records: list[CallRecord]) -> Iterator[ClerkClient]:
    clerk = make_client(emu.api_url, records)
    yield clerk
    clerk.close()


def test_every_call_is_recorded_with_its_outcome(
    emu: Emulator, client: ClerkClient, records: list[CallRecord]
) -> None:
    org, admin, other = org_with_admin(emu)
    member = client.add_member(org, other, "org:member")
    assert member["public_user_data"]["user_id"] == other and member["role"] == "org:member"
    assert client.set_role(org, other, "org:admin")["role"] == "org:admin"
    found = client.get_membership(org, other)
    assert found is not None and found["role"] == "org:admin"
    assert client.get_membership(org, "user_nobody") is None
    with pytest.raises(ClerkRefusalError) as refused:
        client.add_member(org, admin, "org:member")
    error = refused.value
    assert (error.status, error.code, error.retryable, error.ambiguous) == (
        400,
        "already_a_member_in_organization",
        False,
        False,
    )
    assert error.trace_id

    assert [(r.purpose, r.method, r.status_code) for r in records] == [
        ("send", "POST", 200),
        ("send", "PATCH", 200),
        ("check", "GET", 200),
        ("check", "GET", 200),
        ("send", "POST", 400),
    ]
    assert records[1].path == f"/organizations/{org}/memberships/{other}"
    last = records[-1]
    assert last.error_code == "already_a_member_in_organization" and last.clerk_trace_id == error.trace_id
    assert all(r.duration_ms >= 0 and r.started_at > 0 for r in records)


def test_invitations_and_reads(emu: Emulator, client: ClerkClient) -> None:
    org, _, _ = org_with_admin(emu)
    single = client.invite(org, "one@example.com", "org:member")
    bulk = client.bulk_invite(
        org,
        [
            {"email_address": "two@example.com", "role": "org:member"},
            {"email_address": "three@example.com", "role": "org:admin"},
        ],
    )
    assert [i["email_address"] for i in bulk] == ["two@example.com", "three@example.com"]
    found = client.find_invitations(org, ["ONE@example.com", "three@example.com"])
    assert sorted(i["id"] for i in found) == sorted([single["id"], bulk[1]["id"]])
    assert client.revoke_invitation(org, single["id"])["status"] == "revoked"
    assert client.get_invitation(org, single["id"])["status"] == "revoked"
    assert client.find_invitations(org, ["one@example.com"]) == []
    with pytest.raises(ClerkRefusalError) as refused:
        client.revoke_invitation(org, single["id"])
    assert refused.value.code == "organization_invitation_not_pending"
    assert client.list_invitations(org, status="pending").total_count == 2
    assert client.get_organization(org)["id"] == org
    assert client.list_organizations().total_count == 1
    assert client.list_memberships(org).total_count == 1
    assert {r["key"] for r in client.list_roles().data} >= {"org:admin", "org:member"}


def test_clerks_last_admin_refusal_is_a_permanent_error(emu: Emulator, client: ClerkClient) -> None:
    org, admin, _ = org_with_admin(emu)
    with pytest.raises(ClerkRefusalError) as refused:
        client.set_role(org, admin, "org:member")
    assert refused.value.code == "organization_minimum_permissions_needed"
    with pytest.raises(ClerkRefusalError):
        client.remove_member(org, admin)


def test_429_waits_for_retry_after_then_succeeds(records: list[CallRecord]) -> None:
    emulator = start(rate_limit=2, rate_window=1.0)
    try:
        org, _, _ = org_with_admin(emulator)
        client = make_client(emulator.api_url, records)
        for _ in range(3):
            assert client.get_organization(org)["id"] == org
        assert client.limiter.paused_until() > 0
    finally:
        emulator.stop()
    statuses = [r.status_code for r in records]
    assert statuses.count(200) == 3 and 429 in statuses
    refused = next(r for r in records if r.status_code == 429)
    assert (
        refused.error_code == "too_many_requests"
        and refused.retry_after is not None
        and refused.retry_after >= 1
    )


def test_429_gives_up_after_the_configured_retries(records: list[CallRecord]) -> None:
    emulator = start(rate_limit=1, rate_window=30.0)
    try:
        client = make_client(emulator.api_url, records, max_429_retries=0)
        client.list_roles()
        with pytest.raises(ClerkTransientError) as limited:
            client.list_roles()
    finally:
        emulator.stop()
    assert limited.value.status == 429 and limited.value.retryable and not limited.value.ambiguous


def test_timeout_after_commit_is_ambiguous_and_the_change_happened(
    emu: Emulator, records: list[CallRecord]
) -> None:
    org, _, other = org_with_admin(emu)
    status, fault = post(
        emu,
        "/_emulator/faults",
        {"method": "POST", "path_regex": r"/memberships$", "mode": "timeout_after_commit", "delay": 1.5},
    )
    assert status == 200 and fault["count"] == 1
    client = make_client(emu.api_url, records, timeout=0.3)
    with pytest.raises(ClerkTransientError) as timed_out:
        client.add_member(org, other, "org:member")
    assert (timed_out.value.code, timed_out.value.ambiguous, timed_out.value.status) == (
        "timeout",
        True,
        None,
    )
    assert records[-1].error_code == "timeout" and records[-1].status_code is None

    def armed_faults() -> int:
        request = urllib.request.Request(f"{emu.url}/_emulator/faults")
        request.add_header("Authorization", f"Bearer {SECRET_KEY}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(json.loads(response.read())["total_count"])

    # The client may give up before a loaded server got that far: the fault is taken after the commit,
    # so once it is used up (by the one request the SDK made, its own retries off) the change is in.
    wait_until("the timed-out request to reach its fault", lambda: True if armed_faults() == 0 else None)
    assert other in {user for user, _ in emu.state.members_of(org)}
    assert len(records) == 1


def test_500_before_and_after_commit(emu: Emulator, client: ClerkClient, records: list[CallRecord]) -> None:
    org, _, other = org_with_admin(emu)
    post(emu, "/_emulator/faults", {"method": "POST", "path_regex": "/invitations$", "mode": "error_500"})
    with pytest.raises(ClerkTransientError) as failed:
        client.invite(org, "x@example.com", "org:member")
    assert failed.value.status == 500 and failed.value.ambiguous
    assert client.find_invitations(org, ["x@example.com"]) == []

    post(
        emu,
        "/_emulator/faults",
        {"method": "PATCH", "path_regex": "/memberships/", "mode": "error_500_after_commit"},
    )
    client.add_member(org, other, "org:member")
    with pytest.raises(ClerkTransientError):
        client.set_role(org, other, "org:admin")
    member = client.get_membership(org, other)
    assert member is not None and member["role"] == "org:admin"
    assert [r.status_code for r in records].count(500) == 2


def test_connection_refused_is_transient_and_not_ambiguous(records: list[CallRecord]) -> None:
    client = make_client(f"http://127.0.0.1:{free_port()}/v1", records, timeout=2.0)
    with pytest.raises(ClerkApiError) as failed:
        client.list_roles()
    assert isinstance(failed.value, ClerkTransientError)
    assert failed.value.code == "connection_error" and not failed.value.ambiguous
    assert records[-1].error_code == "connection_error"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"path_regex": "x", "mode": "nope"}, "mode"),
        ({"mode": "error_500"}, "path_regex"),
        ({"path_regex": "(", "mode": "error_500"}, "path_regex"),
        ({"path_regex": "x", "mode": "error_500", "count": 0}, "count"),
        ({"path_regex": "x", "mode": "timeout_after_commit", "delay": 100}, "delay"),
    ],
)
def test_fault_requests_are_validated(emu: Emulator, body: dict[str, Any], field: str) -> None:
    status, answer = post(emu, "/_emulator/faults", body)
    assert status == 422 and answer["errors"][0]["meta"]["param_name"] == field


# ------------------------------------------------------------- reads as plain JSON


def arm(emu: Emulator, method: str, path_regex: str, mode: str, **extra: Any) -> None:
    status, _ = post(
        emu, "/_emulator/faults", {"method": method, "path_regex": path_regex, "mode": mode, **extra}
    )
    assert status == 200


class Recording(BaseHTTPRequestHandler):
    """Answers every GET with the server's ``answer`` and keeps what was asked."""

    def do_GET(self) -> None:
        server: Any = self.server
        server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        status, body = server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def recording() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    server.seen, server.answer = [], (200, b'{"data": [], "total_count": 0}')
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_reads_send_the_url_and_headers_the_sdk_sends(recording: Any, records: list[CallRecord]) -> None:
    api_url = f"http://127.0.0.1:{recording.server_address[1]}/v1/"
    with httpx.Client() as http:
        sdk = Clerk(bearer_auth=SECRET_KEY, server_url=api_url, client=http)
        sdk.organization_memberships.list(
            organization_id="org_1", user_id=["user_a", "user_b"], limit=500, offset=5, order_by="+created_at"
        )
        sdk.organizations.list(limit=500, offset=0, order_by="+created_at", include_members_count=True)
    client = make_client(api_url, records)
    try:
        client.list_memberships("org_1", user_ids=["user_a", "user_b"], limit=500, offset=5)
        client.list_organizations(limit=500)
    finally:
        client.close()
    (sdk_members, sdk_headers), (sdk_orgs, _) = recording.seen[:2]
    (raw_members, raw_headers), (raw_orgs, _) = recording.seen[2:]
    assert (raw_members, raw_orgs) == (sdk_members, sdk_orgs)
    assert raw_members.startswith("/v1/organizations/org_1/memberships?")
    for name in ("authorization", "accept", "user-agent", "clerk-api-version", "x-clerk-sdk"):
        assert raw_headers.get(name) == sdk_headers.get(name) is not None, name
    assert [(r.method, r.path, r.status_code) for r in records] == [
        ("GET", "/organizations/org_1/memberships", 200),
        ("GET", "/organizations", 200),
    ]


@pytest.mark.parametrize(
    "answer", [b"<html>maintenance</html>", b"[]", b'{"data": [], "total_count": "many"}']
)
def test_a_read_answer_of_the_wrong_shape_is_transient(
    recording: Any, records: list[CallRecord], answer: bytes
) -> None:
    recording.answer = (200, answer)
    client = make_client(f"http://127.0.0.1:{recording.server_address[1]}/v1", records)
    try:
        with pytest.raises(ClerkTransientError) as invalid:
            client.list_roles()
    finally:
        client.close()
    assert (invalid.value.status, invalid.value.code) == (200, "response_invalid")
    assert (records[-1].status_code, records[-1].error_code) == (200, "response_invalid")


def test_a_read_of_something_missing_is_a_404_refusal(
    emu: Emulator, client: ClerkClient, records: list[CallRecord]
) -> None:
    org, _, _ = org_with_admin(emu)
    with pytest.raises(ClerkRefusalError) as missing:
        client.get_organization("org_missing")
    error = missing.value
    assert (error.status, error.code, error.retryable, error.ambiguous) == (
        404,
        "resource_not_found",
        False,
        False,
    )
    assert error.trace_id and "org_missing" in error.message
    with pytest.raises(ClerkRefusalError) as no_invitation:
        client.get_invitation(org, "orginv_missing")
    with pytest.raises(ClerkRefusalError) as no_org:
        client.list_memberships("org_missing")
    assert no_invitation.value.status == no_org.value.status == 404
    assert [(r.purpose, r.path, r.status_code, r.error_code) for r in records] == [
        ("read", "/organizations/org_missing", 404, "resource_not_found"),
        ("check", f"/organizations/{org}/invitations/orginv_missing", 404, "resource_not_found"),
        ("read", "/organizations/org_missing/memberships", 404, "resource_not_found"),
    ]
    assert records[0].clerk_trace_id == error.trace_id


def test_a_refused_read_carries_retry_after_and_pauses_every_caller(records: list[CallRecord]) -> None:
    emulator = start(rate_limit=1, rate_window=30.0)
    try:
        org, _, _ = org_with_admin(emulator)
        client = make_client(emulator.api_url, records, max_429_retries=0)
        client.list_memberships(org)
        with pytest.raises(ClerkTransientError) as limited:
            client.list_invitations(org, status="pending")
    finally:
        emulator.stop()
    error = limited.value
    assert (error.status, error.code, error.retryable, error.ambiguous) == (
        429,
        "too_many_requests",
        True,
        False,
    )
    assert error.retry_after is not None and error.retry_after >= 1 and error.trace_id
    assert client.limiter.paused_until() > 0
    refused = records[-1]
    assert (refused.status_code, refused.error_code, refused.retry_after) == (
        429,
        "too_many_requests",
        error.retry_after,
    )


def test_a_read_answered_500_is_transient(
    emu: Emulator, client: ClerkClient, records: list[CallRecord]
) -> None:
    org, _, _ = org_with_admin(emu)
    arm(emu, "GET", "/invitations$", "error_500")
    with pytest.raises(ClerkTransientError) as failed:
        client.list_invitations(org)
    assert (failed.value.status, failed.value.code) == (500, "internal_clerk_error")
    assert failed.value.trace_id
    # The fault is used up: the same read now succeeds.
    assert client.list_invitations(org).total_count == 0
    assert [(r.status_code, r.error_code) for r in records] == [(500, "internal_clerk_error"), (200, None)]


def test_a_read_that_times_out_is_transient(emu: Emulator, records: list[CallRecord]) -> None:
    org, _, _ = org_with_admin(emu)
    arm(emu, "GET", "/memberships$", "timeout_after_commit", delay=1.5)
    client = make_client(emu.api_url, records, timeout=0.3)
    try:
        with pytest.raises(ClerkTransientError) as timed_out:
            client.list_memberships(org)
    finally:
        client.close()
    assert (timed_out.value.status, timed_out.value.code) == (None, "timeout")
    assert (records[-1].status_code, records[-1].error_code) == (None, "timeout")
    assert len(records) == 1
