"""The measurements of bench/reconcile.py: backfills from the emulator at Clerk's budgets, the write path."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select

from bench.procs import cpu_seconds, emulator_process, fresh_database, own_cpu_seconds, progress
from bench.workload import synthetic_memberships
from emulator import DEFAULT_SECRET_KEY
from models.db import create_db_engine, make_session_factory, session_scope
from models.events import MEMBERSHIPS
from models.reconcile import write_listing
from models.tables import ApiCall, Membership
from worker.clerk import ClerkClient
from worker.reconcile import CountingLimiter, Progress, run_reconcile

BUDGETS = {"production": 1000, "development": 100}
WINDOW_S = 10
DATABASE_PREFIX = "orgsync_bench_reconcile"
# The capacity run's "budget": far beyond anything the emulator can serve.
UNLIMITED = 1_000_000


@dataclass(frozen=True)
class Params:
    orgs: int = 1000
    members: int = 100
    share: float = 1.0
    workers: int = 8
    database: str = "postgres"


def one_run(params: Params, *, label: str, budget: int | None) -> dict[str, Any]:
    """A backfill at ``budget`` requests per 10 s (None: no budget, the capacity run)."""
    emulator_limit = budget if budget is not None else 0
    limiter_budget = budget if budget is not None else UNLIMITED
    share = params.share if budget is not None else 1.0
    progress(f"{label}: seeding {params.orgs} organizations x {params.members} members")
    emulator = emulator_process(orgs=params.orgs, members=params.members, rate_limit=emulator_limit)
    with emulator as (api_url, pid), fresh_database(DATABASE_PREFIX, kind=params.database) as database:
        engine = create_db_engine(database.url)
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
            cpu_before, emulator_before = own_cpu_seconds(), cpu_seconds(pid)
            result = run_reconcile(factory, client, workers=params.workers, on_progress=report)
            cpu_s, emulator_cpu_s = own_cpu_seconds() - cpu_before, cpu_seconds(pid) - emulator_before
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


def write_rate(params: Params, *, batch: int = 2000) -> dict[str, Any]:
    """The mirror write path alone (no API, no threads): listing batches inserted, then all newer."""
    results: dict[str, Any] = {"rows": params.orgs * params.members, "batch_rows": batch}
    with fresh_database(DATABASE_PREFIX, kind=params.database) as database:
        engine = create_db_engine(database.url)
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
