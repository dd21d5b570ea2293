"""The measurements of bench/run.py: intake, freshness, apply and memory, for orgsync and the baseline."""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.apply_workers import drain_with_processes
from bench.client import Load, LoadResult
from bench.procs import (
    Service,
    Stack,
    free_port,
    postgres_cpu_seconds,
    progress,
    running,
    tree_cpu_seconds,
    wait_http_ok,
    wait_until,
)
from bench.prune import measure_intake_during_prune
from bench.report import TARGET_INTAKE_HIGH_RATE, TARGET_INTAKE_PACED_RATE, latency_summary
from bench.workload import MessageIds, Workload, signed_requests
from models.db import create_db_engine, make_session_factory, session_scope
from models.events import parse_event
from models.mirror import apply_events
from models.settings import Settings
from worker.app import create_celery, make_sender
from worker.apply import apply_inbox

POLL_INTERVAL_S = 0.005


@dataclass(frozen=True)
class Params:
    """How much of everything a run does; ``--quick`` shrinks it to a few seconds of load."""

    intake_requests: int = 20_000
    intake_max_seconds: float = 45.0
    intake_warmup: int = 300
    paced_rate: float = TARGET_INTAKE_PACED_RATE
    # A second paced run above it: the headroom the first one leaves.
    paced_high_rate: float = TARGET_INTAKE_HIGH_RATE
    paced_seconds: float = 10.0
    client_processes: int = 2
    client_threads: int = 4
    web_workers: int = 2
    web_threads: int = 8
    freshness_rate: float = 300.0
    freshness_seconds: float = 15.0
    freshness_timeout_s: float = 30.0
    # Pool size of ``orgsync worker`` (its default on two CPUs), then other sizes for freshness.
    worker_concurrency: int = 2
    freshness_other_concurrency: tuple[int, ...] = (1,)
    apply_events: int = 100_000
    apply_baseline_events: int = 5_000
    apply_celery_events: int = 100_000
    # Drained by 1, then 2 plain worker processes (bench/apply_workers.py): what a second adds.
    apply_process_events: int = 50_000
    apply_processes: tuple[int, ...] = (1, 2)
    apply_timeout_s: float = 300.0
    organizations: int = 2_000
    users: int = 40_000
    # Old inbox rows ``orgsync prune`` deletes while intake is measured beside it.
    prune_rows: int = 1_000_000
    prune_max_seconds: float = 900.0
    seed: int = 20_240_601


QUICK = Params(
    intake_requests=400,
    intake_max_seconds=15.0,
    intake_warmup=50,
    paced_seconds=0.5,
    freshness_seconds=1.0,
    freshness_timeout_s=20.0,
    freshness_other_concurrency=(),
    apply_events=2_000,
    apply_baseline_events=200,
    apply_celery_events=1_000,
    apply_process_events=1_000,
    apply_timeout_s=60.0,
    organizations=50,
    users=500,
    prune_rows=2_000,
    prune_max_seconds=60.0,
)


@dataclass
class Env(Stack):
    """A run's stack with its parameters and its svix ids."""

    params: Params = field(default_factory=Params)
    ids: MessageIds = field(default_factory=MessageIds)

    def web(self, port: int) -> Service:
        return self.web_service(port, workers=self.params.web_workers, threads=self.params.web_threads)

    def baseline_web(self, port: int) -> Service:
        return self.baseline_service(port, workers=self.params.web_workers, threads=self.params.web_threads)

    def worker(self, concurrency: int | None = None) -> Service:
        concurrency = concurrency or self.params.worker_concurrency
        return self.worker_service(concurrency=concurrency, tag=self.ids.tag)


def run_load(
    port: int, requests: Sequence[bytes], params: Params, *, rate: float | None, max_seconds: float
) -> LoadResult:
    load = Load(
        port,
        requests,
        processes=params.client_processes,
        threads=params.client_threads,
        rate=rate,
        max_seconds=max_seconds,
    )
    return load.wait()


def workload(env: Env, salt: int) -> Workload:
    p = env.params
    return Workload(
        random.Random(p.seed + salt), p.organizations, p.users, time.time_ns() // 1_000_000 - 86_400_000
    )


