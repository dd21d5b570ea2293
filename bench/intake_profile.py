"""Where an intake request's CPU goes: the web app called in-process, thread by thread, step by step.

    python bench/intake_profile.py [--requests 3000] [--concurrency 4] [--profile /tmp/intake.prof]

Builds the web app exactly as a web worker does (``orgsync.wsgi.build_web_app``: the
engine with its bounds, the Celery sender, the dispatcher), on a fresh PostgreSQL database,
and calls it as a WSGI server would, from ``--concurrency`` threads, with signed membership
events from ``bench.workload``. It prints the CPU per request of each thread kind (request
threads, the inbox committer, the dispatcher, the database deadline watchdog), and a
cProfile of the request and committer threads summed by step. The HTTP server's own share
is not here: ``bench/run.py`` measures the whole server, and the difference is the server's.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.procs import Stack, fresh_database, new_secret, pick_redis_db  # noqa: E402
from bench.workload import MessageIds, Workload, signed_requests  # noqa: E402

# Steps, by the first matching file path fragment of a profiled function (innermost wins).
STEPS = (
    ("svix signature check", ("svix/", "standardwebhooks/", "hmac.py", "webhooks/verify.py")),
    ("envelope parse and classify", ("json/", "models/inbox.py:_classify", "models/events.py")),
    ("psycopg: parameters, protocol, wait", ("psycopg/",)),
    ("SQLAlchemy: pool, connection, statement", ("sqlalchemy/",)),
    ("deadline watchdog arm/disarm", ("models/db.py",)),
    ("Flask/werkzeug: context, routing, objects", ("flask/", "werkzeug/")),
    ("thread hand-offs (locks, conditions)", ("threading.py", "_thread", "queue.py")),
    ("logging", ("logging/",)),
)


def _environ(raw: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().upper().replace("-", "_")
        if key in {"CONTENT_TYPE", "CONTENT_LENGTH"}:
            environ[key] = value.strip()
        else:
            environ["HTTP_" + key] = value.strip()
    return environ, body


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process, by native thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def _step_of(path: str, function: str) -> str:
    where = f"{path}:{function}"
    for step, fragments in STEPS:
        if any(fragment in where for fragment in fragments):
            return step
    return "the rest (orgsync's own code, builtins)"


def steps_of(stats: pstats.Stats, requests: int) -> list[tuple[str, float]]:
    """Own time (tottime) of every function summed by step, in ms per request."""
    totals: dict[str, float] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (path, _line, function), (_cc, _nc, tottime, _cumtime, _callers) in raw.items():
        step = _step_of(path, function)
        totals[step] = totals.get(step, 0.0) + tottime
    return sorted(
        ((step, 1000 * seconds / requests) for step, seconds in totals.items()), key=lambda x: -x[1]
    )


def run(requests: int, concurrency: int, profile_path: Path | None) -> None:
    with fresh_database("orgsync_intake_profile") as database:
        broker = pick_redis_db()
        stack = Stack(database.url, database.dsn or "", broker, Path("/tmp"), new_secret())
        try:
            _measure(stack, requests, concurrency, profile_path)
        finally:
            redis.Redis.from_url(broker).flushdb()


def _measure(stack: Stack, requests: int, concurrency: int, profile_path: Path | None) -> None:
    from orgsync.wsgi import build_web_app

    app = build_web_app(stack.settings())
    load = Workload(random.Random(11), 2_000, 40_000, time.time_ns() // 1_000_000 - 86_400_000)
    calls = [
        _environ(raw)
        for raw in signed_requests(stack.secret, MessageIds(), load.bodies(requests + 200), 8000)
    ]

    def call(environ: dict[str, Any], body: bytes) -> None:
        environ = dict(environ, **{"wsgi.input": io.BytesIO(body)})
        statuses: list[str] = []

        def start_response(status: str, _headers: Sequence[tuple[str, str]], _exc: Any = None) -> None:
            statuses.append(status)

        b"".join(app(environ, start_response))
        if not statuses[0].startswith("200"):
            raise RuntimeError(f"unexpected answer {statuses[0]}")

    for environ, body in calls[:200]:
        call(environ, body)
    work = calls[200:]
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def lane(part: list[tuple[dict[str, Any], bytes]], wrap: Callable[[Callable[[], None]], None]) -> None:
        def go() -> None:
            for environ, body in part:
                call(environ, body)

        wrap(go)

    def profiled(fn: Callable[[], None]) -> None:
        profiler = cProfile.Profile(time.thread_time)
        profiler.runcall(fn)
        with lock:
            profilers.append(profiler)

    def plain(fn: Callable[[], None]) -> None:
        fn()

    wrap = profiled if profile_path else plain
    committer_profile = _profile_committer() if profile_path else None
    batch_sizes = _count_batches()
    native: list[int] = []
    spent: list[float] = []
    parts = [work[i::concurrency] for i in range(concurrency)]

    def start_lane(part: list[tuple[dict[str, Any], bytes]]) -> None:
        native.append(threading.get_native_id())
        began = time.thread_time()
        lane(part, wrap)
        spent.append(time.thread_time() - began)

    threads = [threading.Thread(target=start_lane, args=(part,)) for part in parts]
    load_before = os.getloadavg()[0]
    del batch_sizes[:]
    before = _thread_cpu()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    after = _thread_cpu()
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    count = len(work)
    request_cpu = sum(spent)
    print(
        f"{count} requests from {concurrency} threads in {elapsed:.1f} s ({count / elapsed:.0f}/s), "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    if batch_sizes:
        print(f"  {len(batch_sizes)} inbox commits, {sum(batch_sizes) / len(batch_sizes):.2f} rows each")
    print(f"  request threads: {1000 * request_cpu / count:.3f} ms CPU per request")
    for tid, cpu in sorted(after.items()):
        if tid in native or tid == threading.main_thread().native_id:
            continue
        spent = cpu - before.get(tid, 0.0)
        if spent > 0:
            print(f"  {names.get(tid, f'thread {tid}')}: {1000 * spent / count:.3f} ms CPU per request")
    if profile_path and profilers:
        stats = pstats.Stats(profilers[0])
        for profiler in profilers[1:]:
            stats.add(profiler)
        stats.dump_stats(str(profile_path))
        print("request threads under cProfile (inflates every figure; read the shares):")
        _print_steps(steps_of(stats, count))
    if committer_profile is not None:
        print("committer thread under cProfile:")
        _print_steps(steps_of(pstats.Stats(committer_profile), count))


def _print_steps(steps: list[tuple[str, float]]) -> None:
    total = sum(ms for _, ms in steps) or 1.0
    for step, ms in steps:
        print(f"  {step:<45} {ms:6.3f} ms  {100 * ms / total:4.0f} %")


def _count_batches() -> list[int]:
    """The size of each batch the inbox committer stores, appended as it stores them."""
    sizes: list[int] = []
    try:
        from webhooks import committer
    except ImportError:
        return sizes
    original = committer.GroupCommitter._commit

    def _commit(self: Any, batch: Any) -> None:
        sizes.append(len(batch))
        original(self, batch)

    committer.GroupCommitter._commit = _commit  # type: ignore[method-assign]
    return sizes


def _profile_committer() -> cProfile.Profile | None:
    """Profile each batch the inbox committer stores (None where the code has no committer)."""
    try:
        from webhooks import committer
    except ImportError:
        return None
    profiler = cProfile.Profile(time.thread_time)
    original = committer.GroupCommitter._commit

    def _commit(self: Any, batch: Any) -> None:
        profiler.enable()
        try:
            original(self, batch)
        finally:
            profiler.disable()

    committer.GroupCommitter._commit = _commit  # type: ignore[method-assign]
    return profiler


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile the request threads into this file"
    )
    args = parser.parse_args()
    run(args.requests, args.concurrency, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
