"""Reconciliation benchmark: a full backfill from the emulator at Clerk's production and development budgets.

    python bench/reconcile.py [--orgs 1000] [--members 100] [--budgets production,development]
                              [--share 1.0] [--workers 8] [--database postgres|sqlite] [--out FILE]

For each budget (requests per 10 s: production 1000, development 100) the emulator runs in a
process of its own, seeded with ``--orgs`` organizations of ``--members`` members each (and
1 + members/10 pending invitations each), enforcing that budget itself; a fresh database is
migrated and ``worker.reconcile.run_reconcile`` backfills it through a limiter holding
``--share`` of the budget. Reported beside each run:

* the bound the budget sets: API calls made / calls allowed per second (``budget * share / 10``),
  and the run time as a ratio of it (the target: within 1.2x, bench/README.md);
* the mirror write rate: rows listed and written / seconds spent in mirror transactions;
* 429s met (the limiter keeps under the emulator's budget, so this should be 0).

A capacity run first (no budget anywhere) measures how many calls per second the emulator and
orgsync manage together: if that is not well above the production budget's rate, the emulator,
not the budget, bounds the production figure, and the output says so. The runs are
``bench.backfill.bench_reconcile``; PostgreSQL is the tests' server (``ORGSYNC_TEST_PG_ADMIN``,
``ORGSYNC_TEST_PG_URL`` override it, as for bench/run.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path; the bench package needs its parent.
sys.path.insert(0, str(ROOT))

from bench.backfill import BUDGETS, Params, bench_reconcile  # noqa: E402
from bench.report import render_reconcile  # noqa: E402


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
    print(render_reconcile(result))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