def measure_intake(env: Env, service: Service, port: int, label: str) -> dict[str, Any]:
    """Closed-loop throughput and latency, then latency at the target rate, on a running server."""
    p = env.params
    load = workload(env, 1)
    warm = signed_requests(env.secret, env.ids, load.bodies(p.intake_warmup), port)
    run_load(port, warm, p, rate=None, max_seconds=30)
    bodies = load.bodies(p.intake_requests)
    progress(
        f"{label}: {len(bodies)} requests, closed loop, {p.client_processes}x{p.client_threads} connections"
    )
    requests = signed_requests(env.secret, env.ids, bodies, port)
    cpu_before = (tree_cpu_seconds(service.pid), postgres_cpu_seconds())
    result = run_load(port, requests, p, rate=None, max_seconds=p.intake_max_seconds)
    service.check_alive()
    server_cpu = tree_cpu_seconds(service.pid) - cpu_before[0]
    postgres_cpu = postgres_cpu_seconds() - cpu_before[1]
    done = max(1, len(result.completed))
    wall = (
        (max(result.done_ns[i] for i in result.completed) - result.start_ns) / 1e9
        if result.completed
        else 0.0
    )
    closed_cpu = {
        "wall_s": wall,
        "server_cpu_s": server_cpu,
        "postgres_cpu_s": postgres_cpu,
        "client_cpu_s": result.client_cpu_s,
        "server_cpu_ms_per_request": 1000 * server_cpu / done,
        "postgres_cpu_ms_per_request": 1000 * postgres_cpu / done,
        "client_cpu_ms_per_request": 1000 * result.client_cpu_s / done,
    }
    closed = {
        "requests": len(bodies),
        "completed": len(result.completed),
        "ok": result.ok_count(),
        "reconnects": result.reconnects,
        "rate_per_s": result.rate(),
        **latency_summary(result.latencies_ms(from_schedule=False)),
        "cpu": closed_cpu,
    }
    progress(
        f"{label}: CPU per request: server {closed_cpu['server_cpu_ms_per_request']:.2f} ms, "
        f"PostgreSQL {closed_cpu['postgres_cpu_ms_per_request']:.2f} ms, "
        f"client {closed_cpu['client_cpu_ms_per_request']:.2f} ms"
    )
    progress(
        f"{label}: {closed['rate_per_s']:.0f}/s, p50 {closed['p50_ms']:.1f} ms, p99 {closed['p99_ms']:.1f} ms"
    )
    paced_figures = measure_paced(env, service, port, label, load=load, rate=p.paced_rate)
    paced_high = measure_paced(env, service, port, label, load=load, rate=p.paced_high_rate)
    rss = service.sample_rss()
    return {"closed_loop": closed, "paced": paced_figures, "paced_high": paced_high, "rss": rss}


def measure_paced(
    env: Env, service: Service, port: int, label: str, *, load: Workload, rate: float
) -> dict[str, Any]:
    """Latency at a fixed offered rate, from each request's scheduled time; CPU per request too."""
    p = env.params
    paced_count = max(1, int(rate * p.paced_seconds))
    progress(f"{label}: {paced_count} requests paced at {rate:.0f}/s")
    paced_requests = signed_requests(env.secret, env.ids, load.bodies(paced_count), port)
    # Bounded in time: a server that cannot keep up is not waited for. Requests still unanswered
    # at the end count with the time they had waited so far, so p99 is then a lower bound.
    cpu_before = tree_cpu_seconds(service.pid)
    loader = Load(
        port,
        paced_requests,
        processes=p.client_processes,
        threads=p.client_threads,
        rate=rate,
        max_seconds=p.paced_seconds + 5,
    )
    paced = loader.wait()
    ended = time.perf_counter_ns()
    server_cpu = tree_cpu_seconds(service.pid) - cpu_before
    latencies = paced.latencies_ms(from_schedule=True)
    unanswered = [i for i, status in enumerate(paced.status) if not status]
    latencies += [(ended - loader.scheduled_ns(i)) / 1e6 for i in unanswered]
    service.check_alive()
    figures = {
        "offered_per_s": rate,
        "requests": paced_count,
        "completed": len(paced.completed),
        "ok": paced.ok_count(),
        "unanswered": len(unanswered),
        "achieved_per_s": paced.rate(),
        **latency_summary(sorted(latencies)),
        "latencies_are_lower_bounds": bool(unanswered),
        "server_cpu_ms_per_request": 1000 * server_cpu / max(1, len(paced.completed)),
    }
    achieved, p99 = figures["achieved_per_s"], figures["p99_ms"]
    progress(f"{label}: paced at {rate:.0f}/s achieved {achieved:.0f}/s, p99 {p99:.1f} ms")
    return figures


