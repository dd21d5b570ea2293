"""The embedded default end to end: ``orgsync run`` on SQLite, signed events over HTTP, the mirror updated."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import TEST_SIGNING_SECRET, free_port
from helpers import new_msg_id, signed_headers
from stack import TEST_BOUND_S, request

from emulator.payloads import (
    BARE_MEMBERSHIP,
    BARE_ORGANIZATION,
    membership_data,
    organization_data,
    webhook_body,
)

ROOT = Path(__file__).resolve().parent.parent
# Bounds on waiting for real processes; a test never asserts how fast anything is.
START_BOUND_S = 90.0
APPLY_BOUND_S = 60.0
STOP_BOUND_S = 60.0
T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TEST_BOUND_S)]


def wait_for(what: str, probe: Callable[[], T | None], bound: float, alive: Callable[[], None]) -> T:
    deadline = time.monotonic() + bound
    while True:
        alive()
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {bound:.0f} s")
        time.sleep(0.25)


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``: every process ``run`` started, at any depth."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "BROKER_", "CLERK_", "ORGSYNC_"))
    }
    env.update(
        {
            "ORGSYNC_DATA_DIR": str(tmp_path / "data"),
            "CLERK_WEBHOOK_SIGNING_SECRET": TEST_SIGNING_SECRET,
            "ORGSYNC_LOG_LEVEL": "INFO",
            "ORGSYNC_TEST_MARKER": uuid.uuid4().hex,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def running(
    embedded_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    out = tmp_path / "run.out"
    err = tmp_path / "run.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "orgsync", "run", "--port", str(port)],
            cwd=ROOT,
            env=embedded_env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield process, port, tmp_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in processes_with(f"ORGSYNC_TEST_MARKER={embedded_env['ORGSYNC_TEST_MARKER']}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def post_event(port: int, event_type: str, data: dict[str, Any], *, msg_id: str | None = None) -> int:
    body = webhook_body(event_type, data, int(time.time() * 1000))
    status, _ = request(
        port,
        "POST",
        "/webhooks/clerk",
        body,
        signed_headers(TEST_SIGNING_SECRET, body, msg_id=msg_id or new_msg_id()),
    )
    return status


def organization(at: int) -> dict[str, Any]:
    return organization_data(
        "org_e2e",
        name="End to End",
        slug="e2e",
        created_at=at,
        **{**BARE_ORGANIZATION, "public_metadata": {}},
    )


def membership(member_id: str, user_id: str, role: str, at: int, updated: int) -> dict[str, Any]:
    return membership_data(
        member_id,
        organization(at),
        user_id,
        role=role,
        public_user_data={"user_id": user_id, "identifier": f"{user_id}@e2e.test"},
        created_at=at,
        updated_at=updated,
        **{**BARE_MEMBERSHIP, "public_metadata": {}},
    )


def orgsync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orgsync", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_orgsync_run_end_to_end(
    running: tuple[subprocess.Popen[bytes], int, Path], embedded_env: dict[str, str]
) -> None:
    process, port, tmp_path = running

    def alive() -> None:
        if process.poll() is not None:
            pytest.fail(
                f"orgsync run exited with {process.returncode}:\n{(tmp_path / 'run.err').read_text()[-4000:]}"
            )

    def healthy() -> bool | None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(port, "GET", "/healthz")[0] == 200:
                return True
        return None

    wait_for("/healthz", healthy, START_BOUND_S, alive)
    expected = f"orgsync listening on http://127.0.0.1:{port}/webhooks/clerk"
    wait_for(
        "the listening line",
        lambda: True if expected in (tmp_path / "run.out").read_text() else None,
        START_BOUND_S,
        alive,
    )

    at = int(time.time() * 1000) - 60_000
    duplicate = new_msg_id()
    statuses = [
        post_event(port, "organization.created", organization(at)),
        post_event(
            port, "organizationMembership.created", membership("orgmem_a", "user_a", "org:admin", at, at)
        ),
        post_event(
            port,
            "organizationMembership.created",
            membership("orgmem_b", "user_b", "org:member", at + 1, at + 1),
            msg_id=duplicate,
        ),
        post_event(
            port,
            "organizationMembership.created",
            membership("orgmem_b", "user_b", "org:member", at + 1, at + 1),
            msg_id=duplicate,
        ),
        post_event(
            port,
            "organizationMembership.updated",
            membership("orgmem_a", "user_a", "org:billing", at, at + 5),
        ),
        post_event(port, "session.created", {"id": "sess_1"}),
    ]
    assert all(200 <= status < 300 for status in statuses), statuses
    unsigned = request(port, "POST", "/webhooks/clerk", "{}", {"content-type": "application/json"})
    assert unsigned[0] == 400

    def mirrored() -> list[dict[str, Any]] | None:
        result = orgsync(embedded_env, "members", "list", "--org", "e2e", "--json")
        if result.returncode != 0:
            return None
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        roles = {row["public_user_data"]["user_id"]: row["role"] for row in rows}
        return rows if roles == {"user_a": "org:billing", "user_b": "org:member"} else None

    rows = wait_for("the memberships in the mirror", mirrored, APPLY_BOUND_S, alive)
    assert {row["id"] for row in rows} == {"orgmem_a", "orgmem_b"}
    assert all(row["organization_id"] == "org_e2e" for row in rows)

    inbox = json.loads(orgsync(embedded_env, "events", "list", "--json").stdout)
    by_status: dict[str, int] = {}
    for row in inbox:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    # The duplicate was stored once; the unknown type is kept but not applied.
    assert len(inbox) == 5
    assert by_status.get("ignored") == 1
    assert by_status.get("dead", 0) == 0
    assert by_status.get("rejected", 0) == 0

    table = orgsync(embedded_env, "members", "list", "--org", "e2e")
    assert table.returncode == 0, table.stderr
    assert "user_a@e2e.test" in table.stdout

    marker = f"ORGSYNC_TEST_MARKER={embedded_env['ORGSYNC_TEST_MARKER']}"
    assert len(processes_with(marker)) >= 4  # supervisor, web, worker, beat (and their own workers)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=STOP_BOUND_S) == 0, (tmp_path / "run.err").read_text()[-4000:]

    def all_gone() -> bool | None:
        return True if not processes_with(marker) else None

    wait_for("every child to exit", all_gone, STOP_BOUND_S, lambda: None)
    log = (tmp_path / "run.err").read_text()
    assert "received SIGTERM; stopping" in log
    assert TEST_SIGNING_SECRET.removeprefix("whsec_") not in log + (tmp_path / "run.out").read_text()


def test_a_dying_child_stops_everything(embedded_env: dict[str, str], tmp_path: Path) -> None:
    # Port already taken: the web server cannot bind and exits, so `run` must stop the rest and fail.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "orgsync", "run", "--port", str(port)],
            cwd=ROOT,
            env=embedded_env,
            capture_output=True,
            text=True,
            check=False,
            timeout=240,
        )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "orgsync: error: web exited with" in result.stderr
    assert "orgsync listening on" not in result.stdout
    marker = f"ORGSYNC_TEST_MARKER={embedded_env['ORGSYNC_TEST_MARKER']}"
    wait_for(
        "every child to exit",
        lambda: True if not processes_with(marker) else None,
        STOP_BOUND_S,
        lambda: None,
    )
