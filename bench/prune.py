"""Intake while a prune runs: paced intake p99 with ``orgsync prune`` deleting old inbox rows beside it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg

from bench.client import Load
from bench.procs import Service, progress
from bench.report import latency_summary
from bench.workload import signed_requests
from models.retention import DAY_MS

if TYPE_CHECKING:
    from bench.phases import Env

# Old enough for the default inbox window (30 days) whatever the settings' defaults become.
SEED_AGE_DAYS = 400
# A membership delivery as stored, with the personal fields redaction would mask.
SEED_BODY = json.dumps(
    {
        "type": "organizationMembership.updated",
        "object": "event",
        "instance_id": "ins_bench",
        "timestamp": 1_700_000_000_000,
        "data": {
            "object": "organization_membership",
            "id": "orgmem_bench",
            "role": "org:member",
            "organization": {"object": "organization", "id": "org_bench", "slug": "bench"},
            "public_user_data": {
                "user_id": "user_bench",
                "identifier": "someone@example.com",
                "first_name": "Some",
                "last_name": "One",
            },
            "created_at": 1_700_000_000_000,
            "updated_at": 1_700_000_000_000,
        },
    }
)


def seed_old_rows(env: Env, rows: int) -> None:
    """Bulk-load ``rows`` applied inbox rows past every retention window."""
    received = time.time_ns() // 1_000_000 - SEED_AGE_DAYS * DAY_MS
    tag = env.ids.tag
    with psycopg.connect(env.pg_dsn) as connection:
        with (
            connection.cursor() as cursor,
            cursor.copy(
                "COPY inbox_events (svix_id, event_type, status, attempts, body, received_at, handled_at) "
                "FROM STDIN"
            ) as copy,
        ):
            for n in range(rows):
                copy.write_row(
                    (
                        f"msg_old_{tag}{n:010d}",
                        "organizationMembership.updated",
                        "applied",
                        1,
                        SEED_BODY,
                        received,
                        received,
                    )
                )
        connection.commit()
        connection.execute("ANALYZE inbox_events")


def start_prune(env: Env) -> subprocess.Popen[str]:
    """``orgsync prune`` as an operator runs it: its own process, its own connection."""
    return subprocess.Popen(
        [sys.executable, "-m", "orgsync", "prune", "--json"],
        env=env.process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def measure_intake_during_prune(
    env: Env, service: Service, port: int, alone_p99_ms: float | None
) -> dict[str, Any]:
    """Paced intake for as long as a prune of ``params.prune_rows`` old rows runs (at least one round)."""
    p = env.params
    progress(f"intake during prune: seeding {p.prune_rows:,} old inbox rows")
    seed_old_rows(env, p.prune_rows)
    count = max(1, int(p.paced_rate * p.paced_seconds))
    latencies: list[float] = []
    sent = answered = unanswered = 0
    began = time.perf_counter()
    prune = start_prune(env)
    outcome: dict[str, Any] = {}

    def wait_prune() -> None:
        outcome["stdout"], _ = prune.communicate()
        outcome["ended"] = time.perf_counter()

    waiter = threading.Thread(target=wait_prune, name="prune-waiter", daemon=True)
    waiter.start()
    rounds = 0
    try:
        while True:
            rounds += 1
            # Signed per round: a long prune must not outlast Svix's timestamp tolerance.
            bodies = [SEED_BODY.replace("orgmem_bench", f"orgmem_{rounds}_{n}") for n in range(count)]
            requests = signed_requests(env.secret, env.ids, bodies, port)
            loader = Load(
                port,
                requests,
                processes=p.client_processes,
                threads=p.client_threads,
                rate=p.paced_rate,
                max_seconds=p.paced_seconds + 5,
            )
            result = loader.wait()
            ended = time.perf_counter_ns()
            latencies += result.latencies_ms(from_schedule=True)
            missing = [i for i, status in enumerate(result.status) if not status]
            latencies += [(ended - loader.scheduled_ns(i, loader.lanes)) / 1e6 for i in missing]
            sent += len(requests)
            answered += len(result.completed)
            unanswered += len(missing)
            service.check_alive()
            if not waiter.is_alive() or time.perf_counter() - began > p.prune_max_seconds:
                break
        waiter.join(timeout=p.prune_max_seconds)
    finally:
        if prune.poll() is None:
            prune.kill()
            prune.wait()
    if prune.returncode != 0 or "stdout" not in outcome:
        raise RuntimeError(f"orgsync prune did not finish (exit status {prune.returncode})")
    prune_s = outcome["ended"] - began
    output = outcome["stdout"]
    deleted = int(json.loads(output)["deleted"]["inbox_events"])
    summary = latency_summary(sorted(latencies))
    figures = {
        "prune_rows": p.prune_rows,
        "deleted": deleted,
        "prune_s": prune_s,
        "prune_rows_per_s": deleted / prune_s if prune_s > 0 else None,
        "rounds": rounds,
        "offered_per_s": p.paced_rate,
        "requests": sent,
        "completed": answered,
        "unanswered": unanswered,
        **summary,
        "alone_p99_ms": alone_p99_ms,
        "latencies_are_lower_bounds": bool(unanswered),
    }
    progress(
        f"intake during prune: {deleted:,} rows pruned in {prune_s:.1f} s; "
        f"paced p99 {summary['p99_ms'] or 0:.1f} ms (alone {alone_p99_ms or 0:.1f} ms)"
    )
    return figures
