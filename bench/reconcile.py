"""Reconciliation benchmark: a full backfill from the emulator at Clerk's production and development budgets.

    python bench/reconcile.py [--orgs 1000] [--members 100] [--budgets production,development]
                              [--share 1.0] [--workers 8] [--database postgres|sqlite] [--out FILE]

For each budget (requests per 10 s: production 1000, development 100) the emulator runs in a
process of its own, seeded with ``--orgs`` organizations of ``--members`` members each (and
1 + members/10 pending invitations each), enforcing that budget itself; a fresh database is
migrated and ``worker.reconcile.run_reconcile`` backfills it through a limiter holding
``--share`` of the budget. Reported beside each run:

* the bound the budget sets: API calls made / calls allowed per second (``budget * share / 10``),
  and the run time as a ratio of it (design.md's target: within 1.2x);
* the mirror write rate: rows listed and written / seconds spent in mirror transactions;
* 429s met (the limiter keeps under the emulator's budget, so this should be 0).

A capacity run first (no budget anywhere) measures how many calls per second the emulator and
orgsync manage together: if that is not well above the production budget's rate, the emulator,
not the budget, bounds the production figure, and the output says so.

``bench_reconcile(...)`` is the same as a function, for bench/run.py to call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from emulator import DEFAULT_SECRET_KEY  # noqa: E402
from models.db import create_db_engine, make_session_factory, session_scope  # noqa: E402
from models.events import MEMBERSHIPS  # noqa: E402
from models.migrate import upgrade  # noqa: E402
from models.reconcile import write_listing  # noqa: E402
from models.tables import ApiCall, Membership  # noqa: E402
from worker.clerk import ClerkClient  # noqa: E402
from worker.reconcile import CountingLimiter, Progress, run_reconcile  # noqa: E402

BUDGETS = {"production": 1000, "development": 100}
WINDOW_S = 10
PG_URL = os.environ.get("ORGSYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
PG_ADMIN = os.environ.get(
    "ORGSYNC_TEST_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
START_BOUND_S = 300.0
LISTENING = re.compile(r"Backend API: (\S+)\)")
# The capacity run's "budget": far beyond anything the emulator can serve.
UNLIMITED = 1_000_000


@dataclass(frozen=True)
class Params:
    orgs: int = 1000
    members: int = 100
    share: float = 1.0
    workers: int = 8
    database: str = "postgres"


def progress(message: str) -> None:
    print(f"[bench-reconcile] {message}", file=sys.stderr, flush=True)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def emulator(params: Params, rate_limit: int) -> Iterator[tuple[str, int]]:
    """The emulator in its own process (its HTTP server must not share our GIL): (API URL, pid)."""
    command = [
        sys.executable, "-m", "orgsync", "emulator", "--port", "0", "--seed", "1",
        "--seed-orgs", str(params.orgs), "--seed-members", str(params.members),
        "--rate-limit", str(rate_limit),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + START_BOUND_S
        assert process.stdout is not None
        while True:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise RuntimeError(f"the emulator exited with {process.returncode}")
            found = LISTENING.search(line)
            if found:
                yield found.group(1), process.pid
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the emulator did not start in time")
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def database(kind: str) -> Iterator[str]:
    """A fresh, migrated database (PostgreSQL created and dropped here, or a SQLite file)."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="orgsync-bench-reconcile-") as directory:
            url = f"sqlite:///{directory}/orgsync.db"
            upgrade(url)
            yield url
        return
    name = f"orgsync_bench_reconcile_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = f"{PG_URL.rstrip('/')}/{name}"
            upgrade(url)
            yield url
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def one_run(params: Params, *, label: str, budget: int | None) -> dict[str, Any]:
    """A backfill at ``budget`` requests per 10 s (None: no budget, the capacity run)."""
    emulator_limit = budget if budget is not None else 0
    limiter_budget = budget if budget is not None else UNLIMITED
    share = params.share if budget is not None else 1.0
    progress(f"{label}: seeding {params.orgs} organizations x {params.members} members")
    with emulator(params, emulator_limit) as (api_url, pid), database(params.database) as url:
        engine = create_db_engine(url)
        try:
            factory = make_session_factory(engine)
            limiter = CountingLimiter(
                "memory://", limiter_budget, 10, share=share, namespace=f"bench{uuid.uuid4().hex[:8]}"
            )
            client = ClerkClient(
                secret_key=DEFAULT_SECRET_KEY, api_url=api_url, timeout=30.0, limiter=limiter
            )
            last = [0.0]

            def report(p: Progress) -> None:
                if time.monotonic() - last[0] >= 10:
                    last[0] = time.monotonic()
                    progress(
                        f"{label}: {p.organizations_done}/{p.organizations_total} orgs, {p.api_calls} calls, "
                        f"{p.elapsed_s:.0f} s"
                    )

            progress(f"{label}: reconciling")
            cpu_before, emulator_before = own_cpu_s(), process_cpu_s(pid)
            result = run_reconcile(factory, client, workers=params.workers, on_progress=report)
            cpu_s, emulator_cpu_s = own_cpu_s() - cpu_before, process_cpu_s(pid) - emulator_before
            client.close()
            with session_scope(factory) as session:
                members = session.scalar(select(func.count()).select_from(Membership)) or 0
                refused = session.scalar(select(func.count()).where(ApiCall.status_code == 429)) or 0
        finally:
            engine.dispose()
    if result.status != "completed":
        raise RuntimeError(f"{label}: the run ended {result.status}: {result.error}")
    if members != params.orgs * params.members:
        raise RuntimeError(
            f"{label}: {members} memberships mirrored, expected {params.orgs * params.members}"
        )
    figures: dict[str, Any] = {
        "label": label,
        "budget_per_10s": budget,
        "share": share,
        "run_s": round(result.elapsed_s, 2),
        "api_calls": result.api_calls,
        "calls_per_s": round(result.api_calls / result.elapsed_s, 1),
        "rows": result.rows,
        "write_s": round(result.write_s, 2),
        "write_rows_per_s": round(result.rows / result.write_s) if result.write_s else None,
        "rate_limit_waits": result.rate_limit_waits,
        "http_429": refused,
        "drift_total": result.drift.total,
        # CPU seconds over the run: a process near 1 CPU-second per second is saturated
        # (orgsync's Python threads share one interpreter lock).
        "orgsync_cpu_s": round(cpu_s, 2),
        "emulator_cpu_s": round(emulator_cpu_s, 2),
    }
    if budget is not None:
        allowed_per_s = budget * share / WINDOW_S
        bound = result.api_calls / allowed_per_s
        # A moving window lets the first window's worth go at once: the strict lower bound.
        windows = max(0, math.ceil(result.api_calls / max(1, math.floor(budget * share))) - 1) * WINDOW_S
        figures.update(
            allowed_calls_per_s=allowed_per_s,
            bound_s=round(bound, 2),
            burst_bound_s=windows,
            ratio_to_bound=round(result.elapsed_s / bound, 3),
        )
    progress(f"{label}: {figures}")
    return figures


