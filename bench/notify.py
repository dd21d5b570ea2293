"""Change notifications: their cost on apply, and how fast they reach a receiver.

    python bench/notify.py [--events 20000]    (bench/run.py runs it too, after the apply phase)

* apply with notifications: the same kind of membership backlog as the apply phase, drained by
  ``worker.apply.apply_inbox`` in this process with the outbox on (``models.notifications``
  reading each batch's rows before and after it writes, rendering and recording the changes);
  compared with the apply phase's rate (outbox off) for the overhead;
* delivery: the change events that backlog produced, delivered by ``worker.notify.drain`` to a
  loopback HTTP receiver in a process of its own (signed with svix, keep-alive connections,
  several organizations at once, each in order), as change events acknowledged per second.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path; the bench package needs its parent.
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.phases import Env, Params, copy_inbox, workload  # noqa: E402
from bench.procs import PG_ADMIN_DSN, PG_HOST_URL, fresh_database, new_secret, progress  # noqa: E402
from bench.report import figure, render_table  # noqa: E402
from models import notifications  # noqa: E402
from models.db import create_db_engine, make_session_factory  # noqa: E402
from models.tables import Base  # noqa: E402
from worker.apply import apply_inbox  # noqa: E402
from worker.notify import Sender, drain  # noqa: E402

# Enough change events for a steady rate, few enough to keep the phase short.
MAX_EVENTS = 20_000
DELIVERY_BUDGET_S = 600.0


def _receive(port: Synchronized[int], count: Synchronized[int]) -> None:
    """A receiver that answers 204 to everything and counts the requests (run in its own process)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver behind a proxy

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            with count.get_lock():
                count.value += 1
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port.value = server.server_address[1]
    server.serve_forever()


def _apply(factory: Any, ids: list[int], batch_size: int, max_attempts: int) -> dict[str, Any]:
    applied = 0
    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        report = apply_inbox(
            factory,
            ids[start : start + batch_size],
            now_ms=time.time_ns() // 1_000_000,
            max_attempts=max_attempts,
        )
        applied += report.applied
    seconds = time.perf_counter() - started
    return {"events": applied, "seconds": seconds, "rate_per_s": applied / seconds}


def _reset_tables(env: Env) -> None:
    """Empty every table (as ``Env.reset`` does, without the broker: nothing here uses it)."""
    names = ", ".join(table.name for table in reversed(Base.metadata.sorted_tables))
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {names} RESTART IDENTITY")
        connection.execute("VACUUM ANALYZE")


def _outbox_count(env: Env) -> int:
    with psycopg.connect(env.pg_dsn) as connection:
        row = connection.execute("SELECT count(*) FROM notifications").fetchone()
    return int(row[0]) if row else 0


def bench_notify(env: Env) -> dict[str, Any]:
    p = env.params
    settings = env.settings()
    events = min(p.apply_events, MAX_EVENTS)
    context = multiprocessing.get_context("spawn")
    port: Synchronized[int] = context.Value("i", 0)
    count: Synchronized[int] = context.Value("i", 0)
    receiver = context.Process(target=_receive, args=(port, count), daemon=True)
    receiver.start()
    engine = create_db_engine(env.database_url)
    factory = make_session_factory(engine)
    out: dict[str, Any] = {}
    try:
        bodies = workload(env, 3).bodies(events)
        for label, outbox in (("apply_plain", False), ("apply", True)):
            _reset_tables(env)
            ids = copy_inbox(env, bodies)
            progress(f"notify: applying {len(ids)} inbox rows, outbox {'on' if outbox else 'off'}")
            with notifications.configured(outbox=outbox):
                out[label] = _apply(factory, ids, settings.apply_batch_size, settings.max_attempts)
            progress(f"notify: {out[label]['events']} events applied = {out[label]['rate_per_s']:.0f}/s")
        changes = _outbox_count(env)
        out["apply"]["changes"] = changes
        progress(f"notify: {changes} change events in the outbox")

        deadline = time.monotonic() + 30
        while port.value == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if port.value == 0:
            raise RuntimeError("the notification receiver did not start")
        sender = Sender([f"http://127.0.0.1:{port.value}/hooks"], env.secret, timeout_s=10)
        try:
            started = time.perf_counter()
            result = drain(
                factory,
                sender,
                clock_ms=lambda: time.time_ns() // 1_000_000,
                dead_after_ms=10**12,
                retry_base_s=1.0,
                budget_s=DELIVERY_BUDGET_S,
            )
            deliver_s = time.perf_counter() - started
        finally:
            sender.close()
        out["delivery"] = {
            "changes": changes,
            "delivered": result.delivered,
            "failed": result.failed,
            "received": count.value,
            "organizations": len(result.keys),
            "seconds": deliver_s,
            "rate_per_s": result.delivered / deliver_s if deliver_s else 0.0,
        }
        progress(
            f"notify: {result.delivered} change events delivered in {deliver_s:.1f} s = "
            f"{out['delivery']['rate_per_s']:.0f}/s to a loopback receiver"
        )
    finally:
        engine.dispose()
        receiver.terminate()
        receiver.join(timeout=10)
    return out


def notify_figures(notify: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Figures beside the apply rate: the rate with notifications on, and delivered change events."""
    plain = notify["apply_plain"]["rate_per_s"]
    with_outbox = notify["apply"]["rate_per_s"]
    delivery = notify["delivery"]
    figures = [
        figure(
            "apply_with_notifications_rate",
            "events/s",
            with_outbox,
            None,
            better="higher",
            target=None,
            detail=f"{notify['apply']['events']} event backlog, apply_inbox in-process, outbox on; "
            f"{plain:,.0f}/s with it off on the same backlog ({100 * (with_outbox / plain - 1):+.0f}%)",
        ),
        figure(
            "notify_delivery_rate",
            "changes/s",
            delivery["rate_per_s"],
            None,
            better="higher",
            target=None,
            detail=f"{delivery['delivered']} change events (from {notify['apply']['events']} webhooks) "
            f"over {delivery['organizations']} ordering keys, signed, to one loopback receiver",
        ),
    ]
    return {entry["name"]: entry for entry in figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="orgsync's change notification benchmark on its own")
    parser.add_argument("--events", type=int, default=MAX_EVENTS, help="membership webhooks in the backlog")
    parser.add_argument("--out", type=Path, default=None, help="write the raw figures here as JSON")
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be at least 1")
    data_dir = Path(tempfile.mkdtemp(prefix="orgsync-bench-notify-"))
    # Settings need a broker URL; this phase never connects to it (no worker, no tasks).
    broker_url = "redis://127.0.0.1:6379/0"
    try:
        with fresh_database("orgsync_bench_notify", pg_admin=PG_ADMIN_DSN, pg_url=PG_HOST_URL) as database:
            assert database.dsn is not None
            params = replace(Params(), apply_events=args.events)
            env = Env(database.url, database.dsn, broker_url, data_dir, new_secret(), params)
            notify = bench_notify(env)
        figures = notify_figures(notify)
        print(render_table(figures))
        if args.out is not None:
            args.out.write_text(json.dumps({"figures": figures, "raw": notify}, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
