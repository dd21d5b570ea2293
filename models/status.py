"""The health of one deployment in one dict: what ``orgsync status``, the console's health page
and the health endpoints show, and which findings need a person."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.notifications import outbox_health
from models.reconcile import latest_runs
from models.retention import DAY_MS
from models.settings import Settings
from models.tables import Command, CommandStatus, InboxEvent, InboxStatus, RuleState, SyncRun, SyncStatus

# The inbox lag above which a person should look.
DEFAULT_MAX_LAG_S = 300.0
FAILED_WINDOW_MS = DAY_MS


def _count(session: Session, *where: Any, table: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def _drift_total(drift: Mapping[str, Any] | None) -> int:
    total = 0
    for actions in (drift or {}).values():
        if isinstance(actions, Mapping):
            total += sum(value for value in actions.values() if isinstance(value, int))
    return total


def collect_status(session: Session, settings: Settings, *, now: int, max_lag_s: float) -> dict[str, Any]:
    """The health of one deployment as a dict with stable keys, and what needs a person."""
    inbox = InboxEvent.__table__
    pending = _count(session, inbox.c.status == InboxStatus.PENDING, table=inbox)
    oldest = session.scalar(
        select(func.min(inbox.c.received_at)).where(inbox.c.status == InboxStatus.PENDING)
    )
    lag_s = max(0.0, (now - oldest) / 1000) if oldest is not None else 0.0
    dead = _count(session, inbox.c.status == InboxStatus.DEAD, table=inbox)

    commands = Command.__table__
    open_count = _count(session, commands.c.status.in_(CommandStatus.OPEN), table=commands)
    failed = _count(
        session,
        commands.c.status == CommandStatus.FAILED,
        commands.c.updated_at >= now - FAILED_WINDOW_MS,
        table=commands,
    )
    unconfirmed = _count(
        session,
        commands.c.status == CommandStatus.APPLIED,
        commands.c.flagged_at.is_not(None),
        table=commands,
    )

    runs = latest_runs(session, limit=1)
    last: SyncRun | None = runs[0] if runs else None
    reconciliation: dict[str, Any] | None = None
    if last is not None:
        reconciliation = {
            "id": last.id,
            "scope": last.scope,
            "organization_id": last.organization_id,
            "status": last.status,
            "started_at": last.started_at,
            "finished_at": last.finished_at,
            "drift": _drift_total(last.drift),
            "error": last.error,
        }
    last_completed = session.scalar(
        select(func.max(SyncRun.finished_at)).where(SyncRun.status == SyncStatus.COMPLETED)
    )
    stopped = sorted(
        set(session.scalars(select(RuleState.rule_name).where(RuleState.stopped_at.is_not(None))))
    )

    notified = outbox_health(session, now_ms=now)

    attention: list[str] = []
    if lag_s > max_lag_s:
        attention.append(f"inbox lag {lag_s:.0f} s (over {max_lag_s:.0f} s): are the workers running?")
    if dead:
        attention.append(f"{dead} dead inbox event(s): `orgsync events list --status dead`, then replay")
    if failed:
        attention.append(
            f"{failed} command(s) failed in the last 24 h: `orgsync commands list --status failed`"
        )
    if unconfirmed:
        attention.append(
            f"{unconfirmed} applied command(s) no webhook confirmed: `orgsync commands list --status applied`"
        )
    if last is not None and last.status == SyncStatus.FAILED:
        attention.append(f"the last reconciliation (run {last.id}) failed: `orgsync sync`")
    if settings.reconcile_interval > 0:
        overdue_ms = 3 * settings.reconcile_interval * 1000
        if last_completed is None or now - last_completed > overdue_ms:
            attention.append("no reconciliation completed within 3 intervals: is beat running?")
    if stopped:
        attention.append(f"stopped rule(s): {', '.join(stopped)}: `orgsync rules check`")
    if notified["dead"]:
        attention.append(
            f"{notified['dead']} dead notification(s): `orgsync notifications list --status dead`, "
            "then `orgsync notifications retry --dead`"
        )
    if notified["oldest_pending_age_s"] > max_lag_s:
        attention.append(
            f"notification backlog: the oldest pending waits {notified['oldest_pending_age_s']:.0f} s "
            f"(over {max_lag_s:.0f} s): are the receivers (ORGSYNC_NOTIFY_URLS) and workers up?"
        )
    return {
        "ok": not attention,
        "attention": attention,
        "checked_at": now,
        "inbox": {"pending": pending, "lag_s": round(lag_s, 3), "dead": dead},
        "commands": {"open": open_count, "failed_24h": failed, "unconfirmed": unconfirmed},
        "reconciliation": reconciliation,
        "rules": {"stopped": stopped},
        "notifications": notified,
    }
