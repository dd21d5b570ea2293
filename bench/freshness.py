"""Freshness where the main phases do not look: the embedded default, and the Backend API down.

* embedded: ``orgsync run`` with no DATABASE_URL or BROKER_URL (SQLite and kombu's SQLAlchemy
  transport in a data directory of its own), new memberships offered at 100/s over HTTP; a
  poller reads the SQLite mirror: latency = first seen - request sent. Before the load, the
  CPU that ``orgsync run`` and all its processes use while idle, as a percentage of one CPU.
* Clerk down: ``orgsync serve`` + ``orgsync worker`` on PostgreSQL and Redis, membership events
  for new organizations at 100/s (each queues a reconciliation of its organization), first
  with no ``CLERK_SECRET_KEY``, then with a key and ``CLERK_API_URL`` on a closed loopback
  port; latency = the inbox's ``handled_at - received_at`` (receive -> applying transaction),
  no poller involved.

bench/run.py runs both; alone, for a quicker look (a database and a Redis db of its own, as
bench/run.py):

    python bench/freshness.py [--quick] [--only embedded|clerk] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path; the bench package needs its parent.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

from bench.client import Load  # noqa: E402
from bench.procs import (  # noqa: E402
    Service,
    Stack,
    free_port,
    fresh_database,
    new_secret,
    pick_redis_db,
    progress,
    running,
    tree_cpu_seconds,
    wait_http_ok,
    wait_until,
)
from bench.report import (  # noqa: E402
    TARGET_CLERK_DOWN_FRESHNESS_P99_MS,
    TARGET_EMBEDDED_FRESHNESS_P99_MS,
    TARGET_IDLE_CPU_PERCENT,
    figure,
    latency_summary,
)
from bench.workload import MessageIds, Workload, signed_requests  # noqa: E402
from worker.app import QUEUE_CLERK  # noqa: E402

POLL_INTERVAL_S = 0.005
BENCH_SECRET_KEY = "sk_test_freshness_bench"
WARM_EVENTS = 20


@dataclass(frozen=True)
class FreshnessParams:
    rate: float = 100.0
    seconds: float = 20.0
    # Idle CPU is read over this long, after the processes had this long to settle.
    idle_seconds: float = 30.0
    settle_seconds: float = 5.0
    timeout_s: float = 60.0
    seed: int = 20_261_201


QUICK_FRESHNESS = FreshnessParams(seconds=2.0, idle_seconds=3.0, settle_seconds=1.0, timeout_s=30.0)


def _workload(params: FreshnessParams, salt: int, organizations: int) -> Workload:
    rng = random.Random(params.seed + salt)
    return Workload(rng, organizations, 200, time.time_ns() // 1_000_000 - 86_400_000)


def poll_visible(
    seen_query: Callable[[list[str]], set[str]],
    loader: Load,
    users: Sequence[str],
    services: Sequence[Service],
    *,
    timeout_s: float,
) -> dict[int, int]:
    """First time each user's membership is visible, by index; only scheduled, unseen ones are asked.

    Waits at least four times as long as its last query took, so that a system falling behind
    is not pushed further by the poller (as bench.phases.poll_mirror).
    """
    seen: dict[int, int] = {}
    due: list[int] = []
    scheduled = 0
    deadline = loader.start_ns + int(timeout_s * 1e9)
    while len(seen) < len(users) and time.perf_counter_ns() < deadline:
        now = time.perf_counter_ns()
        while scheduled < len(users) and loader.scheduled_ns(scheduled) <= now:
            due.append(scheduled)
            scheduled += 1
        pause = POLL_INTERVAL_S
        if due:
            began = time.perf_counter_ns()
            found = seen_query([users[i] for i in due])
            stamp = time.perf_counter_ns()
            for i in due:
                if users[i] in found:
                    seen[i] = stamp
            due = [i for i in due if i not in seen]
            pause = max(pause, 4 * (stamp - began) / 1e9)
            for service in services:
                service.check_alive()
        time.sleep(pause)
    return seen


# -- the embedded default ----------------------------------------------------------------------


def _embedded_env(data_dir: Path, secret: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ORGSYNC_", "CLERK_", "DATABASE_", "BROKER_"))
    }
    env.update(
        ORGSYNC_DATA_DIR=str(data_dir),
        CLERK_WEBHOOK_SIGNING_SECRET=secret,
        ORGSYNC_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


def _sqlite_users(database: Path) -> tuple[Callable[[list[str]], set[str]], Callable[[], None]]:
    """A query for which of these users the mirror shows, and how to close it.

    One read-only connection for the whole run: a SELECT outside a transaction takes a fresh
    snapshot each time, and a connection per poll made every query (and so the poller's
    back-off) several times slower.
    """
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5, check_same_thread=False)

    def query(users: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(users), 500):
            chunk = users[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(f"SELECT user_id FROM memberships WHERE user_id IN ({marks})", chunk)
            found.update(str(row[0]) for row in rows)
        return found

    return query, db.close


def _sqlite_handled_minus_received(database: Path) -> dict[str, Any]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute(
            "SELECT handled_at - received_at FROM inbox_events WHERE handled_at IS NOT NULL ORDER BY 1"
        ).fetchall()
    return dict(latency_summary([float(row[0]) for row in rows]))


def measure_embedded(secret: str, ids: MessageIds, params: FreshnessParams, log_dir: Path) -> dict[str, Any]:
    """``orgsync run`` on its embedded default: idle CPU, then freshness at ``params.rate``."""
    data_dir = log_dir / f"embedded-{uuid.uuid4().hex[:8]}"
    port = free_port()
    argv = [sys.executable, "-m", "orgsync", "run", "--host", "127.0.0.1", "--port", str(port)]
    service = Service("orgsync-run", argv, _embedded_env(data_dir, secret), log_dir)
    database = data_dir / "orgsync.db"
    with running(service) as run:
        wait_http_ok(run, port)
        seen_query, close = _sqlite_users(database)
        load = _workload(params, 11, 50)
        tag = uuid.uuid4().hex[:8]
        warm_bodies, warm_users = load.created_for_new_users(20, f"w{tag}")
        warm = signed_requests(secret, ids, warm_bodies, port)
        Load(port, warm, processes=1, threads=2, rate=None, max_seconds=30).wait()
        wait_until(lambda: len(seen_query(warm_users)) == len(warm_users), params.timeout_s, run, "warm-up")

        time.sleep(params.settle_seconds)
        progress(f"embedded: idle CPU of orgsync run over {params.idle_seconds:g} s")
        before = tree_cpu_seconds(run.pid)
        began = time.perf_counter()
        time.sleep(params.idle_seconds)
        idle_cpu = tree_cpu_seconds(run.pid) - before
        idle_percent = 100 * idle_cpu / (time.perf_counter() - began)
        progress(f"embedded: idle CPU {idle_percent:.2f} % of one CPU")

        count = max(1, int(params.rate * params.seconds))
        bodies, users = load.created_for_new_users(count, f"f{tag}")
        requests = signed_requests(secret, ids, bodies, port)
        progress(f"embedded: freshness, {count} events at {params.rate:g}/s")
        loader = Load(
            port, requests, processes=1, threads=2, rate=params.rate, max_seconds=params.seconds * 3 + 5
        )
        cpu_before = tree_cpu_seconds(run.pid)
        began = time.perf_counter()
        seen = poll_visible(seen_query, loader, users, [run], timeout_s=params.seconds + params.timeout_s)
        result = loader.wait()
        elapsed = time.perf_counter() - began
        busy_cpu = (tree_cpu_seconds(run.pid) - cpu_before) / elapsed
        close()
        latencies = sorted((seen[i] - result.sent_ns[i]) / 1e6 for i in seen if result.status[i])
        missing = count - len(seen)
        figures: dict[str, Any] = {
            "offered_per_s": params.rate,
            "events": count,
            "acknowledged": result.ok_count(),
            "visible": len(seen),
            "missing": missing,
            **latency_summary(latencies),
            "inbox_handled_minus_received": _sqlite_handled_minus_received(database),
            "cpu_share_under_load": busy_cpu,
            "idle_seconds": params.idle_seconds,
            "idle_cpu_s": idle_cpu,
            "idle_cpu_percent": idle_percent,
        }
    if missing:
        progress(f"embedded: {missing} events never became visible")
        figures["p99_ms"] = None
    progress(f"embedded: freshness p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms")
    return figures


# -- Clerk down --------------------------------------------------------------------------------


def _pg_handled_minus_received(dsn: str, after_id: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT handled_at - received_at FROM inbox_events WHERE handled_at IS NOT NULL AND id > %s "
            "ORDER BY 1",
            (after_id,),
        ).fetchall()
    return dict(latency_summary([float(row[0]) for row in rows]))


def _last_inbox_id(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("SELECT coalesce(max(id), 0) FROM inbox_events").fetchone()
    return int(row[0]) if row else 0


def _clerk_work_waiting(broker_url: str) -> int:
    """Messages in the clerk queue, plus those a worker holds (a retry waiting for its countdown)."""
    client = redis.Redis.from_url(broker_url)
    return int(client.llen(QUEUE_CLERK)) + int(client.hlen("unacked"))


def measure_applied(
    stack: Stack, ids: MessageIds, params: FreshnessParams, *, label: str, clerk: dict[str, str]
) -> dict[str, Any]:
    """Events for new organizations at ``params.rate``; receive -> applied from the inbox."""
    stack.reset()
    env = {**stack.process_env(), **clerk}
    port = free_port()
    web_argv = [sys.executable, "-m", "orgsync", "serve", "--host", "127.0.0.1", "--port", str(port)]
    worker_argv = [sys.executable, "-m", "orgsync", "worker", "--hostname", f"fresh-{ids.tag}@%h"]
    count = max(1, int(params.rate * params.seconds))
    load = _workload(params, 21, count + WARM_EVENTS)
    tag = uuid.uuid4().hex[:8]
    warm_bodies, _ = load.created_for_new_users(WARM_EVENTS, f"w{tag}")
    bodies = load.created_for_new_users(count + WARM_EVENTS, f"c{tag}")[0][WARM_EVENTS:]
    with (
        running(Service("orgsync-web", web_argv, env, stack.data_dir)) as web,
        running(Service("orgsync-worker", worker_argv, env, stack.data_dir)) as worker,
    ):
        wait_http_ok(web, port)
        # The worker is up once a first few events are applied: only then is the clock started.
        warm = signed_requests(stack.secret, ids, warm_bodies, port)
        Load(port, warm, processes=1, threads=2, rate=None, max_seconds=30).wait()
        wait_until(lambda: not stack.any_pending(), params.timeout_s, worker, f"{label}: warm-up", 0.2)
        after_id = _last_inbox_id(stack.pg_dsn)
        progress(f"{label}: {count} events for new organizations at {params.rate:g}/s")
        loader = Load(
            port,
            signed_requests(stack.secret, ids, bodies, port),
            processes=1,
            threads=2,
            rate=params.rate,
            max_seconds=params.seconds * 3 + 5,
        )
        result = loader.wait()
        wait_until(
            lambda: not stack.any_pending(), params.timeout_s, worker, f"{label}: every event applied", 0.2
        )
        summary = _pg_handled_minus_received(stack.pg_dsn, after_id)
        waiting = _clerk_work_waiting(stack.broker_url)
    figures = {
        "offered_per_s": params.rate,
        "events": count,
        "acknowledged": result.ok_count(),
        "statuses": stack.status_counts(),
        **summary,
        # Clerk work still queued or waiting to be retried when the last event was applied.
        "clerk_messages_waiting_at_end": waiting,
    }
    progress(
        f"{label}: receive -> applied p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms; "
        f"{waiting} Clerk tasks still waiting"
    )
    return figures


def measure_clerk_down(stack: Stack, ids: MessageIds, params: FreshnessParams) -> dict[str, Any]:
    closed = free_port()  # nothing listens there: every Backend API call is refused at once
    return {
        "no_key": measure_applied(stack, ids, params, label="no key", clerk={}),
        "clerk_down": measure_applied(
            stack,
            ids,
            params,
            label="Clerk down",
            clerk={"CLERK_SECRET_KEY": BENCH_SECRET_KEY, "CLERK_API_URL": f"http://127.0.0.1:{closed}/v1"},
        ),
    }


def bench_freshness(stack: Stack, ids: MessageIds, params: FreshnessParams) -> dict[str, Any]:
    return {
        "embedded": measure_embedded(stack.secret, ids, params, stack.data_dir),
        **measure_clerk_down(stack, ids, params),
    }


def freshness_figures(result: dict[str, Any], postgres_p99_ms: float | None) -> dict[str, dict[str, Any]]:
    embedded, down, no_key = result["embedded"], result["clerk_down"], result["no_key"]
    figures = [
        figure(
            "freshness_embedded_p99_ms",
            "ms",
            embedded["p99_ms"],
            None,
            better="lower",
            target=TARGET_EMBEDDED_FRESHNESS_P99_MS,
            detail=f"receive -> visible at {embedded['offered_per_s']:g}/s on the embedded default "
            f"(orgsync run, SQLite); PostgreSQL + Redis: {postgres_p99_ms} ms (freshness_p99_ms)",
        ),
        figure(
            "embedded_idle_cpu_percent",
            "%",
            embedded["idle_cpu_percent"],
            None,
            better="lower",
            target=TARGET_IDLE_CPU_PERCENT,
            detail="CPU of orgsync run and all its processes while idle, % of one CPU",
        ),
        figure(
            "applied_no_key_p99_ms",
            "ms",
            no_key["p99_ms"],
            None,
            better="lower",
            target=None,
            detail=f"receive -> applied at {no_key['offered_per_s']:g}/s, events for new organizations, "
            "no CLERK_SECRET_KEY (PostgreSQL + Redis)",
        ),
        figure(
            "applied_clerk_down_p99_ms",
            "ms",
            down["p99_ms"],
            None,
            better="lower",
            target=TARGET_CLERK_DOWN_FRESHNESS_P99_MS,
            detail=f"receive -> applied at {down['offered_per_s']:g}/s, events for new organizations, "
            "CLERK_SECRET_KEY set and the Backend API refusing connections",
        ),
    ]
    return {entry["name"]: entry for entry in figures}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="freshness on the embedded default and with Clerk down")
    parser.add_argument("--quick", action="store_true", help="a few seconds of load")
    parser.add_argument("--only", choices=("embedded", "clerk"), default=None)
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for the last event")
    args = parser.parse_args(argv)
    params = QUICK_FRESHNESS if args.quick else FreshnessParams()
    if args.timeout is not None:
        params = replace(params, timeout_s=args.timeout)
    data_dir = Path(tempfile.mkdtemp(prefix="orgsync-freshness-"))
    broker_url = pick_redis_db()
    ids = MessageIds()
    try:
        with fresh_database("orgsync_bench") as database:
            assert database.dsn is not None
            stack = Stack(database.url, database.dsn, broker_url, data_dir, new_secret())
            result: dict[str, Any] = {}
            if args.only in (None, "embedded"):
                result["embedded"] = measure_embedded(stack.secret, ids, params, data_dir)
            if args.only in (None, "clerk"):
                result.update(measure_clerk_down(stack, ids, params))
        print(json.dumps(result, indent=2))
        return 0
    finally:
        redis.Redis.from_url(broker_url).flushdb()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
