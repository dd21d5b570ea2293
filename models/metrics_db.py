"""Gauges read from the database at scrape time: the state an alert needs, the same in every process.

Each scrape runs a handful of small queries in one short read-only transaction, each served
by an index (inbox status, command status) or by the newest rows of small tables. When the
database does not answer, ``orgsync_database_up`` is 0 and the other gauges are left out for
that scrape, rather than reported as zeros that would look healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, func, select

from models import reads
from models.clock import now_ms
from models.reconcile import SCOPE_INSTANCE
from models.redact import describe_error
from models.tables import (
    Command,
    CommandStatus,
    InboxEvent,
    InboxStatus,
    NotificationStatus,
    RuleState,
    SyncRun,
    SyncStatus,
)

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
# The same window ``orgsync status`` uses for "commands failed recently".
FAILED_WINDOW_MS = DAY_MS

NOTIFICATION_STATES = (NotificationStatus.PENDING, NotificationStatus.DELIVERED, NotificationStatus.DEAD)


def _drift_by_kind(drift: Mapping[str, Any] | None) -> dict[str, int]:
    totals: dict[str, int] = {}
    for kind, actions in (drift or {}).items():
        if isinstance(actions, Mapping):
            totals[str(kind)] = sum(value for value in actions.values() if isinstance(value, int))
    return totals


def read_gauges(connection: Connection, *, now: int) -> list[Metric]:
    """Every database gauge, read in the caller's transaction."""
    inbox = InboxEvent.__table__
    commands = Command.__table__
    gauges: list[Metric] = []

    pending = connection.scalar(
        select(func.count()).select_from(inbox).where(inbox.c.status == InboxStatus.PENDING)
    )
    gauges.append(
        GaugeMetricFamily("orgsync_inbox_pending", "Inbox events waiting to be applied.", value=pending or 0)
    )
    # The first pending row in id order is the oldest received: one index probe.
    oldest = connection.scalar(
        select(inbox.c.received_at).where(inbox.c.status == InboxStatus.PENDING).order_by(inbox.c.id).limit(1)
    )
    gauges.append(
        GaugeMetricFamily(
            "orgsync_inbox_oldest_pending_age_seconds",
            "Age of the oldest pending inbox event (0 when none is pending).",
            value=max(0.0, (now - oldest) / 1000) if oldest is not None else 0.0,
        )
    )
    dead = connection.scalar(
        select(func.count()).select_from(inbox).where(inbox.c.status == InboxStatus.DEAD)
    )
    gauges.append(
        GaugeMetricFamily(
            "orgsync_inbox_dead",
            "Inbox events in status dead, waiting for a person (`orgsync events replay`).",
            value=dead or 0,
        )
    )

    by_status = GaugeMetricFamily("orgsync_commands", "Commands by status.", labels=["status"])
    counted = dict.fromkeys(CommandStatus.ALL, 0)
    for status, count in connection.execute(
        select(commands.c.status, func.count()).group_by(commands.c.status)
    ):
        counted[str(status)] = int(count)
    for status, count in sorted(counted.items()):
        by_status.add_metric([status], count)
    gauges.append(by_status)
    failed_recent = connection.scalar(
        select(func.count())
        .select_from(commands)
        .where(commands.c.status == CommandStatus.FAILED, commands.c.updated_at >= now - FAILED_WINDOW_MS)
    )
    gauges.append(
        GaugeMetricFamily(
            "orgsync_commands_failed_recent",
            "Commands that failed in the last 24 hours.",
            value=failed_recent or 0,
        )
    )
    unconfirmed = connection.scalar(
        select(func.count())
        .select_from(commands)
        .where(commands.c.status == CommandStatus.APPLIED, commands.c.flagged_at.is_not(None))
    )
    gauges.append(
        GaugeMetricFamily(
            "orgsync_commands_unconfirmed",
            "Commands applied in Clerk that no webhook confirmed in time.",
            value=unconfirmed or 0,
        )
    )

    gauges += _reconciliation(connection)

    stopped = connection.scalar(
        select(func.count(func.distinct(RuleState.rule_name))).where(RuleState.stopped_at.is_not(None))
    )
    gauges.append(
        GaugeMetricFamily(
            "orgsync_rules_stopped",
            "Rules stopped for flapping (`orgsync rules check`).",
            value=stopped or 0,
        )
    )

    notifications = GaugeMetricFamily(
        "orgsync_notifications", "Change notifications by delivery state.", labels=["state"]
    )
    counts = {state: 0 for state in NOTIFICATION_STATES} | reads.notification_backlog(connection)
    for state, count in sorted(counts.items()):
        notifications.add_metric([state], count)
    gauges.append(notifications)
    return gauges


def _reconciliation(connection: Connection) -> list[Metric]:
    runs = SyncRun.__table__
    gauges: list[Metric] = []
    last_completed = connection.execute(
        select(runs.c.finished_at, runs.c.drift)
        .where(runs.c.status == SyncStatus.COMPLETED, runs.c.scope == SCOPE_INSTANCE)
        .order_by(runs.c.id.desc())
        .limit(1)
    ).one_or_none()
    completed = GaugeMetricFamily(
        "orgsync_reconciliation_last_success_timestamp_seconds",
        "When the last complete reconciliation of the instance finished (absent before the first).",
    )
    drift = GaugeMetricFamily(
        "orgsync_reconciliation_drift",
        "Rows the last complete reconciliation of the instance repaired, by kind.",
        labels=["kind"],
    )
    if last_completed is not None and last_completed.finished_at is not None:
        completed.add_metric([], last_completed.finished_at / 1000)
        for kind, count in sorted(_drift_by_kind(last_completed.drift).items()):
            drift.add_metric([kind], count)
    gauges += [completed, drift]
    last = connection.execute(
        select(runs.c.status, runs.c.started_at).order_by(runs.c.id.desc()).limit(1)
    ).one_or_none()
    failed = GaugeMetricFamily(
        "orgsync_reconciliation_last_failed", "1 when the latest reconciliation run failed."
    )
    failed.add_metric([], 1 if last is not None and last.status == SyncStatus.FAILED else 0)
    gauges.append(failed)
    return gauges


class DatabaseCollector(Collector):
    """Yields the database gauges on each collect; ``orgsync_database_up`` says whether they came."""

    def __init__(self, engine: Engine, *, clock: Callable[[], int] = now_ms) -> None:
        self._engine = engine
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        try:
            with self._engine.connect() as connection:
                gauges = read_gauges(connection, now=self._clock())
                connection.rollback()
        except Exception as exc:
            log.warning("metrics: database gauges unavailable: %s", describe_error(exc))
            gauges = []
            up = 0
        else:
            up = 1
        yield GaugeMetricFamily(
            "orgsync_database_up", "1 when the database answered this scrape's queries.", value=up
        )
        yield from gauges
