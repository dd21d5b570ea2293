"""ops/: the alert rules, the Prometheus config and the Grafana dashboard use only what orgsync exports.

``promtool`` (Debian's ``prometheus`` package) checks the rules and the config when it is
installed; without it those checks skip and the rest still runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, text

from models import metrics
from models.metrics_db import DatabaseCollector

OPS = Path(__file__).resolve().parent.parent / "ops"
ALERTS = OPS / "prometheus-alerts.yml"
CONFIG = OPS / "prometheus.yml"
DASHBOARD = OPS / "grafana-dashboard.json"
# Series Prometheus itself makes for every target.
PROMETHEUS_OWN = {"up"}
_NAME = re.compile(r"\b(orgsync_[a-z0-9_]+|up)\b")


def _series_names(family: Any) -> set[str]:
    kind, name = family.type, family.name
    if kind == "counter":
        return {f"{name}_total", f"{name}_created"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    return {name}


@pytest.fixture
def exported(sqlite_engine: Engine) -> set[str]:
    """Every series name orgsync can export: its instruments and its database gauges."""
    with sqlite_engine.begin() as connection:
        # The notification gauge appears once the outbox exists (the collector's hook).
        connection.execute(text("CREATE TABLE outbox (id INTEGER PRIMARY KEY, state TEXT)"))
    names: set[str] = set()
    for family in metrics.instruments().registry.collect():
        names |= _series_names(family)
    for family in DatabaseCollector(sqlite_engine).collect():
        names |= _series_names(family)
    assert "orgsync_notifications" in names
    return names


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_names_only_exported_series(exported: set[str]) -> None:
    rules = _rules()
    assert rules
    for rule in rules:
        assert rule["alert"].startswith("Orgsync"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        used = set(_NAME.findall(rule["expr"]))
        assert used, f"{rule['alert']} uses no metric"
        unknown = used - exported - PROMETHEUS_OWN
        assert not unknown, f"{rule['alert']} uses series orgsync does not export: {sorted(unknown)}"


def test_the_alerts_cover_what_needs_a_person() -> None:
    exprs = " ".join(rule["expr"] for rule in _rules())
    for needed in (
        "orgsync_inbox_oldest_pending_age_seconds",  # lag
        "orgsync_apply_lag_seconds_bucket",
        "orgsync_inbox_dead",  # dead events
        "orgsync_commands_failed_recent",  # failing commands
        "orgsync_reconciliation_drift",  # drift
        "orgsync_reconciliation_last_success_timestamp_seconds",  # reconciliation not run
    ):
        assert needed in exprs, needed


def test_the_dashboard_names_only_exported_series(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs
    used = {name for expr in exprs for name in _NAME.findall(expr)}
    assert not used - exported - PROMETHEUS_OWN, sorted(used - exported)
    # Every instrument and gauge is on the dashboard somewhere.
    shown = {name.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum") for name in used}
    families = {family.name for family in metrics.instruments().registry.collect()}
    assert families <= shown, sorted(families - shown)


def test_the_dashboard_plots_each_reason_events_are_skipped_for_apart() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    for reason in metrics.SKIP_REASONS:
        assert f'orgsync_events_skipped_total{{reason="{reason}"}}' in exprs, reason


def test_the_prometheus_config_loads_the_rules_and_scrapes_the_web_service() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert ALERTS.name in config["rule_files"]
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "orgsync")
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["static_configs"][0]["targets"] == ["web:8000"]


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_config(tmp_path: Path) -> None:
    promtool = _promtool()
    # The token file is mounted in the container; here a stand-in beside a copy of the config.
    token = tmp_path / "orgsync-token"
    token.write_text("a-token\n")
    config = CONFIG.read_text().replace("/etc/prometheus/orgsync-token", str(token))
    (tmp_path / CONFIG.name).write_text(config)
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / CONFIG.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
