"""The benchmark runs end to end in its quick form and reports every figure beside its baseline."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PG_ADMIN_DSN, PG_HOST_URL

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
# Only a guard against a hung run: nothing here depends on how fast it is.
RUN_LIMIT_S = 240

FIGURES_WITH_BASELINE = {
    "intake_rate",
    "intake_p50_ms",
    "intake_p99_ms",
    "intake_paced_rate",
    "intake_paced_p99_ms",
    "apply_rate",
    "apply_celery_rate",
    "freshness_p50_ms",
    "freshness_p99_ms",
    "web_rss_mb",
}
# The baseline handler has no worker process to weigh.
FIGURES_WITHOUT_BASELINE = {"worker_rss_mb"}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_benchmark_reports_every_figure(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    # pg_url and redis_url skip (or fail under CI=true) through conftest.unavailable when a
    # server is unreachable; the benchmark creates and drops a database of its own.
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--quick",
        "--out",
        str(out),
        "--pg-admin",
        PG_ADMIN_DSN,
        "--pg-url",
        PG_HOST_URL,
        "--redis-url",
        redis_url,
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ORGSYNC_", "CLERK_"))}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop its servers and drop its database.
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the quick benchmark did not finish within {RUN_LIMIT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]

    result = json.loads(out.read_text())
    assert result["quick"] is True
    machine = result["machine"]
    assert machine["nproc"] >= 1
    assert machine["python"]
    assert machine["postgres_version"]
    assert result["parameters"]["apply_events"] > 0

    figures = result["figures"]
    assert set(figures) == FIGURES_WITH_BASELINE | FIGURES_WITHOUT_BASELINE
    for name in FIGURES_WITH_BASELINE:
        entry = figures[name]
        assert _number(entry["orgsync"]), (name, entry)
        assert _number(entry["baseline"]), (name, entry)
        assert _number(entry["ratio"]), (name, entry)
        assert entry["better"] in {"higher", "lower"}
    for name in FIGURES_WITHOUT_BASELINE:
        assert _number(figures[name]["orgsync"]), name
        assert figures[name]["ratio"] is None
    for entry in figures.values():
        if entry["target"] is not None:
            assert isinstance(entry["met"], bool), entry

    raw = result["raw"]
    # Every event offered was acknowledged, and the apply runs applied the whole backlog.
    assert (
        raw["web"]["orgsync_intake"]["closed_loop"]["ok"]
        == raw["web"]["orgsync_intake"]["closed_loop"]["requests"]
    )
    assert raw["web"]["orgsync_freshness"]["missing"] == 0
    assert raw["apply"]["orgsync"]["applied"] == raw["apply"]["orgsync"]["events"]
    assert raw["apply"]["celery"]["applied"] == raw["apply"]["celery"]["events"]
    # The table is printed on stdout.
    assert "figure" in output
    assert "apply_rate" in output
