"""Apply throughput by number of worker processes, with the CPU each side spends.

    python bench/apply_workers.py [--events 20000] [--processes 1 2] [--profile FILE]

A backlog of membership events is bulk-copied into the inbox as ``pending`` and drained by
``processes`` plain OS processes, each calling ``worker.apply.apply_inbox`` on batches of
``apply_batch_size`` ids taken from one shared queue (what Celery's prefork pool does with
tasks, without the broker round trips, so the figure is the mirror's own scaling). Each
process reports its own CPU time and that of the PostgreSQL backends it used, so the figure
holds on a busy machine too: events per CPU-second does not depend on who else runs.

``bench/run.py`` runs this beside its other apply figures (``apply_rate_1_process`` and
``apply_rate_2_processes``); run alone it is the quick loop for apply's performance work.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import queue
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from sqlalchemy import event, text  # noqa: E402

from bench.procs import cpu_seconds, fresh_database, new_secret, own_cpu_seconds, pick_redis_db, progress  # noqa: E402

_STOP = None


def _drain(
    database_url: str,
    batches: multiprocessing.Queue[list[int] | None],
    results: multiprocessing.Queue[dict[str, Any]],
    max_attempts: int,
    profile_path: str | None,
) -> None:
    """One worker process: apply batches until the queue says stop; report CPU and counts."""
    import worker.apply
    from models.db import create_db_engine, make_session_factory
    from models.mirror import lock_for_events
    from worker.apply import apply_inbox

    # Time spent taking mirror locks (waiting for other processes among it), and events left
    # for a second transaction because another process held their organization.
    waits = {"lock_s": 0.0, "deferred": 0, "locked_events": 0}

    def timed_lock(session: Any, events: Any, *, wait: bool = True) -> Any:
        began = time.perf_counter()
        lock, covered = lock_for_events(session, events, wait=wait)
        waits["lock_s"] += time.perf_counter() - began
        waits["locked_events"] += len(events)
        waits["deferred"] += len(events) - len(covered)
        return lock, covered

    worker.apply.lock_for_events = timed_lock  # type: ignore[assignment]

    engine = create_db_engine(database_url)
    backends: set[int] = set()

    @event.listens_for(engine, "connect")
    def _remember(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        backends.add(int(cursor.fetchone()[0]))
        cursor.close()

    factory = make_session_factory(engine)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    backend_cpu_before = {pid: cpu_seconds(pid) for pid in backends}
    cpu_before = own_cpu_seconds()
    profiler = cProfile.Profile() if profile_path else None
    applied = transactions = 0
    if profiler:
        profiler.enable()
    while True:
        ids = batches.get()
        if ids is _STOP:
            break
        report = apply_inbox(factory, ids, now_ms=time.time_ns() // 1_000_000, max_attempts=max_attempts)
        applied += report.applied
        transactions += 1
    if profiler and profile_path:
        profiler.disable()
        profiler.dump_stats(profile_path)
    backend_cpu = sum(cpu_seconds(pid) - backend_cpu_before.get(pid, 0.0) for pid in backends)
    results.put(
        {
            "applied": applied,
            "tasks": transactions,
            "cpu_s": own_cpu_seconds() - cpu_before,
            "postgres_cpu_s": backend_cpu,
            **waits,
        }
    )
    engine.dispose()


def drain_with_processes(
    database_url: str,
    ids: Sequence[int],
    *,
    processes: int,
    batch_size: int,
    max_attempts: int,
    profile_path: Path | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Drain ``ids`` with ``processes`` worker processes; wall time, rate and CPU per event."""
    context = multiprocessing.get_context("spawn")
    batches: multiprocessing.Queue[list[int] | None] = context.Queue()
    results: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    for start in range(0, len(ids), batch_size):
        batches.put(list(ids[start : start + batch_size]))
    for _ in range(processes):
        batches.put(_STOP)
    workers = [
        context.Process(
            target=_drain,
            args=(
                database_url,
                batches,
                results,
                max_attempts,
                str(profile_path) if profile_path and n == 0 else None,
            ),
            daemon=True,
        )
        for n in range(processes)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    reports: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(reports) < processes:
            try:
                reports.append(results.get(timeout=1.0))
            except queue.Empty:
                if time.monotonic() > deadline or not any(w.is_alive() for w in workers):
                    raise RuntimeError(f"apply workers did not finish ({len(reports)}/{processes})") from None
        elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    applied = sum(r["applied"] for r in reports)
    cpu = sum(r["cpu_s"] for r in reports)
    pg_cpu = sum(r["postgres_cpu_s"] for r in reports)
    return {
        "processes": processes,
        "events": len(ids),
        "applied": applied,
        "seconds": elapsed,
        "rate_per_s": applied / elapsed,
        "worker_cpu_s": cpu,
        "postgres_cpu_s": pg_cpu,
        "worker_cpu_us_per_event": 1e6 * cpu / max(1, applied),
        "postgres_cpu_us_per_event": 1e6 * pg_cpu / max(1, applied),
        "lock_s": sum(r["lock_s"] for r in reports),
        "deferred_events": sum(r["deferred"] for r in reports),
        "per_process": reports,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from bench.phases import Env, Params, copy_inbox, workload

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each process count, alternated")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the first process of each run")
    args = parser.parse_args(argv)
    with fresh_database("orgsync_bench_apply") as database:
        assert database.dsn is not None
        env = Env(database.url, database.dsn, pick_redis_db(), Path("/tmp"), new_secret(), Params())
        settings = env.settings()
        bodies = workload(env, 3).bodies(args.events)
        for _ in range(args.repeat):
            for processes in args.processes:
                env.reset()
                ids = copy_inbox(env, bodies)
                result = drain_with_processes(
                    database.url,
                    ids,
                    processes=processes,
                    batch_size=settings.apply_batch_size,
                    max_attempts=settings.max_attempts,
                    profile_path=args.profile,
                )
                pending = env.status_counts().get("pending", 0)
                progress(
                    f"{processes} process(es): {result['applied']} events in {result['seconds']:.2f} s = "
                    f"{result['rate_per_s']:.0f}/s; CPU per event: "
                    f"worker {result['worker_cpu_us_per_event']:.0f} us, "
                    f"PostgreSQL {result['postgres_cpu_us_per_event']:.0f} us; pending left {pending}; "
                    f"{result['lock_s']:.2f} s taking locks, {result['deferred_events']} events deferred"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