def synthetic_memberships(orgs: int, members: int, *, updated_at: int) -> list[dict[str, Any]]:
    """API-shaped memberships, as a listing returns them."""
    return [
        {
            "object": "organization_membership",
            "id": f"orgmem_{n}_{m}",
            "role": "org:member",
            "role_name": "Member",
            "permissions": ["org:sys_memberships:read"],
            "public_metadata": {"n": m},
            "private_metadata": {},
            "organization": {"object": "organization", "id": f"org_{n}"},
            "public_user_data": {"user_id": f"user_{n}_{m}", "identifier": f"u{n}.{m}@example.com"},
            "created_at": 1_700_000_000_000,
            "updated_at": updated_at,
        }
        for n in range(orgs)
        for m in range(members)
    ]


def write_rate(params: Params, *, batch: int = 2000) -> dict[str, Any]:
    """The mirror write path alone (no API, no threads): listing batches inserted, then all newer."""
    results: dict[str, Any] = {"rows": params.orgs * params.members, "batch_rows": batch}
    with database(params.database) as url:
        engine = create_db_engine(url)
        try:
            factory = make_session_factory(engine)
            for phase, updated_at in (("insert", 1_700_000_000_000), ("update", 1_700_000_000_001)):
                items = synthetic_memberships(params.orgs, params.members, updated_at=updated_at)
                began = time.monotonic()
                for start in range(0, len(items), batch):
                    with session_scope(factory) as session:
                        write_listing(session, MEMBERSHIPS, items[start : start + batch], now_ms=updated_at)
                elapsed = time.monotonic() - began
                results[f"{phase}_rows_per_s"] = round(len(items) / elapsed)
        finally:
            engine.dispose()
    progress(f"mirror write path alone: {results}")
    return results


