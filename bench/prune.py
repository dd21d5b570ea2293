"""Intake while a prune runs: paced intake p99 with ``orgsync prune`` deleting old inbox rows beside it.

``bench/run.py`` measures it as one of its phases; on its own, with variants of the prune's
pacing compared in one run:

    python bench/prune.py --prune-rows 1000000 --rate 1000 --variant 0.5:2000:100000000 --variant ::
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

if __package__ in (None, ""):
    # Run as a script: the bench package needs the repository on the path.
    from pathlib import Path as _Path

    sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

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


def start_prune(env: Env, options: Sequence[str] = ()) -> subprocess.Popen[str]:
    """``orgsync prune`` as an operator runs it: its own process, its own connection."""
    return subprocess.Popen(
        [sys.executable, "-m", "orgsync", "prune", "--json", *options],
        env=env.process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _paced_rounds(
    env: Env, service: Service, port: int, *, more: Callable[[int, float], bool]
) -> dict[str, Any]:
    """Rounds of paced intake (``paced_rate`` for ``paced_seconds`` each) while ``more(rounds, elapsed)``."""
    p = env.params
    count = max(1, int(p.paced_rate * p.paced_seconds))
    latencies: list[float] = []
    sent = answered = unanswered = rounds = 0
    began = time.perf_counter()
    while True:
        rounds += 1
        # Signed per round: a long prune must not outlast Svix's timestamp tolerance.
        bodies = [
            SEED_BODY.replace("orgmem_bench", f"orgmem_{env.ids.tag}_{rounds}_{n}") for n in range(count)
        ]
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
        latencies += [(ended - loader.scheduled_ns(i)) / 1e6 for i in missing]
        sent += len(requests)
        answered += len(result.completed)
        unanswered += len(missing)
        service.check_alive()
        if not more(rounds, time.perf_counter() - began):
            break
    return {
        "rounds": rounds,
        "offered_per_s": p.paced_rate,
        "requests": sent,
        "completed": answered,
        "unanswered": unanswered,
        **latency_summary(sorted(latencies)),
        "latencies_are_lower_bounds": bool(unanswered),
    }


def settle(env: Env) -> None:
    """Make the seeded rows look old: vacuumed, analysed and written out, as rows of last month are.

    Straight after a bulk load, autovacuum's first pass over the new rows and the checkpoint
    writing them out would run during the measurement, and be charged to the prune.
    """
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        connection.execute("VACUUM (ANALYZE) inbox_events")
        connection.execute("CHECKPOINT")


def measure_intake_during_prune(
    env: Env, service: Service, port: int, alone_p99_ms: float | None, options: Sequence[str] = ()
) -> dict[str, Any]:
    """Paced intake for as long as a prune of ``params.prune_rows`` old rows runs (at least one round).

    ``options`` go to ``orgsync prune`` (``--duty``, ``--batch-size``); without them it runs
    with its defaults, as beat runs it.
    """
    p = env.params
    progress(f"intake during prune: seeding {p.prune_rows:,} old inbox rows")
    seed_old_rows(env, p.prune_rows)
    settle(env)
    began = time.perf_counter()
    prune = start_prune(env, options)
    outcome: dict[str, Any] = {}

    def wait_prune() -> None:
        outcome["stdout"], _ = prune.communicate()
        outcome["ended"] = time.perf_counter()

    waiter = threading.Thread(target=wait_prune, name="prune-waiter", daemon=True)
    waiter.start()
    try:
        paced = _paced_rounds(
            env,
            service,
            port,
            more=lambda _rounds, elapsed: waiter.is_alive() and elapsed < p.prune_max_seconds,
        )
        waiter.join(timeout=p.prune_max_seconds)
    finally:
        if prune.poll() is None:
            prune.kill()
            prune.wait()
    if prune.returncode != 0 or "stdout" not in outcome:
        raise RuntimeError(f"orgsync prune did not finish (exit status {prune.returncode})")
    prune_s = outcome["ended"] - began
    deleted = int(json.loads(outcome["stdout"])["deleted"]["inbox_events"])
    figures = {
        "prune_options": list(options),
        "prune_rows": p.prune_rows,
        "deleted": deleted,
        "prune_s": prune_s,
        "prune_rows_per_s": deleted / prune_s if prune_s > 0 else None,
        **paced,
        "alone_p99_ms": alone_p99_ms,
    }
    progress(
        f"intake during prune: {deleted:,} rows pruned in {prune_s:.1f} s; "
        f"paced p99 {paced['p99_ms'] or 0:.1f} ms (alone {alone_p99_ms or 0:.1f} ms)"
    )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """The prune phase on its own: paced intake alone, then beside ``orgsync prune``, same server.

    With ``--variant DUTY:BATCH:RATE`` (repeatable, empty parts for the defaults) each variant
    gets its own seeded rows and its own "alone" measurement just before it, so that variants
    are compared within one run, on a machine whose other load changes from minute to minute.
    """
    import argparse
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from bench.phases import QUICK, Env, Params
    from bench.procs import free_port, fresh_database, new_secret, pick_redis_db, running, wait_http_ok

    parser = argparse.ArgumentParser(description=(main.__doc__ or "").splitlines()[0])
    parser.add_argument("--prune-rows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=None, help="paced intake, requests/s (default 1,000)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="DUTY:BATCH:RATE",
        help="prune --duty, --batch-size and --rate ('' for the defaults)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis-url", default=None, help="Redis database to use; default: an empty one")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    params: Params = QUICK if args.quick else Params()
    params = replace(params, prune_rows=args.prune_rows)
    if args.rate is not None:
        params = replace(params, paced_rate=args.rate)
    variants: list[list[str]] = []
    for variant in args.variant or [""]:
        if not variant:
            variants.append([])
            continue
        duty, batch, rate = [*variant.split(":"), "", ""][:3]
        options = ["--duty", duty] if duty else []
        options += ["--batch-size", batch] if batch else []
        options += ["--rate", rate] if rate else []
        variants.append(options)
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="orgsync-bench-prune-") as data_dir,
        fresh_database("orgsync_bench") as database,
    ):
        assert database.dsn is not None
        broker = args.redis_url or pick_redis_db()
        env = Env(database.url, database.dsn, broker, Path(data_dir), new_secret(), params)
        port = free_port()
        with running(env.web(port)) as web:
            wait_http_ok(web, port)
            for options in variants:
                progress(f"intake alone: {params.paced_rate:g}/s for {2 * params.paced_seconds:g} s")
                alone = _paced_rounds(env, web, port, more=lambda rounds, _elapsed: rounds < 2)
                progress(f"intake alone: p99 {alone['p99_ms'] or 0:.1f} ms")
                during = measure_intake_during_prune(env, web, port, alone["p99_ms"], options)
                runs.append({"options": options, "alone": alone, "during_prune": during})
    text = json.dumps(runs, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