def measure_freshness(env: Env, port: int, label: str, services: Sequence[Service]) -> dict[str, Any]:
    """Offer new memberships at a fixed rate over HTTP; poll the mirror for each one."""
    p = env.params
    load = workload(env, 2)
    tag = uuid.uuid4().hex[:8]
    warm_bodies, warm_users = load.created_for_new_users(50, f"w{tag}")
    run_load(port, signed_requests(env.secret, env.ids, warm_bodies, port), p, rate=None, max_seconds=30)
    wait_visible(env, warm_users, timeout=p.freshness_timeout_s, services=services)
    count = max(1, int(p.freshness_rate * p.freshness_seconds))
    bodies, users = load.created_for_new_users(count, f"f{tag}")
    requests = signed_requests(env.secret, env.ids, bodies, port)
    progress(f"{label}: freshness, {count} events at {p.freshness_rate:.0f}/s")
    # One client process: at this rate the client's cost is small, and the poller shares it.
    loader = Load(
        port, requests, processes=1, threads=2, rate=p.freshness_rate, max_seconds=p.freshness_seconds * 3 + 5
    )
    cpu_before = {service.name: tree_cpu_seconds(service.pid) for service in services}
    began = time.perf_counter()
    seen, polls = poll_mirror(
        env, loader, users, services, timeout_s=p.freshness_seconds + p.freshness_timeout_s
    )
    result = loader.wait()
    elapsed = time.perf_counter() - began
    # CPUs used by each process tree meanwhile (1.0 = one CPU busy the whole time).
    cpu_share = {
        service.name: (tree_cpu_seconds(service.pid) - cpu_before[service.name]) / elapsed
        for service in services
    }
    latencies = sorted((seen[i] - result.sent_ns[i]) / 1e6 for i in seen if result.status[i])
    missing = count - len(seen)
    figures = {
        "offered_per_s": p.freshness_rate,
        "events": count,
        "acknowledged": result.ok_count(),
        "visible": len(seen),
        "missing": missing,
        "poll_interval_ms": POLL_INTERVAL_S * 1000,
        "polls": polls,
        **latency_summary(latencies),
        # Server-side cross-check, no poller involved: when the applying transaction started.
        "inbox_handled_minus_received": handled_minus_received(env),
        "cpu_share": cpu_share,
        "ack": latency_summary(result.latencies_ms(from_schedule=False)),
    }
    if missing:
        progress(f"{label}: {missing} events never became visible within {p.freshness_timeout_s:.0f} s")
        figures["p99_ms"] = None
    progress(f"{label}: freshness p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms")
    return figures


def poll_mirror(
    env: Env, loader: Load, users: Sequence[str], services: Sequence[Service], *, timeout_s: float
) -> tuple[dict[int, int], int]:
    """First time each user's membership is visible, by index; only scheduled, unseen ones are asked.

    The poller shares the CPUs with what it measures: it waits at least four times as long as
    its last query took, so that a system falling behind is not pushed further by the poller.
    """
    count = len(users)
    seen: dict[int, int] = {}
    due: list[int] = []
    scheduled = 0
    polls = 0
    deadline = loader.start_ns + int(timeout_s * 1e9)
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        while len(seen) < count and time.perf_counter_ns() < deadline:
            now = time.perf_counter_ns()
            while scheduled < count and loader.scheduled_ns(scheduled) <= now:
                due.append(scheduled)
                scheduled += 1
            pause = POLL_INTERVAL_S
            if due:
                asked = [users[i] for i in due]
                began = time.perf_counter_ns()
                rows = connection.execute("SELECT user_id FROM memberships WHERE user_id = ANY(%s)", (asked,))
                found = {user_id for (user_id,) in rows.fetchall()}
                stamp = time.perf_counter_ns()
                polls += 1
                for i in due:
                    if users[i] in found:
                        seen[i] = stamp
                due = [i for i in due if i not in seen]
                pause = max(pause, 4 * (stamp - began) / 1e9)
                if polls % 50 == 0:
                    for service in services:
                        service.sample_rss()
            time.sleep(pause)
    return seen, polls


