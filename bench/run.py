"""orgsync's benchmark: intake, apply and freshness on PostgreSQL + Redis, each beside a baseline.

    python bench/run.py [--quick] [--out bench/results/latest.json]

Every figure is measured in the same run for orgsync and for the baseline, "a plain handler
that verifies and writes each event inside the request" (bench/baseline_app.py; for apply,
one event per transaction), and printed as a ratio beside its target (bench/README.md).

* intake: ``orgsync serve`` (the real app under its embedded granian) and the baseline app
  under the same server settings, on free loopback ports; pre-signed ~1 KB membership events
  with unique svix ids, sent over keep-alive connections by a lean raw-socket client. First
  closed-loop (as fast as the server answers: the throughput), then paced at the target rate
  (the sustained p99, measured from each request's scheduled time so a server that falls
  behind is charged for it). The client runs on the same two cores as the servers.
* freshness: events offered at a fixed rate over HTTP with a real ``orgsync worker`` running;
  a poller reads the mirror every few milliseconds: latency = first seen - sent.
* apply: a backlog of membership events (many organizations and users; created, updated and
  deleted mixed) bulk-copied into the inbox, drained by ``worker.apply.apply_inbox`` in
  batches of ``apply_batch_size`` in this process, then by real Celery worker processes.
* memory: VmRSS (from /proc) of the web and worker processes after their load.
* reads (bench/reads.py, also runnable alone): permission checks from Python and over HTTP,
  pages of 100 memberships over HTTP, and intake beside a read load, with 100,000
  memberships in the mirror; the baseline is the emulator's Backend API asked the same.
* freshness elsewhere (bench/freshness.py): ``orgsync run`` on its embedded default (SQLite)
  at 100 events/s and its idle CPU; receive -> applied at 100 events/s for new organizations
  with no Clerk key, then with the Backend API down.
* notifications: apply with the change notification outbox on, beside the apply rate, and
  change events delivered per second to a loopback receiver (bench/notify.py).
* console: server time of the console's members page on a 10,000-member organization, beside
  the HTTP read API's for the same page (bench/console.py).

A fresh PostgreSQL database is created per run and dropped afterwards; the Redis database used
is flushed after the run; every process started is stopped with its process group. The pieces
live in bench/: workload.py, client.py, procs.py, phases.py and report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path; the bench package needs its parent.
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.console import bench_console, console_figures  # noqa: E402
from bench.freshness import QUICK_FRESHNESS, FreshnessParams, bench_freshness, freshness_figures  # noqa: E402
from bench.notify import bench_notify, notify_figures  # noqa: E402
from bench.phases import QUICK, Env, Params, bench_apply, bench_web  # noqa: E402
from bench.procs import (  # noqa: E402
    PG_ADMIN_DSN,
    PG_HOST_URL,
    fresh_database,
    new_secret,
    pick_redis_db,
    progress,
)
from bench.reads import QUICK_READS, ReadParams, bench_reads  # noqa: E402
from bench.report import build_figures, machine_info, render_table  # noqa: E402

DATABASE_PREFIX = "orgsync_bench"


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run of a few seconds (the smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--pg-admin", default=PG_ADMIN_DSN, help="libpq DSN of a database to create the run's in"
    )
    parser.add_argument(
        "--pg-url", default=PG_HOST_URL, help="SQLAlchemy URL of the server, without database"
    )
    parser.add_argument(
        "--redis-url", default=None, help="Redis database to use (flushed); default: an empty one"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile the in-process apply into this file"
    )
    parser.add_argument(
        "--prune-rows",
        type=int,
        default=None,
        help="old inbox rows pruned while intake is measured (default 1,000,000; --quick 2,000)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (printed path)")
    args = parser.parse_args(argv)
    # SIGTERM (a test's timeout, a CI cancel) must still run the clean-up below.
    signal.signal(signal.SIGTERM, _terminate)
    params: Params = QUICK if args.quick else Params()
    if args.prune_rows is not None:
        if args.prune_rows < 1:
            parser.error("--prune-rows must be at least 1")
        params = replace(params, prune_rows=args.prune_rows)
    began = time.time()

    data_dir = Path(tempfile.mkdtemp(prefix="orgsync-bench-"))
    broker_url = args.redis_url or pick_redis_db()
    try:
        with fresh_database(DATABASE_PREFIX, pg_admin=args.pg_admin, pg_url=args.pg_url) as database:
            assert database.dsn is not None
            progress(f"database {database.name}, broker {broker_url}, logs in {data_dir}")
            env = Env(database.url, database.dsn, broker_url, data_dir, new_secret(), params)
            machine = machine_info(database.dsn, broker_url)
            web = bench_web(env)
            apply = bench_apply(env, args.profile)
            read_params = QUICK_READS if args.quick else ReadParams()
            reads = bench_reads(env, read_params)
            fresh = bench_freshness(env, env.ids, QUICK_FRESHNESS if args.quick else FreshnessParams())
            figures = build_figures(web, apply, reads)
            figures.update(freshness_figures(fresh, figures["freshness_p99_ms"]["orgsync"]))
            notify = bench_notify(env)
            figures.update(notify_figures(notify))
            progress("console: members page of a 10,000-member organization beside the read API's")
            console = bench_console(
                database.url,
                data_dir,
                members=1_000 if args.quick else 10_000,
                requests=20 if args.quick else 200,
            )
            figures.update({entry["name"]: entry for entry in console_figures(console)})
            result = {
                "started_at": datetime.fromtimestamp(began, tz=UTC).isoformat(),
                "duration_s": time.time() - began,
                "quick": args.quick,
                "machine": machine,
                "parameters": {
                    **asdict(params),
                    "apply_batch_size": env.settings().apply_batch_size,
                    "body_bytes_mean": apply["body_bytes_mean"],
                    "client": "raw-socket HTTP/1.1 keep-alive client in "
                    f"{params.client_processes} processes x {params.client_threads} threads, "
                    "on the same machine",
                    "server": f"granian (WSGI), {params.web_workers} workers x {params.web_threads} "
                    "threads, for orgsync and the baseline alike",
                },
                "figures": figures,
                "raw": {
                    "web": web,
                    "apply": dict(apply),
                    "reads": reads,
                    "freshness": fresh,
                    "notify": notify,
                    "console": console,
                },
            }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(render_table(figures))
        print(
            f"\n{machine['nproc']} CPUs shared by the load client, the servers, PostgreSQL and Redis; "
            f"load average at start {', '.join(f'{v:.2f}' for v in machine['load_average_at_start'])}. "
            f"JSON: {args.out}"
        )
        return 0
    finally:
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(broker_url).flushdb()
        if args.keep_logs:
            progress(f"logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
