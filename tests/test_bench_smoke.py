"""The benchmark runs end to end in its quick form and reports every figure beside its baseline.

Its modules (bench/workload.py, client.py, procs.py, report.py) are checked on their own first,
without servers: the workload is what orgsync accepts, the report computes ratios and verdicts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import PG_ADMIN_DSN, PG_HOST_URL
from sqlalchemy import inspect
from svix.webhooks import Webhook

from models.db import create_db_engine
from models.events import parse_event

ROOT = Path(__file__).resolve().parent.parent
# bench/ is a package beside the installed ones, run from a checkout: its parent must be importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import procs, report  # noqa: E402
from bench.client import Load, LoadResult  # noqa: E402
from bench.workload import MessageIds, Workload, signed_requests  # noqa: E402

# Only a guard against a hung run: nothing here depends on how fast it is. Generous: on a
# machine busy with other test suites the quick run has taken over four minutes.
RUN_LIMIT_S = 480

FIGURES_WITH_BASELINE = {
    "intake_rate",
    "intake_p50_ms",
    "intake_p99_ms",
    "intake_paced_rate",
    "intake_paced_p99_ms",
    "intake_server_cpu_ms",
    "intake_paced_high_rate",
    "intake_paced_high_p99_ms",
    "apply_rate",
    "apply_celery_rate",
    "apply_2_processes_rate",
    "freshness_p50_ms",
    "freshness_p99_ms",
    "web_rss_mb",
    # bench/reads.py: beside the emulator's Backend API (intake with reads: beside intake alone).
    "check_python_p50_ms",
    "check_python_p99_ms",
    "check_http_rate",
    "check_http_p99_ms",
    "page_http_rate",
    "page_http_p99_ms",
    "intake_rate_with_reads",
    # The console's page beside the HTTP read API's for the same memberships.
    "console_members_page_p99_ms",
    "console_members_middle_p99_ms",
}
# The baseline handler has no worker process to weigh.
# Nor a prune to run beside its intake.
# Nor notifications (beside orgsync's own apply rate), the embedded default and the
# Backend API down (bench/freshness.py): orgsync against its targets.
FIGURES_WITHOUT_BASELINE = {
    "worker_rss_mb",
    "intake_paced_p99_during_prune_ms",
    "freshness_embedded_p99_ms",
    "embedded_idle_cpu_percent",
    "applied_no_key_p99_ms",
    "applied_clerk_down_p99_ms",
    "apply_with_notifications_rate",
    "notify_delivery_rate",
}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_workload_events_are_accepted_as_clerk_sends_them() -> None:
    workload = Workload(random.Random(7), organizations=5, users=40, start_ms=1_700_000_000_000)
    bodies = workload.bodies(300)
    events = [parse_event(f"msg_{n}", body) for n, body in enumerate(bodies)]
    assert {event.type for event in events} == {
        "organizationMembership.created",
        "organizationMembership.updated",
        "organizationMembership.deleted",
    }
    # A removal carries the membership as it last was: the same id as its creation.
    created = {event.data["id"] for event in events if event.action == "created"}
    assert all(event.data["id"] in created for event in events if event.action == "deleted")
    new_bodies, user_ids = workload.created_for_new_users(10, "t")
    assert len(set(user_ids)) == 10
    assert [parse_event("msg_x", body).data["public_user_data"]["user_id"] for body in new_bodies] == user_ids


def test_signed_requests_verify_with_the_secret() -> None:
    secret = procs.new_secret()
    body = Workload(random.Random(1), 2, 3, 1_700_000_000_000).bodies(1)[0]
    (request,) = signed_requests(secret, MessageIds(), [body], port=8000)
    head, _, raw = request.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert raw.decode() == body
    assert int(headers["Content-Length"]) == len(raw)
    Webhook(secret).verify(raw, {key: value for key, value in headers.items() if key.startswith("svix-")})


def test_latency_summary_and_load_result_rate() -> None:
    result = LoadResult(
        status=[200, 200, 0, 500],
        scheduled_ns=[0, 0, 0, 0],
        sent_ns=[0, 1_000_000, 0, 2_000_000],
        done_ns=[4_000_000, 3_000_000, 0, 6_000_000],
        start_ns=0,
    )
    assert result.completed == [0, 1, 3]
    assert result.ok_count() == 2
    assert result.rate() == pytest.approx(3 / 0.006)
    latencies = result.latencies_ms(from_schedule=False)
    assert latencies == [2.0, 4.0, 4.0]
    assert report.latency_summary(latencies) == {"p50_ms": 4.0, "p90_ms": 4.0, "p99_ms": 4.0, "max_ms": 4.0}
    assert report.latency_summary([])["p99_ms"] is None


def _empty_http_server() -> tuple[socket.socket, threading.Thread]:
    """A loopback server answering every request on every connection with an empty 200."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(connection: socket.socket) -> None:
        with connection:
            pending = b""
            while chunk := connection.recv(65536):
                pending += chunk
                while b"\r\n\r\n" in pending:
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                threading.Thread(target=serve, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


def test_a_paced_load_offers_its_requests_evenly_spaced_across_connections() -> None:
    # Each of the 2 x 3 connections carries every sixth request, due 1/rate after the one
    # before it whichever connection carries that: the server sees the rate, not bursts of six.
    listener, _ = _empty_http_server()
    with listener:
        port = listener.getsockname()[1]
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        load = Load(port, [request] * 30, processes=2, threads=3, rate=200.0, max_seconds=10)
        result = load.wait()
    assert result.ok_count() == 30
    interval = 5_000_000  # 1/200 s
    assert result.scheduled_ns == [load.start_ns + i * interval for i in range(30)]
    assert [load.scheduled_ns(i) for i in range(30)] == result.scheduled_ns
    assert all(sent >= scheduled for sent, scheduled in zip(result.sent_ns, result.scheduled_ns, strict=True))


def test_figure_ratio_and_verdict() -> None:
    higher = report.figure("rate", "events/s", 2000.0, 500.0, better="higher", target=1800.0, detail="")
    assert (higher["ratio"], higher["met"], higher["target_text"]) == (4.0, True, ">= 1800 events/s")
    lower = report.figure("p99", "ms", 400.0, 100.0, better="lower", target=300.0, detail="")
    assert (lower["ratio"], lower["met"], lower["target_text"]) == (4.0, False, "<= 300 ms")
    # A figure that could not be measured misses its target; without a baseline there is no ratio.
    missing = report.figure("p99", "ms", None, 100.0, better="lower", target=300.0, detail="")
    assert (missing["ratio"], missing["met"]) == (None, False)
    alone = report.figure("rss", "MB", 90.0, None, better="lower", target=200.0, detail="")
    assert (alone["ratio"], alone["met"]) == (None, True)
    table = report.render_table({entry["name"]: entry for entry in (higher, lower, alone)})
    assert table.splitlines()[0].split() == ["figure", "orgsync", "baseline", "ratio", "target", "met?"]
    assert "4.00x" in table
    assert "NO" in table


def test_reconcile_verdict_against_the_bound() -> None:
    assert report.reconcile_met({"ratio_to_bound": 1.05}) == "yes"
    assert report.reconcile_met({"ratio_to_bound": 1.3}) == "NO"
    assert report.reconcile_met({}) == "-"


def test_bench_reads_the_tests_postgres_admin_variable() -> None:
    # One name for the admin URL, in bench/run.py, bench/reconcile.py and the tests' fixtures.
    assert procs.PG_ADMIN_ENV == "ORGSYNC_TEST_PG_ADMIN"
    assert procs.PG_ADMIN_DSN == PG_ADMIN_DSN
    # Only procs.py reads server addresses from the environment.
    for path in (ROOT / "bench").glob("*.py"):
        if path.name != "procs.py":
            assert "os.environ.get(" not in path.read_text(), path.name


def test_fresh_sqlite_database_is_migrated_and_removed() -> None:
    with procs.fresh_database("orgsync_bench_test", kind="sqlite") as database:
        assert database.dsn is None
        engine = create_db_engine(database.url)
        try:
            assert "inbox_events" in inspect(engine).get_table_names()
        finally:
            engine.dispose()
        path = Path(database.name)
        assert path.exists()
    assert not path.exists()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_quick_benchmark_reports_every_figure(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    # pg_url and redis_url skip (or fail under CI=true) through conftest.unavailable when a
    # server is unreachable; the benchmark creates and drops a database of its own.
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--quick",
        "--prune-rows",
        "1000",
        "--out",
        str(out),
        "--pg-admin",
        PG_ADMIN_DSN,
        "--pg-url",
        PG_HOST_URL,
        "--redis-url",
        redis_url,
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ORGSYNC_", "CLERK_"))}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop its servers and drop its database.
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the quick benchmark did not finish within {RUN_LIMIT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]

    result = json.loads(out.read_text())
    assert result["quick"] is True
    machine = result["machine"]
    assert machine["nproc"] >= 1
    assert machine["python"]
    assert machine["postgres_version"]
    assert result["parameters"]["apply_events"] > 0

    figures = result["figures"]
    assert set(figures) == FIGURES_WITH_BASELINE | FIGURES_WITHOUT_BASELINE
    for name in FIGURES_WITH_BASELINE:
        entry = figures[name]
        assert _number(entry["orgsync"]), (name, entry)
        assert _number(entry["baseline"]), (name, entry)
        assert _number(entry["ratio"]), (name, entry)
        assert entry["better"] in {"higher", "lower"}
    for name in FIGURES_WITHOUT_BASELINE:
        assert _number(figures[name]["orgsync"]), name
        assert figures[name]["ratio"] is None
    for entry in figures.values():
        if entry["target"] is not None:
            assert isinstance(entry["met"], bool), entry

    raw = result["raw"]
    # Every event offered was acknowledged, and the apply runs applied the whole backlog.
    assert (
        raw["web"]["orgsync_intake"]["closed_loop"]["ok"]
        == raw["web"]["orgsync_intake"]["closed_loop"]["requests"]
    )
    assert raw["web"]["orgsync_freshness"]["missing"] == 0
    # The embedded default showed every event; with Clerk down or no key every event was applied.
    assert raw["freshness"]["embedded"]["missing"] == 0
    for case in ("no_key", "clerk_down"):
        counts = raw["freshness"][case]["statuses"]
        assert set(counts) == {"applied"}
        assert counts["applied"] >= raw["freshness"][case]["events"]
    # The prune phase deleted exactly the rows it seeded, while intake acknowledged every request.
    during = raw["web"]["orgsync_intake_during_prune"]
    assert (during["prune_rows"], during["deleted"]) == (1000, 1000)
    assert during["completed"] == during["requests"]
    assert raw["apply"]["orgsync"]["applied"] == raw["apply"]["orgsync"]["events"]
    assert raw["apply"]["celery"]["applied"] == raw["apply"]["celery"]["events"]
    # Every read was answered, on both sides, over the same state.
    reads = raw["reads"]
    assert reads["memberships"] == reads["parameters"]["orgs"] * reads["parameters"]["members"]
    for name in ("http_check", "baseline_http_check", "http_page", "baseline_http_page"):
        assert reads[name]["ok"] == reads[name]["requests"], name
    assert reads["python_check"]["allowed"] > 0
    for processes in ("1", "2"):
        drained = raw["apply"]["processes"][processes]
        assert drained["applied"] == drained["events"], processes
        assert drained["statuses"] == {"applied": drained["events"]}, processes
    # Every change event the backlog produced reached the receiver.
    delivery = raw["notify"]["delivery"]
    assert delivery["changes"] > 0
    assert delivery["delivered"] == delivery["changes"] <= delivery["received"]
    # The table is printed on stdout.
    assert "figure" in output
    assert "apply_rate" in output