def bench_reconcile(
    params: Params, budgets: tuple[str, ...] = ("production", "development"), *, capacity: bool = True
) -> dict[str, Any]:
    """Every run's figures, and whether the emulator bounds the production figure."""
    runs: list[dict[str, Any]] = []
    capacity_rate: float | None = None
    if capacity:
        unlimited = one_run(params, label="capacity (no budget)", budget=None)
        runs.append(unlimited)
        capacity_rate = float(unlimited["calls_per_s"])
    for name in budgets:
        runs.append(one_run(params, label=name, budget=BUDGETS[name]))
    notes: list[str] = []
    if capacity_rate is not None:
        production_rate = BUDGETS["production"] * params.share / WINDOW_S
        if capacity_rate < 1.2 * production_rate:
            unlimited = runs[0]
            ours = unlimited["orgsync_cpu_s"] / unlimited["run_s"]
            theirs = unlimited["emulator_cpu_s"] / unlimited["run_s"]
            busiest = "orgsync" if ours >= theirs else "the emulator"
            notes.append(
                f"without any budget the emulator and orgsync manage {capacity_rate:.0f} calls/s, under "
                f"1.2x the production budget's {production_rate:.0f}/s: the production figure is bound by "
                f"CPU, not by the budget; {busiest} is the busier (orgsync {ours:.2f}, emulator "
                f"{theirs:.2f} CPU-seconds per second)"
            )
        else:
            notes.append(
                f"capacity {capacity_rate:.0f} calls/s is {capacity_rate / production_rate:.1f}x the "
                f"production budget's {production_rate:.0f}/s: the budget, not the emulator, bounds the runs"
            )
    result_write = write_rate(params)
    full = params.orgs == 1000 and params.members == 100
    if not full:
        notes.append(
            f"scaled run: {params.orgs} organizations x {params.members} members instead of 1,000 x 100; "
            "API calls scale with organizations (2 per organization below 500 members), so run times "
            "scale by the same factor"
        )
    return {
        "parameters": asdict(params),
        "budgets": list(budgets),
        "runs": runs,
        "mirror_write_path": result_write,
        "notes": notes,
    }


def render(result: dict[str, Any]) -> str:
    header = (
        f"{'run':<22} {'calls':>6} {'run s':>8} {'bound s':>8} {'ratio':>6} "
        f"{'calls/s':>8} {'rows':>8} {'write s':>8} {'rows/s':>8} {'429s':>5} {'cpu s':>6} {'emu cpu':>7}"
    )
    lines = [header]
    for run in result["runs"]:
        lines.append(
            f"{run['label']:<22} {run['api_calls']:>6} {run['run_s']:>8} {run.get('bound_s', '-')!s:>8} "
            f"{run.get('ratio_to_bound', '-')!s:>6} {run['calls_per_s']:>8} {run['rows']:>8} "
            f"{run['write_s']:>8} {run['write_rows_per_s']!s:>8} {run['http_429']:>5} "
            f"{run['orgsync_cpu_s']:>6} {run['emulator_cpu_s']:>7}"
        )
    write = result["mirror_write_path"]
    lines.append(
        f"mirror write path alone ({write['rows']} memberships, {write['batch_rows']} a transaction): "
        f"{write['insert_rows_per_s']} rows/s inserted, {write['update_rows_per_s']} rows/s updated"
    )
    lines.extend(f"note: {note}" for note in result["notes"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument(
        "--budgets", default="production,development", help="comma-separated: production, development"
    )
    parser.add_argument("--share", type=float, default=1.0, help="reconciliation's share of the budget")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--no-capacity", action="store_true", help="skip the run without any budget")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reconcile.json")
    args = parser.parse_args(argv)
    budgets = tuple(name.strip() for name in args.budgets.split(",") if name.strip())
    unknown = set(budgets) - set(BUDGETS)
    if unknown:
        parser.error(f"unknown budgets: {', '.join(sorted(unknown))}")
    params = Params(args.orgs, args.members, args.share, args.workers, args.database)
    result = bench_reconcile(params, budgets, capacity=not args.no_capacity)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