def handled_minus_received(env: Env) -> dict[str, Any]:
    """From the inbox alone: received -> start of the applying task, and how many tasks applied them.

    ``handled_at`` is the ``now_ms`` of the task that applied a row, so rows sharing one are
    (nearly always) one transaction: their count tells the average batch the worker got.
    """
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT handled_at - received_at FROM inbox_events WHERE handled_at IS NOT NULL ORDER BY 1"
        ).fetchall()
        batches = connection.execute(
            "SELECT count(DISTINCT handled_at) FROM inbox_events WHERE handled_at IS NOT NULL"
        ).fetchone()
    summary: dict[str, Any] = latency_summary([float(row[0]) for row in rows])
    transactions = int(batches[0]) if batches else 0
    summary["apply_transactions"] = transactions
    summary["events_per_transaction"] = len(rows) / transactions if transactions else None
    return summary


def wait_visible(env: Env, users: Sequence[str], *, timeout: float, services: Sequence[Service]) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        while True:
            row = connection.execute(
                "SELECT count(*) FROM memberships WHERE user_id = ANY(%s)", (list(users),)
            ).fetchone()
            if row and row[0] >= len(users):
                return
            for service in services:
                service.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up events not visible after {timeout:.0f} s")
            time.sleep(0.05)


def bench_web(env: Env) -> dict[str, Any]:
    """Intake and freshness for orgsync (with a worker for freshness), then for the baseline."""
    out: dict[str, Any] = {}
    env.reset()
    port = free_port()
    with running(env.web(port)) as web:
        wait_http_ok(web, port)
        out["orgsync_intake"] = measure_intake(env, web, port, "orgsync intake")
        out["orgsync_intake_during_prune"] = measure_intake_during_prune(
            env, web, port, out["orgsync_intake"]["paced"]["p99_ms"]
        )
        # Freshness starts from an empty inbox and queue: the intake backlog is not its business.
        env.reset()
        with running(env.worker()) as worker:
            out["orgsync_freshness"] = measure_freshness(env, port, "orgsync", [web, worker])
            worker.sample_rss()
            out["orgsync_worker_rss"] = dict(worker.peak_rss)
        # The same with other pool sizes: mirror writes are serialised, so more processes do
        # not add throughput, only transactions.
        out["orgsync_freshness_by_concurrency"] = {}
        for concurrency in env.params.freshness_other_concurrency:
            env.reset()
            with running(env.worker(concurrency)) as worker:
                label = f"orgsync, worker --concurrency {concurrency}"
                out["orgsync_freshness_by_concurrency"][str(concurrency)] = measure_freshness(
                    env, port, label, [web, worker]
                )
        out["orgsync_web_rss"] = dict(web.peak_rss)
    env.reset()
    port = free_port()
    with running(env.baseline_web(port)) as web:
        wait_http_ok(web, port)
        out["baseline_intake"] = measure_intake(env, web, port, "baseline intake")
        out["baseline_freshness"] = measure_freshness(env, port, "baseline", [web])
        out["baseline_web_rss"] = dict(web.peak_rss)
    return out


def copy_inbox(env: Env, bodies: Sequence[str]) -> list[int]:
    """Bulk-load pending inbox rows as the web process would have stored them."""
    received = time.time_ns() // 1_000_000
    with psycopg.connect(env.pg_dsn) as connection:
        with (
            connection.cursor() as cursor,
            cursor.copy(
                "COPY inbox_events (svix_id, event_type, status, attempts, body, received_at) FROM STDIN"
            ) as copy,
        ):
            for body in bodies:
                event_type = json.loads(body)["type"]
                copy.write_row((env.ids.next(), event_type, "pending", 0, body, received))
        connection.commit()
        connection.execute("ANALYZE inbox_events")
        rows = connection.execute(
            "SELECT id FROM inbox_events WHERE status = 'pending' ORDER BY id"
        ).fetchall()
    return [int(row[0]) for row in rows]


