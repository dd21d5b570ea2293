"""Reads: permission checks and membership pages from the mirror, beside Clerk's API (the emulator).

    python bench/reads.py [--quick] [--orgs 1000] [--members 100] [--out bench/results/reads.json]

Also a phase of bench/run.py. The emulator (``orgsync emulator``, its own process) is seeded
with ``orgs`` organizations of ``members`` members each (100,000 memberships by default);
reconciliation (``worker.reconcile.run_reconcile``) copies it into a fresh mirror, so both
sides hold the same state. Then, each beside the same question asked of the emulator's
Backend API on this machine (Clerk minus the network):

* permission check through the Python API: ``Orgsync.has_permission`` with the default
  ``AccessCache``, one call at a time, after one warm-up pass over the pairs asked (the cold
  first answers are reported apart); baseline: ``GET /v1/organizations/{id}/memberships?
  user_id=...`` on a keep-alive connection, the membership's permissions read from the JSON;
* permission check over HTTP: ``GET /orgsync/v1/permission`` closed loop on ``orgsync serve``
  (granian, as in production); baseline: the same membership lookup on the emulator;
* a page of 100 memberships of an organization over HTTP: ``GET /v1/organizations/{id}/
  memberships?limit=100`` on both, closed loop;
* intake under reads: signed webhooks closed loop on ``orgsync serve``, alone and then with a
  paced read load (checks and pages mixed) on the same server; the figure is the rate with
  reads beside the rate alone.

The load client (bench/client.py) runs on the same CPUs as the servers and PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path; the bench package needs its parent.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.client import Load, LoadResult  # noqa: E402
from bench.procs import (  # noqa: E402
    PG_ADMIN_DSN,
    PG_HOST_URL,
    Service,
    Stack,
    emulator_process,
    free_port,
    fresh_database,
    new_secret,
    pick_redis_db,
    postgres_cpu_seconds,
    progress,
    running,
    tree_cpu_seconds,
    wait_http_ok,
)
from bench.report import latency_summary  # noqa: E402
from bench.workload import MessageIds, Workload, signed_requests  # noqa: E402
from emulator import DEFAULT_SECRET_KEY  # noqa: E402
from models.db import create_db_engine, make_session_factory  # noqa: E402
from models.permissions import AccessCache  # noqa: E402
from orgsync.api import Orgsync  # noqa: E402
from worker.clerk import ClerkClient  # noqa: E402
from worker.reconcile import CountingLimiter, run_reconcile  # noqa: E402

PERMISSION = "org:sys_memberships:manage"
PAGE_SIZE = 100
# Pairs asked that are not memberships: a check's "no" costs a lookup too.
OUTSIDERS = 0.1


@dataclass(frozen=True)
class ReadParams:
    orgs: int = 1000
    members: int = 100
    pairs: int = 5_000
    python_checks: int = 20_000
    baseline_python_checks: int = 2_000
    http_checks: int = 20_000
    baseline_http_checks: int = 4_000
    http_pages: int = 5_000
    baseline_http_pages: int = 1_000
    intake_requests: int = 8_000
    intake_warmup: int = 500
    read_load_rate: float = 300.0
    # Latency at the rates the targets name: a closed loop at saturation measures its queue.
    check_paced_rate: float = 2000.0
    page_paced_rate: float = 1000.0
    paced_seconds: float = 5.0
    baseline_paced_seconds: float = 2.0
    client_processes: int = 2
    client_threads: int = 4
    web_workers: int = 2
    web_threads: int = 8
    max_seconds: float = 60.0
    reconcile_workers: int = 4
    seed: int = 20_240_601


QUICK_READS = ReadParams(
    orgs=10,
    members=20,
    pairs=100,
    python_checks=400,
    baseline_python_checks=100,
    http_checks=400,
    baseline_http_checks=100,
    http_pages=100,
    baseline_http_pages=50,
    intake_requests=300,
    intake_warmup=30,
    read_load_rate=50.0,
    check_paced_rate=200.0,
    page_paced_rate=50.0,
    paced_seconds=1.0,
    baseline_paced_seconds=0.5,
    max_seconds=15.0,
)


@dataclass(frozen=True)
class Target:
    """Where a closed-loop HTTP load goes: port, and the ``Authorization`` header it carries."""

    port: int
    token: str

    def get(self, path: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\n\r\n"
        ).encode()


def permission_path(user_id: str, org_id: str) -> str:
    query = urllib.parse.urlencode({"user_id": user_id, "organization": org_id, "permission": PERMISSION})
    return f"/orgsync/v1/permission?{query}"


def clerk_check_path(user_id: str, org_id: str) -> str:
    # How an application asks Clerk: the organization's memberships filtered by the user.
    query = urllib.parse.urlencode({"user_id": user_id, "limit": 1})
    return f"/v1/organizations/{org_id}/memberships?{query}"


def page_path(org_id: str) -> str:
    return f"/v1/organizations/{org_id}/memberships?limit={PAGE_SIZE}"


# ------------------------------------------------------------------ the state
def fill_mirror(database_url: str, api_url: str, params: ReadParams) -> dict[str, Any]:
    """Copy the emulator's state into the mirror by reconciliation, as a backfill would."""
    engine = create_db_engine(database_url)
    try:
        limiter = CountingLimiter("memory://", 1_000_000, 10, namespace=f"bench{uuid.uuid4().hex[:8]}")
        client = ClerkClient(secret_key=DEFAULT_SECRET_KEY, api_url=api_url, timeout=60.0, limiter=limiter)
        try:
            result = run_reconcile(make_session_factory(engine), client, workers=params.reconcile_workers)
        finally:
            client.close()
    finally:
        engine.dispose()
    if result.status != "completed":
        raise RuntimeError(f"filling the mirror ended {result.status}: {result.error}")
    return {"seconds": round(result.elapsed_s, 1), "api_calls": result.api_calls, "rows": result.rows}