def bench_apply(env: Env, profile_path: Path | None) -> dict[str, Any]:
    p = env.params
    settings = env.settings()
    engine = create_db_engine(env.database_url)
    factory = make_session_factory(engine)
    out: dict[str, Any] = {}
    try:
        env.reset()
        load = workload(env, 3)
        bodies = load.bodies(p.apply_events)
        sizes = [len(body.encode()) for body in bodies]
        out["body_bytes_mean"] = sum(sizes) / len(sizes)
        ids = copy_inbox(env, bodies)
        progress(
            f"apply: draining {len(ids)} inbox rows with apply_inbox, batches of {settings.apply_batch_size}"
        )
        profiler = cProfile.Profile() if profile_path else None
        applied = 0
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        for start in range(0, len(ids), settings.apply_batch_size):
            report = apply_inbox(
                factory,
                ids[start : start + settings.apply_batch_size],
                now_ms=time.time_ns() // 1_000_000,
                max_attempts=settings.max_attempts,
            )
            applied += report.applied
        elapsed = time.perf_counter() - started
        if profiler and profile_path:
            profiler.disable()
            profiler.dump_stats(str(profile_path))
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            progress(f"apply profile written to {profile_path}\n{text.getvalue()}")
        statuses = env.status_counts()
        out["orgsync"] = {
            "events": len(ids),
            "applied": applied,
            "statuses": statuses,
            "seconds": elapsed,
            "rate_per_s": applied / elapsed,
            "batch_size": settings.apply_batch_size,
        }
        progress(f"apply: {applied} events in {elapsed:.1f} s = {applied / elapsed:.0f}/s")

        env.reset()
        sample = bodies[: p.apply_baseline_events]
        progress(f"apply baseline: {len(sample)} events, one transaction each")
        started = time.perf_counter()
        for body in sample:
            event = parse_event(env.ids.next(), body)
            with session_scope(factory) as session:
                apply_events(session, [event], now_ms=time.time_ns() // 1_000_000)
        elapsed = time.perf_counter() - started
        out["baseline"] = {"events": len(sample), "seconds": elapsed, "rate_per_s": len(sample) / elapsed}
        progress(f"apply baseline: {len(sample) / elapsed:.0f}/s")
    finally:
        engine.dispose()
    out["celery"] = bench_apply_celery(env, bodies[: p.apply_celery_events], settings)
    out["processes"] = bench_apply_processes(env, bodies[: p.apply_process_events], settings)
    return out


def bench_apply_processes(env: Env, bodies: Sequence[str], settings: Settings) -> dict[str, Any]:
    """The same backlog drained by 1, then 2 worker processes, each from a fresh mirror."""
    out: dict[str, Any] = {}
    for processes in env.params.apply_processes:
        env.reset()
        ids = copy_inbox(env, bodies)
        progress(f"apply with {processes} worker process(es): {len(ids)} rows")
        result = drain_with_processes(
            env.database_url,
            ids,
            processes=processes,
            batch_size=settings.apply_batch_size,
            max_attempts=settings.max_attempts,
            timeout_s=env.params.apply_timeout_s,
        )
        result["statuses"] = env.status_counts()
        out[str(processes)] = result
        progress(
            f"apply with {processes} worker process(es): {result['rate_per_s']:.0f}/s, CPU per event "
            f"{result['worker_cpu_us_per_event']:.0f} us worker + "
            f"{result['postgres_cpu_us_per_event']:.0f} us PostgreSQL"
        )
    return out


def bench_apply_celery(env: Env, bodies: Sequence[str], settings: Settings) -> dict[str, Any]:
    """The same backlog drained by a real ``orgsync worker`` (prefork) fed through Redis."""
    env.reset()
    celery = create_celery(settings)
    send = make_sender(celery)
    out: dict[str, Any] = {}
    try:
        with running(env.worker()) as worker:
            # Warm-up: the worker is consuming once this one row is applied.
            warm = copy_inbox(env, bodies[:1])
            send(warm)
            wait_until(lambda: not env.any_pending(), env.params.apply_timeout_s, worker, "worker warm-up")
            ids = copy_inbox(env, bodies)
            progress(
                f"apply via Celery: {len(ids)} rows, tasks of {settings.apply_batch_size}, "
                f"{env.params.worker_concurrency} worker processes"
            )
            started = time.perf_counter()
            for start in range(0, len(ids), settings.apply_batch_size):
                send(ids[start : start + settings.apply_batch_size])

            def drained() -> bool:
                worker.sample_rss()
                return not env.any_pending()

            wait_until(drained, env.params.apply_timeout_s, worker, "the backlog drained", interval=0.25)
            elapsed = time.perf_counter() - started
            statuses = env.status_counts()
            applied = statuses.get("applied", 0) - len(warm)
            out = {
                "events": len(ids),
                "applied": applied,
                "statuses": statuses,
                "seconds": elapsed,
                "rate_per_s": applied / elapsed,
                "worker_processes": env.params.worker_concurrency,
                "rss": dict(worker.peak_rss),
            }
            progress(f"apply via Celery: {applied} events in {elapsed:.1f} s = {applied / elapsed:.0f}/s")
    finally:
        celery.close()
    return out