def sample_pairs(dsn: str, params: ReadParams) -> tuple[list[tuple[str, str]], list[str], int]:
    """(user, organization) pairs to ask about (most of them members), the organizations, the count."""
    rng = random.Random(params.seed)
    with psycopg.connect(dsn, autocommit=True) as connection:
        members = connection.execute(
            "SELECT user_id, organization_id FROM memberships WHERE NOT deleted ORDER BY id"
        ).fetchall()
        orgs = [row[0] for row in connection.execute("SELECT id FROM organizations WHERE NOT deleted")]
    if not members or not orgs:
        raise RuntimeError("the mirror holds no memberships: filling it failed")
    chosen = rng.sample(members, min(len(members), params.pairs))
    pairs = [(str(user), str(org)) for user, org in chosen]
    for index in range(int(len(pairs) * OUTSIDERS)):
        pairs[index] = (pairs[index][0], rng.choice(orgs))
    rng.shuffle(pairs)
    return pairs, sorted(orgs), len(members)


def spread(items: Sequence[Any], count: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    return [items[rng.randrange(len(items))] for _ in range(count)]


# -------------------------------------------------------------- measurements
def python_checks(orgsync: Orgsync, pairs: Sequence[tuple[str, str]], count: int) -> dict[str, Any]:
    """Each call timed alone: first a pass over every pair (cold: the cache fills), then ``count``."""
    cold: list[float] = []
    for user, org in pairs:
        began = time.perf_counter_ns()
        orgsync.has_permission(user, org, PERMISSION)
        cold.append((time.perf_counter_ns() - began) / 1e6)
    times: list[float] = []
    allowed = 0
    for user, org in spread(pairs, count, 1):
        began = time.perf_counter_ns()
        allowed += orgsync.has_permission(user, org, PERMISSION)
        times.append((time.perf_counter_ns() - began) / 1e6)
    cache = orgsync.permission_cache
    return {
        "checks": count,
        "allowed": allowed,
        **latency_summary(sorted(times)),
        "cold": latency_summary(sorted(cold)),
        "cache_hits": None if cache is None else cache.hits,
        "cache_misses": None if cache is None else cache.misses,
    }


def baseline_python_checks(api_url: str, pairs: Sequence[tuple[str, str]], count: int) -> dict[str, Any]:
    """The same question asked of the Backend API from Python, one keep-alive connection."""
    url = urllib.parse.urlsplit(api_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    headers = {"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"}
    times: list[float] = []
    allowed = 0
    try:
        for user, org in spread(pairs, count, 2):
            began = time.perf_counter_ns()
            connection.request("GET", clerk_check_path(user, org), headers=headers)
            response = connection.getresponse()
            body = json.loads(response.read())
            data: list[dict[str, Any]] = body.get("data") or [] if response.status == 200 else []
            allowed += bool(data) and PERMISSION in data[0].get("permissions", [])
            times.append((time.perf_counter_ns() - began) / 1e6)
    finally:
        connection.close()
    return {"checks": count, "allowed": allowed, **latency_summary(sorted(times))}


def _load(
    port: int, requests: Sequence[bytes], params: ReadParams, *, rate: float | None, max_seconds: float
) -> LoadResult:
    """``requests`` sent on the benchmark's client processes and threads, to the end."""
    load = Load(
        port,
        requests,
        processes=params.client_processes,
        threads=params.client_threads,
        rate=rate,
        max_seconds=max_seconds,
    )
    return load.wait()


def closed_loop(
    target: Target, paths: Sequence[str], params: ReadParams, label: str, pid: int | None = None
) -> dict[str, Any]:
    cpu_before = tree_cpu_seconds(pid) if pid is not None else 0.0
    postgres_before = postgres_cpu_seconds()
    requests = [target.get(path) for path in paths]
    result = _load(target.port, requests, params, rate=None, max_seconds=params.max_seconds)
    summary = _summary(result, label, tree_cpu_seconds(pid) - cpu_before if pid is not None else None)
    # Where the rest of the two CPUs went: the client's share is in the summary already.
    postgres = postgres_cpu_seconds() - postgres_before
    summary["postgres_cpu_ms_per_request"] = 1000 * postgres / max(1, len(result.completed))
    return summary


def paced(
    target: Target, paths: Sequence[str], params: ReadParams, label: str, *, rate: float, seconds: float
) -> dict[str, Any]:
    """Latency at a fixed offered rate, from each request's scheduled time (falling behind counts)."""
    count = max(1, int(rate * seconds))
    requests = [target.get(path) for path in spread(paths, count, 8)]
    result = _load(target.port, requests, params, rate=rate, max_seconds=seconds + 5)
    summary = _summary(result, f"{label} paced at {rate:.0f}/s", None, from_schedule=True)
    return {**summary, "rate_offered": rate}


def http_reads(
    target: Target,
    check_paths: Sequence[str],
    page_paths: Sequence[str],
    params: ReadParams,
    *,
    name: str,
    pid: int,
    counts: tuple[int, int],
    paced_seconds: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """One server's checks and pages: closed loops (rates, CPU), then paced at the targets' rates."""
    checks, pages = counts
    page_label = f"{name} page of 100"
    return {
        "check": closed_loop(target, spread(check_paths, checks, seed), params, f"{name} check", pid),
        "page": closed_loop(target, spread(page_paths, pages, seed + 1), params, page_label, pid),
        "check_paced": paced(
            target, check_paths, params, f"{name} check", rate=params.check_paced_rate, seconds=paced_seconds
        ),
        "page_paced": paced(
            target, page_paths, params, page_label, rate=params.page_paced_rate, seconds=paced_seconds
        ),
    }


def _summary(
    result: LoadResult, label: str, server_cpu_s: float | None, *, from_schedule: bool = False
) -> dict[str, Any]:
    done = len(result.completed)
    summary: dict[str, Any] = {
        "requests": len(result.status),
        "completed": done,
        "ok": result.ok_count(),
        "rate_per_s": result.rate(),
        **latency_summary(result.latencies_ms(from_schedule=from_schedule)),
        "client_cpu_ms_per_request": 1000 * result.client_cpu_s / max(1, done),
    }
    if server_cpu_s is not None:
        summary["server_cpu_ms_per_request"] = 1000 * server_cpu_s / max(1, done)
    progress(
        f"{label}: {summary['rate_per_s']:.0f}/s, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
        f"{summary['ok']}/{summary['requests']} ok"
    )
    return summary


def intake_under_reads(
    stack: Stack, target: Target, paths: Sequence[str], params: ReadParams, web: Service
) -> dict[str, Any]:
    """Signed webhooks closed loop: alone, then beside a paced read load on the same server."""
    ids = MessageIds()
    load = Workload(random.Random(params.seed), params.orgs, params.orgs * params.members, 1_700_000_000_000)

    def intake(label: str, count: int) -> LoadResult:
        bodies = load.bodies(count)
        requests = signed_requests(stack.secret, ids, bodies, target.port)
        result = _load(target.port, requests, params, rate=None, max_seconds=params.max_seconds)
        web.check_alive()
        _summary(result, label, None)
        return result

    intake("intake warm-up", params.intake_warmup)
    alone = intake("intake alone", params.intake_requests)
    seconds = max(2.0, params.intake_requests / max(1.0, alone.rate()) * 2 + 2)
    count = int(params.read_load_rate * seconds)
    reads = Load(
        target.port,
        [target.get(path) for path in spread(paths, count, 3)],
        processes=1,
        threads=4,
        rate=params.read_load_rate,
        max_seconds=seconds,
    )
    # Let the read load start before the intake load is measured.
    time.sleep(0.5)
    beside = intake(f"intake with {params.read_load_rate:.0f} reads/s", params.intake_requests)
    read_result = reads.wait()
    return {
        "alone": _summary(alone, "intake alone", None),
        "with_reads": _summary(beside, "intake with reads", None),
        "reads": _summary(read_result, "reads beside intake", None),
        "read_rate_offered": params.read_load_rate,
        "share_of_alone": beside.rate() / alone.rate() if alone.rate() else None,
    }


# ------------------------------------------------------------------ the phase
def bench_reads(stack: Stack, params: ReadParams) -> dict[str, Any]:
    """Every read figure for orgsync and the emulator, on the state seeded here."""
    stack.reset()
    out: dict[str, Any] = {"parameters": asdict(params)}
    progress(f"reads: seeding the emulator with {params.orgs} organizations x {params.members} members")
    emulator = emulator_process(orgs=params.orgs, members=params.members, rate_limit=0, seed=params.seed)
    with emulator as (api_url, emulator_pid):
        progress("reads: filling the mirror by reconciliation")
        out["fill"] = fill_mirror(stack.database_url, api_url, params)
        pairs, orgs, memberships = sample_pairs(stack.pg_dsn, params)
        out["memberships"] = memberships
        progress(f"reads: {memberships} memberships in the mirror; {len(pairs)} (user, organization) pairs")
        check_paths = [permission_path(user, org) for user, org in pairs]
        page_paths = [page_path(org) for org in orgs]
        clerk_paths = [clerk_check_path(user, org) for user, org in pairs]

        # Python API, in this process.
        orgsync = Orgsync(stack.settings(), requested_by="bench:reads", permission_cache=AccessCache())
        try:
            out["python_check"] = python_checks(orgsync, pairs, params.python_checks)
        finally:
            orgsync.close()
        progress(f"reads: Python API check p50 {out['python_check']['p50_ms']:.3f} ms, "
                 f"p99 {out['python_check']['p99_ms']:.3f} ms")  # fmt: skip
        out["baseline_python_check"] = baseline_python_checks(api_url, pairs, params.baseline_python_checks)

        # The emulator over HTTP; paced at orgsync's target rates only briefly: where it falls
        # behind, its queue grows for the whole run and its p99 says so.
        clerk = Target(urllib.parse.urlsplit(api_url).port or 0, DEFAULT_SECRET_KEY)
        emulator_loads = http_reads(
            clerk, clerk_paths, page_paths, params, name="emulator", pid=emulator_pid,
            counts=(params.baseline_http_checks, params.baseline_http_pages),
            paced_seconds=params.baseline_paced_seconds, seed=4,
        )  # fmt: skip
        out.update({f"baseline_http_{kind}": figures for kind, figures in emulator_loads.items()})

    # orgsync serve, with the read APIs on.
    token = secrets.token_urlsafe(32)
    port = free_port()
    argv = [sys.executable, "-m", "orgsync", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(params.web_workers), "--threads", str(params.web_threads)]
    env = {**stack.process_env(), "ORGSYNC_API_TOKENS": token}
    service = Service("orgsync-web-reads", argv, env, stack.data_dir)
    target = Target(port, token)
    with running(service) as web:
        wait_http_ok(web, port)
        # Warm-up: every pair once through each worker's cache, every page once.
        closed_loop(target, check_paths * 2 + page_paths, params, "orgsync warm-up")
        orgsync_loads = http_reads(
            target, check_paths, page_paths, params, name="orgsync", pid=web.pid,
            counts=(params.http_checks, params.http_pages), paced_seconds=params.paced_seconds, seed=6,
        )  # fmt: skip
        out.update({f"http_{kind}": figures for kind, figures in orgsync_loads.items()})
        mixed = check_paths + page_paths
        out["intake"] = intake_under_reads(stack, target, mixed, params, web)
        out["web_rss"] = web.sample_rss()
    return out


# ------------------------------------------------------------------ standalone
def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _stack(pg_admin: str, pg_url: str, redis_url: str | None) -> Iterator[Stack]:
    data_dir = Path(tempfile.mkdtemp(prefix="orgsync-bench-reads-"))
    try:
        with fresh_database("orgsync_bench_reads", pg_admin=pg_admin, pg_url=pg_url) as database:
            assert database.dsn is not None
            yield Stack(database.url, database.dsn, redis_url or pick_redis_db(), data_dir, new_secret())
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.report import build_read_figures, render_table

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run of a few seconds")
    parser.add_argument("--orgs", type=int, default=None, help="organizations (default 1,000)")
    parser.add_argument("--members", type=int, default=None, help="members of each (default 100)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reads.json")
    parser.add_argument("--pg-admin", default=PG_ADMIN_DSN)
    parser.add_argument("--pg-url", default=PG_HOST_URL)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    params = QUICK_READS if args.quick else ReadParams()
    if args.orgs is not None:
        params = ReadParams(**{**asdict(params), "orgs": args.orgs})
    if args.members is not None:
        params = ReadParams(**{**asdict(params), "members": args.members})
    began = time.time()
    with _stack(args.pg_admin, args.pg_url, args.redis_url) as stack:
        raw = bench_reads(stack, params)
    figures = build_read_figures(raw)
    result = {
        "started_at": datetime.fromtimestamp(began, tz=UTC).isoformat(),
        "duration_s": time.time() - began,
        "quick": args.quick,
        "figures": figures,
        "raw": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
